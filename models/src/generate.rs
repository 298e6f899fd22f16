//! Token generation with the KV cache: greedy or temperature / top-p sampling.

use candle_core::{DType, Tensor, D};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::error::{Error, Result};
use crate::model::Llama;

/// How to pick the next token.
#[derive(Debug, Clone, PartialEq)]
pub enum Sampling {
    /// The most likely token.
    Greedy,
    /// Sample from the distribution at `temperature`, restricted to the top-p nucleus.
    Sample {
        /// Softmax temperature (> 0).
        temperature: f64,
        /// Nucleus mass in (0, 1].
        top_p: f64,
        /// Seed of the sampler.
        seed: u64,
    },
}

/// Generation settings.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    /// Maximum new tokens.
    pub max_new_tokens: usize,
    /// Token ids that end generation (not included in the output).
    pub stop_ids: Vec<u32>,
    /// Token choice.
    pub sampling: Sampling,
}

/// What [`generate`] produced.
#[derive(Debug, Clone)]
pub struct Generation {
    /// New token ids (stop token excluded).
    pub tokens: Vec<u32>,
    /// Probability of each chosen token under the (untempered) model distribution.
    pub probs: Vec<f32>,
    /// Entropy (nats) of the model distribution at each step.
    pub entropies: Vec<f32>,
    /// Whether a stop id ended generation.
    pub stopped: bool,
    /// Seconds spent on the prompt.
    pub prefill_secs: f64,
    /// Seconds spent on the new tokens.
    pub decode_secs: f64,
}

/// Generates a continuation of `prompt` (batch 1) with the KV cache.
pub fn generate(model: &Llama, prompt: &[u32], opts: &GenerateOptions) -> Result<Generation> {
    generate_with(model, prompt, opts, |_| true)
}

/// Like [`generate`], calling `on_token` after each token; returning `false` stops early.
pub fn generate_with(
    model: &Llama,
    prompt: &[u32],
    opts: &GenerateOptions,
    mut on_token: impl FnMut(u32) -> bool,
) -> Result<Generation> {
    if prompt.is_empty() {
        return Err(Error::Input("empty prompt".into()));
    }
    let mut rng = match &opts.sampling {
        Sampling::Sample {
            seed,
            temperature,
            top_p,
        } => {
            let valid =
                temperature.is_finite() && *temperature > 0.0 && *top_p > 0.0 && *top_p <= 1.0;
            if !valid {
                return Err(Error::Input(format!(
                    "sampling needs temperature > 0 and 0 < top_p <= 1, got {temperature} / {top_p}"
                )));
            }
            Some(ChaCha8Rng::seed_from_u64(*seed))
        }
        Sampling::Greedy => None,
    };
    let dev = model.device();
    let mut cache = model.new_cache(1);
    let t0 = std::time::Instant::now();
    let ids = Tensor::new(prompt, dev)?.unsqueeze(0)?;
    let logits = model.forward_cached(&ids, None, &mut cache)?;
    let mut last = logits.narrow(1, prompt.len() - 1, 1)?.flatten_all()?;
    let prefill_secs = t0.elapsed().as_secs_f64();
    let t1 = std::time::Instant::now();
    let mut out = Generation {
        tokens: Vec::new(),
        probs: Vec::new(),
        entropies: Vec::new(),
        stopped: false,
        prefill_secs,
        decode_secs: 0.0,
    };
    for _ in 0..opts.max_new_tokens {
        let probs: Vec<f32> =
            candle_nn::ops::softmax(&last.to_dtype(DType::F32)?, D::Minus1)?.to_vec1()?;
        let next = match (&opts.sampling, rng.as_mut()) {
            (
                Sampling::Sample {
                    temperature, top_p, ..
                },
                Some(rng),
            ) => sample(
                &last.to_dtype(DType::F32)?.to_vec1()?,
                *temperature,
                *top_p,
                rng,
            ),
            _ => argmax(&probs),
        };
        let entropy: f32 = probs
            .iter()
            .filter(|&&p| p > 0.0)
            .map(|&p| -p * p.ln())
            .sum();
        if opts.stop_ids.contains(&next) {
            out.stopped = true;
            break;
        }
        out.tokens.push(next);
        out.probs.push(probs[next as usize]);
        out.entropies.push(entropy);
        if !on_token(next) {
            break;
        }
        if cache.len() + 1 > model.config().max_position_embeddings {
            break;
        }
        let ids = Tensor::new(&[next], dev)?.unsqueeze(0)?;
        last = model
            .forward_cached(&ids, None, &mut cache)?
            .flatten_all()?;
    }
    out.decode_secs = t1.elapsed().as_secs_f64();
    Ok(out)
}

/// Index of the largest value (first on ties).
pub fn argmax(v: &[f32]) -> u32 {
    let mut best = 0usize;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}

fn sample(logits: &[f32], temperature: f64, top_p: f64, rng: &mut ChaCha8Rng) -> u32 {
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let mut p: Vec<(usize, f64)> = logits
        .iter()
        .enumerate()
        .map(|(i, &l)| (i, (((l - max) as f64) / temperature).exp()))
        .collect();
    let z: f64 = p.iter().map(|x| x.1).sum();
    p.sort_by(|a, b| b.1.total_cmp(&a.1));
    let mut kept = Vec::new();
    let mut mass = 0.0;
    for (i, w) in p {
        kept.push((i, w / z));
        mass += w / z;
        if mass >= top_p {
            break;
        }
    }
    let r: f64 = rng.random::<f64>() * mass;
    let mut acc = 0.0;
    for &(i, w) in &kept {
        acc += w;
        if r < acc {
            return i as u32;
        }
    }
    kept.last().map(|x| x.0 as u32).unwrap_or(0)
}

/// A text continuation with its statistics.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TextGeneration {
    /// The prompt as given.
    pub prompt: String,
    /// The decoded continuation.
    pub text: String,
    /// Prompt length in tokens.
    pub prompt_tokens: usize,
    /// New tokens.
    pub new_tokens: usize,
    /// Prompt tokens per second.
    pub prefill_tokens_per_sec: f64,
    /// New tokens per second.
    pub decode_tokens_per_sec: f64,
    /// Mean probability of the chosen tokens.
    pub mean_token_prob: f32,
}

/// Encodes `prompt`, generates, decodes. Stops at the config's EOS ids.
pub fn generate_text(
    model: &Llama,
    tokenizer: &tokenizers::Tokenizer,
    prompt: &str,
    opts: &GenerateOptions,
) -> Result<TextGeneration> {
    let enc = tokenizer
        .encode(prompt, true)
        .map_err(|e| Error::Tokenizer(e.to_string()))?;
    let ids = enc.get_ids().to_vec();
    let mut opts = opts.clone();
    for id in model.config().eos_ids() {
        if !opts.stop_ids.contains(&id) {
            opts.stop_ids.push(id);
        }
    }
    let g = generate(model, &ids, &opts)?;
    let text = tokenizer
        .decode(&g.tokens, true)
        .map_err(|e| Error::Tokenizer(e.to_string()))?;
    let n = g.tokens.len();
    Ok(TextGeneration {
        prompt: prompt.to_string(),
        text,
        prompt_tokens: ids.len(),
        new_tokens: n,
        prefill_tokens_per_sec: ids.len() as f64 / g.prefill_secs.max(1e-9),
        decode_tokens_per_sec: n as f64 / g.decode_secs.max(1e-9),
        mean_token_prob: if n == 0 {
            0.0
        } else {
            g.probs.iter().sum::<f32>() / n as f32
        },
    })
}
