//! `steper-calibrate`: INT8 calibration of a STEPER export (see the library docs).

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use steper_calibration::pipeline::{
    calibrate, summary_text, CalibrateOptions, DataSource, Progress,
};
use steper_calibration::Method;

/// Calibrates an fp32 steper-export on the prompts of each reasoning step and writes
/// calibration.json, calibration.cache (TensorRT), calibration.flatbuffers (ONNX Runtime
/// TensorRT EP), model.int8.onnx (QDQ) with its steper.json / genai_config.json / tokenizer,
/// and report.json / report.md (int8 vs fp32 agreement and decode speed on ONNX Runtime CPU).
#[derive(Parser)]
#[command(name = "steper-calibrate", version)]
struct Args {
    /// The fp32 export directory (steper.json, model.onnx, tokenizer.json).
    #[arg(long)]
    model: PathBuf,
    /// Step-wise records (stepwise.jsonl) or QA questions (then --index is required).
    #[arg(long)]
    data: PathBuf,
    /// BM25 index directory: run the reasoning loop on the QA questions of --data and
    /// calibrate on the step prompts it produces.
    #[arg(long)]
    index: Option<PathBuf>,
    /// Activation range method: minmax, percentile or entropy (TensorRT's KL method).
    #[arg(long, default_value = "entropy")]
    method: Method,
    /// Percentile of the percentile method.
    #[arg(long, default_value_t = 99.99)]
    percentile: f64,
    /// Calibration prompts (balanced across init / expand / aggregate).
    #[arg(long, default_value_t = 64)]
    samples: usize,
    /// Held-out prompts for the accuracy report (from other questions; 0 to skip).
    #[arg(long, default_value_t = 16)]
    holdout: usize,
    /// Histogram bins per tensor.
    #[arg(long, default_value_t = 2048)]
    bins: usize,
    /// Longest calibration prompt in tokens (also capped by the model's context).
    #[arg(long, default_value_t = 512)]
    max_tokens: usize,
    /// Quantize the vocabulary projection (lm_head) too; it stays float by default.
    #[arg(long)]
    quantize_lm_head: bool,
    /// ONNX Runtime intra-op threads (default: one per core).
    #[arg(long)]
    threads: Option<usize>,
    /// Greedy tokens per held-out prompt for the greedy agreement (0 to skip).
    #[arg(long, default_value_t = 16)]
    greedy_tokens: usize,
    /// Decode benchmark: generated tokens (0 to skip the benchmark).
    #[arg(long, default_value_t = 64)]
    bench_tokens: usize,
    /// Decode benchmark: prompt tokens.
    #[arg(long, default_value_t = 128)]
    bench_prompt_tokens: usize,
    /// Decode benchmark: measured runs (median reported).
    #[arg(long, default_value_t = 3)]
    bench_runs: usize,
    /// Reuse the per-tensor ranges of an earlier run's calibration.json (same model) instead
    /// of collecting them again (e.g. to try another --method).
    #[arg(long)]
    ranges: Option<PathBuf>,
    /// SmoothQuant-style smoothing before quantization, migration strength α in (0, 1]
    /// (e.g. 0.5): each linear layer's input channels are divided by s = max|x|^α /
    /// max|w|^(1-α) and its weight rows multiplied by s (folded into RMSNorm γ or the
    /// producing up_proj where possible). Writes the smoothed fp32 export to
    /// OUT/smoothed-fp32, which the TensorRT tables belong to.
    #[arg(long)]
    smooth_alpha: Option<f32>,
    /// Keep these linear layers in float (comma separated parts of node / weight names, e.g.
    /// `down_proj` or `layers.11.mlp.down_proj`).
    #[arg(long, value_delimiter = ',')]
    keep_float: Vec<String>,
    /// Also sum GPTQ's Hessians (Σ x xᵀ of every linear layer's input) over the calibration
    /// prompts and write them as hessians.safetensors, for `steper-export --quantize int4
    /// --calibration OUT` on the checkpoint this fp32 export was made from.
    #[arg(long)]
    hessians: bool,
    /// Output directory (created; must not be the --model directory).
    #[arg(long)]
    out: PathBuf,
    /// Print the report as JSON instead of the readable summary.
    #[arg(long)]
    json: bool,
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    steper_runtime::backend::set_library_env(None);
    let data = DataSource::detect(&a.data, a.index.as_deref())?;
    let mut o = CalibrateOptions::new(a.model.clone(), data, a.out.clone());
    o.method = a.method;
    o.percentile = a.percentile;
    o.samples = a.samples;
    o.holdout = a.holdout;
    o.bins = a.bins;
    o.max_tokens = a.max_tokens;
    o.quantize_lm_head = a.quantize_lm_head;
    o.threads = a.threads;
    o.greedy_tokens = a.greedy_tokens;
    o.bench_new_tokens = a.bench_tokens;
    o.bench_prompt_tokens = a.bench_prompt_tokens;
    o.bench_runs = a.bench_runs;
    o.ranges = a.ranges.clone();
    o.smooth_alpha = a.smooth_alpha;
    o.keep_float = a.keep_float.clone();
    o.hessians = a.hessians;
    let mut bar: Option<ProgressBar> = None;
    let mut progress = |p: Progress| match p {
        Progress::Phase { name, total } => {
            if let Some(b) = bar.take() {
                b.finish_and_clear();
            }
            let b = if total > 0 {
                ProgressBar::new(total as u64)
            } else {
                ProgressBar::new_spinner()
            };
            b.set_style(
                ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} {elapsed}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            b.set_message(name);
            bar = Some(b);
        }
        Progress::Step => {
            if let Some(b) = &bar {
                b.inc(1);
            }
        }
    };
    let report = calibrate(&o, &mut progress)
        .with_context(|| format!("calibrating {}", a.model.display()))?;
    if let Some(b) = bar.take() {
        b.finish_and_clear();
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", summary_text(&report));
    }
    Ok(())
}
