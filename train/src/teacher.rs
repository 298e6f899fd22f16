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

use std::collections::HashSet;

use candle_core::Tensor;
use steper_models::generate::argmax;
use steper_models::Llama;
use steper_runtime::answer::first_sentence;
use steper_runtime::data::QaExample;
use steper_runtime::reasoning::{StepModel, StepOutput, StepRequest};

/// Words ignored when scoring sentence relevance.
const STOP: &[&str] = &[
    "a", "an", "the", "of", "in", "on", "at", "to", "is", "was", "are", "were", "and", "or", "for",
    "by", "which", "what", "who", "whom", "where", "when", "how", "that", "this", "it", "its",
    "as", "with", "from", "did", "does", "do", "be", "been", "has", "have", "had",
];

fn content_words(s: &str) -> HashSet<String> {
    s.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(|w| w.to_lowercase())
        .filter(|w| !STOP.contains(&w.as_str()))
        .collect()
}

/// Splits text into sentences (after `.`, `!` or `?` followed by whitespace).
pub fn sentences(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let chars: Vec<char> = text.chars().collect();
    for (i, &c) in chars.iter().enumerate() {
        cur.push(c);
        let end = matches!(c, '.' | '!' | '?')
            && chars.get(i + 1).map(|n| n.is_whitespace()).unwrap_or(true);
        if end {
            let s = cur.trim().to_string();
            if !s.is_empty() {
                out.push(s);
            }
            cur.clear();
        }
    }
    let s = cur.trim().to_string();
    if !s.is_empty() {
        out.push(s);
    }
    out
}

/// The annotation-derived teacher.
pub struct GoldTeacher {
    example: Option<QaExample>,
    gold: Vec<String>,
    used: Vec<String>,
    budget: Option<usize>,
    tokenizer: Option<tokenizers::Tokenizer>,
}

impl GoldTeacher {
    /// A teacher with no token budget (prompts are never cut).
    pub fn new() -> Self {
        GoldTeacher {
            example: None,
            gold: Vec::new(),
            used: Vec::new(),
            budget: None,
            tokenizer: None,
        }
    }

    /// Fits prompts into `budget` tokens of `tokenizer` (the student's), so that the records it
    /// yields fit the student's context.
    pub fn with_budget(mut self, tokenizer: tokenizers::Tokenizer, budget: usize) -> Self {
        self.tokenizer = Some(tokenizer);
        self.budget = Some(budget);
        self
    }

    /// Sets the question the next loop run is about (its answers and supporting titles).
    pub fn set_example(&mut self, ex: &QaExample) {
        self.gold = ex.gold_titles();
        self.example = Some(ex.clone());
        self.used.clear();
    }

    fn answer(&self) -> String {
        self.example
            .as_ref()
            .and_then(|e| e.answers.first().cloned())
            .unwrap_or_default()
    }

    fn best_sentence(&self, question: &str, text: &str) -> String {
        let q = content_words(question);
        let answers: Vec<String> = self
            .example
            .as_ref()
            .map(|e| e.answers.clone())
            .unwrap_or_default();
        let mut best = (f64::MIN, String::new());
        for s in sentences(text) {
            let w = content_words(&s);
            let mut score = w.intersection(&q).count() as f64;
            // Bridge entities: a sentence naming another supporting paragraph leads to the next hop.
            for t in &self.gold {
                if !self.used.contains(t) && s.contains(t.as_str()) {
                    score += 2.0;
                }
            }
            if answers
                .iter()
                .any(|a| !a.is_empty() && s.contains(a.as_str()))
            {
                score += 3.0;
            }
            if score > best.0 {
                best = (score, s);
            }
        }
        best.1
    }
}

impl Default for GoldTeacher {
    fn default() -> Self {
        Self::new()
    }
}

impl StepModel for GoldTeacher {
    fn name(&self) -> &str {
        "gold"
    }

    fn prompt_budget(&self, max_new_tokens: usize) -> Option<usize> {
        self.budget.map(|b| b.saturating_sub(max_new_tokens))
    }

    fn count_tokens(&self, text: &str) -> steper_runtime::Result<usize> {
        match &self.tokenizer {
            Some(t) => Ok(t
                .encode(text, false)
                .map_err(|e| steper_runtime::Error::Tokenizer(e.to_string()))?
                .len()),
            None => Ok(text.split_whitespace().count()),
        }
    }

    fn begin_question(&mut self, _question: &str) -> steper_runtime::Result<()> {
        self.used.clear();
        Ok(())
    }

    fn generate(&mut self, req: &StepRequest<'_>) -> steper_runtime::Result<StepOutput> {
        let complete = !self.gold.is_empty() && self.gold.iter().all(|t| self.used.contains(t));
        let text = if req.forced {
            if complete {
                format!("{}.", self.answer())
            } else {
                "unknown.".to_string()
            }
        } else if complete {
            format!("So the answer is: {}.", self.answer())
        } else {
            let next = req
                .passages
                .iter()
                .find(|p| self.gold.contains(&p.title) && !self.used.contains(&p.title));
            match next {
                Some(p) => {
                    let s = self.best_sentence(req.question, &p.text);
                    self.used.push(p.title.clone());
                    if self.gold.iter().all(|t| self.used.contains(t)) && s.is_empty() {
                        format!("So the answer is: {}.", self.answer())
                    } else {
                        s
                    }
                }
                None => {
                    // No new evidence: restate the most relevant sentence of the newest passage
                    // (it becomes the next query).
                    let p = req.passages.last();
                    p.map(|p| self.best_sentence(req.question, &p.text))
                        .unwrap_or_default()
                }
            }
        };
        let n = text.split_whitespace().count();
        Ok(StepOutput {
            text,
            new_tokens: n,
            ..Default::default()
        })
    }
}

