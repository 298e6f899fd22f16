//! The one error type of `steper-runtime`.

use std::path::PathBuf;

/// Everything the runtime can report. Variants carry the structured facts (file, line, field,
/// what was expected); add a variant rather than formatting facts into a string elsewhere.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Writing an output file or directory failed (its path, the operation, the I/O error).
    #[error(transparent)]
    Fs(#[from] steper_fsutil::FsError),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A line of a JSONL file is malformed.
    #[error("{path}:{line}: {message}")]
    BadLine {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong (serde names the field).
        message: String,
    },
    /// A record of a data file (a JSONL line or an element of a JSON array) is not valid JSON or
    /// does not have the shape of its format.
    #[error("{path}: {at}: {message}")]
    BadRecord {
        /// The file.
        path: PathBuf,
        /// The record's line or index.
        at: crate::data::RecordAt,
        /// What is wrong (serde's message names the field where it can).
        message: String,
    },
    /// A field of a record of a dataset file has a value its format does not allow.
    #[error("{path}: {at}: field `{field}`: expected {expected}, got {got}")]
    BadField {
        /// The file.
        path: PathBuf,
        /// The record's line or index.
        at: crate::data::RecordAt,
        /// The field, with its position inside the record (`context[2][1]`).
        field: String,
        /// What the format allows there.
        expected: &'static str,
        /// What the record holds (shortened).
        got: String,
    },
    /// The format of a QA file cannot be told from its first record.
    #[error("{path}: {at}: not a QA format this runtime reads (keys: {keys}); expected the project's schema (`id`, `question`, `answers`), HotpotQA / 2WikiMultiHopQA (`_id`, `context`, `supporting_facts`), MuSiQue (`paragraphs` with `paragraph_text`), FlashRAG (`golden_answers`) or IRCoT (`question_text`, `answers_objects`)")]
    UnknownFormat {
        /// The file.
        path: PathBuf,
        /// The record looked at.
        at: crate::data::RecordAt,
        /// The record's keys (or its JSON type when it is not an object).
        keys: String,
    },
    /// A compressed file could not be decompressed.
    #[error("{path}: {format}: {message}")]
    Decompress {
        /// The file.
        path: PathBuf,
        /// `gzip` or `zstd`.
        format: &'static str,
        /// What failed.
        message: String,
    },
    /// A model directory is missing a file or holds an inconsistent one.
    #[error("model {path}: {message}")]
    Model {
        /// The file or directory.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A backend (ONNX Runtime, tract) failed or could not be set up.
    #[error("{backend}: {message}")]
    Backend {
        /// `ort` or `tract`.
        backend: &'static str,
        /// What failed.
        message: String,
    },
    /// An execution provider that was asked for cannot be registered.
    #[error("execution provider {provider} is not available: {reason}")]
    ProviderUnavailable {
        /// The provider name.
        provider: String,
        /// What is missing.
        reason: String,
    },
    /// The ONNX Runtime shared library could not be loaded.
    #[error("ONNX Runtime library {path}: {reason}")]
    OrtLibrary {
        /// The library path tried.
        path: PathBuf,
        /// Why it failed.
        reason: String,
    },
    /// No ONNX Runtime library was named: neither `OrtOptions::library` nor `ORT_DYLIB_PATH`.
    #[error("no ONNX Runtime library given: set OrtOptions::library or the ORT_DYLIB_PATH environment variable to libonnxruntime.so")]
    OrtLibraryUnset,
    /// An option of a builder or a command has a value it cannot take.
    #[error("option {option}: expected {expected}, got {got}")]
    InvalidOption {
        /// The option (field or flag name).
        option: String,
        /// What it accepts.
        expected: String,
        /// The value given.
        got: String,
    },
    /// A record of a data file has an empty field the loop needs.
    #[error("{path}: record {id:?}: field `{field}` is empty")]
    EmptyField {
        /// The file.
        path: PathBuf,
        /// The record's id.
        id: String,
        /// The field.
        field: &'static str,
    },
    /// Two records of a data file share an id.
    #[error("{path}: field `id`: {id:?} appears twice")]
    DuplicateId {
        /// The file.
        path: PathBuf,
        /// The repeated id.
        id: String,
    },
    /// More few-shot demonstrations were asked for than a prompt file holds.
    #[error("{path}: {asked} demonstrations asked for, the file has {available}")]
    TooFewDemonstrations {
        /// The prompt file.
        path: PathBuf,
        /// Demonstrations asked for.
        asked: usize,
        /// Demonstrations in the file.
        available: usize,
    },
    /// The model returned no finite logit (an empty vocabulary, or NaN everywhere).
    #[error("the model returned no finite logit (empty vocabulary or NaN)")]
    NonFiniteLogits,
    /// A value could not be written as JSON.
    #[error("{what}: cannot be written as JSON: {message}")]
    Json {
        /// What was being written.
        what: &'static str,
        /// serde's message.
        message: String,
    },
    /// An invariant of the runtime does not hold: a bug in the runtime, reported instead of a
    /// panic.
    #[error("internal error: {0}")]
    Internal(String),
    /// The question is empty (or only whitespace).
    #[error("the question is empty")]
    EmptyQuestion,
    /// The run was cancelled (its [`crate::control::Cancel`] token, or its observer stopped it).
    #[error("the run was cancelled")]
    Cancelled,
    /// The run passed the deadline of its [`crate::control::Cancel`] token.
    #[error("the run passed its deadline ({after_ms:.0} ms after the token was made)")]
    DeadlineExceeded {
        /// Milliseconds from the token's creation to its deadline.
        after_ms: f64,
    },
    /// A tokenizer failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A prompt cannot fit the model's context even with every passage removed (the question,
    /// the reasoning and the answer prefix are never cut).
    #[error("prompt needs {tokens} tokens without any passage; the context leaves {budget} for it (question too long for the model's context)")]
    ContextOverflow {
        /// Tokens of the prompt with all passages removed.
        tokens: usize,
        /// Tokens available for the prompt (context length minus the generation allowance).
        budget: usize,
    },
    /// A sequence (or KV cache) handed to a generator or backend that did not make it.
    #[error("the sequence belongs to another generator or backend")]
    ForeignSequence,
    /// A sequence would grow past the model's context.
    #[error("a sequence of {tokens} tokens exceeds the context length {context_length}")]
    SequenceTooLong {
        /// Tokens the sequence would hold.
        tokens: usize,
        /// The model's context length.
        context_length: usize,
    },
    /// An API call made out of order, or with arguments that do not fit together (a bug in the
    /// caller, not bad data).
    #[error("{call}: {problem}")]
    Misuse {
        /// The function or method.
        call: &'static str,
        /// What does not fit.
        problem: String,
    },
    /// A lock was poisoned: another thread panicked while holding it.
    #[error("{what}: a thread panicked while holding its lock")]
    Poisoned {
        /// What the lock guards.
        what: &'static str,
    },
    /// A worker thread panicked.
    #[error("{what} panicked")]
    WorkerPanicked {
        /// Which worker.
        what: &'static str,
    },
    /// The search index (tantivy) failed.
    #[error("index {path}: {message}")]
    Index {
        /// The index directory.
        path: PathBuf,
        /// What failed.
        message: String,
    },
    /// A directory holds an index of another schema than this runtime writes.
    #[error(
        "index {path}: not a steper-run index ({message}); rebuild it with `steper-run index`"
    )]
    IndexSchema {
        /// The index directory.
        path: PathBuf,
        /// Which field is missing or differs.
        message: String,
    },
    /// The HTTP service could not start or stopped with an error.
    #[error("server {addr}: {message}")]
    Server {
        /// The listening address (or the one asked for).
        addr: String,
        /// What failed.
        message: String,
    },
    /// A chat template could not be read, compiled or rendered (the template's file, the Jinja
    /// engine's message, with the template line when it knows one).
    #[error("chat template {path}{}: {message}", line.map(|l| format!(" line {l}")).unwrap_or_default())]
    ChatTemplate {
        /// The file the template came from (`tokenizer_config.json`, a `.jinja` file).
        path: PathBuf,
        /// The template line, when the engine reports one.
        line: Option<usize>,
        /// The Jinja error (or the `raise_exception` message of the template).
        message: String,
    },
    /// A corpus to index holds no document.
    #[error("corpus {path}: no documents to index")]
    EmptyCorpus {
        /// The corpus file (or the first QA file it was built from).
        path: PathBuf,
    },
    /// A file of evaluation records holds none.
    #[error("{path}: no evaluation records")]
    NoRecords {
        /// The record file.
        path: PathBuf,
    },
    /// A record file to compare with a baseline does not hold the baseline's questions.
    #[error("{path}: its question ids differ from those of {baseline}: {} of the baseline's missing{}, {} not in the baseline{}", .missing_count, id_list(.missing, *.missing_count), .extra_count, id_list(.extra, *.extra_count))]
    QuestionSetsDiffer {
        /// The record file compared.
        path: PathBuf,
        /// The baseline's record file.
        baseline: PathBuf,
        /// The first ids of the baseline that `path` lacks.
        missing: Vec<String>,
        /// How many ids of the baseline `path` lacks.
        missing_count: usize,
        /// The first ids of `path` that the baseline lacks.
        extra: Vec<String>,
        /// How many ids of `path` the baseline lacks.
        extra_count: usize,
    },
    /// A record file to compare with a baseline asks another question under one of its ids.
    #[error(
        "{path}:{line}: field `question`: id {id:?} holds another question than in {baseline}"
    )]
    QuestionMismatch {
        /// The record file compared.
        path: PathBuf,
        /// 1-based line of the record.
        line: usize,
        /// The record's id.
        id: String,
        /// The baseline's record file.
        baseline: PathBuf,
    },
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// ` (a, b, c, …)` for the first ids of a list of `total`; nothing when it is empty.
fn id_list(first: &[String], total: usize) -> String {
    if first.is_empty() {
        return String::new();
    }
    let more = if total > first.len() { ", …" } else { "" };
    format!(" ({}{more})", first.join(", "))
}

impl Error {
    /// An I/O error on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
