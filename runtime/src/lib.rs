//! The STEPER edge runtime: data formats, the prompt template, metrics, BM25 retrieval and the
//! multi-step reasoning loop, run on ONNX Runtime (`ort`) or tract. No candle dependency, so the
//! edge binary stays small.
#![warn(missing_docs)]

pub mod answer;
pub mod backend;
pub mod control;
pub mod data;
pub mod engine;
pub mod error;
pub mod eval;
pub mod fewshot;
pub mod generator;
pub mod manifest;
pub mod metrics;
pub mod prompt;
pub mod reasoning;
pub mod retrieval;
mod sampling;
pub mod serve;

pub use backend::{
    load_model, BackendKind, ExecutionProvider, KvCacheMode, LoadedModel, OptLevel, OrtOptions,
    TensorRtOptions,
};
pub use control::{Cancel, LoopControl, StepObserver};
pub use engine::{Engine, EngineBuilder, ReasonOptions};
pub use error::{Error, Result};
pub use generator::{Generator, GeneratorInfo, Logits, LogitsMode, Sequence};
pub use manifest::{Manifest, TEMPLATE_VERSION};
pub use reasoning::{reason, reason_with, GeneratorStepModel, LoopOptions, Reasoning, StepModel};
pub use retrieval::{Bm25Index, Retriever};
