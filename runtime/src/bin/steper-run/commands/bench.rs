//! `steper-run bench-decode`: prefill and decode throughput of exports on ONNX Runtime (CPU)
//! and tract, one sequence, after a warm-up, median of several runs.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use steper_runtime::backend::{load_model, BackendKind, KvCacheMode, OrtOptions};
use steper_runtime::LogitsMode;

/// Arguments of `bench-decode`.
#[derive(clap::Args)]
pub struct Args {
    /// Export directories to measure (e.g. an fp32 and an fp16 export).
    #[arg(long = "model", required = true)]
    models: Vec<PathBuf>,
    /// Backends: `ort`, `tract` (comma separated).
    #[arg(long, default_value = "ort,tract")]
    backends: String,
    /// Prompt tokens.
    #[arg(long, default_value_t = 128)]
    prompt_tokens: usize,
    /// Generated tokens.
    #[arg(long, default_value_t = 128)]
    new_tokens: usize,
    /// Measured runs (the median is reported).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// ONNX Runtime intra-op threads (default: ONNX Runtime's choice).
    #[arg(long)]
    threads: Option<usize>,
    /// ONNX Runtime KV-cache modes to measure, each a row (comma separated: auto, in-place,
    /// concat; in-place needs a GroupQueryAttention export).
    #[arg(long, default_value = "auto")]
    kv_cache: String,
    /// ONNX Runtime memory-pattern settings to measure, each a row (comma separated: on, off).
    #[arg(long, default_value = "on")]
    memory_pattern: String,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Runs the benchmark and prints one JSON object.
pub fn run(a: Args) -> anyhow::Result<()> {
    let list = |s: &str| -> Vec<String> {
        s.split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect()
    };
    let kv_modes = list(&a.kv_cache)
        .iter()
        .map(|m| m.parse::<KvCacheMode>())
        .collect::<Result<Vec<_>, _>>()
        .context("--kv-cache")?;
    let patterns = list(&a.memory_pattern)
        .iter()
        .map(|m| match m.as_str() {
            "on" => Ok(true),
            "off" => Ok(false),
            other => anyhow::bail!("--memory-pattern: expected on or off, got {other:?}"),
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut runs: Vec<(String, BackendKind)> = Vec::new();
    for b in list(&a.backends) {
        match b.as_str() {
            "ort" => {
                for &m in &kv_modes {
                    for &p in &patterns {
                        let o = OrtOptions::default()
                            .with_intra_threads(a.threads)
                            .with_kv_cache(m)
                            .with_memory_pattern(p);
                        runs.push((b.clone(), BackendKind::Ort(o)));
                    }
                }
            }
            "tract" => runs.push((b.clone(), BackendKind::Tract)),
            other => anyhow::bail!("unknown backend {other:?} (ort, tract)"),
        }
    }
    let mut results = Vec::new();
    for dir in &a.models {
        for (b, kind) in &runs {
            let (kv_cache, memory_pattern) = match kind {
                BackendKind::Ort(o) => (Some(o.kv_cache.as_str()), Some(o.memory_pattern)),
                _ => (None, None),
            };
            let m = load_model(dir, kind).with_context(|| format!("loading {}", dir.display()))?;
            let g = m.generator;
            let vocab = g.info().vocab_size as u32;
            let prompt: Vec<u32> = (0..a.prompt_tokens as u32)
                .map(|i| (i * 7919 + 17) % vocab)
                .collect();
            let mut prefill = Vec::new();
            let mut decode = Vec::new();
            // Run 0 is the warm-up.
            for r in 0..=a.runs {
                let mut seq = g.new_sequence()?;
                let t0 = Instant::now();
                let mut lg = g.append(&mut seq, &prompt, LogitsMode::Last)?;
                let tp = t0.elapsed().as_secs_f64();
                let t1 = Instant::now();
                for _ in 0..a.new_tokens {
                    let last = lg.last();
                    let mut best = 0;
                    for (i, &x) in last.iter().enumerate() {
                        if x > last[best] {
                            best = i;
                        }
                    }
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
                "backend": b,
                "kv_cache": kv_cache,
                "memory_pattern": memory_pattern,
                "providers": g.info().providers,
                "prompt_tokens": a.prompt_tokens,
                "new_tokens": a.new_tokens,
                "runs": a.runs,
                "prefill_tok_s": median(prefill),
                "decode_tok_s": median(decode),
            }));
        }
    }
    println!(
        "{}",
        serde_json::to_string_pretty(&serde_json::json!({ "bench_decode": results }))?
    );
    Ok(())
}
