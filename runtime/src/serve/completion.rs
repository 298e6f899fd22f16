//! Plain text completion on the exported model (the `/v1/completions` endpoint): prompt in,
//! up to `max_tokens` out, greedy at temperature 0 or sampled, stopping at EOS or a stop
//! sequence. Runs on a worker thread.

use tokenizers::Tokenizer;

use super::api::{CompletionLogprobs, CompletionRequest};
use crate::control::Cancel;
use crate::error::{Error, Result};
use crate::generator::{Generator, LogitsMode};
use crate::sampling::{sample, softmax_stats};

/// Temperatures at or below this decode greedily.
pub const GREEDY_TEMPERATURE: f32 = 1e-6;

/// Why a completion ended (OpenAI's `finish_reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// EOS or a stop sequence.
    Stop,
    /// `max_tokens` or the end of the context.
    Length,
}

impl FinishReason {
    /// The OpenAI string.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// A finished completion.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    /// Generated text, cut before a stop sequence.
    pub text: String,
    /// Why it ended.
    pub finish_reason: FinishReason,
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Tokens generated (counting those of a stop sequence that was cut off, not EOS).
    pub completion_tokens: usize,
    /// Per-token log-probabilities when asked for.
    pub logprobs: Option<CompletionLogprobs>,
    /// Model time (prefill + decode), seconds.
    pub model_seconds: f64,
}

/// What the prompt cannot be (a 400 to the client rather than a model failure).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PromptProblem {
    /// The prompt encodes to no token.
    Empty,
    /// The prompt fills the whole context.
    TooLong {
        /// Prompt tokens.
        tokens: usize,
        /// The model's context.
        context: usize,
    },
}

/// A completion driven one token at a time: the prompt's tokens, then each next token chosen
/// from the logits the caller hands over ([`CompletionRun::accept`]), so that the same
/// decisions run on one sequence ([`complete`]) or in a row of a batched step (the server's
/// batching workers).
pub struct CompletionRun {
    req: CompletionRequest,
    ids: Vec<u32>,
    max_new: usize,
    rng: u64,
    generated: Vec<u32>,
    token_texts: Vec<String>,
    emitted: usize,
    text: String,
    out: Completion,
    /// Set once the completion ended (EOS, a stop sequence, the length, or `on_piece` said
    /// stop).
    ended: bool,
    started: std::time::Instant,
}

impl CompletionRun {
    /// Tokenizes `req.prompt`; `Ok(Err(problem))` is a prompt a model of `context` positions
    /// cannot take. `seed` drives sampling (ignored when greedy).
    pub fn new(
        tokenizer: &Tokenizer,
        context: usize,
        req: &CompletionRequest,
        seed: u64,
    ) -> Result<std::result::Result<Self, PromptProblem>> {
        let ids = tokenizer
            .encode(req.prompt.as_str(), req.add_special_tokens)
            .map_err(|e| Error::Tokenizer(e.to_string()))?
            .get_ids()
            .to_vec();
        if ids.is_empty() {
            return Ok(Err(PromptProblem::Empty));
        }
        if ids.len() >= context {
            return Ok(Err(PromptProblem::TooLong {
                tokens: ids.len(),
                context,
            }));
        }
        let max_new = req.max_tokens.min(context - ids.len());
        let out = Completion {
            text: String::new(),
            finish_reason: FinishReason::Length,
            prompt_tokens: ids.len(),
            completion_tokens: 0,
            logprobs: req.logprobs.map(|_| CompletionLogprobs::default()),
            model_seconds: 0.0,
        };
        Ok(Ok(CompletionRun {
            req: req.clone(),
            ids,
            max_new,
            rng: seed ^ 0x5DEE_CE66_D1CE_5EED,
            generated: Vec::new(),
            token_texts: Vec::new(),
            emitted: 0,
            text: String::new(),
            out,
            ended: max_new == 0,
            started: std::time::Instant::now(),
        }))
    }

    /// The prompt's tokens (to prefill).
    pub fn prompt(&self) -> &[u32] {
        &self.ids
    }

    /// Whether the completion ended (nothing more to generate).
    pub fn ended(&self) -> bool {
        self.ended
    }

    /// Marks the start of model work (prefill), from which `model_seconds` counts.
    pub fn start_clock(&mut self) {
        self.started = std::time::Instant::now();
    }

