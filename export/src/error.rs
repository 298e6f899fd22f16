//! The one error type of `steper-export`.

use std::path::PathBuf;

/// Everything that can go wrong while exporting or verifying a model.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Writing an output file or directory failed (its path, the operation, the I/O error).
    #[error(transparent)]
    Fs(#[from] steper_fsutil::FsError),
    /// Loading the checkpoint or running the candle reference failed.
    #[error(transparent)]
    Model(#[from] steper_models::Error),
    /// Loading or running the export through a runtime backend failed.
    #[error(transparent)]
    Runtime(#[from] steper_runtime::Error),
    /// A candle tensor operation failed while converting weights.
    #[error("tensor `{name}`: {message}")]
    Tensor {
        /// HF name of the tensor.
        name: String,
        /// What candle reported.
        message: String,
    },
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// An export option is not acceptable.
    #[error("option `{option}`: expected {expected}, got {got}")]
    Option {
        /// The option name (as on the command line).
        option: &'static str,
        /// What is accepted.
        expected: String,
        /// What was given.
        got: String,
    },
    /// `--block-size` does not divide a quantized layer's input dimension.
    #[error("option `--block-size`: {block_size} does not divide the input dimension {input_dim} of layer `{layer}`")]
    BlockSize {
        /// HF name of the weight.
        layer: String,
        /// Its input dimension (`K`).
        input_dim: usize,
        /// The block size asked for.
        block_size: usize,
    },
    /// A calibration directory (`--calibration`) that cannot be used: unreadable, not written
    /// by `steper-calibrate --hessians`, or made for another model.
    #[error("calibration directory {dir}: {message}")]
    Calibration {
        /// The directory (or the file in it).
        dir: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A weight to quantize with GPTQ has no Hessian in the calibration directory.
    #[error("calibration directory {dir}: no Hessian for weight `{weight}` (calibrated with another model or an older steper-calibrate?)")]
    MissingHessian {
        /// The directory.
        dir: PathBuf,
        /// HF name of the weight.
        weight: String,
    },
    /// The model cannot be expressed by this exporter.
    #[error("unsupported model: {0}")]
    Unsupported(String),
    /// JSON serialization failed.
    #[error("json: {0}")]
    Json(#[from] serde_json::Error),
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// An I/O error on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
