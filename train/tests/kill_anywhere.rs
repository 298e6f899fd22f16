//! Kill-anywhere crash safety of `steper-train fit` and `steper-train distill`: each runs as a
//! child process, is SIGKILLed at seeded random instants (at least
//! [`MIN_KILLS`](steper_test_support::kill::MIN_KILLS) that land while it runs, in a
//! [`Campaign`]),, is started again on the same output until it completes, and the result is compared
//! with an uninterrupted run: fit's final weights byte for byte and its train_log line for line
//! (all but the measured throughput), distill's records byte for byte and in order. After every
//! kill the partial output must be readable: every complete log or record line parses, every
//! checkpoint that has its name is whole. No temporary is left once the run completes.
//! Each test prints one JSON line with its figures (`--nocapture`).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{ensure, Context, Result};
use serde_json::{json, Value};
use steper_test_support::kill::{
    jsonl_lines, run_to_completion, tree, tree_diff, without_timings, Campaign,
};

fn steper_train() -> Command {
    Command::new(env!("CARGO_BIN_EXE_steper-train"))
}

/// Step-wise records of the tiny world, as the JSONL `fit` reads.
fn records_file(dir: &Path) -> Result<PathBuf> {
    let tiny = steper_test_support::tiny()?;
    let recs = steper_test_support::stepwise_records(&tiny.world, 24)?;
    let path = dir.join("records.jsonl");
    let mut text = String::new();
    for r in &recs {
        text.push_str(&serde_json::to_string(r)?);
        text.push('\n');
    }
    std::fs::write(&path, text)?;
    Ok(path)
}

fn fit_cmd(records: &Path, out: &Path) -> Result<Command> {
    let mut c = steper_train();
    c.arg("fit")
        .arg("--student")
        .arg(&steper_test_support::tiny()?.student)
        .arg("--data")
        .arg(records)
        .arg("--out")
        .arg(out)
        .args(["--steps", "40", "--batch-size", "4", "--save-every", "3"])
        .args([
            "--eval-every",
            "10",
            "--eval-fraction",
            "0.1",
            "--warmup",
            "5",
        ])
        // Small shards: a final model of several files, so a torn save would show.
        .args(["--max-shard-size", "100000"]);
    Ok(c)
}

/// What a killed fit may leave: log lines that parse with consecutive steps (a torn last line
/// allowed), whole checkpoints under their names, and at the top level either no model or a
/// whole one.
fn check_fit_partial(out: &Path, torn: &mut usize) -> Result<()> {
    let (lines, tail) = jsonl_lines(&out.join("train_log.jsonl"))?;
    *torn += tail.is_some() as usize;
    for (i, l) in lines.iter().enumerate() {
        ensure!(
            l["step"].as_u64() == Some(i as u64 + 1),
            "train_log line {} has step {}",
            i + 1,
            l["step"]
        );
    }
    let ckdir = out.join("checkpoints");
    if ckdir.is_dir() {
        for e in std::fs::read_dir(&ckdir)? {
            let p = e?.path();
            let name = p
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            if name.starts_with("step-") {
                steper_models::Checkpoint::load(
                    &p,
                    candle_core::DType::F32,
                    &candle_core::Device::Cpu,
                )
                .with_context(|| format!("checkpoint {} is not whole", p.display()))?;
                let state: Value =
                    serde_json::from_slice(&std::fs::read(p.join("trainer_state.json"))?)
                        .with_context(|| format!("{}/trainer_state.json", p.display()))?;
                ensure!(
                    state["step"].is_u64(),
                    "{}: no step in the state",
                    p.display()
                );
            }
        }
    }
    if out.join("config.json").exists() {
        steper_models::Checkpoint::load(out, candle_core::DType::F32, &candle_core::Device::Cpu)
            .context("the top-level model is not whole")?;
    }
    Ok(())
}

/// The final model files at the top level of a fit output (everything but the log and the
/// checkpoints), byte for byte.
fn final_model(out: &Path) -> Result<Vec<(String, Vec<u8>)>> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(out)? {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        if e.file_type()?.is_file() && name != "train_log.jsonl" {
            v.push((name, std::fs::read(e.path())?));
        }
    }
    v.sort();
    ensure!(!v.is_empty(), "{}: no final model", out.display());
    Ok(v)
}

fn log_without_timings(out: &Path) -> Result<Vec<Value>> {
    let (lines, tail) = jsonl_lines(&out.join("train_log.jsonl"))?;
    ensure!(
        tail.is_none(),
        "a completed run's log ends with a torn line"
    );
    Ok(lines.iter().map(without_timings).collect())
}

#[test]
#[ignore = "slow: kills steper-train fit at 20+ instants (about a minute)"]
fn fit_killed_anywhere_resumes_to_the_uninterrupted_result() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let records = records_file(tmp.path())?;
    let reference = tmp.path().join("reference");
    let t_ref = run_to_completion(fit_cmd(&records, &reference)?)?;
    let ref_model = final_model(&reference)?;
    let ref_log = log_without_timings(&reference)?;
    ensure!(
        ref_log.len() == 40,
        "reference log has {} lines",
        ref_log.len()
    );

    let mut torn = 0usize;
    let report = Campaign::new(0x05EE_DF17, t_ref).run(
        tmp.path(),
        |_, _| Ok(()),
        |out| fit_cmd(&records, out).expect("the tiny fixture was made above"),
        |_, out| check_fit_partial(out, &mut torn),
        |_, out| {
            let model = final_model(out)?;
            ensure!(
                model.len() == ref_model.len() && model.iter().zip(&ref_model).all(|(a, b)| a == b),
                "the final model differs from the uninterrupted run's"
            );
            ensure!(
                log_without_timings(out)? == ref_log,
                "train_log differs from the uninterrupted run's"
            );
            Ok(())
        },
    )?;
    println!(
        "{}",
        report.summary(
            "steper-train fit",
            t_ref,
            json!({"torn_log_tails_seen": torn, "all_bit_exact": true})
        )
    );
    Ok(())
}

