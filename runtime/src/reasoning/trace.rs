//! What the loop reports: each step's trace and the result for one question.

use serde::{Deserialize, Serialize};

use crate::data::{PromptPassage, Stage, StepwiseRecord};
use crate::prompt::Framework;

/// A passage held by the loop.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeldPassage {
    /// Document id.
    pub id: String,
    /// Title.
    pub title: String,
    /// Full text.
    pub text: String,
    /// BM25 score when retrieved.
    pub score: f32,
    /// Step that retrieved it.
    pub step: usize,
}

/// A retrieved passage as the trace shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PassageRef {
    /// Document id.
    pub id: String,
    /// Title.
    pub title: String,
    /// BM25 score.
    pub score: f32,
}

/// What happened at one step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepTrace {
    /// 1-based step.
    pub step: usize,
    /// Stage of the step: init (first), expand, or aggregate (the step that gave the answer).
    pub stage: Stage,
    /// Whether the step was forced aggregation.
    pub forced: bool,
    /// Query sent to the retriever (empty when the cap left no room).
    pub query: String,
    /// Passages retrieved at this step.
    pub retrieved: Vec<PassageRef>,
    /// Passages held after retrieval (P_≤s = the first `held` of [`Reasoning::passages`]).
    pub held: usize,
    /// Prompt length in tokens.
    pub prompt_tokens: usize,
    /// Passage words dropped to fit the context.
    pub words_dropped: usize,
    /// Oldest passages dropped to fit the context.
    pub passages_dropped: usize,
    /// Whether the prompt was cut to fit the context.
    pub truncated: bool,
    /// The sentence of this step (at forced aggregation: the stop phrase and the answer).
    pub sentence: String,
    /// Tokens generated.
    pub new_tokens: usize,
    /// Mean probability of the generated tokens.
    pub mean_prob: Option<f64>,
    /// Mean entropy of the next-token distributions (nats).
    pub mean_entropy: Option<f64>,
    /// Prompt tokens run through the model.
    pub prefilled_tokens: usize,
    /// Prompt tokens reused from the previous step's cache.
    pub reused_tokens: usize,
    /// Retrieval time (ms).
    pub retrieval_ms: f64,
    /// Prefill time (ms).
    pub prefill_ms: f64,
    /// Decode time (ms).
    pub decode_ms: f64,
}

/// The result of the loop for one question.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reasoning {
    /// The question.
    pub question: String,
    /// The answer (possibly empty when the model produced none).
    pub answer: String,
    /// Whether the answer came from forced aggregation.
    pub forced: bool,
    /// Step by step.
    pub steps: Vec<StepTrace>,
    /// Every passage held, in prompt order.
    pub passages: Vec<HeldPassage>,
    /// The framework the loop ran (left out of JSON for IRCoT, as before the choice existed).
    #[serde(default, skip_serializing_if = "Framework::is_ircot")]
    pub framework: Framework,
}

impl Reasoning {
    /// The reasoning sentences (all steps but an answering one).
    pub fn sentences(&self) -> Vec<String> {
        self.steps
            .iter()
            .filter(|s| s.stage != Stage::Aggregate)
            .map(|s| s.sentence.clone())
            .collect()
    }

    /// Tokens generated over all steps.
    pub fn new_tokens(&self) -> usize {
        self.steps.iter().map(|s| s.new_tokens).sum()
    }

    /// Prompt tokens prefilled over all steps.
    pub fn prefilled_tokens(&self) -> usize {
        self.steps.iter().map(|s| s.prefilled_tokens).sum()
    }

    /// Prompt tokens reused over all steps.
    pub fn reused_tokens(&self) -> usize {
        self.steps.iter().map(|s| s.reused_tokens).sum()
    }

    /// The step-wise training records of this trace (docs/DESIGN.md, "Step-wise records"): one per
    /// step, with P_≤s, R_<s and the step's sentence as target.
    pub fn stepwise_records(
        &self,
        qid: &str,
        answers: &[String],
        teacher: &str,
    ) -> Vec<StepwiseRecord> {
        let mut prior = Vec::new();
        let mut out = Vec::with_capacity(self.steps.len());
        for s in &self.steps {
            out.push(StepwiseRecord {
                qid: qid.to_string(),
                stage: s.stage,
                step: s.step,
                question: self.question.clone(),
                passages: self.passages[..s.held.min(self.passages.len())]
                    .iter()
                    .map(|p| PromptPassage {
                        title: p.title.clone(),
                        text: p.text.clone(),
                    })
                    .collect(),
                reasoning: prior.clone(),
                target: s.sentence.clone(),
                teacher: teacher.to_string(),
                answers: answers.to_vec(),
                framework: self.framework,
            });
            prior.push(s.sentence.clone());
        }
        out
    }
}
