//! Files on disk (docs/DESIGN.md, "Files on disk"): QA datasets, corpora and step-wise records, all
//! JSONL, plain or compressed (`.gz`, `.zst`: [`compress`]). QA files are also read in the
//! formats users have them ([`QaFormat`]: HotpotQA, 2WikiMultiHopQA, MuSiQue, FlashRAG, IRCoT),
//! told apart by content. Readers name the file and the 1-based line (or the record's index in
//! a JSON array) of anything malformed, and the field where they can; with
//! [`ReadOptions::skip_bad`] they skip such records and count them instead.

pub mod compress;
mod formats;
mod qa;

pub use formats::{join_sentences, QaFormat};
pub use qa::{read_qa, read_qa_file, QaFile};

use std::collections::HashSet;
use std::io::{BufRead, Write};
use std::path::Path;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// One paragraph handed out with a QA question (gold or distractor).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Paragraph {
    /// Wikipedia title.
    pub title: String,
    /// Paragraph text.
    pub text: String,
    /// Whether the paragraph supports the answer (absent in some sources).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub is_supporting: Option<bool>,
    /// The dataset's own sentence split of `text` (HotpotQA / 2Wiki train pools).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sentences: Option<Vec<String>>,
    /// Indices into `sentences` of the annotated supporting facts. Sources contain indices
    /// past the last sentence; readers of this field must skip those (see
    /// [`Paragraph::supporting_facts`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub supporting_sentences: Option<Vec<usize>>,
}

impl Paragraph {
    /// The annotated supporting sentences (trimmed, in index order, duplicates dropped) and the
    /// number of indices that point past the last sentence (skipped). Empty when the paragraph
    /// carries no sentence-level annotation.
    pub fn supporting_facts(&self) -> (Vec<String>, usize) {
        let (Some(sents), Some(idx)) = (&self.sentences, &self.supporting_sentences) else {
            return (Vec::new(), 0);
        };
        let mut idx = idx.clone();
        idx.sort_unstable();
        idx.dedup();
        let mut out = Vec::new();
        let mut bad = 0;
        for i in idx {
            match sents.get(i) {
                Some(s) if !s.trim().is_empty() => out.push(s.trim().to_string()),
                Some(_) => {}
                None => bad += 1,
            }
        }
        (out, bad)
    }
}

/// One question of a QA dataset file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QaExample {
    /// Question id, unique within the file.
    pub id: String,
    /// Dataset name (`hotpotqa`, `musique`, `2wikimultihopqa`…).
    #[serde(default)]
    pub dataset: String,
    /// The question.
    pub question: String,
    /// Gold answers (aliases); metrics take the max over them.
    pub answers: Vec<String>,
    /// Question type, where the source has one.
    #[serde(default, skip_serializing_if = "Option::is_none", rename = "type")]
    pub kind: Option<String>,
    /// Gold and distractor paragraphs.
    #[serde(default)]
    pub paragraphs: Vec<Paragraph>,
    /// Titles of the supporting paragraphs, where the source lists them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub supporting_titles: Option<Vec<String>>,
    /// Any other field of the line (kept so a record round-trips).
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl QaExample {
    /// The gold titles: the titles of paragraphs marked `is_supporting`, else
    /// `supporting_titles`; deduplicated, in order of first appearance.
    pub fn gold_titles(&self) -> Vec<String> {
        let mut seen = HashSet::new();
        let mut out: Vec<String> = self
            .paragraphs
            .iter()
            .filter(|p| p.is_supporting == Some(true))
            .filter(|p| seen.insert(p.title.clone()))
            .map(|p| p.title.clone())
            .collect();
        if out.is_empty() {
            if let Some(titles) = &self.supporting_titles {
                out = titles
                    .iter()
                    .filter(|t| seen.insert((*t).clone()))
                    .cloned()
                    .collect();
            }
        }
        out
    }
}

/// One corpus document: `{"id", "title", "text"}`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Document {
    /// Document id, unique within the corpus.
    pub id: String,
    /// Wikipedia title.
    pub title: String,
    /// Text.
    pub text: String,
}

