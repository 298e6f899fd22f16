//! Step-wise records → token examples, through the runtime's prompt template (the same code the
//! runtime renders with, so training and inference see identical prompts).

use std::path::Path;

use steper_runtime::data::{read_jsonl, ReadOptions, StepwiseRecord};
use steper_runtime::prompt::{Framework, PromptLayout};

use super::{Example, Stage};
use crate::error::{Error, Result};

impl From<steper_runtime::data::Stage> for Stage {
    fn from(s: steper_runtime::data::Stage) -> Self {
        match s {
            steper_runtime::data::Stage::Init => Stage::Init,
            steper_runtime::data::Stage::Expand => Stage::Expand,
            steper_runtime::data::Stage::Aggregate => Stage::Aggregate,
        }
    }
}

/// Reads step-wise records (errors name the file and line; `skip_bad` skips and counts).
pub fn read_records(path: &Path, skip_bad: bool) -> Result<(Vec<StepwiseRecord>, usize)> {
    let loaded = read_jsonl::<StepwiseRecord>(path, ReadOptions { skip_bad })?;
    if loaded.rows.is_empty() {
        return Err(Error::Input(format!(
            "{}: no step-wise records",
            path.display()
        )));
    }
    Ok((loaded.rows, loaded.skipped.len()))
}

/// The one framework of `records` (see [`StepwiseRecord::framework`]), checked against
/// `expected` (`--framework`) when given: records of two frameworks, or of another framework
/// than the one asked for, are an error naming a record of each.
pub fn records_framework(
    records: &[StepwiseRecord],
    expected: Option<Framework>,
) -> Result<Framework> {
    let Some(first) = records.first() else {
        return Ok(expected.unwrap_or_default());
    };
    if let Some(other) = records.iter().find(|r| r.framework != first.framework) {
        return Err(Error::Input(format!(
            "the records mix frameworks: qid {} step {} is {} and qid {} step {} is {}; distill each framework into its own file",
            first.qid, first.step, first.framework, other.qid, other.step, other.framework
        )));
    }
    match expected {
        Some(fw) if fw != first.framework => Err(Error::Input(format!(
            "--framework {fw}, but the records are {} (qid {} step {}); distill with --framework {fw} or fit with --framework {}",
            first.framework, first.qid, first.step, first.framework
        ))),
        _ => Ok(first.framework),
    }
}

/// Renders and tokenizes records, each in its own framework's layout
/// ([`StepwiseRecord::framework`]). `eos` ends every target. Each prompt is fitted into
/// `max_len` minus its target by the runtime's context fitting; a record whose question and
/// reasoning alone do not fit is an error naming the record.
pub fn examples_from_records(
    records: &[StepwiseRecord],
    tokenizer: &tokenizers::Tokenizer,
    word_cap: usize,
    eos: u32,
    max_len: usize,
) -> Result<Vec<Example>> {
    examples_from_records_in(
        &PromptLayout::Plain,
        records,
        tokenizer,
        word_cap,
        eos,
        max_len,
    )
}

/// [`examples_from_records`] with the prompts laid out by `layout` (`--prompt-format`): the
/// runtime's renderer, so a student trained in the chat format is served with the same bytes.
pub fn examples_from_records_in(
    layout: &PromptLayout,
    records: &[StepwiseRecord],
    tokenizer: &tokenizers::Tokenizer,
    word_cap: usize,
    eos: u32,
    max_len: usize,
) -> Result<Vec<Example>> {
    let enc = |t: &str| -> Result<Vec<u32>> {
        Ok(tokenizer
            .encode(t, false)
            .map_err(|e| Error::Input(format!("tokenizer: {e}")))?
            .get_ids()
            .to_vec())
    };
    let mut out = Vec::with_capacity(records.len());
    for (i, r) in records.iter().enumerate() {
        let mut t = enc(&r.framework.continuation(&r.target))?;
        t.push(eos);
        // The prompt is fitted to the context exactly as the runtime fits it at inference:
        // the oldest passages' tail words go first, never the question or the reasoning.
        let budget = max_len.saturating_sub(t.len());
        let fitted = layout
            .fit_for(
                r.framework,
                &r.question,
                &r.passages,
                &r.reasoning,
                None,
                word_cap,
                budget,
                |text| {
                    Ok(tokenizer
                        .encode(text, false)
                        .map(|e| e.len())
                        .unwrap_or(usize::MAX))
                },
            )
            .map_err(|e| {
                Error::Input(format!(
                    "record {} (qid {}, stage {:?}, step {}): {e}",
                    i + 1,
                    r.qid,
                    r.stage,
                    r.step
                ))
            })?;
        let p = enc(&fitted.text)?;
        if p.len() + t.len() > max_len {
            return Err(Error::Input(format!(
                "record {} (qid {}, stage {:?}, step {}): {} tokens exceed the student's context of {max_len}",
                i + 1,
                r.qid,
                r.stage,
                r.step,
                p.len() + t.len()
            )));
        }
        out.push(Example {
            stage: r.stage.into(),
            prompt: p,
            target: t,
        });
    }
    Ok(out)
}

