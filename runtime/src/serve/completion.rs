//! Plain text completion on the exported model (the `/v1/completions` endpoint): prompt in,
//! up to `max_tokens` out, greedy at temperature 0 or sampled, stopping at EOS or a stop
//! sequence. Runs on a worker thread.

use tokenizers::Tokenizer;

use super::api::{CompletionLogprobs, CompletionRequest};
use crate::error::{Error, Result};
use crate::generator::{Generator, LogitsMode};

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

/// Generates the completion of `req.prompt`. `seed` drives sampling (ignored when greedy).
/// `on_piece` receives text as it becomes final (never a piece that could still turn into a
/// stop sequence, never half a UTF-8 character) and returns false to stop early (client gone).
/// `Ok(Err(problem))` is a prompt the model cannot take.
pub fn complete(
    generator: &dyn Generator,
    tokenizer: &Tokenizer,
    eos: &[u32],
    req: &CompletionRequest,
    seed: u64,
    on_piece: &mut dyn FnMut(&str) -> bool,
) -> Result<std::result::Result<Completion, PromptProblem>> {
    let ids = tokenizer
        .encode(req.prompt.as_str(), true)
        .map_err(|e| Error::Tokenizer(e.to_string()))?
        .get_ids()
        .to_vec();
    if ids.is_empty() {
        return Ok(Err(PromptProblem::Empty));
    }
    let context = generator.info().context_length;
    if ids.len() >= context {
        return Ok(Err(PromptProblem::TooLong {
            tokens: ids.len(),
            context,
        }));
    }
    let max_new = req.max_tokens.min(context - ids.len());
    let mut out = Completion {
        text: String::new(),
        finish_reason: FinishReason::Length,
        prompt_tokens: ids.len(),
        completion_tokens: 0,
        logprobs: req.logprobs.map(|_| CompletionLogprobs::default()),
        model_seconds: 0.0,
    };
    if max_new == 0 {
        return Ok(Ok(out));
    }
    let t = std::time::Instant::now();
    let mut seq = generator.new_sequence()?;
    let mut logits = generator.append(&mut seq, &ids, LogitsMode::Last)?;
    let mut rng = seed ^ 0x5DEE_CE66_D1CE_5EED;
    let mut generated: Vec<u32> = Vec::new();
    let mut token_texts: Vec<String> = Vec::new();
    let mut emitted = 0usize;
    let mut text = String::new();
    loop {
        let row = logits.last();
        let lse = log_sum_exp(row)?;
        let id = if req.temperature <= GREEDY_TEMPERATURE {
            argmax(row)
        } else {
            sample(row, req.temperature, &mut rng)
        };
        if eos.contains(&id) {
            out.finish_reason = FinishReason::Stop;
            break;
        }
        generated.push(id);
        if let (Some(lp), Some(n)) = (out.logprobs.as_mut(), req.logprobs) {
            let piece = tokenizer
                .decode(&[id], false)
                .map_err(|e| Error::Tokenizer(e.to_string()))?;
            lp.token_logprobs.push(f64::from(row[id as usize]) - lse);
            lp.top_logprobs.push(top_logprobs(tokenizer, row, lse, n)?);
            token_texts.push(piece);
        }
        text = tokenizer
            .decode(&generated, true)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        if let Some(cut) = earliest_stop(&text, &req.stop) {
            text.truncate(cut);
            out.finish_reason = FinishReason::Stop;
            break;
        }
        let safe = stable_prefix_len(&text, &req.stop);
        if safe > emitted {
            if !on_piece(&text[emitted..safe]) {
                break;
            }
            emitted = safe;
        }
        if generated.len() >= max_new {
            out.finish_reason = FinishReason::Length;
            break;
        }
        logits = generator.append(&mut seq, &[id], LogitsMode::Last)?;
    }
    out.model_seconds = t.elapsed().as_secs_f64();
    if text.len() > emitted {
        on_piece(&text[emitted..]);
    }
    out.completion_tokens = generated.len();
    if let Some(lp) = out.logprobs.as_mut() {
        // Offsets count from the start of the prompt, as OpenAI's; tokens past a cut stop
        // sequence are dropped.
        let mut offset = req.prompt.len();
        let end = req.prompt.len() + text.len();
        let mut keep = 0;
        for piece in &token_texts {
            if offset >= end {
                break;
            }
            lp.text_offset.push(offset);
            offset += piece.len();
            keep += 1;
        }
        lp.tokens = token_texts.into_iter().take(keep).collect();
        lp.token_logprobs.truncate(keep);
        lp.top_logprobs.truncate(keep);
        lp.text_offset.truncate(keep);
    }
    out.text = text;
    Ok(Ok(out))
}

fn argmax(row: &[f32]) -> u32 {
    let mut best = 0usize;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    best as u32
}

fn log_sum_exp(row: &[f32]) -> Result<f64> {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() {
        return Err(Error::Input(
            "the model returned no finite logit (empty vocabulary or NaN)".into(),
        ));
    }
    let max = f64::from(max);
    let z: f64 = row.iter().map(|&l| (f64::from(l) - max).exp()).sum();
    Ok(max + z.ln())
}

/// SplitMix64 → uniform in [0, 1).
fn next_uniform(state: &mut u64) -> f64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 53) as f64
}

fn sample(row: &[f32], temperature: f32, rng: &mut u64) -> u32 {
    let t = f64::from(temperature);
    let max = f64::from(row.iter().copied().fold(f32::NEG_INFINITY, f32::max));
    let weights: Vec<f64> = row
        .iter()
        .map(|&l| ((f64::from(l) - max) / t).exp())
        .collect();
    let total: f64 = weights.iter().sum();
    let mut u = next_uniform(rng) * total;
    for (i, w) in weights.iter().enumerate() {
        if u < *w {
            return i as u32;
        }
        u -= w;
    }
    (weights.len() - 1) as u32
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
    fn sampling_follows_the_distribution_and_greedy_takes_the_max() {
        let row = [0.0f32, 2.0, -1.0, 1.0];
        assert_eq!(argmax(&row), 1);
        let mut rng = 7u64;
        let mut counts = [0usize; 4];
        const DRAWS: usize = 4000;
        for _ in 0..DRAWS {
            counts[sample(&row, 1.0, &mut rng) as usize] += 1;
        }
        let z: f64 = row.iter().map(|&l| f64::from(l).exp()).sum();
        /// Absolute tolerance of an empirical frequency over 4000 draws (≈ 4 σ).
        const FREQ_TOL: f64 = 0.035;
        for (i, &c) in counts.iter().enumerate() {
            let p = f64::from(row[i]).exp() / z;
            assert!((c as f64 / DRAWS as f64 - p).abs() < FREQ_TOL, "{i}: {c}");
        }
        let lse = log_sum_exp(&row).unwrap();
        assert!((lse - z.ln()).abs() < 1e-9);
        assert!(log_sum_exp(&[f32::NAN]).is_err());
    }
}
