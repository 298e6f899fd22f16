//! Answer metrics (docs/DESIGN.md, "Metrics"), as the official SQuAD v1.1 script computes them:
//! normalization lower-cases, removes ASCII punctuation (Python's `string.punctuation`), removes
//! the articles a/an/the as whole words and collapses whitespace. EM and token F1 take the max
//! over gold answers; Acc is 1 when some normalized gold is contained in the normalized
//! prediction.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

/// SQuAD's `normalize_answer`: `white_space_fix(remove_articles(remove_punc(lower(s))))`.
pub fn normalize_answer(s: &str) -> String {
    let lower = s.to_lowercase();
    let no_punc: String = lower
        .chars()
        .filter(|c| !c.is_ascii_punctuation())
        .collect();
    // `re.sub(r"\b(a|an|the)\b", " ", text)`: drop article words, delimited by non-word chars.
    let mut out = String::with_capacity(no_punc.len());
    let mut word = String::new();
    let flush = |word: &mut String, out: &mut String| {
        if matches!(word.as_str(), "a" | "an" | "the") {
            out.push(' ');
        } else {
            out.push_str(word);
        }
        word.clear();
    };
    for c in no_punc.chars() {
        if c.is_alphanumeric() || c == '_' {
            word.push(c);
        } else {
            flush(&mut word, &mut out);
            out.push(c);
        }
    }
    flush(&mut word, &mut out);
    out.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Exact match of normalized strings, max over `golds` (0 with no golds).
pub fn exact_match(prediction: &str, golds: &[String]) -> f64 {
    let p = normalize_answer(prediction);
    let hit = golds.iter().any(|g| normalize_answer(g) == p);
    if hit {
        1.0
    } else {
        0.0
    }
}

/// Token F1 of one prediction against one gold (SQuAD v1.1: 0 when no token is shared).
pub fn f1_single(prediction: &str, gold: &str) -> f64 {
    let p = normalize_answer(prediction);
    let g = normalize_answer(gold);
    let pt: Vec<&str> = p.split_whitespace().collect();
    let gt: Vec<&str> = g.split_whitespace().collect();
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for t in &gt {
        *counts.entry(t).or_default() += 1;
    }
    let mut same = 0usize;
    for t in &pt {
        if let Some(c) = counts.get_mut(t) {
            if *c > 0 {
                *c -= 1;
                same += 1;
            }
        }
    }
    if same == 0 {
        return 0.0;
    }
    let precision = same as f64 / pt.len() as f64;
    let recall = same as f64 / gt.len() as f64;
    2.0 * precision * recall / (precision + recall)
}

/// Token F1, max over `golds` (0 with no golds).
pub fn f1(prediction: &str, golds: &[String]) -> f64 {
    golds
        .iter()
        .map(|g| f1_single(prediction, g))
        .fold(0.0, f64::max)
}

/// Acc: 1 when a normalized gold is a substring of the normalized prediction. An empty
/// normalized gold only counts against an empty prediction.
pub fn accuracy(prediction: &str, golds: &[String]) -> f64 {
    let p = normalize_answer(prediction);
    let hit = golds.iter().any(|g| {
        let g = normalize_answer(g);
        if g.is_empty() {
            p.is_empty()
        } else {
            p.contains(&g)
        }
    });
    if hit {
        1.0
    } else {
        0.0
    }
}

/// EM, F1 and Acc of one prediction.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct Scores {
    /// Exact match.
    pub em: f64,
    /// Token F1.
    pub f1: f64,
    /// Gold contained in prediction.
    pub acc: f64,
}

impl Scores {
    /// Scores `prediction` against `golds`.
    pub fn of(prediction: &str, golds: &[String]) -> Self {
        Scores {
            em: exact_match(prediction, golds),
            f1: f1(prediction, golds),
            acc: accuracy(prediction, golds),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hand-computed F1 values are ratios of small integers; compare within float rounding.
    const F1_TOLERANCE: f64 = 1e-12;

    fn golds(g: &[&str]) -> Vec<String> {
        g.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn normalizes_like_squad() {
        assert_eq!(normalize_answer("The  Eiffel Tower!"), "eiffel tower");
        assert_eq!(normalize_answer("an apple, a day"), "apple day");
        assert_eq!(normalize_answer("Theater"), "theater");
        assert_eq!(normalize_answer("U.S.A."), "usa");
        assert_eq!(normalize_answer("rock'n'roll"), "rocknroll");
        // Unicode: lower-cased, letters kept; non-ASCII punctuation is not in string.punctuation.
        assert_eq!(normalize_answer("Ångström École"), "ångström école");
        assert_eq!(normalize_answer("“The” Café"), "“ ” café");
        assert_eq!(normalize_answer("the–end"), "–end");
        assert_eq!(normalize_answer(""), "");
    }

    #[test]
    fn exact_match_takes_the_max_over_golds() {
        assert_eq!(
            exact_match("the Eiffel tower.", &golds(&["Eiffel Tower"])),
            1.0
        );
        assert_eq!(exact_match("Paris", &golds(&["London", "paris"])), 1.0);
        assert_eq!(exact_match("Paris, France", &golds(&["Paris"])), 0.0);
        assert_eq!(exact_match("x", &[]), 0.0);
        assert_eq!(exact_match("Zürich", &golds(&["zürich"])), 1.0);
    }

    #[test]
    fn f1_matches_hand_worked_cases() {
        // pred {new, york, city}, gold {new, york}: P = 2/3, R = 1, F1 = 0.8.
        assert!((f1("New York City", &golds(&["New York"])) - 0.8).abs() < F1_TOLERANCE);
        // Articles and punctuation vanish before counting: "the cat sat." vs "a cat" → {cat, sat}
        // vs {cat}: P = 1/2, R = 1, F1 = 2/3.
        assert!((f1("the cat sat.", &golds(&["a cat"])) - 2.0 / 3.0).abs() < F1_TOLERANCE);
        // Repeated tokens count once per occurrence: {a-b… } "b b c" vs "b c c": same = 2, P = R
        // = 2/3.
        assert!((f1("b b c", &golds(&["b c c"])) - 2.0 / 3.0).abs() < F1_TOLERANCE);
        // Max over golds.
        assert!(
            (f1("Barack Obama", &golds(&["Obama", "Barack Obama"])) - 1.0).abs() < F1_TOLERANCE
        );
        assert_eq!(f1("Paris", &golds(&["London"])), 0.0);
        assert_eq!(f1("", &golds(&["London"])), 0.0);
    }

    #[test]
    fn accuracy_is_containment() {
        assert_eq!(
            accuracy("It is Chief of Protocol.", &golds(&["Chief of Protocol"])),
            1.0
        );
        assert_eq!(accuracy("Chief", &golds(&["Chief of Protocol"])), 0.0);
        assert_eq!(accuracy("yes", &golds(&["no", "Yes"])), 1.0);
        assert_eq!(accuracy("anything", &golds(&["the"])), 0.0);
        let s = Scores::of("The New York City", &golds(&["new york"]));
        assert_eq!((s.em, s.acc), (0.0, 1.0));
        assert!((s.f1 - 0.8).abs() < F1_TOLERANCE);
    }
}
