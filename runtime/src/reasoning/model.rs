//! What a step model is asked and what it answers.

use serde::{Deserialize, Serialize};

use crate::control::Cancel;
use crate::data::PromptPassage;
use crate::error::Result;

/// What a [`StepModel`] is asked for at one step.
#[derive(Debug, Clone)]
pub struct StepRequest<'a> {
    /// The question.
    pub question: &'a str,
    /// 1-based step.
    pub step: usize,
    /// Whether the prompt ends with the stop phrase (forced aggregation): the continuation is
    /// the answer.
    pub forced: bool,
    /// Passages held (full text, in prompt order; the prompt may show fewer words).
    pub passages: &'a [PromptPassage],
    /// Prior sentences.
    pub reasoning: &'a [String],
    /// The rendered, context-fitted prompt.
    pub prompt: &'a str,
    /// Maximum new tokens.
    pub max_new_tokens: usize,
    /// The run's cancel token: a step model checks it before each model call (the runtime's
    /// does, before the prefill and every decoded token) and returns its error.
    pub cancel: Option<&'a Cancel>,
}

/// One continuation produced by a [`StepModel`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StepOutput {
    /// The generated text (the loop keeps its first sentence).
    pub text: String,
    /// Tokens generated.
    pub new_tokens: usize,
    /// Mean probability of the generated tokens (models without logits: `None`).
    pub mean_prob: Option<f64>,
    /// Mean entropy (nats) of the next-token distributions.
    pub mean_entropy: Option<f64>,
    /// Prompt tokens run through the model at this step.
    pub prefilled_tokens: usize,
    /// Prompt tokens whose keys/values were kept from the previous step.
    pub reused_tokens: usize,
    /// Prefill time in milliseconds.
    pub prefill_ms: f64,
    /// Decode time in milliseconds.
    pub decode_ms: f64,
}

/// Produces one sentence per step. The runtime's implementation is
/// [`GeneratorStepModel`](super::GeneratorStepModel);
/// teachers (a candle checkpoint, an HTTP endpoint, gold annotations) implement it too, so one
/// loop serves them all.
pub trait StepModel {
    /// A short name, recorded as the teacher of step-wise records.
    fn name(&self) -> &str;

    /// Tokens a prompt may hold when `max_new_tokens` are to be generated after it; `None` when
    /// unbounded (then no context fitting is done).
    fn prompt_budget(&self, max_new_tokens: usize) -> Option<usize>;

    /// Prompt length in tokens (used to fit the prompt into [`StepModel::prompt_budget`]).
    fn count_tokens(&self, text: &str) -> Result<usize>;

    /// Called once before the first step of each question.
    fn begin_question(&mut self, _question: &str) -> Result<()> {
        Ok(())
    }

    /// Generates the continuation of `req.prompt`.
    fn generate(&mut self, req: &StepRequest<'_>) -> Result<StepOutput>;
}
