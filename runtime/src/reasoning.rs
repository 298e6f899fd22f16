//! The multi-step loop (docs/DESIGN.md, "The multi-step loop"), shared by the runtime and the
//! teachers.
//!
//! 1. query = question; retrieve the top-k new passages (skip held ones; cap the total).
//! 2. Generate one sentence ([`StepModel`]); keep the first sentence.
//! 3. If it matches `answer is:? (.*)` → the answer; stop.
//! 4. Else query = the sentence, IRCoT-cleaned; next step.
//! 5. At the last step (`max_steps`) without an answer, the prompt ends with the stop phrase
//!    (`So the answer is:`) and what the model generates after it is the answer.
//!
//! The sentence producer is pluggable: [`StepModel`] takes the rendered, context-fitted prompt
//! and returns one continuation with its statistics. [`GeneratorStepModel`] drives any
//! [`Generator`] (ONNX Runtime, tract) with cross-step KV reuse; teachers implement the trait
//! on their own models.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use tokenizers::Tokenizer;

use crate::answer::{clean_query, extract_answer, first_sentence};
use crate::control::{Cancel, LoopControl};
use crate::data::{PromptPassage, Stage, StepwiseRecord};
use crate::error::{Error, Result};
use crate::generator::{Generator, LogitsMode, Sequence};
use crate::manifest::LoopDefaults;
use crate::prompt;
use crate::retrieval::Retriever;
use crate::sampling::{sample, softmax_stats};

/// Settings of the loop. Defaults are docs/DESIGN.md's (and [`LoopDefaults`]'s).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct LoopOptions {
    /// Passages retrieved per step.
    pub top_k: usize,
    /// Cap on passages held in total.
    pub max_passages: usize,
    /// Steps before forced aggregation (the last step is the forced one).
    pub max_steps: usize,
    /// Words kept per passage text.
    pub passage_word_cap: usize,
    /// Phrase appended to force the answer.
    pub stop_phrase: String,
    /// Maximum new tokens per sentence.
    pub max_sentence_tokens: usize,
    /// How step prompts are laid out (plain, or the model's chat template). Not serialized: the
    /// model's `steper.json` records the format and the template comes from its directory.
    #[serde(skip)]
    pub prompt: crate::prompt::PromptLayout,
}

impl LoopOptions {
    /// Sets the prompt layout.
    #[must_use]
    pub fn with_prompt_layout(mut self, prompt: crate::prompt::PromptLayout) -> Self {
        self.prompt = prompt;
        self
    }

    /// Sets `top_k`.
    #[must_use]
    pub fn with_top_k(mut self, top_k: usize) -> Self {
        self.top_k = top_k;
        self
    }

    /// Sets `max_passages`.
    #[must_use]
    pub fn with_max_passages(mut self, max_passages: usize) -> Self {
        self.max_passages = max_passages;
        self
    }

    /// Sets `max_steps`.
    #[must_use]
    pub fn with_max_steps(mut self, max_steps: usize) -> Self {
        self.max_steps = max_steps;
        self
    }

    /// Sets `passage_word_cap`.
    #[must_use]
    pub fn with_passage_word_cap(mut self, passage_word_cap: usize) -> Self {
        self.passage_word_cap = passage_word_cap;
        self
    }

    /// Sets `stop_phrase`.
    #[must_use]
    pub fn with_stop_phrase(mut self, stop_phrase: impl Into<String>) -> Self {
        self.stop_phrase = stop_phrase.into();
        self
    }

    /// Sets `max_sentence_tokens`.
    #[must_use]
    pub fn with_max_sentence_tokens(mut self, max_sentence_tokens: usize) -> Self {
        self.max_sentence_tokens = max_sentence_tokens;
        self
    }
}

impl Default for LoopOptions {
    fn default() -> Self {
        LoopOptions::from(&LoopDefaults::default())
    }
}

impl From<&LoopDefaults> for LoopOptions {
    fn from(d: &LoopDefaults) -> Self {
        LoopOptions {
            top_k: d.top_k,
            max_passages: d.max_passages,
            max_steps: d.max_steps,
            passage_word_cap: d.passage_word_cap,
            stop_phrase: d.stop_phrase.clone(),
            max_sentence_tokens: d.max_sentence_tokens,
            prompt: crate::prompt::PromptLayout::Plain,
        }
    }
}

impl LoopOptions {
    /// Checks the settings.
    pub fn validate(&self) -> Result<()> {
        if self.max_steps == 0 {
            return Err(Error::InvalidOption {
                option: "max_steps".into(),
                expected: "at least 1".into(),
                got: "0".into(),
            });
        }
        if self.max_sentence_tokens == 0 {
            return Err(Error::InvalidOption {
                option: "max_sentence_tokens".into(),
                expected: "at least 1".into(),
                got: "0".into(),
            });
        }
        Ok(())
    }
}

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

/// Produces one sentence per step. The runtime's implementation is [`GeneratorStepModel`];
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
            });
            prior.push(s.sentence.clone());
        }
        out
    }
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

/// Runs the loop for `question` under `control`: its cancel token is checked before each step
/// and handed to the step model (which checks it before every model call), and its observer is
/// called with each step's trace and the passages held so far as soon as the step finishes.
/// A cancelled run ends with [`Error::Cancelled`] or [`Error::DeadlineExceeded`].
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
        match run.finish_step(out)? {
            Some(done) => {
                if let Some(last) = done.steps.last() {
                    control.report(last, &done.passages)?;
                }
                return Ok(done);
            }
            None => {
                if let Some(last) = run.steps.last() {
                    control.report(last, &run.passages)?;
                }
            }
        }
    }
}

/// What [`LoopRun::prepare`] made for the current step, until [`LoopRun::finish_step`].
struct PreparedStep {
    forced: bool,
    k: usize,
    retrieved: Vec<PassageRef>,
    fitted: prompt::FittedPrompt,
    retrieval_ms: f64,
}

/// The loop of [`reason`] for one question as a resumable state machine, so that a driver can
/// run many questions at once (batched evaluation) and produce each step's sentence however it
/// likes: [`LoopRun::prepare`] retrieves and fits the prompt of the next step,
/// [`LoopRun::request`] is what the [`StepModel`] is asked, [`LoopRun::finish_step`] takes its
/// output and returns the result once the question is answered.
pub struct LoopRun {
    question: String,
    opts: LoopOptions,
    held_ids: HashSet<String>,
    passages: Vec<HeldPassage>,
    prompt_passages: Vec<PromptPassage>,
    reasoning: Vec<String>,
    steps: Vec<StepTrace>,
    query: String,
    /// The step being run (1-based once prepared).
    step: usize,
    prepared: Option<PreparedStep>,
    cancel: Option<Cancel>,
}

