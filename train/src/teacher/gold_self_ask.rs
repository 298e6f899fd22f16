//! The annotation-derived teacher for Self-Ask (question decomposition): the hops come from the
//! dataset's own decomposition, not from a model.
//!
//! - **MuSiQue** (`question_decomposition`): one hop per sub-question, in order, its `#k`
//!   references replaced by the answer of hop k, its answer the annotated sub-answer, its
//!   supporting paragraph the one at `paragraph_support_idx`. Sub-questions in MuSiQue's
//!   relation form (`Hello Love >> performer`) are asked as `What is the performer of Hello
//!   Love?`.
//! - **2WikiMultihopQA** (`evidences`): one hop per `[subject, relation, object]` triple,
//!   `What is the <relation> of <subject>?`, answered by the object; its supporting paragraph is
//!   the subject's, where the question has a paragraph of that title.
//! - **HotpotQA** has no decomposition: its questions have no hops, and `distill` refuses a file
//!   where no question has one (an LLM teacher writes Self-Ask steps for it).
//!
//! In the loop the teacher writes `Follow up: <sub-question>` where a follow-up is asked, the
//! sub-answer where the intermediate answer is asked, and `So the final answer is: <answer>`
//! (the question's first gold answer) once every hop is answered. A hop whose supporting
//! paragraph the retriever did not bring in (BM25 with the sub-question, or an earlier hop's
//! passages) is answered `unknown` and ends the run with the final answer `unknown`, so the
//! answer filter drops questions whose evidence was not retrieved, as the IRCoT gold teacher's
//! forced `unknown` does. A decomposition that references a sub-answer it does not have (`#3`
//! at the second hop, or an empty answer) is no plan: the question is skipped and counted.

use std::fmt;

use steper_runtime::data::QaExample;
use steper_runtime::{StepModel, StepOutput, StepRequest};

use super::budget::{prompt_budget_methods, PromptBudget};

/// The line a Self-Ask sub-question starts with.
const FOLLOW_UP: &str = "Follow up:";
/// What ends the prompt of an answering generation.
const INTERMEDIATE_ANSWER: &str = "Intermediate answer:";
/// The phrase the final answer follows.
const FINAL_ANSWER: &str = "So the final answer is:";
/// What the teacher says where the evidence was not retrieved.
const UNKNOWN: &str = "unknown";

/// One hop of a Self-Ask decomposition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SelfAskHop {
    /// The sub-question, its references to earlier hops resolved.
    pub question: String,
    /// Its answer.
    pub answer: String,
    /// Title of its supporting paragraph, where the annotation names one.
    pub paragraph: Option<String>,
}

/// Why a question has no Self-Ask hops.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NoHops {
    /// Neither `question_decomposition` (MuSiQue) nor `evidences` (2Wiki), or an empty one.
    NoDecomposition,
    /// A sub-question references a sub-answer the decomposition does not have.
    MissingReference {
        /// 1-based hop whose sub-question holds the reference.
        hop: usize,
        /// The reference (`#3`).
        reference: String,
    },
    /// A hop without a question or an answer.
    Incomplete {
        /// 1-based hop.
        hop: usize,
    },
}

impl fmt::Display for NoHops {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NoHops::NoDecomposition => {
                f.write_str("no question_decomposition (MuSiQue) or evidences (2Wiki)")
            }
            NoHops::MissingReference { hop, reference } => write!(
                f,
                "sub-question {hop} references {reference}, a sub-answer the decomposition does not have"
            ),
            NoHops::Incomplete { hop } => write!(f, "sub-question {hop} has no question or answer"),
        }
    }
}

/// `What is the <relation> of <subject>?`
fn relation_question(subject: &str, relation: &str) -> String {
    format!("What is the {} of {}?", relation.trim(), subject.trim())
}

/// Whitespace collapsed, and none before a closing `?` (`#1 ?` resolved reads `X?`).
fn tidy(q: &str) -> String {
    let q = q.split_whitespace().collect::<Vec<_>>().join(" ");
    q.replace(" ?", "?")
}

