//! The reasoning loop's passage bookkeeping against a reference model, on random small corpora,
//! questions, scripted step models and loop options. The loop promises (docs/DESIGN.md, "The
//! multi-step loop"; `LoopRun::prepare`):
//!
//! - step s asks the retriever for `k = min(top_k, max_passages - held)` passages with the
//!   current query, excluding exactly the ids held before it, and does not call it when k = 0
//!   (its trace then shows an empty query);
//! - the first query is the trimmed question, each later one the IRCoT-cleaned first sentence of
//!   the previous step (the question again when cleaning leaves nothing);
//! - a step adds the retriever's new passages in its order, skipping ids already held, and never
//!   more than k of them: whatever the retriever returns, no id is held twice, no step adds more
//!   than `top_k` and no more than `max_passages` are held;
//! - `Reasoning::passages` lists them in retrieval order, each with the step that added it;
//!   `StepTrace::held` counts those held after each step;
//! - the loop stops at the first answer sentence or at the forced last step.
//!
//! The reference recomputes every step's new passages from the retriever's ranking alone.
//! Retrievers that honour `exclude`, ignore it, repeat hits or return more than k are all run.

use std::collections::HashSet;
use std::sync::Mutex;

use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use steper_runtime::answer::{clean_query, extract_answer, first_sentence};
use steper_runtime::retrieval::Hit;
use steper_runtime::{reason, LoopOptions, Result, Retriever, StepModel, StepOutput, StepRequest};

/// Random cases of the property.
const CASES: u32 = 512;
/// Words of documents, questions and sentences (a small vocabulary, so queries match).
const WORDS: [&str; 8] = [
    "alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel",
];
/// Words only sentences use: an IRCoT lead-in and a wh-word (removed from the next query).
const SENTENCE_ONLY: [&str; 2] = ["so", "which"];
/// Documents in a corpus, at most.
const MAX_DOCS: usize = 14;
/// Hits past k a `TooMany` retriever returns.
const EXTRA_HITS: usize = 3;
/// Text a step model gives once its script is used up (no answer in it).
const FALLBACK_LINE: &str = "echo.";

/// How the test retriever treats its contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// The best k not in `exclude`.
    Honest,
    /// The best k of all documents, held ones included.
    IgnoresExclude,
    /// The honest hits, each twice.
    Repeats,
    /// The best k + EXTRA_HITS not in `exclude`.
    TooMany,
}

#[derive(Debug, Clone, PartialEq)]
struct Call {
    query: String,
    k: usize,
    exclude: HashSet<String>,
}

/// A corpus ranked by the number of query words in a document (ties: corpus order).
#[derive(Debug)]
struct Corpus {
    docs: Vec<Vec<&'static str>>,
    mode: Mode,
    calls: Mutex<Vec<Call>>,
}

fn id(i: usize) -> String {
    format!("doc{i}")
}

fn bare(w: &str) -> String {
    w.trim_matches(|c: char| !c.is_alphanumeric())
        .to_lowercase()
}

impl Corpus {
    /// Document indexes, best first; `exclude`d ids left out when given.
    fn ranked(&self, query: &str, exclude: Option<&HashSet<String>>) -> Vec<usize> {
        let words: HashSet<String> = query.split_whitespace().map(bare).collect();
        let mut scored: Vec<(usize, usize)> = self
            .docs
            .iter()
            .enumerate()
            .filter(|(i, _)| exclude.is_none_or(|e| !e.contains(&id(*i))))
            .map(|(i, d)| (d.iter().filter(|w| words.contains(**w)).count(), i))
            .collect();
        scored.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        scored.into_iter().map(|(_, i)| i).collect()
    }

    fn hit(&self, i: usize) -> Hit {
        Hit {
            id: id(i),
            title: format!("Title {i}"),
            text: self.docs[i].join(" "),
            score: i as f32,
        }
    }

    /// The ids the loop must add for a call with `query`, `k` and `held` (the reference).
    fn expected_new(&self, query: &str, k: usize, held: &[String]) -> Vec<String> {
        let held_set: HashSet<String> = held.iter().cloned().collect();
        match self.mode {
            Mode::IgnoresExclude => self
                .ranked(query, None)
                .into_iter()
                .take(k)
                .map(id)
                .filter(|d| !held_set.contains(d))
                .collect(),
            _ => self
                .ranked(query, Some(&held_set))
                .into_iter()
                .take(k)
                .map(id)
                .collect(),
        }
    }
}

