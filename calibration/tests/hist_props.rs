//! Properties of the range histogram ([`TensorStats`]) against a reference model written from
//! its documented definition: the bin width is the smallest power of two `w` with
//! `max|x| < bins * w`, bin `i` counts the finite values with `i*w <= |x| < (i+1)*w`, min / max /
//! counts are over finite values and NaN / ±inf are only counted. On random data sets (values
//! on and around bin edges, zeros, subnormals, the largest floats, NaN and infinities):
//!
//! - observing the data chunk by chunk gives the reference histogram of everything seen so far
//!   after every chunk (a wider range re-bins without losing or moving a count);
//! - collections of the chunks merged in any order equal one collection of all the data;
//! - merging is commutative.
//!
//! Everything is compared exactly: the histogram is exact by construction (power-of-two widths),
//! so no tolerance applies.

use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestCaseResult, TestRunner};
use steper_calibration::TensorStats;

/// Random cases per property (each a data set of up to `MAX_VALUES` values).
const CASES: u32 = 1024;
/// Values per data set, at most.
const MAX_VALUES: usize = 400;
/// Chunks a data set is cut into, at most.
const MAX_CHUNKS: usize = 8;
/// Bin counts tried: below the minimum (raised to 128), powers of two and others.
const BIN_CHOICES: [usize; 6] = [1, 128, 130, 256, 777, 2048];
/// The reference's search for the width starts below any width a finite f32 needs (the
/// smallest subnormal is 2^-149 and there are fewer than 2^12 bins).
const SMALLEST_WIDTH_EXP: i32 = -170;

/// One value: mostly a multiple of a power of two (so bin edges are hit exactly), sometimes a
/// special one.
fn value() -> impl Strategy<Value = f32> {
    let scaled = (-(1i32 << 12)..=(1 << 12), -30i32..30)
        .prop_map(|(m, e)| (m as f64 * 2f64.powi(e - 8)) as f32);
    let power = (-40i32..40, any::<bool>()).prop_map(|(e, neg)| {
        let v = 2f64.powi(e) as f32;
        if neg {
            -v
        } else {
            v
        }
    });
    prop_oneof![
        6 => scaled,
        3 => power,
        2 => any::<f32>(),
        1 => Just(0.0f32),
        1 => Just(-0.0f32),
        1 => (1u32..0x0080_0000).prop_map(f32::from_bits), // subnormals
        1 => prop_oneof![Just(f32::MAX), Just(f32::MIN), Just(f32::MIN_POSITIVE)],
        1 => prop_oneof![Just(f32::NAN), Just(f32::INFINITY), Just(f32::NEG_INFINITY)],
    ]
}

/// A data set and where it is cut into chunks (sorted cut points, possibly repeated: empty
/// chunks are part of the property).
fn data_and_cuts() -> impl Strategy<Value = (Vec<f32>, Vec<usize>)> {
    prop::collection::vec(value(), 0..=MAX_VALUES).prop_flat_map(|data| {
        let n = data.len();
        (
            Just(data),
            prop::collection::vec(0..=n, 0..MAX_CHUNKS).prop_map(|mut c| {
                c.sort_unstable();
                c
            }),
        )
    })
}

fn chunks<'a>(data: &'a [f32], cuts: &[usize]) -> Vec<&'a [f32]> {
    let mut out = Vec::with_capacity(cuts.len() + 1);
    let mut start = 0;
    for &c in cuts {
        out.push(&data[start..c]);
        start = c;
    }
    out.push(&data[start..]);
    out
}

/// What statistics of `data` must be, computed from the definition (the histogram as its
/// bin count and its non-empty bins, so that a failure prints readably).
#[derive(Debug, PartialEq)]
struct Reference {
    bin_count: usize,
    bins: Vec<(usize, u64)>,
    width: Option<f64>,
    count: u64,
    nonfinite: u64,
    min: f32,
    max: f32,
}

fn reference(data: &[f32], bins: usize) -> Reference {
    let n = bins.max(steper_calibration::hist::INT8_LEVELS);
    let finite: Vec<f32> = data.iter().copied().filter(|x| x.is_finite()).collect();
    let amax = finite.iter().fold(0.0f64, |m, x| m.max(x.abs() as f64));
    let mut counts = vec![0u64; n];
    let width = if amax == 0.0 {
        counts[0] = finite.len() as u64;
        None
    } else {
        let mut w = 2f64.powi(SMALLEST_WIDTH_EXP);
        assert!(n as f64 * w <= amax, "the width search starts too high");
        while n as f64 * w <= amax {
            w *= 2.0;
        }
        for x in &finite {
            let i = (x.abs() as f64 / w).floor() as usize;
            assert!(i < n, "{x} falls past the last bin at width {w}");
            counts[i] += 1;
        }
        Some(w)
    };
    Reference {
        bin_count: n,
        bins: nonzero(&counts),
        width,
        count: finite.len() as u64,
        nonfinite: (data.len() - finite.len()) as u64,
        min: finite.iter().copied().fold(f32::INFINITY, f32::min),
        max: finite.iter().copied().fold(f32::NEG_INFINITY, f32::max),
    }
}

