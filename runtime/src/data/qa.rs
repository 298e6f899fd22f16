//! Reading QA files in any format this runtime knows: the file is one JSON array or JSONL (told
//! by its first byte), plain or compressed, and its format is told by the keys of its first
//! record unless the caller names it.

use std::collections::HashSet;
use std::io::BufRead;
use std::path::Path;

use serde_json::Value;

use super::formats::{QaFormat, Rec};
use super::{compress, Loaded, QaExample, ReadOptions, RecordAt};
use crate::error::{Error, Result};

/// A QA file as read: the questions, what was skipped and the format found.
#[derive(Debug, Clone)]
pub struct QaFile {
    /// The questions, in file order.
    pub rows: Vec<QaExample>,
    /// Records skipped as malformed (only with [`ReadOptions::skip_bad`]): where, and why.
    pub skipped: Vec<(RecordAt, String)>,
    /// The format the records were read as.
    pub format: QaFormat,
    /// Supporting facts whose sentence index is past the paragraph's last sentence (or whose
    /// title no paragraph has). Converted formats drop them; in the project's schema they stay
    /// in the file and [`super::Paragraph::supporting_facts`] skips them.
    pub skipped_supporting: usize,
}

/// Reads a QA file in any format ([`read_qa_file`] with the format detected) and returns its
/// questions; skipped records carry their line (JSONL) or 0-based index (JSON array).
pub fn read_qa(path: &Path, opts: ReadOptions) -> Result<Loaded<QaExample>> {
    let f = read_qa_file(path, None, opts)?;
    Ok(Loaded {
        rows: f.rows,
        skipped: f
            .skipped
            .into_iter()
            .map(|(at, m)| (at.number(), m))
            .collect(),
    })
}

/// Reads a QA file: one JSON array or JSONL, plain, gzip or Zstandard, in `format` (detected
/// from the first record when `None`), and checks what the loop relies on (a non-empty
/// question, unique ids). Errors name the file, the line or record, and the field.
pub fn read_qa_file(path: &Path, format: Option<QaFormat>, opts: ReadOptions) -> Result<QaFile> {
    let mut input = compress::open(path)?;
    let mut reader = Reader {
        path,
        format,
        opts,
        rows: Vec::new(),
        skipped: Vec::new(),
        skipped_supporting: 0,
    };
    if first_byte(&mut input, path)? == Some(b'[') {
        let values: Vec<Value> = serde_json::from_reader(input).map_err(|e| Error::BadRecord {
            path: path.to_path_buf(),
            at: RecordAt::Line(e.line()),
            message: format!("not a JSON array of records: {e}"),
        })?;
        for (i, v) in values.into_iter().enumerate() {
            reader.record(RecordAt::Index(i), Ok(v))?;
        }
    } else {
        for (i, line) in input.lines().enumerate() {
            let line = line.map_err(|e| Error::io(path, e))?;
            if line.trim().is_empty() {
                continue;
            }
            let parsed = serde_json::from_str::<Value>(&line).map_err(|e| e.to_string());
            reader.record(RecordAt::Line(i + 1), parsed)?;
        }
    }
    let Reader {
        format,
        rows,
        skipped,
        skipped_supporting,
        ..
    } = reader;
    check(path, &rows)?;
    Ok(QaFile {
        rows,
        skipped,
        // an empty file has no record to tell its format by: the project's schema
        format: format.unwrap_or(QaFormat::Steper),
        skipped_supporting,
    })
}

/// The first byte that is not whitespace (or a UTF-8 byte-order mark), left unread.
fn first_byte(input: &mut Box<dyn BufRead>, path: &Path) -> Result<Option<u8>> {
    const BOM: [u8; 3] = [0xef, 0xbb, 0xbf];
    loop {
        let buf = input.fill_buf().map_err(|e| Error::io(path, e))?;
        if buf.is_empty() {
            return Ok(None);
        }
        if buf.starts_with(&BOM) {
            input.consume(BOM.len());
            continue;
        }
        match buf.iter().position(|b| !b.is_ascii_whitespace()) {
            Some(i) => {
                let b = buf[i];
                input.consume(i);
                return Ok(Some(b));
            }
            None => {
                let n = buf.len();
                input.consume(n);
            }
        }
    }
}

