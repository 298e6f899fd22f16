//! Property tests of a KV cache: random lists of operations on a sequence (appends, truncations,
//! forks) and the reference they are checked against. After every append the logits a cached
//! generator returns must equal, within a tolerance, those of a fresh sequence (of a reference
//! generator, which may be the same one) prefilled with the whole token list from scratch, and
//! the sequence must hold exactly that list; a last one-token append checks the cache that an
//! operation list ending in a truncation or a fork left behind.

use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::TestCaseError;
use steper_runtime::{Generator, LogitsMode, Sequence};

/// The token of the final check's append.
pub const PROBE_TOKEN: u32 = 1;

/// One operation on a sequence.
#[derive(Debug, Clone)]
pub enum Op {
    /// Appends the tokens, asking for every position's logits or only the last one's.
    Append { tokens: Vec<u32>, all: bool },
    /// Truncates to a length drawn from 0..=len+2 (past the end: no change).
    Truncate(Index),
    /// Continues on a fork of the first n positions (n drawn from 0..=len+2), dropping the
    /// original.
    Fork(Index),
}

/// The shape of the operation lists drawn.
#[derive(Debug, Clone, Copy)]
pub struct OpsSpec {
    /// Tokens are drawn from `0..vocab`.
    pub vocab: u32,
    /// Operations per list, at most.
    pub max_ops: usize,
    /// Tokens of a short append, at most.
    pub max_append: usize,
    /// Tokens of a long append (last logits only), at most; `None`: no long appends.
    pub max_long_append: Option<usize>,
}

impl OpsSpec {
    /// The most tokens a list (and its final probe) can put in a sequence.
    pub fn longest(&self) -> usize {
        self.max_ops * self.max_append.max(self.max_long_append.unwrap_or(0)) + 1
    }

    /// Lists of 1..=max_ops operations: short appends (weight 4), long appends (2, where
    /// asked), truncations (2) and forks (1).
    pub fn strategy(&self) -> BoxedStrategy<Vec<Op>> {
        let tokens = |max: usize| prop::collection::vec(0..self.vocab, 1..=max);
        let short = (tokens(self.max_append), any::<bool>())
            .prop_map(|(tokens, all)| Op::Append { tokens, all });
        let truncate = any::<Index>().prop_map(Op::Truncate);
        let fork = any::<Index>().prop_map(Op::Fork);
        let op = match self.max_long_append {
            Some(long) => prop_oneof![
                4 => short,
                2 => tokens(long).prop_map(|tokens| Op::Append { tokens, all: false }),
                2 => truncate,
                1 => fork,
            ]
            .boxed(),
            None => prop_oneof![4 => short, 2 => truncate, 1 => fork].boxed(),
        };
        prop::collection::vec(op, 1..=self.max_ops).boxed()
    }
}

/// A test-case failure carrying `e`'s message.
pub fn fail(e: impl std::fmt::Display) -> TestCaseError {
    TestCaseError::fail(e.to_string())
}

/// Largest |a - b| over the largest |b| (at least 1).
pub fn rel_diff(a: &[f32], b: &[f32]) -> f32 {
    let scale = b.iter().fold(1.0f32, |m, x| m.max(x.abs()));
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
        / scale
}

/// A cached generator checked against a fresh prefill of a reference generator.
pub struct KvCheck<'a> {
    /// The generator whose cache is under test.
    pub cached: &'a dyn Generator,
    /// The generator whose fresh prefills are the reference (may be `cached` itself).
    pub reference: &'a dyn Generator,
    /// Largest [`rel_diff`] allowed between a cached and a fresh logits row.
    pub tolerance: f32,
}

