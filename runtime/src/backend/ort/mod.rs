//! The ONNX Runtime backend (`ort` 2.x, library loaded at run time).
//!
//! The library is the one [`OrtOptions::library`] names, else the one in the `ORT_DYLIB_PATH`
//! environment variable; nothing else is searched (the `steper-run` binary adds its own
//! defaults). It is loaded once per process; a load that fails is tried again on the next call.
//!
//! Thread safety: `ort::Session::run` takes `&mut self` (ONNX Runtime's `Run` is not safe to
//! call on one session from many threads), so the generator holds a pool of
//! [`OrtOptions::sessions`] sessions over the same graph. Each model call checks one out and
//! returns it when done: N callers run N calls at once, further callers wait for a free session.
//! With `SHARE_WEIGHTS_FROM_SESSIONS` sessions or more the weights exist once: the graph's
//! initializers are decoded once and handed to every session (`AddInitializer`: ONNX Runtime
//! then uses that buffer instead of its own copy), and the sessions share one prepacked-weights
//! container (`CreateSessionWithPrepackedWeightsContainer`), which caches the packed forms of
//! shared initializers.
//!
//! The KV cache stays in ONNX Runtime values between steps: the `present.*` outputs of one call
//! are fed back as `past_key_values.*` views without a host copy (any session of the pool can run
//! the next step of a sequence: the values are plain CPU buffers). On a `GroupQueryAttention`
//! export ([`KvCacheMode::Auto`] / [`KvCacheMode::InPlace`]) a batch-1 cache is instead one
//! preallocated buffer per layer and kind, bound with IoBinding as both the `past_key_values.*`
//! input and the `present.*` output: the fused op appends the new positions in place and copies
//! nothing, and truncating (KV-prefix reuse) only shortens the cache's length.

use std::any::Any;
use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex, MutexGuard};

use ::ort::environment::Environment;
use ::ort::ep::{self, ExecutionProviderDispatch};
use ::ort::session::builder::{GraphOptimizationLevel, PrepackedWeights, SessionBuilder};
use ::ort::session::{Session, SessionInputValue};
use ::ort::value::{DynValue, Tensor, TensorElementType, ValueType};

use super::{
    append_single, check_io, fork_single, truncate_single, BatchCache, BatchDecoder, BatchInput,
};
use crate::error::{Error, Result};
use crate::generator::{Generator, GeneratorInfo, Logits, LogitsMode, ProviderFallback, Sequence};
use crate::manifest::{AttentionOp, Manifest};

/// ONNX Runtime version whose library `scripts/install-ort.sh` installs (matches `api-31`).
pub const ORT_VERSION: &str = "1.31.1";

/// Graph optimization level of the session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
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
#[non_exhaustive]
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

impl TensorRtOptions {
    /// Sets `device_id`.
    #[must_use]
    pub fn with_device_id(mut self, device_id: i32) -> Self {
        self.device_id = device_id;
        self
    }

    /// Sets `fp16`.
    #[must_use]
    pub fn with_fp16(mut self, fp16: bool) -> Self {
        self.fp16 = fp16;
        self
    }

    /// Sets `int8`.
    #[must_use]
    pub fn with_int8(mut self, int8: bool) -> Self {
        self.int8 = int8;
        self
    }

    /// Sets `calibration_table`.
    #[must_use]
    pub fn with_calibration_table(mut self, calibration_table: Option<PathBuf>) -> Self {
        self.calibration_table = calibration_table;
        self
    }

    /// Sets `native_calibration_table`.
    #[must_use]
    pub fn with_native_calibration_table(mut self, native_calibration_table: bool) -> Self {
        self.native_calibration_table = native_calibration_table;
        self
    }

    /// Sets `engine_cache`.
    #[must_use]
    pub fn with_engine_cache(mut self, engine_cache: Option<PathBuf>) -> Self {
        self.engine_cache = engine_cache;
        self
    }

    /// Sets `max_workspace_bytes`.
    #[must_use]
    pub fn with_max_workspace_bytes(mut self, max_workspace_bytes: Option<usize>) -> Self {
        self.max_workspace_bytes = max_workspace_bytes;
        self
    }

    /// Sets `profile_max_batch`.
    #[must_use]
    pub fn with_profile_max_batch(mut self, profile_max_batch: usize) -> Self {
        self.profile_max_batch = profile_max_batch;
        self
    }

    /// Sets `profile_opt_len`.
    #[must_use]
    pub fn with_profile_opt_len(mut self, profile_opt_len: usize) -> Self {
        self.profile_opt_len = profile_opt_len;
        self
    }
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
#[non_exhaustive]
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

/// How the KV cache is kept between calls on ONNX Runtime.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum KvCacheMode {
    /// In place where the graph allows it (a `GroupQueryAttention` export, `steper-export
    /// --attention gqa`, on the CPU provider alone), concatenated otherwise.
    #[default]
    Auto,
    /// One preallocated `[1, kv_heads, capacity, head_dim]` buffer per layer and kind, bound
    /// with IoBinding as both `past_key_values.*` and `present.*`: ONNX Runtime's
    /// `GroupQueryAttention` then writes the new positions into it and copies nothing
    /// (`past_present_share_buffer`); truncating the cache is setting its length. The buffer
    /// grows by [`IN_PLACE_GROWTH`] (copying once) when a call needs more room. Needs a
    /// `GroupQueryAttention` export and batch 1 (larger batches fall back to [`Concat`]).
    ///
    /// [`Concat`]: KvCacheMode::Concat
    InPlace,
    /// Each call's `present.*` outputs are the next call's `past_key_values.*` (the graph
    /// concatenates, or the fused op copies the past into a new present).
    Concat,
}