/// Converts records one by one, fixing the format at the first.
struct Reader<'a> {
    path: &'a Path,
    format: Option<QaFormat>,
    opts: ReadOptions,
    rows: Vec<QaExample>,
    skipped: Vec<(RecordAt, String)>,
    skipped_supporting: usize,
}

impl Reader<'_> {
    fn record(&mut self, at: RecordAt, parsed: std::result::Result<Value, String>) -> Result<()> {
        let value = match parsed {
            Ok(v) => v,
            Err(message) => return self.bad(at, self.malformed(at, message)),
        };
        let format = match self.format {
            Some(f) => f,
            None => {
                let f = QaFormat::detect(&value).ok_or_else(|| Error::UnknownFormat {
                    path: self.path.to_path_buf(),
                    at,
                    keys: match &value {
                        Value::Object(o) => o.keys().cloned().collect::<Vec<_>>().join(", "),
                        other => format!("none: the record is not an object but {}", kind(other)),
                    },
                })?;
                self.format = Some(f);
                f
            }
        };
        let converted = if format == QaFormat::Steper {
            serde_json::from_value::<QaExample>(value)
                .map(|q| {
                    let bad = q.paragraphs.iter().map(|p| p.supporting_facts().1).sum();
                    (q, bad)
                })
                .map_err(|e| self.malformed(at, e.to_string()))
        } else {
            let rec = Rec {
                path: self.path,
                at,
            };
            format
                .convert(&rec, &value)
                .map(|c| (c.example, c.skipped_supporting))
        };
        match converted {
            Ok((q, bad)) => {
                self.rows.push(q);
                self.skipped_supporting += bad;
                Ok(())
            }
            Err(e) => self.bad(at, e),
        }
    }

    /// The error of a record that is not JSON or not of the project's schema.
    fn malformed(&self, at: RecordAt, message: String) -> Error {
        match at {
            RecordAt::Line(line) => Error::BadLine {
                path: self.path.to_path_buf(),
                line,
                message,
            },
            RecordAt::Index(_) => Error::BadRecord {
                path: self.path.to_path_buf(),
                at,
                message,
            },
        }
    }

    /// Skips the record (with `skip_bad`) or fails with `e`.
    fn bad(&mut self, at: RecordAt, e: Error) -> Result<()> {
        if self.opts.skip_bad {
            // the place is kept beside the message: the message says only what is wrong
            let message = match e {
                Error::BadLine { message, .. } | Error::BadRecord { message, .. } => message,
                Error::BadField {
                    field,
                    expected,
                    got,
                    ..
                } => format!("field `{field}`: expected {expected}, got {got}"),
                other => other.to_string(),
            };
            self.skipped.push((at, message));
            Ok(())
        } else {
            Err(e)
        }
    }
}

