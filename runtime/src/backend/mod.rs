//! ONNX backends behind [`Generator`]: ONNX Runtime ([`OrtGenerator`], feature `ort`: loaded
//! dynamically, CPU / CUDA / TensorRT execution providers) and tract ([`TractGenerator`], feature
//! `tract`: pure Rust). Built with neither, the crate runs the loop on a [`Generator`] the caller
//! brings; the manifest and tokenizer checks here are always available.
//!
//! [`load_model`] opens an export directory (`steper.json`, `model.onnx`, `tokenizer.json`),
//! checks it and returns a shared [`Generator`]. Both backends also implement
//! [`BatchDecoder`], the raw batched step (left-padded batches, explicit masks and positions)
//! that the single-sequence [`Generator`] is built on.

#[cfg(feature = "ort")]
mod ort;
#[cfg(feature = "tract")]
mod tract;

use std::any::Any;
use std::path::{Path, PathBuf};
#[cfg(any(feature = "ort", feature = "tract"))]
use std::sync::Arc;

use crate::error::{Error, Result};
#[cfg(any(feature = "ort", feature = "tract"))]
use crate::generator::Generator;
use crate::generator::{Logits, LogitsMode, Sequence};
use crate::manifest::{Manifest, MANIFEST_FILE};

#[cfg(feature = "ort")]
pub use self::ort::{
    environment, library_path, loaded_library, set_library_env, ExecutionProvider, KvCacheMode,
    OptLevel, OrtGenerator, OrtOptions, TensorRtOptions, IN_PLACE_GROWTH, ORT_DYLIB_ENV,
    ORT_VERSION,
};
#[cfg(feature = "tract")]
pub use self::tract::TractGenerator;

/// Which backend runs the graph (the variants the crate's features compiled in).
#[cfg(any(feature = "ort", feature = "tract"))]
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum BackendKind {
    /// ONNX Runtime with these session options (feature `ort`).
    #[cfg(feature = "ort")]
    Ort(OrtOptions),
    /// tract (pure Rust, CPU; feature `tract`).
    #[cfg(feature = "tract")]
    Tract,
}

#[cfg(any(feature = "ort", feature = "tract"))]
impl Default for BackendKind {
    /// ONNX Runtime on CPU where it is compiled in, else tract.
    fn default() -> Self {
        #[cfg(feature = "ort")]
        return BackendKind::Ort(OrtOptions::default());
        #[cfg(not(feature = "ort"))]
        BackendKind::Tract
    }
}

#[cfg(any(feature = "ort", feature = "tract"))]
impl BackendKind {
    /// `ort` or `tract`.
    pub fn name(&self) -> &'static str {
        match self {
            #[cfg(feature = "ort")]
            BackendKind::Ort(_) => "ort",
            #[cfg(feature = "tract")]
            BackendKind::Tract => "tract",
        }
    }

    /// Sets the number of model calls that can run at once to `n` (one per worker thread):
    /// [`OrtOptions::sessions`] on ONNX Runtime; tract runs any number of calls at once on its
    /// one plan (each call has its own state), so it is unchanged.
    #[must_use]
    #[cfg_attr(not(feature = "ort"), allow(unused_variables))]
    pub fn with_concurrency(self, n: usize) -> Self {
        match self {
            #[cfg(feature = "ort")]
            BackendKind::Ort(o) => BackendKind::Ort(o.with_sessions(n)),
            #[cfg(feature = "tract")]
            BackendKind::Tract => BackendKind::Tract,
        }
    }

    /// Sets how ONNX Runtime keeps the KV cache ([`OrtOptions::kv_cache`]); tract is unchanged
    /// (its state holds the cache).
    #[cfg(feature = "ort")]
    #[must_use]
    pub fn with_kv_cache(self, mode: KvCacheMode) -> Self {
        match self {
            BackendKind::Ort(o) => BackendKind::Ort(o.with_kv_cache(mode)),
            #[cfg(feature = "tract")]
            BackendKind::Tract => BackendKind::Tract,
        }
    }

    /// ONNX Runtime's memory-pattern optimization on or off ([`OrtOptions::memory_pattern`]);
    /// tract has none.
    #[cfg(feature = "ort")]
    #[must_use]
    pub fn with_memory_pattern(self, enable: bool) -> Self {
        match self {
            BackendKind::Ort(o) => BackendKind::Ort(o.with_memory_pattern(enable)),
            #[cfg(feature = "tract")]
            BackendKind::Tract => BackendKind::Tract,
        }
    }
}