    /// Chooses the next token from `row` (the logits after the last token run); returns the
    /// token to run next, or `None` when the completion ended. `on_piece` receives text as it
    /// becomes final (never a piece that could still turn into a stop sequence, never half a
    /// UTF-8 character) and returns false to stop early (client gone).
    pub fn accept(
        &mut self,
        tokenizer: &Tokenizer,
        eos: &[u32],
        row: &[f32],
        on_piece: &mut dyn FnMut(&str) -> bool,
    ) -> Result<Option<u32>> {
        if self.ended {
            return Ok(None);
        }
        let req = &self.req;
        let stats = softmax_stats(row)?;
        let lse = stats.log_sum_exp();
        let id = if req.temperature <= GREEDY_TEMPERATURE {
            stats.argmax
        } else if req.top_p < 1.0 {
            sample_top_p(row, stats.max, req.temperature, req.top_p, &mut self.rng)
        } else {
            sample(row, stats.max, req.temperature, &mut self.rng)
        } as u32;
        if eos.contains(&id) {
            self.out.finish_reason = FinishReason::Stop;
            self.ended = true;
            return Ok(None);
        }
        self.generated.push(id);
        if let (Some(lp), Some(n)) = (self.out.logprobs.as_mut(), req.logprobs) {
            let piece = tokenizer
                .decode(&[id], false)
                .map_err(|e| Error::Tokenizer(e.to_string()))?;
            lp.token_logprobs.push(f64::from(row[id as usize]) - lse);
            lp.top_logprobs.push(top_logprobs(tokenizer, row, lse, n)?);
            self.token_texts.push(piece);
        }
        self.text = tokenizer
            .decode(&self.generated, true)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        if let Some(cut) = earliest_stop(&self.text, &req.stop) {
            self.text.truncate(cut);
            self.out.finish_reason = FinishReason::Stop;
            self.ended = true;
            return Ok(None);
        }
        let safe = stable_prefix_len(&self.text, &req.stop);
        if safe > self.emitted {
            if !on_piece(&self.text[self.emitted..safe]) {
                self.ended = true;
                return Ok(None);
            }
            self.emitted = safe;
        }
        if self.generated.len() >= self.max_new {
            self.out.finish_reason = FinishReason::Length;
            self.ended = true;
            return Ok(None);
        }
        Ok(Some(id))
    }

    /// The finished completion; the text not yet handed to `on_piece` goes to it now.
    pub fn finish(mut self, on_piece: &mut dyn FnMut(&str) -> bool) -> Completion {
        let mut out = self.out;
        out.model_seconds = if self.generated.is_empty() && self.max_new == 0 {
            0.0
        } else {
            self.started.elapsed().as_secs_f64()
        };
        if self.text.len() > self.emitted {
            on_piece(&self.text[self.emitted..]);
        }
        out.completion_tokens = self.generated.len();
        if let Some(lp) = out.logprobs.as_mut() {
            // Offsets count from the start of the prompt, as OpenAI's; tokens past a cut stop
            // sequence are dropped.
            let prompt = &self.req.prompt;
            let mut offset = prompt.len();
            let end = prompt.len() + self.text.len();
            let mut keep = 0;
            for piece in &self.token_texts {
                if offset >= end {
                    break;
                }
                lp.text_offset.push(offset);
                offset += piece.len();
                keep += 1;
            }
            lp.tokens = std::mem::take(&mut self.token_texts)
                .into_iter()
                .take(keep)
                .collect();
            lp.token_logprobs.truncate(keep);
            lp.top_logprobs.truncate(keep);
            lp.text_offset.truncate(keep);
        }
        out.text = self.text;
        out
    }
}

/// Generates the completion of `req.prompt` on one sequence of `generator`. `seed` drives
/// sampling (ignored when greedy). `on_piece` receives text as it becomes final (never a piece
/// that could still turn into a stop sequence, never half a UTF-8 character) and returns false
/// to stop early (client gone).
/// `Ok(Err(problem))` is a prompt the model cannot take. `cancel` is checked before every
/// model call ([`Error::Cancelled`] / [`Error::DeadlineExceeded`]).
pub fn complete(
    generator: &dyn Generator,
    cancel: &Cancel,
    tokenizer: &Tokenizer,
    eos: &[u32],
    req: &CompletionRequest,
    seed: u64,
    on_piece: &mut dyn FnMut(&str) -> bool,
) -> Result<std::result::Result<Completion, PromptProblem>> {
    let mut run = match CompletionRun::new(tokenizer, generator.info().context_length, req, seed)? {
        Ok(run) => run,
        Err(problem) => return Ok(Err(problem)),
    };
    if run.ended() {
        return Ok(Ok(run.finish(on_piece)));
    }
    run.start_clock();
    cancel.check()?;
    let mut seq = generator.new_sequence()?;
    let mut logits = generator.append(&mut seq, run.prompt(), LogitsMode::Last)?;
    while let Some(id) = run.accept(tokenizer, eos, logits.last(), on_piece)? {
        cancel.check()?;
        logits = generator.append(&mut seq, &[id], LogitsMode::Last)?;
    }
    Ok(Ok(run.finish(on_piece)))
}