/// A training stage of docs/DESIGN.md, "The prompt".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    /// s = 1: Q + P_1 → R_1.
    Init,
    /// 1 < s < S: Q + P_≤s + R_<s → R_s.
    Expand,
    /// s = S: Q + P_≤S + R_<S → `So the answer is: {answer}.`
    Aggregate,
}

/// A passage as the prompt shows it (title and text; the text is capped at render time).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PromptPassage {
    /// Wikipedia title.
    pub title: String,
    /// Full text.
    pub text: String,
}

/// One step-wise training example (docs/DESIGN.md, "Step-wise records"). The prompt is rendered from
/// these fields by [`crate::prompt::render`] at training time; data never carries a prompt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepwiseRecord {
    /// Question id.
    pub qid: String,
    /// Stage of this step.
    pub stage: Stage,
    /// 1-based step.
    pub step: usize,
    /// The question.
    pub question: String,
    /// Passages held at this step (P_≤s), in prompt order.
    pub passages: Vec<PromptPassage>,
    /// Prior sentences R_<s.
    pub reasoning: Vec<String>,
    /// The sentence to learn (R_s, or `So the answer is: {answer}.` at aggregation).
    pub target: String,
    /// Which teacher produced the target.
    pub teacher: String,
    /// Gold answers of the question.
    pub answers: Vec<String>,
    /// The framework the record's step belongs to, which says how its prompt is rendered and
    /// its target continued ([`crate::prompt::PromptLayout::render_for`],
    /// [`crate::prompt::Framework::continuation`]). Left out for IRCoT, so records written
    /// before the choice existed read (and are written) as before. A Self-Ask step's target is
    /// its hop (`Follow up: q` + newline + `Intermediate answer: a`, with `So the final answer
    /// is: x` on a third line at aggregation) and its passages include those retrieved for `q`,
    /// although at inference `q` is written before they are retrieved (see the Self-Ask
    /// section of docs/guide/runtime.md).
    #[serde(default, skip_serializing_if = "crate::prompt::Framework::is_ircot")]
    pub framework: crate::prompt::Framework,
}

/// How JSONL readers treat malformed lines.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReadOptions {
    /// Skip malformed lines (counting them) instead of failing on the first.
    pub skip_bad: bool,
}

/// What a JSONL reader returns: the parsed rows and the lines it skipped.
#[derive(Debug, Clone)]
pub struct Loaded<T> {
    /// Parsed rows, in file order.
    pub rows: Vec<T>,
    /// Malformed lines skipped (only with [`ReadOptions::skip_bad`]): 1-based line and error.
    pub skipped: Vec<(usize, String)>,
}

/// Where a record sits in a data file: its 1-based line (JSONL) or its 0-based index in a JSON
/// array.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordAt {
    /// 1-based line of a JSONL file.
    Line(usize),
    /// 0-based index in a file holding one JSON array.
    Index(usize),
}

impl RecordAt {
    /// The line or the index.
    pub fn number(self) -> usize {
        match self {
            RecordAt::Line(n) | RecordAt::Index(n) => n,
        }
    }
}

impl std::fmt::Display for RecordAt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RecordAt::Line(n) => write!(f, "line {n}"),
            RecordAt::Index(i) => write!(f, "record {i} (0-based)"),
        }
    }
}

/// Reads a JSONL file of `T`, plain or compressed ([`compress::open`]). Blank lines are ignored.
/// A malformed line is an [`Error::BadLine`] naming the file and its 1-based line (serde's
/// message names the field), unless `opts.skip_bad`.
pub fn read_jsonl<T: DeserializeOwned>(path: &Path, opts: ReadOptions) -> Result<Loaded<T>> {
    let input = compress::open(path)?;
    let mut rows = Vec::new();
    let mut skipped = Vec::new();
    for (i, line) in input.lines().enumerate() {
        let line = line.map_err(|e| Error::io(path, e))?;
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<T>(&line) {
            Ok(row) => rows.push(row),
            Err(e) if opts.skip_bad => skipped.push((i + 1, e.to_string())),
            Err(e) => {
                return Err(Error::BadLine {
                    path: path.to_path_buf(),
                    line: i + 1,
                    message: e.to_string(),
                })
            }
        }
    }
    Ok(Loaded { rows, skipped })
}