impl KvCacheMode {
    /// `auto`, `in-place` or `concat`.
    pub fn as_str(&self) -> &'static str {
        match self {
            KvCacheMode::Auto => "auto",
            KvCacheMode::InPlace => "in-place",
            KvCacheMode::Concat => "concat",
        }
    }
}

impl std::str::FromStr for KvCacheMode {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(KvCacheMode::Auto),
            "in-place" => Ok(KvCacheMode::InPlace),
            "concat" => Ok(KvCacheMode::Concat),
            other => Err(Error::InvalidOption {
                option: "kv_cache".into(),
                expected: "auto, in-place or concat".into(),
                got: other.into(),
            }),
        }
    }
}

/// Positions an in-place cache grows by at least (and rounds its capacity up to).
pub const IN_PLACE_GROWTH: usize = 256;

/// The capacity an in-place cache of `capacity` positions grows to when a call needs `needed`:
/// 1.5× (at least `needed`), rounded up to [`IN_PLACE_GROWTH`], at most `context_length` (but
/// never below `needed`).
pub fn grown_capacity(capacity: usize, needed: usize, context_length: usize) -> usize {
    let want = needed.max(capacity + capacity / 2);
    let rounded = want.div_ceil(IN_PLACE_GROWTH) * IN_PLACE_GROWTH;
    rounded.min(context_length).max(needed)
}

/// Session options of the ONNX Runtime backend.
///
/// ```
/// use steper_runtime::OrtOptions;
/// // two workers, each running its own model call on one core
/// let opts = OrtOptions::default().with_sessions(2).with_intra_threads(1);
/// assert_eq!((opts.sessions, opts.intra_threads), (2, Some(1)));
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct OrtOptions {
    /// Intra-op threads of each session (`None`: ONNX Runtime's default, one per core).
    pub intra_threads: Option<usize>,
    /// Sessions over the same graph, i.e. model calls that can run at once (at least 1; one per
    /// concurrent caller, e.g. `serve --workers N` uses N).
    pub sessions: usize,
    /// With `SHARE_WEIGHTS_FROM_SESSIONS` sessions or more, share the weights between them
    /// (the default): the graph's
    /// float and 8-bit initializers of at least `SHARED_INITIALIZER_MIN_BYTES` are loaded once
    /// and given to every session, and their prepacked forms are shared; `false` gives each
    /// session its own copy (only useful to measure what sharing saves).
    pub share_prepacked_weights: bool,
    /// Graph optimization level.
    pub opt_level: OptLevel,
    /// Execution providers in priority order.
    pub providers: Vec<ExecutionProvider>,
    /// When a provider cannot be registered: `false` → error naming it (the default), `true` →
    /// continue with the next one (the report says what runs).
    pub allow_fallback: bool,
    /// How the KV cache is kept between calls.
    pub kv_cache: KvCacheMode,
    /// The ONNX Runtime shared library (`libonnxruntime.so`); `None`: the path in the
    /// `ORT_DYLIB_PATH` environment variable. Only the first successful load of a process
    /// counts (ONNX Runtime cannot be loaded twice).
    pub library: Option<PathBuf>,
    /// ONNX Runtime's memory-pattern optimization (on by default, as in ONNX Runtime): it plans
    /// a run's allocations once per set of input shapes and keeps every plan for the session's
    /// lifetime; `false` allocates each run as it goes (a long-running server sees a new prompt
    /// and past length in almost every call, so `steper-run serve` turns it off: in an
    /// hour-long soak two workers' resident memory rose 1,081 → 1,461 MiB with it and held
    /// 1,179 MiB without it). Turn it off for any long-lived session.
    pub memory_pattern: bool,
}

impl OrtOptions {
    /// Sets `providers`.
    #[must_use]
    pub fn with_providers(mut self, providers: Vec<ExecutionProvider>) -> Self {
        self.providers = providers;
        self
    }

    /// Sets `allow_fallback`.
    #[must_use]
    pub fn with_allow_fallback(mut self, allow_fallback: bool) -> Self {
        self.allow_fallback = allow_fallback;
        self
    }
}

impl Default for OrtOptions {
    fn default() -> Self {
        OrtOptions {
            intra_threads: None,
            sessions: 1,
            share_prepacked_weights: true,
            opt_level: OptLevel::All,
            providers: vec![ExecutionProvider::Cpu],
            allow_fallback: false,
            kv_cache: KvCacheMode::Auto,
            library: None,
            memory_pattern: true,
        }
    }
}

impl OrtOptions {
    /// Intra-op threads of each session (`None`: ONNX Runtime's default).
    pub fn with_intra_threads(mut self, threads: impl Into<Option<usize>>) -> Self {
        self.intra_threads = threads.into();
        self
    }

    /// Number of sessions (model calls that run at once); checked at load (≥ 1).
    pub fn with_sessions(mut self, sessions: usize) -> Self {
        self.sessions = sessions;
        self
    }

    /// Whether the sessions share their prepacked weights.
    pub fn with_shared_prepacked_weights(mut self, share: bool) -> Self {
        self.share_prepacked_weights = share;
        self
    }

    /// Graph optimization level.
    pub fn with_opt_level(mut self, level: OptLevel) -> Self {
        self.opt_level = level;
        self
    }

    /// How the KV cache is kept between calls.
    pub fn with_kv_cache(mut self, mode: KvCacheMode) -> Self {
        self.kv_cache = mode;
        self
    }

    /// ONNX Runtime's memory-pattern optimization on or off.
    pub fn with_memory_pattern(mut self, enable: bool) -> Self {
        self.memory_pattern = enable;
        self
    }

