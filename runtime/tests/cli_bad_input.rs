//! `steper-run` on bad input: clear errors naming file and line, no panic.

use std::process::Output;

use anyhow::Result;
use steper_test_support::cli::{self, output_text, path_str};

fn steper_run(args: &[&str]) -> Result<Output> {
    cli::run(env!("CARGO_BIN_EXE_steper-run"), args)
}

const Q1: &str = r#"{"id":"q1","question":"Where is the Eiffel Tower?","answers":["Paris"],"paragraphs":[{"title":"Eiffel Tower","text":"The Eiffel Tower is in Paris.","is_supporting":true},{"title":"Berlin","text":"Berlin is in Germany.","is_supporting":false}]}"#;
const Q2: &str = r#"{"id":"q2","question":"Where is Berlin?","answers":["Germany"],"paragraphs":[{"title":"Berlin","text":"Berlin is in Germany.","is_supporting":true}]}"#;

#[test]
fn malformed_line_is_named_and_skip_bad_counts_it() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let qa = dir.path().join("qa.jsonl");
    std::fs::write(&qa, format!("{Q1}\n{{\"id\": \"broken\"\n{Q2}\n"))?;
    let out = dir.path().join("idx");
    let o = steper_run(&["index", "--from-qa", path_str(&qa), "--out", path_str(&out)])?;
    assert!(!o.status.success());
    let msg = output_text(&o);
    assert!(msg.contains(&format!("{}:2:", qa.display())), "{msg}");
    assert!(!msg.contains("panicked"), "{msg}");
    assert!(!out.exists());

    let o = steper_run(&[
        "index",
        "--from-qa",
        path_str(&qa),
        "--out",
        path_str(&out),
        "--skip-bad",
        "--json",
    ])?;
    assert!(o.status.success(), "{}", output_text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout)?;
    assert_eq!(v["docs"], 2);
    assert_eq!(v["skipped_lines"], 1);

    let o = steper_run(&[
        "retrieval-eval",
        "--index",
        path_str(&out),
        "--data",
        path_str(&qa),
        "--k",
        "1,2",
        "--skip-bad",
        "--json",
    ])?;
    assert!(o.status.success(), "{}", output_text(&o));
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
        path_str(&corpus),
        "--out",
        path_str(&dir.path().join("i")),
    ])?;
    assert!(!o.status.success());
    let msg = output_text(&o);
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
        path_str(&corpus),
        "--out",
        path_str(&dir.path().join("i")),
    ])?;
    assert!(!o.status.success());
    let msg = output_text(&o);
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
    let o = steper_run(&[
        "retrieval-eval",
        "--index",
        path_str(&not_index),
        "--data",
        path_str(&qa),
    ])?;
    assert!(!o.status.success());
    let msg = output_text(&o);
    assert!(
        msg.contains("index") && msg.contains(path_str(&not_index)),
        "{msg}"
    );
    assert!(!msg.contains("panicked"), "{msg}");
    Ok(())
}

#[test]
fn prompt_lookup_settings_that_cannot_run_are_refused_naming_the_flag() -> Result<()> {
    let tiny = steper_test_support::tiny()?;
    let (model, index) = (path_str(&tiny.export), path_str(&tiny.index));
    let dir = tempfile::tempdir()?;
    let qa = dir.path().join("qa.jsonl");
    std::fs::write(&qa, format!("{Q1}\n"))?;
    let out = dir.path().join("eval.jsonl");
    let eval = |extra: &[&str]| -> Result<Output> {
        let mut args = vec![
            "eval",
            "--model",
            model,
            "--index",
            index,
            "--data",
            path_str(&qa),
            "--out",
            path_str(&out),
        ];
        args.extend_from_slice(extra);
        steper_run(&args)
    };
    // No draft at all.
    let o = eval(&["--prompt-lookup", "0"])?;
    assert!(!o.status.success());
    let msg = output_text(&o);
    assert!(
        msg.contains("--prompt-lookup 0") && msg.contains("at least 1"),
        "{msg}"
    );
    // A batched evaluation cannot verify drafts.
    let o = eval(&["--prompt-lookup", "4", "--batch", "2"])?;
    assert!(!o.status.success());
    let msg = output_text(&o);
    assert!(
        msg.contains("batch") && msg.contains("prompt-lookup"),
        "{msg}"
    );
    // Nor can a batching server worker: refused before the model loads.
    let o = steper_run(&[
        "serve",
        "--model",
        model,
        "--index",
        index,
        "--addr",
        "127.0.0.1:0",
        "--batch",
        "2",
        "--prompt-lookup",
        "4",
    ])?;
    assert!(!o.status.success());
    let msg = output_text(&o);
    assert!(msg.contains("--prompt-lookup 4 needs --batch 1"), "{msg}");
    assert!(!msg.contains("panicked"), "{msg}");
    // With one question in flight it runs.
    let o = eval(&["--prompt-lookup", "4", "--json"])?;
    assert!(o.status.success(), "{}", output_text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout)?;
    assert_eq!(v["questions"], 1);
    assert_eq!(v["prompt_lookup"]["max_draft"], 4);
    Ok(())
}
