//! `steper-calibrate`: INT8 calibration of a STEPER export from the prompts it will see at each
//! step (init, expand, aggregate) — docs/DESIGN.md, "Calibration output".
//!
//! - [`hist`]: per-tensor statistics (min/max, bounded mergeable histograms) and the three
//!   range methods (min/max, percentile, TensorRT's entropy).
//! - [`graph`]: the ONNX side — quantizable MatMul / Gemm nodes, the augmented graph that
//!   exposes their tensors, the QDQ rewrite and its validation.
//! - [`collect`]: calibration prompts (balanced step-wise records) and collection on ONNX
//!   Runtime's CPU provider.
//! - [`tables`]: TensorRT's native cache and ONNX Runtime's TensorRT flatbuffers table.
//! - [`hessian`]: GPTQ's calibration Hessians (`Σ x xᵀ` of every linear layer's input) for
//!   `steper-export --quantize int4 --calibration DIR`.
//! - [`smooth`]: SmoothQuant-style migration of activation outliers into the weights.
//! - [`report`]: int8-vs-fp32 agreement (top-1, KL) and decode speed.
//! - [`pipeline::calibrate`]: all of it, writing the output directory.
#![warn(missing_docs)]

pub mod collect;
pub mod genai;
pub mod graph;
pub mod hessian;
pub mod hist;
pub mod pipeline;
pub mod report;
pub mod smooth;
pub mod tables;

use std::path::{Path, PathBuf};

pub use hist::{Method, TensorStats};
pub use pipeline::{calibrate, CalibrateOptions, CalibrationReport, DataSource};
pub use tables::{f32_hex, int8_scale, trt_cache};

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Writing an output file or directory failed (its path, the operation, the I/O error).
    #[error(transparent)]
    Fs(#[from] steper_fsutil::FsError),
    /// A tensor range that cannot be written (negative, NaN or infinite amax).
    #[error("tensor `{tensor}`: amax must be finite and >= 0, got {amax}")]
    BadRange {
        /// The tensor name.
        tensor: String,
        /// The offending value.
        amax: f32,
    },
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A model file that is not what calibration expects.
    #[error("{path}: {message}")]
    Model {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The model has no MatMul / Gemm with a float weight initializer to quantize.
    #[error("{path}: no MatMul or Gemm with a 2-D f32 weight initializer (expected the linear layers of a steper-export decoder)")]
    NoQuantizable {
        /// The model file.
        path: PathBuf,
    },
    /// No calibration prompt could be made.
    #[error("{path}: empty calibration set ({reason})")]
    EmptyCalibration {
        /// The data file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// A calibration table that does not parse.
    #[error("{what}, line {line}: {message}")]
    Table {
        /// The file or source.
        what: String,
        /// 1-based line (0: not line-based).
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// An inconsistent statistics operation.
    #[error("statistics: {0}")]
    Stats(String),
    /// A command-line option value that is not accepted.
    #[error("{option}: expected {expected}, got {got:?}")]
    Option {
        /// The option.
        option: &'static str,
        /// What is accepted.
        expected: String,
        /// The value given.
        got: String,
    },
    /// Something this tool does not handle.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// ONNX Runtime failed.
    #[error("ONNX Runtime: {0}")]
    Ort(String),
    /// The runtime crate failed (data, prompts, backends).
    #[error(transparent)]
    Runtime(#[from] steper_runtime::Error),
    /// The export crate failed (writing the model).
    #[error(transparent)]
    Export(#[from] steper_export::Error),
    /// JSON (de)serialization failed.
    #[error("JSON: {0}")]
    Json(#[from] serde_json::Error),
}

impl Error {
    /// An I/O error on `path`.
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        Error::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, Error>;