/// An export directory opened by [`load_model`].
#[cfg(any(feature = "ort", feature = "tract"))]
#[non_exhaustive]
pub struct LoadedModel {
    /// The model, shareable across threads.
    pub generator: Arc<dyn Generator>,
    /// The tokenizer of the export (checked against the vocabulary size).
    pub tokenizer: tokenizers::Tokenizer,
    /// `steper.json`.
    pub manifest: Manifest,
    /// The export directory.
    pub dir: PathBuf,
}

/// Opens the export in `dir` on `backend`: reads and checks `steper.json`, loads the tokenizer
/// (its vocabulary must fit the model's), and builds the backend session. Every missing or
/// inconsistent file is an [`Error::Model`] naming it.
#[cfg(any(feature = "ort", feature = "tract"))]
pub fn load_model(dir: &Path, backend: &BackendKind) -> Result<LoadedModel> {
    let manifest = load_manifest(dir)?;
    let tokenizer = load_tokenizer(dir, &manifest)?;
    let model_path = model_path(dir, &manifest)?;
    let generator: Arc<dyn Generator> = match backend {
        #[cfg(feature = "ort")]
        BackendKind::Ort(opts) => Arc::new(OrtGenerator::load(&model_path, &manifest, opts)?),
        #[cfg(feature = "tract")]
        BackendKind::Tract => Arc::new(TractGenerator::load(&model_path, &manifest)?),
    };
    Ok(LoadedModel {
        generator,
        tokenizer,
        manifest,
        dir: dir.to_path_buf(),
    })
}

/// Reads `dir/steper.json` (format and version checked).
pub fn load_manifest(dir: &Path) -> Result<Manifest> {
    let path = dir.join(MANIFEST_FILE);
    if !path.is_file() {
        return Err(Error::Model {
            path,
            message: format!("{MANIFEST_FILE} not found (is this a steper-export directory?)"),
        });
    }
    Manifest::load(&path)
}

/// The graph file named by the manifest; an error when it is missing or empty.
pub fn model_path(dir: &Path, manifest: &Manifest) -> Result<PathBuf> {
    let path = dir.join(&manifest.model_file);
    match std::fs::metadata(&path) {
        Ok(m) if m.is_file() && m.len() > 0 => Ok(path),
        Ok(_) => Err(Error::Model {
            path,
            message: "model file is empty or not a file".into(),
        }),
        Err(_) => Err(Error::Model {
            path,
            message: "model file not found".into(),
        }),
    }
}

/// Loads the manifest's tokenizer and checks that its ids fit the model's vocabulary.
pub fn load_tokenizer(dir: &Path, manifest: &Manifest) -> Result<tokenizers::Tokenizer> {
    let path = dir.join(&manifest.tokenizer_file);
    if !path.is_file() {
        return Err(Error::Model {
            path,
            message: "tokenizer file not found".into(),
        });
    }
    // tokenizers 0.23 panics (instead of returning its error) on a syntax error inside the
    // `decoder` object: caught here and reported as the file's error.
    let tok = std::panic::catch_unwind(|| tokenizers::Tokenizer::from_file(&path))
        .map_err(|_| Error::Model {
            path: path.clone(),
            message: "tokenizer does not load: malformed `decoder`".into(),
        })?
        .map_err(|e| Error::Model {
            path: path.clone(),
            message: format!("tokenizer does not load: {e}"),
        })?;
    let n = tok.get_vocab_size(true);
    if n > manifest.graph.vocab_size {
        return Err(Error::Model {
            path,
            message: format!(
                "tokenizer has {n} tokens but the model's vocab_size is {} (tokenizer of another model?)",
                manifest.graph.vocab_size
            ),
        });
    }
    Ok(tok)
}

