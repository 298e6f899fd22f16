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

mod batch;
mod cache;
mod library;
mod options;
mod pool;
mod weights;

use std::path::Path;
use std::sync::{Condvar, Mutex};

use ::ort::session::builder::{PrepackedWeights, SessionBuilder};
use ::ort::value::{DynValue, TensorElementType, ValueType};

pub use self::library::{
    environment, library_path, loaded_library, set_library_env, ORT_DYLIB_ENV, ORT_VERSION,
};
pub use self::options::{
    grown_capacity, ExecutionProvider, KvCacheMode, OptLevel, OrtOptions, TensorRtOptions,
    IN_PLACE_GROWTH,
};
pub use self::weights::SHARE_WEIGHTS_FROM_SESSIONS;

use self::pool::{session_builder, SessionPool, SharedWeights};
use self::weights::shared_initializers;
use super::{append_single, check_io, fork_single, truncate_single, BatchDecoder};
use crate::error::{Error, Result};
use crate::generator::{Generator, GeneratorInfo, Logits, LogitsMode, Sequence};
use crate::manifest::{AttentionOp, Manifest};

fn backend_err(message: impl std::fmt::Display) -> Error {
    Error::Backend {
        backend: "ort",
        message: message.to_string(),
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
    ///
    /// [`InPlaceCache`]: cache::InPlaceCache
    in_place: bool,
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
        let (mut b, used, fallbacks) = session_builder(manifest, opts, shared.as_ref(), true)?;
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
            let (mut b, _, _) = session_builder(manifest, opts, shared.as_ref(), false)?;
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
