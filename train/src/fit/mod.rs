//! `steper-train fit`: σ-weighted step-wise training of a student in candle.
//!
//! Examples are token sequences `prompt ++ target` with a stage; the loss covers target tokens
//! only. Batches are length-bucketed; the data order is a pure function of the seed and the
//! micro-batch index, so a resumed run continues exactly where it stopped.

mod forward;
pub mod loss;
pub mod optim;
pub mod precision;
pub mod prefix_cache;
pub mod records;
mod report;
mod settings;
mod trainer;

pub use precision::{LossScaleConfig, LossScaler};
pub use prefix_cache::{CacheDtype, CacheStats};
pub use report::{EvalLosses, FitSummary, LogLine};
pub use settings::{FitConfig, Trainable};
pub use trainer::fit;

/// The three STEPER stages (docs/DESIGN.md, "The prompt").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    /// Reasoning initialization (s = 1).
    Init,
    /// Reasoning expansion (1 < s < S).
    Expand,
    /// Aggregation to the answer (s = S). Vanilla-KD examples are counted here too.
    Aggregate,
}

impl Stage {
    /// 0, 1, 2 for init, expand, aggregate.
    pub fn index(self) -> usize {
        match self {
            Stage::Init => 0,
            Stage::Expand => 1,
            Stage::Aggregate => 2,
        }
    }

    /// The stage names as they appear in records.
    pub const NAMES: [&'static str; 3] = ["init", "expand", "aggregate"];

    /// Parses a record's `stage` field.
    pub fn parse(s: &str) -> Option<Stage> {
        match s {
            "init" => Some(Stage::Init),
            "expand" => Some(Stage::Expand),
            "aggregate" | "vanilla" => Some(Stage::Aggregate),
            _ => None,
        }
    }
}

/// How the stage losses are combined.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum LossMode {
    /// σ-weighted: `Σ_j exp(-2 s_j)/2 · L_j + s_j` (the default).
    Steper,
    /// `(L_init + L_exp + L_agg) / 3` over the stages present.
    Uniform,
    /// Vanilla-KD: one example per question, one loss term.
    Vanilla,
}

/// One training example: token ids of the rendered prompt and of the target (ending with EOS).
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    /// The stage the example teaches.
    pub stage: Stage,
    /// Prompt tokens (no loss).
    pub prompt: Vec<u32>,
    /// Target tokens (loss), EOS included.
    pub target: Vec<u32>,
}

impl Example {
    /// Length of the model input (`prompt ++ target` minus the last token).
    pub fn input_len(&self) -> usize {
        self.prompt.len() + self.target.len() - 1
    }
}