/// A JSON value's type, for messages.
fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// What the loop relies on: a non-empty question and unique ids.
fn check(path: &Path, rows: &[QaExample]) -> Result<()> {
    let mut ids = HashSet::new();
    for q in rows {
        if q.question.trim().is_empty() {
            return Err(Error::EmptyField {
                path: path.to_path_buf(),
                id: q.id.clone(),
                field: "question",
            });
        }
        if !ids.insert(q.id.as_str()) {
            return Err(Error::DuplicateId {
                path: path.to_path_buf(),
                id: q.id.clone(),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> Result<std::path::PathBuf> {
        let p = dir.join(name);
        std::fs::write(&p, text).map_err(|e| Error::io(&p, e))?;
        Ok(p)
    }

    const HOTPOT: &str = r#"[
      {"_id": "h1", "question": "Q1?", "answer": "A", "type": "bridge",
       "context": [["T", [" One.", " Two."]]], "supporting_facts": [["T", 1], ["T", 4]]},
      {"_id": "h2", "question": "Q2?", "answer": "B", "context": [], "supporting_facts": []}
    ]"#;

    #[test]
    fn a_json_array_is_detected_and_converted() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::io("tmp", e))?;
        let p = write(dir.path(), "hotpot.json", &format!("\u{feff}\n {HOTPOT}"))?;
        let f = read_qa_file(&p, None, ReadOptions::default())?;
        assert_eq!(f.format, QaFormat::HotpotQa);
        assert_eq!(f.rows.len(), 2);
        assert_eq!(f.skipped_supporting, 1);
        assert_eq!(f.rows[0].paragraphs[0].text, "One. Two.");
        Ok(())
    }

    #[test]
    fn a_named_format_that_does_not_fit_names_the_field() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::io("tmp", e))?;
        let p = write(dir.path(), "hotpot.json", HOTPOT)?;
        match read_qa_file(&p, Some(QaFormat::Musique), ReadOptions::default()) {
            Err(Error::BadField {
                path, at, field, ..
            }) => {
                assert_eq!(path, p);
                assert_eq!(at, RecordAt::Index(0));
                assert_eq!(field, "id");
            }
            other => panic!("expected BadField, got {other:?}"),
        }
        Ok(())
    }

    #[test]
    fn bad_records_are_skipped_with_their_place_when_asked() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::io("tmp", e))?;
        let text = concat!(
            r#"{"id":"m1","question":"Q?","answer":"A","paragraphs":[]}"#,
            "\n\n",
            r#"{"id":"m2","question":"Q?","answer":7,"paragraphs":[]}"#,
            "\n{oops\n",
            r#"{"id":"m3","question":"Q?","answer":"C","paragraphs":[]}"#,
            "\n"
        );
        let p = write(dir.path(), "musique.jsonl", text)?;
        match read_qa_file(&p, None, ReadOptions::default()) {
            Err(Error::BadField { at, field, .. }) => {
                assert_eq!(at, RecordAt::Line(3));
                assert_eq!(field, "answer");
            }
            other => panic!("expected BadField, got {other:?}"),
        }
        let f = read_qa_file(&p, None, ReadOptions { skip_bad: true })?;
        assert_eq!(f.format, QaFormat::Musique);
        assert_eq!(
            f.rows.iter().map(|q| q.id.as_str()).collect::<Vec<_>>(),
            vec!["m1", "m3"]
        );
        assert_eq!(
            f.skipped.iter().map(|s| s.0).collect::<Vec<_>>(),
            vec![RecordAt::Line(3), RecordAt::Line(4)]
        );
        Ok(())
    }

    #[test]
    fn an_unknown_first_record_lists_its_keys() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::io("tmp", e))?;
        let p = write(
            dir.path(),
            "corpus.jsonl",
            "{\"title\":\"T\",\"text\":\"x\"}\n",
        )?;
        match read_qa(&p, ReadOptions { skip_bad: true }) {
            Err(Error::UnknownFormat { path, at, keys }) => {
                assert_eq!(path, p);
                assert_eq!(at, RecordAt::Line(1));
                assert!(keys.contains("title") && keys.contains("text"), "{keys}");
            }
            other => panic!("expected UnknownFormat, got {other:?}"),
        }
        let p = write(dir.path(), "numbers.json", "[1, 2]")?;
        match read_qa(&p, ReadOptions::default()) {
            Err(Error::UnknownFormat { at, keys, .. }) => {
                assert_eq!(at, RecordAt::Index(0));
                assert!(keys.contains("a number"), "{keys}");
            }
            other => panic!("expected UnknownFormat, got {other:?}"),
        }
        Ok(())
    }

    #[test]
    fn a_broken_array_names_its_line() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::io("tmp", e))?;
        let p = write(dir.path(), "broken.json", "[\n{\"_id\": \"h1\",\n oops}\n]")?;
        match read_qa(&p, ReadOptions::default()) {
            Err(Error::BadRecord { at, .. }) => assert_eq!(at, RecordAt::Line(3)),
            other => panic!("expected BadRecord, got {other:?}"),
        }
        Ok(())
    }

    #[test]
    fn converted_records_are_checked_like_the_projects() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::io("tmp", e))?;
        let dup = r#"[{"_id":"h","question":"Q?","answer":"A","context":[]},{"_id":"h","question":"R?","answer":"B","context":[]}]"#;
        let p = write(dir.path(), "dup.json", dup)?;
        match read_qa(&p, ReadOptions::default()) {
            Err(Error::DuplicateId { id, .. }) => assert_eq!(id, "h"),
            other => panic!("expected DuplicateId, got {other:?}"),
        }
        let empty = r#"{"question_id":"i","question_text":"  ","answers_objects":[]}"#;
        let p = write(dir.path(), "empty.jsonl", empty)?;
        match read_qa(&p, ReadOptions::default()) {
            Err(Error::EmptyField { field, .. }) => assert_eq!(field, "question"),
            other => panic!("expected EmptyField, got {other:?}"),
        }
        Ok(())
    }
}
