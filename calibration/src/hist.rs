//! Per-tensor range statistics: exact min/max and a histogram of |x| with a bounded number of
//! bins, from which three ranges (amax) are read: min/max, a percentile and TensorRT's entropy
//! (KL-divergence) threshold.
//!
//! The histogram's bin width is always a power of two: the smallest `w = 2^k` with
//! `max|x| < bins * w`. When a later batch widens the range, the width doubles (adjacent bins
//! merge pairwise) until the new maximum fits, so `floor(|x| / w)` of every value already seen
//! is still its bin. Collecting in chunks, or merging collections, therefore gives exactly the
//! histogram of one collection over all the data.

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Default number of histogram bins (TensorRT's entropy calibrator uses 2048 as well).
pub const DEFAULT_BINS: usize = 2048;
/// Quantized levels on one side of zero for symmetric int8 (the entropy search's target bins).
pub const INT8_LEVELS: usize = 128;
/// Default percentile of the percentile method.
pub const DEFAULT_PERCENTILE: f64 = 99.99;

/// How a tensor's range is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// amax = max(|min|, |max|).
    MinMax,
    /// amax = the percentile of |x| (histogram bin upper edge, at most the observed max).
    Percentile,
    /// amax = TensorRT's entropy threshold (minimum KL divergence between the clipped and the
    /// int8-quantized distribution of |x|).
    Entropy,
}

impl Method {
    /// `minmax`, `percentile` or `entropy`.
    pub fn as_str(self) -> &'static str {
        match self {
            Method::MinMax => "minmax",
            Method::Percentile => "percentile",
            Method::Entropy => "entropy",
        }
    }

    /// The calibrator name in a TensorRT cache header for this method.
    pub fn trt_calibrator(self) -> &'static str {
        match self {
            Method::MinMax => "MinMaxCalibration",
            // TensorRT has no percentile calibrator; its cache header names the entropy one,
            // which is how TensorRT reads any per-tensor scale list.
            Method::Percentile | Method::Entropy => "EntropyCalibration2",
        }
    }
}

impl std::str::FromStr for Method {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "minmax" | "max" => Ok(Method::MinMax),
            "percentile" => Ok(Method::Percentile),
            "entropy" | "kl" => Ok(Method::Entropy),
            _ => Err(Error::Option {
                option: "--method",
                expected: "minmax, percentile or entropy".into(),
                got: s.into(),
            }),
        }
    }
}

/// Running statistics of one tensor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TensorStats {
    /// Smallest finite value seen (`+inf` before any).
    pub min: f32,
    /// Largest finite value seen (`-inf` before any).
    pub max: f32,
    /// Finite values seen.
    pub count: u64,
    /// NaN / infinite values seen (not binned).
    pub nonfinite: u64,
    /// Bin width (a power of two); `None` while every value seen is zero.
    width: Option<f64>,
    /// Counts of |x| per bin: bin `i` holds `i*w <= |x| < (i+1)*w`.
    bins: Vec<u64>,
}

/// The smallest power of two `w` with `amax < n * w` (`None` for amax = 0).
fn width_for(amax: f64, n: usize) -> Option<f64> {
    if amax <= 0.0 {
        return None;
    }
    let n = n as f64;
    let mut w = 2f64.powi((amax / n).log2().ceil() as i32);
    while n * w <= amax {
        w *= 2.0;
    }
    while n * (w / 2.0) > amax {
        w /= 2.0;
    }
    Some(w)
}

impl TensorStats {
    /// Empty statistics with `bins` histogram bins (at least [`INT8_LEVELS`]).
    pub fn new(bins: usize) -> Self {
        TensorStats {
            min: f32::INFINITY,
            max: f32::NEG_INFINITY,
            count: 0,
            nonfinite: 0,
            width: None,
            bins: vec![0; bins.max(INT8_LEVELS)],
        }
    }

    /// Statistics from a ready histogram of |x| (`width` must be a power of two); min/max are
    /// set to `∓` the upper edge of the last non-empty bin. For tests and hand-made tables.
    pub fn from_histogram(bins: Vec<u64>, width: f64) -> Self {
        let last = bins.iter().rposition(|&c| c > 0);
        let edge = last.map(|i| ((i + 1) as f64 * width) as f32).unwrap_or(0.0);
        TensorStats {
            min: -edge,
            max: edge,
            count: bins.iter().sum(),
            nonfinite: 0,
            width: Some(width),
            bins,
        }
    }