    /// The ONNX Runtime shared library to load (instead of `ORT_DYLIB_PATH`).
    pub fn with_library(mut self, path: impl Into<PathBuf>) -> Self {
        self.library = Some(path.into());
        self
    }

    fn validate(&self) -> Result<()> {
        if self.sessions == 0 {
            return Err(Error::InvalidOption {
                option: "sessions".into(),
                expected: "at least 1".into(),
                got: "0".into(),
            });
        }
        if self.intra_threads == Some(0) {
            return Err(Error::InvalidOption {
                option: "intra_threads".into(),
                expected: "at least 1 (or unset for ONNX Runtime's default)".into(),
                got: "0".into(),
            });
        }
        Ok(())
    }
}

/// The part of the ONNX protobuf schema (onnx.proto3 field numbers) that
/// [`shared_initializers`] reads; prost skips every other field.
mod onnx_pb {
    /// `ModelProto`: only the graph.
    #[derive(Clone, PartialEq, prost::Message)]
    pub(super) struct ModelProto {
        #[prost(message, optional, tag = "7")]
        pub graph: Option<GraphProto>,
    }

    /// `GraphProto`: only the initializers.
    #[derive(Clone, PartialEq, prost::Message)]
    pub(super) struct GraphProto {
        #[prost(message, repeated, tag = "5")]
        pub initializer: Vec<TensorProto>,
    }

    /// `TensorProto`: shape, element type, name, raw bytes and where the data lives.
    #[derive(Clone, PartialEq, prost::Message)]
    pub(super) struct TensorProto {
        #[prost(int64, repeated, tag = "1")]
        pub dims: Vec<i64>,
        #[prost(int32, tag = "2")]
        pub data_type: i32,
        #[prost(string, tag = "8")]
        pub name: String,
        #[prost(bytes = "vec", tag = "9")]
        pub raw_data: Vec<u8>,
        /// 0 default (inside the file), 1 external.
        #[prost(int32, optional, tag = "14")]
        pub data_location: Option<i32>,
    }
}

/// Fewest sessions at which their weights are shared. A single session lets ONNX Runtime drop
/// each weight once it is prepacked; shared weights are owned by the caller, so the shared
/// unpacked copy stays besides the shared packed one. Measured on SmolLM2-135M fp32 (resident
/// memory after load): 1 session 739 MiB; 2 sessions 1,460 MiB private vs 1,659 MiB shared;
/// 3 sessions 1,751 MiB shared (each further session ≈ 92 MiB), so sharing pays from 3 on.
pub const SHARE_WEIGHTS_FROM_SESSIONS: usize = 3;

/// Smallest initializer (bytes) shared between sessions; smaller ones (norm weights, shape
/// constants) stay in each session's graph.
pub const SHARED_INITIALIZER_MIN_BYTES: usize = 64 * 1024;

/// The graph's initializers worth sharing between sessions, decoded once from `model` as ONNX
/// Runtime values: float, float16, int8 and uint8 tensors of at least
/// `SHARED_INITIALIZER_MIN_BYTES` stored inside the file (external data stays with ONNX
/// Runtime).
fn shared_initializers(model: &Path) -> Result<Vec<(String, std::sync::Arc<DynValue>)>> {
    use prost::Message as _;
    let bad = |message: String| Error::Model {
        path: model.to_path_buf(),
        message,
    };
    let bytes = std::fs::read(model).map_err(|e| Error::io(model, e))?;
    let proto = onnx_pb::ModelProto::decode(bytes.as_slice())
        .map_err(|e| bad(format!("not an ONNX model: {e}")))?;
    drop(bytes);
    let Some(graph) = proto.graph else {
        return Err(bad("ONNX model without a graph".into()));
    };
    let mut out = Vec::new();
    for t in graph.initializer {
        // 1: external data, left to ONNX Runtime
        if t.data_location == Some(1) || t.raw_data.len() < SHARED_INITIALIZER_MIN_BYTES {
            continue;
        }
        let dims: Vec<i64> = t.dims.clone();
        let n: usize = dims.iter().map(|&d| d.max(0) as usize).product();
        let raw = t.raw_data;
        let wrong = |size: usize| {
            bad(format!(
                "initializer {} holds {} bytes, its shape {:?} needs {}",
                t.name,
                raw.len(),
                dims,
                n * size
            ))
        };
        // TensorProto.DataType: 1 FLOAT, 2 UINT8, 3 INT8, 10 FLOAT16
        let value = match t.data_type {
            1 => {
                if raw.len() != n * 4 {
                    return Err(wrong(4));
                }
                let v: Vec<f32> = raw
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect();
                Tensor::from_array((dims, v))
                    .map_err(backend_err)?
                    .into_dyn()
            }
            10 => {
                if raw.len() != n * 2 {
                    return Err(wrong(2));
                }
                let v: Vec<half::f16> = raw
                    .chunks_exact(2)
                    .map(|c| half::f16::from_le_bytes([c[0], c[1]]))
                    .collect();
                Tensor::from_array((dims, v))
                    .map_err(backend_err)?
                    .into_dyn()
            }
            2 => {
                if raw.len() != n {
                    return Err(wrong(1));
                }
                Tensor::from_array((dims, raw))
                    .map_err(backend_err)?
                    .into_dyn()
            }
            3 => {
                if raw.len() != n {
                    return Err(wrong(1));
                }
                let v: Vec<i8> = raw.iter().map(|&b| b as i8).collect();
                Tensor::from_array((dims, v))
                    .map_err(backend_err)?
                    .into_dyn()
            }
            _ => continue,
        };
        out.push((t.name, std::sync::Arc::new(value)));
    }
    Ok(out)
}

