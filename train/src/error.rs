//! The one error type of `steper-train`.

use std::path::PathBuf;

/// Everything the training library can report.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Writing an output file or directory failed (its path, the operation, the I/O error).
    #[error(transparent)]
    Fs(#[from] steper_fsutil::FsError),
    /// An error from the models crate (config, checkpoint, GGUF, candle).
    #[error(transparent)]
    Models(#[from] steper_models::Error),
    /// An error from the runtime crate (data files, retrieval, prompt).
    #[error(transparent)]
    Runtime(#[from] steper_runtime::Error),
    /// An error from candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Invalid input.
    #[error("invalid input: {0}")]
    Input(String),
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, Error>;