/// Reads a corpus file (`{"id","title","text"}` per line); ids must be unique.
pub fn read_corpus(path: &Path, opts: ReadOptions) -> Result<Loaded<Document>> {
    let loaded: Loaded<Document> = read_jsonl(path, opts)?;
    let mut ids = HashSet::new();
    for d in &loaded.rows {
        if !ids.insert(d.id.as_str()) {
            return Err(Error::DuplicateId {
                path: path.to_path_buf(),
                id: d.id.clone(),
            });
        }
    }
    Ok(loaded)
}

/// The corpus made of the paragraphs of QA examples: deduplicated by (title, text), in order of
/// first appearance, with ids `"{n}"` (0-based position).
pub fn corpus_from_qa<'a>(examples: impl IntoIterator<Item = &'a QaExample>) -> Vec<Document> {
    let mut seen: HashSet<(&str, &str)> = HashSet::new();
    let mut docs = Vec::new();
    for q in examples {
        for p in &q.paragraphs {
            if seen.insert((p.title.as_str(), p.text.as_str())) {
                docs.push(Document {
                    id: docs.len().to_string(),
                    title: p.title.clone(),
                    text: p.text.clone(),
                });
            }
        }
    }
    docs
}

/// Writes rows as JSONL to a temporary file beside `path` and renames it into place, so a crash
/// never leaves a half-written file.
pub fn write_jsonl<'a, T: Serialize + 'a>(
    path: &Path,
    rows: impl IntoIterator<Item = &'a T>,
) -> Result<()> {
    let mut w = AtomicWriter::create(path)?;
    for row in rows {
        w.write_row(row)?;
    }
    w.commit()
}

/// A JSONL writer whose file appears, complete, only on [`AtomicWriter::commit`] (written under
/// a temporary name by `steper_fsutil`, synced, renamed). Dropped without commit, it removes
/// the temporary file.
pub struct AtomicWriter {
    out: steper_fsutil::AtomicFile,
}

impl AtomicWriter {
    /// Starts writing `path`.
    pub fn create(path: &Path) -> Result<Self> {
        Ok(AtomicWriter {
            out: steper_fsutil::AtomicFile::create(path)?,
        })
    }

    /// Appends one JSON line.
    pub fn write_row<T: Serialize + ?Sized>(&mut self, row: &T) -> Result<()> {
        serde_json::to_writer(&mut self.out, row)
            .map_err(|e| Error::io(self.out.path(), std::io::Error::other(e)))?;
        self.out
            .write_all(b"\n")
            .map_err(|e| Error::io(self.out.path(), e))
    }

    /// Flushes, syncs and renames the file into place.
    pub fn commit(self) -> Result<()> {
        Ok(self.out.commit()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).expect("write fixture");
        p
    }

    const GOOD: &str = r#"{"id":"q1","dataset":"hotpotqa","question":"Who?","answers":["A"],"type":null,"paragraphs":[{"title":"T1","text":"x y","is_supporting":true},{"title":"T2","text":"z","is_supporting":false}],"source":"s"}"#;
    const GOOD2: &str = r#"{"id":"q2","question":"What?","answers":["B"],"paragraphs":[{"title":"T1","text":"x y"},{"title":"T1","text":"other"}],"supporting_titles":["T1"]}"#;

