//! Training-throughput benchmark: runs the real trainer ([`crate::fit::fit`], σ-weighted loss,
//! AdamW, clipping) on fixed-shape batches of seeded random tokens, so the same step can be
//! reproduced in another framework (`experiments/bench-train/torch_step.py` builds the same
//! shapes in PyTorch) and the tokens/s compared.

use std::path::Path;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::fit::Example;
use crate::fit::{fit, FitConfig, LogLine, LossMode, Stage, Trainable};
use crate::{Error, Result};

/// Settings of [`bench_fit`].
#[derive(Debug, Clone, Serialize)]
pub struct BenchFitConfig {
    /// Examples per step.
    pub batch_size: usize,
    /// Tokens per example (prompt + target).
    pub seq_len: usize,
    /// Target tokens per example (the loss span; the rest is prompt).
    pub target_len: usize,
    /// Measured optimizer steps.
    pub steps: u64,
    /// Steps run first and not measured.
    pub warmup_steps: u64,
    /// Which weights train.
    pub freeze_embeddings: bool,
    /// Train only the top N layers.
    pub top_layers: Option<usize>,
    /// Seed of the random tokens.
    pub seed: u64,
    /// Read the frozen bottom from a prefix cache (filled during the warm-up steps, which are
    /// raised to one epoch of the bench's examples so that every measured step hits it).
    pub prefix_cache: bool,
    /// LoRA adapters instead of full weights.
    pub lora: Option<steper_models::LoraConfig>,
    /// The dtype training computes in (see [`FitConfig::dtype`]).
    pub dtype: steper_models::DTypeChoice,
    /// The device training runs on (see [`FitConfig::device`]).
    pub device: steper_models::DeviceChoice,
}

impl Default for BenchFitConfig {
    fn default() -> Self {
        BenchFitConfig {
            batch_size: 8,
            seq_len: 256,
            target_len: 16,
            steps: 10,
            warmup_steps: 2,
            freeze_embeddings: false,
            top_layers: None,
            seed: 0,
            prefix_cache: false,
            lora: None,
            dtype: steper_models::DTypeChoice::Auto,
            device: steper_models::DeviceChoice::Cpu,
        }
    }
}

/// What [`bench_fit`] measured.
#[derive(Debug, Clone, Serialize)]
pub struct BenchFitReport {
    /// The framework ("candle").
    pub framework: &'static str,
    /// The settings.
    pub config: BenchFitConfig,
    /// Student parameters in total.
    pub total_parameters: usize,
    /// Parameters that receive gradients.
    pub trainable_parameters: usize,
    /// Tokens per optimizer step (`batch_size × (seq_len − 1)`).
    pub tokens_per_step: usize,
    /// Median seconds per measured step.
    pub median_step_seconds: f64,
    /// Tokens/s over the measured steps (tokens / summed step time).
    pub tokens_per_sec: f64,
    /// Peak resident memory of this process (VmHWM), in MiB, when the OS reports it.
    pub peak_rss_mib: Option<f64>,
    /// Threads candle's CPU kernels may use.
    pub threads: usize,
    /// Bottom layers run frozen without an autograd graph.
    pub frozen_layers: usize,
    /// Unmeasured steps actually run.
    pub warmup_steps_run: u64,
    /// The device trained on (`cpu`, `cuda:0`).
    pub device: String,
    /// The dtype the forward and backward computed in.
    pub compute_dtype: String,
}

