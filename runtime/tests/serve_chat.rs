//! Chat end to end: the loop in `prompt_format: chat`, and `/v1/chat/completions` and
//! `/v1/models` on a loopback port with the tiny export, given a
//! ChatML chat template in a copy of its directory: the non-streamed answer equals the greedy
//! completion of the template's rendering, the stream carries the same text in
//! `chat.completion.chunk` events ending in `data: [DONE]`, bad bodies are 400s naming the
//! field, a model without a template answers 400, and the metrics count the endpoint.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::{json, Value};
use steper_loadgen::client::Client;
use steper_runtime::prompt::{ChatMessage, ChatTemplate};
use steper_runtime::serve::{complete, ChatRequest, Endpoint, ServeConfig, Server, ServerHandle};
use steper_runtime::{BackendKind, Engine, OrtOptions};

const CLIENT_TIMEOUT: Duration = Duration::from_secs(120);
const LOAD_LIMIT: Duration = Duration::from_secs(120);

/// Qwen2.5's ChatML layout without its tool branch.
const CHATML: &str = "{%- for message in messages %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}";

fn ort() -> BackendKind {
    BackendKind::Ort(OrtOptions::default().with_intra_threads(1))
}

/// A copy of the tiny export whose `tokenizer_config.json` carries `template` (or none).
fn model_with_template(dir: &Path, template: Option<&str>) -> Result<PathBuf> {
    steper_test_support::copy_with_chat_template(
        &common::test_model()?,
        &dir.join("tiny-chat"),
        template,
    )
}

fn start(model: &Path) -> Result<ServerHandle> {
    let index = steper_test_support::tiny()?.index.clone();
    let model = model.to_path_buf();
    let config = ServeConfig::default()
        .with_addr("127.0.0.1:0".parse()?)
        .with_workers(1)
        .with_timeout(Duration::from_secs(120))
        .with_model_name("tiny-chat");
    let h = Server::start(config, move || {
        Engine::builder()
            .model_dir(&model)
            .backend(ort())
            .index(&index)
            .build()
    })?;
    h.wait_ready(LOAD_LIMIT)?;
    Ok(h)
}

