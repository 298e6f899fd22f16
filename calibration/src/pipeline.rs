//! The whole calibration run: prompts → ranges → tables → QDQ model → report.
//!
//! Files are first written into a staging directory beside `out` (`steper_fsutil`) and moved into place only
//! when every one of them is complete, so a failed run leaves no half-written output behind.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;
use serde_json::json;
use steper_runtime::backend::{load_manifest, load_model, load_tokenizer, model_path};
use steper_runtime::data::{read_jsonl, read_qa, ReadOptions, StepwiseRecord};
use steper_runtime::{BackendKind, OrtOptions};

use crate::collect::{split_prompts, Collector, Prompt};
use crate::graph::{self, QdqOptions, QdqSummary, Target};
use crate::hessian::HessianSum;
use crate::hist::{Method, DEFAULT_BINS, DEFAULT_PERCENTILE};
use crate::report::{self, Agreement, Speed};
use crate::smooth::{self, SmoothOptions, SmoothSummary};
use crate::tables;
use crate::{Error, Result};

/// File names written into the output directory.
pub mod files {
    /// Per-tensor statistics and ranges.
    pub const CALIBRATION_JSON: &str = "calibration.json";
    /// TensorRT's native calibration cache.
    pub const TRT_CACHE: &str = "calibration.cache";
    /// ONNX Runtime's TensorRT-EP calibration table.
    pub const ORT_TABLE: &str = "calibration.flatbuffers";
    /// The QDQ model.
    pub const INT8_MODEL: &str = "model.int8.onnx";
    /// With smoothing: the smoothed fp32 export (model, manifest, tokenizer) the TensorRT
    /// tables belong to.
    pub const SMOOTHED_DIR: &str = "smoothed-fp32";
    /// Machine-readable report.
    pub const REPORT_JSON: &str = "report.json";
    /// Readable report.
    pub const REPORT_MD: &str = "report.md";
    /// With `--hessians`: GPTQ's Hessians, keyed by HF weight name.
    pub const HESSIANS: &str = steper_export::quant::hessians::HESSIANS_FILE;
}

/// Where calibration prompts come from.
#[derive(Debug, Clone)]
pub enum DataSource {
    /// Step-wise records (`stepwise.jsonl`), balanced across the stages.
    Stepwise(PathBuf),
    /// QA questions run through the loop with the fp32 model and this BM25 index; the step-wise
    /// records of each trace are the prompts.
    QaLoop {
        /// The QA file.
        qa: PathBuf,
        /// The index directory.
        index: PathBuf,
    },
}

impl DataSource {
    /// Step-wise records when the first line of `data` has a `stage` field; QA (run with
    /// `index`) otherwise. QA without an index is an error.
    pub fn detect(data: &Path, index: Option<&Path>) -> Result<Self> {
        let text = std::fs::read_to_string(data).map_err(|e| Error::io(data, e))?;
        let first = text.lines().find(|l| !l.trim().is_empty());
        let Some(first) = first else {
            return Err(Error::EmptyCalibration {
                path: data.to_path_buf(),
                reason: "the file has no record".into(),
            });
        };
        let v: serde_json::Value = serde_json::from_str(first).map_err(|e| Error::Table {
            what: data.display().to_string(),
            line: 1,
            message: format!("not JSON: {e}"),
        })?;
        if v.get("stage").is_some() {
            return Ok(DataSource::Stepwise(data.to_path_buf()));
        }
        match index {
            Some(ix) => Ok(DataSource::QaLoop {
                qa: data.to_path_buf(),
                index: ix.to_path_buf(),
            }),
            None => Err(Error::Option {
                option: "--index",
                expected: "an index directory: the data has no `stage` field (QA questions), so the loop must run on them".into(),
                got: "nothing".into(),
            }),
        }
    }

    fn path(&self) -> &Path {
        match self {
            DataSource::Stepwise(p) => p,
            DataSource::QaLoop { qa, .. } => qa,
        }
    }
}