fn nonzero(bins: &[u64]) -> Vec<(usize, u64)> {
    bins.iter()
        .enumerate()
        .filter(|(_, &c)| c > 0)
        .map(|(i, &c)| (i, c))
        .collect()
}

fn actual(s: &TensorStats) -> Reference {
    let (bins, width) = s.histogram();
    Reference {
        bin_count: bins.len(),
        bins: nonzero(bins),
        width,
        count: s.count,
        nonfinite: s.nonfinite,
        min: s.min,
        max: s.max,
    }
}

/// Runs `property` on `CASES` random cases; a failure reports the minimal case found.
fn check<S: Strategy>(
    strategy: S,
    property: impl Fn(S::Value) -> TestCaseResult,
) -> Result<(), String>
where
    S::Value: std::fmt::Debug,
{
    let mut runner = TestRunner::new(Config {
        cases: CASES,
        failure_persistence: None,
        ..Config::default()
    });
    runner.run(&strategy, property).map_err(|e| e.to_string())
}

fn fail(e: impl std::fmt::Display) -> TestCaseError {
    TestCaseError::fail(e.to_string())
}

#[test]
fn observing_chunk_by_chunk_equals_the_reference_histogram_after_every_chunk() -> Result<(), String>
{
    let strategy = (data_and_cuts(), prop::sample::select(BIN_CHOICES.to_vec()));
    check(strategy, |((data, cuts), bins)| {
        let mut s = TensorStats::new(bins);
        let mut seen = 0;
        for c in chunks(&data, &cuts) {
            s.observe(c);
            seen += c.len();
            let want = reference(&data[..seen], bins);
            prop_assert_eq!(actual(&s), want, "after {} of {} values", seen, data.len());
            let total: u64 = s.histogram().0.iter().sum();
            prop_assert_eq!(total, s.count, "binned counts vs finite values");
        }
        let mut one = TensorStats::new(bins);
        one.observe(&data);
        prop_assert_eq!(s, one);
        Ok(())
    })
}

#[test]
fn chunk_collections_merged_in_any_order_equal_one_collection() -> Result<(), String> {
    let strategy = (data_and_cuts(), prop::sample::select(BIN_CHOICES.to_vec())).prop_flat_map(
        |((data, cuts), bins)| {
            let order: Vec<usize> = (0..=cuts.len()).collect();
            (
                Just(data),
                Just(cuts),
                Just(bins),
                Just(order).prop_shuffle(),
            )
        },
    );
    check(strategy, |(data, cuts, bins, order)| {
        let parts: Vec<TensorStats> = chunks(&data, &cuts)
            .into_iter()
            .map(|c| {
                let mut s = TensorStats::new(bins);
                s.observe(c);
                s
            })
            .collect();
        let mut merged = TensorStats::new(bins);
        for &i in &order {
            merged.merge(&parts[i]).map_err(fail)?;
        }
        let mut one = TensorStats::new(bins);
        one.observe(&data);
        prop_assert_eq!(
            actual(&merged),
            reference(&data, bins),
            "merge order {:?}",
            order
        );
        prop_assert_eq!(merged, one);
        Ok(())
    })
}

#[test]
fn merging_is_commutative() -> Result<(), String> {
    let strategy = (
        prop::collection::vec(value(), 0..=MAX_VALUES / 2),
        prop::collection::vec(value(), 0..=MAX_VALUES / 2),
        prop::sample::select(BIN_CHOICES.to_vec()),
    );
    check(strategy, |(a, b, bins)| {
        let (mut sa, mut sb) = (TensorStats::new(bins), TensorStats::new(bins));
        sa.observe(&a);
        sb.observe(&b);
        let mut ab = sa.clone();
        ab.merge(&sb).map_err(fail)?;
        let mut ba = sb.clone();
        ba.merge(&sa).map_err(fail)?;
        prop_assert_eq!(actual(&ab), actual(&ba), "a.merge(b) vs b.merge(a)");
        let all: Vec<f32> = a.iter().chain(&b).copied().collect();
        prop_assert_eq!(actual(&ab), reference(&all, bins));
        Ok(())
    })
}
