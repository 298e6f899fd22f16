//! Self-Ask (question decomposition): a step asks a sub-question (`Follow up:`), retrieves for
//! it and answers it (`Intermediate answer:`), in two generations; `So the final answer is:`
//! ends the run. What is not the format forces the aggregation (see the module documentation
//! of [`super`] for the whole rule).

use super::{FrameworkSteps, Outcome, Round};
use crate::answer::first_sentence;
use crate::prompt::self_ask::{FINAL_ANSWER, FOLLOW_UP, INTERMEDIATE_ANSWER};

/// Which generation of the step comes next.
#[derive(Debug, Clone, PartialEq, Default)]
enum Phase {
    /// The model writes a follow-up or the final answer.
    #[default]
    Ask,
    /// The model answers this sub-question, retrieved for.
    Answer(String),
    /// The model's last output was not the format: the answer is forced.
    Force,
}

/// Self-Ask's state for one question: the hops so far and the next generation.
#[derive(Debug, Default)]
pub(crate) struct SelfAsk {
    hops: Vec<String>,
    phase: Phase,
}

impl FrameworkSteps for SelfAsk {
    fn plan(&self, question: &str, last_step: bool, held: usize) -> Round {
        match &self.phase {
            Phase::Ask if !last_step => Round {
                query: None,
                forced: false,
            },
            Phase::Answer(q) => Round {
                query: Some(q.clone()),
                forced: false,
            },
            // A forced answer with nothing held yet is given passages for the question.
            Phase::Ask | Phase::Force => Round {
                query: (held == 0).then(|| question.trim().to_string()),
                forced: true,
            },
        }
    }

    fn reasoning(&self) -> &[String] {
        &self.hops
    }

    fn suffix(&self, round: &Round) -> Option<String> {
        if round.forced {
            return Some(FINAL_ANSWER.to_string());
        }
        match &self.phase {
            Phase::Answer(q) => Some(format!("{FOLLOW_UP} {q}\n{INTERMEDIATE_ANSWER}")),
            Phase::Ask | Phase::Force => None,
        }
    }

    fn read(&mut self, _question: &str, round: &Round, text: &str) -> Outcome {
        if round.forced {
            self.phase = Phase::Ask;
            let line = first_sentence(text);
            // The prompt ends with the phrase; a model may write it again.
            let line = match split_final(line) {
                Some(("", after)) => after,
                _ => line,
            };
            return final_outcome(None, line);
        }
        match std::mem::take(&mut self.phase) {
            Phase::Ask | Phase::Force => match parse_ask(text) {
                Asked::FollowUp(q) => {
                    self.phase = Phase::Answer(q);
                    Outcome::Continue
                }
                Asked::Final(line) => final_outcome(None, &line),
                Asked::NotTheFormat => {
                    self.phase = Phase::Force;
                    Outcome::Continue
                }
            },
            Phase::Answer(q) => match parse_answer(text) {
                Answered::Intermediate { answer, last } => {
                    let hop = format!("{FOLLOW_UP} {q}\n{INTERMEDIATE_ANSWER} {answer}");
                    match last {
                        Some(line) => final_outcome(Some(&hop), &line),
                        None => {
                            self.hops.push(hop.clone());
                            Outcome::Step(hop)
                        }
                    }
                }
                Answered::Final(line) => final_outcome(None, &line),
                Answered::NotTheFormat => {
                    self.phase = Phase::Force;
                    Outcome::Continue
                }
            },
        }
    }
}

/// The aggregation step: `So the final answer is: {line}` after the hop it ends, if any; the
/// answer is `line` without its trailing periods.
fn final_outcome(hop: Option<&str>, line: &str) -> Outcome {
    let line = line.trim();
    let last = format!("{FINAL_ANSWER} {line}").trim().to_string();
    Outcome::Answer {
        sentence: match hop {
            Some(hop) => format!("{hop}\n{last}"),
            None => last,
        },
        answer: line.trim_end_matches('.').trim_end().to_string(),
    }
}

/// What the model wrote where a follow-up or the final answer is asked for.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Asked {
    /// `Follow up: {sub-question}`.
    FollowUp(String),
    /// `So the final answer is: {line}` (non-empty).
    Final(String),
    /// Anything else.
    NotTheFormat,
}

/// What the model wrote after `Intermediate answer:`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Answered {
    /// The sub-question's answer, and the final answer's line when it follows on the same or
    /// the next line.
    Intermediate {
        /// The answer as written (trimmed).
        answer: String,
        /// The final answer's line.
        last: Option<String>,
    },
    /// Only the final answer.
    Final(String),
    /// No answer (empty, or a follow-up instead).
    NotTheFormat,
}

