//! The `Generator` abstraction: a causal LM with a KV cache, whatever runs it.

use std::any::Any;

use crate::error::Result;

/// What a generator reports about itself.
///
/// ```
/// use steper_runtime::GeneratorInfo;
/// let info = GeneratorInfo::new("my-lm", 49_152, 2_048).with_providers(["CPU"]);
/// assert_eq!(info.providers, ["CPU"]);
/// assert!(info.fallbacks.is_empty());
/// ```
#[derive(Debug, Clone, serde::Serialize)]
#[non_exhaustive]
pub struct GeneratorInfo {
    /// `ort` or `tract` (or a test double).
    pub backend: String,
    /// Execution providers actually in use, in priority order (e.g. `["CPU"]`).
    pub providers: Vec<String>,
    /// Providers that were asked for but could not be registered, each with why (only with
    /// `OrtOptions::allow_fallback`; the library prints nothing, the caller reports these).
    pub fallbacks: Vec<ProviderFallback>,
    /// Number of logits per position.
    pub vocab_size: usize,
    /// Longest sequence (prompt + generated) the model accepts.
    pub context_length: usize,
}

/// A provider skipped at load because it could not be registered.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ProviderFallback {
    /// ONNX Runtime's name of the provider (e.g. `CUDAExecutionProvider`).
    pub provider: String,
    /// The registration error.
    pub reason: String,
}

impl GeneratorInfo {
    /// A generator of `backend` with `vocab_size` logits per position and `context_length`
    /// positions at most; no providers listed, no fallbacks.
    pub fn new(backend: impl Into<String>, vocab_size: usize, context_length: usize) -> Self {
        GeneratorInfo {
            backend: backend.into(),
            providers: Vec::new(),
            fallbacks: Vec::new(),
            vocab_size,
            context_length,
        }
    }

    /// The execution providers in use, in priority order.
    #[must_use]
    pub fn with_providers<S: Into<String>>(
        mut self,
        providers: impl IntoIterator<Item = S>,
    ) -> Self {
        self.providers = providers.into_iter().map(Into::into).collect();
        self
    }
}

/// Which logits [`Generator::append`] returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsMode {
    /// Only the last appended position (generation).
    Last,
    /// Every appended position (verification, scoring).
    All,
}

/// Logits of some positions, row-major `[rows, vocab]`.
#[derive(Debug, Clone)]
pub struct Logits {
    /// Number of positions.
    pub rows: usize,
    /// Vocabulary size.
    pub vocab: usize,
    /// `rows * vocab` values.
    pub data: Vec<f32>,
}

impl Logits {
    /// The logits of position `i`.
    pub fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.vocab..(i + 1) * self.vocab]
    }

    /// The logits of the last position.
    pub fn last(&self) -> &[f32] {
        self.row(self.rows - 1)
    }
}

/// One sequence being generated (batch 1): the tokens already run through the model and the
/// backend's KV cache for them. A sequence belongs to the generator that made it.
pub struct Sequence {
    /// Tokens whose keys/values are in the cache.
    pub(crate) tokens: Vec<u32>,
    /// Backend-specific cache.
    pub(crate) cache: Box<dyn Any + Send>,
}

impl Sequence {
    /// Makes a sequence around a backend cache (for backends outside this crate).
    pub fn new(cache: Box<dyn Any + Send>) -> Self {
        Sequence {
            tokens: Vec::new(),
            cache,
        }
    }

    /// Tokens held in the cache.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// Number of cached positions.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// Whether the cache is empty.
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// The backend cache, for backends.
    pub fn cache_mut(&mut self) -> &mut Box<dyn Any + Send> {
        &mut self.cache
    }

    /// Records tokens appended by a backend.
    pub fn push_tokens(&mut self, tokens: &[u32]) {
        self.tokens.extend_from_slice(tokens);
    }

    /// Forgets tokens after `len` (the backend truncates its cache).
    pub fn truncate_tokens(&mut self, len: usize) {
        self.tokens.truncate(len);
    }
}

/// A causal language model with a KV cache. Implementations are `Send + Sync`: one loaded model
/// serves many sequences from many threads; each [`Sequence`] is used by one thread at a time.
pub trait Generator: Send + Sync {
    /// What runs and its limits.
    fn info(&self) -> &GeneratorInfo;

    /// A new, empty sequence.
    fn new_sequence(&self) -> Result<Sequence>;

    /// Runs `tokens` on top of what `seq` holds (prefill when many, a decode step when one),
    /// extends its cache and returns the requested logits.
    fn append(&self, seq: &mut Sequence, tokens: &[u32], mode: LogitsMode) -> Result<Logits>;

    /// Keeps only the first `len` cached positions (to reuse a shared prefix).
    fn truncate(&self, seq: &mut Sequence, len: usize) -> Result<()>;

    /// A new sequence holding the first `len` positions of `seq` (all of them when `len` is
    /// longer), which is left as it is: how a prompt prefix computed once (few-shot
    /// demonstrations) starts every question. The ONNX backends copy the cache; this default
    /// recomputes it from the tokens, for generators that cannot copy theirs.
    fn fork(&self, seq: &Sequence, len: usize) -> Result<Sequence> {
        let len = len.min(seq.tokens.len());
        let mut out = self.new_sequence()?;
        if len > 0 {
            self.append(&mut out, &seq.tokens[..len], LogitsMode::Last)?;
        }
        Ok(out)
    }

    /// The raw batched step of this model, when it has one (the ONNX backends do; their
    /// sequences hold a batch-1 [`crate::backend::BatchCache`]). Batched evaluation needs it.
    fn batch_decoder(&self) -> Option<&dyn crate::backend::BatchDecoder> {
        None
    }
}
