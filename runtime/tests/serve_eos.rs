//! Generation on the server stops at any of the model's end ids, not only the first: a copy of
//! the tiny export whose `steper.json` (and `genai_config.json`) lists the export's own end id
//! followed by two more. The tiny model cannot be steered to emit a chosen id, so the extra ids
//! are read off its own greedy output: a first, direct greedy run on each prompt (the export
//! with its single end id) finds a token it emits (a few positions in where the run varies, else
//! its first); that token becomes the second end id for `/v1/completions` (the third for
//! `/v1/chat/completions`). The served answers must then end right before that position with
//! `finish_reason: "stop"`: a server that honoured only the first id would run on to
//! `max_tokens` (`"length"`), which the greedy run shows it never reaches an original end id
//! before.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use serde_json::{json, Value};
use steper_loadgen::client::Client;
use steper_runtime::prompt::{ChatMessage, ChatTemplate};
use steper_runtime::serve::{ChatRequest, CompletionRequest, Endpoint, ServeConfig, Server};
use steper_runtime::{BackendKind, Engine, LogitsMode, Manifest, OrtOptions};

const CLIENT_TIMEOUT: Duration = Duration::from_secs(120);
const LOAD_LIMIT: Duration = Duration::from_secs(120);
/// Tokens asked for: the chosen end id must come before this many.
const MAX_TOKENS: usize = 12;
/// Questions of the tiny world tried as prompts until one shows a usable greedy run.
const PROMPTS_TRIED: usize = 10;
const MODEL_NAME: &str = "tiny-eos";

/// Qwen2.5's ChatML layout without its tool branch.
const CHATML: &str = "{%- for message in messages %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}";

fn ort() -> BackendKind {
    BackendKind::Ort(OrtOptions::default().with_intra_threads(1))
}

/// A copy of the tiny export with a ChatML `chat_template`.
fn model_copy(dir: &Path) -> Result<PathBuf> {
    let src = common::test_model()?;
    let dst = dir.join(MODEL_NAME);
    std::fs::create_dir_all(&dst)?;
    for entry in std::fs::read_dir(&src)? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            std::fs::copy(entry.path(), dst.join(entry.file_name()))?;
        }
    }
    let config = json!({"eos_token": "</s>", "bos_token": null, "chat_template": CHATML});
    std::fs::write(dst.join("tokenizer_config.json"), config.to_string())?;
    Ok(dst)
}

/// The greedy continuation of `ids`, `n` tokens, end ids not interpreted.
fn greedy(engine: &Engine, ids: &[u32], n: usize) -> Result<Vec<u32>> {
    let g = engine.generator();
    let mut seq = g.new_sequence()?;
    let mut logits = g.append(&mut seq, ids, LogitsMode::Last)?;
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let id = steper_test_support::argmax(logits.last());
        out.push(id);
        logits = g.append(&mut seq, &[id], LogitsMode::Last)?;
    }
    Ok(out)
}

fn decode(engine: &Engine, ids: &[u32]) -> Result<String> {
    engine
        .tokenizer()
        .decode(ids, true)
        .map_err(anyhow::Error::msg)
}

/// A position of `run` to stop at: the first `i ≥ 1` whose token has not appeared before it,
/// is none of `avoid`, and adds text after some text (so the stop shows in the text); failing
/// that, position 0 when its token is none of `avoid` and has text (the tiny untrained model
/// often repeats one token: the answer is then empty where the full run is not).
fn fresh_position(engine: &Engine, run: &[u32], avoid: &[u32]) -> Result<Option<usize>> {
    for i in 1..run.len() {
        if run[..i].contains(&run[i]) || avoid.contains(&run[i]) {
            continue;
        }
        let (before, with) = (decode(engine, &run[..i])?, decode(engine, &run[..=i])?);
        if !before.trim().is_empty() && with.len() > before.len() {
            return Ok(Some(i));
        }
    }
    match run.first() {
        Some(t) if !avoid.contains(t) && !decode(engine, &run[..1])?.is_empty() => Ok(Some(0)),
        _ => Ok(None),
    }
}