/// `q` with each `#k` replaced by `answers[k - 1]`; the first reference past `answers` (or to
/// an empty answer) is the error.
fn resolve(q: &str, answers: &[String]) -> std::result::Result<String, String> {
    let mut out = String::with_capacity(q.len());
    let mut rest = q;
    while let Some(at) = rest.find('#') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        let digits = after.len() - after.trim_start_matches(|c: char| c.is_ascii_digit()).len();
        if digits == 0 {
            out.push('#');
            rest = after;
            continue;
        }
        let reference = &rest[at..at + 1 + digits];
        let k: usize = after[..digits].parse().map_err(|_| reference.to_string())?;
        match k.checked_sub(1).and_then(|i| answers.get(i)) {
            Some(a) if !a.trim().is_empty() => out.push_str(a.trim()),
            _ => return Err(reference.to_string()),
        }
        rest = &after[digits..];
    }
    out.push_str(rest);
    Ok(out)
}

/// The Self-Ask hops of `ex` from its annotated decomposition (see the module documentation).
pub fn self_ask_hops(ex: &QaExample) -> std::result::Result<Vec<SelfAskHop>, NoHops> {
    let text = |v: &serde_json::Value, key: &str| {
        v.get(key)
            .and_then(|x| x.as_str())
            .unwrap_or("")
            .trim()
            .to_string()
    };
    if let Some(steps) = ex
        .extra
        .get("question_decomposition")
        .and_then(|v| v.as_array())
        .filter(|s| !s.is_empty())
    {
        let mut hops: Vec<SelfAskHop> = Vec::with_capacity(steps.len());
        for (i, st) in steps.iter().enumerate() {
            let (q, answer) = (text(st, "question"), text(st, "answer"));
            if q.is_empty() || answer.is_empty() {
                return Err(NoHops::Incomplete { hop: i + 1 });
            }
            let earlier: Vec<String> = hops.iter().map(|h| h.answer.clone()).collect();
            let q = resolve(&q, &earlier).map_err(|reference| NoHops::MissingReference {
                hop: i + 1,
                reference,
            })?;
            let question = match q.split_once(">>") {
                Some((subject, relation)) => relation_question(subject, relation),
                None => tidy(&q),
            };
            let paragraph = st
                .get("paragraph_support_idx")
                .and_then(|v| v.as_u64())
                .and_then(|i| ex.paragraphs.get(i as usize))
                .map(|p| p.title.clone());
            hops.push(SelfAskHop {
                question,
                answer,
                paragraph,
            });
        }
        return Ok(hops);
    }
    if let Some(triples) = ex
        .extra
        .get("evidences")
        .and_then(|v| v.as_array())
        .filter(|s| !s.is_empty())
    {
        let mut hops = Vec::with_capacity(triples.len());
        for (i, t) in triples.iter().enumerate() {
            let part = |j: usize| {
                t.get(j)
                    .and_then(|x| x.as_str())
                    .unwrap_or("")
                    .trim()
                    .to_string()
            };
            let (subject, relation, object) = (part(0), part(1), part(2));
            if subject.is_empty() || relation.is_empty() || object.is_empty() {
                return Err(NoHops::Incomplete { hop: i + 1 });
            }
            let paragraph = ex
                .paragraphs
                .iter()
                .any(|p| p.title == subject)
                .then(|| subject.clone());
            hops.push(SelfAskHop {
                question: relation_question(&subject, &relation),
                answer: object,
                paragraph,
            });
        }
        return Ok(hops);
    }
    Err(NoHops::NoDecomposition)
}

/// What the Self-Ask gold teacher did, counted over every question it has seen.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SelfAskGoldStats {
    /// Questions skipped: no decomposition (HotpotQA) or an empty one.
    pub skipped_no_decomposition: usize,
    /// Questions skipped: a sub-question references a sub-answer the decomposition lacks.
    pub skipped_missing_reference: usize,
    /// Questions skipped: a hop without a question or an answer.
    pub skipped_incomplete: usize,
    /// Follow-ups asked.
    pub follow_ups: usize,
    /// Sub-questions answered with their annotated answer.
    pub answered_hops: usize,
    /// Sub-questions answered `unknown`: their supporting paragraph was not retrieved.
    pub unretrieved_hops: usize,
    /// Final answers given (the gold answer).
    pub answers: usize,
    /// Final answers `unknown` (a hop's evidence not retrieved, or forced before the last hop).
    pub unknown_answers: usize,
}

