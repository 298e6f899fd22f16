//! The ONNX Runtime backend (`ort` 2.x, library loaded at run time).
//!
//! The library is found through `ORT_DYLIB_PATH`, else `.cache/onnxruntime/libonnxruntime.so.*`
//! of the workspace (made by `scripts/install-ort.sh`). It is loaded once per process.
//!
//! Thread safety: `ort::Session::run` takes `&mut self`, so the session sits behind a `Mutex`;
//! calls from many threads are serialized (ONNX Runtime parallelizes inside each call with its
//! intra-op threads). The KV cache stays in ONNX Runtime values between steps: the `present.*`
//! outputs of one call are fed back as `past_key_values.*` views without a host copy.

use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use ::ort::environment::Environment;
use ::ort::ep::{self, ExecutionProviderDispatch};
use ::ort::session::builder::GraphOptimizationLevel;
use ::ort::session::{Session, SessionInputValue};
use ::ort::value::{DynValue, Tensor, TensorElementType, ValueType};

use super::{append_single, check_io, truncate_single, BatchCache, BatchDecoder, BatchInput};
use crate::error::{Error, Result};
use crate::generator::{Generator, GeneratorInfo, Logits, LogitsMode, Sequence};
use crate::manifest::Manifest;

/// ONNX Runtime version whose library `scripts/install-ort.sh` installs (matches `api-31`).
pub const ORT_VERSION: &str = "1.31.1";

/// Graph optimization level of the session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OptLevel {
    /// No graph rewrites.
    Disable,
    /// Constant folding and redundant-node removal.
    Basic,
    /// Basic plus op fusions.
    Extended,
    /// Everything, including layout optimizations (the default).
    #[default]
    All,
}

/// TensorRT execution-provider options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorRtOptions {
    /// CUDA device.
    pub device_id: i32,
    /// Allow fp16 kernels.
    pub fp16: bool,
    /// Allow int8 kernels (needs `calibration_table` for a graph without QDQ nodes).
    pub int8: bool,
    /// TensorRT calibration table (`calibration.flatbuffers` or the native cache); its file
    /// name is given to TensorRT, the engine cache directory must hold it.
    pub calibration_table: Option<PathBuf>,
    /// Read `calibration_table` as TensorRT's native cache (`calibration.cache`) rather than
    /// ONNX Runtime's flatbuffers table; a `.cache` extension implies it.
    pub native_calibration_table: bool,
    /// Directory for built engines (reused across runs).
    pub engine_cache: Option<PathBuf>,
    /// Workspace limit in bytes.
    pub max_workspace_bytes: Option<usize>,
    /// Largest batch of the optimization profile.
    pub profile_max_batch: usize,
    /// Typical sequence length of the optimization profile (`opt` shapes).
    pub profile_opt_len: usize,
}

impl Default for TensorRtOptions {
    fn default() -> Self {
        TensorRtOptions {
            device_id: 0,
            fp16: false,
            int8: false,
            calibration_table: None,
            native_calibration_table: false,
            engine_cache: None,
            max_workspace_bytes: None,
            profile_max_batch: 1,
            profile_opt_len: 256,
        }
    }
}

/// An execution provider, in priority order in [`OrtOptions::providers`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecutionProvider {
    /// ONNX Runtime's CPU provider (always present as the last resort).
    Cpu,
    /// CUDA on `device_id` (needs `onnxruntime-gpu` and CUDA 13 / cuDNN 9 libraries).
    Cuda {
        /// CUDA device.
        device_id: i32,
    },
    /// TensorRT (needs `onnxruntime-gpu` and TensorRT 10 libraries).
    TensorRt(TensorRtOptions),
}

impl ExecutionProvider {
    /// ONNX Runtime's name of the provider.
    pub fn ort_name(&self) -> &'static str {
        match self {
            ExecutionProvider::Cpu => "CPUExecutionProvider",
            ExecutionProvider::Cuda { .. } => "CUDAExecutionProvider",
            ExecutionProvider::TensorRt(_) => "TensorrtExecutionProvider",
        }
    }
}

/// Session options of the ONNX Runtime backend.
#[derive(Debug, Clone)]
pub struct OrtOptions {
    /// Intra-op threads (`None`: ONNX Runtime's default, one per core).
    pub intra_threads: Option<usize>,
    /// Graph optimization level.
    pub opt_level: OptLevel,
    /// Execution providers in priority order.
    pub providers: Vec<ExecutionProvider>,
    /// When a provider cannot be registered: `false` → error naming it (the default), `true` →
    /// continue with the next one (the report says what runs).
    pub allow_fallback: bool,
}

