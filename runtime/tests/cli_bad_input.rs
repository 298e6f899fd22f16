//! `steper-run` on bad input: clear errors naming file and line, no panic.

use std::path::Path;
use std::process::{Command, Output};

use anyhow::Result;

fn steper_run(args: &[&str]) -> Result<Output> {
    Ok(Command::new(env!("CARGO_BIN_EXE_steper-run"))
        .args(args)
        .output()?)
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap_or_default()
}

const Q1: &str = r#"{"id":"q1","question":"Where is the Eiffel Tower?","answers":["Paris"],"paragraphs":[{"title":"Eiffel Tower","text":"The Eiffel Tower is in Paris.","is_supporting":true},{"title":"Berlin","text":"Berlin is in Germany.","is_supporting":false}]}"#;
const Q2: &str = r#"{"id":"q2","question":"Where is Berlin?","answers":["Germany"],"paragraphs":[{"title":"Berlin","text":"Berlin is in Germany.","is_supporting":true}]}"#;

#[test]
fn malformed_line_is_named_and_skip_bad_counts_it() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let qa = dir.path().join("qa.jsonl");
    std::fs::write(&qa, format!("{Q1}\n{{\"id\": \"broken\"\n{Q2}\n"))?;
    let out = dir.path().join("idx");
    let o = steper_run(&["index", "--from-qa", s(&qa), "--out", s(&out)])?;
    assert!(!o.status.success());
    let msg = text(&o);
    assert!(msg.contains(&format!("{}:2:", qa.display())), "{msg}");
    assert!(!msg.contains("panicked"), "{msg}");
    assert!(!out.exists());

    let o = steper_run(&[
        "index",
        "--from-qa",
        s(&qa),
        "--out",
        s(&out),
        "--skip-bad",
        "--json",
    ])?;
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout)?;
    assert_eq!(v["docs"], 2);
    assert_eq!(v["skipped_lines"], 1);

    let o = steper_run(&[
        "retrieval-eval",
        "--index",
        s(&out),
        "--data",
        s(&qa),
        "--k",
        "1,2",
        "--skip-bad",
        "--json",
    ])?;
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout)?;
    assert_eq!(v["questions"], 2);
    assert_eq!(v["recall"]["recall@2"], 1.0);
    Ok(())
}

#[test]
fn missing_field_is_named() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let corpus = dir.path().join("corpus.jsonl");
    std::fs::write(
        &corpus,
        "{\"id\":\"0\",\"title\":\"T\",\"text\":\"x\"}\n{\"id\":\"1\",\"title\":\"U\"}\n",
    )?;
    let o = steper_run(&[
        "index",
        "--corpus",
        s(&corpus),
        "--out",
        s(&dir.path().join("i")),
    ])?;
    assert!(!o.status.success());
    let msg = text(&o);
    assert!(msg.contains(":2:") && msg.contains("`text`"), "{msg}");
    Ok(())
}

#[test]
fn empty_corpus_is_an_error() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let corpus = dir.path().join("empty.jsonl");
    std::fs::write(&corpus, "\n")?;
    let o = steper_run(&[
        "index",
        "--corpus",
        s(&corpus),
        "--out",
        s(&dir.path().join("i")),
    ])?;
    assert!(!o.status.success());
    let msg = text(&o);
    assert!(msg.contains("no documents"), "{msg}");
    assert!(!msg.contains("panicked"), "{msg}");
    Ok(())
}

#[test]
fn foreign_index_directory_is_a_clear_error() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let qa = dir.path().join("qa.jsonl");
    std::fs::write(&qa, format!("{Q1}\n"))?;
    let not_index = dir.path().join("not-an-index");
    std::fs::create_dir_all(&not_index)?;
    std::fs::write(not_index.join("meta.json"), "{\"segments\": []}")?;
    let o = steper_run(&["retrieval-eval", "--index", s(&not_index), "--data", s(&qa)])?;
    assert!(!o.status.success());
    let msg = text(&o);
    assert!(
        msg.contains("index") && msg.contains(s(&not_index)),
        "{msg}"
    );
    assert!(!msg.contains("panicked"), "{msg}");
    Ok(())
}
