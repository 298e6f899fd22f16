//! A local Llama-family checkpoint run in candle as teacher.

use candle_core::Tensor;
use steper_models::generate::argmax;
use steper_models::Llama;
use steper_runtime::answer::first_sentence;
use steper_runtime::{StepModel, StepOutput, StepRequest};

use super::TeacherPrompt;

/// A candle checkpoint as teacher: greedy decoding with the KV cache, stopping at EOS, a
/// newline or the token limit; the loop keeps the first sentence.
pub struct CandleTeacher {
    model: Llama,
    tokenizer: tokenizers::Tokenizer,
    name: String,
    eos: Vec<u32>,
    /// Instruction header + demonstrations put before every prompt, and its token count.
    prompt: Option<(TeacherPrompt, usize)>,
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
            prompt: None,
        }
    }

    /// Puts `prompt`'s instruction header and few-shot demonstrations (e.g. IRCoT's, see
    /// [`TeacherPrompt::load_ircot`]) before every step prompt. The step-wise records keep the
    /// plain student prompt; the budget the loop fits prompts into shrinks by the prefix.
    pub fn with_prompt(mut self, prompt: TeacherPrompt) -> steper_runtime::Result<Self> {
        let n = self.count_tokens(&prompt.prefix())?;
        self.prompt = Some((prompt, n));
        Ok(self)
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
                .saturating_sub(max_new_tokens)
                .saturating_sub(self.prompt.as_ref().map_or(0, |p| p.1)),
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
        let full;
        let text = match &self.prompt {
            Some((p, _)) => {
                full = p.completion_prompt(req.prompt);
                full.as_str()
            }
            None => req.prompt,
        };
        let ids = self
            .tokenizer
            .encode(text, false)
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
            // Stop at a newline or once the text holds more than one sentence (the loop keeps the
            // first); `first_sentence` skips leading spaces, so compare with the trimmed text.
            if text.contains('\n') || first_sentence(&text).len() < text.trim().len() {
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
