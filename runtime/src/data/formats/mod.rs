//! The QA formats users have: the official HotpotQA, 2WikiMultiHopQA and MuSiQue files,
//! FlashRAG's JSONL and IRCoT's processed files, each converted record by record into a
//! [`QaExample`]. Every converter checks the fields it reads and names the one that is wrong.

mod flashrag;
mod hotpotqa;
mod ircot;
mod musique;
mod twowiki;

use std::path::Path;

use serde_json::{Map, Value};

use super::{QaExample, RecordAt};
use crate::error::{Error, Result};

/// A QA file format this runtime reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QaFormat {
    /// The project's own schema (docs/DESIGN.md, "Files on disk").
    Steper,
    /// HotpotQA's official JSON (`_id`, `context: [[title, [sentences]]]`,
    /// `supporting_facts: [[title, idx]]`).
    HotpotQa,
    /// 2WikiMultiHopQA's official JSON (HotpotQA's shape plus `evidences`).
    TwoWiki,
    /// MuSiQue's JSONL (`paragraphs[{idx,title,paragraph_text,is_supporting}]`,
    /// `question_decomposition`).
    Musique,
    /// FlashRAG's JSONL (`id`, `question`, `golden_answers`, `metadata`).
    FlashRag,
    /// IRCoT's processed files (`question_id`, `question_text`, `answers_objects`, `contexts`).
    Ircot,
}

impl QaFormat {
    /// Every format, in the order `--from` lists them.
    pub const ALL: [QaFormat; 6] = [
        QaFormat::Steper,
        QaFormat::HotpotQa,
        QaFormat::TwoWiki,
        QaFormat::Musique,
        QaFormat::FlashRag,
        QaFormat::Ircot,
    ];

    /// The format's name on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            QaFormat::Steper => "steper",
            QaFormat::HotpotQa => "hotpotqa",
            QaFormat::TwoWiki => "2wiki",
            QaFormat::Musique => "musique",
            QaFormat::FlashRag => "flashrag",
            QaFormat::Ircot => "ircot",
        }
    }

    /// The format of a record, told by its keys; `None` when no format fits.
    pub fn detect(record: &Value) -> Option<QaFormat> {
        let obj = record.as_object()?;
        let has = |k: &str| obj.contains_key(k);
        if has("question_text") || has("answers_objects") {
            Some(QaFormat::Ircot)
        } else if has("golden_answers") {
            Some(QaFormat::FlashRag)
        } else if has("answers") {
            Some(QaFormat::Steper)
        } else if has("context") && (has("_id") || has("supporting_facts")) {
            Some(if has("evidences") {
                QaFormat::TwoWiki
            } else {
                QaFormat::HotpotQa
            })
        } else if has("paragraphs")
            && (has("answer") || has("answer_aliases") || has("question_decomposition"))
        {
            Some(QaFormat::Musique)
        } else if has("question") {
            // the project's schema with a field missing: its reader names the field
            Some(QaFormat::Steper)
        } else {
            None
        }
    }

    /// Converts one record of an official format (not [`QaFormat::Steper`], which serde reads).
    pub(crate) fn convert(self, rec: &Rec<'_>, value: &Value) -> Result<Converted> {
        match self {
            QaFormat::Steper => Err(Error::Misuse {
                call: "QaFormat::convert",
                problem: "the project's schema is read by serde, not converted".into(),
            }),
            QaFormat::HotpotQa => hotpotqa::convert(rec, value),
            QaFormat::TwoWiki => twowiki::convert(rec, value),
            QaFormat::Musique => musique::convert(rec, value),
            QaFormat::FlashRag => flashrag::convert(rec, value),
            QaFormat::Ircot => ircot::convert(rec, value),
        }
    }
}

impl std::fmt::Display for QaFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for QaFormat {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        QaFormat::ALL
            .into_iter()
            .find(|f| f.name() == s)
            .ok_or_else(|| Error::InvalidOption {
                option: "format".into(),
                expected: QaFormat::ALL
                    .iter()
                    .map(|f| f.name())
                    .collect::<Vec<_>>()
                    .join(", "),
                got: s.into(),
            })
    }
}

/// One converted record and the supporting facts it dropped (an index past the paragraph's
/// last sentence, or a title no paragraph has).
#[derive(Debug)]
pub(crate) struct Converted {
    pub example: QaExample,
    pub skipped_supporting: usize,
}

/// The record being converted: where it is, for errors.
pub(crate) struct Rec<'a> {
    pub path: &'a Path,
    pub at: RecordAt,
}

/// What a missing field reports as its value.
const MISSING: &str = "nothing (the field is missing)";

/// A JSON value shortened for an error message.
fn short(v: &Value) -> String {
    const MAX: usize = 60;
    let s = v.to_string();
    match s.char_indices().nth(MAX) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s,
    }
}