/// One batched call of the decoder graph, in the graph's own terms (Optimum conventions).
#[derive(Debug, Clone)]
pub struct BatchInput {
    /// Rows.
    pub batch: usize,
    /// New tokens per row.
    pub seq: usize,
    /// `[batch, seq]` token ids (padding ids are arbitrary valid ids).
    pub input_ids: Vec<i64>,
    /// `[batch, past + seq]`: 1 for a real token, 0 for padding (cached and new positions).
    pub attention_mask: Vec<i64>,
    /// `[batch, seq]` RoPE positions (real tokens counted per row; 0 for padding).
    pub position_ids: Vec<i64>,
}

impl BatchInput {
    /// Builds the step for left-padded rows of new tokens appended to a cache of `past`
    /// positions whose mask is `past_mask` (`[batch, past]`); `None` marks padding. Positions
    /// continue from `next_pos` per row, which is advanced.
    pub fn left_padded(
        rows: &[Vec<Option<u32>>],
        past_mask: &[Vec<i64>],
        next_pos: &mut [i64],
    ) -> Result<Self> {
        let batch = rows.len();
        let seq = rows.first().map(|r| r.len()).unwrap_or(0);
        if rows.iter().any(|r| r.len() != seq)
            || past_mask.len() != batch
            || next_pos.len() != batch
        {
            return Err(Error::Misuse {
                call: "BatchInput::new",
                problem: "rows, masks and positions must agree in batch and length".into(),
            });
        }
        let mut input_ids = Vec::with_capacity(batch * seq);
        let mut attention_mask = Vec::new();
        let mut position_ids = Vec::with_capacity(batch * seq);
        for (r, row) in rows.iter().enumerate() {
            attention_mask.extend_from_slice(&past_mask[r]);
            for t in row {
                match t {
                    Some(id) => {
                        input_ids.push(*id as i64);
                        attention_mask.push(1);
                        position_ids.push(next_pos[r]);
                        next_pos[r] += 1;
                    }
                    None => {
                        input_ids.push(0);
                        attention_mask.push(0);
                        position_ids.push(0);
                    }
                }
            }
        }
        Ok(BatchInput {
            batch,
            seq,
            input_ids,
            attention_mask,
            position_ids,
        })
    }

    #[cfg_attr(not(any(feature = "ort", feature = "tract")), allow(dead_code))]
    pub(crate) fn check(&self, past: usize, batch: usize) -> Result<()> {
        if self.batch != batch {
            return Err(Error::Misuse {
                call: "BatchDecoder::decode",
                problem: format!("cache holds batch {batch}, input has batch {}", self.batch),
            });
        }
        let n = self.batch * self.seq;
        if self.input_ids.len() != n || self.position_ids.len() != n {
            return Err(Error::Misuse {
                call: "BatchDecoder::decode",
                problem: format!("input_ids / position_ids must hold batch*seq = {n} values"),
            });
        }
        if self.attention_mask.len() != self.batch * (past + self.seq) {
            return Err(Error::Misuse {
                call: "BatchDecoder::decode",
                problem: format!(
                    "attention_mask must hold batch*(past+seq) = {} values, got {}",
                    self.batch * (past + self.seq),
                    self.attention_mask.len()
                ),
            });
        }
        Ok(())
    }
}

/// A backend's KV cache for a batch (held on the backend's side; opaque here).
pub struct BatchCache {
    /// Rows.
    pub(crate) batch: usize,
    /// Cached positions.
    pub(crate) past: usize,
    /// Backend-specific per-layer keys and values.
    #[cfg_attr(not(any(feature = "ort", feature = "tract")), allow(dead_code))]
    pub(crate) inner: Box<dyn Any + Send>,
}