/// Options of [`calibrate`].
#[derive(Debug, Clone)]
pub struct CalibrateOptions {
    /// The fp32 export directory.
    pub model: PathBuf,
    /// Calibration data.
    pub data: DataSource,
    /// Output directory (created; must differ from `model`).
    pub out: PathBuf,
    /// Range method of the activations.
    pub method: Method,
    /// Calibration prompts.
    pub samples: usize,
    /// Held-out prompts for the report (0: no accuracy report).
    pub holdout: usize,
    /// Percentile of [`Method::Percentile`].
    pub percentile: f64,
    /// Histogram bins per tensor.
    pub bins: usize,
    /// Longest calibration prompt in tokens (also capped by the model's context).
    pub max_tokens: usize,
    /// Quantize the vocabulary projection too.
    pub quantize_lm_head: bool,
    /// ONNX Runtime intra-op threads.
    pub threads: Option<usize>,
    /// Greedy tokens per held-out prompt for the greedy agreement (0: skip).
    pub greedy_tokens: usize,
    /// Decode benchmark: generated tokens (0: skip the benchmark).
    pub bench_new_tokens: usize,
    /// Decode benchmark: prompt tokens.
    pub bench_prompt_tokens: usize,
    /// Decode benchmark: measured runs.
    pub bench_runs: usize,
    /// Reuse the ranges of an earlier run's `calibration.json` (same model) instead of
    /// collecting: re-quantize with another method without running the prompts again.
    pub ranges: Option<PathBuf>,
    /// SmoothQuant-style smoothing of the linear layers' inputs with migration strength α
    /// (see [`crate::smooth`]); `None`: no smoothing.
    pub smooth_alpha: Option<f32>,
    /// Linear layers kept in float: a layer whose node or weight name contains one of these
    /// (e.g. `down_proj`, `layers.11.mlp`) is not quantized. A pattern matching no layer is an
    /// error.
    pub keep_float: Vec<String>,
    /// Also sum GPTQ's Hessians (`Σ x xᵀ` of every linear layer's input) during collection and
    /// write them as [`files::HESSIANS`] (see [`crate::hessian`]); needs the collection pass (not
    /// [`Self::ranges`]).
    pub hessians: bool,
}

impl CalibrateOptions {
    /// Defaults for `model`, `data` and `out`: entropy, 64 samples, 16 held out, 2048 bins,
    /// 512-token prompts, lm_head in float, greedy 16 tokens, a 64-token decode benchmark.
    pub fn new(model: PathBuf, data: DataSource, out: PathBuf) -> Self {
        CalibrateOptions {
            model,
            data,
            out,
            method: Method::Entropy,
            samples: 64,
            holdout: 16,
            percentile: DEFAULT_PERCENTILE,
            bins: DEFAULT_BINS,
            max_tokens: 512,
            quantize_lm_head: false,
            threads: None,
            greedy_tokens: 16,
            bench_new_tokens: 64,
            bench_prompt_tokens: 128,
            bench_runs: 3,
            ranges: None,
            smooth_alpha: None,
            keep_float: Vec::new(),
            hessians: false,
        }
    }
}

/// Progress events of [`calibrate`].
#[derive(Debug, Clone, PartialEq)]
pub enum Progress {
    /// A phase starts (`total` steps, 0 when unknown).
    Phase {
        /// What runs.
        name: &'static str,
        /// Steps of the phase.
        total: usize,
    },
    /// One more step of the phase is done.
    Step,
}

/// One tensor's range in `calibration.json`.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct TensorRange {
    /// Tensor name.
    pub name: String,
    /// Chosen amax.
    pub amax: f32,
    /// int8 scale `amax / 127`.
    pub scale: f32,
    /// Smallest value seen.
    pub min: f32,
    /// Largest value seen.
    pub max: f32,
    /// amax by each method (for comparison).
    pub minmax: f32,
    /// Percentile amax.
    pub percentile: f32,
    /// Entropy amax.
    pub entropy: f32,
    /// Values seen.
    pub count: u64,
    /// Non-finite values seen.
    pub nonfinite: u64,
    /// Per-channel max |x| (last dimension), for the inputs of the linear layers: what
    /// smoothing needs (absent in files made before it existed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel_amax: Option<Vec<f32>>,
}

