//! The settings of a training run ([`FitConfig`]) and which weights it trains ([`Trainable`]).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use steper_models::lora::LoraConfig;
use steper_models::weights::DEFAULT_MAX_SHARD_BYTES;
use steper_models::{DTypeChoice, DeviceChoice};

use super::optim::AdamWConfig;
use super::precision::LossScaleConfig;
use super::prefix_cache::CacheDtype;
use super::LossMode;

/// Which weights are trained.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Trainable {
    /// Keep `model.embed_tokens` (and a tied `lm_head`) frozen.
    pub freeze_embeddings: bool,
    /// Train only the top N decoder layers (plus the final norm and an untied head); `None` =
    /// all layers. With `lora`: the layers that get adapters.
    pub top_layers: Option<usize>,
    /// Train LoRA adapters (and σ) only; every base weight stays frozen. Checkpoints hold the
    /// merged weights (HF-style) plus the adapters (`lora.safetensors`, for resuming).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora: Option<LoraConfig>,
}

/// Settings of a training run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FitConfig {
    /// Loss combination.
    pub mode: LossMode,
    /// Optimizer steps in total.
    pub steps: u64,
    /// Examples per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    /// AdamW settings (peak lr, betas, weight decay).
    pub adamw: AdamWConfig,
    /// Warmup steps.
    pub warmup: u64,
    /// Final lr as a fraction of the peak.
    pub min_lr_ratio: f64,
    /// Global gradient-norm cap.
    pub max_grad_norm: f64,
    /// Seed of the data order.
    pub seed: u64,
    /// Micro-batches per length bucket (examples are sorted by length inside a bucket).
    pub bucket_batches: usize,
    /// Evaluate on the held-out examples every N steps (0 = only at the end).
    pub eval_every: u64,
    /// Write a checkpoint every N steps (0 = only at the end).
    pub save_every: u64,
    /// Which weights train.
    pub trainable: Trainable,
    /// Stop this process after N steps of this run (the run resumes later); for tests and
    /// time-boxed jobs.
    pub stop_after: Option<u64>,
    /// Directory of the frozen-prefix cache (used when the embeddings and the bottom layers are
    /// frozen: `freeze_embeddings` with `top_layers`); `None` = the frozen bottom is recomputed
    /// (without an autograd graph) at every step.
    #[serde(default)]
    pub prefix_cache: Option<PathBuf>,
    /// Element type of the cached hidden states.
    #[serde(default = "default_cache_dtype")]
    pub prefix_cache_dtype: CacheDtype,
    /// The dtype training computes in: `auto` and `f32` compute in f32; `bf16` and `f16` are
    /// mixed precision (see [`crate::fit::precision`]): the forward and backward run in the half
    /// type from f32 master weights, with f32 optimizer state and σ, and `f16` scales the loss
    /// dynamically. Checkpoints are written in the student's stored dtype whatever this is.
    #[serde(default)]
    pub dtype: DTypeChoice,
    /// The device training runs on (`cpu`, `cuda:N`). A resumed run may use another one: the
    /// checkpoint's weights and optimizer state are loaded onto it.
    #[serde(default)]
    pub device: DeviceChoice,
    /// Dynamic loss scaling of `f16` training (unused by the other dtypes).
    #[serde(default)]
    pub loss_scale: LossScaleConfig,
    /// Largest safetensors file a checkpoint is written in; larger weights are sharded with
    /// `model.safetensors.index.json` (transformers' `max_shard_size`).
    #[serde(default = "default_max_shard_bytes")]
    pub max_shard_bytes: usize,
}

fn default_max_shard_bytes() -> usize {
    DEFAULT_MAX_SHARD_BYTES
}

fn default_cache_dtype() -> CacheDtype {
    CacheDtype::F16
}

impl Default for FitConfig {
    fn default() -> Self {
        FitConfig {
            mode: LossMode::Steper,
            steps: 100,
            batch_size: 4,
            grad_accum: 1,
            adamw: AdamWConfig::default(),
            warmup: 10,
            min_lr_ratio: 0.1,
            max_grad_norm: 1.0,
            seed: 0,
            bucket_batches: 8,
            eval_every: 0,
            save_every: 0,
            trainable: Trainable::default(),
            stop_after: None,
            prefix_cache: None,
            prefix_cache_dtype: CacheDtype::F16,
            dtype: DTypeChoice::Auto,
            device: DeviceChoice::Cpu,
            loss_scale: LossScaleConfig::default(),
            max_shard_bytes: DEFAULT_MAX_SHARD_BYTES,
        }
    }
}
