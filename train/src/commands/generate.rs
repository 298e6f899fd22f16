//! `steper-train generate`.

use std::path::PathBuf;

use anyhow::Result;
use steper_models::{
    generate_text, Checkpoint, DTypeChoice, DeviceChoice, GenerateOptions, Sampling,
};

/// Arguments of `generate`.
#[derive(clap::Args)]
pub struct Args {
    /// Checkpoint directory (config.json, safetensors, tokenizer.json).
    #[arg(long)]
    checkpoint: PathBuf,
    /// The prompt text.
    #[arg(long)]
    prompt: String,
    /// Maximum new tokens.
    #[arg(long, default_value_t = 32)]
    max_new_tokens: usize,
    /// Sampling temperature; 0 means greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    /// Nucleus mass for sampling.
    #[arg(long, default_value_t = 0.95)]
    top_p: f64,
    /// Sampler seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Dtype the model computes in: auto (the stored dtype where the device runs it at full
    /// speed, else f32) | f32 | bf16 | f16.
    #[arg(long, default_value = "auto")]
    dtype: DTypeChoice,
    /// Device the model runs on: cpu | cuda | cuda:N (cuda needs a build with `--features
    /// cuda`).
    #[arg(long, default_value = "cpu")]
    device: DeviceChoice,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

/// Loads the checkpoint and prints the continuation.
pub fn run(a: Args) -> Result<()> {
    let ck = Checkpoint::load_with(&a.checkpoint, a.dtype, &a.device.open()?)?;
    if let Some(note) = ck.dtype_note() {
        eprintln!("{note}");
    }
    let model = ck.model()?;
    let tok = ck.tokenizer()?;
    let sampling = if a.temperature > 0.0 {
        Sampling::Sample {
            temperature: a.temperature,
            top_p: a.top_p,
            seed: a.seed,
        }
    } else {
        Sampling::Greedy
    };
    let opts = GenerateOptions {
        max_new_tokens: a.max_new_tokens,
        stop_ids: vec![],
        sampling,
    };
    let g = generate_text(&model, &tok, &a.prompt, &opts)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&g)?);
    } else {
        println!("{}{}", g.prompt, g.text);
        eprintln!(
            "[{} prompt tokens at {:.0} tok/s, {} new tokens at {:.1} tok/s, mean p {:.3}]",
            g.prompt_tokens,
            g.prefill_tokens_per_sec,
            g.new_tokens,
            g.decode_tokens_per_sec,
            g.mean_token_prob
        );
    }
    Ok(())
}
