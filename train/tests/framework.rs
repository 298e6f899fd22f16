//! `--framework ircot|self-ask` on `steper-train distill` and `fit`: distilled records and
//! traces carry the framework, fit renders each record in its framework's layout, and refuses
//! records of two frameworks or of another framework than the one asked for.

use std::path::{Path, PathBuf};
use std::process::Output;

use anyhow::{ensure, Context, Result};
use steper_runtime::data::StepwiseRecord;
use steper_runtime::prompt::{PromptLayout, DEFAULT_WORD_CAP};
use steper_runtime::Framework;
use steper_test_support::cli::{self, output_text, path_str};
use steper_train::fit::records::{examples_from_records_in, records_framework};

/// Questions distilled per run.
const QUESTIONS: &str = "2";

fn steper_train(args: &[&str]) -> Result<Output> {
    cli::run(env!("CARGO_BIN_EXE_steper-train"), args)
}

/// Distills the first train questions of the tiny world with the tiny student as teacher.
fn distill(out: &Path, extra: &[&str]) -> Result<Output> {
    let tiny = steper_test_support::tiny()?;
    let teacher = format!("checkpoint:{}", tiny.student.display());
    let train = tiny.world.join("train.jsonl");
    let mut args = vec![
        "distill",
        "--teacher",
        &teacher,
        "--data",
        path_str(&train),
        "--index",
        path_str(&tiny.index),
        "--out",
        path_str(out),
        "--limit",
        QUESTIONS,
        "--filter",
        "none",
        "--max-steps",
        "3",
        "--max-new-tokens",
        "12",
        "--json",
    ];
    args.extend_from_slice(extra);
    steper_train(&args)
}

fn read_records(path: &Path) -> Result<Vec<StepwiseRecord>> {
    std::fs::read_to_string(path)?
        .lines()
        .map(|l| Ok(serde_json::from_str(l)?))
        .collect()
}

fn write_records(path: &Path, records: &[StepwiseRecord]) -> Result<PathBuf> {
    let mut text = String::new();
    for r in records {
        text.push_str(&serde_json::to_string(r)?);
        text.push('\n');
    }
    std::fs::write(path, text)?;
    Ok(path.to_path_buf())
}

fn fit(records: &Path, out: &Path, extra: &[&str]) -> Result<Output> {
    let student = steper_test_support::tiny()?.student.clone();
    let mut args = vec![
        "fit",
        "--student",
        path_str(&student),
        "--data",
        path_str(records),
        "--out",
        path_str(out),
        "--steps",
        "1",
        "--batch-size",
        "2",
        "--eval-fraction",
        "0",
        "--warmup",
        "0",
        "--json",
    ];
    args.extend_from_slice(extra);
    steper_train(&args)
}

/// Self-Ask records from the tiny teacher (`dir/sa`).
fn self_ask_records(dir: &Path) -> Result<Vec<StepwiseRecord>> {
    let out = dir.join("sa");
    let o = distill(&out, &["--framework", "self-ask"])?;
    ensure!(o.status.success(), "distill: {}", output_text(&o));
    read_records(&out.join("stepwise.jsonl"))
}

#[test]
fn distill_self_ask_records_and_traces_carry_the_framework() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let records = self_ask_records(dir.path())?;
    ensure!(!records.is_empty(), "no records");
    for r in &records {
        assert_eq!(r.framework, Framework::SelfAsk, "{r:?}");
        assert!(
            r.target.starts_with("Follow up:") || r.target.starts_with("So the final answer is:"),
            "{:?}",
            r.target
        );
    }
    let traces = std::fs::read_to_string(dir.path().join("sa").join("traces.jsonl"))?;
    for line in traces.lines() {
        let v: serde_json::Value = serde_json::from_str(line)?;
        assert_eq!(v["trace"]["framework"], "self-ask", "{v}");
    }
    // IRCoT records stay as they were: no `framework` written.
    let ircot = dir.path().join("ircot");
    let o = distill(&ircot, &[])?;
    ensure!(o.status.success(), "distill: {}", output_text(&o));
    let lines = std::fs::read_to_string(ircot.join("stepwise.jsonl"))?;
    ensure!(!lines.trim().is_empty(), "no IRCoT records");
    assert!(!lines.contains("\"framework\""), "{lines}");
    Ok(())
}

#[test]
fn distill_refuses_ircot_demonstrations_with_self_ask() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let o = distill(
        &dir.path().join("x"),
        &["--framework", "self-ask", "--teacher-prompt", "default"],
    )?;
    assert!(!o.status.success());
    let msg = output_text(&o);
    assert!(
        msg.contains("--teacher-prompt") && msg.contains("self-ask"),
        "{msg}"
    );
    let o = distill(&dir.path().join("y"), &["--framework", "selfask"])?;
    assert!(!o.status.success());
    assert!(
        output_text(&o).contains("ircot or self-ask"),
        "{}",
        output_text(&o)
    );
    Ok(())
}