/// A prompt's greedy run and where the served answer must stop.
struct Case {
    body: Value,
    run: Vec<u32>,
    stop_at: usize,
}

/// Expected stop: the first position of `run` holding any end id.
fn first_end(run: &[u32], eos: &[u32]) -> Option<usize> {
    run.iter().position(|t| eos.contains(t))
}

#[test]
fn completions_and_chat_stop_at_any_of_several_eos_ids() -> Result<()> {
    let tiny = steper_test_support::tiny()?;
    let tmp = tempfile::tempdir()?;
    let model = model_copy(tmp.path())?;
    let direct = Engine::builder()
        .model_dir(&model)
        .backend(ort())
        .index(&tiny.index)
        .build()?;
    let original = direct.eos_token_ids().to_vec();
    ensure!(!original.is_empty(), "the tiny export lists no end id");
    let template = ChatTemplate::from_model_dir(&model, None)?.context("template")?;

    // The completion prompt and the chat conversation: the first question whose greedy runs
    // meet no original end id within MAX_TOKENS and show a fresh token after some text.
    let questions = tiny.questions("dev")?;
    let mut found = None;
    for q in questions.iter().take(PROMPTS_TRIED) {
        let prompt = format!("Q: {}\nA:", q.question);
        let cbody = json!({"model": MODEL_NAME, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0});
        let creq = CompletionRequest::parse(cbody.to_string().as_bytes())
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        let ids = direct
            .tokenizer()
            .encode(creq.prompt.as_str(), creq.add_special_tokens)
            .map_err(anyhow::Error::msg)?
            .get_ids()
            .to_vec();
        let crun = greedy(&direct, &ids, MAX_TOKENS)?;

        let messages = [ChatMessage::new("user", format!("Q: {}", q.question))];
        let hbody = json!({"model": MODEL_NAME, "messages": messages, "max_tokens": MAX_TOKENS, "temperature": 0});
        let hreq = ChatRequest::parse(hbody.to_string().as_bytes())
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        let rendered = template.render(&messages, true)?;
        let ids = direct
            .tokenizer()
            .encode(rendered.as_str(), hreq.completion.add_special_tokens)
            .map_err(anyhow::Error::msg)?
            .get_ids()
            .to_vec();
        let hrun = greedy(&direct, &ids, MAX_TOKENS)?;

        if first_end(&crun, &original).is_some() || first_end(&hrun, &original).is_some() {
            continue;
        }
        let Some(i) = fresh_position(&direct, &crun, &[])? else {
            continue;
        };
        let second = crun[i];
        // The chat's own id must not cut the completion short of its stop.
        let Some(j) = fresh_position(&direct, &hrun, &crun[..=i])? else {
            continue;
        };
        let third = hrun[j];
        found = Some((cbody, crun, hbody, hrun, second, third));
        break;
    }
    let (cbody, crun, hbody, hrun, second, third) = found.with_context(|| {
        format!("none of the first {PROMPTS_TRIED} dev questions gives a greedy run without an end id and with a fresh token after some text")
    })?;
    drop(direct);

    // The export's end ids, then the two chosen ones.
    let mut eos = original.clone();
    eos.extend([second, third]);
    let manifest_path = model.join("steper.json");
    let mut manifest: Value = serde_json::from_str(&std::fs::read_to_string(&manifest_path)?)?;
    let obj = manifest
        .as_object_mut()
        .context("steper.json: not an object")?;
    obj.remove("eos_token_id");
    obj.insert("eos_token_ids".into(), json!(eos));
    std::fs::write(&manifest_path, manifest.to_string())?;
    let genai_path = model.join("genai_config.json");
    let mut genai: Value = serde_json::from_str(&std::fs::read_to_string(&genai_path)?)?;
    genai["model"]["eos_token_id"] = json!(eos);
    std::fs::write(&genai_path, genai.to_string())?;
    assert_eq!(Manifest::load(&manifest_path)?.eos_token_ids, eos);

    let cases = [
        (
            "/v1/completions",
            Case {
                stop_at: first_end(&crun, &eos).context("completion run")?,
                body: cbody,
                run: crun,
            },
        ),
        (
            "/v1/chat/completions",
            Case {
                stop_at: first_end(&hrun, &eos).context("chat run")?,
                body: hbody,
                run: hrun,
            },
        ),
    ];
    // By construction the completion stops at the second id.
    assert_eq!(cases[0].1.run[cases[0].1.stop_at], second);

    let (index, served) = (tiny.index.clone(), model.clone());
    let h = Server::start(
        ServeConfig::default()
            .with_addr("127.0.0.1:0".parse()?)
            .with_workers(1)
            .with_timeout(CLIENT_TIMEOUT)
            .with_model_name(MODEL_NAME),
        move || {
            Engine::builder()
                .model_dir(&served)
                .backend(ort())
                .index(&index)
                .build()
        },
    )?;
    h.wait_ready(LOAD_LIMIT)?;
    let mut c = Client::new(&h.addr().to_string(), CLIENT_TIMEOUT)?;
    let engine = Engine::builder()
        .model_dir(&model)
        .backend(ort())
        .index(&tiny.index)
        .build()?;
    assert_eq!(engine.eos_token_ids(), eos.as_slice());

    for (path, case) in &cases {
        let k = case.stop_at;
        let stop_id = case.run[k];
        assert!(
            !original.contains(&stop_id) && k < MAX_TOKENS,
            "{path}: the run must stop at an added id before max_tokens"
        );
        let expected = decode(&engine, &case.run[..k])?;
        let with_id = decode(&engine, &case.run[..=k])?;
        let r = c.post_json(path, &case.body)?;
        assert_eq!(
            r.status,
            200,
            "{path}: {}",
            String::from_utf8_lossy(&r.body)
        );
        let v = r.json()?;
        let choice = &v["choices"][0];
        let text = choice
            .get("text")
            .or_else(|| choice.pointer("/message/content"))
            .and_then(Value::as_str)
            .with_context(|| format!("{path}: no text in {v}"))?;
        eprintln!(
            "{path}: end ids {eos:?}; greedy run {:?}; stops at position {k} (id {stop_id}): {text:?}",
            case.run
        );
        assert_eq!(choice["finish_reason"], "stop", "{path}: {v}");
        assert_eq!(text, expected, "{path}");
        assert_ne!(text, with_id, "{path}: the stop id's text was emitted");
        assert_eq!(
            v["usage"]["completion_tokens"].as_u64(),
            Some(k as u64),
            "{path}"
        );

        // Streamed: the same text and one `stop`.
        let mut sbody = case.body.clone();
        sbody["stream"] = json!(true);
        let r = c.post_json(path, &sbody)?;
        assert_eq!(r.status, 200, "{path} stream");
        let events = r.events();
        let chunks: Vec<Value> = events
            .iter()
            .filter(|e| e.data != "[DONE]")
            .map(|e| serde_json::from_str(&e.data))
            .collect::<std::result::Result<_, _>>()?;
        let streamed: String = chunks
            .iter()
            .filter_map(|c| {
                let ch = &c["choices"][0];
                ch.get("text")
                    .or_else(|| ch.pointer("/delta/content"))
                    .and_then(Value::as_str)
            })
            .collect();
        assert_eq!(streamed, expected, "{path} stream");
        let finishes: Vec<&str> = chunks
            .iter()
            .filter_map(|c| c["choices"][0]["finish_reason"].as_str())
            .collect();
        assert_eq!(finishes, ["stop"], "{path} stream");
    }
    assert_eq!(h.metrics().requests(Endpoint::Completions, 200), 2);
    assert_eq!(h.metrics().requests(Endpoint::ChatCompletions, 200), 2);
    h.shutdown()?;
    Ok(())
}
