//! The runtime's step model: a [`Generator`] and its tokenizer, with cross-step KV reuse
//! ([`GeneratorStepModel`]), few-shot demonstrations prefilled once ([`PromptPrefix`]), and the
//! decoding state of one generation ([`StepDecode`], which the batched evaluation drives).

use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use tokenizers::Tokenizer;

use super::lookup::PromptLookup;
use super::model::{StepModel, StepOutput, StepRequest};
use crate::answer::first_sentence;
use crate::control::Cancel;
use crate::error::{Error, Result};
use crate::generator::{Generator, LogitsMode, Sequence};
use crate::sampling::{sample, softmax_stats};

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
    lookup: Option<PromptLookup>,
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
            lookup: None,
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

    /// Turns prompt-lookup decoding on (`Some`) or off (`None`, the default). It drafts only
    /// under greedy decoding; with sampling every token takes its own model call.
    pub fn with_prompt_lookup(mut self, lookup: Option<PromptLookup>) -> Self {
        self.lookup = lookup;
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
        let (mut d, mut seq, logits) = self.prefill(req)?;
        let lookup = match self.decoding {
            Decoding::Greedy => self.lookup,
            Decoding::Sample { .. } => None,
        };
        let mut next = self.accept(&mut d, logits.last())?;
        let mut history = Vec::new();
        while let Some(id) = next {
            check()?;
            // Tokens after `id` that could still be picked: a longer draft is wasted work.
            let room = d.max_new.saturating_sub(d.picks);
            let draft = match lookup {
                Some(pl) if room > 0 => {
                    history.clear();
                    history.extend_from_slice(seq.tokens());
                    history.push(id);
                    pl.draft(&history, room)
                }
                _ => &[],
            };
            if draft.is_empty() {
                let logits = self.generator.append(&mut seq, &[id], LogitsMode::Last)?;
                next = self.accept(&mut d, logits.last())?;
                continue;
            }
            next = self.verify(&mut d, &mut seq, id, draft)?;
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

    /// Runs `id` and the prompt-lookup `draft` after it in one model call and accepts tokens
    /// from its logits as one-token-per-call decoding would have: each drafted token is kept
    /// while it is the token picked at its position, the first other pick is returned as the
    /// next token to run, and the cache is cut back to the tokens kept.
    fn verify(
        &mut self,
        d: &mut StepDecode,
        seq: &mut Sequence,
        id: u32,
        draft: &[u32],
    ) -> Result<Option<u32>> {
        let base = seq.len();
        let mut input = Vec::with_capacity(draft.len() + 1);
        input.push(id);
        input.extend_from_slice(draft);
        let logits = self.generator.append(seq, &input, LogitsMode::All)?;
        // Positions whose keys/values are what one-token decoding would have cached.
        let mut kept = 0;
        let mut next = None;
        for row in 0..input.len() {
            kept = row + 1;
            match self.accept(d, logits.row(row))? {
                Some(t) if draft.get(row) == Some(&t) => {}
                other => {
                    next = other;
                    break;
                }
            }
        }
        if base + kept < seq.len() {
            self.generator.truncate(seq, base + kept)?;
        }
        Ok(next)
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