/// What [`calibrate`] did and measured (`report.json`).
#[derive(Debug, Clone, Serialize)]
pub struct CalibrationReport {
    /// Output directory.
    pub out: PathBuf,
    /// The fp32 export.
    pub model: PathBuf,
    /// Range method.
    pub method: Method,
    /// Percentile used by the percentile method.
    pub percentile: f64,
    /// Calibration prompts used, by stage.
    pub samples: HashMap<String, usize>,
    /// Calibration prompt tokens in total.
    pub sample_tokens: usize,
    /// Held-out prompts.
    pub holdout: usize,
    /// Tensors with a range.
    pub tensors: usize,
    /// The QDQ graph.
    pub qdq: QdqSummary,
    /// Whether lm_head is quantized.
    pub quantize_lm_head: bool,
    /// Smoothing done before quantization (`None`: none).
    pub smoothing: Option<SmoothSummary>,
    /// `--keep-float` patterns (layers left in float).
    pub keep_float: Vec<String>,
    /// Next-token agreement int8 vs fp32 on held-out prompts (every prompt position).
    pub agreement: Option<Agreement>,
    /// Greedy agreement on held-out prompts: fraction of fp32-greedy tokens int8 also picks.
    pub greedy_agreement: Option<f64>,
    /// Positions of the greedy agreement.
    pub greedy_positions: usize,
    /// fp32 speed on ONNX Runtime CPU.
    pub speed_fp32: Option<Speed>,
    /// int8 speed on ONNX Runtime CPU.
    pub speed_int8: Option<Speed>,
    /// int8 / fp32 decode tokens/s.
    pub decode_speedup: Option<f64>,
    /// Files written.
    pub files: Vec<PathBuf>,
    /// Seconds of collection.
    pub collect_seconds: f64,
    /// Seconds in total.
    pub seconds: f64,
}

/// ONNX Runtime's defaults, with `threads` intra-op threads when given.
fn ort_options(threads: Option<usize>) -> OrtOptions {
    let mut o = OrtOptions::default();
    o.intra_threads = threads;
    o
}

/// Writes `bytes` to `path` atomically (`steper_fsutil`).
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    Ok(steper_fsutil::write_atomic(path, bytes)?)
}

/// Copies the files of `names` that exist in `src` into `dst` (atomically, each).
fn copy_present(src: &Path, dst: &Path, names: &[&str]) -> Result<()> {
    for name in names {
        let from = src.join(name);
        if from.is_file() {
            let bytes = std::fs::read(&from).map_err(|e| Error::io(&from, e))?;
            write_atomic(&dst.join(name), &bytes)?;
        }
    }
    Ok(())
}

fn load_records(
    src: &DataSource,
    opts: &CalibrateOptions,
    progress: &mut dyn FnMut(Progress),
) -> Result<Vec<StepwiseRecord>> {
    match src {
        DataSource::Stepwise(p) => {
            Ok(read_jsonl::<StepwiseRecord>(p, ReadOptions::default())?.rows)
        }
        DataSource::QaLoop { qa, index } => {
            let questions = read_qa(qa, ReadOptions::default())?.rows;
            let engine = steper_runtime::Engine::builder()
                .model_dir(&opts.model)
                .backend(BackendKind::Ort(ort_options(opts.threads)))
                .index(index)
                .build()?;
            let ro = engine.default_options();
            let want = opts.samples + opts.holdout;
            progress(Progress::Phase {
                name: "running the loop on QA questions",
                total: 0,
            });
            let mut records = Vec::new();
            for q in &questions {
                if records.len() >= want * 2 {
                    break;
                }
                let r = engine.reason(&q.question, &ro)?;
                records.extend(r.stepwise_records(&q.id, &q.answers, "fp32-loop"));
                progress(Progress::Step);
            }
            Ok(records)
        }
    }
}