/// Reads the output of an asking generation: its first non-empty line.
pub(crate) fn parse_ask(text: &str) -> Asked {
    let line = first_line(text);
    if let Some(rest) = strip_label(line, &["follow", "up"]) {
        // A model that goes on to answer its own sub-question: the answer is not kept (the
        // passages for the sub-question are not retrieved yet).
        let q = match find_label(rest, &["intermediate", "answer"]) {
            Some(at) => &rest[..at],
            None => rest,
        };
        let q = q.trim();
        return if q.is_empty() {
            Asked::NotTheFormat
        } else {
            Asked::FollowUp(q.to_string())
        };
    }
    match split_final(line) {
        Some((_, after)) if !after.trim().is_empty() => Asked::Final(after.trim().to_string()),
        _ => Asked::NotTheFormat,
    }
}

/// Reads the output of an answering generation (what follows the prompt's
/// `Intermediate answer:`).
pub(crate) fn parse_answer(text: &str) -> Answered {
    let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
    let Some(first) = lines.next() else {
        return Answered::NotTheFormat;
    };
    let first = strip_label(first, &["intermediate", "answer"]).unwrap_or(first);
    if strip_label(first, &["follow", "up"]).is_some() {
        return Answered::NotTheFormat;
    }
    let (answer, mut last) = match split_final(first) {
        Some((before, after)) => (
            before.trim().trim_end_matches([',', ';']).trim_end(),
            Some(after.trim()),
        ),
        None => (first.trim(), None),
    };
    if last.is_none() {
        last = lines
            .next()
            .and_then(split_final)
            .filter(|(before, _)| before.trim().is_empty())
            .map(|(_, after)| after.trim());
    }
    let last = last.filter(|l| !l.is_empty()).map(str::to_string);
    match (answer.is_empty(), last) {
        (false, last) => Answered::Intermediate {
            answer: answer.to_string(),
            last,
        },
        (true, Some(line)) => Answered::Final(line),
        (true, None) => Answered::NotTheFormat,
    }
}

/// The first non-empty line of `text`, trimmed.
fn first_line(text: &str) -> &str {
    text.lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("")
}

/// `line` split around the final-answer phrase (`So the final answer is:`, ASCII
/// case-insensitive, `So the` / `the` / `is` / `:` optional): the text before the phrase and
/// the text after it. `None` when the phrase is absent.
fn split_final(line: &str) -> Option<(&str, &str)> {
    let at = find_label(line, &["final", "answer"])?;
    let lower = line.to_ascii_lowercase();
    // Walk back over `the ` and `so ` / `so, ` before `final`.
    let mut start = at;
    for word in ["the", "so"] {
        let head = lower[..start].trim_end_matches([' ', '\t', ',']);
        if head.ends_with(word) && !head[..head.len() - word.len()].ends_with(char::is_alphanumeric)
        {
            start = head.len() - word.len();
        }
    }
    let after = strip_label(&line[at..], &["final", "answer"])?;
    let after = strip_label(after, &["is"]).unwrap_or(after);
    Some((&line[..start], after))
}

/// Byte offset of the first occurrence of the label `words` in `text` that starts a word (see
/// [`strip_label`] for what a label matches).
fn find_label(text: &str, words: &[&str]) -> Option<usize> {
    let bytes = text.as_bytes();
    (0..text.len()).find(|&i| {
        text.is_char_boundary(i)
            && (i == 0 || !bytes[i - 1].is_ascii_alphanumeric())
            && strip_label(&text[i..], words).is_some()
    })
}

