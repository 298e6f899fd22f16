//! STEPER training: teachers, step-wise distillation data and the σ-weighted trainer. The
//! `steper-train` binary is a thin layer over this library and over `steper_models` (import,
//! generation).
#![warn(missing_docs)]

pub mod error;

pub use error::{Error, Result};