impl KvCheck<'_> {
    /// Appends `tokens` to `seq` (whose reference token list is `held`) and compares the
    /// logits with a fresh prefill of the whole list.
    pub fn append(
        &self,
        seq: &mut Sequence,
        held: &mut Vec<u32>,
        tokens: &[u32],
        all: bool,
    ) -> Result<(), TestCaseError> {
        let mode = if all {
            LogitsMode::All
        } else {
            LogitsMode::Last
        };
        let got = self.cached.append(seq, tokens, mode).map_err(fail)?;
        held.extend_from_slice(tokens);
        prop_assert_eq!(seq.tokens(), &held[..], "tokens held after the append");
        let mut fresh = self.reference.new_sequence().map_err(fail)?;
        let want = self
            .reference
            .append(&mut fresh, held, LogitsMode::All)
            .map_err(fail)?;
        let first = held.len() - tokens.len();
        let rows: Vec<usize> = if all {
            (first..held.len()).collect()
        } else {
            vec![held.len() - 1]
        };
        prop_assert_eq!(got.rows, rows.len(), "rows returned");
        for (r, &pos) in rows.iter().enumerate() {
            let d = rel_diff(got.row(r), want.row(pos));
            prop_assert!(
                d <= self.tolerance,
                "position {} of {}: cached logits differ from a fresh prefill by {} (> {})",
                pos,
                held.len(),
                d,
                self.tolerance
            );
        }
        Ok(())
    }

    /// Runs `ops` on a new sequence of the cached generator, checking after every append and
    /// with a final [`PROBE_TOKEN`] append.
    pub fn run(&self, ops: &[Op]) -> Result<(), TestCaseError> {
        let g = self.cached;
        let mut seq = g.new_sequence().map_err(fail)?;
        let mut held: Vec<u32> = Vec::new();
        for op in ops {
            match op {
                Op::Append { tokens, all } => self.append(&mut seq, &mut held, tokens, *all)?,
                Op::Truncate(i) => {
                    let len = i.index(held.len() + 3);
                    g.truncate(&mut seq, len).map_err(fail)?;
                    held.truncate(len);
                    prop_assert_eq!(seq.tokens(), &held[..], "tokens after truncate({})", len);
                }
                Op::Fork(i) => {
                    let len = i.index(held.len() + 3);
                    seq = g.fork(&seq, len).map_err(fail)?;
                    held.truncate(len);
                    prop_assert_eq!(seq.tokens(), &held[..], "tokens after fork({})", len);
                }
            }
        }
        self.append(&mut seq, &mut held, &[PROBE_TOKEN], false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;

    #[test]
    fn rel_diff_scales_by_the_largest_reference_logit_at_least_one() {
        assert_eq!(rel_diff(&[1.0, 2.0], &[1.0, 2.5]), 0.5 / 2.5);
        assert_eq!(rel_diff(&[0.5], &[0.25]), 0.25, "scaled by 1 below 1");
    }

    #[test]
    fn drawn_lists_keep_to_the_spec() {
        let spec = OpsSpec {
            vocab: 7,
            max_ops: 5,
            max_append: 3,
            max_long_append: Some(40),
        };
        assert_eq!(spec.longest(), 5 * 40 + 1);
        let mut runner = TestRunner::deterministic();
        let (mut long, mut short) = (false, false);
        for _ in 0..200 {
            let ops = spec.strategy().new_tree(&mut runner).unwrap().current();
            assert!((1..=5).contains(&ops.len()));
            for op in ops {
                if let Op::Append { tokens, all } = op {
                    assert!(!tokens.is_empty() && tokens.iter().all(|t| *t < 7));
                    assert!(tokens.len() <= 40 && (!all || tokens.len() <= 3));
                    long |= tokens.len() > 3;
                    short |= tokens.len() <= 3;
                }
            }
        }
        assert!(long && short, "both kinds of append are drawn");
        let no_long = OpsSpec {
            max_long_append: None,
            ..spec
        };
        for _ in 0..200 {
            for op in no_long.strategy().new_tree(&mut runner).unwrap().current() {
                if let Op::Append { tokens, .. } = op {
                    assert!(tokens.len() <= 3);
                }
            }
        }
    }
}