    /// The histogram: counts and bin width (`None` while all values are zero).
    pub fn histogram(&self) -> (&[u64], Option<f64>) {
        (&self.bins, self.width)
    }

    /// max(|min|, |max|) of the finite values seen (0 when none).
    pub fn abs_max(&self) -> f32 {
        if self.count == 0 {
            return 0.0;
        }
        self.min.abs().max(self.max.abs())
    }

    /// Re-bins to the (power-of-two, not smaller) width `w`.
    fn widen_to(&mut self, w: f64) {
        match self.width {
            Some(old) if old >= w => {}
            Some(old) => {
                let r = (w / old).round() as usize;
                let n = self.bins.len();
                let mut merged = vec![0u64; n];
                for (i, &c) in self.bins.iter().enumerate() {
                    merged[i / r] += c;
                }
                self.bins = merged;
                self.width = Some(w);
            }
            // Only zeros so far: they stay in bin 0 at any width.
            None => self.width = Some(w),
        }
    }

    /// Adds `data` to the statistics.
    pub fn observe(&mut self, data: &[f32]) {
        let mut lo = self.min;
        let mut hi = self.max;
        let mut n = 0u64;
        for &x in data {
            if x.is_finite() {
                lo = lo.min(x);
                hi = hi.max(x);
                n += 1;
            }
        }
        self.nonfinite += data.len() as u64 - n;
        if n == 0 {
            return;
        }
        self.min = lo;
        self.max = hi;
        self.count += n;
        let amax = lo.abs().max(hi.abs()) as f64;
        if let Some(w) = width_for(amax, self.bins.len()) {
            self.widen_to(w);
        }
        match self.width {
            None => self.bins[0] += n,
            Some(w) => {
                let inv = 1.0 / w; // exact: w is a power of two
                let last = self.bins.len() - 1;
                for &x in data {
                    if x.is_finite() {
                        let i = ((x.abs() as f64) * inv) as usize;
                        self.bins[i.min(last)] += 1;
                    }
                }
            }
        }
    }

    /// Adds another collection (same bin count) to this one; equal to having observed its data.
    pub fn merge(&mut self, other: &TensorStats) -> Result<()> {
        if other.bins.len() != self.bins.len() {
            return Err(Error::Stats(format!(
                "cannot merge histograms of {} and {} bins",
                self.bins.len(),
                other.bins.len()
            )));
        }
        let mut o = other.clone();
        match (self.width, o.width) {
            (Some(a), Some(b)) if a < b => self.widen_to(b),
            (Some(a), _) => o.widen_to(a),
            (None, Some(b)) => self.widen_to(b),
            (None, None) => {}
        }
        for (a, b) in self.bins.iter_mut().zip(&o.bins) {
            *a += b;
        }
        self.min = self.min.min(o.min);
        self.max = self.max.max(o.max);
        self.count += o.count;
        self.nonfinite += o.nonfinite;
        Ok(())
    }

    /// The range by `method` (`percentile` is used by [`Method::Percentile`] only).
    pub fn amax(&self, method: Method, percentile: f64) -> f32 {
        match method {
            Method::MinMax => self.abs_max(),
            Method::Percentile => self.amax_percentile(percentile),
            Method::Entropy => self.amax_entropy(INT8_LEVELS),
        }
    }

    /// The upper edge of the first bin at which the cumulative count of |x| reaches
    /// `p` percent of all values, capped at the observed max |x|.
    pub fn amax_percentile(&self, p: f64) -> f32 {
        let Some(w) = self.width else { return 0.0 };
        let total: u64 = self.bins.iter().sum();
        let target = ((total as f64) * p.clamp(0.0, 100.0) / 100.0).ceil() as u64;
        let mut cum = 0u64;
        for (i, &c) in self.bins.iter().enumerate() {
            cum += c;
            if cum >= target.max(1) {
                return (((i + 1) as f64 * w) as f32).min(self.abs_max());
            }
        }
        self.abs_max()
    }