#[test]
fn chat_completions_and_models() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let model = model_with_template(tmp.path(), Some(CHATML))?;
    let h = start(&model)?;
    let mut c = Client::new(&h.addr().to_string(), CLIENT_TIMEOUT)?;

    // GET /v1/models: OpenAI's list.
    let r = c.get("/v1/models")?;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let v = r.json()?;
    assert_eq!(v["object"], "list");
    assert_eq!(v["data"][0]["id"], "tiny-chat");
    assert_eq!(v["data"][0]["object"], "model");

    // Non-streamed: the greedy completion of the rendered conversation.
    let body = json!({
        "model": "tiny-chat",
        "messages": [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "Who wrote the book?"}
        ],
        "max_tokens": 10,
        "temperature": 0,
        "logprobs": true,
        "top_logprobs": 2
    });
    let r = c.post_json("/v1/chat/completions", &body)?;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let v = r.json()?;
    assert_eq!(v["object"], "chat.completion");
    assert!(v["id"].as_str().is_some_and(|s| s.starts_with("chatcmpl-")));
    let msg = &v["choices"][0]["message"];
    assert_eq!(msg["role"], "assistant");
    let text = msg["content"].as_str().context("content")?.to_string();

    let direct = Engine::builder()
        .model_dir(&model)
        .backend(ort())
        .index(&steper_test_support::tiny()?.index)
        .build()?;
    let template = ChatTemplate::from_model_dir(&model, None)?.context("template")?;
    let prompt = template.render(
        &[
            ChatMessage::new("system", "Answer briefly."),
            ChatMessage::new("user", "Who wrote the book?"),
        ],
        true,
    )?;
    assert_eq!(
        prompt,
        "<|im_start|>system\nAnswer briefly.<|im_end|>\n<|im_start|>user\nWho wrote the book?<|im_end|>\n<|im_start|>assistant\n"
    );
    let mut req = ChatRequest::parse(body.to_string().as_bytes())
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .completion;
    req.prompt = prompt;
    let expected = complete(
        direct.generator(),
        &steper_runtime::Cancel::new(),
        direct.tokenizer(),
        direct.eos_token_ids(),
        &req,
        0,
        &mut |_| true,
    )?
    .map_err(|p| anyhow::anyhow!("{p:?}"))?;
    assert_eq!(text, expected.text);
    assert_eq!(v["usage"]["prompt_tokens"], expected.prompt_tokens);
    assert_eq!(v["usage"]["completion_tokens"], expected.completion_tokens);
    let lp = v["choices"][0]["logprobs"]["content"]
        .as_array()
        .context("logprobs.content")?;
    assert_eq!(lp.len(), expected.completion_tokens.min(lp.len()));
    assert!(lp
        .iter()
        .all(|t| t["logprob"].as_f64().is_some_and(|x| x <= 0.0)
            && t["top_logprobs"].as_array().is_some_and(|a| a.len() <= 2)));

    // Streamed: role first, the same text in pieces, a finish reason, usage, [DONE].
    let mut sbody = body.clone();
    sbody["stream"] = json!(true);
    sbody["stream_options"] = json!({"include_usage": true});
    sbody.as_object_mut().context("body")?.remove("logprobs");
    sbody
        .as_object_mut()
        .context("body")?
        .remove("top_logprobs");
    let r = c.post_json("/v1/chat/completions", &sbody)?;
    assert_eq!(r.status, 200);
    let events = r.events();
    let last = events.last().context("no events")?;
    assert_eq!(last.data, "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(&e.data))
        .collect::<std::result::Result<_, _>>()?;
    assert!(chunks
        .iter()
        .all(|c| c["object"] == "chat.completion.chunk"));
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let streamed: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(streamed, text);
    let finish = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["finish_reason"].as_str())
        .collect::<Vec<_>>();
    assert_eq!(finish.len(), 1);
    let usage = chunks.last().context("usage chunk")?;
    assert_eq!(
        usage["usage"]["completion_tokens"],
        expected.completion_tokens
    );

    // The body `steper-train distill --teacher openai:URL --teacher-chat` sends (train/src/
    // teacher/openai.rs `request_body`), and the fields it reads back.
    let teacher = json!({
        "model": "tiny-chat",
        "messages": [{"role": "user", "content": "Q: Who wrote the book?\nA:"}],
        "max_tokens": 8,
        "temperature": 0.0,
        "stop": ["\n"],
        "n": 1,
        "stream": false
    });
    let r = c.post_json("/v1/chat/completions", &teacher)?;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let v = r.json()?;
    let content = v
        .pointer("/choices/0/message/content")
        .and_then(Value::as_str)
        .context("choices[0].message.content")?;
    assert!(!content.contains('\n'), "{content:?}");
    assert!(v
        .pointer("/usage/completion_tokens")
        .and_then(Value::as_u64)
        .is_some());

    // Bad bodies: 400 naming the field.
    for (bad, field) in [
        (json!({"messages": "hi"}), "messages"),
        (
            json!({"messages": [{"role": "user"}], "temperature": "hot"}),
            "temperature",
        ),
        (json!({"messages": [{"content": "x"}]}), "messages[0].role"),
        (
            json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": -1}),
            "max_tokens",
        ),
    ] {
        let r = c.post_json("/v1/chat/completions", &bad)?;
        assert_eq!(r.status, 400, "{bad}");
        let e = r.json()?;
        assert_eq!(e["error"]["param"], field, "{bad}: {e}");
    }
    assert_eq!(h.metrics().requests(Endpoint::ChatCompletions, 200), 3);
    assert_eq!(h.metrics().requests(Endpoint::ChatCompletions, 400), 4);
    assert_eq!(h.metrics().requests(Endpoint::Models, 200), 1);
    h.shutdown()?;
    Ok(())
}

