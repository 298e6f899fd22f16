//! The loop's state machine: retrieval, prompts fitted to the step model's budget, step traces;
//! the framework ([`FrameworkSteps`]) decides what each generation is for.

use std::collections::HashSet;
use std::time::Instant;

use super::ircot::Ircot;
use super::model::{StepModel, StepOutput, StepRequest};
use super::options::LoopOptions;
use super::self_ask::SelfAsk;
use super::trace::{HeldPassage, PassageRef, Reasoning, StepTrace};
use super::{FrameworkSteps, Outcome, Round};
use crate::control::Cancel;
use crate::data::{PromptPassage, Stage};
use crate::error::{Error, Result};
use crate::prompt::{self, Framework};
use crate::retrieval::Retriever;

/// What [`LoopRun::prepare`] made for the current generation, until [`LoopRun::finish_step`].
struct PreparedRound {
    round: Round,
    fitted: prompt::FittedPrompt,
}

/// One generation's statistics.
#[derive(Clone, Copy)]
struct Generated {
    mean_prob: Option<f64>,
    mean_entropy: Option<f64>,
    new_tokens: usize,
}

/// What the generations of the current step gathered so far.
#[derive(Default)]
struct StepSoFar {
    /// The query of the step's retrieval (empty when it retrieved nothing).
    query: String,
    retrieved: Vec<PassageRef>,
    retrieval_ms: f64,
    prompt_tokens: usize,
    words_dropped: usize,
    passages_dropped: usize,
    truncated: bool,
    /// Each generation's statistics.
    stats: Vec<Generated>,
    new_tokens: usize,
    prefilled_tokens: usize,
    reused_tokens: usize,
    prefill_ms: f64,
    decode_ms: f64,
}

impl StepSoFar {
    fn add_output(&mut self, fitted: &prompt::FittedPrompt, out: &StepOutput) {
        self.prompt_tokens = fitted.tokens;
        self.words_dropped = self.words_dropped.max(fitted.words_dropped);
        self.passages_dropped = self.passages_dropped.max(fitted.passages_dropped);
        self.truncated |= fitted.truncated();
        self.stats.push(Generated {
            mean_prob: out.mean_prob,
            mean_entropy: out.mean_entropy,
            new_tokens: out.new_tokens,
        });
        self.new_tokens += out.new_tokens;
        self.prefilled_tokens += out.prefilled_tokens;
        self.reused_tokens += out.reused_tokens;
        self.prefill_ms += out.prefill_ms;
        self.decode_ms += out.decode_ms;
    }

    /// The step's mean probability and entropy: a single generation's own, or the means of
    /// several weighted by their tokens.
    fn means(&self) -> (Option<f64>, Option<f64>) {
        if let [g] = self.stats[..] {
            return (g.mean_prob, g.mean_entropy);
        }
        let mean = |get: fn(&Generated) -> Option<f64>| {
            let (mut sum, mut weight) = (0.0, 0.0);
            for s in &self.stats {
                let v = get(s)?;
                let w = s.new_tokens.max(1) as f64;
                sum += v * w;
                weight += w;
            }
            (weight > 0.0).then(|| sum / weight)
        };
        (mean(|s| s.mean_prob), mean(|s| s.mean_entropy))
    }
}

/// The loop of [`super::reason`] for one question as a resumable state machine, so that a
/// driver can run many questions at once (batched evaluation) and produce each generation
/// however it likes: [`LoopRun::prepare`] retrieves and fits the prompt of the next generation,
/// [`LoopRun::request`] is what the [`StepModel`] is asked, [`LoopRun::finish_step`] takes its
/// output and returns the result once the question is answered. An IRCoT step is one
/// generation, a Self-Ask step two (the sub-question, then its answer).
pub struct LoopRun {
    question: String,
    opts: LoopOptions,
    framework: Box<dyn FrameworkSteps>,
    held_ids: HashSet<String>,
    passages: Vec<HeldPassage>,
    prompt_passages: Vec<PromptPassage>,
    steps: Vec<StepTrace>,
    /// The step being run (1-based once prepared).
    step: usize,
    /// What the current step gathered; `None` between steps.
    current: Option<StepSoFar>,
    prepared: Option<PreparedRound>,
    done: bool,
    cancel: Option<Cancel>,
}