impl Retriever for Corpus {
    fn retrieve(&self, query: &str, k: usize, exclude: &HashSet<String>) -> Result<Vec<Hit>> {
        if let Ok(mut calls) = self.calls.lock() {
            calls.push(Call {
                query: query.to_string(),
                k,
                exclude: exclude.clone(),
            });
        }
        let ranked = match self.mode {
            Mode::IgnoresExclude => self.ranked(query, None),
            _ => self.ranked(query, Some(exclude)),
        };
        let n = if self.mode == Mode::TooMany {
            k + EXTRA_HITS
        } else {
            k
        };
        let hits = ranked.into_iter().take(n).map(|i| self.hit(i));
        Ok(if self.mode == Mode::Repeats {
            hits.flat_map(|h| [h.clone(), h]).collect()
        } else {
            hits.collect()
        })
    }
}

/// Gives `lines[step - 1]` at each step (FALLBACK_LINE past the end).
struct Scripted {
    lines: Vec<String>,
}

impl Scripted {
    fn line(&self, step: usize) -> &str {
        self.lines
            .get(step - 1)
            .map(String::as_str)
            .unwrap_or(FALLBACK_LINE)
    }
}

impl StepModel for Scripted {
    fn name(&self) -> &str {
        "scripted"
    }
    fn prompt_budget(&self, _: usize) -> Option<usize> {
        None
    }
    fn count_tokens(&self, text: &str) -> Result<usize> {
        Ok(text.split_whitespace().count())
    }
    fn generate(&mut self, req: &StepRequest<'_>) -> Result<StepOutput> {
        let text = self.line(req.step).to_string();
        Ok(StepOutput {
            new_tokens: text.split_whitespace().count(),
            text,
            ..StepOutput::default()
        })
    }
}

#[derive(Debug, Clone)]
struct Case {
    docs: Vec<Vec<&'static str>>,
    mode: Mode,
    question: String,
    lines: Vec<String>,
    top_k: usize,
    max_passages: usize,
    max_steps: usize,
}

fn words(min: usize, max: usize, extra: bool) -> impl Strategy<Value = Vec<&'static str>> {
    let pool: Vec<&'static str> = if extra {
        WORDS.iter().chain(&SENTENCE_ONLY).copied().collect()
    } else {
        WORDS.to_vec()
    };
    prop::collection::vec(prop::sample::select(pool), min..=max)
}

/// A step's text: a sentence (sometimes followed by another, or with a leading space), or an
/// answer.
fn line() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => (words(1, 4, true), any::<bool>(), words(0, 2, false)).prop_map(|(a, space, b)| {
            let lead = if space { " " } else { "" };
            let more = if b.is_empty() { String::new() } else { format!(" {}.", b.join(" ")) };
            format!("{lead}{}.{more}", a.join(" "))
        }),
        1 => prop::sample::select(WORDS.to_vec()).prop_map(|w| format!(" So the answer is: {w}.")),
    ]
}

fn case() -> impl Strategy<Value = Case> {
    (
        prop::collection::vec(words(1, 5, false), 0..=MAX_DOCS),
        prop::sample::select(vec![
            Mode::Honest,
            Mode::IgnoresExclude,
            Mode::Repeats,
            Mode::TooMany,
        ]),
        words(1, 4, false),
        prop::collection::vec(line(), 0..=6),
        0usize..=4,
        0usize..=10,
        1usize..=6,
    )
        .prop_map(
            |(docs, mode, question, lines, top_k, max_passages, max_steps)| Case {
                docs,
                mode,
                question: format!(" {}? ", question.join(" ")),
                lines,
                top_k,
                max_passages,
                max_steps,
            },
        )
}

fn fail(e: impl std::fmt::Display) -> TestCaseError {
    TestCaseError::fail(e.to_string())
}