    /// TensorRT's entropy calibration on the |x| histogram: for every candidate bin count
    /// `i` in `levels..=bins`, P = the first `i` bins with the counts beyond them added to bin
    /// `i-1`; Q = the first `i` bins merged into `levels` groups and spread back evenly over
    /// each group's non-empty bins; the threshold `i * w` minimizing KL(P || Q) wins (the first
    /// on ties). A candidate whose Q is zero where P is not has infinite divergence.
    pub fn amax_entropy(&self, levels: usize) -> f32 {
        let Some(w) = self.width else { return 0.0 };
        let n = self.bins.len();
        let levels = levels.clamp(1, n);
        let bins: Vec<f64> = self.bins.iter().map(|&c| c as f64).collect();
        // suffix[i] = sum of bins[i..]
        let mut suffix = vec![0.0; n + 1];
        for i in (0..n).rev() {
            suffix[i] = suffix[i + 1] + bins[i];
        }
        let mut best = (f64::INFINITY, n);
        let mut q = vec![0.0; n];
        for i in levels..=n {
            let p_total = suffix[0];
            if p_total == 0.0 {
                break;
            }
            // Q over the first i bins.
            let mut q_total = 0.0;
            for j in 0..levels {
                let start = j * i / levels;
                let end = if j + 1 == levels {
                    i
                } else {
                    (j + 1) * i / levels
                };
                let group = &bins[start..end];
                let sum: f64 = group.iter().sum();
                let nonzero = group.iter().filter(|&&c| c > 0.0).count();
                for (k, &c) in group.iter().enumerate() {
                    q[start + k] = if c > 0.0 { sum / nonzero as f64 } else { 0.0 };
                }
                q_total += sum;
            }
            let mut kl = 0.0;
            for k in 0..i {
                let p = if k + 1 == i {
                    bins[k] + suffix[i]
                } else {
                    bins[k]
                };
                if p == 0.0 {
                    continue;
                }
                if q[k] == 0.0 {
                    kl = f64::INFINITY;
                    break;
                }
                let pn = p / p_total;
                let qn = q[k] / q_total;
                kl += pn * (pn / qn).ln();
            }
            if kl < best.0 {
                best = (kl, i);
            }
        }
        if best.0.is_infinite() {
            return self.abs_max();
        }
        ((best.1 as f64 * w) as f32).min(self.abs_max())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Tolerance for ranges computed in f32 from exact histograms.
    const RANGE_TOL: f32 = 1e-6;

    #[test]
    fn width_is_the_smallest_power_of_two_that_fits() {
        assert_eq!(width_for(0.0, 4), None);
        assert_eq!(width_for(3.9, 4), Some(1.0));
        // 4.0 needs 4 * w > 4 → w = 2
        assert_eq!(width_for(4.0, 4), Some(2.0));
        assert_eq!(width_for(0.3, 4), Some(0.125));
    }

    #[test]
    fn observe_bins_abs_values_and_tracks_min_max() {
        let mut s = TensorStats::new(128);
        s.observe(&[0.0, -1.0, 2.5, f32::NAN, 100.0]);
        assert_eq!((s.min, s.max, s.count, s.nonfinite), (-1.0, 100.0, 4, 1));
        let (bins, w) = s.histogram();
        assert_eq!(w, Some(1.0)); // 100 < 128 * 1
        assert_eq!(bins[0], 1);
        assert_eq!(bins[1], 1);
        assert_eq!(bins[2], 1);
        assert_eq!(bins[100], 1);
        assert_eq!(s.abs_max(), 100.0);
    }

    #[test]
    fn all_zero_tensor_has_zero_range() {
        let mut s = TensorStats::new(256);
        s.observe(&[0.0; 10]);
        for m in [Method::MinMax, Method::Percentile, Method::Entropy] {
            assert_eq!(s.amax(m, DEFAULT_PERCENTILE), 0.0);
        }
        s.observe(&[0.5]);
        assert_eq!(s.histogram().0[0], 10);
        assert_eq!(s.count, 11);
    }

    #[test]
    fn percentile_on_a_known_histogram() {
        // 100 values: 50 in [0,1), 40 in [1,2), 9 in [2,3), 1 in [127,128).
        let mut bins = vec![0u64; 128];
        bins[0] = 50;
        bins[1] = 40;
        bins[2] = 9;
        bins[127] = 1;
        let s = TensorStats::from_histogram(bins, 1.0);
        // 50th percentile: cumulative 50 reached in bin 0 → edge 1.
        assert!((s.amax_percentile(50.0) - 1.0).abs() < RANGE_TOL);
        // 90th: 90 reached in bin 1 → 2.
        assert!((s.amax_percentile(90.0) - 2.0).abs() < RANGE_TOL);
        // 99th: 99 reached in bin 2 → 3.
        assert!((s.amax_percentile(99.0) - 3.0).abs() < RANGE_TOL);
        // 99.5th needs 100 values (ceil) → the last bin's edge, 128 (= the max).
        assert!((s.amax_percentile(99.5) - 128.0).abs() < RANGE_TOL);
        assert!((s.amax(Method::MinMax, 0.0) - 128.0).abs() < RANGE_TOL);
    }

    #[test]
    fn entropy_on_a_hand_worked_distribution() {
        // 4 bins of width 1 and 2 levels. Candidates i = 2, 3, 4:
        //  i=2: P = [8, 4+0+1] = [8, 5]/13, Q = [8, 4]/12 (groups {0},{1}).
        //       KL = 8/13 ln((8/13)/(8/12)) + 5/13 ln((5/13)/(4/12)) = -0.04925 + 0.05503 = 0.00578
        //  i=3: P = [8, 4, 0+1] → bin 2 is empty in the histogram, so Q[2] = 0 < P[2]: infinite.
        //  i=4: P = [8, 4, 0, 1], groups {0,1} and {2,3}: Q = [6, 6, 0, 1]/13.
        //       KL = 8/13 ln(8/6) + 4/13 ln(4/6) + 0 + 1/13 ln 1 = 0.17704 - 0.12476 = 0.05228
        // → i = 2 wins: threshold 2.0.
        let s = TensorStats::from_histogram(vec![8, 4, 0, 1], 1.0);
        assert!((s.amax_entropy(2) - 2.0).abs() < RANGE_TOL);
        // Without the outlier every candidate is exact at i=2 already (KL 0): still 2.0.
        let s = TensorStats::from_histogram(vec![8, 4, 0, 0], 1.0);
        assert!((s.amax_entropy(2) - 2.0).abs() < RANGE_TOL);
        // A flat distribution over 4 bins: i=2 clips half the mass into bin 1 (KL > 0), i=4
        // reproduces it exactly (KL 0) → the full range 4.0.
        let s = TensorStats::from_histogram(vec![5, 5, 5, 5], 1.0);
        assert!((s.amax_entropy(2) - 4.0).abs() < RANGE_TOL);
    }

    #[test]
    fn entropy_clips_a_long_tail_on_a_synthetic_gaussian() {
        // |N(0,1)|-like counts over 2048 bins of width 1/256 (range 8), plus one far outlier
        // that stretches the histogram to 2048 bins of width 1/64 (range 32).
        let mut data = Vec::new();
        let mut state = 12345u64;
        for _ in 0..20000 {
            // Box–Muller from a small LCG (deterministic).
            let mut u = || {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((state >> 11) as f64 + 0.5) / (1u64 << 53) as f64
            };
            let (a, b) = (u(), u());
            data.push(((-2.0 * a.ln()).sqrt() * (2.0 * std::f64::consts::PI * b).cos()) as f32);
        }
        data.push(30.0);
        let mut s = TensorStats::new(DEFAULT_BINS);
        s.observe(&data);
        let t = s.amax(Method::Entropy, 0.0);
        // The threshold sits in the body of the distribution, far below the outlier.
        assert!(t > 2.0 && t < 8.0, "entropy threshold {t}");
        assert_eq!(s.amax(Method::MinMax, 0.0), 30.0);
    }

    #[test]
    fn merging_equals_one_shot_collection() -> Result<()> {
        let data: Vec<f32> = (0..5000)
            .map(|i| {
                ((i * 7919 % 1013) as f32 - 500.0) * 0.013 * if i % 97 == 0 { 9.0 } else { 1.0 }
            })
            .collect();
        let mut one = TensorStats::new(256);
        one.observe(&data);
        // Chunks in growing-range order (forces re-binning) and merged partial collections.
        let mut chunked = TensorStats::new(256);
        let mut a = TensorStats::new(256);
        let mut b = TensorStats::new(256);
        for (k, c) in data.chunks(333).enumerate() {
            chunked.observe(c);
            if k % 2 == 0 {
                a.observe(c)
            } else {
                b.observe(c)
            }
        }
        let mut merged = b.clone();
        merged.merge(&a)?;
        let mut small_first = TensorStats::new(256);
        small_first.observe(&[0.001, -0.002]);
        small_first.observe(&data);
        let mut reference = TensorStats::new(256);
        reference.observe(&[0.001, -0.002]);
        reference.observe(&data);
        assert_eq!(chunked, one);
        assert_eq!(merged, one);
        assert_eq!(small_first, reference);
        assert!(TensorStats::new(128).merge(&TensorStats::new(256)).is_err());
        Ok(())
    }
}