/// The loaded library and its environment (a failed load leaves it empty, so the next call
/// tries again).
static ENVIRONMENT: Mutex<Option<(PathBuf, Environment)>> = Mutex::new(None);

/// The environment variable naming the ONNX Runtime library when no path is given.
pub const ORT_DYLIB_ENV: &str = "ORT_DYLIB_PATH";

/// The library to load: `library` when given, else the path in [`ORT_DYLIB_ENV`]; neither is
/// an [`Error::OrtLibraryUnset`].
pub fn library_path(library: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = library {
        return Ok(p.to_path_buf());
    }
    std::env::var_os(ORT_DYLIB_ENV)
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .ok_or(Error::OrtLibraryUnset)
}

/// Loads ONNX Runtime from `library` (see [`library_path`]) and returns its environment.
///
/// The library is loaded once per process: once one has loaded, later calls return its
/// environment whatever path they name. A load that fails is not remembered.
pub fn environment(library: Option<&Path>) -> Result<Environment> {
    let mut slot = ENVIRONMENT.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, env)) = slot.as_ref() {
        return Ok(env.clone());
    }
    let path = library_path(library)?;
    let fail = |reason: String| Error::OrtLibrary {
        path: path.clone(),
        reason,
    };
    if !path.is_file() {
        return Err(fail("file not found".into()));
    }
    let env = ::ort::init_from(&path)
        .map_err(|e| fail(e.to_string()))?
        .with_name("steper")
        .build()
        .map_err(|e| fail(e.to_string()))?;
    *slot = Some((path, env.clone()));
    Ok(env)
}

/// The copy `scripts/install-ort.sh` makes, `.cache/onnxruntime/libonnxruntime.so.<ORT_VERSION>`,
/// looked up in the current directory, then two levels above the running executable (a
/// workspace's `target/<profile>/`). The library never uses this by itself: it is the default
/// of the project's binaries ([`set_library_env`]).
pub fn installed_library() -> Option<PathBuf> {
    let rel = PathBuf::from(".cache/onnxruntime").join(format!("libonnxruntime.so.{ORT_VERSION}"));
    let beside_exe = std::env::current_exe()
        .ok()
        .and_then(|e| Some(e.parent()?.parent()?.parent()?.join(&rel)));
    std::iter::once(rel.clone())
        .chain(beside_exe)
        .find(|p| p.is_file())
}

/// For a binary's `main`, before it starts threads: sets [`ORT_DYLIB_ENV`] to `explicit` (a
/// command-line flag) when given, else, when the variable is unset, to `installed_library`
/// if there is one. Changing the environment is only sound while the process has one thread.
pub fn set_library_env(explicit: Option<PathBuf>) {
    let unset = std::env::var_os(ORT_DYLIB_ENV).is_none_or(|v| v.is_empty());
    if let Some(lib) = explicit.or_else(|| unset.then(installed_library).flatten()) {
        std::env::set_var(ORT_DYLIB_ENV, lib);
    }
}

/// The library the process has loaded, if one has.
pub fn loaded_library() -> Option<PathBuf> {
    let slot = ENVIRONMENT.lock().unwrap_or_else(|e| e.into_inner());
    slot.as_ref().map(|(p, _)| p.clone())
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

/// Weights shared by the sessions of a pool.
struct SharedWeights {
    /// Initializers given to every session (`AddInitializer`).
    initializers: Vec<(String, std::sync::Arc<DynValue>)>,
    /// Their prepacked forms.
    prepacked: PrepackedWeights,
}

/// The sessions of an [`OrtGenerator`]: idle ones on a stack, callers wait for one when all are
/// checked out.
struct SessionPool {
    idle: Mutex<Vec<Session>>,
    returned: Condvar,
    size: usize,
    /// Keeps the shared weights alive as long as the sessions (ONNX Runtime requires the
    /// initializers and the container to outlive every session made with them). Declared after
    /// `idle` so that the sessions are dropped first.
    _shared: Option<SharedWeights>,
}

/// A session checked out of a [`SessionPool`]; back on the stack when dropped.
struct CheckedOut<'p> {
    pool: &'p SessionPool,
    session: Option<Session>,
}

impl SessionPool {
    fn checkout(&self) -> Result<CheckedOut<'_>> {
        let poisoned = |_| backend_err("session pool mutex poisoned");
        let mut idle: MutexGuard<'_, Vec<Session>> = self.idle.lock().map_err(poisoned)?;
        loop {
            if let Some(session) = idle.pop() {
                return Ok(CheckedOut {
                    pool: self,
                    session: Some(session),
                });
            }
            idle = self.returned.wait(idle).map_err(poisoned)?;
        }
    }
}

impl CheckedOut<'_> {
    fn session(&mut self) -> Result<&mut Session> {
        // Only `Drop` takes the session out, so this is always `Some`.
        self.session.as_mut().ok_or(Error::Misuse {
            call: "SessionPool::session",
            problem: "the session was returned to the pool".into(),
        })
    }
}

impl Drop for CheckedOut<'_> {
    fn drop(&mut self) {
        if let Some(s) = self.session.take() {
            let mut idle = self.pool.idle.lock().unwrap_or_else(|p| p.into_inner());
            idle.push(s);
            drop(idle);
            self.pool.returned.notify_one();
        }
    }
}