#[test]
fn a_model_without_a_template_answers_400_naming_messages() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let model = model_with_template(tmp.path(), None)?;
    let h = start(&model)?;
    let mut c = Client::new(&h.addr().to_string(), CLIENT_TIMEOUT)?;
    let r = c.post_json(
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "Hi"}]}),
    )?;
    assert_eq!(r.status, 400);
    let e = r.json()?;
    assert_eq!(e["error"]["param"], "messages");
    assert!(e["error"]["message"]
        .as_str()
        .is_some_and(|m| m.contains("chat template")));
    h.shutdown()?;
    Ok(())
}

/// A copy of the tiny export whose steper.json says `prompt_format: chat`.
fn chat_format_model(dir: &Path, template: Option<&str>) -> Result<PathBuf> {
    let model = model_with_template(dir, template)?;
    let path = model.join("steper.json");
    let mut manifest: Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
    manifest["prompt_format"] = json!("chat");
    std::fs::write(&path, serde_json::to_string_pretty(&manifest)?)?;
    Ok(model)
}

#[test]
fn the_loop_follows_the_manifest_prompt_format() -> Result<()> {
    let tiny = steper_test_support::tiny()?;
    let question = tiny
        .questions("dev")?
        .into_iter()
        .next()
        .context("no dev question")?
        .question;
    let plain_dir = tempfile::tempdir()?;
    let chat_dir = tempfile::tempdir()?;
    let plain_model = model_with_template(plain_dir.path(), Some(CHATML))?;
    let chat_model = chat_format_model(chat_dir.path(), Some(CHATML))?;
    let run = |model: &Path| -> Result<steper_runtime::Reasoning> {
        let engine = Engine::builder()
            .model_dir(model)
            .backend(ort())
            .index(&tiny.index)
            .build()?;
        let mut opts = engine.default_options();
        opts.loop_options.max_steps = 3;
        Ok(engine.reason(&question, &opts)?)
    };
    let plain = run(&plain_model)?;
    let chat = run(&chat_model)?;
    let (p1, c1) = (&plain.steps[0], &chat.steps[0]);
    assert_eq!(
        p1.retrieved, c1.retrieved,
        "the same passages in both formats"
    );
    // The chat prompt is the plain one inside the template's markup: longer, by the markup.
    let template = ChatTemplate::from_model_dir(&chat_model, None)?.context("template")?;
    let tok = tokenizers::Tokenizer::from_file(chat_model.join("tokenizer.json"))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let count = |s: &str| -> Result<usize> {
        Ok(tok
            .encode(s, true)
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .len())
    };
    let markup = template.render(&[ChatMessage::new("user", "")], true)?;
    assert!(
        c1.prompt_tokens > p1.prompt_tokens,
        "{} vs {}",
        c1.prompt_tokens,
        p1.prompt_tokens
    );
    assert!(
        c1.prompt_tokens <= p1.prompt_tokens + count(&markup)?,
        "chat {} tokens, plain {}, markup {}",
        c1.prompt_tokens,
        p1.prompt_tokens,
        count(&markup)?
    );
    // Cross-step KV reuse keeps working in the chat layout.
    if let Some(c2) = chat.steps.get(1) {
        assert!(c2.reused_tokens > 0, "{c2:?}");
    }

    // A chat-format manifest without a template is refused, naming the directory.
    let none_dir = tempfile::tempdir()?;
    let no_template = chat_format_model(none_dir.path(), None)?;
    let e = Engine::builder()
        .model_dir(&no_template)
        .backend(ort())
        .index(&tiny.index)
        .build()
        .err()
        .context("a chat-format model without a template loaded")?
        .to_string();
    assert!(
        e.contains("chat template") && e.contains("tiny-chat"),
        "{e}"
    );
    Ok(())
}
