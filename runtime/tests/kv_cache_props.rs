//! The KV cache under any sequence of operations: appends of 1..=MAX_APPEND tokens (logits of
//! the last or of every appended position), truncations (to any length, longer ones included:
//! those keep everything) and forks. After every append the logits returned equal, within
//! LOGITS_TOL, those of a fresh sequence prefilled with the whole token list from scratch, and
//! the sequence holds exactly that list; a last one-token append checks the cache an operation
//! list ending in a truncation or a fork left behind. Runs on the tiny export of
//! `steper-test-support`, on tract and on ONNX Runtime (concatenating cache; the library is
//! found as by every ONNX Runtime test).

use anyhow::{anyhow, Result};
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use steper_runtime::{
    load_model, BackendKind, Generator, KvCacheMode, Logits, LogitsMode, OrtOptions, Sequence,
};

/// Random operation lists per backend (each case re-prefills the whole list after every
/// append, so a case costs tens of small model calls).
const CASES: u32 = 32;
/// Operations per list, at most.
const MAX_OPS: usize = 10;
/// Tokens per append, at most.
const MAX_APPEND: usize = 8;
/// Largest |cached - fresh| logit allowed, as a fraction of the fresh row's largest |logit| (at
/// least 1): the same fp32 math with the attention over the cache computed in other shapes (one
/// call per append vs one prefill), so only the summation order differs; below 1e-6 on 900 cases
/// per backend.
const LOGITS_TOL: f32 = 1e-5;
/// The token of the final check's append.
const PROBE_TOKEN: u32 = 1;

#[derive(Debug, Clone)]
enum Op {
    /// Appends the tokens, asking for every position's logits or only the last one's.
    Append { tokens: Vec<u32>, all: bool },
    /// Truncates to a length drawn from 0..=len+2 (past the end: no change).
    Truncate(Index),
    /// Continues on a fork of the first n positions (n drawn from 0..=len+2), dropping the
    /// original.
    Fork(Index),
}

fn ops(vocab: u32) -> impl Strategy<Value = Vec<Op>> {
    let op = prop_oneof![
        4 => (prop::collection::vec(0..vocab, 1..=MAX_APPEND), any::<bool>())
            .prop_map(|(tokens, all)| Op::Append { tokens, all }),
        2 => any::<Index>().prop_map(Op::Truncate),
        1 => any::<Index>().prop_map(Op::Fork),
    ];
    prop::collection::vec(op, 1..=MAX_OPS)
}

fn fail(e: impl std::fmt::Display) -> TestCaseError {
    TestCaseError::fail(e.to_string())
}

/// Largest |a - b| over the largest |b| (at least 1).
fn rel_diff(a: &[f32], b: &[f32]) -> f32 {
    let scale = b.iter().fold(1.0f32, |m, x| m.max(x.abs()));
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
        / scale
}

/// Appends `tokens` to `seq` (whose reference token list is `held`) and compares the logits
/// with a fresh prefill of the whole list.
fn append_and_compare(
    g: &dyn Generator,
    seq: &mut Sequence,
    held: &mut Vec<u32>,
    tokens: &[u32],
    all: bool,
) -> std::result::Result<(), TestCaseError> {
    let mode = if all {
        LogitsMode::All
    } else {
        LogitsMode::Last
    };
    let got: Logits = g.append(seq, tokens, mode).map_err(fail)?;
    held.extend_from_slice(tokens);
    prop_assert_eq!(seq.tokens(), &held[..], "tokens held after the append");
    let mut fresh = g.new_sequence().map_err(fail)?;
    let want = g.append(&mut fresh, held, LogitsMode::All).map_err(fail)?;
    let first = held.len() - tokens.len();
    let rows: Vec<usize> = if all {
        (first..held.len()).collect()
    } else {
        vec![held.len() - 1]
    };
    prop_assert_eq!(got.rows, rows.len(), "rows returned");
    for (r, &pos) in rows.iter().enumerate() {
        let d = rel_diff(got.row(r), want.row(pos));
        prop_assert!(
            d <= LOGITS_TOL,
            "position {} of {}: cached logits differ from a fresh prefill by {} (> {})",
            pos,
            held.len(),
            d,
            LOGITS_TOL
        );
    }
    Ok(())
}

/// Runs `ops` on a new sequence of `g`, checking after every append and at the end.
fn run_ops(g: &dyn Generator, ops: &[Op]) -> std::result::Result<(), TestCaseError> {
    let mut seq = g.new_sequence().map_err(fail)?;
    let mut held: Vec<u32> = Vec::new();
    for op in ops {
        match op {
            Op::Append { tokens, all } => {
                append_and_compare(g, &mut seq, &mut held, tokens, *all)?;
            }
            Op::Truncate(i) => {
                let len = i.index(held.len() + 3);
                g.truncate(&mut seq, len).map_err(fail)?;
                held.truncate(len);
                prop_assert_eq!(seq.tokens(), &held[..], "tokens after truncate({})", len);
            }
            Op::Fork(i) => {
                let len = i.index(held.len() + 3);
                seq = g.fork(&seq, len).map_err(fail)?;
                held.truncate(len);
                prop_assert_eq!(seq.tokens(), &held[..], "tokens after fork({})", len);
            }
        }
    }
    append_and_compare(g, &mut seq, &mut held, &[PROBE_TOKEN], false)
}

fn check_backend(backend: BackendKind) -> Result<()> {
    let m = load_model(&steper_test_support::tiny_export()?, &backend)?;
    let g = m.generator;
    let vocab = u32::try_from(g.info().vocab_size)?;
    let longest = MAX_OPS * MAX_APPEND + 1;
    if longest > g.info().context_length {
        return Err(anyhow!(
            "operation lists reach {longest} tokens, past the model's context of {}",
            g.info().context_length
        ));
    }
    let mut runner = TestRunner::new(Config {
        cases: CASES,
        failure_persistence: None,
        ..Config::default()
    });
    runner
        .run(&ops(vocab), |ops| run_ops(g.as_ref(), &ops))
        .map_err(|e| anyhow!("{}: {e}", backend.name()))
}

#[test]
fn tract_cache_after_any_appends_truncations_and_forks_equals_a_fresh_prefill() -> Result<()> {
    check_backend(BackendKind::Tract)
}

#[test]
fn ort_cache_after_any_appends_truncations_and_forks_equals_a_fresh_prefill() -> Result<()> {
    check_backend(BackendKind::Ort(
        OrtOptions::default()
            .with_intra_threads(1)
            .with_kv_cache(KvCacheMode::Concat),
    ))
}
