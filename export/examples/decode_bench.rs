//! Prefill and decode throughput of exports on ONNX Runtime CPU, the protocol of
//! `steper-run bench-decode` (one sequence, a fixed pseudo-random prompt, greedy tokens, run 0 a
//! warm-up, median of `--runs`), printed as JSON. Built with the export crate's examples so
//! quantized exports can be measured beside `quant_agreement`:
//!
//! ```text
//! cargo run --release -p steper-export --example decode_bench -- \
//!     --model fp32-export --model int4-export --threads 2
//! ```

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::Parser;
use steper_runtime::backend::{load_model, BackendKind, OrtOptions};
use steper_runtime::LogitsMode;

#[derive(Parser)]
struct Args {
    /// Export directories.
    #[arg(long = "model", required = true)]
    models: Vec<PathBuf>,
    /// Prompt tokens.
    #[arg(long, default_value_t = 128)]
    prompt_tokens: usize,
    /// Generated tokens.
    #[arg(long, default_value_t = 128)]
    new_tokens: usize,
    /// Measured runs (median reported).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// ONNX Runtime intra-op threads.
    #[arg(long)]
    threads: Option<usize>,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let kind = BackendKind::Ort(OrtOptions {
        intra_threads: a.threads,
        ..Default::default()
    });
    let mut results = Vec::new();
    for dir in &a.models {
        let m = load_model(dir, &kind).with_context(|| dir.display().to_string())?;
        let g = m.generator;
        let vocab = g.info().vocab_size as u32;
        let prompt: Vec<u32> = (0..a.prompt_tokens as u32)
            .map(|i| (i * 7919 + 17) % vocab)
            .collect();
        let (mut prefill, mut decode) = (Vec::new(), Vec::new());
        for r in 0..=a.runs.max(1) {
            let mut seq = g.new_sequence()?;
            let t0 = Instant::now();
            let mut lg = g.append(&mut seq, &prompt, LogitsMode::Last)?;
            let tp = t0.elapsed().as_secs_f64();
            let t1 = Instant::now();
            for _ in 0..a.new_tokens {
                let last = lg.last();
                let best = (0..last.len())
                    .max_by(|&i, &j| last[i].total_cmp(&last[j]))
                    .unwrap_or(0);
                lg = g.append(&mut seq, &[best as u32], LogitsMode::Last)?;
            }
            let td = t1.elapsed().as_secs_f64();
            if r > 0 {
                prefill.push(a.prompt_tokens as f64 / tp);
                decode.push(a.new_tokens as f64 / td);
            }
        }
        results.push(serde_json::json!({
            "model": dir,
            "dtype": m.manifest.dtype,
            "quantization": m.manifest.quantization,
            "providers": g.info().providers,
            "prompt_tokens": a.prompt_tokens,
            "new_tokens": a.new_tokens,
            "runs": a.runs,
            "prefill_tok_s": median(prefill),
            "decode_tok_s": median(decode),
        }));
    }
    println!(
        "{}",
        serde_json::to_string_pretty(&serde_json::json!({ "decode_bench": results }))?
    );
    Ok(())
}