impl Default for OrtOptions {
    fn default() -> Self {
        OrtOptions {
            intra_threads: None,
            opt_level: OptLevel::All,
            providers: vec![ExecutionProvider::Cpu],
            allow_fallback: false,
        }
    }
}

static ENVIRONMENT: OnceLock<std::result::Result<Environment, (PathBuf, String)>> = OnceLock::new();

/// Where the ONNX Runtime library is looked for: `ORT_DYLIB_PATH`, else the workspace's
/// `.cache/onnxruntime/libonnxruntime.so.<ORT_VERSION>` (relative to the current directory,
/// then to the source tree).
pub fn dylib_path() -> PathBuf {
    if let Some(p) = std::env::var_os("ORT_DYLIB_PATH").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    let rel = PathBuf::from(".cache/onnxruntime").join(format!("libonnxruntime.so.{ORT_VERSION}"));
    if rel.is_file() {
        return rel;
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(rel)
}

/// Loads ONNX Runtime (once per process) and returns its environment.
pub fn environment() -> Result<Environment> {
    let res = ENVIRONMENT.get_or_init(|| {
        let path = dylib_path();
        if !path.is_file() {
            return Err((path, "file not found".into()));
        }
        let builder = ::ort::init_from(&path).map_err(|e| (path.clone(), e.to_string()))?;
        builder
            .with_name("steper")
            .build()
            .map_err(|e| (path.clone(), e.to_string()))
    });
    match res {
        Ok(env) => Ok(env.clone()),
        Err((path, reason)) => Err(Error::OrtLibrary {
            path: path.clone(),
            reason: reason.clone(),
        }),
    }
}

fn backend_err(message: impl std::fmt::Display) -> Error {
    Error::Backend {
        backend: "ort",
        message: message.to_string(),
    }
}

fn dispatch(p: &ExecutionProvider, manifest: &Manifest) -> ExecutionProviderDispatch {
    match p {
        ExecutionProvider::Cpu => ep::CPU::default().build(),
        ExecutionProvider::Cuda { device_id } => {
            ep::CUDA::default().with_device_id(*device_id).build()
        }
        ExecutionProvider::TensorRt(o) => {
            let (min, opt, max) = trt_profiles(manifest, o);
            let mut t = ep::TensorRT::default()
                .with_device_id(o.device_id)
                .with_fp16(o.fp16)
                .with_int8(o.int8)
                .with_profile_min_shapes(min)
                .with_profile_opt_shapes(opt)
                .with_profile_max_shapes(max);
            if let Some(dir) = &o.engine_cache {
                t = t
                    .with_engine_cache(true)
                    .with_engine_cache_path(dir.display())
                    .with_timing_cache(true)
                    .with_timing_cache_path(dir.display());
            }
            if let Some(table) = &o.calibration_table {
                let name = table
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                t = t
                    .with_int8_calibration_table_name(name)
                    .with_int8_use_native_calibration_table(
                        o.native_calibration_table
                            || table.extension().is_some_and(|e| e == "cache"),
                    );
            }
            if let Some(ws) = o.max_workspace_bytes {
                t = t.with_max_workspace_size(ws);
            }
            t.build()
        }
    }
}

/// TensorRT optimization profiles (min, opt, max) covering every input, the KV cache included:
/// `name:d0xd1x…` lists as TensorRT's EP expects them.
pub fn trt_profiles(manifest: &Manifest, o: &TensorRtOptions) -> (String, String, String) {
    let g = &manifest.graph;
    let ctx = manifest.context_length;
    let opt_len = o.profile_opt_len.min(ctx).max(1);
    let make = |b: usize, s: usize, p: usize| {
        let mut v = vec![
            format!("input_ids:{b}x{s}"),
            format!("attention_mask:{b}x{}", p + s),
            format!("position_ids:{b}x{s}"),
        ];
        for name in g.inputs.iter().skip(3) {
            v.push(format!("{name}:{b}x{}x{p}x{}", g.num_kv_heads, g.head_dim));
        }
        v.join(",")
    };
    (
        make(1, 1, 0),
        make(1, 1, opt_len),
        make(o.profile_max_batch.max(1), ctx, ctx),
    )
}

/// A model running on ONNX Runtime.
pub struct OrtGenerator {
    session: Mutex<Session>,
    info: GeneratorInfo,
    cache_f16: bool,
    kv_heads: usize,
    head_dim: usize,
    past_names: Vec<String>,
    present_names: Vec<String>,
    /// The graph's `logits_to_keep` input (manifest `graph.logits_to_keep`), fed 1 for
    /// [`LogitsMode::Last`] so the graph projects only the last position.
    logits_to_keep: Option<String>,
}

/// The ONNX Runtime cache: the last call's `present.*` values.
struct OrtCache {
    values: Vec<DynValue>,
}

// SAFETY: ONNX Runtime values are plain buffers owned by this struct; nothing else aliases them
// once a call has returned, so moving them between threads is sound.
unsafe impl Send for OrtCache {}

impl OrtGenerator {
    /// Builds a session for `model` with `opts`. A provider that cannot be registered is an
    /// [`Error::ProviderUnavailable`] unless `opts.allow_fallback`.
    pub fn load(model: &Path, manifest: &Manifest, opts: &OrtOptions) -> Result<Self> {
        let env = environment()?;
        let mut b = Session::builder(&env).map_err(backend_err)?;
        b = b
            .with_optimization_level(match opts.opt_level {
                OptLevel::Disable => GraphOptimizationLevel::Disable,
                OptLevel::Basic => GraphOptimizationLevel::Level1,
                OptLevel::Extended => GraphOptimizationLevel::Level2,
                OptLevel::All => GraphOptimizationLevel::All,
            })
            .map_err(backend_err)?;
        if let Some(n) = opts.intra_threads {
            b = b.with_intra_threads(n).map_err(backend_err)?;
        }
        let mut used: Vec<String> = Vec::new();
        for p in &opts.providers {
            if let ExecutionProvider::TensorRt(TensorRtOptions {
                calibration_table: Some(t),
                ..
            }) = p
            {
                if !t.is_file() {
                    return Err(Error::ProviderUnavailable {
                        provider: p.ort_name().into(),
                        reason: format!("calibration table {} not found", t.display()),
                    });
                }
            }
            match dispatch(p, manifest).register(&mut b) {
                Ok(()) => used.push(p.ort_name().into()),
                Err(e) if opts.allow_fallback => {
                    eprintln!("warning: {} not registered ({e}); falling back", p.ort_name());
                }
                Err(e) => {
                    return Err(Error::ProviderUnavailable {
                        provider: p.ort_name().into(),
                        reason: format!(
                            "{e} (GPU providers need the onnxruntime-gpu library in ORT_DYLIB_PATH and the CUDA/TensorRT libraries; pass allow_fallback to continue on CPU)"
                        ),
                    })
                }
            }
        }
        if !used.iter().any(|u| u == "CPUExecutionProvider") {
            used.push("CPUExecutionProvider".into());
        }
        let session = b.commit_from_file(model).map_err(|e| Error::Model {
            path: model.to_path_buf(),
            message: format!("ONNX Runtime cannot load the graph: {e}"),
        })?;
        let inputs: Vec<String> = session
            .inputs()
            .iter()
            .map(|o| o.name().to_string())
            .collect();
        let outputs: Vec<String> = session
            .outputs()
            .iter()
            .map(|o| o.name().to_string())
            .collect();
        check_io(model, manifest, &inputs, &outputs)?;
        let cache_f16 = session
            .inputs()
            .iter()
            .find(|o| o.name().starts_with("past_key_values"))
            .is_some_and(|o| {
                matches!(
                    o.dtype(),
                    ValueType::Tensor {
                        ty: TensorElementType::Float16,
                        ..
                    }
                )
            });
        let g = &manifest.graph;
        Ok(OrtGenerator {
            session: Mutex::new(session),
            info: GeneratorInfo {
                backend: "ort".into(),
                providers: used,
                vocab_size: g.vocab_size,
                context_length: manifest.context_length,
            },
            cache_f16,
            kv_heads: g.num_kv_heads,
            head_dim: g.head_dim,
            past_names: g.inputs[3..].to_vec(),
            present_names: g.outputs[1..].to_vec(),
            logits_to_keep: g.logits_to_keep.clone(),
        })
    }

    fn empty(&self, batch: usize, past: usize, data: Option<Vec<f32>>) -> Result<DynValue> {
        let shape = [batch, self.kv_heads, past, self.head_dim];
        let data = data.unwrap_or_default();
        let v = if self.cache_f16 {
            let h: Vec<half::f16> = data.iter().map(|&x| half::f16::from_f32(x)).collect();
            Tensor::from_array((shape, h))
                .map_err(backend_err)?
                .into_dyn()
        } else {
            Tensor::from_array((shape, data))
                .map_err(backend_err)?
                .into_dyn()
        };
        Ok(v)
    }
}

impl BatchDecoder for OrtGenerator {
    fn new_cache(&self, batch: usize) -> Result<BatchCache> {
        let values = (0..self.past_names.len())
            .map(|_| self.empty(batch, 0, None))
            .collect::<Result<Vec<_>>>()?;
        Ok(BatchCache {
            batch,
            past: 0,
            inner: Box::new(OrtCache { values }),
        })
    }

    fn step(&self, cache: &mut BatchCache, input: &BatchInput, mode: LogitsMode) -> Result<Logits> {
        input.check(cache.past, cache.batch)?;
        let (b, s) = (input.batch, input.seq);
        let oc = cache
            .inner
            .downcast_mut::<OrtCache>()
            .ok_or_else(|| Error::Input("cache belongs to another backend".into()))?;
        let mut feed: Vec<(Cow<'_, str>, SessionInputValue<'_>)> =
            Vec::with_capacity(3 + oc.values.len());
        let t = |v: Vec<i64>, cols: usize| -> Result<SessionInputValue<'static>> {
            Ok(Tensor::from_array(([b, cols], v))
                .map_err(backend_err)?
                .into())
        };
        feed.push(("input_ids".into(), t(input.input_ids.clone(), s)?));
        feed.push((
            "attention_mask".into(),
            t(input.attention_mask.clone(), cache.past + s)?,
        ));
        feed.push(("position_ids".into(), t(input.position_ids.clone(), s)?));
        for (name, v) in self.past_names.iter().zip(oc.values.iter()) {
            feed.push((Cow::Borrowed(name.as_str()), v.into()));
        }
        // Last position only: the graph slices before the vocabulary projection and returns
        // one row per batch row.
        let keep_last = match (&self.logits_to_keep, mode) {
            (Some(name), LogitsMode::Last) => {
                let one = Tensor::from_array(((), vec![1i64])).map_err(backend_err)?;
                feed.push((Cow::Borrowed(name.as_str()), one.into()));
                true
            }
            _ => false,
        };
        let mut session = self
            .session
            .lock()
            .map_err(|_| backend_err("session mutex poisoned"))?;
        let mut out = session.run(feed).map_err(backend_err)?;
        let logits = out
            .remove("logits")
            .ok_or_else(|| backend_err("no `logits` output"))?;
        let mut values = Vec::with_capacity(self.present_names.len());
        for name in &self.present_names {
            values.push(
                out.remove(name)
                    .ok_or_else(|| backend_err(format!("no `{name}` output")))?,
            );
        }
        drop(out);
        drop(session);
        let (shape, data) = logits.try_extract_tensor::<f32>().map_err(backend_err)?;
        let vocab = *shape.last().unwrap_or(&0) as usize;
        let logits = match mode {
            LogitsMode::All => Logits {
                rows: b * s,
                vocab,
                data: data.to_vec(),
            },
            LogitsMode::Last if keep_last => Logits {
                rows: b,
                vocab,
                data: data.to_vec(),
            },
            LogitsMode::Last => {
                let mut v = Vec::with_capacity(b * vocab);
                for r in 0..b {
                    let off = (r * s + s - 1) * vocab;
                    v.extend_from_slice(&data[off..off + vocab]);
                }
                Logits {
                    rows: b,
                    vocab,
                    data: v,
                }
            }
        };
        oc.values = values;
        cache.past += s;
        Ok(logits)
    }

    fn truncate_cache(&self, cache: &mut BatchCache, len: usize) -> Result<()> {
        if len >= cache.past {
            return Ok(());
        }
        let b = cache.batch;
        let past = cache.past;
        let oc = cache
            .inner
            .downcast_mut::<OrtCache>()
            .ok_or_else(|| Error::Input("cache belongs to another backend".into()))?;
        let rows = b * self.kv_heads;
        let d = self.head_dim;
        let mut values = Vec::with_capacity(oc.values.len());
        for v in &oc.values {
            let data: Vec<f32> = if self.cache_f16 {
                let (_, x) = v.try_extract_tensor::<half::f16>().map_err(backend_err)?;
                x.iter().map(|h| h.to_f32()).collect()
            } else {
                v.try_extract_tensor::<f32>()
                    .map_err(backend_err)?
                    .1
                    .to_vec()
            };
            let mut kept = Vec::with_capacity(rows * len * d);
            for r in 0..rows {
                kept.extend_from_slice(&data[r * past * d..(r * past + len) * d]);
            }
            values.push(self.empty(b, len, Some(kept))?);
        }
        oc.values = values;
        cache.past = len;
        Ok(())
    }
}

impl Generator for OrtGenerator {
    fn info(&self) -> &GeneratorInfo {
        &self.info
    }

    fn new_sequence(&self) -> Result<Sequence> {
        Ok(Sequence::new(Box::new(self.new_cache(1)?)))
    }

    fn append(&self, seq: &mut Sequence, tokens: &[u32], mode: LogitsMode) -> Result<Logits> {
        append_single(self, self.info.context_length, seq, tokens, mode)
    }

    fn truncate(&self, seq: &mut Sequence, len: usize) -> Result<()> {
        truncate_single(self, seq, len)
    }
}
