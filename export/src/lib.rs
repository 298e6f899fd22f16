//! `steper-export`: a STEPER checkpoint (HF-style directory) to a decoder ONNX graph with a KV
//! cache, runnable by ONNX Runtime (CPU, CUDA, TensorRT), tract and onnxruntime-genai.
//!
//! - [`graph::build_decoder`]: the graph (standard ONNX operators only, Optimum I/O names).
//! - [`export`]: the export directory: `model.onnx` (+ `model.onnx.data` when over 2 GB),
//!   `tokenizer.json`, `steper.json` (the runtime [`Manifest`]) and `genai_config.json`.
//! - [`quant`]: block-wise weight quantization (`--quantize int4|int8`, symmetric or with zero
//!   points), the one place where weights are quantized and dequantized (graph and verification
//!   reference).
//! - [`verify::verify`]: runs the export on the runtime backends against the candle model.
//!
//! ```no_run
//! use steper_export::{export, ExportOptions};
//! let report = export(std::path::Path::new("ckpt"), std::path::Path::new("out"), &ExportOptions::default())?;
//! println!("{}", report.model_file.display());
//! # Ok::<(), steper_export::Error>(())
//! ```
#![warn(missing_docs)]

pub mod error;
pub mod files;
pub mod graph;
pub mod onnx;
pub mod quant;
pub mod verify;

use std::path::{Path, PathBuf};

use prost::Message;
use serde::Serialize;
use tract_onnx::pb::{tensor_proto::DataLocation, ModelProto, StringStringEntryProto};

pub use error::{Error, Result};
pub use onnx::Elem;
pub use quant::{QuantBits, QuantOptions, QuantTarget, ZeroPoints};
pub use steper_runtime::manifest::AttentionOp;
pub use steper_runtime::Manifest;

/// File name of the ONNX graph in an export directory.
pub const MODEL_FILE: &str = "model.onnx";
/// File name of the external weights, when used.
pub const EXTERNAL_DATA_FILE: &str = "model.onnx.data";
/// Protobuf's hard limit on one message; above it weights go to [`EXTERNAL_DATA_FILE`].
pub const PROTOBUF_LIMIT: usize = 2_000_000_000;

/// Weight precision of an export.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ExportDtype {
    /// f32 everywhere.
    Fp32,
    /// fp16 weights, matmuls and KV cache; norms, softmax, residual stream and logits in f32.
    Fp16,
}

impl ExportDtype {
    /// `fp32` / `fp16`.
    pub fn as_str(self) -> &'static str {
        match self {
            ExportDtype::Fp32 => "fp32",
            ExportDtype::Fp16 => "fp16",
        }
    }

    /// The ONNX element type of weights and cache.
    pub fn elem(self) -> Elem {
        match self {
            ExportDtype::Fp32 => Elem::F32,
            ExportDtype::Fp16 => Elem::F16,
        }
    }
}

impl std::str::FromStr for ExportDtype {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "fp32" | "f32" | "float32" => Ok(ExportDtype::Fp32),
            "fp16" | "f16" | "float16" => Ok(ExportDtype::Fp16),
            _ => Err(Error::Option {
                option: "--dtype",
                expected: "fp32 or fp16".into(),
                got: s.into(),
            }),
        }
    }
}

/// Where the weights go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExternalData {
    /// Inline below [`PROTOBUF_LIMIT`], external above.
    Auto,
    /// Always in [`EXTERNAL_DATA_FILE`].
    Always,
}

/// Options of [`export`].
#[derive(Debug, Clone)]
pub struct ExportOptions {
    /// Weight precision.
    pub dtype: ExportDtype,
    /// ONNX opset (17 or 18; [`graph::PORTABLE_OPSET`] for a `portable` quantization).
    pub opset: i64,
    /// Inline or external weights.
    pub external_data: ExternalData,
    /// Weight quantization of the linear layers (`None`: float weights of `dtype`).
    pub quantize: Option<QuantOptions>,
    /// Attention form: standard operators (every backend) or ONNX Runtime's
    /// `GroupQueryAttention` contrib operator (ONNX Runtime only, fp32 activations).
    pub attention: AttentionOp,
    /// How the student's step prompts are laid out (recorded in `steper.json`); `chat` needs the
    /// checkpoint's chat template (`tokenizer_config.json` or `chat_template.jinja`), which is
    /// copied beside the model.
    pub prompt_format: steper_runtime::prompt::PromptFormat,
    /// The framework the student was trained for (recorded in `steper.json`'s `loop`; the
    /// runtime's loop runs it unless told otherwise).
    pub framework: steper_runtime::Framework,
}

impl Default for ExportOptions {
    fn default() -> Self {
        ExportOptions {
            dtype: ExportDtype::Fp32,
            opset: 17,
            external_data: ExternalData::Auto,
            quantize: None,
            attention: AttentionOp::Standard,
            prompt_format: Default::default(),
            framework: Default::default(),
        }
    }
}

