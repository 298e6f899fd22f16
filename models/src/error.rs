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