/// Prefills the calibration prompts through the augmented graph (written into `scratch`, then
/// removed) and returns every tensor's statistics as ranges (`amax` set by the caller), and the
/// Hessian sums of the tensors of `hessian_inputs`.
#[allow(clippy::too_many_arguments)]
fn collect_ranges(
    model: &tract_onnx::pb::ModelProto,
    tensors: &[String],
    per_channel: &[String],
    hessian_inputs: &[String],
    manifest: &steper_runtime::Manifest,
    calib: &[Prompt],
    opts: &CalibrateOptions,
    scratch: &Path,
    progress: &mut dyn FnMut(Progress),
) -> Result<(Vec<TensorRange>, HashMap<String, HessianSum>)> {
    let aug = graph::augment(model, tensors);
    let aug_path = scratch.join("augmented.onnx");
    steper_export::write_model(aug, &aug_path, steper_export::ExternalData::Auto)?;
    let mut collector = Collector::new(
        &aug_path,
        manifest,
        tensors.to_vec(),
        per_channel,
        opts.bins,
        opts.threads,
    )?
    .with_hessians(hessian_inputs);
    progress(Progress::Phase {
        name: "collecting ranges",
        total: calib.len(),
    });
    for p in calib {
        collector.observe(&p.ids)?;
        progress(Progress::Step);
    }
    let _ = std::fs::remove_file(&aug_path);
    let channels = std::mem::take(&mut collector.channels);
    let sums: HashMap<String, HessianSum> = tensors
        .iter()
        .zip(std::mem::take(&mut collector.hessians))
        .filter_map(|(n, h)| h.map(|h| (n.clone(), h)))
        .collect();
    let ranges = tensors
        .iter()
        .zip(&collector.stats)
        .zip(channels)
        .map(|((name, s), channel_amax)| TensorRange {
            name: name.clone(),
            amax: 0.0,
            scale: 0.0,
            min: s.min,
            max: s.max,
            minmax: s.amax(Method::MinMax, opts.percentile),
            percentile: s.amax(Method::Percentile, opts.percentile),
            entropy: s.amax(Method::Entropy, opts.percentile),
            count: s.count,
            nonfinite: s.nonfinite,
            channel_amax,
        })
        .collect();
    Ok((ranges, sums))
}

/// Reads the per-method ranges of an earlier run's `calibration.json`; every tensor of
/// `tensors` must be there (the same model).
pub fn load_ranges(path: &Path, tensors: &[String]) -> Result<Vec<TensorRange>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let v: serde_json::Value = serde_json::from_str(&text)?;
    let rows = v["tensors"].as_array().ok_or_else(|| Error::Table {
        what: path.display().to_string(),
        line: 0,
        message: "no `tensors` array (not a calibration.json)".into(),
    })?;
    let mut by_name: HashMap<String, TensorRange> = HashMap::new();
    for r in rows {
        let t: TensorRange = serde_json::from_value(r.clone())?;
        by_name.insert(t.name.clone(), t);
    }
    tensors
        .iter()
        .map(|n| {
            by_name.remove(n).ok_or_else(|| Error::Table {
                what: path.display().to_string(),
                line: 0,
                message: format!("no range for tensor `{n}` (ranges of another model?)"),
            })
        })
        .collect()
}

