//! IRCoT's processed files (`processed_data/<dataset>/{dev,test}_subsampled.jsonl`):
//! `{dataset?, question_id, question_text, level?, type?, answers_objects: [{number, date: {day,
//! month, year}, spans}], contexts: [{idx, title, paragraph_text, is_supporting}]}`.

use serde_json::Value;

use super::{musique, rest, Converted, Rec};
use crate::data::QaExample;
use crate::error::Result;

const READ: [&str; 6] = [
    "dataset",
    "question_id",
    "question_text",
    "type",
    "answers_objects",
    "contexts",
];

/// Converts an IRCoT record: the answer objects' spans (else their number, else their date as
/// `day month year`) become `answers`; `contexts` the paragraphs; `level` and any other field
/// stay in the record.
pub(super) fn convert(rec: &Rec<'_>, value: &Value) -> Result<Converted> {
    let obj = rec.object(value)?;
    let id = rec.id(rec.req(obj, "question_id")?, "question_id")?;
    let question = rec.string(rec.req(obj, "question_text")?, "question_text")?;
    let dataset = rec
        .opt_string(obj.get("dataset"), "dataset")?
        .unwrap_or_default();
    let kind = rec.opt_string(obj.get("type"), "type")?;
    let mut answers: Vec<String> = Vec::new();
    let objects = rec.array(rec.req(obj, "answers_objects")?, "answers_objects")?;
    for (i, a) in objects.iter().enumerate() {
        for s in answer_strings(rec, a, &format!("answers_objects[{i}]"))? {
            if !answers.contains(&s) {
                answers.push(s);
            }
        }
    }
    let paragraphs = match obj.get("contexts") {
        None | Some(Value::Null) => Vec::new(),
        Some(list) => musique::paragraphs(rec, list, "contexts")?,
    };
    Ok(Converted {
        example: QaExample {
            id,
            dataset,
            question,
            answers,
            kind,
            supporting_titles: musique::supporting_titles(&paragraphs),
            paragraphs,
            extra: rest(obj, &READ),
        },
        skipped_supporting: 0,
    })
}

/// The answer strings of one DROP-style answer object.
fn answer_strings(rec: &Rec<'_>, a: &Value, field: &str) -> Result<Vec<String>> {
    let obj = rec.object_at(a, field)?;
    if let Some(spans) = obj.get("spans") {
        let spans: Vec<String> = rec
            .strings(spans, &format!("{field}.spans"))?
            .into_iter()
            .filter(|s| !s.trim().is_empty())
            .collect();
        if !spans.is_empty() {
            return Ok(spans);
        }
    }
    match obj.get("number") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) if s.trim().is_empty() => {}
        Some(Value::String(s)) => return Ok(vec![s.clone()]),
        Some(Value::Number(n)) => return Ok(vec![n.to_string()]),
        Some(other) => {
            return Err(rec.bad(
                &format!("{field}.number"),
                "a number or a string",
                super::short(other),
            ))
        }
    }
    if let Some(date) = obj.get("date").filter(|d| !d.is_null()) {
        let d = rec.object_at(date, &format!("{field}.date"))?;
        let mut parts = Vec::new();
        for k in ["day", "month", "year"] {
            match d.get(k) {
                None | Some(Value::Null) => {}
                Some(Value::String(s)) if s.trim().is_empty() => {}
                Some(Value::String(s)) => parts.push(s.clone()),
                Some(Value::Number(n)) => parts.push(n.to_string()),
                Some(other) => {
                    return Err(rec.bad(
                        &format!("{field}.date.{k}"),
                        "a number or a string",
                        super::short(other),
                    ))
                }
            }
        }
        if !parts.is_empty() {
            return Ok(vec![parts.join(" ")]);
        }
    }
    Ok(Vec::new())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::RecordAt;
    use crate::error::Error;
    use serde_json::json;
    use std::path::Path;

    fn rec() -> Rec<'static> {
        Rec {
            path: Path::new("dev_subsampled.jsonl"),
            at: RecordAt::Line(2),
        }
    }

    #[test]
    fn maps_answer_objects_and_contexts() -> Result<()> {
        let v = json!({
            "dataset": "hotpotqa", "question_id": "i1", "question_text": "Q?", "level": "hard",
            "type": null,
            "answers_objects": [
                {"number": "", "date": {"day": "", "month": "", "year": ""}, "spans": ["A", "A"]},
                {"number": 3, "date": {"day": "", "month": "", "year": ""}, "spans": []},
                {"number": "", "date": {"day": "4", "month": "July", "year": 1776}, "spans": []}
            ],
            "contexts": [
                {"idx": 0, "title": "T0", "paragraph_text": "x", "is_supporting": true},
                {"idx": 1, "title": "T1", "paragraph_text": "y", "is_supporting": false}
            ]
        });
        let q = convert(&rec(), &v)?.example;
        assert_eq!(q.dataset, "hotpotqa");
        assert_eq!(q.kind, None);
        assert_eq!(
            q.answers,
            vec!["A".to_string(), "3".to_string(), "4 July 1776".to_string()]
        );
        assert_eq!(q.supporting_titles, Some(vec!["T0".to_string()]));
        assert_eq!(q.extra.get("level"), Some(&json!("hard")));
        Ok(())
    }

    #[test]
    fn errors_name_the_field() {
        let base = json!({
            "question_id": "i1", "question_text": "Q?",
            "answers_objects": [{"number": "", "spans": ["A"]}],
            "contexts": [{"idx": 0, "title": "T0", "paragraph_text": "x"}]
        });
        let cases = [
            (
                "/answers_objects/0/spans",
                json!("A"),
                "answers_objects[0].spans",
            ),
            ("/answers_objects/0", json!(["A"]), "answers_objects[0]"),
            ("/contexts/0/title", json!(1), "contexts[0].title"),
            ("/question_text", json!(["Q?"]), "question_text"),
        ];
        for (pointer, bad, want) in cases {
            let mut v = base.clone();
            if let Some(slot) = v.pointer_mut(pointer) {
                *slot = bad;
            }
            match convert(&rec(), &v) {
                Err(Error::BadField { field, at, .. }) => {
                    assert_eq!(field, want);
                    assert_eq!(at, RecordAt::Line(2));
                }
                other => panic!("expected BadField {want}, got {other:?}"),
            }
        }
    }
}