impl ExportOptions {
    /// fp32 activations with weights quantized by `q`, at the opset its target needs (17, or
    /// [`graph::PORTABLE_OPSET`] for `portable`).
    pub fn quantized(q: QuantOptions) -> Self {
        ExportOptions {
            opset: if q.target == QuantTarget::Portable {
                graph::PORTABLE_OPSET
            } else {
                17
            },
            quantize: Some(q),
            ..Default::default()
        }
    }
}

/// What [`export`] wrote.
#[derive(Debug, Clone, Serialize)]
pub struct ExportReport {
    /// The export directory.
    pub out: PathBuf,
    /// `model.onnx`.
    pub model_file: PathBuf,
    /// `model.onnx.data`, when weights are external.
    pub external_data: Option<PathBuf>,
    /// Size of the graph file in bytes.
    pub model_bytes: u64,
    /// Bytes of initializers in total.
    pub weight_bytes: u64,
    /// Graph nodes.
    pub nodes: usize,
    /// Opset written.
    pub opset: i64,
    /// IR version written.
    pub ir_version: i64,
    /// `fp32` or `fp16` (the activation dtype; see `quantization` for the weights).
    pub dtype: ExportDtype,
    /// The weight quantization written, if any.
    pub quantization: Option<steper_runtime::manifest::WeightQuantization>,
    /// The attention form written.
    pub attention: AttentionOp,
    /// Whether a tokenizer was copied.
    pub tokenizer: bool,
}

/// Exports the checkpoint `checkpoint` into the directory `out` (created if needed; files in it
/// are replaced one by one, each atomically).
pub fn export(checkpoint: &Path, out: &Path, opts: &ExportOptions) -> Result<ExportReport> {
    export_with_calibration(checkpoint, out, opts, None)
}

/// [`export`], with the quantized weights chosen by GPTQ ([`quant::gptq`]) from the Hessians of
/// the calibration directory `calibration` (`steper-calibrate --hessians` on this checkpoint's
/// fp32 export) when given. A calibration needs `opts.quantize`; a directory made for another
/// model ([`Error::Calibration`]) or lacking a quantized weight's Hessian
/// ([`Error::MissingHessian`]) is refused before anything is written.
pub fn export_with_calibration(
    checkpoint: &Path,
    out: &Path,
    opts: &ExportOptions,
    calibration: Option<&Path>,
) -> Result<ExportReport> {
    if let (Some(dir), None) = (calibration, &opts.quantize) {
        return Err(Error::Option {
            option: "--calibration",
            expected: "--quantize int4|int8 beside it (the calibration Hessians drive GPTQ)".into(),
            got: dir.display().to_string(),
        });
    }
    let ck = steper_models::Checkpoint::load(
        checkpoint,
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    )?;
    let cfg = &ck.config;
    let gptq_opts = quant::gptq::GptqOptions::default();
    let hessians = match (calibration, &opts.quantize) {
        (Some(dir), Some(q)) => {
            q.check()?;
            let needed = quant::quantized_weights(cfg, q);
            Some(quant::hessians::Hessians::load_for(
                dir,
                cfg,
                &ck.weights,
                &needed,
            )?)
        }
        _ => None,
    };
    // The codes are computed once, before the graph reads them (GPTQ's, or round-to-nearest
    // with each layer's width decided once).
    let prequantized = match (&hessians, &opts.quantize) {
        (Some(h), Some(q)) => Some(quant::quantize_all(
            cfg,
            &ck.weights,
            q,
            &quant::Quantizer::Gptq {
                hessians: h,
                opts: gptq_opts,
            },
        )?),
        (None, Some(q)) => {
            q.check()?;
            Some(quant::quantize_all(
                cfg,
                &ck.weights,
                q,
                &quant::Quantizer::RoundToNearest,
            )?)
        }
        _ => None,
    };
    let pre;
    let source: &dyn graph::WeightSource = match &prequantized {
        Some(map) => {
            pre = quant::PreQuantized {
                weights: &ck.weights,
                quantized: map,
            };
            &pre
        }
        None => &ck.weights,
    };
    let model = graph::build_decoder(
        cfg,
        source,
        graph::GraphOptions {
            dtype: opts.dtype.elem(),
            opset: opts.opset,
            quant: opts.quantize,
            attention: opts.attention,
        },
    )?;
    let quantization = opts.quantize.map(|q| {
        let mut r = q.record(quant::quantized_weights(cfg, &q).len());
        if hessians.is_some() {
            r.method = Some("gptq".into());
            r.damp = Some(gptq_opts.damp);
        }
        r
    });
    // Everything is written into a staging directory beside `out` and swapped in whole, so a
    // run killed half-way leaves the previous export intact (files of `out` the export does not
    // write, e.g. engine caches, are carried over; a stale external-data file is not).
    let stage = steper_fsutil::StagingDir::new(out, steper_fsutil::Existing::Merge)?;
    let dir = stage.path().to_path_buf();
    let nodes = model.graph.as_ref().map(|g| g.node.len()).unwrap_or(0);
    let (model_bytes, weight_bytes, external) =
        write_model(model, &dir.join(MODEL_FILE), opts.external_data)?;

    let tok_src = checkpoint.join(steper_models::weights::TOKENIZER_FILE);
    let tokenizer = tok_src.is_file();
    if tokenizer {
        let bytes = std::fs::read(&tok_src).map_err(|e| Error::io(&tok_src, e))?;
        steper_fsutil::write_atomic(&dir.join(files::TOKENIZER_FILE), &bytes)?;
        files::write_tokenizer_config(checkpoint, &dir)?;
    }
    let mut manifest = files::manifest(cfg, opts.dtype);
    // Every end id: config.json's and generation_config.json's (Llama-3.x lists several).
    manifest.eos_token_ids = ck.eos_ids();
    manifest.quantization = quantization.clone();
    manifest.graph.attention = opts.attention;
    manifest.prompt_format = opts.prompt_format;
    manifest.loop_defaults.framework = opts.framework;
    // A chat-format export must carry a template that renders.
    steper_runtime::prompt::PromptLayout::load(opts.prompt_format, &dir)?;
    manifest.save(&dir.join(steper_runtime::manifest::MANIFEST_FILE))?;
    let mut genai = files::genai_config(cfg, opts.quantize.as_ref());
    if manifest.eos_token_ids.len() > 1 {
        genai["model"]["eos_token_id"] = serde_json::json!(manifest.eos_token_ids);
    }
    // A GroupQueryAttention graph appends to its cache in place when past and present are one
    // buffer: onnxruntime-genai then preallocates `max_length` positions and copies nothing
    // (its own model builder does the same for GQA models). With separate buffers the op copies
    // the whole cache every token: genai decoded our int4 GQA export 1.7× slower at a
    // 1,024-token context (docs/results/2026-12-07-decode-vs-genai.md).
    genai["search"]["past_present_share_buffer"] = serde_json::json!(!opts.attention.is_standard());
    steper_fsutil::write_atomic(
        &dir.join(files::GENAI_CONFIG_FILE),
        serde_json::to_string_pretty(&genai)?.as_bytes(),
    )?;
    let drop: &[&str] = if external.is_some() {
        &[]
    } else {
        &[EXTERNAL_DATA_FILE]
    };
    stage.merge(drop)?;
    let external = external.map(|_| out.join(EXTERNAL_DATA_FILE));
    Ok(ExportReport {
        out: out.to_path_buf(),
        model_file: out.join(MODEL_FILE),
        external_data: external,
        model_bytes,
        weight_bytes,
        nodes,
        opset: opts.opset,
        ir_version: graph::ir_version(opts.opset),
        dtype: opts.dtype,
        quantization,
        attention: opts.attention,
        tokenizer,
    })
}