/// A model running on ONNX Runtime.
pub struct OrtGenerator {
    sessions: SessionPool,
    info: GeneratorInfo,
    cache_f16: bool,
    kv_heads: usize,
    head_dim: usize,
    past_names: Vec<String>,
    present_names: Vec<String>,
    /// The graph's `logits_to_keep` input (manifest `graph.logits_to_keep`), fed 1 for
    /// [`LogitsMode::Last`] so the graph projects only the last position.
    logits_to_keep: Option<String>,
    /// The graph's attention form: a `GroupQueryAttention` graph cannot take padded rows.
    attention: AttentionOp,
    /// Batch-1 caches are [`InPlaceCache`]s ([`KvCacheMode::InPlace`] in effect).
    in_place: bool,
}

/// The ONNX Runtime cache: the last call's `present.*` values.
struct OrtCache {
    values: Vec<DynValue>,
}

/// A batch-1 cache kept in place ([`KvCacheMode::InPlace`]): one `[1, kv_heads, capacity,
/// head_dim]` buffer per `past_key_values.*` input, bound as that input and as its `present.*`
/// output; positions at and after the cache's length are stale and never read (the graph's
/// `seqlens_k` comes from the attention mask).
struct InPlaceCache {
    buffers: Vec<Tensor<f32>>,
    capacity: usize,
}

// SAFETY: as for `OrtCache`: the buffers are owned here and bound to a session only for the
// duration of one call made through `&mut` access to this cache.
unsafe impl Send for InPlaceCache {}

// SAFETY: ONNX Runtime values are plain buffers owned by this struct; nothing else aliases them
// once a call has returned, so moving them between threads is sound.
unsafe impl Send for OrtCache {}

/// A session builder with `opts` applied and its providers registered; also returns the names
/// of the providers in use and those skipped (with `allow_fallback`).
fn session_builder(
    manifest: &Manifest,
    opts: &OrtOptions,
    shared: Option<&SharedWeights>,
) -> Result<(SessionBuilder, Vec<String>, Vec<ProviderFallback>)> {
    let env = environment(opts.library.as_deref())?;
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
    if !opts.memory_pattern {
        b = b.with_memory_pattern(false).map_err(backend_err)?;
    }
    if let Some(w) = shared {
        b = b
            .with_prepacked_weights(&w.prepacked)
            .map_err(backend_err)?;
        for (name, value) in &w.initializers {
            b = b
                .with_initializer(name, std::sync::Arc::clone(value))
                .map_err(backend_err)?;
        }
    }
    let mut used: Vec<String> = Vec::new();
    let mut fallbacks = Vec::new();
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
            Err(e) if opts.allow_fallback => fallbacks.push(ProviderFallback {
                provider: p.ort_name().into(),
                reason: e.to_string(),
            }),
            Err(e) => {
                return Err(Error::ProviderUnavailable {
                    provider: p.ort_name().into(),
                    reason: format!(
                        "{e} (GPU providers need the onnxruntime-gpu library and the CUDA/TensorRT libraries; allow_fallback continues on the next provider)"
                    ),
                })
            }
        }
    }
    if !used.iter().any(|u| u == "CPUExecutionProvider") {
        used.push("CPUExecutionProvider".into());
    }
    Ok((b, used, fallbacks))
}

impl OrtGenerator {
    /// Builds `opts.sessions` sessions for `model` with `opts`. A provider that cannot be
    /// registered is an [`Error::ProviderUnavailable`] unless `opts.allow_fallback`; a bad option
    /// (0 sessions or threads) is an [`Error::InvalidOption`].
    pub fn load(model: &Path, manifest: &Manifest, opts: &OrtOptions) -> Result<Self> {
        opts.validate()?;
        let shared = if opts.share_prepacked_weights && opts.sessions >= SHARE_WEIGHTS_FROM_SESSIONS
        {
            Some(SharedWeights {
                initializers: shared_initializers(model)?,
                prepacked: PrepackedWeights::new(),
            })
        } else {
            None
        };
        let commit = |b: &mut SessionBuilder| {
            b.commit_from_file(model).map_err(|e| Error::Model {
                path: model.to_path_buf(),
                message: format!("ONNX Runtime cannot load the graph: {e}"),
            })
        };
        let (mut b, used, fallbacks) = session_builder(manifest, opts, shared.as_ref())?;
        let session = commit(&mut b)?;
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
        let cpu_only = used.iter().all(|u| u == "CPUExecutionProvider");
        let in_place = match opts.kv_cache {
            KvCacheMode::Concat => false,
            KvCacheMode::Auto => !manifest.graph.attention.is_standard() && cpu_only && !cache_f16,
            KvCacheMode::InPlace => {
                if manifest.graph.attention.is_standard() || cache_f16 || !cpu_only {
                    return Err(Error::InvalidOption {
                        option: "kv_cache".into(),
                        expected: "auto or concat for this export: in-place needs a GroupQueryAttention export (steper-export --attention gqa) with an fp32 cache on the CPU provider".into(),
                        got: format!(
                            "in-place with {} attention, {} cache, providers {used:?}",
                            manifest.graph.attention.as_str(),
                            if cache_f16 { "fp16" } else { "fp32" }
                        ),
                    });
                }
                true
            }
        };
        let mut idle = vec![session];
        for _ in 1..opts.sessions {
            let (mut b, _, _) = session_builder(manifest, opts, shared.as_ref())?;
            idle.push(commit(&mut b)?);
        }
        let g = &manifest.graph;
        Ok(OrtGenerator {
            sessions: SessionPool {
                idle: Mutex::new(idle),
                returned: Condvar::new(),
                size: opts.sessions,
                _shared: shared,
            },
            info: GeneratorInfo {
                fallbacks,
                ..GeneratorInfo::new("ort", g.vocab_size, manifest.context_length)
                    .with_providers(used)
            },
            cache_f16,
            kv_heads: g.num_kv_heads,
            head_dim: g.head_dim,
            past_names: g.inputs[3..].to_vec(),
            present_names: g.outputs[1..].to_vec(),
            logits_to_keep: g.logits_to_keep.clone(),
            attention: g.attention,
            in_place,
        })
    }

