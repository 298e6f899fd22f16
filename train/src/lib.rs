//! STEPER training: teachers, step-wise distillation data and the σ-weighted trainer. The
//! `steper-train` binary is a thin layer over this library and over `steper_models` (import,
//! generation).
#![warn(missing_docs)]

pub mod bench;
pub mod distill;
pub mod error;
pub mod fit;
pub mod plot;
pub mod student;
pub mod synth;
pub mod teacher;

pub use error::{Error, Result};