/// Self-Ask demonstrations run with `--framework self-ask` (the records are Self-Ask ones) and
/// are refused with IRCoT; the project's file is told apart as Self-Ask (it outgrows the tiny
/// teacher's context, so the run uses a one-line-passage demonstration of the same format).
#[test]
fn distill_takes_self_ask_demonstrations_with_self_ask_only() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let short = dir.path().join("sa.txt");
    std::fs::write(
        &short,
        "[instruction]\nAsk.\n\n[demonstration]\nWikipedia Title: A\na b\n\nQuestion: q?\n\
         Are follow up questions needed here: Yes.\nFollow up: c?\nIntermediate answer: d\n\
         So the final answer is: d\n",
    )?;
    let o = distill(
        &dir.path().join("sa"),
        &[
            "--framework",
            "self-ask",
            "--teacher-prompt",
            path_str(&short),
        ],
    )?;
    ensure!(o.status.success(), "distill: {}", output_text(&o));
    let records = read_records(&dir.path().join("sa").join("stepwise.jsonl"))?;
    ensure!(!records.is_empty(), "no records");
    for r in &records {
        assert_eq!(r.framework, Framework::SelfAsk);
    }
    let demos = steper_test_support::data_file("self_ask_prompts/demonstrations.txt")?;
    for file in [&short, &demos] {
        let o = distill(
            &dir.path().join("ircot"),
            &["--teacher-prompt", path_str(file)],
        )?;
        assert!(!o.status.success());
        let msg = output_text(&o);
        assert!(
            msg.contains("self-ask ones") && msg.contains("loop runs ircot"),
            "{msg}"
        );
    }
    Ok(())
}

#[test]
fn fit_renders_self_ask_records_in_their_layout() -> Result<()> {
    let tiny = steper_test_support::tiny()?;
    let tok = tokenizers::Tokenizer::from_file(tiny.student.join("tokenizer.json"))
        .map_err(anyhow::Error::msg)?;
    let enc = |t: &str| -> Result<Vec<u32>> {
        Ok(tok
            .encode(t, false)
            .map_err(anyhow::Error::msg)?
            .get_ids()
            .to_vec())
    };
    let dir = tempfile::tempdir()?;
    let records = self_ask_records(dir.path())?;
    let eos = 0;
    let examples = examples_from_records_in(
        &PromptLayout::Plain,
        &records,
        &tok,
        DEFAULT_WORD_CAP,
        eos,
        1 << 16,
    )?;
    assert_eq!(examples.len(), records.len());
    for (r, e) in records.iter().zip(&examples) {
        let prompt = PromptLayout::Plain.render_for(
            Framework::SelfAsk,
            &r.question,
            &r.passages,
            &r.reasoning,
            DEFAULT_WORD_CAP,
            None,
        )?;
        assert!(prompt.ends_with('\n'), "{prompt:?}");
        assert_eq!(e.prompt, enc(&prompt)?, "{prompt:?}");
        let mut target = enc(&Framework::SelfAsk.continuation(&r.target))?;
        target.push(eos);
        assert_eq!(e.target, target, "{:?}", r.target);
    }
    assert_eq!(records_framework(&records, None)?, Framework::SelfAsk);
    Ok(())
}

#[test]
fn fit_refuses_mixed_or_mismatched_frameworks() -> Result<()> {
    let tiny = steper_test_support::tiny()?;
    let dir = tempfile::tempdir()?;
    let sa = self_ask_records(dir.path())?;
    let sa_path = write_records(&dir.path().join("sa.jsonl"), &sa)?;
    let ircot = steper_test_support::stepwise_records(&tiny.world, 2)?;
    let mut mixed = ircot.clone();
    mixed.extend(sa.iter().cloned());
    let mixed_path = write_records(&dir.path().join("mixed.jsonl"), &mixed)?;

    let o = fit(
        &sa_path,
        &dir.path().join("fit-a"),
        &["--framework", "ircot"],
    )?;
    assert!(!o.status.success());
    let msg = output_text(&o);
    assert!(
        msg.contains("--framework ircot") && msg.contains("self-ask") && msg.contains("sa.jsonl"),
        "{msg}"
    );
    let o = fit(&mixed_path, &dir.path().join("fit-b"), &[])?;
    assert!(!o.status.success());
    let msg = output_text(&o);
    assert!(msg.contains("mix frameworks"), "{msg}");
    assert!(records_framework(&mixed, None).is_err());
    assert_eq!(
        records_framework(&ircot, Some(Framework::Ircot))?,
        Framework::Ircot
    );

    // The records' own framework, named or not, trains.
    for (name, extra) in [("fit-c", &["--framework", "self-ask"][..]), ("fit-d", &[])] {
        let o = fit(&sa_path, &dir.path().join(name), extra)?;
        ensure!(o.status.success(), "fit {extra:?}: {}", output_text(&o));
    }
    Ok(())
}

#[test]
fn fit_of_ircot_records_is_unchanged_by_the_choice() -> Result<()> {
    let tiny = steper_test_support::tiny()?;
    let records = steper_test_support::stepwise_records(&tiny.world, 2)?;
    let tok = tokenizers::Tokenizer::from_file(tiny.student.join("tokenizer.json"))
        .map_err(anyhow::Error::msg)?;
    let examples = examples_from_records_in(
        &PromptLayout::Plain,
        &records,
        &tok,
        DEFAULT_WORD_CAP,
        0,
        1 << 16,
    )?;
    let r = records.first().context("no records")?;
    let prompt = PromptLayout::Plain.render(
        &r.question,
        &r.passages,
        &r.reasoning,
        DEFAULT_WORD_CAP,
        None,
    )?;
    let ids = tok
        .encode(prompt.as_str(), false)
        .map_err(anyhow::Error::msg)?
        .get_ids()
        .to_vec();
    assert_eq!(examples[0].prompt, ids);
    Ok(())
}
