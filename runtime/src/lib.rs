//! The STEPER edge runtime: data formats, the prompt template, metrics, retrieval and the
//! multi-step reasoning loop, run on ONNX Runtime (`ort`) or tract. No candle dependency, so the
//! edge binary stays small.
//!
//! # Features
//!
//! The loop ([`reason`], [`Engine`]), the prompt, the data formats, the metrics, the manifest and
//! the [`Generator`] / [`StepModel`] / [`Retriever`] traits build with no feature. Each feature
//! adds one capability:
//!
//! | feature    | adds                                                                 |
//! |------------|----------------------------------------------------------------------|
//! | `ort`      | ONNX Runtime backend ([`OrtOptions`], CPU / CUDA / TensorRT providers) |
//! | `tract`    | tract backend (pure Rust, CPU)                                        |
//! | `bm25`     | BM25 retrieval over a tantivy index ([`Bm25Index`], `build_index`)    |
//! | `progress` | indicatif progress bars for indexing, retrieval and evaluation        |
//! | `server`   | the HTTP service (`serve`: router, worker pool, metrics)              |
//! | `cli`      | the `steper-run` binary (all of the above); the default               |
//!
//! An edge service that runs the loop on ONNX Runtime with its own retriever depends on
//! `steper-runtime = { default-features = false, features = ["ort"] }` (see
//! `examples/embed_ort.rs`).
#![warn(missing_docs)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

// Formats and helpers shared with the toolchain's other crates (trainer, exporter, calibrator):
// public modules, each documented.
pub mod answer;
pub mod data;
pub mod eval;
pub mod fewshot;
pub mod manifest;
pub mod metrics;
pub mod prompt;
pub mod retrieval;

// Backends: the module holds what an embedder needs to load and configure a model; the ort and
// tract internals stay inside it.
pub mod backend;
#[cfg(feature = "server")]
pub mod serve;

// The loop and its types: private modules, re-exported below.
mod control;
mod engine;
mod error;
mod generator;
mod progress;
mod reasoning;
mod sampling;

#[cfg(any(feature = "ort", feature = "tract"))]
pub use backend::{load_model, BackendKind, LoadedModel};
#[cfg(feature = "ort")]
pub use backend::{ExecutionProvider, KvCacheMode, OptLevel, OrtOptions, TensorRtOptions};
pub use control::{Cancel, LoopControl, StepObserver};
pub use engine::{Engine, EngineBuilder, ReasonOptions};
pub use error::{Error, Result};
pub use generator::{Generator, GeneratorInfo, Logits, LogitsMode, ProviderFallback, Sequence};
pub use manifest::{Manifest, TEMPLATE_VERSION};
pub use reasoning::{
    reason, reason_with, Decoding, GeneratorStepModel, HeldPassage, LoopOptions, LoopRun,
    PassageRef, PromptPrefix, Reasoning, StepModel, StepOutput, StepRequest, StepTrace,
};
#[cfg(feature = "bm25")]
pub use retrieval::Bm25Index;
pub use retrieval::Retriever;