impl SelfAskGoldStats {
    /// Counts a question without hops.
    pub fn skip(&mut self, why: &NoHops) {
        match why {
            NoHops::NoDecomposition => self.skipped_no_decomposition += 1,
            NoHops::MissingReference { .. } => self.skipped_missing_reference += 1,
            NoHops::Incomplete { .. } => self.skipped_incomplete += 1,
        }
    }

    /// Questions skipped, for any reason.
    pub fn skipped(&self) -> usize {
        self.skipped_no_decomposition + self.skipped_missing_reference + self.skipped_incomplete
    }
}

/// The annotation-derived Self-Ask teacher (see the module documentation).
#[derive(Default)]
pub struct GoldSelfAskTeacher {
    hops: Vec<SelfAskHop>,
    answer: String,
    /// Hops answered so far in this question.
    answered: usize,
    /// A hop's evidence was not retrieved: the run ends `unknown`.
    failed: bool,
    budget: PromptBudget,
    stats: SelfAskGoldStats,
}

impl GoldSelfAskTeacher {
    /// A teacher with no token budget (prompts are never cut).
    pub fn new() -> Self {
        Self::default()
    }

    /// Fits prompts into `budget` tokens of `tokenizer` (the student's), so that the records it
    /// yields fit the student's context.
    pub fn with_budget(mut self, tokenizer: tokenizers::Tokenizer, budget: usize) -> Self {
        self.budget = PromptBudget::new(tokenizer, budget);
        self
    }

    /// What the teacher did so far.
    pub fn stats(&self) -> &SelfAskGoldStats {
        &self.stats
    }

    /// Mutable counts (the caller counts the questions it skips before the loop).
    pub fn stats_mut(&mut self) -> &mut SelfAskGoldStats {
        &mut self.stats
    }

    /// Sets the question the next loop run is about; a question without hops is counted and
    /// its error returned (the caller skips it).
    pub fn set_example(&mut self, ex: &QaExample) -> std::result::Result<(), NoHops> {
        self.answered = 0;
        self.failed = false;
        self.answer = ex.answers.first().cloned().unwrap_or_default();
        match self_ask_hops(ex) {
            Ok(h) => {
                self.hops = h;
                Ok(())
            }
            Err(e) => {
                self.hops.clear();
                self.failed = true;
                self.stats.skip(&e);
                Err(e)
            }
        }
    }

    /// `So the final answer is: …` once every hop is answered, `unknown` otherwise.
    fn final_answer(&mut self) -> String {
        if !self.failed && self.answered == self.hops.len() && !self.answer.is_empty() {
            self.stats.answers += 1;
            self.answer.clone()
        } else {
            self.stats.unknown_answers += 1;
            UNKNOWN.to_string()
        }
    }
}

impl StepModel for GoldSelfAskTeacher {
    fn name(&self) -> &str {
        "gold"
    }

    prompt_budget_methods!();

    fn begin_question(&mut self, _question: &str) -> steper_runtime::Result<()> {
        self.answered = 0;
        self.failed = self.hops.is_empty();
        Ok(())
    }