impl BatchCache {
    /// Rows.
    pub fn batch(&self) -> usize {
        self.batch
    }

    /// Cached positions.
    pub fn past(&self) -> usize {
        self.past
    }
}

/// The raw batched decoder step shared by the backends.
pub trait BatchDecoder: Send + Sync {
    /// An empty cache for `batch` rows.
    fn new_cache(&self, batch: usize) -> Result<BatchCache>;

    /// Runs one call of the graph; the cache is replaced by the graph's `present.*` outputs.
    /// Returns the logits of every new position (`rows = batch * seq`, row-major by batch) or
    /// of the last position of each row (`rows = batch`).
    fn step(&self, cache: &mut BatchCache, input: &BatchInput, mode: LogitsMode) -> Result<Logits>;

    /// Keeps the first `len` cached positions.
    fn truncate_cache(&self, cache: &mut BatchCache, len: usize) -> Result<()>;

    /// A new cache holding a copy of the first `len` positions of `cache` (`len` at most
    /// `cache.past()`); `cache` is left as it is.
    fn copy_cache(&self, cache: &BatchCache, len: usize) -> Result<BatchCache>;

    /// Puts `n` positions in front of every row (their keys and values are zeros; the caller
    /// masks them out), e.g. to make room for a longer row.
    fn pad_front(&self, cache: &mut BatchCache, n: usize) -> Result<()>;

    /// Drops the first `n` positions of every row (padding every row has in common).
    fn trim_front(&self, cache: &mut BatchCache, n: usize) -> Result<()>;

    /// Copies the cache of one sequence (`src`, batch 1) into row `row` of `dst`, right-aligned:
    /// its positions become the last `src.past()` positions of the row; the row's earlier
    /// positions are left as they are (the caller masks them out). Needs
    /// `src.past() <= dst.past()`.
    fn place_row(&self, dst: &mut BatchCache, row: usize, src: &BatchCache) -> Result<()>;

    /// A new cache of `rows.len()` rows with `cache`'s positions: row `i` is a copy of
    /// `cache`'s row `rows[i]`, or all zeros for `None` (the caller masks it out). Shrinks a
    /// batch to the rows still in use, reorders it, or adds empty rows.
    fn select_rows(&self, cache: &BatchCache, rows: &[Option<usize>]) -> Result<BatchCache>;
}

/// The checks shared by the backends' [`BatchDecoder::select_rows`].
#[cfg_attr(not(any(feature = "ort", feature = "tract")), allow(dead_code))]
pub(crate) fn check_select(cache: &BatchCache, rows: &[Option<usize>]) -> Result<()> {
    if rows.is_empty() || rows.iter().flatten().any(|&r| r >= cache.batch) {
        return Err(Error::Misuse {
            call: "BatchDecoder::select_rows",
            problem: format!(
                "rows {rows:?} of a cache of {} rows (at least one row, each below the count)",
                cache.batch
            ),
        });
    }
    Ok(())
}

/// `rows.len()` blocks of `block` elements: block `i` a copy of `data`'s block `rows[i]`, or
/// zeros.
#[cfg_attr(not(any(feature = "ort", feature = "tract")), allow(dead_code))]
pub(crate) fn select_blocks<T: Copy + Default>(
    data: &[T],
    block: usize,
    rows: &[Option<usize>],
) -> Vec<T> {
    let mut out = vec![T::default(); rows.len() * block];
    for (i, r) in rows.iter().enumerate() {
        if let Some(r) = r {
            out[i * block..(i + 1) * block].copy_from_slice(&data[r * block..(r + 1) * block]);
        }
    }
    out
}

