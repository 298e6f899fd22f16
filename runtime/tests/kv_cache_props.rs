//! The KV cache under any sequence of operations ([`steper_test_support::kv_ops`]): appends of
//! 1..=MAX_APPEND tokens (logits of the last or of every appended position), truncations (to any length, longer ones included:
//! those keep everything) and forks. After every append the logits returned equal, within
//! LOGITS_TOL, those of a fresh sequence prefilled with the whole token list from scratch, and
//! the sequence holds exactly that list; a last one-token append checks the cache an operation
//! list ending in a truncation or a fork left behind. Runs on the tiny export of
//! `steper-test-support`, on tract and on ONNX Runtime (concatenating cache; the library is
//! found as by every ONNX Runtime test).

use anyhow::{anyhow, Result};
use proptest::test_runner::{Config, TestRunner};
use steper_runtime::{load_model, BackendKind, KvCacheMode, OrtOptions};
use steper_test_support::kv_ops::{KvCheck, OpsSpec};

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

fn check_backend(backend: BackendKind) -> Result<()> {
    let m = load_model(&steper_test_support::tiny_export()?, &backend)?;
    let g = m.generator;
    let vocab = u32::try_from(g.info().vocab_size)?;
    let spec = OpsSpec {
        vocab,
        max_ops: MAX_OPS,
        max_append: MAX_APPEND,
        max_long_append: None,
    };
    let longest = spec.longest();
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
    let check = KvCheck {
        cached: g.as_ref(),
        reference: g.as_ref(),
        tolerance: LOGITS_TOL,
    };
    runner
        .run(&spec.strategy(), |ops| check.run(&ops))
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