impl LoopRun {
    /// A run for `question` (options checked; an empty question is an error).
    pub fn new(question: &str, opts: &LoopOptions) -> Result<Self> {
        opts.validate()?;
        if question.trim().is_empty() {
            return Err(Error::EmptyQuestion);
        }
        let framework: Box<dyn FrameworkSteps> = match opts.framework {
            Framework::Ircot => Box::new(Ircot::new(question, &opts.stop_phrase)),
            Framework::SelfAsk => Box::new(SelfAsk::default()),
        };
        Ok(LoopRun {
            question: question.to_string(),
            opts: opts.clone(),
            framework,
            held_ids: HashSet::new(),
            passages: Vec::new(),
            prompt_passages: Vec::new(),
            steps: Vec::new(),
            step: 0,
            current: None,
            prepared: None,
            done: false,
            cancel: None,
        })
    }

    /// Hands `cancel` to the step model with every request.
    pub fn with_cancel(mut self, cancel: Option<Cancel>) -> Self {
        self.cancel = cancel;
        self
    }

    /// The question.
    pub fn question(&self) -> &str {
        &self.question
    }

    /// Steps traced so far.
    pub(crate) fn traced_steps(&self) -> usize {
        self.steps.len()
    }

    /// The last step traced, with the passages held.
    pub(crate) fn last_step(&self) -> Option<(&StepTrace, &[HeldPassage])> {
        self.steps.last().map(|s| (s, &self.passages[..]))
    }

    /// Starts the next generation (the next step's first, or the current step's next):
    /// retrieval of new passages (up to the cap) when the framework retrieves before it, and
    /// the prompt, fitted to `model`'s budget. An error when one is already prepared or the run
    /// is over.
    pub fn prepare(&mut self, retriever: &dyn Retriever, model: &dyn StepModel) -> Result<()> {
        let over = self.done || (self.current.is_none() && self.step >= self.opts.max_steps);
        if self.prepared.is_some() || over {
            return Err(Error::Misuse {
                call: "LoopRun::prepare",
                problem: "a step is pending or the run is over".into(),
            });
        }
        if self.current.is_none() {
            self.step += 1;
        }
        let current = self.current.get_or_insert_with(StepSoFar::default);
        let (step, opts) = (self.step, &self.opts);
        let question = self.question.as_str();
        let round = self
            .framework
            .plan(question, step == opts.max_steps, self.passages.len());
        // 1. Retrieval of new passages, up to the cap.
        let t = Instant::now();
        let room = opts.max_passages.saturating_sub(self.passages.len());
        let k = if round.query.is_some() {
            opts.top_k.min(room)
        } else {
            0
        };
        let hits = match &round.query {
            Some(query) if k > 0 => retriever.retrieve(query, k, &self.held_ids)?,
            _ => Vec::new(),
        };
        current.retrieval_ms += t.elapsed().as_secs_f64() * 1e3;
        if k > 0 {
            current.query = round.query.clone().unwrap_or_default();
        }
        let mut taken = 0;
        for h in hits {
            if taken == k {
                break; // a retriever that returned more than k: the caps hold anyway
            }
            if !self.held_ids.insert(h.id.clone()) {
                continue; // a retriever that ignored `exclude`
            }
            taken += 1;
            current.retrieved.push(PassageRef {
                id: h.id.clone(),
                title: h.title.clone(),
                score: h.score,
            });
            self.prompt_passages.push(PromptPassage {
                title: h.title.clone(),
                text: h.text.clone(),
            });
            self.passages.push(HeldPassage {
                id: h.id,
                title: h.title,
                text: h.text,
                score: h.score,
                step,
            });
        }
        // 2. Prompt, fitted to the context.
        let suffix = self.framework.suffix(&round);
        let suffix = suffix.as_deref();
        let reasoning = self.framework.reasoning();
        let fitted = match model.prompt_budget(opts.max_sentence_tokens) {
            Some(budget) => opts.prompt.fit_for(
                opts.framework,
                question,
                &self.prompt_passages,
                reasoning,
                suffix,
                opts.passage_word_cap,
                budget,
                |s| model.count_tokens(s),
            )?,
            None => {
                let text = opts.prompt.render_for(
                    opts.framework,
                    question,
                    &self.prompt_passages,
                    reasoning,
                    opts.passage_word_cap,
                    suffix,
                )?;
                prompt::FittedPrompt {
                    tokens: model.count_tokens(&text)?,
                    text,
                    words_dropped: 0,
                    passages_dropped: 0,
                }
            }
        };
        self.prepared = Some(PreparedRound { round, fitted });
        Ok(())
    }