/// The rest of `text` after the label `words` at its start: each word matched ASCII
/// case-insensitively, separated by whitespace, a hyphen or nothing (`Follow up`, `follow-up`,
/// `FollowUp`), the last one ending a word, then an optional `:` and the whitespace around it.
/// `None` when `text` does not start with the label (leading whitespace skipped).
fn strip_label<'t>(text: &'t str, words: &[&str]) -> Option<&'t str> {
    let mut rest = text.trim_start();
    for (i, word) in words.iter().enumerate() {
        if i > 0 {
            rest = rest.trim_start_matches([' ', '\t', '-']);
        }
        let head = rest.get(..word.len())?;
        if !head.eq_ignore_ascii_case(word) {
            return None;
        }
        rest = &rest[word.len()..];
    }
    if rest.starts_with(|c: char| c.is_alphanumeric()) {
        return None;
    }
    let rest = rest.trim_start();
    Some(rest.strip_prefix(':').unwrap_or(rest).trim_start())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn asking_outputs_are_read_in_their_variations() {
        let follow = |q: &str| Asked::FollowUp(q.to_string());
        let fin = |a: &str| Asked::Final(a.to_string());
        let table: Vec<(&str, Asked)> = vec![
            (
                "Follow up: Who directed Titanic?",
                follow("Who directed Titanic?"),
            ),
            (
                " Follow up:Who directed Titanic?",
                follow("Who directed Titanic?"),
            ),
            (
                "follow up Who directed Titanic?",
                follow("Who directed Titanic?"),
            ),
            (
                "FOLLOW-UP :  Who directed Titanic?  ",
                follow("Who directed Titanic?"),
            ),
            ("Followup: Who?", follow("Who?")),
            (
                "\n\nFollow up: Who?\nIntermediate answer: Cameron.",
                follow("Who?"),
            ),
            (
                "Follow up: Who? Intermediate answer: Cameron.",
                follow("Who?"),
            ),
            ("So the final answer is: Paris.", fin("Paris.")),
            ("so the final answer is Paris", fin("Paris")),
            ("The final answer is: Paris", fin("Paris")),
            ("Final answer: Paris", fin("Paris")),
            ("Follow up:", Asked::NotTheFormat),
            ("So the final answer is:", Asked::NotTheFormat),
            ("Intermediate answer: Paris.", Asked::NotTheFormat),
            ("Paris is the capital of France.", Asked::NotTheFormat),
            ("Followers up: who?", Asked::NotTheFormat),
            ("", Asked::NotTheFormat),
            (
                "Are follow up questions needed here: No.",
                Asked::NotTheFormat,
            ),
        ];
        for (text, want) in table {
            assert_eq!(parse_ask(text), want, "{text:?}");
        }
    }

    #[test]
    fn answering_outputs_are_read_in_their_variations() {
        let ans = |a: &str, last: Option<&str>| Answered::Intermediate {
            answer: a.to_string(),
            last: last.map(str::to_string),
        };
        let table: Vec<(&str, Answered)> = vec![
            (" James Cameron.", ans("James Cameron.", None)),
            ("James Cameron", ans("James Cameron", None)),
            (
                "Intermediate answer: James Cameron.",
                ans("James Cameron.", None),
            ),
            (
                "intermediate answer James Cameron.",
                ans("James Cameron.", None),
            ),
            (
                " Cameron. So the final answer is: Cameron.",
                ans("Cameron.", Some("Cameron.")),
            ),
            (
                " Cameron.\nSo the final answer is: Cameron.",
                ans("Cameron.", Some("Cameron.")),
            ),
            (
                " Cameron, so the final answer is Cameron",
                ans("Cameron", Some("Cameron")),
            ),
            (" Cameron.\nFollow up: Where?", ans("Cameron.", None)),
            (
                "So the final answer is: Cameron.",
                Answered::Final("Cameron.".into()),
            ),
            ("", Answered::NotTheFormat),
            ("  \n ", Answered::NotTheFormat),
            ("Intermediate answer:", Answered::NotTheFormat),
            ("Follow up: Who is he?", Answered::NotTheFormat),
        ];
        for (text, want) in table {
            assert_eq!(parse_answer(text), want, "{text:?}");
        }
    }

    #[test]
    fn a_step_is_a_follow_up_its_retrieval_and_its_answer() {
        let mut s = SelfAsk::default();
        let q = "Who is older?";
        let ask = s.plan(q, false, 0);
        assert_eq!((ask.query.as_deref(), ask.forced), (None, false));
        assert_eq!(s.suffix(&ask), None);
        assert_eq!(
            s.read(q, &ask, "Follow up: How old is A?"),
            Outcome::Continue
        );
        let answer = s.plan(q, false, 0);
        assert_eq!(answer.query.as_deref(), Some("How old is A?"));
        assert_eq!(
            s.suffix(&answer).as_deref(),
            Some("Follow up: How old is A?\nIntermediate answer:")
        );
        let hop = "Follow up: How old is A?\nIntermediate answer: 74.";
        assert_eq!(s.read(q, &answer, " 74."), Outcome::Step(hop.into()));
        assert_eq!(s.reasoning(), [hop.to_string()]);
        // Garbage forces the answer, at the same step; a forced round retrieves only when
        // nothing is held.
        let ask = s.plan(q, false, 4);
        assert_eq!(s.read(q, &ask, "I think so."), Outcome::Continue);
        let forced = s.plan(q, false, 4);
        assert_eq!((forced.query.as_deref(), forced.forced), (None, true));
        assert_eq!(s.plan(q, true, 0).query.as_deref(), Some("Who is older?"));
        assert_eq!(s.suffix(&forced).as_deref(), Some(FINAL_ANSWER));
        assert_eq!(
            s.read(q, &forced, " Ann Arbor. Extra"),
            Outcome::Answer {
                sentence: "So the final answer is: Ann Arbor.".into(),
                answer: "Ann Arbor".into()
            }
        );
        assert_eq!(
            s.read(q, &forced, " So the final answer is: A."),
            Outcome::Answer {
                sentence: "So the final answer is: A.".into(),
                answer: "A".into()
            }
        );
    }
}
