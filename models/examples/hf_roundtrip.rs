//! Writes a tiny Llama-3.2-style checkpoint (GQA, tied embeddings, `llama3` RoPE scaling,
//! several end ids in `generation_config.json`) with this crate's `Checkpoint::save` in bf16,
//! sharded with an index, and the logits this crate's model computes for fixed token ids, for
//! `experiments/hf-roundtrip/compare.py` to check against Hugging Face transformers.
//!
//! `cargo run -p steper-models --example hf_roundtrip -- OUT_DIR`

use std::path::PathBuf;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use steper_models::{Checkpoint, DTypeChoice, LlamaConfig, RopeScaling, TokenIds, Weights};

/// Shard limit that splits the tiny model into several files (as `max_shard_size` would).
const SHARD_BYTES: usize = 40_000;

fn main() -> Result<()> {
    let out: PathBuf = std::env::args()
        .nth(1)
        .context("usage: hf_roundtrip OUT_DIR")?
        .into();
    let mut cfg = LlamaConfig::tiny(128);
    cfg.num_hidden_layers = 2;
    cfg.num_attention_heads = 4;
    cfg.num_key_value_heads = Some(2);
    cfg.hidden_size = 64;
    cfg.intermediate_size = 96;
    cfg.tie_word_embeddings = true;
    cfg.rope_theta = 500000.0;
    cfg.max_position_embeddings = 256;
    cfg.rope_scaling = Some(RopeScaling {
        rope_type: "llama3".into(),
        factor: 8.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: 16,
    });
    cfg.bos_token_id = Some(1);
    cfg.eos_token_id = Some(TokenIds::Many(vec![2, 3]));
    let w = Weights::random(&cfg, 2026, &Device::Cpu)?.to_dtype(DType::BF16)?;
    let dir = out.join("checkpoint");
    Checkpoint::save(&dir, &cfg, &w, Some(SHARD_BYTES))?;
    std::fs::write(
        dir.join("generation_config.json"),
        "{\n  \"bos_token_id\": 1,\n  \"eos_token_id\": [2, 3, 4],\n  \"do_sample\": false\n}\n",
    )?;

    let ids: Vec<u32> = (0..40u32).map(|i| (i * 37 + 5) % 128).collect();
    let mut report = serde_json::json!({"input_ids": ids});
    for (name, choice) in [("f32", DTypeChoice::F32), ("bf16", DTypeChoice::BF16)] {
        let ck = Checkpoint::load_with(&dir, choice, &Device::Cpu)?;
        let model = ck.model()?;
        let x = Tensor::new(ids.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
        let logits = model.forward(&x, None)?.to_dtype(DType::F32)?.squeeze(0)?;
        report[format!("logits_{name}")] = serde_json::json!(logits.to_vec2::<f32>()?);
        report["eos_ids"] = serde_json::json!(ck.eos_ids());
        report["stored_dtype"] = serde_json::json!(ck.stored_dtype.as_str());
    }
    std::fs::write(out.join("ours.json"), serde_json::to_string(&report)?)?;
    println!("{}", dir.display());
    Ok(())
}