    /// What the step model is asked at the prepared generation.
    pub fn request(&self) -> Result<StepRequest<'_>> {
        let p = self.prepared.as_ref().ok_or_else(|| Error::Misuse {
            call: "LoopRun::request",
            problem: "no step prepared".into(),
        })?;
        Ok(StepRequest {
            question: &self.question,
            step: self.step,
            forced: p.round.forced,
            passages: &self.prompt_passages,
            reasoning: self.framework.reasoning(),
            prompt: &p.fitted.text,
            max_new_tokens: self.opts.max_sentence_tokens,
            cancel: self.cancel.as_ref(),
        })
    }

    /// Ends the prepared generation with the model's output, read by the framework; returns
    /// the result when it holds the answer (or the generation was the forced one).
    pub fn finish_step(&mut self, out: StepOutput) -> Result<Option<Reasoning>> {
        let p = self.prepared.take().ok_or_else(|| Error::Misuse {
            call: "LoopRun::finish_step",
            problem: "no step prepared".into(),
        })?;
        let mut current = self.current.take().ok_or_else(|| Error::Misuse {
            call: "LoopRun::finish_step",
            problem: "no step prepared".into(),
        })?;
        current.add_output(&p.fitted, &out);
        let forced = p.round.forced;
        let (sentence, answer) = match self.framework.read(&self.question, &p.round, &out.text) {
            Outcome::Continue if !forced => {
                self.current = Some(current);
                return Ok(None);
            }
            Outcome::Continue => (String::new(), None),
            Outcome::Step(sentence) => (sentence, None),
            Outcome::Answer { sentence, answer } => (sentence, Some(answer)),
        };
        let stage = if answer.is_some() {
            Stage::Aggregate
        } else if self.step == 1 {
            Stage::Init
        } else {
            Stage::Expand
        };
        let (mean_prob, mean_entropy) = current.means();
        self.steps.push(StepTrace {
            step: self.step,
            stage,
            forced,
            query: current.query,
            retrieved: current.retrieved,
            held: self.passages.len(),
            prompt_tokens: current.prompt_tokens,
            words_dropped: current.words_dropped,
            passages_dropped: current.passages_dropped,
            truncated: current.truncated,
            sentence,
            new_tokens: current.new_tokens,
            mean_prob,
            mean_entropy,
            prefilled_tokens: current.prefilled_tokens,
            reused_tokens: current.reused_tokens,
            retrieval_ms: current.retrieval_ms,
            prefill_ms: current.prefill_ms,
            decode_ms: current.decode_ms,
        });
        if let Some(answer) = answer {
            self.done = true;
            return Ok(Some(Reasoning {
                question: self.question.clone(),
                answer,
                forced,
                steps: std::mem::take(&mut self.steps),
                passages: std::mem::take(&mut self.passages),
                framework: self.opts.framework,
            }));
        }
        if forced {
            // The last step is always forced and always yields an answer.
            return Err(Error::Misuse {
                call: "LoopRun::finish_step",
                problem: "the last step was forced but the step model gave no answer".into(),
            });
        }
        Ok(None)
    }
}