    /// Whether batch-1 caches are kept in place ([`KvCacheMode`]).
    pub fn kv_in_place(&self) -> bool {
        self.in_place
    }

    /// Number of sessions, i.e. model calls that can run at once.
    pub fn sessions(&self) -> usize {
        self.sessions.size
    }

    fn empty(&self, batch: usize) -> Result<DynValue> {
        let shape = [batch, self.kv_heads, 0, self.head_dim];
        if self.cache_f16 {
            self.tensor(shape, Vec::<half::f16>::new())
        } else {
            self.tensor(shape, Vec::<f32>::new())
        }
    }
}

/// Rows of `[rows, past, dim]` data re-laid as `[rows, pad + (past - keep_from), dim]`: `pad`
/// zero positions in front, then positions `keep_from..past` of each row.
fn relayout_rows<T: Copy + Default>(
    data: &[T],
    rows: usize,
    past: usize,
    dim: usize,
    keep_from: usize,
    pad: usize,
) -> Vec<T> {
    let kept = past - keep_from;
    let mut out = vec![T::default(); rows * (pad + kept) * dim];
    for r in 0..rows {
        let src = &data[(r * past + keep_from) * dim..(r + 1) * past * dim];
        let at = (r * (pad + kept) + pad) * dim;
        out[at..at + kept * dim].copy_from_slice(src);
    }
    out
}

/// Copies `src` (`[heads, sp, dim]` of a batch-1 cache) into row `row` of `dst`
/// (`[batch, heads, dp, dim]`), ending at its last position.
fn place_rows<T: Copy>(
    dst: &mut [T],
    src: &[T],
    row: usize,
    heads: usize,
    dp: usize,
    sp: usize,
    dim: usize,
) {
    for h in 0..heads {
        let at = ((row * heads + h) * dp + dp - sp) * dim;
        dst[at..at + sp * dim].copy_from_slice(&src[h * sp * dim..(h + 1) * sp * dim]);
    }
}

impl OrtGenerator {
    /// A cache tensor of `shape` from `data` in the cache's element type.
    fn tensor<T>(&self, shape: [usize; 4], data: Vec<T>) -> Result<DynValue>
    where
        T: ::ort::value::PrimitiveTensorElementType + std::fmt::Debug + Clone + 'static,
    {
        Ok(Tensor::from_array((shape, data))
            .map_err(backend_err)?
            .into_dyn())
    }

    fn relayout_value(
        &self,
        v: &DynValue,
        batch: usize,
        past: usize,
        keep_from: usize,
        pad: usize,
    ) -> Result<DynValue> {
        let (rows, d) = (batch * self.kv_heads, self.head_dim);
        let shape = [batch, self.kv_heads, pad + past - keep_from, d];
        if self.cache_f16 {
            let (_, x) = v.try_extract_tensor::<half::f16>().map_err(backend_err)?;
            self.tensor(shape, relayout_rows(x, rows, past, d, keep_from, pad))
        } else {
            let (_, x) = v.try_extract_tensor::<f32>().map_err(backend_err)?;
            self.tensor(shape, relayout_rows(x, rows, past, d, keep_from, pad))
        }
    }

    fn relayout(&self, cache: &mut BatchCache, keep_from: usize, pad: usize) -> Result<()> {
        let (b, past) = (cache.batch, cache.past);
        let oc = cache
            .inner
            .downcast_mut::<OrtCache>()
            .ok_or_else(not_a_concat_cache)?;
        let values = oc
            .values
            .iter()
            .map(|v| self.relayout_value(v, b, past, keep_from, pad))
            .collect::<Result<Vec<_>>>()?;
        oc.values = values;
        cache.past = pad + past - keep_from;
        Ok(())
    }
}

/// The error of a batched-cache operation (re-layout, placing a row) on a cache that is not a
/// concatenated ONNX Runtime cache.
fn not_a_concat_cache() -> Error {
    Error::Misuse {
        call: "BatchDecoder",
        problem: "the cache belongs to another backend, or is an in-place cache (batch 1, \
                  kv_cache in-place), which is not re-laid or batched"
            .into(),
    }
}

/// The logits a call returns in `mode`, copied out of the graph's `logits` output (`[b, s,
/// vocab]`, or `[b, 1, vocab]` when the graph kept the last position only).
fn logits_of(
    logits: &DynValue,
    b: usize,
    s: usize,
    mode: LogitsMode,
    keep_last: bool,
) -> Result<Logits> {
    let (shape, data) = logits.try_extract_tensor::<f32>().map_err(backend_err)?;
    let vocab = *shape.last().unwrap_or(&0) as usize;
    Ok(match mode {
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
    })
}

impl OrtGenerator {
    /// Grows the buffers of an in-place cache holding `past` positions to hold `needed`
    /// ([`grown_capacity`]), copying the `past` valid positions of every head.
    fn grow_in_place(&self, ip: &mut InPlaceCache, past: usize, needed: usize) -> Result<()> {
        let cap = grown_capacity(ip.capacity, needed, self.info.context_length);
        *ip = self.copy_in_place(ip, past, cap)?;
        Ok(())
    }

