//! Kill-anywhere crash safety of `steper-run index`: the indexer runs as a child process over
//! a real train pool, is SIGKILLed at seeded random instants (at least
//! [`MIN_KILLS`](steper_test_support::kill::MIN_KILLS) that land while it runs, in a
//! [`Campaign`]) and started again until it completes. After every kill the output folder is
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
use steper_test_support::kill::{copy_dir, run_to_completion, Campaign};

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
    let (mut saw_previous, mut saw_new) = (0usize, 0usize);
    // Odd runs build a first index; even runs replace an older one.
    let replacing = |run: usize| run.is_multiple_of(2);
    let report = Campaign::new(0x1DE7, t_ref.mul_f64(1.2)).run(
        tmp.path(),
        |run, out| {
            if replacing(run) {
                copy_dir(&older, out)?;
            }
            Ok(())
        },
        |out| index_cmd(&pool, out),
        |run, out| {
            if !out.exists() {
                ensure!(!replacing(run), "the older index disappeared");
                saw_previous += 1;
                return Ok(());
            }
            let got = signature(out, &probes)?;
            if replacing(run) && got == before {
                saw_previous += 1;
            } else {
                ensure!(got == want, "a partial index is in place");
                saw_new += 1;
            }
            Ok(())
        },
        |_, out| {
            ensure!(
                signature(out, &probes)? == want,
                "the completed index differs"
            );
            Ok(())
        },
    )?;
    println!(
        "{}",
        report.summary(
            "steper-run index",
            t_ref,
            json!({"previous_in_place_after_kill": saw_previous,
                   "new_in_place_after_kill": saw_new})
        )
    );
    Ok(())
}
