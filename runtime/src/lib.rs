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
//! the `steper-embed-ort` crate of the workspace, `embed-ort/src/main.rs`).
//!
//! # The API
//!
//! - [`Engine`] (made by [`EngineBuilder`]) holds a model, its tokenizer and a [`Retriever`];
//!   [`Engine::reason`] runs the loop on one question with [`ReasonOptions`] (the
//!   [`LoopOptions`], KV-prefix reuse, [`Decoding`], a [`StepObserver`] and a [`Cancel`]) and
//!   returns a [`Reasoning`] with its [`StepTrace`]s.
//! - The three traits: [`Generator`] (a causal LM with a KV cache: the ONNX backends, or yours),
//!   [`StepModel`] (what writes one step: a generator, a teacher) and [`Retriever`].
//! - [`backend`]: loading an exported model on ONNX Runtime ([`OrtOptions`]) or tract.
//! - Every failure is an [`Error`] whose variants carry what a caller matches on.
//! - The formats the toolchain shares live in [`data`], [`prompt`], [`manifest`], [`metrics`],
//!   [`eval`], [`answer`], [`fewshot`] and [`retrieval`]; [`serve`] (feature `server`) is the
//!   HTTP service.
//!
//! # Example
//!
//! The loop on a toy word-level language model and a two-passage retriever, both made here;
//! an embedder would pass `.model_dir(…)` and `.backend(…)` instead of `.generator(…)`.
//!
//! ```
//! use std::collections::HashSet;
//! use std::sync::Arc;
//! use steper_runtime::retrieval::Hit;
//! use steper_runtime::{Engine, Retriever};
//! # use steper_runtime::{Error, Generator, GeneratorInfo, Logits, LogitsMode, Sequence};
//! #
//! # /// Says "So the answer is: Paris" whatever the prompt, then stops.
//! # struct ToyLm(GeneratorInfo);
//! # const EOS: u32 = 1;
//! # impl ToyLm {
//! #     fn next(last: Option<u32>) -> u32 {
//! #         match last { Some(t @ 2..=5) => t + 1, Some(6) => EOS, _ => 2 }
//! #     }
//! # }
//! # impl Generator for ToyLm {
//! #     fn info(&self) -> &GeneratorInfo { &self.0 }
//! #     fn new_sequence(&self) -> steper_runtime::Result<Sequence> {
//! #         Ok(Sequence::new(Box::new(())))
//! #     }
//! #     fn append(&self, seq: &mut Sequence, tokens: &[u32], mode: LogitsMode)
//! #         -> steper_runtime::Result<Logits> {
//! #         if seq.len() + tokens.len() > self.0.context_length {
//! #             return Err(Error::SequenceTooLong {
//! #                 tokens: seq.len() + tokens.len(),
//! #                 context_length: self.0.context_length,
//! #             });
//! #         }
//! #         let rows = if mode == LogitsMode::All { tokens.len() } else { 1 };
//! #         let vocab = self.0.vocab_size;
//! #         let mut data = vec![0.0; rows * vocab];
//! #         for r in 0..rows {
//! #             let last = tokens.get(tokens.len() - rows + r).copied();
//! #             data[r * vocab + Self::next(last) as usize] = 10.0;
//! #         }
//! #         seq.push_tokens(tokens);
//! #         Ok(Logits { rows, vocab, data })
//! #     }
//! #     fn truncate(&self, seq: &mut Sequence, len: usize) -> steper_runtime::Result<()> {
//! #         seq.truncate_tokens(len);
//! #         Ok(())
//! #     }
//! # }
//! # fn toy_tokenizer() -> tokenizers::Tokenizer {
//! #     let json = r#"{"version": "1.0", "truncation": null, "padding": null,
//! #         "added_tokens": [], "normalizer": null, "post_processor": null, "decoder": null,
//! #         "pre_tokenizer": {"type": "WhitespaceSplit"},
//! #         "model": {"type": "WordLevel", "unk_token": "<unk>", "vocab": {"<unk>": 0,
//! #             "<eos>": 1, "So": 2, "the": 3, "answer": 4, "is:": 5, "Paris": 6}}}"#;
//! #     json.parse().expect("a word-level tokenizer")
//! # }
//!
//! /// Passages by word overlap with the query.
//! struct TwoPassages(Vec<Hit>);
//!
//! impl Retriever for TwoPassages {
//!     fn retrieve(
//!         &self,
//!         query: &str,
//!         k: usize,
//!         exclude: &HashSet<String>,
//!     ) -> steper_runtime::Result<Vec<Hit>> {
//!         let words: HashSet<String> = query.split_whitespace().map(str::to_lowercase).collect();
//!         let mut hits: Vec<Hit> = self.0.iter().filter(|h| !exclude.contains(&h.id)).cloned().collect();
//!         for h in &mut hits {
//!             h.score = h.text.split_whitespace().filter(|w| words.contains(&w.to_lowercase())).count() as f32;
//!         }
//!         hits.sort_by(|a, b| b.score.total_cmp(&a.score));
//!         hits.truncate(k);
//!         Ok(hits)
//!     }
//! }
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let passage = |id: &str, title: &str, text: &str| Hit {
//!     id: id.into(),
//!     title: title.into(),
//!     text: text.into(),
//!     score: 0.0,
//! };
//! let retriever = TwoPassages(vec![
//!     passage("d1", "Eiffel Tower", "The Eiffel Tower is in Paris."),
//!     passage("d2", "Paris", "Paris is the capital of France."),
//! ]);
//! let lm = ToyLm(GeneratorInfo::new("toy", 7, 4096));
//! let engine = Engine::builder()
//!     .generator(Arc::new(lm), toy_tokenizer(), &[EOS])
//!     .retriever(Arc::new(retriever))
//!     .build()?;
//!
//! let options = engine.default_options().with_kv_reuse(true);
//! let reasoning = engine.reason("In which city is the Eiffel Tower?", &options)?;
//! assert_eq!(reasoning.answer, "Paris");
//! assert_eq!(reasoning.steps.len(), 1);
//! assert!(!reasoning.forced);
//! # Ok(())
//! # }
//! ```
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
mod batching;
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
    reason, reason_with, Decoding, Framework, GeneratorStepModel, HeldPassage, LoopOptions,
    LoopRun, PassageRef, PromptLookup, PromptPrefix, Reasoning, StepModel, StepOutput, StepRequest,
    StepTrace,
};
#[cfg(feature = "bm25")]
pub use retrieval::Bm25Index;
pub use retrieval::Retriever;
