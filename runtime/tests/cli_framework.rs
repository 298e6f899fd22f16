//! `--framework ircot|self-ask` on `steper-run ask`, `eval` and `serve`, and the `framework` of
//! `steper.json`'s `loop`, on the tiny exported student: the flag picks the loop, the manifest's
//! choice is the default, the flag overrides it, and a bad value is a clear error.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use anyhow::{Context, Result};
use steper_test_support::cli::{self, output_text, path_str};

fn steper_run(args: &[&str]) -> Result<Output> {
    cli::run(env!("CARGO_BIN_EXE_steper-run"), args)
}

/// A copy of the tiny export whose `steper.json` names `framework` in its `loop`.
fn export_with_framework(dst: &Path, framework: &str) -> Result<PathBuf> {
    let src = common::test_model()?;
    std::fs::create_dir_all(dst)?;
    for e in std::fs::read_dir(&src)? {
        let e = e?;
        if e.file_type()?.is_file() {
            std::fs::copy(e.path(), dst.join(e.file_name()))?;
        }
    }
    let path = dst.join("steper.json");
    let mut m: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
    m["loop"]["framework"] = serde_json::json!(framework);
    std::fs::write(&path, serde_json::to_string_pretty(&m)?)?;
    Ok(dst.to_path_buf())
}

/// The first dev question of the tiny world.
fn question() -> Result<String> {
    let tiny = steper_test_support::tiny()?;
    let q = tiny.questions("dev")?;
    Ok(q.first()
        .context("the tiny world has no dev question")?
        .question
        .clone())
}

/// `ask --json` on `model` with `extra` flags: the reasoning object.
fn ask(model: &Path, extra: &[&str]) -> Result<serde_json::Value> {
    let tiny = steper_test_support::tiny()?;
    let q = question()?;
    let mut args = vec![
        "ask",
        "--model",
        path_str(model),
        "--index",
        path_str(&tiny.index),
        "--backend",
        "tract",
        "--max-steps",
        "3",
        "--json",
    ];
    args.extend_from_slice(extra);
    args.push(&q);
    let o = steper_run(&args)?;
    anyhow::ensure!(o.status.success(), "ask {extra:?}: {}", output_text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout)?;
    Ok(v["reasoning"].clone())
}

/// The framework a reasoning object ran, from its `framework` (absent: IRCoT) and its steps.
fn framework_of(r: &serde_json::Value) -> Result<&'static str> {
    let steps = r["steps"].as_array().context("reasoning without steps")?;
    anyhow::ensure!(!steps.is_empty(), "no steps in {r}");
    let sentences: Vec<&str> = steps
        .iter()
        .map(|s| s["sentence"].as_str().unwrap_or_default())
        .collect();
    let self_ask_form = sentences
        .iter()
        .all(|s| s.starts_with("Follow up:") || s.starts_with("So the final answer is:"));
    match r.get("framework").and_then(|f| f.as_str()) {
        Some("self-ask") => {
            anyhow::ensure!(self_ask_form, "self-ask steps {sentences:?}");
            Ok("self-ask")
        }
        None => {
            // IRCoT steps never carry Self-Ask's cues.
            anyhow::ensure!(
                !sentences.iter().any(
                    |s| s.starts_with("Follow up:") || s.starts_with("So the final answer is:")
                ),
                "ircot steps {sentences:?}"
            );
            Ok("ircot")
        }
        Some(other) => anyhow::bail!("unexpected framework {other} in {r}"),
    }
}

#[test]
fn ask_runs_the_flag_s_framework_and_defaults_to_the_manifest_s() -> Result<()> {
    let model = common::test_model()?;
    assert_eq!(framework_of(&ask(&model, &[])?)?, "ircot");
    assert_eq!(
        framework_of(&ask(&model, &["--framework", "self-ask"])?)?,
        "self-ask"
    );

    let dir = tempfile::tempdir()?;
    let sa = export_with_framework(&dir.path().join("sa"), "self-ask")?;
    assert_eq!(framework_of(&ask(&sa, &[])?)?, "self-ask");
    assert_eq!(
        framework_of(&ask(&sa, &["--framework", "ircot"])?)?,
        "ircot"
    );
    Ok(())
}

#[test]
fn eval_runs_self_ask_when_asked() -> Result<()> {
    let tiny = steper_test_support::tiny()?;
    let model = common::test_model()?;
    let dir = tempfile::tempdir()?;
    let out = dir.path().join("results.jsonl");
    let dev = tiny.world.join("dev.jsonl");
    let o = steper_run(&[
        "eval",
        "--model",
        path_str(&model),
        "--index",
        path_str(&tiny.index),
        "--backend",
        "tract",
        "--data",
        path_str(&dev),
        "--limit",
        "3",
        "--max-steps",
        "3",
        "--framework",
        "self-ask",
        "--json",
        "--out",
        path_str(&out),
    ])?;
    assert!(o.status.success(), "{}", output_text(&o));
    let summary: serde_json::Value = serde_json::from_slice(&o.stdout)?;
    assert_eq!(summary["questions"], 3);
    assert_eq!(summary["framework"], "self-ask", "{summary}");
    let lines = std::fs::read_to_string(&out)?;
    let mut records = 0;
    for line in lines.lines() {
        let v: serde_json::Value = serde_json::from_str(line)?;
        let trace = v["trace"].as_array().context("record without trace")?;
        assert!(!trace.is_empty(), "{v}");
        for step in trace {
            let sentence = step["sentence"].as_str().unwrap_or_default();
            assert!(
                sentence.starts_with("Follow up:")
                    || sentence.starts_with("So the final answer is:"),
                "{sentence:?}"
            );
        }
        records += 1;
    }
    assert_eq!(records, 3);
    Ok(())
}