/// Runs the loop on `case` and checks its passages against the reference.
fn check(case: &Case) -> std::result::Result<(), TestCaseError> {
    let corpus = Corpus {
        docs: case.docs.clone(),
        mode: case.mode,
        calls: Mutex::new(Vec::new()),
    };
    let mut model = Scripted {
        lines: case.lines.clone(),
    };
    let opts = LoopOptions::default()
        .with_top_k(case.top_k)
        .with_max_passages(case.max_passages)
        .with_max_steps(case.max_steps);
    let out = reason(&case.question, &corpus, &mut model, &opts).map_err(fail)?;
    let calls = corpus.calls.lock().map_err(fail)?.clone();

    // The invariants, stated on the result alone.
    let ids: Vec<&str> = out.passages.iter().map(|p| p.id.as_str()).collect();
    let unique: HashSet<&str> = ids.iter().copied().collect();
    prop_assert_eq!(
        unique.len(),
        ids.len(),
        "a passage is held twice: {:?}",
        ids
    );
    prop_assert!(
        ids.len() <= case.max_passages,
        "{} held, cap {}",
        ids.len(),
        case.max_passages
    );
    let mut before = 0;
    for s in &out.steps {
        prop_assert!(s.retrieved.len() <= case.top_k, "step {}", s.step);
        prop_assert_eq!(s.held, before + s.retrieved.len(), "step {}", s.step);
        let added: Vec<&str> = out.passages[before..s.held]
            .iter()
            .map(|p| p.id.as_str())
            .collect();
        let traced: Vec<&str> = s.retrieved.iter().map(|p| p.id.as_str()).collect();
        prop_assert_eq!(added, traced, "step {}", s.step);
        prop_assert!(out.passages[before..s.held]
            .iter()
            .all(|p| p.step == s.step));
        before = s.held;
    }
    prop_assert_eq!(before, out.passages.len());

    // The reference: every step's call and new passages from the retriever's ranking.
    let mut held: Vec<String> = Vec::new();
    let mut query = case.question.trim().to_string();
    let mut expected_calls = Vec::new();
    let mut steps = 0;
    for step in 1..=case.max_steps {
        steps = step;
        let trace = out.steps.get(step - 1).ok_or_else(|| {
            fail(format!(
                "the loop stopped after {} steps, before step {step}",
                out.steps.len()
            ))
        })?;
        let k = case.top_k.min(case.max_passages.saturating_sub(held.len()));
        let new = if k > 0 {
            expected_calls.push(Call {
                query: query.clone(),
                k,
                exclude: held.iter().cloned().collect(),
            });
            prop_assert_eq!(&trace.query, &query, "query of step {}", step);
            corpus.expected_new(&query, k, &held)
        } else {
            prop_assert_eq!(&trace.query, "", "step {} retrieved nothing", step);
            Vec::new()
        };
        let got: Vec<String> = trace.retrieved.iter().map(|p| p.id.clone()).collect();
        prop_assert_eq!(&got, &new, "new passages of step {}", step);
        held.extend(new);
        let sentence = first_sentence(model.line(step));
        if step == case.max_steps || extract_answer(sentence).is_some() {
            break;
        }
        let cleaned = clean_query(sentence);
        query = if cleaned.trim().is_empty() {
            case.question.trim().to_string()
        } else {
            cleaned
        };
    }
    prop_assert_eq!(out.steps.len(), steps, "steps run");
    prop_assert_eq!(calls, expected_calls, "retriever calls");
    let got: Vec<String> = out.passages.iter().map(|p| p.id.clone()).collect();
    prop_assert_eq!(got, held, "passages held");
    Ok(())
}

#[test]
fn loop_passages_match_the_reference_for_any_retriever_and_options() -> anyhow::Result<()> {
    let mut runner = TestRunner::new(Config {
        cases: CASES,
        failure_persistence: None,
        ..Config::default()
    });
    runner
        .run(&case(), |c| check(&c))
        .map_err(|e| anyhow::anyhow!("{e}"))
}

/// A retriever that returns more hits than asked for: the loop keeps the first k new ones, so
/// neither `top_k` nor the `max_passages` cap is exceeded.
#[test]
fn a_retriever_returning_more_than_k_hits_does_not_break_the_caps() -> anyhow::Result<()> {
    let case = Case {
        docs: (0..10).map(|_| vec!["alpha"]).collect(),
        mode: Mode::TooMany,
        question: "alpha?".into(),
        lines: vec!["bravo.".into(), "charlie.".into()],
        top_k: 2,
        max_passages: 3,
        max_steps: 3,
    };
    check(&case).map_err(|e| anyhow::anyhow!("{e}"))?;
    let corpus = Corpus {
        docs: case.docs.clone(),
        mode: case.mode,
        calls: Mutex::new(Vec::new()),
    };
    let opts = LoopOptions::default()
        .with_top_k(case.top_k)
        .with_max_passages(case.max_passages)
        .with_max_steps(case.max_steps);
    let out = reason(
        &case.question,
        &corpus,
        &mut Scripted { lines: case.lines },
        &opts,
    )?;
    let per_step: Vec<usize> = out.steps.iter().map(|s| s.retrieved.len()).collect();
    assert_eq!(per_step, [2, 1, 0]);
    assert_eq!(out.passages.len(), 3);
    Ok(())
}
