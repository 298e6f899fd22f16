//! Accuracy and speed of the INT8 model against the fp32 one: next-token top-1 agreement and
//! KL divergence on held-out prompts, greedy-continuation agreement, decode tokens/s.

use std::time::Instant;

use serde::Serialize;
use steper_runtime::{Generator, LogitsMode};

use crate::Result;

/// Next-token agreement of two models over the same positions.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Agreement {
    /// Positions compared.
    pub positions: usize,
    /// Fraction of positions whose argmax tokens are equal.
    pub top1: f64,
    /// Mean KL(p_ref || p_test) of the next-token distributions (nats).
    pub mean_kl: f64,
    /// Largest KL over the positions (nats).
    pub max_kl: f64,
}

fn log_softmax(x: &[f32]) -> Vec<f64> {
    let m = x.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
    let lse = x.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln() + m;
    x.iter().map(|&v| v as f64 - lse).collect()
}

/// Index of the largest value (the first on ties).
pub fn argmax(x: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best
}

/// KL(softmax(a) || softmax(b)) in nats.
pub fn kl_logits(a: &[f32], b: &[f32]) -> f64 {
    let (la, lb) = (log_softmax(a), log_softmax(b));
    la.iter()
        .zip(&lb)
        .map(|(&p, &q)| {
            if p.is_finite() {
                p.exp() * (p - q)
            } else {
                0.0
            }
        })
        .sum::<f64>()
        .max(0.0)
}

/// Compares the next-token distributions of `reference` and `test` at every position of
/// every prompt (each prompt prefilled once per model).
pub fn agreement(
    reference: &dyn Generator,
    test: &dyn Generator,
    prompts: &[Vec<u32>],
) -> Result<Agreement> {
    let mut a = Agreement::default();
    let (mut same, mut kl_sum) = (0usize, 0f64);
    for ids in prompts.iter().filter(|p| !p.is_empty()) {
        let mut s1 = reference.new_sequence()?;
        let mut s2 = test.new_sequence()?;
        let l1 = reference.append(&mut s1, ids, LogitsMode::All)?;
        let l2 = test.append(&mut s2, ids, LogitsMode::All)?;
        for r in 0..l1.rows.min(l2.rows) {
            let (x, y) = (l1.row(r), l2.row(r));
            if argmax(x) == argmax(y) {
                same += 1;
            }
            let kl = kl_logits(x, y);
            kl_sum += kl;
            a.max_kl = a.max_kl.max(kl);
            a.positions += 1;
        }
    }
    if a.positions > 0 {
        a.top1 = same as f64 / a.positions as f64;
        a.mean_kl = kl_sum / a.positions as f64;
    }
    Ok(a)
}

/// Greedy continuation of `prompt` by `g`: `n` new token ids.
pub fn greedy(g: &dyn Generator, prompt: &[u32], n: usize) -> Result<Vec<u32>> {
    let mut seq = g.new_sequence()?;
    let mut lg = g.append(&mut seq, prompt, LogitsMode::Last)?;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let t = argmax(lg.last()) as u32;
        out.push(t);
        if seq.len() + 1 > g.info().context_length {
            break;
        }
        lg = g.append(&mut seq, &[t], LogitsMode::Last)?;
    }
    Ok(out)
}

/// Greedy agreement: `reference` generates `n` tokens after each prompt; `test` reads the same
/// tokens (teacher-forced) and the fraction of generated positions where its argmax equals the
/// reference's token is returned, with the positions compared.
pub fn greedy_agreement(
    reference: &dyn Generator,
    test: &dyn Generator,
    prompts: &[Vec<u32>],
    n: usize,
) -> Result<(f64, usize)> {
    let (mut same, mut total) = (0usize, 0usize);
    for p in prompts.iter().filter(|p| !p.is_empty()) {
        let gen = greedy(reference, p, n)?;
        let mut full = p.clone();
        full.extend_from_slice(&gen);
        full.pop();
        let mut seq = test.new_sequence()?;
        let lg = test.append(&mut seq, &full, LogitsMode::All)?;
        for (k, &t) in gen.iter().enumerate() {
            let row = p.len() - 1 + k;
            if row < lg.rows {
                total += 1;
                if argmax(lg.row(row)) as u32 == t {
                    same += 1;
                }
            }
        }
    }
    Ok((
        if total > 0 {
            same as f64 / total as f64
        } else {
            0.0
        },
        total,
    ))
}

/// Throughput of one model, one sequence.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Speed {
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Generated tokens per run.
    pub new_tokens: usize,
    /// Measured runs (after one warm-up).
    pub runs: usize,
    /// Median prefill tokens/s.
    pub prefill_tok_s: f64,
    /// Median decode tokens/s.
    pub decode_tok_s: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// Prefill + greedy decode throughput of `g` on `prompt` (one warm-up run, then `runs`).
pub fn bench_decode(
    g: &dyn Generator,
    prompt: &[u32],
    new_tokens: usize,
    runs: usize,
) -> Result<Speed> {
    let (mut pre, mut dec) = (Vec::new(), Vec::new());
    for r in 0..=runs.max(1) {
        let mut seq = g.new_sequence()?;
        let t0 = Instant::now();
        let mut lg = g.append(&mut seq, prompt, LogitsMode::Last)?;
        let tp = t0.elapsed().as_secs_f64();
        let t1 = Instant::now();
        for _ in 0..new_tokens {
            let t = argmax(lg.last()) as u32;
            lg = g.append(&mut seq, &[t], LogitsMode::Last)?;
        }
        let td = t1.elapsed().as_secs_f64();
        if r > 0 {
            pre.push(prompt.len() as f64 / tp.max(1e-9));
            dec.push(new_tokens as f64 / td.max(1e-9));
        }
    }
    Ok(Speed {
        prompt_tokens: prompt.len(),
        new_tokens,
        runs: runs.max(1),
        prefill_tok_s: median(pre),
        decode_tok_s: median(dec),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Tolerance of the KL identities below.
    const KL_TOL: f64 = 1e-9;

    #[test]
    fn kl_of_identical_logits_is_zero_and_shift_invariant() {
        let a = [1.0f32, 2.0, -1.0];
        assert!(kl_logits(&a, &a).abs() < KL_TOL);
        let b = [11.0f32, 12.0, 9.0];
        assert!(kl_logits(&a, &b).abs() < KL_TOL);
        // p = (1/2, 1/2), q = (e/(1+e), 1/(1+e)) → KL = ln(1+e) - ln 2 - 1/2
        let want = (1.0 + std::f64::consts::E).ln() - 2f64.ln() - 0.5;
        assert!((kl_logits(&[0.0, 0.0], &[1.0, 0.0]) - want).abs() < KL_TOL);
        assert_eq!(argmax(&[0.0, 3.0, 3.0, 1.0]), 1);
    }
}
