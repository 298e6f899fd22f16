//! The in-place KV cache of a GroupQueryAttention export (`KvCacheMode::InPlace`: one buffer per
//! layer and kind, truncation only sets the length, growth copies into a larger buffer) under
//! any sequence of operations ([`steper_test_support::kv_ops`]): appends of a few tokens
//! (sometimes long enough to make the buffer grow past `IN_PLACE_GROWTH` positions, once or
//! twice), truncations (to any length, longer ones included) and forks. After every append the logits equal, within LOGITS_TOL,
//! those of a fresh sequence of the concatenating cache prefilled with the whole token list, and
//! the sequence holds exactly that list; a last one-token append checks what an operation list
//! ending in a truncation or a fork left behind.

mod common;

use anyhow::{anyhow, Result};
use common::*;
use proptest::test_runner::{Config, TestRunner};
use steper_export::{AttentionOp, ExportOptions};
use steper_runtime::backend::{KvCacheMode, OrtGenerator, OrtOptions, IN_PLACE_GROWTH};
use steper_test_support::kv_ops::{KvCheck, OpsSpec};

/// Random operation lists (each case re-prefills the whole list after every append).
const CASES: u32 = 32;
/// The operation lists: up to 12 operations, appends of up to 8 tokens, and long appends of up
/// to 160 tokens, a few of which take the cache past its first allocation.
const OPS: OpsSpec = OpsSpec {
    vocab: VOCAB as u32,
    max_ops: 12,
    max_append: 8,
    max_long_append: Some(160),
};
/// Largest |in-place - fresh| logit allowed, as a fraction of the fresh row's largest |logit|
/// (at least 1): the same fp32 math, the attention over the cache computed in other shapes
/// (one call per append vs one prefill); below 4e-6 on 900 cases, while a cache that loses one
/// of 256 positions when it grows is off by 1e-4.
const LOGITS_TOL: f32 = 2e-5;

#[test]
fn in_place_cache_after_any_appends_truncations_and_forks_equals_a_fresh_prefill() -> Result<()> {
    ensure_ort()?;
    let tmp = tempfile::tempdir()?;
    let ckpt = tmp.path().join("ckpt");
    let mut cfg = tiny_config();
    cfg.max_position_embeddings = 2048;
    let longest = OPS.longest();
    if longest > cfg.max_position_embeddings || longest < 2 * IN_PLACE_GROWTH {
        return Err(anyhow!(
            "operation lists reach {longest} tokens: they must fit the context ({}) and may grow the cache twice",
            cfg.max_position_embeddings
        ));
    }
    tiny_checkpoint(&ckpt, &cfg, 13)?;
    let dir = tmp.path().join("gqa");
    steper_export::export(
        &ckpt,
        &dir,
        &ExportOptions {
            attention: AttentionOp::GroupQueryAttention,
            ..ExportOptions::default()
        },
    )?;
    let manifest = steper_runtime::Manifest::load(&dir.join("steper.json"))?;
    let open = |mode: KvCacheMode| {
        OrtGenerator::load(
            &dir.join("model.onnx"),
            &manifest,
            &OrtOptions::default()
                .with_intra_threads(1)
                .with_kv_cache(mode),
        )
    };
    let (in_place, fresh) = (open(KvCacheMode::InPlace)?, open(KvCacheMode::Concat)?);
    if !in_place.kv_in_place() || fresh.kv_in_place() {
        return Err(anyhow!("the generators do not keep the cache as asked"));
    }
    let mut runner = TestRunner::new(Config {
        cases: CASES,
        failure_persistence: None,
        ..Config::default()
    });
    let check = KvCheck {
        cached: &in_place,
        reference: &fresh,
        tolerance: LOGITS_TOL,
    };
    runner
        .run(&OPS.strategy(), |ops| check.run(&ops))
        .map_err(|e| anyhow!("{e}"))
}
