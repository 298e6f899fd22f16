//! The one error type of `steper-models`.

use std::path::PathBuf;

/// Everything that can go wrong while reading configs, building, loading, saving or importing a
/// model.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Writing an output file or directory failed (its path, the operation, the I/O error).
    #[error(transparent)]
    Fs(#[from] steper_fsutil::FsError),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A JSON file did not parse or lacks a field.
    #[error("{path}: {message}")]
    Json {
        /// The JSON file.
        path: PathBuf,
        /// What serde reported (it names the field and the line).
        message: String,
    },
    /// A config value is present but not acceptable.
    #[error("{path}: field `{field}`: expected {expected}, got {got}")]
    Config {
        /// The config file (or `<memory>`).
        path: PathBuf,
        /// The offending field.
        field: String,
        /// What was expected.
        expected: String,
        /// What was found.
        got: String,
    },
    /// A checkpoint directory is incomplete or inconsistent.
    #[error("checkpoint {path}: {message}")]
    Checkpoint {
        /// The checkpoint directory or file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A GGUF file could not be imported.
    #[error("gguf {path}: {message}")]
    Gguf {
        /// The GGUF file.
        path: PathBuf,
        /// What is wrong or unsupported.
        message: String,
    },
    /// The device cannot compute the model in the dtype asked for.
    #[error("dtype {dtype} cannot be computed on device {device} (use --dtype f32 or auto)")]
    UnsupportedDType {
        /// The dtype asked for (`bf16`, `f16`, ...).
        dtype: String,
        /// The device (`cpu`, `cuda:0`, ...).
        device: String,
    },
    /// A CUDA device was asked of a build compiled without the `cuda` feature.
    #[error(
        "--device {device}: this build lacks the `cuda` feature (candle's CUDA backend); rebuild with `{}`",
        crate::device::CUDA_BUILD_COMMAND
    )]
    CudaNotCompiled {
        /// The device asked for (`cuda:0`, ...).
        device: String,
    },
    /// The build has CUDA but the GPU of that ordinal could not be opened (no GPU, no driver,
    /// or fewer GPUs).
    #[error("--device cuda:{ordinal}: no CUDA device {ordinal} was found: {source}")]
    NoCudaDevice {
        /// The GPU ordinal asked for.
        ordinal: usize,
        /// candle's error.
        #[source]
        source: Box<candle_core::Error>,
    },
    /// A sharded checkpoint's index names a shard file that is not there.
    #[error("{index}: names shard {shard}, which does not exist")]
    MissingShard {
        /// The `model.safetensors.index.json`.
        index: PathBuf,
        /// The shard file it names.
        shard: PathBuf,
    },
    /// A tokenizer could not be built, loaded or saved.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// Inputs given to the model have the wrong shape or content.
    #[error("invalid input: {0}")]
    Input(String),
    /// An error from candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
