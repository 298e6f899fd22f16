//! Next-token statistics and sampling shared by the reasoning loop and the completions endpoint:
//! one numerically stable softmax pass, temperature sampling, and a seeded SplitMix64 stream.

use crate::error::{Error, Result};

/// Softmax statistics of one logits row (at temperature 1).
pub(crate) struct SoftmaxStats {
    /// Index of the largest logit (the first one on ties).
    pub argmax: usize,
    /// The largest logit.
    pub max: f64,
    /// Σ exp(l − max).
    pub z: f64,
    /// Entropy of the distribution, nats.
    pub entropy: f64,
}

impl SoftmaxStats {
    /// log Σ exp(l).
    #[cfg_attr(not(feature = "server"), allow(dead_code))]
    pub fn log_sum_exp(&self) -> f64 {
        self.max + self.z.ln()
    }
}

/// One pass over `logits`; an empty row or one without a finite logit is an error.
pub(crate) fn softmax_stats(logits: &[f32]) -> Result<SoftmaxStats> {
    let (argmax, max) =
        logits
            .iter()
            .enumerate()
            .fold((0usize, f32::NEG_INFINITY), |(bi, bv), (i, &v)| {
                if v > bv {
                    (i, v)
                } else {
                    (bi, bv)
                }
            });
    if !max.is_finite() {
        return Err(Error::NonFiniteLogits);
    }
    let max = f64::from(max);
    let mut z = 0.0;
    let mut zx = 0.0;
    for &l in logits {
        let x = f64::from(l) - max;
        let e = x.exp();
        z += e;
        zx += e * x;
    }
    // H = -Σ p log p = log z - Σ e·x / z, with x = l - max and p = e / z.
    let entropy = z.ln() - zx / z;
    Ok(SoftmaxStats {
        argmax,
        max,
        z,
        entropy,
    })
}

/// Draws an index from softmax(`logits` / `temperature`); `max` is the row's largest logit.
pub(crate) fn sample(logits: &[f32], max: f64, temperature: f32, rng: &mut u64) -> usize {
    let t = f64::from(temperature.max(f32::MIN_POSITIVE));
    let weights: Vec<f64> = logits
        .iter()
        .map(|&l| ((f64::from(l) - max) / t).exp())
        .collect();
    let total: f64 = weights.iter().sum();
    let mut u = next_uniform(rng) * total;
    for (i, w) in weights.iter().enumerate() {
        if u < *w {
            return i;
        }
        u -= w;
    }
    weights.len() - 1
}

/// SplitMix64 → uniform in [0, 1).
pub(crate) fn next_uniform(state: &mut u64) -> f64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampling_follows_the_distribution_and_greedy_takes_the_max() {
        let row = [0.0f32, 2.0, -1.0, 1.0];
        let stats = softmax_stats(&row).unwrap();
        assert_eq!(stats.argmax, 1);
        let mut rng = 7u64;
        let mut counts = [0usize; 4];
        const DRAWS: usize = 4000;
        for _ in 0..DRAWS {
            counts[sample(&row, stats.max, 1.0, &mut rng)] += 1;
        }
        let z: f64 = row.iter().map(|&l| f64::from(l).exp()).sum();
        /// Absolute tolerance of an empirical frequency over 4000 draws (≈ 4 σ).
        const FREQ_TOL: f64 = 0.035;
        for (i, &c) in counts.iter().enumerate() {
            let p = f64::from(row[i]).exp() / z;
            assert!((c as f64 / DRAWS as f64 - p).abs() < FREQ_TOL, "{i}: {c}");
        }
        assert!((stats.log_sum_exp() - z.ln()).abs() < 1e-9);
        assert!(softmax_stats(&[f32::NAN]).is_err());
    }
}
