//! The statistics of paired comparisons: a stratified paired bootstrap of mean differences and
//! the exact two-sided sign test (McNemar's exact test on discordant pairs).

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// A percentile interval of a bootstrapped statistic.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Interval {
    /// Lower end.
    pub low: f64,
    /// Upper end.
    pub high: f64,
}

/// Percentile intervals at `level` (0.95: the 2.5th and 97.5th percentiles) of the mean of `M`
/// paired differences per question, over `resamples` bootstrap resamples.
///
/// `strata` are groups of questions (datasets), each resampled with replacement to its own size
/// (a stratified bootstrap: a pooled resample keeps the datasets' shares); a resample's statistic
/// is the mean over all questions of all strata. The resamples come from a ChaCha8 generator
/// seeded with `seed`, so a seed gives the same intervals on every platform; all `M` metrics use
/// the same resampled questions. Empty strata are ignored; with no question at all every
/// interval is `[0, 0]`. `resamples` 0 is treated as 1.
pub fn paired_bootstrap<const M: usize>(
    strata: &[&[[f64; M]]],
    resamples: usize,
    seed: u64,
    level: f64,
) -> [Interval; M] {
    let total: usize = strata.iter().map(|s| s.len()).sum();
    if total == 0 {
        return [Interval {
            low: 0.0,
            high: 0.0,
        }; M];
    }
    let resamples = resamples.max(1);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut draws: [Vec<f64>; M] = std::array::from_fn(|_| Vec::with_capacity(resamples));
    for _ in 0..resamples {
        let mut sums = [0.0; M];
        for stratum in strata.iter().filter(|s| !s.is_empty()) {
            for _ in 0..stratum.len() {
                let row = &stratum[rng.random_range(0..stratum.len())];
                for (sum, d) in sums.iter_mut().zip(row) {
                    *sum += d;
                }
            }
        }
        for (draw, sum) in draws.iter_mut().zip(sums) {
            draw.push(sum / total as f64);
        }
    }
    let tail = (1.0 - level) / 2.0;
    draws.map(|mut d| {
        d.sort_by(f64::total_cmp);
        Interval {
            low: quantile(&d, tail),
            high: quantile(&d, 1.0 - tail),
        }
    })
}

