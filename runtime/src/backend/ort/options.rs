//! The backend's options: graph optimization level, execution providers (TensorRT's own
//! options), how the KV cache is kept, and the session options that gather them.

use std::path::PathBuf;

use crate::error::{Error, Result};

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
    /// Where to write the graph as ONNX Runtime runs it after its optimizations (fusions such as
    /// `SimplifiedLayerNormalization`, constant folding, prepacking-ready layouts), with its
    /// initializers in `<path>.data`: to see which fusions an export gets. Written by the first
    /// session of the pool; `None` (the default) writes nothing. The file is specific to this
    /// machine's CPU and ONNX Runtime version (ONNX Runtime may insert layout-specific nodes).
    pub optimized_model: Option<PathBuf>,
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
            optimized_model: None,
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

    /// Writes ONNX Runtime's optimized graph to `path` ([`OrtOptions::optimized_model`]).
    pub fn with_optimized_model(mut self, path: impl Into<PathBuf>) -> Self {
        self.optimized_model = Some(path.into());
        self
    }

    /// The ONNX Runtime shared library to load (instead of `ORT_DYLIB_PATH`).
    pub fn with_library(mut self, path: impl Into<PathBuf>) -> Self {
        self.library = Some(path.into());
        self
    }

    pub(super) fn validate(&self) -> Result<()> {
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
