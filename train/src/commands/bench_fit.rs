//! `steper-train bench-fit`.

use std::path::PathBuf;

use anyhow::Result;
use steper_train::bench::{bench_fit, BenchFitConfig};

/// Arguments of `bench-fit`.
#[derive(clap::Args)]
pub struct Args {
    /// Student checkpoint directory (config.json, safetensors).
    #[arg(long)]
    student: PathBuf,
    /// Examples per step.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Tokens per example.
    #[arg(long, default_value_t = 256)]
    seq_len: usize,
    /// Target (loss) tokens per example.
    #[arg(long, default_value_t = 16)]
    target_len: usize,
    /// Measured steps.
    #[arg(long, default_value_t = 10)]
    steps: u64,
    /// Unmeasured first steps.
    #[arg(long, default_value_t = 2)]
    warmup_steps: u64,
    /// Keep the embeddings frozen.
    #[arg(long)]
    freeze_embeddings: bool,
    /// Train only the top N layers.
    #[arg(long)]
    top_layers: Option<usize>,
    /// Seed of the random tokens.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Read the frozen bottom from a prefix cache filled during warm-up (the steady state of
    /// a second epoch, or of a later run on the same records).
    #[arg(long)]
    prefix_cache: bool,
    /// Train LoRA adapters of rank R (see `fit --lora-rank`).
    #[arg(long)]
    lora_rank: Option<usize>,
    /// LoRA α; default 2·R.
    #[arg(long)]
    lora_alpha: Option<f64>,
    /// Projections that get adapters.
    #[arg(long, default_value = "q,k,v,o,gate,up,down")]
    lora_targets: String,
    /// Dtype training computes in (see `fit --dtype`).
    #[arg(long, default_value = "auto")]
    dtype: steper_models::DTypeChoice,
    /// Device to train on: cpu | cuda | cuda:N (see `fit --device`).
    #[arg(long, default_value = "cpu")]
    device: steper_models::DeviceChoice,
}

/// Runs the benchmark and prints its JSON report.
pub fn run(a: Args) -> Result<()> {
    let cfg = BenchFitConfig {
        batch_size: a.batch_size,
        seq_len: a.seq_len,
        target_len: a.target_len,
        steps: a.steps,
        warmup_steps: a.warmup_steps,
        freeze_embeddings: a.freeze_embeddings,
        top_layers: a.top_layers,
        seed: a.seed,
        prefix_cache: a.prefix_cache,
        lora: super::fit::lora_config(a.lora_rank, a.lora_alpha, &a.lora_targets)?,
        dtype: a.dtype,
        device: a.device,
    };
    let report = bench_fit(&a.student, &cfg)?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}