/// The checks shared by the backends' [`BatchDecoder::place_row`].
#[cfg_attr(not(any(feature = "ort", feature = "tract")), allow(dead_code))]
pub(crate) fn check_place(dst: &BatchCache, row: usize, src: &BatchCache) -> Result<()> {
    if src.batch != 1 || row >= dst.batch || src.past > dst.past {
        return Err(Error::Misuse {
            call: "BatchDecoder::place_row",
            problem: format!(
                "a batch-1 cache of {} positions does not fit row {row} of a batch of {} rows × {} positions",
                src.past, dst.batch, dst.past
            ),
        });
    }
    Ok(())
}

/// [`Generator::append`] for any [`BatchDecoder`]: batch 1, no padding.
#[cfg_attr(not(any(feature = "ort", feature = "tract")), allow(dead_code))]
pub(crate) fn append_single(
    dec: &dyn BatchDecoder,
    context_length: usize,
    seq: &mut Sequence,
    tokens: &[u32],
    mode: LogitsMode,
) -> Result<Logits> {
    if tokens.is_empty() {
        return Err(Error::Misuse {
            call: "Generator::append",
            problem: "no tokens".into(),
        });
    }
    let past = seq.tokens.len();
    if past + tokens.len() > context_length {
        return Err(Error::SequenceTooLong {
            tokens: past + tokens.len(),
            context_length,
        });
    }
    let cache = seq
        .cache
        .downcast_mut::<BatchCache>()
        .ok_or(Error::ForeignSequence)?;
    let input = BatchInput {
        batch: 1,
        seq: tokens.len(),
        input_ids: tokens.iter().map(|&t| t as i64).collect(),
        attention_mask: vec![1; past + tokens.len()],
        position_ids: (past as i64..(past + tokens.len()) as i64).collect(),
    };
    let logits = dec.step(cache, &input, mode)?;
    seq.push_tokens(tokens);
    Ok(logits)
}

/// [`Generator::truncate`] for any [`BatchDecoder`].
#[cfg_attr(not(any(feature = "ort", feature = "tract")), allow(dead_code))]
pub(crate) fn truncate_single(
    dec: &dyn BatchDecoder,
    seq: &mut Sequence,
    len: usize,
) -> Result<()> {
    if len >= seq.tokens.len() {
        return Ok(());
    }
    let cache = seq
        .cache
        .downcast_mut::<BatchCache>()
        .ok_or(Error::ForeignSequence)?;
    dec.truncate_cache(cache, len)?;
    seq.truncate_tokens(len);
    Ok(())
}

/// [`Generator::fork`] for any [`BatchDecoder`]: copies the cache, not recomputes it.
#[cfg_attr(not(any(feature = "ort", feature = "tract")), allow(dead_code))]
pub(crate) fn fork_single(dec: &dyn BatchDecoder, seq: &Sequence, len: usize) -> Result<Sequence> {
    let len = len.min(seq.tokens.len());
    let cache = seq
        .cache
        .downcast_ref::<BatchCache>()
        .ok_or(Error::ForeignSequence)?;
    let mut out = Sequence::new(Box::new(dec.copy_cache(cache, len)?));
    out.push_tokens(&seq.tokens[..len]);
    Ok(out)
}

/// Checks that the graph's inputs and outputs are the manifest's, in any order.
#[cfg_attr(not(any(feature = "ort", feature = "tract")), allow(dead_code))]
pub(crate) fn check_io(
    path: &Path,
    manifest: &Manifest,
    inputs: &[String],
    outputs: &[String],
) -> Result<()> {
    for (what, want, got) in [
        ("inputs", &manifest.graph.inputs, inputs),
        ("outputs", &manifest.graph.outputs, outputs),
    ] {
        let mut a = want.clone();
        let mut b = got.to_vec();
        a.sort();
        b.sort();
        if a != b {
            return Err(Error::Model {
                path: path.to_path_buf(),
                message: format!("graph {what} {got:?} do not match the manifest's {want:?}"),
            });
        }
    }
    Ok(())
}
