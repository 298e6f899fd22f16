//! MuSiQue's JSONL (`musique_ans_v1.0_dev.jsonl`, `musique_full_v1.0_*.jsonl`): `{id, question,
//! answer, answer_aliases, answerable, paragraphs: [{idx, title, paragraph_text,
//! is_supporting}], question_decomposition: [{id, question, answer, paragraph_support_idx}]}`.

use serde_json::Value;

use super::{rest, unique_titles, Converted, Rec};
use crate::data::{Paragraph, QaExample};
use crate::error::Result;

const READ: [&str; 5] = ["id", "question", "answer", "answer_aliases", "paragraphs"];

/// Converts a MuSiQue record: the answer and its aliases become `answers`; the paragraphs keep
/// their order; the hop count of the id (`2hop__…`) becomes the type; `question_decomposition`
/// and `answerable` stay in the record.
pub(super) fn convert(rec: &Rec<'_>, value: &Value) -> Result<Converted> {
    let obj = rec.object(value)?;
    let id = rec.id(rec.req(obj, "id")?, "id")?;
    let question = rec.string(rec.req(obj, "question")?, "question")?;
    let mut answers = vec![rec.string(rec.req(obj, "answer")?, "answer")?];
    if let Some(aliases) = obj.get("answer_aliases") {
        for a in rec.strings(aliases, "answer_aliases")? {
            if !answers.contains(&a) {
                answers.push(a);
            }
        }
    }
    let paragraphs = paragraphs(rec, rec.req(obj, "paragraphs")?, "paragraphs")?;
    if let Some(steps) = obj.get("question_decomposition") {
        for (i, step) in rec
            .array(steps, "question_decomposition")?
            .iter()
            .enumerate()
        {
            rec.object_at(step, &format!("question_decomposition[{i}]"))?;
        }
    }
    let kind = id
        .split_once("__")
        .map(|(hops, _)| hops)
        .filter(|h| {
            h.strip_suffix("hop")
                .is_some_and(|n| n.parse::<u32>().is_ok())
        })
        .map(str::to_string);
    Ok(Converted {
        example: QaExample {
            id,
            dataset: "musique".into(),
            question,
            answers,
            kind,
            supporting_titles: supporting_titles(&paragraphs),
            paragraphs,
            extra: rest(obj, &READ),
        },
        skipped_supporting: 0,
    })
}

/// A list of `{title, paragraph_text, is_supporting?}` (MuSiQue's `paragraphs`, IRCoT's
/// `contexts`) as paragraphs, in list order.
pub(super) fn paragraphs(rec: &Rec<'_>, list: &Value, field: &str) -> Result<Vec<Paragraph>> {
    let mut out = Vec::new();
    for (i, p) in rec.array(list, field)?.iter().enumerate() {
        let field = format!("{field}[{i}]");
        let obj = rec.object_at(p, &field)?;
        let get = |k: &str| {
            obj.get(k)
                .ok_or_else(|| rec.bad(&format!("{field}.{k}"), "a value", super::MISSING.into()))
        };
        out.push(Paragraph {
            title: rec.string(get("title")?, &format!("{field}.title"))?,
            text: rec.string(get("paragraph_text")?, &format!("{field}.paragraph_text"))?,
            is_supporting: match obj.get("is_supporting") {
                None | Some(Value::Null) => None,
                Some(b) => Some(rec.boolean(b, &format!("{field}.is_supporting"))?),
            },
            sentences: None,
            supporting_sentences: None,
        });
    }
    Ok(out)
}

/// The titles of the paragraphs marked supporting, in order; `None` when no paragraph says.
pub(super) fn supporting_titles(paragraphs: &[Paragraph]) -> Option<Vec<String>> {
    if paragraphs.iter().all(|p| p.is_supporting.is_none()) {
        return None;
    }
    Some(unique_titles(
        paragraphs
            .iter()
            .filter(|p| p.is_supporting == Some(true))
            .map(|p| p.title.as_str()),
    ))
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
            path: Path::new("musique.jsonl"),
            at: RecordAt::Line(7),
        }
    }

    fn record() -> Value {
        json!({
            "id": "2hop__1_2", "question": "Q?", "answer": "A", "answer_aliases": ["a", "A"],
            "answerable": true,
            "paragraphs": [
                {"idx": 0, "title": "T0", "paragraph_text": "x", "is_supporting": false},
                {"idx": 1, "title": "T1", "paragraph_text": "y", "is_supporting": true}
            ],
            "question_decomposition": [
                {"id": 1, "question": "q1", "answer": "B", "paragraph_support_idx": 1}
            ]
        })
    }

    #[test]
    fn maps_answers_paragraphs_and_keeps_the_decomposition() -> Result<()> {
        let v = record();
        let q = convert(&rec(), &v)?.example;
        assert_eq!(q.answers, vec!["A".to_string(), "a".to_string()]);
        assert_eq!(q.kind.as_deref(), Some("2hop"));
        assert_eq!(q.supporting_titles, Some(vec!["T1".to_string()]));
        assert_eq!(q.paragraphs[1].text, "y");
        assert_eq!(
            q.extra.get("question_decomposition"),
            v.get("question_decomposition")
        );
        assert_eq!(q.extra.get("answerable"), Some(&json!(true)));
        Ok(())
    }

    #[test]
    fn errors_name_the_paragraph_field() {
        let cases = [
            (
                "/paragraphs/1/paragraph_text",
                json!(null),
                "paragraphs[1].paragraph_text",
            ),
            (
                "/paragraphs/0/is_supporting",
                json!("yes"),
                "paragraphs[0].is_supporting",
            ),
            ("/answer_aliases/1", json!(3), "answer_aliases[1]"),
            (
                "/question_decomposition/0",
                json!("q1"),
                "question_decomposition[0]",
            ),
        ];
        for (pointer, bad, want) in cases {
            let mut v = record();
            if let Some(slot) = v.pointer_mut(pointer) {
                *slot = bad;
            }
            match convert(&rec(), &v) {
                Err(Error::BadField { field, at, .. }) => {
                    assert_eq!(field, want);
                    assert_eq!(at, RecordAt::Line(7));
                }
                other => panic!("expected BadField {want}, got {other:?}"),
            }
        }
        let mut v = record();
        if let Some(p) = v
            .pointer_mut("/paragraphs/1")
            .and_then(|p| p.as_object_mut())
        {
            p.remove("title");
        }
        match convert(&rec(), &v) {
            Err(Error::BadField { field, .. }) => assert_eq!(field, "paragraphs[1].title"),
            other => panic!("expected BadField, got {other:?}"),
        }
    }
}