impl LoopRun {
    /// A run for `question` (options checked; an empty question is an error).
    pub fn new(question: &str, opts: &LoopOptions) -> Result<Self> {
        opts.validate()?;
        if question.trim().is_empty() {
            return Err(Error::EmptyQuestion);
        }
        Ok(LoopRun {
            question: question.to_string(),
            opts: opts.clone(),
            held_ids: HashSet::new(),
            passages: Vec::new(),
            prompt_passages: Vec::new(),
            reasoning: Vec::new(),
            steps: Vec::new(),
            query: question.trim().to_string(),
            step: 0,
            prepared: None,
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

    /// Starts the next step: retrieval of new passages (up to the cap) and the prompt, fitted
    /// to `model`'s budget. An error when a step is already prepared or the run is over.
    pub fn prepare(&mut self, retriever: &dyn Retriever, model: &dyn StepModel) -> Result<()> {
        if self.prepared.is_some() || self.step >= self.opts.max_steps {
            return Err(Error::Misuse {
                call: "LoopRun::prepare",
                problem: "a step is pending or the run is over".into(),
            });
        }
        self.step += 1;
        let (step, opts) = (self.step, &self.opts);
        let question = self.question.as_str();
        let forced = step == opts.max_steps;
        // 1. Retrieval of new passages, up to the cap.
        let t = Instant::now();
        let room = opts.max_passages.saturating_sub(self.passages.len());
        let k = opts.top_k.min(room);
        let hits = if k > 0 {
            retriever.retrieve(&self.query, k, &self.held_ids)?
        } else {
            Vec::new()
        };
        let retrieval_ms = t.elapsed().as_secs_f64() * 1e3;
        let mut retrieved = Vec::with_capacity(hits.len());
        for h in hits {
            if retrieved.len() == k {
                break; // a retriever that returned more than k: the caps hold anyway
            }
            if !self.held_ids.insert(h.id.clone()) {
                continue; // a retriever that ignored `exclude`
            }
            retrieved.push(PassageRef {
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
        let suffix = forced.then_some(opts.stop_phrase.as_str());
        let fitted = match model.prompt_budget(opts.max_sentence_tokens) {
            Some(budget) => opts.prompt.fit(
                question,
                &self.prompt_passages,
                &self.reasoning,
                suffix,
                opts.passage_word_cap,
                budget,
                |s| model.count_tokens(s),
            )?,
            None => {
                let text = opts.prompt.render(
                    question,
                    &self.prompt_passages,
                    &self.reasoning,
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
        self.prepared = Some(PreparedStep {
            forced,
            k,
            retrieved,
            fitted,
            retrieval_ms,
        });
        Ok(())
    }

    /// What the step model is asked at the prepared step.
    pub fn request(&self) -> Result<StepRequest<'_>> {
        let p = self.prepared.as_ref().ok_or_else(|| Error::Misuse {
            call: "LoopRun::request",
            problem: "no step prepared".into(),
        })?;
        Ok(StepRequest {
            question: &self.question,
            step: self.step,
            forced: p.forced,
            passages: &self.prompt_passages,
            reasoning: &self.reasoning,
            prompt: &p.fitted.text,
            max_new_tokens: self.opts.max_sentence_tokens,
            cancel: self.cancel.as_ref(),
        })
    }

    /// Ends the prepared step with the model's output: keeps its first sentence, and returns
    /// the result when it holds the answer (or the step was the forced one).
    pub fn finish_step(&mut self, out: StepOutput) -> Result<Option<Reasoning>> {
        let p = self.prepared.take().ok_or_else(|| Error::Misuse {
            call: "LoopRun::finish_step",
            problem: "no step prepared".into(),
        })?;
        let (step, opts) = (self.step, &self.opts);
        let forced = p.forced;
        // 3. One sentence; the answer if it has one.
        let generated = first_sentence(&out.text);
        let sentence = if forced {
            format!("{} {}", opts.stop_phrase.trim(), generated)
                .trim()
                .to_string()
        } else {
            generated.to_string()
        };
        let answer = extract_answer(&sentence)
            .or_else(|| forced.then(|| generated.trim_end_matches('.').trim().to_string()));
        let stage = if answer.is_some() {
            Stage::Aggregate
        } else if step == 1 {
            Stage::Init
        } else {
            Stage::Expand
        };
        self.steps.push(StepTrace {
            step,
            stage,
            forced,
            query: if p.k > 0 {
                self.query.clone()
            } else {
                String::new()
            },
            retrieved: p.retrieved,
            held: self.passages.len(),
            prompt_tokens: p.fitted.tokens,
            words_dropped: p.fitted.words_dropped,
            passages_dropped: p.fitted.passages_dropped,
            truncated: p.fitted.truncated(),
            sentence: sentence.clone(),
            new_tokens: out.new_tokens,
            mean_prob: out.mean_prob,
            mean_entropy: out.mean_entropy,
            prefilled_tokens: out.prefilled_tokens,
            reused_tokens: out.reused_tokens,
            retrieval_ms: p.retrieval_ms,
            prefill_ms: out.prefill_ms,
            decode_ms: out.decode_ms,
        });
        if let Some(answer) = answer {
            return Ok(Some(Reasoning {
                question: self.question.clone(),
                answer,
                forced,
                steps: std::mem::take(&mut self.steps),
                passages: std::mem::take(&mut self.passages),
            }));
        }
        if forced {
            // The last step is always forced and always yields an answer.
            return Err(Error::Misuse {
                call: "LoopRun::finish_step",
                problem: "the last step was forced but the step model gave no answer".into(),
            });
        }
        // 4. Next query.
        let cleaned = clean_query(&sentence);
        self.query = if cleaned.trim().is_empty() {
            self.question.trim().to_string()
        } else {
            cleaned
        };
        self.reasoning.push(sentence);
        Ok(None)
    }
}

/// How the next token is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub enum Decoding {
    /// The most probable token (the default; deterministic).
    #[default]
    Greedy,
    /// Sampling at `temperature` from a generator seeded with `seed`.
    Sample {
        /// Softmax temperature (> 0).
        temperature: f32,
        /// Seed of the sampler (one stream per question).
        seed: u64,
    },
}

/// Drives a [`Generator`] + tokenizer as a [`StepModel`], keeping the [`Sequence`] between steps:
/// the new prompt is tokenized, the cache truncated to the longest common token prefix with
/// what it holds, and only the rest prefilled. With reuse off every step starts from an empty
/// sequence.
pub struct GeneratorStepModel<'a> {
    generator: &'a dyn Generator,
    tokenizer: &'a Tokenizer,
    eos: Vec<u32>,
    kv_reuse: bool,
    decoding: Decoding,
    rng: u64,
    seq: Option<Sequence>,
    prefix: Option<Arc<PromptPrefix>>,
}

/// A text put before every step prompt (few-shot demonstrations), prefilled once: every
/// question's first step starts from a copy of its KV cache ([`Generator::fork`]) instead of
/// prefilling it again. Shared by every question and thread of one generator.
pub struct PromptPrefix {
    text: String,
    tokens: usize,
    seq: Mutex<Sequence>,
}

impl std::fmt::Debug for PromptPrefix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PromptPrefix")
            .field("tokens", &self.tokens)
            .finish_non_exhaustive()
    }
}

impl PromptPrefix {
    /// Tokenizes `text` and prefills it on `generator` (the generator every question using
    /// the prefix runs on).
    pub fn new(generator: &dyn Generator, tokenizer: &Tokenizer, text: &str) -> Result<Self> {
        let ids = encode_ids(tokenizer, text)?;
        let context = generator.info().context_length;
        if ids.len() >= context {
            return Err(Error::ContextOverflow {
                tokens: ids.len(),
                budget: context,
            });
        }
        let mut seq = generator.new_sequence()?;
        if !ids.is_empty() {
            generator.append(&mut seq, &ids, LogitsMode::Last)?;
        }
        Ok(PromptPrefix {
            text: text.to_string(),
            tokens: ids.len(),
            seq: Mutex::new(seq),
        })
    }

    /// The prefix text.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// Its length in tokens (tokenized alone).
    pub fn tokens(&self) -> usize {
        self.tokens
    }

    /// A sequence holding the longest prefix of `ids` the prefilled prefix covers, short of the
    /// last id (whose logits start the generation). The prefix tokenized alone may end
    /// differently from the prefix inside a prompt (a tokenizer merges across the seam), so
    /// only the common tokens are kept.
    fn fork_for(&self, generator: &dyn Generator, ids: &[u32]) -> Result<Sequence> {
        let seq = self.seq.lock().map_err(|_| Error::Poisoned {
            what: "the prompt prefix's sequence",
        })?;
        let common = common_prefix(seq.tokens(), ids).min(ids.len().saturating_sub(1));
        generator.fork(&seq, common)
    }
}

/// `text`'s token ids (special tokens added, as every prompt is encoded).
fn encode_ids(tokenizer: &Tokenizer, text: &str) -> Result<Vec<u32>> {
    Ok(tokenizer
        .encode(text, true)
        .map_err(|e| Error::Tokenizer(e.to_string()))?
        .get_ids()
        .to_vec())
}

/// Length of the longest common prefix of two token sequences.
fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

impl<'a> GeneratorStepModel<'a> {
    /// A step model over `generator`; generation stops at any of `eos_token_ids`, a newline or
    /// a complete first sentence.
    pub fn new(
        generator: &'a dyn Generator,
        tokenizer: &'a Tokenizer,
        eos_token_ids: &[u32],
    ) -> Self {
        GeneratorStepModel {
            generator,
            tokenizer,
            eos: eos_token_ids.to_vec(),
            kv_reuse: true,
            decoding: Decoding::Greedy,
            rng: 0,
            seq: None,
            prefix: None,
        }
    }

    /// Puts `prefix` before every step prompt; with KV reuse on, each question starts from a
    /// copy of its prefilled cache. `prefix` must have been prefilled on this model's generator.
    pub fn with_prompt_prefix(mut self, prefix: Arc<PromptPrefix>) -> Self {
        self.prefix = Some(prefix);
        self
    }

    /// Turns cross-step KV reuse on (default) or off.
    pub fn with_kv_reuse(mut self, on: bool) -> Self {
        self.kv_reuse = on;
        self
    }

    /// Sets the decoding rule (greedy by default).
    pub fn with_decoding(mut self, decoding: Decoding) -> Self {
        self.decoding = decoding;
        self
    }

    fn encode(&self, text: &str) -> Result<Vec<u32>> {
        encode_ids(self.tokenizer, text)
    }

    fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer
            .decode(ids, true)
            .map_err(|e| Error::Tokenizer(e.to_string()))
    }

    /// Picks a token from `logits`; returns it with its probability and the entropy of the
    /// distribution (both at temperature 1). With `no_eos` an end-of-sequence token is never
    /// picked (the first token of a step: an empty step is never a valid one); the statistics
    /// are still those of the whole distribution.
    fn pick(&mut self, logits: &[f32], no_eos: bool) -> Result<(u32, f64, f64)> {
        let stats = softmax_stats(logits)?;
        let eos = &self.eos;
        let allowed = |i: usize| !(no_eos && u32::try_from(i).is_ok_and(|i| eos.contains(&i)));
        let id = match self.decoding {
            Decoding::Greedy if allowed(stats.argmax) => stats.argmax,
            Decoding::Greedy => logits
                .iter()
                .enumerate()
                .filter(|&(i, v)| allowed(i) && v.is_finite())
                .fold(None, |best: Option<(usize, f32)>, (i, &v)| match best {
                    Some((_, bv)) if bv >= v => best,
                    _ => Some((i, v)),
                })
                .map_or(stats.argmax, |(i, _)| i),
            Decoding::Sample { temperature, .. } => {
                let mut masked;
                let choose = if no_eos {
                    masked = logits.to_vec();
                    for (i, v) in masked.iter_mut().enumerate() {
                        if !allowed(i) {
                            *v = f32::NEG_INFINITY;
                        }
                    }
                    &masked[..]
                } else {
                    logits
                };
                sample(choose, stats.max, temperature, &mut self.rng)
            }
        };
        let p = (f64::from(logits[id]) - stats.max).exp() / stats.z;
        let id = u32::try_from(id)
            .map_err(|_| Error::Tokenizer(format!("token id {id} does not fit u32")))?;
        Ok((id, p, stats.entropy))
    }
}

impl StepModel for GeneratorStepModel<'_> {
    fn name(&self) -> &str {
        &self.generator.info().backend
    }

    fn prompt_budget(&self, max_new_tokens: usize) -> Option<usize> {
        let prefix = self.prefix.as_ref().map_or(0, |p| p.tokens);
        Some(
            self.generator
                .info()
                .context_length
                .saturating_sub(max_new_tokens)
                .saturating_sub(prefix),
        )
    }

    fn count_tokens(&self, text: &str) -> Result<usize> {
        Ok(self.encode(text)?.len())
    }

    fn begin_question(&mut self, question: &str) -> Result<()> {
        self.seq = None;
        if let Decoding::Sample { seed, .. } = self.decoding {
            // One stream per (seed, question), whatever ran before.
            let mut h = seed;
            for b in question.bytes() {
                h = (h ^ u64::from(b)).wrapping_mul(0x100_0000_01B3);
            }
            self.rng = h;
        }
        Ok(())
    }

    fn generate(&mut self, req: &StepRequest<'_>) -> Result<StepOutput> {
        let check = || req.cancel.map_or(Ok(()), Cancel::check);
        check()?;
        let (mut d, mut seq, mut logits) = self.prefill(req)?;
        while let Some(id) = self.accept(&mut d, logits.last())? {
            check()?;
            logits = self.generator.append(&mut seq, &[id], LogitsMode::Last)?;
        }
        Ok(self.finish(d, seq))
    }
}

/// The decoding state of one step of a [`GeneratorStepModel`], between its prefill and its
/// end: what was generated so far and its statistics.
pub(crate) struct StepDecode {
    prompt_tokens: usize,
    reused: usize,
    max_new: usize,
    generated: Vec<u32>,
    sum_p: f64,
    sum_h: f64,
    picks: usize,
    text: String,
    prefill_ms: f64,
    decode_start: Instant,
}

impl StepDecode {
    /// Tokens the step's sequence holds in the generator's own cache (the prompt).
    pub(crate) fn prompt_tokens(&self) -> usize {
        self.prompt_tokens
    }
}

impl GeneratorStepModel<'_> {
    /// Tokenizes the prompt, keeps the common prefix of the held sequence (KV reuse) and
    /// prefills the rest; returns the decoding state, the sequence and the logits that start
    /// the generation.
    pub(crate) fn prefill(
        &mut self,
        req: &StepRequest<'_>,
    ) -> Result<(StepDecode, Sequence, crate::generator::Logits)> {
        let ids = match &self.prefix {
            Some(p) => self.encode(&format!("{}{}", p.text, req.prompt))?,
            None => self.encode(req.prompt)?,
        };
        if ids.is_empty() {
            return Err(Error::Tokenizer("the prompt encodes to no token".into()));
        }
        let context = self.generator.info().context_length;
        if ids.len() >= context {
            return Err(Error::ContextOverflow {
                tokens: ids.len(),
                budget: context.saturating_sub(req.max_new_tokens),
            });
        }
        let mut seq = match (self.kv_reuse, self.seq.take(), &self.prefix) {
            (true, Some(seq), _) => seq,
            (true, None, Some(p)) => p.fork_for(self.generator, &ids)?,
            _ => self.generator.new_sequence()?,
        };
        // Keep the common prefix, but always run at least the last prompt token: its logits
        // start the generation.
        let common = common_prefix(seq.tokens(), &ids).min(ids.len() - 1);
        if common < seq.len() {
            self.generator.truncate(&mut seq, common)?;
        }
        let t = Instant::now();
        let logits = self
            .generator
            .append(&mut seq, &ids[common..], LogitsMode::Last)?;
        let prefill_ms = t.elapsed().as_secs_f64() * 1e3;
        let d = StepDecode {
            prompt_tokens: ids.len(),
            reused: common,
            max_new: req.max_new_tokens.min(context.saturating_sub(ids.len())),
            generated: Vec::new(),
            sum_p: 0.0,
            sum_h: 0.0,
            picks: 0,
            text: String::new(),
            prefill_ms,
            decode_start: Instant::now(),
        };
        Ok((d, seq, logits))
    }

    /// Picks the next token from `logits`; returns it when generation goes on (the caller runs
    /// it through the model and comes back with its logits), `None` when the step is over (an
    /// end-of-sequence token, a newline, a complete first sentence, or the token limit).
    pub(crate) fn accept(&mut self, d: &mut StepDecode, logits: &[f32]) -> Result<Option<u32>> {
        if d.picks >= d.max_new {
            return Ok(None);
        }
        let (id, p, h) = self.pick(logits, d.generated.is_empty())?;
        d.sum_p += p;
        d.sum_h += h;
        d.picks += 1;
        if self.eos.contains(&id) {
            return Ok(None);
        }
        d.generated.push(id);
        d.text = self.decode(&d.generated)?;
        let trimmed = d.text.trim();
        if d.text.trim_start().contains('\n')
            || (!trimmed.is_empty() && first_sentence(trimmed).len() < trimmed.len())
        {
            return Ok(None);
        }
        if d.generated.len() == d.max_new {
            return Ok(None);
        }
        Ok(Some(id))
    }

    /// Ends the step: keeps `seq` for the next step's reuse and returns the output.
    pub(crate) fn finish(&mut self, d: StepDecode, seq: Sequence) -> StepOutput {
        let decode_ms = d.decode_start.elapsed().as_secs_f64() * 1e3;
        if self.kv_reuse {
            self.seq = Some(seq);
        }
        let n = d.picks;
        StepOutput {
            new_tokens: d.generated.len(),
            text: d.text,
            mean_prob: (n > 0).then(|| d.sum_p / n as f64),
            mean_entropy: (n > 0).then(|| d.sum_h / n as f64),
            prefilled_tokens: d.prompt_tokens - d.reused,
            reused_tokens: d.reused,
            prefill_ms: d.prefill_ms,
            decode_ms,
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::HashMap;
    use std::sync::Mutex;

    use super::*;
    use crate::retrieval::Hit;

    /// A retriever over a fixed list, scoring by the number of query words in title + text;
    /// records every call.
    pub(crate) struct ListRetriever {
        pub docs: Vec<(String, String, String)>,
        pub calls: Mutex<Vec<(String, usize, HashSet<String>)>>,
    }

    impl ListRetriever {
        pub fn new(n: usize) -> Self {
            ListRetriever {
                docs: (0..n)
                    .map(|i| {
                        (
                            format!("d{i}"),
                            format!("Title {i}"),
                            format!("text of doc {i}"),
                        )
                    })
                    .collect(),
                calls: Mutex::new(Vec::new()),
            }
        }
    }

    impl Retriever for ListRetriever {
        fn retrieve(&self, query: &str, k: usize, exclude: &HashSet<String>) -> Result<Vec<Hit>> {
            if let Ok(mut c) = self.calls.lock() {
                c.push((query.to_string(), k, exclude.clone()));
            }
            let words: HashSet<String> =
                query.split_whitespace().map(|w| w.to_lowercase()).collect();
            let mut scored: Vec<Hit> = self
                .docs
                .iter()
                .filter(|d| !exclude.contains(&d.0))
                .map(|(id, title, text)| Hit {
                    id: id.clone(),
                    title: title.clone(),
                    text: text.clone(),
                    score: format!("{title} {text}")
                        .split_whitespace()
                        .filter(|w| words.contains(&w.to_lowercase()))
                        .count() as f32,
                })
                .collect();
            scored.sort_by(|a, b| b.score.total_cmp(&a.score));
            scored.truncate(k);
            Ok(scored)
        }
    }

    /// Answers from a script, one entry per step; records the requests' prompts.
    struct Scripted {
        lines: Vec<&'static str>,
        prompts: Vec<(usize, bool, String)>,
        budget: Option<usize>,
    }

    impl StepModel for Scripted {
        fn name(&self) -> &str {
            "scripted"
        }
        fn prompt_budget(&self, _: usize) -> Option<usize> {
            self.budget
        }
        fn count_tokens(&self, text: &str) -> Result<usize> {
            Ok(text.split_whitespace().count())
        }
        fn generate(&mut self, req: &StepRequest<'_>) -> Result<StepOutput> {
            self.prompts
                .push((req.step, req.forced, req.prompt.to_string()));
            let text = self.lines.get(req.step - 1).copied().unwrap_or("x.");
            Ok(StepOutput {
                text: text.to_string(),
                new_tokens: text.split_whitespace().count(),
                ..StepOutput::default()
            })
        }
    }

    fn scripted(lines: Vec<&'static str>) -> Scripted {
        Scripted {
            lines,
            prompts: Vec::new(),
            budget: None,
        }
    }

    #[test]
    fn stops_on_the_answer() -> Result<()> {
        let r = ListRetriever::new(20);
        let mut m = scripted(vec![
            " Doc 3 is about text. Extra sentence.",
            " So the answer is: Title 3.",
            " never reached.",
        ]);
        let out = reason("Which doc?", &r, &mut m, &LoopOptions::default())?;
        assert_eq!(out.answer, "Title 3");
        assert!(!out.forced);
        assert_eq!(out.steps.len(), 2);
        assert_eq!(out.steps[0].stage, Stage::Init);
        assert_eq!(out.steps[0].sentence, "Doc 3 is about text.");
        assert_eq!(out.steps[1].stage, Stage::Aggregate);
        assert_eq!(out.steps[1].query, "Doc 3 is about text.");
        assert_eq!(out.sentences(), vec!["Doc 3 is about text.".to_string()]);
        // The second prompt appends passages and the first sentence.
        assert!(m.prompts[1]
            .2
            .ends_with("Q: Which doc?\nA: Doc 3 is about text."));
        assert_eq!(out.passages.len(), 8);
        Ok(())
    }

    #[test]
    fn the_observer_sees_every_step_as_it_finishes_and_can_stop_the_run() -> Result<()> {
        use crate::control::{Cancel, LoopControl, StepObserver};
        use std::ops::ControlFlow;
        use std::sync::{Arc, Mutex};
        let r = ListRetriever::new(20);
        let lines = vec![
            " Doc 3 is about text.",
            " Doc 5 is too.",
            " So the answer is: Title 3.",
        ];
        let seen: Arc<Mutex<Vec<(usize, String, usize)>>> = Arc::default();
        let log = Arc::clone(&seen);
        let control = LoopControl {
            cancel: Some(Cancel::new()),
            observer: Some(StepObserver::new(move |t, held| {
                log.lock()
                    .unwrap()
                    .push((t.step, t.sentence.clone(), held.len()));
                ControlFlow::Continue(())
            })),
        };
        let mut m = scripted(lines.clone());
        let out = reason_with("Which doc?", &r, &mut m, &LoopOptions::default(), &control)?;
        let seen = seen.lock().unwrap().clone();
        let expected: Vec<(usize, String, usize)> = out
            .steps
            .iter()
            .map(|t| (t.step, t.sentence.clone(), t.held))
            .collect();
        assert_eq!(
            seen, expected,
            "one report per step, in order, with the held passages"
        );
        assert_eq!(out.answer, "Title 3");

        // Break after the first step: the run stops there with Cancelled.
        let stop = LoopControl {
            cancel: None,
            observer: Some(StepObserver::new(|_, _| ControlFlow::Break(()))),
        };
        let mut m = scripted(lines.clone());
        let err = reason_with("Which doc?", &r, &mut m, &LoopOptions::default(), &stop);
        assert!(matches!(err, Err(Error::Cancelled)), "{err:?}");
        assert_eq!(m.prompts.len(), 1);
        Ok(())
    }

    #[test]
    fn a_cancelled_or_expired_token_stops_the_loop_before_the_next_model_call() -> Result<()> {
        use crate::control::{Cancel, LoopControl};
        let r = ListRetriever::new(20);
        let cancel = Cancel::new();
        cancel.cancel();
        let control = LoopControl {
            cancel: Some(cancel),
            observer: None,
        };
        let mut m = scripted(vec![" So the answer is: Title 3."]);
        let err = reason_with("Which doc?", &r, &mut m, &LoopOptions::default(), &control);
        assert!(matches!(err, Err(Error::Cancelled)), "{err:?}");
        assert!(m.prompts.is_empty(), "no model call after cancellation");

        let expired = LoopControl {
            cancel: Some(Cancel::with_deadline(std::time::Instant::now())),
            observer: None,
        };
        let err = reason_with("Which doc?", &r, &mut m, &LoopOptions::default(), &expired);
        assert!(
            matches!(err, Err(Error::DeadlineExceeded { .. })),
            "{err:?}"
        );
        assert!(m.prompts.is_empty());

        // the empty question is its own error, not a message to match
        let err = reason("  ", &r, &mut m, &LoopOptions::default());
        assert!(matches!(err, Err(Error::EmptyQuestion)), "{err:?}");
        Ok(())
    }

    #[test]
    fn forces_aggregation_at_max_steps_and_never_re_retrieves() -> Result<()> {
        let r = ListRetriever::new(40);
        let mut m = scripted(vec![
            " What is doc 1?",
            " Therefore doc 2 matters.",
            " Doc 4.",
            " Doc 5.",
            " Title 9. trailing",
        ]);
        let opts = LoopOptions::default();
        let out = reason("Which doc?", &r, &mut m, &opts)?;
        assert_eq!(out.steps.len(), 5);
        assert!(out.forced);
        assert_eq!(out.answer, "Title 9");
        assert_eq!(out.steps[4].sentence, "So the answer is: Title 9.");
        assert_eq!(out.steps[4].stage, Stage::Aggregate);
        assert!(m.prompts[4].1);
        assert!(m.prompts[4].2.ends_with(
            "A: What is doc 1? Therefore doc 2 matters. Doc 4. Doc 5. So the answer is:"
        ));
        assert!(m.prompts[..4].iter().all(|p| !p.1));
        // Cleaned queries.
        assert_eq!(out.steps[1].query, "is doc 1?");
        assert_eq!(out.steps[2].query, "doc 2 matters.");
        // 4 + 4 + 4 + 3 = 15 (the cap), nothing at step 5.
        let per_step: Vec<usize> = out.steps.iter().map(|s| s.retrieved.len()).collect();
        assert_eq!(per_step, vec![4, 4, 4, 3, 0]);
        let ids: Vec<&str> = out.passages.iter().map(|p| p.id.as_str()).collect();
        let unique: HashSet<&str> = ids.iter().copied().collect();
        assert_eq!(unique.len(), ids.len());
        // Each call excluded everything held before it.
        let calls = r
            .calls
            .lock()
            .map_err(|_| Error::Internal("poisoned".into()))?;
        assert_eq!(calls.len(), 4);
        for (i, (_, k, excl)) in calls.iter().enumerate() {
            assert_eq!(excl.len(), 4 * i);
            assert_eq!(*k, if i == 3 { 3 } else { 4 });
        }
        // Step-wise records: stages and P_≤s / R_<s.
        let recs = out.stepwise_records("q1", &["Title 9".into()], "scripted");
        let stages: Vec<Stage> = recs.iter().map(|r| r.stage).collect();
        assert_eq!(
            stages,
            vec![
                Stage::Init,
                Stage::Expand,
                Stage::Expand,
                Stage::Expand,
                Stage::Aggregate
            ]
        );
        assert_eq!(recs[2].passages.len(), 12);
        assert_eq!(recs[2].reasoning.len(), 2);
        assert_eq!(recs[4].target, "So the answer is: Title 9.");
        Ok(())
    }

    #[test]
    fn prompts_are_fitted_and_too_long_questions_fail() -> Result<()> {
        let r = ListRetriever::new(8);
        let mut m = scripted(vec![" So the answer is: x."]);
        m.budget = Some(20);
        let out = reason("Which doc?", &r, &mut m, &LoopOptions::default())?;
        assert!(out.steps[0].truncated);
        assert!(out.steps[0].prompt_tokens <= 20);
        let mut m = scripted(vec![" So the answer is: x."]);
        m.budget = Some(3);
        let long = "word ".repeat(50);
        assert!(matches!(
            reason(&long, &r, &mut m, &LoopOptions::default()),
            Err(Error::ContextOverflow { .. })
        ));
        Ok(())
    }

    /// A deterministic fake LM over a real-looking vocabulary: its cache holds the tokens it was
    /// fed, and the next token is a hash of the last few cached tokens, so a runtime that
    /// mis-truncates the cache gets different text. It ends a sentence with `.` then EOS after
    /// a length drawn from the hash.
    pub(crate) struct HashLm {
        pub info: crate::generator::GeneratorInfo,
        pub words: Vec<u32>,
        pub period: u32,
        pub eos: u32,
        pub appended: Mutex<usize>,
    }

    /// Named tolerance: logits of the chosen token stand this far above the rest.
    const FAKE_MARGIN: f32 = 4.0;

    impl HashLm {
        fn next(&self, cache: &[u32]) -> u32 {
            let tail = &cache[cache.len().saturating_sub(6)..];
            let mut h: u64 = 1469598103934665603;
            for &t in tail {
                h = (h ^ u64::from(t)).wrapping_mul(1099511628211);
            }
            let last = cache.last().copied().unwrap_or(0);
            if last == self.period {
                return self.eos;
            }
            let since_prompt_like = h % 7;
            if since_prompt_like == 0 {
                self.period
            } else {
                self.words[(h as usize / 7) % self.words.len()]
            }
        }
    }

    impl Generator for HashLm {
        fn info(&self) -> &crate::generator::GeneratorInfo {
            &self.info
        }
        fn new_sequence(&self) -> Result<Sequence> {
            Ok(Sequence::new(Box::new(Vec::<u32>::new())))
        }
        fn append(
            &self,
            seq: &mut Sequence,
            tokens: &[u32],
            mode: LogitsMode,
        ) -> Result<crate::generator::Logits> {
            if let Ok(mut a) = self.appended.lock() {
                *a += tokens.len();
            }
            let cache = seq
                .cache_mut()
                .downcast_mut::<Vec<u32>>()
                .ok_or(Error::ForeignSequence)?;
            let vocab = self.info.vocab_size;
            let mut data = Vec::new();
            let rows = if mode == LogitsMode::All {
                tokens.len()
            } else {
                1
            };
            let start = cache.len();
            cache.extend_from_slice(tokens);
            for r in 0..rows {
                let end = if mode == LogitsMode::All {
                    start + r + 1
                } else {
                    cache.len()
                };
                let next = self.next(&cache[..end]) as usize;
                let mut row = vec![0.0f32; vocab];
                row[next % vocab] = FAKE_MARGIN;
                data.extend(row);
            }
            seq.push_tokens(tokens);
            Ok(crate::generator::Logits { rows, vocab, data })
        }
        fn truncate(&self, seq: &mut Sequence, len: usize) -> Result<()> {
            let cache = seq
                .cache_mut()
                .downcast_mut::<Vec<u32>>()
                .ok_or(Error::ForeignSequence)?;
            cache.truncate(len);
            seq.truncate_tokens(len);
            Ok(())
        }
        fn fork(&self, seq: &Sequence, len: usize) -> Result<Sequence> {
            let cache = seq
                .cache
                .downcast_ref::<Vec<u32>>()
                .ok_or(Error::ForeignSequence)?;
            let len = len.min(cache.len());
            let mut out = Sequence::new(Box::new(cache[..len].to_vec()));
            out.push_tokens(&seq.tokens()[..len]);
            Ok(out)
        }
    }

    /// A word-level tokenizer over a small vocabulary, built in code.
    pub(crate) fn word_tokenizer(words: &[&str]) -> Result<Tokenizer> {
        let mut vocab: HashMap<String, u32> = HashMap::new();
        for w in ["[UNK]", "[EOS]"].iter().chain(words) {
            let n = vocab.len() as u32;
            vocab.entry(w.to_string()).or_insert(n);
        }
        let model = tokenizers::models::wordlevel::WordLevel::builder()
            .vocab(vocab.into_iter().collect())
            .unk_token("[UNK]".into())
            .build()
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        let mut t = Tokenizer::new(model);
        t.with_pre_tokenizer(Some(tokenizers::pre_tokenizers::whitespace::Whitespace));
        Ok(t)
    }

    /// The word tokenizer of the loop tests: the prompt's words, the answer phrase and the
    /// numbers 0..20.
    pub(crate) fn loop_tokenizer() -> Result<Tokenizer> {
        let mut words: Vec<String> = [
            "Wikipedia",
            "Title",
            ":",
            "Q",
            "A",
            "text",
            "of",
            "doc",
            "Which",
            "?",
            ".",
            "So",
            "the",
            "answer",
            "is",
        ]
        .iter()
        .map(|w| w.to_string())
        .collect();
        words.extend((0..20).map(|i| i.to_string()));
        let refs: Vec<&str> = words.iter().map(String::as_str).collect();
        word_tokenizer(&refs)
    }

    /// A [`HashLm`] over [`loop_tokenizer`]'s ids.
    fn hash_lm(tok: &Tokenizer) -> Result<HashLm> {
        let id = |w: &str| tok.token_to_id(w).ok_or_else(|| Error::Tokenizer(w.into()));
        Ok(HashLm {
            info: crate::generator::GeneratorInfo::new("hash-lm", tok.get_vocab_size(true), 4096)
                .with_providers(["CPU"]),
            words: ["text", "doc", "1", "2", "3", "of"]
                .iter()
                .map(|w| id(w))
                .collect::<Result<_>>()?,
            period: id(".")?,
            eos: id("[EOS]")?,
            appended: Mutex::new(0),
        })
    }

    #[test]
    fn generator_step_model_reuses_the_prefix_and_gives_identical_answers() -> Result<()> {
        let tok = loop_tokenizer()?;
        let lm = hash_lm(&tok)?;
        let r = ListRetriever::new(20);
        let mut with = Vec::new();
        let mut without = Vec::new();
        for reuse in [true, false] {
            let mut m = GeneratorStepModel::new(&lm, &tok, &[lm.eos]).with_kv_reuse(reuse);
            let out = reason("Which doc ?", &r, &mut m, &LoopOptions::default())?;
            if reuse { &mut with } else { &mut without }.push(out);
        }
        let (a, b) = (&with[0], &without[0]);
        assert_eq!(a.answer, b.answer);
        assert_eq!(a.sentences(), b.sentences());
        assert_eq!(
            a.steps.len(),
            5,
            "the fake never answers: {:?}",
            a.sentences()
        );
        assert_eq!(b.reused_tokens(), 0);
        assert!(a.reused_tokens() > 0);
        assert_eq!(
            a.prefilled_tokens() + a.reused_tokens(),
            b.prefilled_tokens(),
            "same prompts either way"
        );
        assert!((a.prefilled_tokens() as f64) < 0.6 * b.prefilled_tokens() as f64);
        for s in &a.steps {
            let p = s
                .mean_prob
                .ok_or_else(|| Error::Internal("no prob".into()))?;
            assert!(p > 0.0 && p <= 1.0);
            assert!(s.mean_entropy.is_some_and(|h| h >= 0.0));
        }
        Ok(())
    }

    /// Few-shot demonstrations prefilled once ([`PromptPrefix`]): every question starts from a
    /// copy of their cache, answers equal the ones of prefilling them with every question (the
    /// [`crate::fewshot::Prefixed`] wrapper), and the demonstrations' tokens run through the
    /// model once instead of once per question.
    #[test]
    fn the_generator_step_model_checks_the_cancel_token_of_its_request() -> Result<()> {
        let tok = loop_tokenizer()?;
        let lm = hash_lm(&tok)?;
        let mut m = GeneratorStepModel::new(&lm, &tok, &[]);
        let cancel = crate::control::Cancel::new();
        let mut req = StepRequest {
            question: "q",
            step: 1,
            forced: false,
            passages: &[],
            reasoning: &[],
            prompt: "Q : Which doc ? A :",
            max_new_tokens: 4,
            cancel: Some(&cancel),
        };
        m.begin_question("q")?;
        assert!(m.generate(&req).is_ok());
        cancel.cancel();
        assert!(matches!(m.generate(&req), Err(Error::Cancelled)));
        req.cancel = None;
        assert!(m.generate(&req).is_ok());
        Ok(())
    }

    #[test]
    fn a_prompt_prefix_is_prefilled_once_and_changes_no_answer() -> Result<()> {
        let tok = loop_tokenizer()?;
        let lm = hash_lm(&tok)?;
        let demos = "Wikipedia Title : doc 7\ntext of doc 7 .\n\nQ : Which doc ?\nA : So the answer is 7 .\n\n";
        let questions = ["Which doc ?", "Which doc of 3 ?", "Which text of 12 ?"];
        let appended = || lm.appended.lock().map(|a| *a).unwrap_or(0);
        let r = ListRetriever::new(20);
        let opts = LoopOptions::default();

        let before = appended();
        let prefix = Arc::new(PromptPrefix::new(&lm, &tok, demos)?);
        let p = prefix.tokens();
        assert_eq!(
            appended() - before,
            p,
            "the prefix is prefilled on creation"
        );
        assert!(p > 10);
        let mut pinned = Vec::new();
        for q in questions {
            let mut m = GeneratorStepModel::new(&lm, &tok, &[lm.eos])
                .with_prompt_prefix(Arc::clone(&prefix));
            pinned.push(reason(q, &r, &mut m, &opts)?);
        }
        let pinned_appended = appended() - before - p;

        let before = appended();
        let mut each = Vec::new();
        for q in questions {
            let m = GeneratorStepModel::new(&lm, &tok, &[lm.eos]);
            let mut m = crate::fewshot::Prefixed::new(m, demos.to_string())?;
            each.push(reason(q, &r, &mut m, &opts)?);
        }
        let each_appended = appended() - before;

        for (a, b) in pinned.iter().zip(&each) {
            assert_eq!(a.answer, b.answer);
            assert_eq!(a.sentences(), b.sentences());
            assert_eq!(
                a.prefilled_tokens() + p,
                b.prefilled_tokens(),
                "the first step of a question reuses the whole prefix"
            );
            assert!(a.steps.len() > 1);
        }
        assert_eq!(
            each_appended - pinned_appended,
            questions.len() * p,
            "the prefix runs once, not once per question"
        );
        // The prompt budget leaves room for the prefix.
        let m = GeneratorStepModel::new(&lm, &tok, &[lm.eos]).with_prompt_prefix(prefix);
        assert_eq!(m.prompt_budget(100), Some(4096 - 100 - p));
        Ok(())
    }

    /// A model whose most likely next token is always EOS, with `word` second.
    struct EosFirstLm {
        info: crate::generator::GeneratorInfo,
        eos: u32,
        word: u32,
    }

    impl Generator for EosFirstLm {
        fn info(&self) -> &crate::generator::GeneratorInfo {
            &self.info
        }
        fn new_sequence(&self) -> Result<Sequence> {
            Ok(Sequence::new(Box::new(())))
        }
        fn append(
            &self,
            seq: &mut Sequence,
            tokens: &[u32],
            _mode: LogitsMode,
        ) -> Result<crate::generator::Logits> {
            seq.push_tokens(tokens);
            let vocab = self.info.vocab_size;
            let mut data = vec![0.0f32; vocab];
            data[self.eos as usize] = 2.0 * FAKE_MARGIN;
            data[self.word as usize] = FAKE_MARGIN;
            Ok(crate::generator::Logits {
                rows: 1,
                vocab,
                data,
            })
        }
        fn truncate(&self, seq: &mut Sequence, len: usize) -> Result<()> {
            seq.truncate_tokens(len);
            Ok(())
        }
    }

    #[test]
    fn a_sentence_ends_at_each_of_several_eos_ids() -> Result<()> {
        let tok = word_tokenizer(&["Q", ":", "A", "doc", "?"])?;
        let id = |w: &str| tok.token_to_id(w).ok_or_else(|| Error::Tokenizer(w.into()));
        // A Llama-3.x-style manifest lists several end ids; the model ends with either one.
        let eos_ids = [id("[EOS]")?, id("A")?];
        for &end in &eos_ids {
            let lm = EosFirstLm {
                info: crate::generator::GeneratorInfo::new(
                    "eos-first",
                    tok.get_vocab_size(true),
                    64,
                )
                .with_providers(["CPU"]),
                eos: end,
                word: id("doc")?,
            };
            let mut m = GeneratorStepModel::new(&lm, &tok, &eos_ids);
            m.begin_question("doc ?")?;
            let out = m.generate(&StepRequest {
                question: "doc ?",
                step: 1,
                forced: false,
                passages: &[],
                reasoning: &[],
                prompt: "Q : doc ? A :",
                max_new_tokens: 8,
                cancel: None,
            })?;
            assert_eq!(
                (out.text.as_str(), out.new_tokens),
                ("doc", 1),
                "end id {end}"
            );
            // With only the other id listed, this one does not end the sentence.
            let other: Vec<u32> = eos_ids.iter().copied().filter(|&e| e != end).collect();
            let mut m = GeneratorStepModel::new(&lm, &tok, &other);
            m.begin_question("doc ?")?;
            let out = m.generate(&StepRequest {
                question: "doc ?",
                step: 1,
                forced: false,
                passages: &[],
                reasoning: &[],
                prompt: "Q : doc ? A :",
                max_new_tokens: 8,
                cancel: None,
            })?;
            assert!(
                out.new_tokens > 1,
                "end id {end} not listed: {} tokens",
                out.new_tokens
            );
        }
        Ok(())
    }

    #[test]
    fn a_step_never_ends_before_its_first_token() -> Result<()> {
        /// Named tolerance: f32 logits through an f64 softmax.
        const PROB_EPS: f64 = 1e-6;
        let tok = word_tokenizer(&["Q", ":", "A", "doc", "?"])?;
        let id = |w: &str| tok.token_to_id(w).ok_or_else(|| Error::Tokenizer(w.into()));
        let lm = EosFirstLm {
            info: crate::generator::GeneratorInfo::new("eos-first", tok.get_vocab_size(true), 64)
                .with_providers(["CPU"]),
            eos: id("[EOS]")?,
            word: id("doc")?,
        };
        for decoding in [
            Decoding::Greedy,
            Decoding::Sample {
                temperature: 0.05,
                seed: 7,
            },
        ] {
            let mut m = GeneratorStepModel::new(&lm, &tok, &[lm.eos]).with_decoding(decoding);
            m.begin_question("doc ?")?;
            let out = m.generate(&StepRequest {
                question: "doc ?",
                step: 1,
                forced: false,
                passages: &[],
                reasoning: &[],
                prompt: "Q : doc ? A :",
                max_new_tokens: 8,
                cancel: None,
            })?;
            // EOS is refused as the first token, then taken as the second.
            assert_eq!(
                (out.text.as_str(), out.new_tokens),
                ("doc", 1),
                "{decoding:?}"
            );
            // The statistics are those of the model's own distribution (EOS not masked): the
            // mean of p("doc") and p(EOS) over the unmasked softmax.
            let v = tok.get_vocab_size(true) as f64;
            let (e8, e4) = (
                (2.0 * f64::from(FAKE_MARGIN)).exp(),
                f64::from(FAKE_MARGIN).exp(),
            );
            let want = (e8 + e4) / (2.0 * (e8 + e4 + v - 2.0));
            let got = out
                .mean_prob
                .ok_or_else(|| Error::Internal("no prob".into()))?;
            assert!(
                (got - want).abs() < PROB_EPS,
                "{got} vs {want} ({decoding:?})"
            );
        }
        Ok(())
    }

    #[test]
    fn softmax_stats_are_exact_on_a_uniform_row() -> Result<()> {
        /// Named tolerance for f64 sums of four terms.
        const EPS: f64 = 1e-12;
        let s = softmax_stats(&[1.0, 1.0, 1.0, 1.0])?;
        assert!((s.entropy - 4f64.ln()).abs() < EPS);
        assert!(((1.0f64).exp().ln() - 1.0).abs() < EPS);
        assert!(softmax_stats(&[]).is_err());
        Ok(())
    }
}