    #[test]
    fn reads_qa_and_keeps_extra_fields() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::io("tmp", e))?;
        let p = write(dir.path(), "qa.jsonl", &format!("{GOOD}\n\n{GOOD2}\n"));
        let qa = read_qa(&p, ReadOptions::default())?;
        assert_eq!(qa.rows.len(), 2);
        assert_eq!(qa.rows[0].gold_titles(), vec!["T1".to_string()]);
        assert_eq!(qa.rows[1].gold_titles(), vec!["T1".to_string()]);
        assert_eq!(
            qa.rows[0].extra.get("source"),
            Some(&serde_json::json!("s"))
        );
        let again: QaExample = serde_json::from_str(
            &serde_json::to_string(&qa.rows[0]).map_err(|e| Error::Internal(e.to_string()))?,
        )
        .map_err(|e| Error::Internal(e.to_string()))?;
        assert_eq!(again, qa.rows[0]);
        Ok(())
    }

    #[test]
    fn malformed_line_names_file_and_line() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::io("tmp", e))?;
        let bad = r#"{"id":"q3","question":"Why?"}"#; // no answers
        let p = write(
            dir.path(),
            "qa.jsonl",
            &format!("{GOOD}\n{bad}\n{GOOD2}\nnot json\n"),
        );
        match read_qa(&p, ReadOptions::default()) {
            Err(Error::BadLine {
                path,
                line,
                message,
            }) => {
                assert_eq!(path, p);
                assert_eq!(line, 2);
                assert!(message.contains("answers"), "{message}");
            }
            other => panic!("expected BadLine, got {other:?}"),
        }
        let qa = read_qa(&p, ReadOptions { skip_bad: true })?;
        assert_eq!(qa.rows.len(), 2);
        assert_eq!(
            qa.skipped.iter().map(|s| s.0).collect::<Vec<_>>(),
            vec![2, 4]
        );
        Ok(())
    }

    #[test]
    fn supporting_facts_skip_out_of_range_indices() -> Result<()> {
        let line = r#"{"id":"q","question":"Q?","answers":["A"],"paragraphs":[{"title":"T","text":"One. Two. Three.","is_supporting":true,"sentences":["One."," Two.","Three."],"supporting_sentences":[2,1,7,1]},{"title":"U","text":"u","sentences":["u"]}],"evidences":[["T","r","A"]]}"#;
        let ex: QaExample =
            serde_json::from_str(line).map_err(|e| Error::Internal(e.to_string()))?;
        let (facts, bad) = ex.paragraphs[0].supporting_facts();
        assert_eq!(facts, vec!["Two.".to_string(), "Three.".to_string()]);
        assert_eq!(bad, 1);
        assert_eq!(ex.paragraphs[1].supporting_facts(), (Vec::new(), 0));
        assert!(ex.extra.contains_key("evidences"));
        Ok(())
    }

    #[test]
    fn corpus_from_qa_dedups_by_title_and_text() -> Result<()> {
        let a: QaExample =
            serde_json::from_str(GOOD).map_err(|e| Error::Internal(e.to_string()))?;
        let b: QaExample =
            serde_json::from_str(GOOD2).map_err(|e| Error::Internal(e.to_string()))?;
        let docs = corpus_from_qa([&a, &b]);
        let pairs: Vec<_> = docs
            .iter()
            .map(|d| (d.id.as_str(), d.title.as_str(), d.text.as_str()))
            .collect();
        assert_eq!(
            pairs,
            vec![("0", "T1", "x y"), ("1", "T2", "z"), ("2", "T1", "other")]
        );
        Ok(())
    }

    #[test]
    fn stepwise_record_round_trips_with_lowercase_stage() -> Result<()> {
        let r = StepwiseRecord {
            qid: "q".into(),
            stage: Stage::Aggregate,
            step: 3,
            question: "Q?".into(),
            passages: vec![PromptPassage {
                title: "T".into(),
                text: "x".into(),
            }],
            reasoning: vec!["a.".into(), "b.".into()],
            target: "So the answer is: c.".into(),
            teacher: "gold".into(),
            answers: vec!["c".into()],
            framework: Default::default(),
        };
        let s = serde_json::to_string(&r).map_err(|e| Error::Internal(e.to_string()))?;
        assert!(s.contains(r#""stage":"aggregate""#));
        let back: StepwiseRecord =
            serde_json::from_str(&s).map_err(|e| Error::Internal(e.to_string()))?;
        assert_eq!(back, r);
        Ok(())
    }

    #[test]
    fn atomic_writer_renames_into_place() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::io("tmp", e))?;
        let p = dir.path().join("c.jsonl");
        let docs = vec![Document {
            id: "0".into(),
            title: "T".into(),
            text: "x".into(),
        }];
        write_jsonl(&p, &docs)?;
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .map_err(|e| Error::io("tmp", e))?
            .filter_map(|e| e.ok().map(|e| e.file_name()))
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("c.jsonl")]);
        let back = read_corpus(&p, ReadOptions::default())?;
        assert_eq!(back.rows, docs);
        Ok(())
    }
}
