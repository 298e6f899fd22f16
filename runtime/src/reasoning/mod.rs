//! The multi-step loop (docs/DESIGN.md, "The multi-step loop"), shared by the runtime and the
//! teachers.
//!
//! The loop is one state machine ([`LoopRun`]) over a framework ([`Framework`]) that says how a
//! step's prompt ends, what the retrieval query is, how a step's output is read and when the loop
//! stops. Its settings are [`LoopOptions`]; its result, a [`Reasoning`] of [`StepTrace`]s, is the
//! same for both frameworks, with the three STEPER stages: the first step is initialization,
//! the middle ones expansion, the step that gives the answer aggregation.
//!
//! **IRCoT** (reasoning path, [`Framework::Ircot`]):
//!
//! 1. query = question; retrieve the top-k new passages (skip held ones; cap the total).
//! 2. Generate one sentence ([`StepModel`]); keep the first sentence.
//! 3. If it matches `answer is:? (.*)` → the answer; stop.
//! 4. Else query = the sentence, IRCoT-cleaned; next step.
//! 5. At the last step (`max_steps`) without an answer, the prompt ends with the stop phrase
//!    (`So the answer is:`) and what the model generates after it is the answer.
//!
//! **Self-Ask** (question decomposition, [`Framework::SelfAsk`]). A step is one hop: a
//! sub-question, the retrieval for it, and its answer, in two generations with the retrieval
//! between them (as the Self-Ask paper stops its model at `Intermediate answer:` to search, and
//! as FlashRAG's Self-Ask pipeline alternates its stop strings):
//!
//! 1. *Ask*: the prompt (passages held, question, prior hops) ends with a newline; the model
//!    writes `Follow up: <sub-question>` or `So the final answer is: <answer>` (→ stop).
//! 2. *Answer*: retrieve the top-k new passages with the sub-question; the prompt now ends with
//!    `Follow up: <sub-question>` and `Intermediate answer:`, and the model answers it. An answer
//!    that also states `So the final answer is: <answer>` stops the loop.
//! 3. The step's sentence (its record's target) is `Follow up: q` + newline +
//!    `Intermediate answer: a`; its query the sub-question and its passages those retrieved for
//!    it. The first sub-question is asked from the question alone, as in the paper (FlashRAG
//!    retrieves for the question first), and every hop's passages stay in the prompt, as the
//!    passages held P_≤s do for IRCoT (FlashRAG shows only the latest follow-up's).
//! 4. Output that is not the format (no follow-up where one is asked, no answer where one is
//!    expected) and the last step (`max_steps`) force the aggregation: the prompt ends with
//!    `So the final answer is:` and what the model generates is the answer, as IRCoT's stop
//!    phrase does. A forced step retrieves only when nothing is held yet (with the question).
//!
//! The parser reads what models write: case, a missing colon, extra whitespace, the intermediate
//! answer repeated after the prompt's own `Intermediate answer:`, and the final answer on the
//! same line as the intermediate one.
//!
//! The sentence producer is pluggable: [`StepModel`] takes the rendered, context-fitted prompt
//! and returns one continuation with its statistics (one per generation: a Self-Ask step asks
//! it twice). [`GeneratorStepModel`] drives any [`Generator`](crate::generator::Generator) (ONNX
//! Runtime, tract) with cross-step KV reuse; teachers implement the trait on their own models.

mod generator;
mod ircot;
mod lookup;
mod model;
mod options;
mod self_ask;
mod state;
mod trace;

#[cfg(test)]
pub(crate) mod tests;

pub use crate::prompt::Framework;
pub(crate) use generator::StepDecode;
pub use generator::{Decoding, GeneratorStepModel, PromptPrefix};
pub use lookup::PromptLookup;
pub use model::{StepModel, StepOutput, StepRequest};
pub use options::LoopOptions;
pub use state::LoopRun;
pub use trace::{HeldPassage, PassageRef, Reasoning, StepTrace};

use crate::control::LoopControl;
use crate::error::Result;
use crate::retrieval::Retriever;

/// How one framework runs its steps inside [`LoopRun`]: the state machine calls it for each
/// generation ("round"; IRCoT has one per step, Self-Ask two).
pub(crate) trait FrameworkSteps: Send + Sync {
    /// What the next round retrieves with and whether it forces the answer. `last_step`: the
    /// round belongs to the last allowed step; `held`: passages held so far.
    fn plan(&self, question: &str, last_step: bool, held: usize) -> Round;

    /// The prior steps' sentences, as the prompt shows them and the step model is told.
    fn reasoning(&self) -> &[String];

    /// What ends the prompt of the round planned: IRCoT's stop phrase when forced, Self-Ask's
    /// pending follow-up or final-answer cue.
    fn suffix(&self, round: &Round) -> Option<String>;

    /// Reads the round's generated `text`.
    fn read(&mut self, question: &str, round: &Round, text: &str) -> Outcome;
}

/// One generation planned by [`FrameworkSteps::plan`].
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Round {
    /// Query to retrieve with before the generation (`None`: no retrieval).
    pub query: Option<String>,
    /// Whether the prompt forces the answer (the continuation is the answer).
    pub forced: bool,
}

/// What a round's output did to the step.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Outcome {
    /// The step goes on with another round.
    Continue,
    /// The step ended with this sentence; the next step follows.
    Step(String),
    /// The step ended with this sentence, which holds the answer.
    Answer {
        /// The step's sentence (its record's target).
        sentence: String,
        /// The answer.
        answer: String,
    },
}

/// Runs the loop for `question`.
pub fn reason(
    question: &str,
    retriever: &dyn Retriever,
    model: &mut dyn StepModel,
    opts: &LoopOptions,
) -> Result<Reasoning> {
    reason_with(question, retriever, model, opts, &LoopControl::default())
}

/// Runs the loop for `question` under `control`: its cancel token is checked before each
/// generation and handed to the step model (which checks it before every model call), and its
/// observer is called with each step's trace and the passages held so far as soon as the step
/// finishes. A cancelled run ends with [`crate::Error::Cancelled`] or
/// [`crate::Error::DeadlineExceeded`].
pub fn reason_with(
    question: &str,
    retriever: &dyn Retriever,
    model: &mut dyn StepModel,
    opts: &LoopOptions,
    control: &LoopControl,
) -> Result<Reasoning> {
    let mut run = LoopRun::new(question, opts)?.with_cancel(control.cancel.clone());
    model.begin_question(question)?;
    loop {
        control.check()?;
        run.prepare(retriever, &*model)?;
        let out = model.generate(&run.request()?)?;
        if let Some(done) = finish_and_report(&mut run, out, control)? {
            return Ok(done);
        }
    }
}

/// Hands a generation's output to `run` and reports the step to `control`'s observer when
/// it finished one (a step of several rounds is reported once, at its end); returns the
/// reasoning when the question is answered.
pub(crate) fn finish_and_report(
    run: &mut LoopRun,
    out: StepOutput,
    control: &LoopControl,
) -> Result<Option<Reasoning>> {
    let traced = run.traced_steps();
    match run.finish_step(out)? {
        Some(done) => {
            if let Some(last) = done.steps.last() {
                control.report(last, &done.passages)?;
            }
            Ok(Some(done))
        }
        None => {
            if run.traced_steps() > traced {
                if let Some((last, held)) = run.last_step() {
                    control.report(last, held)?;
                }
            }
            Ok(None)
        }
    }
}
