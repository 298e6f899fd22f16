//! Writes a tiny random checkpoint of one model family (`config.json`, `model.safetensors`, a
//! word-level `tokenizer.json`), for checks that need a model of that family but no download:
//!
//! ```text
//! cargo run --release -p steper-export --example tiny_family -- --model-type qwen2 --out DIR
//! ```
//!
//! The config is `LlamaConfig::tiny` of the family (Qwen2: q/k/v biases, RoPE base 1e6, tied
//! embeddings); matrices are scaled ×12 and biases ×50 so that greedy decoding has clear
//! winners (a token comparison between runtimes is then meaningful).

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::Context;
use candle_core::Device;
use clap::Parser;
use steper_models::{Checkpoint, LlamaConfig, Weights};

#[derive(Parser)]
struct Args {
    /// HF `model_type` of the family (`llama`, `qwen2`).
    #[arg(long, default_value = "qwen2")]
    model_type: String,
    /// Output checkpoint directory (created).
    #[arg(long)]
    out: PathBuf,
    /// Vocabulary size.
    #[arg(long, default_value_t = 96)]
    vocab: usize,
    /// Seed of the weights.
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Untied embeddings (a separate `lm_head.weight`).
    #[arg(long)]
    untied: bool,
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let mut cfg = match a.model_type.as_str() {
        "qwen2" => LlamaConfig::tiny_qwen2(a.vocab),
        _ => LlamaConfig {
            model_type: a.model_type.clone(),
            ..LlamaConfig::tiny(a.vocab)
        },
    };
    cfg.tie_word_embeddings = !a.untied;
    cfg.max_position_embeddings = 512;
    cfg.validate(&a.out.join("config.json"))?;
    let w = Weights::random(&cfg, a.seed, &Device::Cpu)?;
    let mut out = Weights::default();
    for (name, t) in w.tensors() {
        let t = if name.ends_with(".bias") {
            (t * 50.0)?
        } else if t.rank() == 2 {
            (t * 12.0)?
        } else {
            t.clone()
        };
        out.insert(name.clone(), t);
    }
    Checkpoint::save(&a.out, &cfg, &out, None).context("saving the checkpoint")?;
    let vocab: HashMap<String, u32> = (0..a.vocab as u32).map(|i| (format!("t{i}"), i)).collect();
    let model = tokenizers::models::wordlevel::WordLevel::builder()
        .vocab(vocab.into_iter().collect())
        .unk_token("t0".into())
        .build()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut tok = tokenizers::Tokenizer::new(model);
    tok.with_pre_tokenizer(Some(tokenizers::pre_tokenizers::whitespace::Whitespace {}));
    tok.save(a.out.join("tokenizer.json"), false)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    println!(
        "{}",
        serde_json::json!({"checkpoint": a.out, "model_type": cfg.model_type,
            "parameters": cfg.num_parameters()})
    );
    Ok(())
}
