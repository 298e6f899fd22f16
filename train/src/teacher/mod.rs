//! Teachers: step models the runtime's loop drives to produce one sentence per step.
//!
//! - [`GoldTeacher`]: built from the dataset's own annotations (no LLM). At each step it states
//!   the most question-relevant sentence of the supporting paragraph the retriever has just
//!   brought in; once every supporting paragraph has been used it states the gold answer. If the
//!   retriever never brought in the whole supporting chain, it answers `unknown` at forced
//!   aggregation, so the answer filter drops questions whose evidence was not retrieved. It is an
//!   annotation-derived teacher, not a model: its sentences are exactly right where retrieval
//!   found the evidence.
//! - [`CandleTeacher`]: a local Llama-family checkpoint run in candle with its KV cache.
//! - [`OpenAiTeacher`]: any OpenAI-compatible HTTP server (`/v1/completions` or
//!   `/v1/chat/completions`), with retries, timeouts and an optional instruction header and
//!   few-shot demonstrations ([`TeacherPrompt`]) prepended to the student's plain prompt.

mod candle;
mod gold;
pub mod openai;
pub mod prompt;

pub use candle::CandleTeacher;
pub use gold::{sentences, GoldTeacher};
pub use openai::{OpenAiConfig, OpenAiTeacher};
pub use prompt::TeacherPrompt;