/// Trains the student at `student_dir` for `warmup_steps + steps` steps on random tokens
/// (checkpoints go to a temporary directory) and reports the measured steps' throughput.
pub fn bench_fit(student_dir: &Path, cfg: &BenchFitConfig) -> Result<BenchFitReport> {
    if cfg.steps == 0 || cfg.batch_size == 0 {
        return Err(Error::Input(
            "bench-fit: steps and batch size must be positive".into(),
        ));
    }
    if cfg.target_len == 0 || cfg.seq_len <= cfg.target_len {
        return Err(Error::Input(format!(
            "bench-fit: seq_len ({}) must exceed target_len ({}) and target_len must be positive",
            cfg.seq_len, cfg.target_len
        )));
    }
    let model_cfg = steper_models::LlamaConfig::from_file(&student_dir.join("config.json"))?;
    if cfg.seq_len > model_cfg.max_position_embeddings {
        return Err(Error::Input(format!(
            "bench-fit: seq_len {} exceeds the student's context of {}",
            cfg.seq_len, model_cfg.max_position_embeddings
        )));
    }
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let vocab = model_cfg.vocab_size as u32;
    let stages = [Stage::Init, Stage::Expand, Stage::Aggregate];
    let n = cfg.batch_size * 4;
    let examples: Vec<Example> = (0..n)
        .map(|i| {
            let mut tok = || rng.random_range(0..vocab);
            Example {
                stage: stages[i % 3],
                prompt: (0..cfg.seq_len - cfg.target_len).map(|_| tok()).collect(),
                target: (0..cfg.target_len).map(|_| tok()).collect(),
            }
        })
        .collect();
    let batches_per_epoch = n.div_ceil(cfg.batch_size) as u64;
    let warmup_steps = if cfg.prefix_cache {
        cfg.warmup_steps.max(batches_per_epoch)
    } else {
        cfg.warmup_steps
    };
    let total_steps = cfg.steps + warmup_steps;
    let fit_cfg = FitConfig {
        mode: LossMode::Steper,
        steps: total_steps,
        batch_size: cfg.batch_size,
        grad_accum: 1,
        warmup: 0,
        seed: cfg.seed,
        eval_every: 0,
        save_every: 0,
        trainable: Trainable {
            freeze_embeddings: cfg.freeze_embeddings,
            top_layers: cfg.top_layers,
            lora: cfg.lora.clone(),
        },
        dtype: cfg.dtype,
        device: cfg.device,
        ..FitConfig::default()
    };
    let tmp = scratch_dir()?;
    let fit_cfg = FitConfig {
        prefix_cache: cfg.prefix_cache.then(|| tmp.0.join("prefix-cache")),
        ..fit_cfg
    };
    let summary = fit(student_dir, &examples, &[], &fit_cfg, &tmp.0, false);
    let log = std::fs::read_to_string(tmp.0.join("train_log.jsonl"));
    let summary = summary?;
    let log = log.map_err(|source| Error::Io {
        path: tmp.0.join("train_log.jsonl"),
        source,
    })?;
    let lines: Vec<LogLine> = log
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).map_err(|e| Error::Input(format!("bench-fit log: {e}"))))
        .collect::<Result<_>>()?;
    let tokens_per_step = cfg.batch_size * (cfg.seq_len - 1);
    let mut secs: Vec<f64> = lines
        .iter()
        .filter(|l| l.step > warmup_steps)
        .map(|l| tokens_per_step as f64 / l.tokens_per_sec.max(1e-12))
        .collect();
    if secs.is_empty() {
        return Err(Error::Input(
            "bench-fit: no measured steps were logged".into(),
        ));
    }
    let total: f64 = secs.iter().sum();
    secs.sort_by(f64::total_cmp);
    Ok(BenchFitReport {
        framework: "candle",
        config: cfg.clone(),
        total_parameters: summary.total_parameters,
        trainable_parameters: summary.trainable_parameters,
        tokens_per_step,
        median_step_seconds: secs[secs.len() / 2],
        tokens_per_sec: (tokens_per_step * secs.len()) as f64 / total,
        peak_rss_mib: peak_rss_mib(),
        threads: candle_core::utils::get_num_threads(),
        frozen_layers: summary.frozen_layers,
        warmup_steps_run: warmup_steps,
        device: summary.device.clone(),
        compute_dtype: summary.compute_dtype.clone(),
    })
}

/// Peak resident set size of this process in MiB (Linux `VmHWM`).
pub fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// A directory removed on drop.
struct TempDir(std::path::PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A fresh directory under the system temp dir for bench-fit's run (log, final checkpoint);
/// removed on drop.
fn scratch_dir() -> Result<TempDir> {
    let base = std::env::temp_dir();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let dir = base.join(format!("steper-bench-fit-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|source| Error::Io {
        path: dir.clone(),
        source,
    })?;
    Ok(TempDir(dir))
}