/// Runs calibration (see the crate docs); `progress` receives phase and step events.
pub fn calibrate(
    opts: &CalibrateOptions,
    progress: &mut dyn FnMut(Progress),
) -> Result<CalibrationReport> {
    let t_all = Instant::now();
    if opts.samples == 0 {
        return Err(Error::EmptyCalibration {
            path: opts.data.path().to_path_buf(),
            reason: "samples is 0".into(),
        });
    }
    // Inputs first, so bad ones fail before anything is created.
    let manifest = load_manifest(&opts.model)?;
    let tokenizer = load_tokenizer(&opts.model, &manifest)?;
    let mpath = model_path(&opts.model, &manifest)?;
    let model = graph::load_onnx(&mpath)?;
    let vocab = manifest.graph.vocab_size;
    let targets = graph::targets(&model, vocab, &mpath)?;
    let tensors = graph::calibration_tensors(&model);
    let smooth_opts = opts.smooth_alpha.map(SmoothOptions::new).transpose()?;
    let qdq_opts = QdqOptions {
        quantize_lm_head: opts.quantize_lm_head,
        keep_float: opts.keep_float.clone(),
    };
    qdq_opts.check_keep_float(&targets)?;
    let chosen: Vec<&Target> = targets.iter().filter(|t| qdq_opts.quantizes(t)).collect();
    let per_channel: Vec<String> = {
        let mut v: Vec<String> = targets.iter().map(|t| t.activation.clone()).collect();
        v.dedup();
        v
    };

    // The output directory: created, writable, not the model's own.
    std::fs::create_dir_all(&opts.out).map_err(|e| Error::io(&opts.out, e))?;
    let same = match (opts.out.canonicalize(), opts.model.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    };
    if same {
        return Err(Error::Option {
            option: "--out",
            expected: "a directory other than the fp32 export".into(),
            got: opts.out.display().to_string(),
        });
    }
    if let (true, Some(r)) = (opts.hessians, &opts.ranges) {
        return Err(Error::Option {
            option: "--hessians",
            expected: "a collection pass (the Hessians are summed over the prompts): drop --ranges"
                .into(),
            got: format!("--ranges {}", r.display()),
        });
    }
    let staging = steper_fsutil::StagingDir::new(&opts.out, steper_fsutil::Existing::Merge)?;

    let records = load_records(&opts.data, opts, progress)?;
    let budget = opts.max_tokens.min(manifest.context_length).max(1);
    // The prompts in the layout the model was trained with (steper.json's `prompt_format`); the
    // template's BOS is left to the tokenizer when it adds one, as the runtime does.
    let mut layout =
        steper_runtime::prompt::PromptLayout::load(manifest.prompt_format, &opts.model)?;
    if let steper_runtime::prompt::PromptLayout::Chat(t) = &layout {
        let adds_bos = tokenizer
            .encode("", true)
            .map(|e| !e.get_ids().is_empty())
            .unwrap_or(false);
        layout = steper_runtime::prompt::PromptLayout::chat(
            (**t).clone().with_leading_bos_stripped(adds_bos),
        );
    }
    let (calib, held) = split_prompts(
        &layout,
        &records,
        opts.samples,
        opts.holdout,
        &tokenizer,
        manifest.loop_defaults.passage_word_cap,
        budget,
    )?;
    if calib.is_empty() {
        return Err(Error::EmptyCalibration {
            path: opts.data.path().to_path_buf(),
            reason: format!("{} records gave no prompt", records.len()),
        });
    }

    let t_collect = Instant::now();
    let hessian_inputs: &[String] = if opts.hessians { &per_channel } else { &[] };
    let (mut ranges, sums) = match &opts.ranges {
        Some(path) => (load_ranges(path, &tensors)?, HashMap::new()),
        None => collect_ranges(
            &model,
            &tensors,
            &per_channel,
            hessian_inputs,
            &manifest,
            &calib,
            opts,
            staging.path(),
            progress,
        )?,
    };
    if opts.hessians {
        let tokens: usize = calib.iter().map(|p| p.ids.len()).sum();
        let h = crate::hessian::hessians(&model, &targets, &sums, tokens as u64, &mpath)?;
        write_atomic(&staging.path().join(files::HESSIANS), &h.to_bytes()?)?;
    }
    let collect_seconds = t_collect.elapsed().as_secs_f64();
    for r in ranges.iter_mut() {
        r.amax = match opts.method {
            Method::MinMax => r.minmax,
            Method::Percentile => r.percentile,
            Method::Entropy => r.entropy,
        };
        r.scale = tables::int8_scale(r.amax);
    }
    let mut amax_list: Vec<(String, f32)> =
        ranges.iter().map(|r| (r.name.clone(), r.amax)).collect();
    // Smoothing: the smoothed graph, and the exact ranges of the tensors it changed or made.
    let (model, smoothing) = match &smooth_opts {
        Some(so) => {
            let ch: HashMap<String, Vec<f32>> = ranges
                .iter()
                .filter_map(|r| r.channel_amax.clone().map(|c| (r.name.clone(), c)))
                .collect();
            let sm = smooth::smooth(&model, &chosen, &ch, so, &mpath)?;
            for (name, a) in &sm.amax {
                match amax_list.iter_mut().find(|(n, _)| n == name) {
                    Some(e) => e.1 = *a,
                    None => amax_list.push((name.clone(), *a)),
                }
            }
            (sm.model, Some(sm.summary))
        }
        None => (model, None),
    };
    let amax_map: HashMap<String, f32> = amax_list.iter().cloned().collect();
    let final_targets = graph::targets(&model, vocab, &mpath)?;
    let mut by_stage: HashMap<String, usize> = HashMap::new();
    for p in &calib {
        *by_stage
            .entry(p.source.split('/').nth(1).unwrap_or("?").to_string())
            .or_default() += 1;
    }
    let sample_tokens: usize = calib.iter().map(|p| p.ids.len()).sum();

    // Outputs, staged.
    let stage = |name: &str| staging.path().join(name);
    // With smoothing, the ranges of the tensors smoothing changed or created (also in the
    // tables; `tensors` keeps the collected, unsmoothed statistics).
    let smoothed_ranges: Vec<serde_json::Value> = match &smoothing {
        Some(sm) => sm
            .tensors
            .iter()
            .map(|t| json!({"name": t.reads, "amax": t.amax, "from": t.tensor}))
            .collect(),
        None => Vec::new(),
    };
    let calib_json = json!({
        "format": "steper-calibration",
        "version": 1,
        "model": opts.model,
        "method": opts.method,
        "percentile": opts.percentile,
        "bins": opts.bins,
        "samples": by_stage,
        "sample_tokens": sample_tokens,
        "prompts": calib.iter().map(|p| &p.source).collect::<Vec<_>>(),
        "quantized_activations": final_targets
            .iter()
            .filter(|t| qdq_opts.quantizes(t))
            .map(|t| &t.activation)
            .collect::<Vec<_>>(),
        "keep_float": opts.keep_float,
        "smoothing": smoothing,
        "smoothed_ranges": smoothed_ranges,
        "tensors": ranges,
    });
    write_atomic(
        &stage(files::CALIBRATION_JSON),
        serde_json::to_string_pretty(&calib_json)?.as_bytes(),
    )?;
    // The TensorRT tables leave out the inputs and outputs of `--keep-float` layers (unless a
    // quantized layer shares them): TensorRT runs a tensor without a range in float.
    let float_only: std::collections::HashSet<&str> = {
        let quantized: std::collections::HashSet<&str> = final_targets
            .iter()
            .filter(|t| !qdq_opts.keeps_float(t))
            .flat_map(|t| [t.activation.as_str(), t.output.as_str()])
            .collect();
        final_targets
            .iter()
            .filter(|t| qdq_opts.keeps_float(t))
            .flat_map(|t| [t.activation.as_str(), t.output.as_str()])
            .filter(|n| !quantized.contains(n))
            .collect()
    };
    let table_list: Vec<(String, f32)> = amax_list
        .iter()
        .filter(|(n, _)| !float_only.contains(n.as_str()))
        .cloned()
        .collect();
    let cache = tables::trt_cache(
        tables::TRT_VERSION,
        opts.method.trt_calibrator(),
        &table_list,
    )?;
    write_atomic(&stage(files::TRT_CACHE), cache.as_bytes())?;
    write_atomic(
        &stage(files::ORT_TABLE),
        &tables::ort_trt_table(&table_list)?,
    )?;

    let (qdq, summary) = graph::quantize_qdq(&model, &amax_map, qdq_opts.clone(), vocab, &mpath)?;
    if smoothing.is_some() {
        // The smoothed fp32 export: what the TensorRT tables (and TensorRT's own INT8
        // calibration of it) belong to.
        let dir = stage(files::SMOOTHED_DIR);
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        steper_export::write_model(
            model,
            &dir.join(&manifest.model_file),
            steper_export::ExternalData::Auto,
        )?;
        let mut ms = manifest.clone();
        ms.producer = format!(
            "steper-calibrate {} (SmoothQuant-style smoothing, α {})",
            env!("CARGO_PKG_VERSION"),
            opts.smooth_alpha.unwrap_or_default()
        );
        write_atomic(
            &dir.join(steper_runtime::manifest::MANIFEST_FILE),
            serde_json::to_string_pretty(&ms)?.as_bytes(),
        )?;
        copy_present(
            &opts.model,
            &dir,
            &[
                manifest.tokenizer_file.as_str(),
                "tokenizer_config.json",
                "genai_config.json",
            ],
        )?;
    } else {
        drop(model);
    }
    steper_export::write_model(
        qdq,
        &stage(files::INT8_MODEL),
        steper_export::ExternalData::Auto,
    )?;
    let mut m8 = manifest.clone();
    m8.dtype = "int8".into();
    m8.model_file = files::INT8_MODEL.into();
    m8.producer = format!(
        "steper-calibrate {} ({})",
        env!("CARGO_PKG_VERSION"),
        opts.method.as_str()
    );
    write_atomic(
        &stage(steper_runtime::manifest::MANIFEST_FILE),
        serde_json::to_string_pretty(&m8)?.as_bytes(),
    )?;
    copy_present(
        &opts.model,
        staging.path(),
        &[manifest.tokenizer_file.as_str(), "tokenizer_config.json"],
    )?;
    let genai = opts.model.join("genai_config.json");
    if genai.is_file() {
        let text = std::fs::read_to_string(&genai).map_err(|e| Error::io(&genai, e))?;
        let v = crate::genai::int8_genai_config(&text, &genai, files::INT8_MODEL)?;
        write_atomic(
            &stage("genai_config.json"),
            serde_json::to_string_pretty(&v)?.as_bytes(),
        )?;
    }
    // Everything is complete: swap it into place whole (other files of --out are kept).
    let written = staging.merge(&[])?;

    // Report: int8 vs fp32 on ONNX Runtime CPU.
    let backend = BackendKind::Ort(ort_options(opts.threads));
    let mut report = CalibrationReport {
        out: opts.out.clone(),
        model: opts.model.clone(),
        method: opts.method,
        percentile: opts.percentile,
        samples: by_stage,
        sample_tokens,
        holdout: held.len(),
        tensors: ranges.len(),
        qdq: summary,
        quantize_lm_head: opts.quantize_lm_head,
        smoothing,
        keep_float: opts.keep_float.clone(),
        agreement: None,
        greedy_agreement: None,
        greedy_positions: 0,
        speed_fp32: None,
        speed_int8: None,
        decode_speedup: None,
        files: written,
        collect_seconds,
        seconds: 0.0,
    };
    if !held.is_empty() || opts.bench_new_tokens > 0 {
        let fp = load_model(&opts.model, &backend)?;
        let q8 = load_model(&opts.out, &backend)?;
        let held_ids: Vec<Vec<u32>> = held.iter().map(|p: &Prompt| p.ids.clone()).collect();
        if !held_ids.is_empty() {
            progress(Progress::Phase {
                name: "comparing int8 with fp32",
                total: 0,
            });
            report.agreement = Some(report::agreement(
                &*fp.generator,
                &*q8.generator,
                &held_ids,
            )?);
            if opts.greedy_tokens > 0 {
                let room = manifest
                    .context_length
                    .saturating_sub(opts.greedy_tokens + 1);
                let short: Vec<Vec<u32>> = held_ids
                    .iter()
                    .map(|p| p[..p.len().min(room)].to_vec())
                    .collect();
                let (g, n) = report::greedy_agreement(
                    &*fp.generator,
                    &*q8.generator,
                    &short,
                    opts.greedy_tokens,
                )?;
                report.greedy_agreement = Some(g);
                report.greedy_positions = n;
            }
        }
        if opts.bench_new_tokens > 0 {
            progress(Progress::Phase {
                name: "decode benchmark",
                total: 0,
            });
            let n = opts
                .bench_prompt_tokens
                .min(
                    manifest
                        .context_length
                        .saturating_sub(opts.bench_new_tokens + 1),
                )
                .max(1);
            let mut prompt: Vec<u32> = calib
                .iter()
                .flat_map(|p| p.ids.iter().copied())
                .take(n)
                .collect();
            while prompt.len() < n {
                prompt.push((prompt.len() as u32 * 7919 + 17) % vocab as u32);
            }
            let a = report::bench_decode(
                &*fp.generator,
                &prompt,
                opts.bench_new_tokens,
                opts.bench_runs,
            )?;
            let b = report::bench_decode(
                &*q8.generator,
                &prompt,
                opts.bench_new_tokens,
                opts.bench_runs,
            )?;
            report.decode_speedup = Some(b.decode_tok_s / a.decode_tok_s.max(1e-9));
            report.speed_fp32 = Some(a);
            report.speed_int8 = Some(b);
        }
    }
    report.seconds = t_all.elapsed().as_secs_f64();
    let rj = opts.out.join(files::REPORT_JSON);
    write_atomic(&rj, serde_json::to_string_pretty(&report)?.as_bytes())?;
    let rm = opts.out.join(files::REPORT_MD);
    write_atomic(&rm, summary_text(&report).as_bytes())?;
    report.files.push(rj);
    report.files.push(rm);
    Ok(report)
}