#[test]
fn a_bad_framework_is_named_on_every_command() -> Result<()> {
    let tiny = steper_test_support::tiny()?;
    let model = common::test_model()?;
    let (m, i) = (
        path_str(&model).to_string(),
        path_str(&tiny.index).to_string(),
    );
    for args in [
        vec![
            "ask",
            "--model",
            &m,
            "--index",
            &i,
            "--framework",
            "selfask",
            "Q?",
        ],
        vec![
            "eval",
            "--model",
            &m,
            "--index",
            &i,
            "--data",
            "x.jsonl",
            "--framework",
            "selfask",
        ],
        vec![
            "serve",
            "--model",
            &m,
            "--index",
            &i,
            "--framework",
            "selfask",
        ],
    ] {
        let o = steper_run(&args)?;
        assert!(!o.status.success(), "{args:?}");
        let msg = output_text(&o);
        assert!(
            msg.contains("--framework")
                && msg.contains("selfask")
                && msg.contains("ircot or self-ask"),
            "{args:?}: {msg}"
        );
        assert!(!msg.contains("panicked"), "{msg}");
    }
    // A manifest naming an unknown framework is refused with the file named.
    let dir = tempfile::tempdir()?;
    let bad = export_with_framework(&dir.path().join("bad"), "selfask")?;
    let o = steper_run(&[
        "ask",
        "--model",
        path_str(&bad),
        "--index",
        &i,
        "--backend",
        "tract",
        "Q?",
    ])?;
    assert!(!o.status.success());
    let msg = output_text(&o);
    assert!(
        msg.contains("steper.json") && msg.contains("selfask"),
        "{msg}"
    );
    Ok(())
}

#[test]
fn demonstrations_are_refused_with_self_ask() -> Result<()> {
    let tiny = steper_test_support::tiny()?;
    let model = common::test_model()?;
    let demos = common::data_file("ircot_prompts/hotpotqa.txt")?;
    let o = steper_run(&[
        "ask",
        "--model",
        path_str(&model),
        "--index",
        path_str(&tiny.index),
        "--backend",
        "tract",
        "--framework",
        "self-ask",
        "--demos",
        path_str(&demos),
        "Q?",
    ])?;
    assert!(!o.status.success());
    let msg = output_text(&o);
    assert!(msg.contains("--demos") && msg.contains("self-ask"), "{msg}");
    Ok(())
}

/// The serve process, killed when dropped.
struct Served(Child);

impl Drop for Served {
    fn drop(&mut self) {
        self.0.kill().ok();
        self.0.wait().ok();
    }
}

/// `POST /v1/reason` to `addr` with `body`: the response body.
fn post_reason(addr: &str, body: &serde_json::Value) -> Result<serde_json::Value> {
    let body = serde_json::to_vec(body)?;
    let mut conn = std::net::TcpStream::connect(addr)?;
    conn.set_read_timeout(Some(std::time::Duration::from_secs(120)))?;
    write!(
        conn,
        "POST /v1/reason HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )?;
    conn.write_all(&body)?;
    let mut raw = String::new();
    conn.read_to_string(&mut raw)?;
    let (head, rest) = raw.split_once("\r\n\r\n").context("no HTTP header end")?;
    anyhow::ensure!(head.starts_with("HTTP/1.1 200"), "{raw}");
    Ok(serde_json::from_str(rest)?)
}

#[test]
fn serve_runs_the_flag_s_framework() -> Result<()> {
    let tiny = steper_test_support::tiny()?;
    let model = common::test_model()?;
    let child = Command::new(env!("CARGO_BIN_EXE_steper-run"))
        .args([
            "serve",
            "--model",
            path_str(&model),
            "--index",
            path_str(&tiny.index),
        ])
        .args(["--addr", "127.0.0.1:0", "--backend", "tract", "--json"])
        .args(["--framework", "self-ask"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let mut served = Served(child);
    let stdout = served.0.stdout.take().context("no stdout")?;
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    let ready: serde_json::Value = serde_json::from_str(&line).with_context(|| line.clone())?;
    assert_eq!(ready["event"], "ready", "{ready}");
    let addr = ready["addr"].as_str().context("no addr")?.to_string();
    let r = post_reason(
        &addr,
        &serde_json::json!({"question": question()?, "max_steps": 3}),
    )?;
    let steps = r["steps"].as_array().context("no steps")?;
    assert!(!steps.is_empty(), "{r}");
    for step in steps {
        let sentence = step["sentence"].as_str().unwrap_or_default();
        assert!(
            sentence.starts_with("Follow up:") || sentence.starts_with("So the final answer is:"),
            "{sentence:?}"
        );
    }
    Ok(())
}