/// A candle checkpoint as teacher: greedy decoding with the KV cache, stopping at EOS, a
/// newline or the token limit; the loop keeps the first sentence.
pub struct CandleTeacher {
    model: Llama,
    tokenizer: tokenizers::Tokenizer,
    name: String,
    eos: Vec<u32>,
}

impl CandleTeacher {
    /// Wraps a loaded model and its tokenizer.
    pub fn new(model: Llama, tokenizer: tokenizers::Tokenizer, name: impl Into<String>) -> Self {
        let eos = model.config().eos_ids();
        CandleTeacher {
            model,
            tokenizer,
            name: name.into(),
            eos,
        }
    }
}

fn rt_err(e: impl std::fmt::Display) -> steper_runtime::Error {
    steper_runtime::Error::Backend {
        backend: "candle",
        message: e.to_string(),
    }
}

impl StepModel for CandleTeacher {
    fn name(&self) -> &str {
        &self.name
    }

    fn prompt_budget(&self, max_new_tokens: usize) -> Option<usize> {
        Some(
            self.model
                .config()
                .max_position_embeddings
                .saturating_sub(max_new_tokens),
        )
    }

    fn count_tokens(&self, text: &str) -> steper_runtime::Result<usize> {
        Ok(self
            .tokenizer
            .encode(text, false)
            .map_err(|e| steper_runtime::Error::Tokenizer(e.to_string()))?
            .len())
    }

    fn generate(&mut self, req: &StepRequest<'_>) -> steper_runtime::Result<StepOutput> {
        let ids = self
            .tokenizer
            .encode(req.prompt, false)
            .map_err(|e| steper_runtime::Error::Tokenizer(e.to_string()))?
            .get_ids()
            .to_vec();
        let dev = self.model.device().clone();
        let mut cache = self.model.new_cache(1);
        let t0 = std::time::Instant::now();
        let x = Tensor::new(ids.as_slice(), &dev)
            .and_then(|t| t.unsqueeze(0))
            .map_err(rt_err)?;
        let logits = self
            .model
            .forward_cached(&x, None, &mut cache)
            .map_err(rt_err)?;
        let mut last: Vec<f32> = logits
            .narrow(1, ids.len() - 1, 1)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1())
            .map_err(rt_err)?;
        let prefill_ms = t0.elapsed().as_secs_f64() * 1e3;
        let t1 = std::time::Instant::now();
        let mut out: Vec<u32> = Vec::new();
        let (mut psum, mut hsum) = (0f64, 0f64);
        for _ in 0..req.max_new_tokens {
            let max = last.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let z: f64 = last.iter().map(|&l| ((l - max) as f64).exp()).sum();
            let next = argmax(&last);
            if self.eos.contains(&next) {
                break;
            }
            let p = ((last[next as usize] - max) as f64).exp() / z;
            let h: f64 = last
                .iter()
                .map(|&l| {
                    let q = ((l - max) as f64).exp() / z;
                    if q > 0.0 {
                        -q * q.ln()
                    } else {
                        0.0
                    }
                })
                .sum();
            psum += p;
            hsum += h;
            out.push(next);
            let text = self
                .tokenizer
                .decode(&out, true)
                .map_err(|e| steper_runtime::Error::Tokenizer(e.to_string()))?;
            if text.contains('\n') || (first_sentence(&text).len() < text.trim_end().len()) {
                break;
            }
            let x = Tensor::new(&[next], &dev)
                .and_then(|t| t.unsqueeze(0))
                .map_err(rt_err)?;
            let l = self
                .model
                .forward_cached(&x, None, &mut cache)
                .map_err(rt_err)?;
            last = l.flatten_all().and_then(|t| t.to_vec1()).map_err(rt_err)?;
        }
        let text = self
            .tokenizer
            .decode(&out, true)
            .map_err(|e| steper_runtime::Error::Tokenizer(e.to_string()))?;
        let text = text.split('\n').next().unwrap_or_default().to_string();
        let n = out.len();
        Ok(StepOutput {
            text,
            new_tokens: n,
            mean_prob: (n > 0).then(|| psum / n as f64),
            mean_entropy: (n > 0).then(|| hsum / n as f64),
            prefilled_tokens: ids.len(),
            reused_tokens: 0,
            prefill_ms,
            decode_ms: t1.elapsed().as_secs_f64() * 1e3,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_sentences() {
        assert_eq!(
            sentences("A b. C d! E f? G"),
            vec!["A b.", "C d!", "E f?", "G"]
        );
        assert_eq!(sentences("Mr. Smith went. No.").len(), 3);
    }
}