/// The readable summary of a report (`report.md`).
pub fn summary_text(r: &CalibrationReport) -> String {
    let mut s = String::new();
    let pct = |x: f64| format!("{:.2}%", 100.0 * x);
    s.push_str("# INT8 calibration report\n\n");
    s.push_str(&format!(
        "- model: {}\n- method: {}",
        r.model.display(),
        r.method.as_str()
    ));
    if r.method == Method::Percentile {
        s.push_str(&format!(" ({})", r.percentile));
    }
    let mut stages: Vec<_> = r.samples.iter().collect();
    stages.sort();
    s.push_str(&format!(
        "\n- calibration prompts: {} ({} tokens; {})\n- tensors with a range: {}\n- QDQ: {} quantized linear layers, {} in float (lm_head quantized: {}), {} Q / {} DQ nodes\n",
        r.samples.values().sum::<usize>(),
        r.sample_tokens,
        stages.iter().map(|(k, v)| format!("{k} {v}")).collect::<Vec<_>>().join(", "),
        r.tensors,
        r.qdq.quantized_linears,
        r.qdq.float_linears,
        r.quantize_lm_head,
        r.qdq.quantize_nodes,
        r.qdq.dequantize_nodes
    ));
    if !r.keep_float.is_empty() {
        s.push_str(&format!("- kept in float: {}\n", r.keep_float.join(", ")));
    }
    if let Some(sm) = &r.smoothing {
        let mut before: Vec<f32> = sm.tensors.iter().map(|t| t.spread_before).collect();
        let mut after: Vec<f32> = sm.tensors.iter().map(|t| t.spread_after).collect();
        before.sort_by(|a, b| a.total_cmp(b));
        after.sort_by(|a, b| a.total_cmp(b));
        let worst = |v: &[f32]| v.last().copied().unwrap_or(0.0);
        let count = |w: &str| {
            sm.tensors
                .iter()
                .filter(|t| t.folded_into.starts_with(w))
                .count()
        };
        s.push_str(&format!(
            "- smoothing (α {}): {} activation tensors ({} into RMSNorm γ, {} into the producing linear layer, {} through an inserted Mul), {} skipped; channel max / median: worst {:.1} → {:.1}\n",
            sm.alpha,
            sm.tensors.len(),
            count("norm"),
            count("linear"),
            count("mul"),
            sm.skipped.len(),
            worst(&before),
            worst(&after)
        ));
    }
    match &r.agreement {
        Some(a) => s.push_str(&format!(
            "- held-out prompts: {} ({} positions): top-1 agreement {}, mean KL {:.5} nats (max {:.4})\n",
            r.holdout,
            a.positions,
            pct(a.top1),
            a.mean_kl,
            a.max_kl
        )),
        None => s.push_str("- no held-out prompts: accuracy not measured\n"),
    }
    if let Some(g) = r.greedy_agreement {
        s.push_str(&format!(
            "- greedy agreement: {} of {} fp32-greedy tokens\n",
            pct(g),
            r.greedy_positions
        ));
    }
    if let (Some(a), Some(b), Some(x)) = (&r.speed_fp32, &r.speed_int8, r.decode_speedup) {
        s.push_str(&format!(
            "- ONNX Runtime CPU decode: fp32 {:.1} tok/s, int8 {:.1} tok/s → {:.2}× (prefill {:.1} vs {:.1} tok/s; {} prompt + {} new tokens, median of {})\n",
            a.decode_tok_s, b.decode_tok_s, x, a.prefill_tok_s, b.prefill_tok_s, a.prompt_tokens, a.new_tokens, a.runs
        ));
    }
    s
}
