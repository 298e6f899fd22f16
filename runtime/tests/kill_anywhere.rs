//! Kill-anywhere crash safety of `steper-run index`: the indexer runs as a child process over
//! a real train pool, is SIGKILLed at seeded random instants (at least [`MIN_KILLS`] that land
//! while it runs) and started again until it completes. After every kill the output folder is
//! either the index that was there before (absent on a first build, or an older index being
//! replaced) or the complete new one — never a partial or unreadable index; the completed index
//! answers every probe query as an uninterrupted build does. (tantivy names its segment files
//! at random, so indexes are compared by what they hold and answer, not byte for byte.)

use std::collections::HashSet;
use std::path::Path;
use std::process::Command;

use anyhow::{ensure, Context, Result};
use serde_json::json;
use steper_runtime::retrieval::Bm25Index;
use steper_test_support::kill::{kill_and_resume, run_to_completion, temporaries, KillDelays};

/// Kills that must land while the indexer runs.
const MIN_KILLS: usize = 20;
/// Kills per kill-and-resume run.
const KILLS_PER_RUN: usize = 5;
/// Runs before giving up on reaching [`MIN_KILLS`].
const MAX_RUNS: usize = 40;
/// Questions whose top hits probe an index.
const PROBES: usize = 25;

fn index_cmd(qa: &Path, out: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_steper-run"));
    c.arg("index")
        .arg("--from-qa")
        .arg(qa)
        .arg("--out")
        .arg(out);
    c
}

/// What an index holds and answers: its document count and the top-4 ids of the probe queries.
fn signature(dir: &Path, probes: &[String]) -> Result<(u64, Vec<Vec<String>>)> {
    let idx = Bm25Index::open(dir).with_context(|| format!("opening {}", dir.display()))?;
    let mut tops = Vec::with_capacity(probes.len());
    for q in probes {
        tops.push(
            idx.search(q, 4, &HashSet::new())?
                .into_iter()
                .map(|h| h.id)
                .collect(),
        );
    }
    Ok((idx.num_docs(), tops))
}

#[test]
#[ignore = "slow: kills steper-run index at 20+ instants (about a minute)"]
fn index_killed_anywhere_is_the_previous_or_the_complete_index() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let pool = steper_test_support::data_file("hotpotqa_trainpool1192.jsonl.gz")?;
    let other_qa = steper_test_support::data_file("2wikimultihopqa_dev164.jsonl.gz")?;
    let probes: Vec<String> = steper_test_support::data_text("hotpotqa_dev500.jsonl.gz")?
        .lines()
        .take(PROBES)
        .map(|l| -> Result<String> {
            let v: serde_json::Value = serde_json::from_str(l)?;
            Ok(v["question"]
                .as_str()
                .context("question field")?
                .to_string())
        })
        .collect::<Result<_>>()?;

    let reference = tmp.path().join("reference");
    let t_ref = run_to_completion(index_cmd(&pool, &reference))?;
    let want = signature(&reference, &probes)?;
    let older = tmp.path().join("older");
    run_to_completion(index_cmd(&other_qa, &older))?;
    let before = signature(&older, &probes)?;
    ensure!(want != before, "the two indexes should answer differently");

    // Up to 1.2× the reference time, so that some kills land after the new index is in place.
    let mut delays = KillDelays::new(0x1DE7, t_ref.mul_f64(1.2));
    let (mut kills, mut runs) = (Vec::new(), 0);
    let (mut saw_previous, mut saw_new) = (0usize, 0usize);
    while kills.len() < MIN_KILLS {
        ensure!(
            runs < MAX_RUNS,
            "only {} kills landed in {runs} runs",
            kills.len()
        );
        runs += 1;
        let out = tmp.path().join(format!("run-{runs}"));
        // Odd runs build a first index; even runs replace an older one.
        let replacing = runs % 2 == 0;
        if replacing {
            let o = Command::new("cp")
                .arg("-r")
                .arg(&older)
                .arg(&out)
                .status()?;
            ensure!(o.success(), "copying the older index");
        }
        let run = kill_and_resume(
            || index_cmd(&pool, &out),
            &mut delays,
            KILLS_PER_RUN,
            |_| {
                if !out.exists() {
                    ensure!(!replacing, "the older index disappeared");
                    saw_previous += 1;
                    return Ok(());
                }
                let got = signature(&out, &probes)?;
                if replacing && got == before {
                    saw_previous += 1;
                } else {
                    ensure!(got == want, "a partial index is in place");
                    saw_new += 1;
                }
                Ok(())
            },
        )?;
        kills.extend(run.killed_at_ms);
        ensure!(
            signature(&out, &probes)? == want,
            "run {runs}: the completed index differs"
        );
        let left = temporaries(&out)?;
        ensure!(left.is_empty(), "run {runs}: temporaries left: {left:?}");
    }
    println!(
        "{}",
        json!({"tool": "steper-run index", "reference_ms": t_ref.as_millis() as u64,
               "runs": runs, "kills": kills.len(), "killed_at_ms": kills,
               "previous_in_place_after_kill": saw_previous, "new_in_place_after_kill": saw_new})
    );
    Ok(())
}
