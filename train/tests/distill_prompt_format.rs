//! `steper-train distill --prompt-format plain|chat` through the binary: a `checkpoint:` teacher
//! is prompted inside its own chat template (the step-1 prompt it prefilled is the runtime's chat
//! layout token for token), a checkpoint without a template is refused naming the directory and
//! the file and field, an `openai:` teacher under `chat` calls `/v1/chat/completions` (as
//! `--teacher-chat`), contradicting flags are refused, the gold teacher's records do not depend on
//! the format, and summary.json records the format of every run.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use anyhow::{ensure, Context, Result};
use serde_json::{json, Value};
use steper_runtime::data::PromptPassage;
use steper_runtime::prompt::{ChatTemplate, PromptLayout, DEFAULT_WORD_CAP};
use steper_runtime::Reasoning;
use steper_test_support::fake_http::{FakeServer, Reply};

/// Qwen2.5's ChatML layout without its tool branch.
const CHATML: &str = "{%- for message in messages %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}";
/// Questions distilled per run.
const QUESTIONS: usize = 2;
/// Steps per question (keeps the tiny teacher's runs short).
const MAX_STEPS: &str = "3";
/// New tokens per step.
const MAX_NEW_TOKENS: &str = "12";

fn steper_train(args: &[&str]) -> Result<Output> {
    Ok(Command::new(env!("CARGO_BIN_EXE_steper-train"))
        .args(args)
        .output()?)
}

fn ok(out: &Output) -> Result<()> {
    ensure!(
        out.status.success(),
        "steper-train failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A copy of the tiny student whose `tokenizer_config.json` carries `template` (or none).
fn student_copy(dir: &Path, template: Option<&str>) -> Result<PathBuf> {
    let dst = dir.join(if template.is_some() { "chat" } else { "plain" });
    steper_test_support::copy_with_chat_template(
        &steper_test_support::tiny()?.student,
        &dst,
        template,
    )
}

/// The arguments every run shares: the tiny world's train questions and index.
fn common_args(out: &Path) -> Result<Vec<String>> {
    let tiny = steper_test_support::tiny()?;
    Ok(vec![
        "distill".into(),
        "--data".into(),
        tiny.world.join("train.jsonl").display().to_string(),
        "--index".into(),
        tiny.index.display().to_string(),
        "--out".into(),
        out.display().to_string(),
        "--limit".into(),
        QUESTIONS.to_string(),
        "--filter".into(),
        "none".into(),
        "--max-steps".into(),
        MAX_STEPS.into(),
        "--max-new-tokens".into(),
        MAX_NEW_TOKENS.into(),
        "--json".into(),
    ])
}

fn run_distill(out: &Path, extra: &[&str]) -> Result<Output> {
    let mut args = common_args(out)?;
    args.extend(extra.iter().map(|s| s.to_string()));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    steper_train(&refs)
}

fn summary_format(out: &Path) -> Result<String> {
    let v: Value = serde_json::from_str(&std::fs::read_to_string(out.join("summary.json"))?)?;
    Ok(v["prompt_format"]
        .as_str()
        .context("summary.json: no prompt_format")?
        .to_string())
}

fn traces(out: &Path) -> Result<Vec<Reasoning>> {
    std::fs::read_to_string(out.join("traces.jsonl"))?
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l)?;
            Ok(serde_json::from_value(v["trace"].clone())?)
        })
        .collect()
}

/// Every first step's prefilled prompt is `layout`'s rendering, token for token (the tiny
/// teacher's prompts fit its context whole).
fn first_prompts_match(out: &Path, layout: &PromptLayout, student: &Path) -> Result<usize> {
    let tokenizer = tokenizers::Tokenizer::from_file(student.join("tokenizer.json"))
        .map_err(anyhow::Error::msg)?;
    let mut checked = 0;
    for r in traces(out)? {
        let s = r.steps.first().context("a trace without steps")?;
        ensure!(!s.truncated, "step 1 of {:?} was cut to fit", r.question);
        let passages: Vec<PromptPassage> = r.passages[..s.held]
            .iter()
            .map(|p| PromptPassage {
                title: p.title.clone(),
                text: p.text.clone(),
            })
            .collect();
        let prompt = layout.render(&r.question, &passages, &[], DEFAULT_WORD_CAP, None)?;
        let n = tokenizer
            .encode(prompt.as_str(), false)
            .map_err(anyhow::Error::msg)?
            .len();
        assert_eq!(s.prefilled_tokens, n, "{:?}: {prompt:?}", r.question);
        checked += 1;
    }
    Ok(checked)
}

#[test]
fn checkpoint_teacher_is_prompted_inside_its_chat_template() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let chat_student = student_copy(tmp.path(), Some(CHATML))?;
    let teacher = format!("checkpoint:{}", chat_student.display());

    let chat_out = tmp.path().join("chat");
    ok(&run_distill(
        &chat_out,
        &["--teacher", &teacher, "--prompt-format", "chat"],
    )?)?;
    assert_eq!(summary_format(&chat_out)?, "chat");
    let template = ChatTemplate::from_model_dir(&chat_student, None)?.context("template")?;
    let chat = PromptLayout::chat(template);
    assert_eq!(
        first_prompts_match(&chat_out, &chat, &chat_student)?,
        QUESTIONS
    );

    let plain_out = tmp.path().join("plain");
    ok(&run_distill(&plain_out, &["--teacher", &teacher])?)?;
    assert_eq!(summary_format(&plain_out)?, "plain");
    assert_eq!(
        first_prompts_match(&plain_out, &PromptLayout::Plain, &chat_student)?,
        QUESTIONS
    );
    // The two layouts differ, so each check above can tell them apart.
    let a = traces(&chat_out)?;
    let b = traces(&plain_out)?;
    assert!(a[0].steps[0].prefilled_tokens > b[0].steps[0].prefilled_tokens);

    // Records stay layout-free: question, passages, prior sentences and the teacher's sentence.
    let recs = std::fs::read_to_string(chat_out.join("stepwise.jsonl"))?;
    let steps: usize = a.iter().map(|r| r.steps.len()).sum();
    assert_eq!(recs.lines().count(), steps);
    for l in recs.lines() {
        let v: Value = serde_json::from_str(l)?;
        assert_eq!(v["teacher"], teacher.as_str());
        assert!(!v["question"]
            .as_str()
            .unwrap_or_default()
            .contains("<|im_start|>"));
    }
    Ok(())
}

