//! What a training run reports: the lines of `train_log.jsonl` ([`LogLine`]) and the run's
//! summary ([`FitSummary`]).

use serde::{Deserialize, Deserializer, Serialize};

use super::prefix_cache::CacheStats;

/// A number serde_json wrote as `null` (it writes a non-finite float so) reads back as NaN.
fn nan_if_null<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

/// One line of `train_log.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LogLine {
    /// Optimizer step (1-based).
    pub step: u64,
    /// Learning rate used.
    pub lr: f64,
    /// Mean init-stage loss over the step's micro-batches (absent if no init example).
    #[serde(rename = "L_init")]
    pub l_init: Option<f64>,
    /// Mean expand-stage loss.
    #[serde(rename = "L_exp")]
    pub l_exp: Option<f64>,
    /// Mean aggregate-stage loss (the single term in vanilla mode).
    #[serde(rename = "L_agg")]
    pub l_agg: Option<f64>,
    /// The objective (`null` in the file when it was not finite).
    #[serde(deserialize_with = "nan_if_null")]
    pub total: f64,
    /// σ_init = exp(s_init).
    pub sigma_init: f64,
    /// σ_exp.
    pub sigma_exp: f64,
    /// σ_agg.
    pub sigma_agg: f64,
    /// Global gradient norm before clipping (`null` in the file when it was not finite: an
    /// `f16` step whose gradients overflowed).
    #[serde(deserialize_with = "nan_if_null")]
    pub grad_norm: f64,
    /// Tokens (non-padding) processed per second.
    pub tokens_per_sec: f64,
    /// `f16` training: the loss scale this step's gradients were computed with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_scale: Option<f64>,
    /// `f16` training: the step's gradients were not finite, so the update was skipped (and
    /// the scale halved for the next step).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub skipped: bool,
    /// Held-out per-stage losses when evaluated at this step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval: Option<EvalLosses>,
}

/// Held-out losses.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EvalLosses {
    /// Init-stage mean token loss.
    #[serde(rename = "L_init")]
    pub l_init: Option<f64>,
    /// Expand-stage mean token loss.
    #[serde(rename = "L_exp")]
    pub l_exp: Option<f64>,
    /// Aggregate-stage mean token loss.
    #[serde(rename = "L_agg")]
    pub l_agg: Option<f64>,
}

/// What a run did.
#[derive(Debug, Clone, Serialize)]
pub struct FitSummary {
    /// Last step reached.
    pub step: u64,
    /// Whether `steps` was reached (false when stopped early by `stop_after`).
    pub finished: bool,
    /// Step the run resumed from (0 for a fresh run).
    pub resumed_from: u64,
    /// Last logged line.
    pub last: Option<LogLine>,
    /// Trainable / total parameters.
    pub trainable_parameters: usize,
    /// All parameters.
    pub total_parameters: usize,
    /// Mean tokens/s over the run.
    pub tokens_per_sec: f64,
    /// Wall seconds of this process's part of the run.
    pub seconds: f64,
    /// Final held-out losses.
    pub eval: Option<EvalLosses>,
    /// Bottom layers that ran frozen, without an autograd graph.
    pub frozen_layers: usize,
    /// What the frozen-prefix cache did (when one was used).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prefix_cache: Option<CacheStats>,
    /// The device this process trained on (`cpu`, `cuda:0`).
    pub device: String,
    /// The dtype the forward and backward computed in (`f32`, `bf16`, `f16`).
    pub compute_dtype: String,
    /// `f16` training: steps of this process whose update was skipped for non-finite gradients.
    pub skipped_steps: u64,
}