/// The `q` quantile of sorted, non-empty `values`, interpolated linearly between order
/// statistics (position `q·(n−1)`).
fn quantile(values: &[f64], q: f64) -> f64 {
    let pos = q.clamp(0.0, 1.0) * (values.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = pos.ceil() as usize;
    let frac = pos - lo as f64;
    values[lo] + (values[hi] - values[lo]) * frac
}

/// The exact two-sided sign test of `a` pairs going one way against `b` going the other (for a
/// binary metric: McNemar's exact test on the discordant pairs): twice the probability of at
/// most `min(a, b)` successes in `a + b` fair coin flips, capped at 1; 1 when there is no
/// discordant pair. Summed in log space, so it neither overflows nor loses the small tails for
/// any count (a p below ~1e-308 underflows to 0).
pub fn sign_test_p(a: usize, b: usize) -> f64 {
    let n = a + b;
    if n == 0 {
        return 1.0;
    }
    let k = a.min(b);
    // ln C(n, i) for i = 0..=k by the recurrence C(n, i+1) = C(n, i)·(n−i)/(i+1).
    let mut log_terms = Vec::with_capacity(k + 1);
    let mut log_c = 0.0_f64;
    for i in 0..=k {
        log_terms.push(log_c);
        log_c += ((n - i) as f64).ln() - ((i + 1) as f64).ln();
    }
    let max = log_terms.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let log_sum = max + log_terms.iter().map(|t| (t - max).exp()).sum::<f64>().ln();
    let log_tail = log_sum - n as f64 * std::f64::consts::LN_2;
    (2.0 * log_tail.exp()).min(1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Closed-form p values and the log-space sum agree to rounding.
    const P_TOLERANCE: f64 = 1e-12;
    /// The log-space tail against a direct product recurrence, relative.
    const RECURRENCE_TOLERANCE: f64 = 1e-9;
    /// A bootstrap half-width against the normal approximation 1.96·σ/√n, relative.
    const NORMAL_TOLERANCE: f64 = 0.1;

    #[test]
    fn sign_test_known_values() {
        // 10 discordant pairs all one way: 2·(1/2)^10.
        assert!((sign_test_p(10, 0) - 2.0 / 1024.0).abs() < P_TOLERANCE);
        assert!((sign_test_p(0, 10) - 2.0 / 1024.0).abs() < P_TOLERANCE);
        // 1 against 3: 2·(1 + 4)/16.
        assert!((sign_test_p(1, 3) - 10.0 / 16.0).abs() < P_TOLERANCE);
        // 4 against 9: 2·(1 + 13 + 78 + 286 + 715)/8192.
        assert!((sign_test_p(4, 9) - 2.0 * 1093.0 / 8192.0).abs() < P_TOLERANCE);
        // Balanced or empty: no evidence either way.
        assert_eq!(sign_test_p(5, 5), 1.0);
        assert_eq!(sign_test_p(0, 0), 1.0);
        assert_eq!(sign_test_p(1, 0), 1.0);
    }

    #[test]
    fn sign_test_large_counts_match_a_direct_recurrence() {
        // n = 1000: 2^-1000 is still a normal f64, so the pmf can be built by products.
        let n = 1000usize;
        let mut pmf = vec![0.0_f64; n + 1];
        pmf[0] = 0.5_f64.powi(n as i32);
        for i in 1..=n {
            pmf[i] = pmf[i - 1] * (n - i + 1) as f64 / i as f64;
        }
        for k in [0usize, 10, 300, 450, 480, 499] {
            let expected = (2.0 * pmf[..=k].iter().sum::<f64>()).min(1.0);
            let got = sign_test_p(k, n - k);
            assert!(
                ((got - expected) / expected).abs() < RECURRENCE_TOLERANCE,
                "k {k}: {got} vs {expected}"
            );
        }
        // Counts whose binomial coefficients overflow any integer or f64 stay finite.
        let p = sign_test_p(49_000, 51_000);
        assert!(p.is_finite() && p > 0.0 && p < 1e-9, "{p}");
        assert_eq!(sign_test_p(50_000, 50_000), 1.0);
    }

    #[test]
    fn bootstrap_of_constant_differences_is_degenerate() {
        let rows = vec![[0.25, -1.0]; 37];
        let [a, b] = paired_bootstrap(&[&rows], 500, 7, 0.95);
        assert_eq!((a.low, a.high), (0.25, 0.25));
        assert_eq!((b.low, b.high), (-1.0, -1.0));
    }

    #[test]
    fn bootstrap_is_reproducible_and_near_the_normal_interval() {
        // 400 differences in {-1, 0, 1}: mean 0.1, population σ from the counts.
        let rows: Vec<[f64; 1]> = (0..400)
            .map(|i| match i % 10 {
                0..=2 => [1.0],
                3 => [-1.0],
                _ => [0.0],
            })
            .collect();
        let n = rows.len() as f64;
        let mean = rows.iter().map(|r| r[0]).sum::<f64>() / n;
        let var = rows.iter().map(|r| (r[0] - mean).powi(2)).sum::<f64>() / n;
        let [ci] = paired_bootstrap(&[&rows], 10_000, 3, 0.95);
        let [again] = paired_bootstrap(&[&rows], 10_000, 3, 0.95);
        let [other] = paired_bootstrap(&[&rows], 10_000, 4, 0.95);
        assert_eq!(ci, again);
        assert_ne!(ci, other);
        assert!(ci.low < mean && mean < ci.high, "{ci:?} around {mean}");
        let half = (ci.high - ci.low) / 2.0;
        let normal = 1.959_964 * (var / n).sqrt();
        assert!(
            ((half - normal) / normal).abs() < NORMAL_TOLERANCE,
            "half-width {half} vs normal {normal}"
        );
    }

    #[test]
    fn stratified_bootstrap_keeps_each_stratum_whole() {
        // Each stratum constant: every resample has the same pooled mean, whatever is drawn.
        let a = vec![[1.0]; 3];
        let b = vec![[0.0]; 1];
        let [ci] = paired_bootstrap(&[&a, &b, &[]], 200, 1, 0.95);
        assert_eq!((ci.low, ci.high), (0.75, 0.75));
        let [none] = paired_bootstrap::<1>(&[&[]], 200, 1, 0.95);
        assert_eq!((none.low, none.high), (0.0, 0.0));
    }
}
