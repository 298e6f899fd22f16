//! Prompt-lookup decoding: drafts copied from the prompt, verified in one model call.
//!
//! A step of the loop mostly restates what a retrieved passage says ("Kiss and Tell is a 1945
//! American comedy film directed by Richard Wallace."), so the tokens that follow the last few
//! generated ones are often already in the prompt. Prompt-lookup decoding (Saxena, 2023,
//! <https://github.com/apoorvumang/prompt-lookup-decoding>; llama.cpp's `lookup` example) finds
//! the latest earlier occurrence of the sequence's last n tokens and proposes the tokens that
//! followed it as a draft; the model runs the picked token and the draft in one call and keeps
//! the draft up to its first token greedy decoding would not have picked. Greedy output is the
//! same as decoding one token per call; what changes is the number of model calls.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Settings of prompt-lookup decoding ([`crate::ReasonOptions::prompt_lookup`]); greedy
/// decoding only.
///
/// ```
/// use steper_runtime::PromptLookup;
/// let pl = PromptLookup::default();
/// // "a b c d a b" + "c"? The suffix "a b" occurred at 0, followed by "c d a b".
/// assert_eq!(pl.draft(&[1, 2, 3, 4, 1, 2], 8), &[3, 4, 1, 2]);
/// assert_eq!(pl.draft(&[1, 2, 3, 4, 1, 2], 1), &[3]);
/// assert!(pl.draft(&[1, 2, 3, 4, 5, 6], 8).is_empty());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PromptLookup {
    /// Longest suffix searched for, in tokens (tried first).
    pub max_ngram: usize,
    /// Shortest suffix searched for.
    pub min_ngram: usize,
    /// Most tokens drafted per model call.
    pub max_draft: usize,
}

impl Default for PromptLookup {
    /// Suffixes of 3 down to 2 tokens, drafts of up to 8 tokens.
    fn default() -> Self {
        PromptLookup {
            max_ngram: 3,
            min_ngram: 2,
            max_draft: 8,
        }
    }
}

impl PromptLookup {
    /// The default suffix lengths with drafts of up to `max_draft` tokens.
    pub fn with_max_draft(max_draft: usize) -> Self {
        PromptLookup {
            max_draft,
            ..PromptLookup::default()
        }
    }

    /// Refuses settings that cannot draft: `max_draft` 0, `min_ngram` 0 or above `max_ngram`.
    pub fn validate(&self) -> Result<()> {
        if self.max_draft == 0 {
            return Err(Error::InvalidOption {
                option: "prompt_lookup.max_draft".into(),
                expected: "at least 1".into(),
                got: "0".into(),
            });
        }
        if self.min_ngram == 0 || self.min_ngram > self.max_ngram {
            return Err(Error::InvalidOption {
                option: "prompt_lookup.min_ngram".into(),
                expected: format!("between 1 and max_ngram ({})", self.max_ngram),
                got: self.min_ngram.to_string(),
            });
        }
        Ok(())
    }

    /// The draft for `tokens` (the whole sequence so far, its last token the one just picked):
    /// the tokens that followed the latest earlier occurrence of its longest suffix of
    /// `max_ngram` down to `min_ngram` tokens, at most `max_draft` and `limit` of them, never
    /// running past the end of `tokens`. Empty when no suffix occurs earlier.
    pub fn draft<'t>(&self, tokens: &'t [u32], limit: usize) -> &'t [u32] {
        let want = self.max_draft.min(limit);
        if want == 0 {
            return &[];
        }
        let len = tokens.len();
        for n in (self.min_ngram.max(1)..=self.max_ngram).rev() {
            if len <= n {
                continue;
            }
            let suffix = &tokens[len - n..];
            // Latest occurrence first: the nearest context predicts best.
            for start in (0..len - n).rev() {
                if &tokens[start..start + n] == suffix {
                    let from = start + n;
                    return &tokens[from..(from + want).min(len)];
                }
            }
        }
        &[]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_longest_suffix_wins_and_the_latest_occurrence_of_it() {
        let pl = PromptLookup::default();
        // Suffix "5 6 7" occurs at 0 (followed by 1) and "6 7" at 4 (followed by 2): the
        // 3-gram match is taken although the 2-gram one is nearer.
        let t = [5, 6, 7, 1, 6, 7, 2, 9, 5, 6, 7];
        assert_eq!(pl.draft(&t, 8), &[1, 6, 7, 2, 9, 5, 6, 7]);
        // Two occurrences of "1 2": the later one (followed by 4) is used.
        let t = [1, 2, 3, 1, 2, 4, 8, 1, 2];
        assert_eq!(pl.draft(&t, 8), &[4, 8, 1, 2]);
    }

    #[test]
    fn drafts_respect_both_limits_and_never_use_a_one_token_match_by_default() {
        let pl = PromptLookup::with_max_draft(2);
        let t = [1, 2, 3, 4, 5, 1, 2];
        assert_eq!(pl.draft(&t, 8), &[3, 4]);
        assert_eq!(pl.draft(&t, 1), &[3]);
        assert!(pl.draft(&t, 0).is_empty());
        // Only "9" recurs: a single token is not enough with min_ngram 2 …
        let t = [9, 3, 4, 9];
        assert!(PromptLookup::default().draft(&t, 8).is_empty());
        // … and is with min_ngram 1.
        let one = PromptLookup {
            min_ngram: 1,
            ..PromptLookup::default()
        };
        assert_eq!(one.draft(&t, 8), &[3, 4, 9]);
        assert!(one.draft(&[7], 8).is_empty());
    }

    #[test]
    fn settings_that_cannot_draft_are_refused_naming_the_field() {
        assert!(PromptLookup::default().validate().is_ok());
        let e = PromptLookup::with_max_draft(0).validate();
        assert!(
            matches!(&e, Err(Error::InvalidOption { option, .. }) if option == "prompt_lookup.max_draft"),
            "{e:?}"
        );
        for (min, max) in [(0, 3), (4, 3)] {
            let e = PromptLookup {
                min_ngram: min,
                max_ngram: max,
                max_draft: 4,
            }
            .validate();
            assert!(
                matches!(&e, Err(Error::InvalidOption { option, .. }) if option == "prompt_lookup.min_ngram"),
                "{e:?}"
            );
        }
    }
}