    /// New in-place buffers of `cap` positions holding the first `past` positions of `ip`'s.
    fn copy_in_place(&self, ip: &InPlaceCache, past: usize, cap: usize) -> Result<InPlaceCache> {
        let (heads, d, old) = (self.kv_heads, self.head_dim, ip.capacity);
        let alloc = ::ort::memory::Allocator::default();
        let mut buffers = Vec::with_capacity(self.past_names.len());
        for i in 0..self.past_names.len() {
            let mut t = Tensor::<f32>::new(&alloc, [1, heads, cap, d]).map_err(backend_err)?;
            if past > 0 {
                let (_, src) = ip.buffers[i].extract_tensor();
                let (_, dst) = t.extract_tensor_mut();
                for h in 0..heads {
                    dst[h * cap * d..(h * cap + past) * d]
                        .copy_from_slice(&src[h * old * d..(h * old + past) * d]);
                }
            }
            buffers.push(t);
        }
        Ok(InPlaceCache {
            buffers,
            capacity: cap,
        })
    }

    /// The first `len` of `past` positions of every row of a concatenating cache, re-laid as
    /// new values.
    fn kept_values(
        &self,
        oc: &OrtCache,
        batch: usize,
        past: usize,
        len: usize,
    ) -> Result<Vec<DynValue>> {
        let rows = batch * self.kv_heads;
        let d = self.head_dim;
        let shape = [batch, self.kv_heads, len, d];
        let keep = |r: usize| r * past * d..(r * past + len) * d;
        let mut values = Vec::with_capacity(oc.values.len());
        for v in &oc.values {
            values.push(if self.cache_f16 {
                let (_, x) = v.try_extract_tensor::<half::f16>().map_err(backend_err)?;
                self.tensor(shape, (0..rows).flat_map(|r| x[keep(r)].to_vec()).collect())?
            } else {
                let (_, x) = v.try_extract_tensor::<f32>().map_err(backend_err)?;
                self.tensor(shape, (0..rows).flat_map(|r| x[keep(r)].to_vec()).collect())?
            });
        }
        Ok(values)
    }

    /// [`BatchDecoder::step`] on an in-place cache (batch 1, no padding: checked by the
    /// caller): the cache buffers are bound as both past and present, the logits to a
    /// CPU-allocated output.
    fn step_in_place(
        &self,
        cache: &mut BatchCache,
        input: &BatchInput,
        mode: LogitsMode,
    ) -> Result<Logits> {
        let (past, s) = (cache.past, input.seq);
        let ip = cache
            .inner
            .downcast_mut::<InPlaceCache>()
            .ok_or(Error::ForeignSequence)?;
        if past + s > ip.capacity {
            self.grow_in_place(ip, past, past + s)?;
        }
        let row = |v: &[i64]| -> Result<Tensor<i64>> {
            Tensor::from_array(([1, v.len()], v.to_vec())).map_err(backend_err)
        };
        let ids = row(&input.input_ids)?;
        let mask = row(&input.attention_mask)?;
        let pos = row(&input.position_ids)?;
        let keep = match (&self.logits_to_keep, mode) {
            (Some(name), LogitsMode::Last) => Some((
                name,
                Tensor::from_array(((), vec![1i64])).map_err(backend_err)?,
            )),
            _ => None,
        };
        let mut session = self.sessions.checkout()?;
        let session = session.session()?;
        let mut bind = session.create_binding().map_err(backend_err)?;
        bind.bind_input("input_ids", &ids).map_err(backend_err)?;
        bind.bind_input("attention_mask", &mask)
            .map_err(backend_err)?;
        bind.bind_input("position_ids", &pos).map_err(backend_err)?;
        if let Some((name, one)) = &keep {
            bind.bind_input(name.as_str(), one).map_err(backend_err)?;
        }
        for (name, buf) in self.past_names.iter().zip(&ip.buffers) {
            bind.bind_input(name.as_str(), buf).map_err(backend_err)?;
        }
        for (name, buf) in self.present_names.iter().zip(ip.buffers.iter_mut()) {
            bind.bind_output(name.as_str(), buf).map_err(backend_err)?;
        }
        bind.bind_output_to_device("logits", &::ort::memory::MemoryInfo::default())
            .map_err(backend_err)?;
        let logits = {
            let mut out = session.run_binding(&bind).map_err(backend_err)?;
            let logits = out
                .remove("logits")
                .ok_or_else(|| backend_err("no `logits` output"))?;
            logits_of(&logits, 1, s, mode, keep.is_some())?
        };
        drop(bind);
        cache.past += s;
        Ok(logits)
    }
}

impl BatchDecoder for OrtGenerator {
    fn new_cache(&self, batch: usize) -> Result<BatchCache> {
        if self.in_place && batch == 1 {
            // Buffers are allocated by the first call, at the size it needs.
            return Ok(BatchCache {
                batch,
                past: 0,
                inner: Box::new(InPlaceCache {
                    buffers: Vec::new(),
                    capacity: 0,
                }),
            });
        }
        let values = (0..self.past_names.len())
            .map(|_| self.empty(batch))
            .collect::<Result<Vec<_>>>()?;
        Ok(BatchCache {
            batch,
            past: 0,
            inner: Box::new(OrtCache { values }),
        })
    }

    fn step(&self, cache: &mut BatchCache, input: &BatchInput, mode: LogitsMode) -> Result<Logits> {
        input.check(cache.past, cache.batch)?;
        if !self.attention.is_standard() && input.attention_mask.contains(&0) {
            return Err(Error::InvalidOption {
                option: "attention_mask".into(),
                expected: "no padding: this export uses GroupQueryAttention (steper-export --attention gqa), which assumes every row starts at position 0 — re-export with --attention standard for padded batches".into(),
                got: "a mask with padded (0) positions".into(),
            });
        }
        if cache.inner.is::<InPlaceCache>() {
            return self.step_in_place(cache, input, mode);
        }
        let (b, s) = (input.batch, input.seq);
        let oc = cache
            .inner
            .downcast_mut::<OrtCache>()
            .ok_or(Error::ForeignSequence)?;
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
        let mut session = self.sessions.checkout()?;
        let mut out = session.session()?.run(feed).map_err(backend_err)?;
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
        let logits = logits_of(&logits, b, s, mode, keep_last)?;
        oc.values = values;
        cache.past += s;
        Ok(logits)
    }