/// Writes `model` to `path` (atomically), moving initializers to `model.onnx.data` beside it
/// when the graph would exceed [`PROTOBUF_LIMIT`] or when asked. Returns (graph bytes, weight
/// bytes, external data path).
pub fn write_model(
    mut model: ModelProto,
    path: &Path,
    mode: ExternalData,
) -> Result<(u64, u64, Option<PathBuf>)> {
    let graph = model
        .graph
        .as_mut()
        .ok_or_else(|| Error::Unsupported("model without graph".into()))?;
    let weight_bytes: usize = graph.initializer.iter().map(|t| t.raw_data.len()).sum();
    let external = mode == ExternalData::Always || weight_bytes + (1 << 20) > PROTOBUF_LIMIT;
    let mut ext_path = None;
    if external {
        let data_path = path.with_file_name(EXTERNAL_DATA_FILE);
        let mut blobs: Vec<Vec<u8>> = Vec::new();
        let mut offset = 0usize;
        for t in graph.initializer.iter_mut() {
            if t.raw_data.len() < 1024 {
                continue;
            }
            // Offsets aligned to 4 KiB so ONNX Runtime can memory-map them.
            let pad = (4096 - offset % 4096) % 4096;
            if pad > 0 {
                blobs.push(vec![0u8; pad]);
                offset += pad;
            }
            let raw = std::mem::take(&mut t.raw_data);
            let len = raw.len();
            t.data_location = Some(DataLocation::External as i32);
            t.external_data = vec![
                kv("location", EXTERNAL_DATA_FILE),
                kv("offset", &offset.to_string()),
                kv("length", &len.to_string()),
            ];
            offset += len;
            blobs.push(raw);
        }
        steper_fsutil::write_atomic_with(&data_path, |f| {
            use std::io::Write;
            for b in &blobs {
                f.write_all(b)?;
            }
            Ok(())
        })?;
        ext_path = Some(data_path);
    }
    let bytes = model.encode_to_vec();
    steper_fsutil::write_atomic(path, &bytes)?;
    if !external {
        let stale = path.with_file_name(EXTERNAL_DATA_FILE);
        if stale.exists() {
            std::fs::remove_file(&stale).map_err(|e| Error::io(&stale, e))?;
        }
    }
    Ok((bytes.len() as u64, weight_bytes as u64, ext_path))
}

fn kv(k: &str, v: &str) -> StringStringEntryProto {
    StringStringEntryProto {
        key: k.into(),
        value: v.into(),
    }
}