impl Rec<'_> {
    fn bad(&self, field: &str, expected: &'static str, got: String) -> Error {
        Error::BadField {
            path: self.path.to_path_buf(),
            at: self.at,
            field: field.to_string(),
            expected,
            got,
        }
    }

    /// The record as an object.
    fn object<'v>(&self, v: &'v Value) -> Result<&'v Map<String, Value>> {
        v.as_object()
            .ok_or_else(|| self.bad("(record)", "a JSON object", short(v)))
    }

    /// A field that must be present.
    fn req<'v>(&self, obj: &'v Map<String, Value>, key: &str) -> Result<&'v Value> {
        obj.get(key)
            .ok_or_else(|| self.bad(key, "a value", MISSING.into()))
    }

    fn object_at<'v>(&self, v: &'v Value, field: &str) -> Result<&'v Map<String, Value>> {
        v.as_object()
            .ok_or_else(|| self.bad(field, "an object", short(v)))
    }

    fn string(&self, v: &Value, field: &str) -> Result<String> {
        v.as_str()
            .map(str::to_string)
            .ok_or_else(|| self.bad(field, "a string", short(v)))
    }

    /// A string, or `None` for null.
    fn opt_string(&self, v: Option<&Value>, field: &str) -> Result<Option<String>> {
        match v {
            None | Some(Value::Null) => Ok(None),
            Some(v) => self.string(v, field).map(Some),
        }
    }

    /// An id: a string, or an integer written as one.
    fn id(&self, v: &Value, field: &str) -> Result<String> {
        match v {
            Value::String(s) => Ok(s.clone()),
            Value::Number(n) if n.is_u64() || n.is_i64() => Ok(n.to_string()),
            _ => Err(self.bad(field, "a string or an integer", short(v))),
        }
    }

    fn array<'v>(&self, v: &'v Value, field: &str) -> Result<&'v Vec<Value>> {
        v.as_array()
            .ok_or_else(|| self.bad(field, "an array", short(v)))
    }

    fn strings(&self, v: &Value, field: &str) -> Result<Vec<String>> {
        self.array(v, field)?
            .iter()
            .enumerate()
            .map(|(i, s)| self.string(s, &format!("{field}[{i}]")))
            .collect()
    }

    fn index(&self, v: &Value, field: &str) -> Result<usize> {
        v.as_u64()
            .and_then(|n| usize::try_from(n).ok())
            .ok_or_else(|| self.bad(field, "a non-negative integer", short(v)))
    }

    fn boolean(&self, v: &Value, field: &str) -> Result<bool> {
        v.as_bool()
            .ok_or_else(|| self.bad(field, "true or false", short(v)))
    }
}

/// The fields of `obj` a converter did not read, kept in the record's extra fields.
fn rest(obj: &Map<String, Value>, read: &[&str]) -> Map<String, Value> {
    obj.iter()
        .filter(|(k, _)| !read.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// A paragraph's text from the dataset's sentence split: the sentences in order, a space put
/// between two only where neither side has whitespace (HotpotQA's sentences carry their
/// leading space, 2WikiMultiHopQA's do not), trimmed.
pub fn join_sentences(sentences: &[String]) -> String {
    let mut out = String::new();
    for s in sentences {
        let gap = out.chars().next_back().is_some_and(|c| !c.is_whitespace())
            && s.chars().next().is_some_and(|c| !c.is_whitespace());
        if gap {
            out.push(' ');
        }
        out.push_str(s);
    }
    out.trim().to_string()
}

/// Titles in order of first appearance.
fn unique_titles<'a>(titles: impl IntoIterator<Item = &'a str>) -> Vec<String> {
    let mut seen = std::collections::HashSet::new();
    titles
        .into_iter()
        .filter(|t| seen.insert(*t))
        .map(str::to_string)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn joins_sentences_with_and_without_leading_spaces() {
        let hotpot = ["A b.".to_string(), " C d.".to_string(), " ".to_string()];
        assert_eq!(join_sentences(&hotpot), "A b. C d.");
        let twowiki = ["A b.".to_string(), "C d.".to_string()];
        assert_eq!(join_sentences(&twowiki), "A b. C d.");
        assert_eq!(join_sentences(&[]), "");
    }

    #[test]
    fn detects_each_format_by_its_keys() {
        let cases = [
            (
                json!({"id":"1","question":"q","answers":["a"]}),
                Some(QaFormat::Steper),
            ),
            (json!({"id":"1","question":"q"}), Some(QaFormat::Steper)),
            (
                json!({"_id":"1","question":"q","answer":"a","context":[],"supporting_facts":[]}),
                Some(QaFormat::HotpotQa),
            ),
            (
                json!({"_id":"1","question":"q","answer":"a","context":[],"supporting_facts":[],"evidences":[]}),
                Some(QaFormat::TwoWiki),
            ),
            (
                json!({"id":"1","question":"q","answer":"a","paragraphs":[],"question_decomposition":[]}),
                Some(QaFormat::Musique),
            ),
            (
                json!({"id":"1","question":"q","golden_answers":["a"],"metadata":{}}),
                Some(QaFormat::FlashRag),
            ),
            (
                json!({"question_id":"1","question_text":"q","answers_objects":[],"contexts":[]}),
                Some(QaFormat::Ircot),
            ),
            (json!({"title":"t","text":"x"}), None),
            (json!(["not", "an", "object"]), None),
        ];
        for (v, want) in cases {
            assert_eq!(QaFormat::detect(&v), want, "{v}");
        }
    }

    #[test]
    fn format_names_parse_back() -> Result<()> {
        for f in QaFormat::ALL {
            assert_eq!(f.name().parse::<QaFormat>()?, f);
        }
        match "hotpot".parse::<QaFormat>() {
            Err(Error::InvalidOption { got, .. }) => assert_eq!(got, "hotpot"),
            other => panic!("expected InvalidOption, got {other:?}"),
        }
        Ok(())
    }

    #[test]
    fn long_values_are_shortened_in_messages() {
        let long = Value::String("x".repeat(200));
        let s = short(&long);
        assert!(s.chars().count() <= 61, "{s}");
        assert!(s.ends_with('…'));
    }
}