fn top_logprobs(
    tokenizer: &Tokenizer,
    row: &[f32],
    lse: f64,
    n: usize,
) -> Result<serde_json::Map<String, serde_json::Value>> {
    let mut idx: Vec<usize> = (0..row.len()).collect();
    let n = n.min(row.len());
    if n > 0 {
        idx.select_nth_unstable_by(n - 1, |&a, &b| row[b].total_cmp(&row[a]));
    }
    let mut top: Vec<usize> = idx.into_iter().take(n).collect();
    top.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
    let mut map = serde_json::Map::new();
    for i in top {
        let piece = tokenizer
            .decode(&[i as u32], false)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        map.entry(piece)
            .or_insert_with(|| serde_json::json!(f64::from(row[i]) - lse));
    }
    Ok(map)
}

/// Draws from the smallest set of most probable tokens (at `temperature`) whose probability
/// reaches `top_p`, renormalized (nucleus sampling); `max` is the row's largest logit.
pub fn sample_top_p(
    logits: &[f32],
    max: f64,
    temperature: f32,
    top_p: f32,
    rng: &mut u64,
) -> usize {
    let t = f64::from(temperature.max(f32::MIN_POSITIVE));
    let mut weights: Vec<(usize, f64)> = logits
        .iter()
        .enumerate()
        .map(|(i, &l)| (i, ((f64::from(l) - max) / t).exp()))
        .filter(|(_, w)| w.is_finite() && *w > 0.0)
        .collect();
    if weights.is_empty() {
        return 0;
    }
    weights.sort_by(|a, b| b.1.total_cmp(&a.1));
    let total: f64 = weights.iter().map(|w| w.1).sum();
    let want = f64::from(top_p) * total;
    let mut kept = 0.0;
    let mut n = 0;
    for (_, w) in &weights {
        kept += w;
        n += 1;
        if kept >= want {
            break;
        }
    }
    let mut u = crate::sampling::next_uniform(rng) * kept;
    for (i, w) in &weights[..n] {
        if u < *w {
            return *i;
        }
        u -= w;
    }
    weights[n - 1].0
}

/// Byte offset of the earliest stop sequence in `text`.
pub fn earliest_stop(text: &str, stop: &[String]) -> Option<usize> {
    stop.iter().filter_map(|s| text.find(s.as_str())).min()
}

/// Length of the prefix of `text` that is final: no suffix after it could begin a stop
/// sequence, and it does not end inside a character the tokenizer has not finished (U+FFFD).
pub fn stable_prefix_len(text: &str, stop: &[String]) -> usize {
    let mut end = text.len();
    if text.ends_with('\u{FFFD}') {
        end -= '\u{FFFD}'.len_utf8();
    }
    let mut hold = 0;
    for s in stop {
        // The longest proper prefix of `s` that `text[..end]` ends with.
        for (k, _) in s.char_indices().skip(1) {
            if text[..end].ends_with(&s[..k]) {
                hold = hold.max(k);
            }
        }
    }
    end - hold
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_sequences_are_found_and_held_back() {
        let stop = vec!["\n\n".to_string(), "END".to_string()];
        assert_eq!(earliest_stop("abc\n\nd END", &stop), Some(3));
        assert_eq!(earliest_stop("abc", &stop), None);
        // "abc\n" could become "abc\n\n": hold the newline back.
        assert_eq!(stable_prefix_len("abc\n", &stop), 3);
        assert_eq!(stable_prefix_len("abcEN", &stop), 3);
        assert_eq!(stable_prefix_len("abcE", &stop), 3);
        assert_eq!(stable_prefix_len("abc", &stop), 3);
        assert_eq!(stable_prefix_len("ab\u{FFFD}", &[]), 2);
        assert_eq!(stable_prefix_len("ünï", &["ïx".to_string()]), "ün".len());
    }

    #[test]
    fn top_p_keeps_only_the_nucleus() {
        // Probabilities ≈ 0.665, 0.245, 0.090: top_p 0.5 keeps the first token only, 0.8 the
        // first two.
        let row = [2.0f32, 1.0, 0.0];
        let mut rng = 11u64;
        let mut seen = [0usize; 3];
        for _ in 0..500 {
            seen[sample_top_p(&row, 2.0, 1.0, 0.5, &mut rng)] += 1;
        }
        assert_eq!(seen, [500, 0, 0]);
        let mut seen = [0usize; 3];
        for _ in 0..500 {
            seen[sample_top_p(&row, 2.0, 1.0, 0.8, &mut rng)] += 1;
        }
        assert!(seen[0] > 0 && seen[1] > 0 && seen[2] == 0, "{seen:?}");
    }
}