/// A stable 64-bit hash of a question id mixed with `salt`: FNV-1a of the id, then splitmix64's
/// finalizer. The same on every run and platform.
fn question_hash(qid: &str, salt: u64) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in qid.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h ^= salt.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^= h >> 31;
    h
}

/// Splits records into training and held-out sets by question (all records of a question land
/// on the same side), deterministically from `seed`.
pub fn split_by_question(
    records: &[StepwiseRecord],
    heldout_fraction: f64,
    seed: u64,
) -> (Vec<StepwiseRecord>, Vec<StepwiseRecord>) {
    let mut train = Vec::new();
    let mut held = Vec::new();
    for r in records {
        let h = question_hash(&r.qid, seed);
        if ((h >> 11) as f64 / (1u64 << 53) as f64) < heldout_fraction {
            held.push(r.clone());
        } else {
            train.push(r.clone());
        }
    }
    (train, held)
}

/// Salt of the question order of [`first_questions`]. It is not the run's seed on purpose: every
/// mode and seed trained on the same record files gets the same questions, so a comparison
/// between them is on the same teacher data, and the frozen-bottom cache built by one run serves
/// the others.
const QUESTION_ORDER_SALT: u64 = 0x5354_4550_4552; // "STEPER"

/// The records of the first `n` questions in a fixed pseudo-random order of question ids (the
/// same order for step-wise and whole-chain records, so `n` questions means the same questions
/// in either kind). Records keep their file order. Returns the kept records and the number of
/// distinct questions there were; `n` at or above that keeps everything.
pub fn first_questions(records: &[StepwiseRecord], n: usize) -> (Vec<StepwiseRecord>, usize) {
    let mut qids: Vec<&str> = records.iter().map(|r| r.qid.as_str()).collect();
    qids.sort_unstable();
    qids.dedup();
    let total = qids.len();
    qids.sort_by_key(|q| (question_hash(q, QUESTION_ORDER_SALT), *q));
    let keep: std::collections::HashSet<&str> = qids.into_iter().take(n).collect();
    let kept = records
        .iter()
        .filter(|r| keep.contains(r.qid.as_str()))
        .cloned()
        .collect();
    (kept, total)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(qid: &str) -> StepwiseRecord {
        StepwiseRecord {
            qid: qid.into(),
            stage: steper_runtime::data::Stage::Init,
            step: 1,
            question: "q".into(),
            passages: vec![],
            reasoning: vec![],
            target: "t".into(),
            teacher: "gold".into(),
            answers: vec![],
            framework: Default::default(),
        }
    }

    #[test]
    fn split_keeps_questions_whole_and_holds_out_about_the_fraction() {
        let mut rs = Vec::new();
        for q in 0..400 {
            let hop = 2 + q % 3;
            rs.push(rec(&format!("synth-0-{hop}hop-{q}")));
            rs.push(rec(&format!("synth-0-{hop}hop-{q}")));
        }
        let (train, held) = split_by_question(&rs, 0.1, 0);
        assert_eq!(train.len() + held.len(), rs.len());
        let held_q: std::collections::HashSet<_> = held.iter().map(|r| r.qid.clone()).collect();
        assert!(train.iter().all(|r| !held_q.contains(&r.qid)));
        let share = held_q.len() as f64 / 400.0;
        assert!((0.05..0.2).contains(&share), "held-out share {share}");
    }

    #[test]
    fn first_questions_keeps_whole_questions_and_the_same_ones_for_every_record_kind() {
        let mut stepwise = Vec::new();
        let mut vanilla = Vec::new();
        for q in 0..50 {
            for _ in 0..3 {
                stepwise.push(rec(&format!("hotpot-{q}")));
            }
            vanilla.push(rec(&format!("hotpot-{q}")));
        }
        let (kept, total) = first_questions(&stepwise, 10);
        assert_eq!(total, 50);
        assert_eq!(kept.len(), 30);
        let (kept_v, _) = first_questions(&vanilla, 10);
        let q = |rs: &[StepwiseRecord]| -> std::collections::BTreeSet<String> {
            rs.iter().map(|r| r.qid.clone()).collect()
        };
        assert_eq!(q(&kept), q(&kept_v));
        assert_eq!(q(&kept).len(), 10);
        // file order is kept, and not simply the first ten of the file
        let pos: Vec<usize> = kept
            .iter()
            .map(|r| stepwise.iter().position(|s| s.qid == r.qid).unwrap())
            .collect();
        assert!(pos.windows(2).all(|w| w[0] <= w[1]));
        assert_ne!(q(&kept), q(&stepwise[..30]));
        // a budget past the question count keeps everything
        assert_eq!(first_questions(&stepwise, 500).0.len(), 150);
    }
}
