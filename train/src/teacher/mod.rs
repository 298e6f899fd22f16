//! Teachers: step models the runtime's loop drives to produce one sentence per step.
//!
//! - [`GoldTeacher`]: built from the dataset's own annotations (no LLM). At each step it states
//!   the next annotated supporting sentence (`supporting_sentences`, HotpotQA / 2Wiki) of the
//!   earliest-held supporting paragraph, or for MuSiQue the sentence of each sub-question's
//!   paragraph that contains its sub-answer (`question_decomposition`); once the evidence of every
//!   supporting paragraph has been stated it says `So the answer is: …`. Where a supporting
//!   paragraph has no annotation, or its annotated sentences were cut from the prompt, or no new
//!   supporting paragraph was retrieved, it states the most question-relevant sentence instead
//!   (counted in [`GoldStats`]). If the retriever never brought in the whole supporting chain, it
//!   answers `unknown` at forced aggregation, so the answer filter drops questions whose
//!   evidence was not retrieved.
//! - [`GoldSelfAskTeacher`]: the same for Self-Ask (`--framework self-ask`): the follow-ups and
//!   intermediate answers of MuSiQue's `question_decomposition` (`#k` references resolved) or of
//!   2Wiki's `evidences` triples ([`self_ask_hops`]), then the final answer; HotpotQA has no
//!   decomposition and is refused.
//! - [`CandleTeacher`]: a local Llama-family checkpoint run in candle with its KV cache,
//!   optionally behind a [`TeacherPrompt`] (e.g. IRCoT's CoT demonstrations).
//! - [`OpenAiTeacher`]: any OpenAI-compatible HTTP server (`/v1/completions` or
//!   `/v1/chat/completions`), with retries, timeouts and an optional instruction header and
//!   few-shot demonstrations ([`TeacherPrompt`]) prepended to the student's plain prompt.

mod budget;
mod candle;
mod gold;
mod gold_self_ask;
pub mod openai;
pub mod prompt;

pub use candle::CandleTeacher;
pub use gold::{sentences, GoldStats, GoldTeacher};
pub use gold_self_ask::{self_ask_hops, GoldSelfAskTeacher, NoHops, SelfAskGoldStats, SelfAskHop};
pub use openai::{OpenAiConfig, OpenAiTeacher};
pub use prompt::TeacherPrompt;