    fn generate(&mut self, req: &StepRequest<'_>) -> steper_runtime::Result<StepOutput> {
        let text = if req.forced {
            // The prompt ends with the final-answer phrase.
            format!(" {}", self.final_answer())
        } else if req.prompt.trim_end().ends_with(INTERMEDIATE_ANSWER) {
            match self.hops.get(self.answered).cloned() {
                Some(hop) if !self.failed => {
                    let held = hop
                        .paragraph
                        .as_ref()
                        .is_none_or(|t| req.passages.iter().any(|p| &p.title == t));
                    if held {
                        self.answered += 1;
                        self.stats.answered_hops += 1;
                        format!(" {}", hop.answer)
                    } else {
                        self.failed = true;
                        self.stats.unretrieved_hops += 1;
                        format!(" {UNKNOWN}")
                    }
                }
                _ => format!(" {UNKNOWN}"),
            }
        } else {
            match self.hops.get(self.answered) {
                Some(hop) if !self.failed => {
                    self.stats.follow_ups += 1;
                    format!("{FOLLOW_UP} {}", hop.question)
                }
                _ => format!("{FINAL_ANSWER} {}", self.final_answer()),
            }
        };
        let n = text.split_whitespace().count();
        Ok(StepOutput {
            text,
            new_tokens: n,
            ..Default::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn example(json: &str) -> QaExample {
        serde_json::from_str(json).unwrap_or_else(|e| panic!("{e}: {json}"))
    }

    #[test]
    fn references_are_resolved_and_relation_forms_asked() {
        let ex = example(
            r##"{"id":"m","question":"Q?","answers":["Bo"],"paragraphs":[{"title":"X","text":"x"},{"title":"Zed","text":"z"}],
            "question_decomposition":[
              {"question":"Hello Love >> performer","answer":"Zed","paragraph_support_idx":1},
              {"question":"Who founded #1 ?","answer":"Bo","paragraph_support_idx":0},
              {"question":"#2 >> spouse","answer":"Al"},
              {"question":"Is #1 older than #3 and # 4?","answer":"yes"}]}"##,
        );
        let hops = self_ask_hops(&ex).unwrap_or_else(|e| panic!("{e}"));
        let qs: Vec<&str> = hops.iter().map(|h| h.question.as_str()).collect();
        assert_eq!(
            qs,
            vec![
                "What is the performer of Hello Love?",
                "Who founded Zed?",
                "What is the spouse of Bo?",
                "Is Zed older than Al and # 4?",
            ]
        );
        assert_eq!(hops[0].paragraph.as_deref(), Some("Zed"));
        assert_eq!(hops[2].paragraph, None);
    }

    #[test]
    fn a_missing_sub_answer_is_no_plan() {
        for (decomposition, hop, reference) in [
            (
                r##"[{"question":"a","answer":"A"},{"question":"b of #3","answer":"B"}]"##,
                2,
                "#3",
            ),
            (r##"[{"question":"a of #1","answer":"A"}]"##, 1, "#1"),
            (
                r##"[{"question":"a","answer":" "},{"question":"b of #1","answer":"B"}]"##,
                1,
                "",
            ),
            (
                r##"[{"question":"a","answer":"A"},{"question":"b of #0","answer":"B"}]"##,
                2,
                "#0",
            ),
        ] {
            let ex = example(&format!(
                r#"{{"id":"m","question":"Q?","answers":["B"],"paragraphs":[],"question_decomposition":{decomposition}}}"#
            ));
            let got = self_ask_hops(&ex);
            if reference.is_empty() {
                assert_eq!(got, Err(NoHops::Incomplete { hop }), "{decomposition}");
            } else {
                assert_eq!(
                    got,
                    Err(NoHops::MissingReference {
                        hop,
                        reference: reference.into()
                    }),
                    "{decomposition}"
                );
            }
        }
        let hotpot = example(r#"{"id":"h","question":"Q?","answers":["B"],"paragraphs":[]}"#);
        assert_eq!(self_ask_hops(&hotpot), Err(NoHops::NoDecomposition));
        let mut t = GoldSelfAskTeacher::new();
        assert!(t.set_example(&hotpot).is_err());
        assert_eq!(t.stats().skipped(), 1);
    }

    #[test]
    fn two_wiki_triples_become_relation_questions() {
        let ex = example(
            r#"{"id":"w","question":"Who was born later, A or B?","answers":["A"],"paragraphs":[{"title":"A","text":"a"}],
            "evidences":[["A","date of birth","1965"],["B","date of birth","1892"]]}"#,
        );
        let hops = self_ask_hops(&ex).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            hops,
            vec![
                SelfAskHop {
                    question: "What is the date of birth of A?".into(),
                    answer: "1965".into(),
                    paragraph: Some("A".into()),
                },
                SelfAskHop {
                    question: "What is the date of birth of B?".into(),
                    answer: "1892".into(),
                    paragraph: None,
                },
            ]
        );
    }
}