#[test]
fn checkpoint_without_a_chat_template_is_refused_naming_the_directory() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let student = student_copy(tmp.path(), None)?;
    let out = tmp.path().join("out");
    let r = run_distill(
        &out,
        &[
            "--teacher",
            &format!("checkpoint:{}", student.display()),
            "--prompt-format",
            "chat",
        ],
    )?;
    assert!(!r.status.success());
    let e = stderr(&r);
    assert!(e.contains(&student.display().to_string()), "{e}");
    assert!(
        e.contains("tokenizer_config.json") && e.contains("chat_template"),
        "{e}"
    );
    assert!(!out.join("traces.jsonl").exists());
    Ok(())
}

#[test]
fn contradicting_or_unknown_settings_are_refused() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let student = student_copy(tmp.path(), Some(CHATML))?;
    let checkpoint = format!("checkpoint:{}", student.display());
    let out = tmp.path().join("out");
    let cases: [(&[&str], &[&str]); 4] = [
        (
            &[
                "--teacher",
                "openai:http://127.0.0.1:9",
                "--teacher-chat",
                "--prompt-format",
                "plain",
            ],
            &["--prompt-format plain", "--teacher-chat"],
        ),
        (
            &["--teacher", "gold", "--prompt-format", "xml"],
            &["plain or chat", "xml"],
        ),
        (
            &["--teacher", &checkpoint, "--teacher-chat"],
            &["--teacher-chat", "openai:"],
        ),
        (
            &[
                "--teacher",
                &checkpoint,
                "--prompt-format",
                "chat",
                "--teacher-prompt",
                "default",
            ],
            &["--teacher-prompt default", "--prompt-format chat"],
        ),
    ];
    for (args, needles) in cases {
        let r = run_distill(&out, args)?;
        assert!(!r.status.success(), "{args:?} was accepted");
        let e = stderr(&r);
        for n in needles {
            assert!(e.contains(n), "{args:?}: {e}");
        }
    }
    Ok(())
}

#[test]
fn gold_records_do_not_depend_on_the_format_which_is_recorded() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let (plain, chat) = (tmp.path().join("plain"), tmp.path().join("chat"));
    ok(&run_distill(&plain, &["--teacher", "gold"])?)?;
    ok(&run_distill(
        &chat,
        &["--teacher", "gold", "--prompt-format", "chat"],
    )?)?;
    assert_eq!(summary_format(&plain)?, "plain");
    assert_eq!(summary_format(&chat)?, "chat");
    let records = |d: &Path| std::fs::read_to_string(d.join("stepwise.jsonl"));
    let p = records(&plain)?;
    assert!(!p.is_empty());
    assert_eq!(p, records(&chat)?);
    Ok(())
}

/// A minimal OpenAI-compatible server: answers with the answer sentence in the shape of the
/// endpoint asked.
fn fake_openai() -> Result<FakeServer> {
    FakeServer::start(|_, req| {
        let sentence = " So the answer is: Paris.";
        let body = if req.path.ends_with("/chat/completions") {
            json!({"choices": [{"message": {"role": "assistant", "content": sentence}, "finish_reason": "stop"}], "usage": {"completion_tokens": 6}})
        } else {
            json!({"choices": [{"text": sentence, "finish_reason": "stop"}], "usage": {"completion_tokens": 6}})
        };
        Reply::Json(200, Vec::new(), body.to_string())
    })
}

fn paths(server: &FakeServer) -> Vec<String> {
    server.seen().into_iter().map(|r| r.path).collect()
}

#[test]
fn openai_teacher_under_chat_calls_chat_completions() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    for (i, (flags, endpoint, format)) in [
        (
            &["--prompt-format", "chat"][..],
            "/v1/chat/completions",
            "chat",
        ),
        (&["--teacher-chat"][..], "/v1/chat/completions", "chat"),
        (
            &["--teacher-chat", "--prompt-format", "chat"][..],
            "/v1/chat/completions",
            "chat",
        ),
        (&[][..], "/v1/completions", "plain"),
    ]
    .into_iter()
    .enumerate()
    {
        let server = fake_openai()?;
        let out = tmp.path().join(format!("run{i}"));
        let teacher = format!("openai:{}/v1", server.url);
        let mut args = vec!["--teacher", teacher.as_str(), "--max-retries", "0"];
        args.extend_from_slice(flags);
        ok(&run_distill(&out, &args)?)?;
        let paths = paths(&server);
        assert_eq!(paths.len(), QUESTIONS, "{flags:?}: {paths:?}");
        assert!(paths.iter().all(|p| p == endpoint), "{flags:?}: {paths:?}");
        assert_eq!(summary_format(&out)?, format, "{flags:?}");
    }
    Ok(())
}