    fn truncate_cache(&self, cache: &mut BatchCache, len: usize) -> Result<()> {
        if len >= cache.past {
            return Ok(());
        }
        if cache.inner.is::<InPlaceCache>() {
            // Positions from `len` on become stale; the next call overwrites them.
            cache.past = len;
            return Ok(());
        }
        // Keeping the first `len` positions is dropping the last ones: re-lay each row.
        let (b, past) = (cache.batch, cache.past);
        let oc = cache
            .inner
            .downcast_mut::<OrtCache>()
            .ok_or(Error::ForeignSequence)?;
        oc.values = self.kept_values(oc, b, past, len)?;
        cache.past = len;
        Ok(())
    }

    fn copy_cache(&self, cache: &BatchCache, len: usize) -> Result<BatchCache> {
        let (batch, len) = (cache.batch, len.min(cache.past));
        let inner: Box<dyn Any + Send> =
            if let Some(ip) = cache.inner.downcast_ref::<InPlaceCache>() {
                if ip.capacity == 0 {
                    Box::new(InPlaceCache {
                        buffers: Vec::new(),
                        capacity: 0,
                    })
                } else {
                    Box::new(self.copy_in_place(ip, len, ip.capacity)?)
                }
            } else {
                let oc = cache
                    .inner
                    .downcast_ref::<OrtCache>()
                    .ok_or(Error::ForeignSequence)?;
                Box::new(OrtCache {
                    values: self.kept_values(oc, batch, cache.past, len)?,
                })
            };
        Ok(BatchCache {
            batch,
            past: len,
            inner,
        })
    }

    fn pad_front(&self, cache: &mut BatchCache, n: usize) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        self.relayout(cache, 0, n)
    }

    fn trim_front(&self, cache: &mut BatchCache, n: usize) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        if n > cache.past {
            return Err(Error::Misuse {
                call: "BatchDecoder::trim_front",
                problem: format!("{n} positions asked, the cache holds {}", cache.past),
            });
        }
        self.relayout(cache, n, 0)
    }

    fn place_row(&self, dst: &mut BatchCache, row: usize, src: &BatchCache) -> Result<()> {
        super::check_place(dst, row, src)?;
        let (dp, sp) = (dst.past, src.past);
        let (heads, d) = (self.kv_heads, self.head_dim);
        let sc = src
            .inner
            .downcast_ref::<OrtCache>()
            .ok_or_else(not_a_concat_cache)?;
        let dc = dst
            .inner
            .downcast_mut::<OrtCache>()
            .ok_or_else(not_a_concat_cache)?;
        for (dv, sv) in dc.values.iter_mut().zip(&sc.values) {
            if self.cache_f16 {
                let (_, x) = sv.try_extract_tensor::<half::f16>().map_err(backend_err)?;
                let (_, y) = dv
                    .try_extract_tensor_mut::<half::f16>()
                    .map_err(backend_err)?;
                place_rows(y, x, row, heads, dp, sp, d);
            } else {
                let (_, x) = sv.try_extract_tensor::<f32>().map_err(backend_err)?;
                let (_, y) = dv.try_extract_tensor_mut::<f32>().map_err(backend_err)?;
                place_rows(y, x, row, heads, dp, sp, d);
            }
        }
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

    fn fork(&self, seq: &Sequence, len: usize) -> Result<Sequence> {
        fork_single(self, seq, len)
    }

    fn batch_decoder(&self) -> Option<&dyn BatchDecoder> {
        // Batched decoding left-pads rows, which GroupQueryAttention cannot mask.
        self.attention
            .is_standard()
            .then_some(self as &dyn BatchDecoder)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_in_place_cache_grows_by_half_in_whole_chunks_within_the_context() {
        // First call: one chunk, or what the prompt needs.
        assert_eq!(grown_capacity(0, 12, 2048), IN_PLACE_GROWTH);
        assert_eq!(grown_capacity(0, 700, 2048), 768);
        // Then 1.5×, rounded up to a chunk.
        assert_eq!(grown_capacity(256, 257, 2048), 512);
        assert_eq!(grown_capacity(768, 800, 2048), 1280);
        // A jump larger than 1.5× gets what it needs.
        assert_eq!(grown_capacity(256, 1000, 2048), 1024);
        // Never past the context, never below what is needed.
        assert_eq!(grown_capacity(1792, 1800, 2048), 2048);
        assert_eq!(grown_capacity(0, 100, 100), 100);
        assert_eq!(grown_capacity(0, 12, 200), 200);
    }

    #[test]
    fn kv_cache_modes_parse_their_names_and_refuse_others() {
        for m in [KvCacheMode::Auto, KvCacheMode::InPlace, KvCacheMode::Concat] {
            assert_eq!(m.as_str().parse::<KvCacheMode>().unwrap(), m);
        }
        match "inplace".parse::<KvCacheMode>() {
            Err(Error::InvalidOption { option, got, .. }) => {
                assert_eq!((option.as_str(), got.as_str()), ("kv_cache", "inplace"))
            }
            other => panic!("{other:?}"),
        }
    }
}