fn distill_cmd(out: &Path) -> Result<Command> {
    let tiny = steper_test_support::tiny()?;
    let mut c = steper_train();
    c.arg("distill")
        .arg("--teacher")
        .arg(format!("checkpoint:{}", tiny.student.display()))
        .arg("--data")
        .arg(tiny.world.join("train.jsonl"))
        .arg("--index")
        .arg(&tiny.index)
        .arg("--out")
        .arg(out)
        .args([
            "--limit",
            "30",
            "--max-steps",
            "3",
            "--max-new-tokens",
            "16",
        ])
        .args(["--filter", "none", "--vanilla"]);
    Ok(c)
}

const DISTILL_FILES: [&str; 3] = ["traces.jsonl", "stepwise.jsonl", "vanilla.jsonl"];

/// What a killed distill may leave: record and trace lines that parse, a torn last line allowed.
fn check_distill_partial(out: &Path, torn: &mut usize) -> Result<()> {
    for f in DISTILL_FILES {
        let (_, tail) = jsonl_lines(&out.join(f))?;
        *torn += tail.is_some() as usize;
    }
    Ok(())
}

#[test]
#[ignore = "slow: kills steper-train distill at 20+ instants (about a minute)"]
fn distill_killed_anywhere_resumes_to_the_same_records_in_order() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let reference = tmp.path().join("reference");
    let t_ref = run_to_completion(distill_cmd(&reference)?)?;
    let ref_files = tree(&reference)?;
    let (ref_traces, _) = jsonl_lines(&reference.join("traces.jsonl"))?;
    ensure!(
        ref_traces.len() == 30,
        "reference has {} traces",
        ref_traces.len()
    );
    let ref_traces: Vec<Value> = ref_traces.iter().map(without_timings).collect();

    let mut torn = 0usize;
    let report = Campaign::new(0x0D15_7111, t_ref).run(
        tmp.path(),
        |_, _| Ok(()),
        |out| distill_cmd(out).expect("the tiny fixture was made above"),
        |_, out| check_distill_partial(out, &mut torn),
        |_, out| {
            let files = tree(out)?;
            for f in ["stepwise.jsonl", "vanilla.jsonl"] {
                let p = PathBuf::from(f);
                ensure!(
                    files.get(&p) == ref_files.get(&p),
                    "{f} differs from the uninterrupted run's: {:?}",
                    tree_diff(&files, &ref_files)
                );
            }
            let (traces, tail) = jsonl_lines(&out.join("traces.jsonl"))?;
            ensure!(tail.is_none(), "torn traces.jsonl after completion");
            let traces: Vec<Value> = traces.iter().map(without_timings).collect();
            ensure!(traces == ref_traces, "traces differ (timings aside)");
            Ok(())
        },
    )?;
    println!(
        "{}",
        report.summary(
            "steper-train distill",
            t_ref,
            json!({"torn_tails_seen": torn, "all_identical": true})
        )
    );
    Ok(())
}

/// Bytes of the files under `dir`.
fn du(dir: &Path) -> Result<u64> {
    Ok(tree(dir)?.values().map(|b| b.len() as u64).sum())
}

/// The disk-full case: a fit whose output lives on a tmpfs with room for one and a half
/// checkpoints runs out of space while staging the second; the error names the file and the
/// cause, and the first checkpoint stays whole. Needs root for `mount`.
#[test]
#[ignore = "slow: mounts a small tmpfs (needs root) to fill the disk under steper-train fit"]
fn fit_on_a_full_disk_fails_clearly_and_keeps_the_last_checkpoint() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let records = records_file(tmp.path())?;
    let reference = tmp.path().join("reference");
    run_to_completion(fit_cmd(&records, &reference)?)?;
    let first = std::fs::read_dir(reference.join("checkpoints"))?
        .next()
        .context("the reference run saved no checkpoint")??;
    let one = du(&first.path())?;
    let size = one * 3 / 2;
    let mnt = steper_test_support::kill::SmallTmpfs::mount(&tmp.path().join("mnt"), size)?;
    let out = mnt.path().join("out");
    let o = fit_cmd(&records, &out)?.output()?;
    ensure!(
        !o.status.success(),
        "fit succeeded on a disk of {size} bytes"
    );
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    ensure!(
        err.contains("No space left on device") && err.contains(&*out.to_string_lossy()),
        "the error should name the file and the cause: {err}"
    );
    let mut torn = 0;
    check_fit_partial(&out, &mut torn)?;
    let whole: Vec<String> = std::fs::read_dir(out.join("checkpoints"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("step-"))
                .collect()
        })
        .unwrap_or_default();
    ensure!(
        !whole.is_empty(),
        "no checkpoint was written before the disk filled"
    );
    println!(
        "{}",
        json!({"tool": "steper-train fit", "disk_full_bytes": size, "checkpoint_bytes": one,
               "whole_checkpoints_left": whole,
               "error": err.trim().lines().last().unwrap_or_default()})
    );
    Ok(())
}
