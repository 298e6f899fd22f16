//! FlashRAG's JSONL (`<dataset>/{train,dev,test}.jsonl`): `{id, question, golden_answers,
//! metadata}`. Multi-hop sets carry their source's fields in `metadata`: HotpotQA / 2Wiki a
//! `context` (`{title: [..], sentences|content: [[..]]}` or `[[title, [sentences]]]`),
//! `supporting_facts` (`{title: [..], sent_id: [..]}` or `[[title, idx]]`), `type`, 2Wiki
//! `evidences`; MuSiQue `paragraphs` and `question_decomposition`.

use serde_json::{Map, Value};

use super::{hotpotqa, musique, Converted, Rec};
use crate::data::QaExample;
use crate::error::Result;

/// Metadata fields that become the record's own (paragraphs, supporting facts, type).
const META_READ: [&str; 5] = [
    "type",
    "context",
    "supporting_facts",
    "paragraphs",
    "question_decomposition",
];

/// Converts a FlashRAG record. `question_decomposition` and `evidences` move from `metadata`
/// to the record (the names of the project's schema); the rest of `metadata` stays as
/// `metadata`.
pub(super) fn convert(rec: &Rec<'_>, value: &Value) -> Result<Converted> {
    let obj = rec.object(value)?;
    let id = rec.id(rec.req(obj, "id")?, "id")?;
    let question = rec.string(rec.req(obj, "question")?, "question")?;
    let answers = rec.strings(rec.req(obj, "golden_answers")?, "golden_answers")?;
    let mut extra = super::rest(obj, &["id", "question", "golden_answers", "metadata"]);
    let empty = Map::new();
    let meta = match obj.get("metadata") {
        None | Some(Value::Null) => &empty,
        Some(m) => rec.object_at(m, "metadata")?,
    };
    let kind = rec.opt_string(meta.get("type"), "metadata.type")?;

    let mut paragraphs = match (meta.get("context"), meta.get("paragraphs")) {
        (Some(ctx), _) if !ctx.is_null() => {
            hotpotqa::paragraphs_from_sentences(context(rec, ctx, "metadata.context")?)
        }
        (_, Some(list)) if !list.is_null() => {
            musique::paragraphs(rec, list, "metadata.paragraphs")?
        }
        _ => Vec::new(),
    };
    let (supporting_titles, skipped_supporting) = match meta.get("supporting_facts") {
        Some(sf) if !sf.is_null() => {
            let facts = supporting_facts(rec, sf, "metadata.supporting_facts")?;
            let (titles, skipped) = hotpotqa::mark_supporting(&mut paragraphs, &facts);
            (Some(titles), skipped)
        }
        _ => (musique::supporting_titles(&paragraphs), 0),
    };
    if let Some(steps) = meta.get("question_decomposition") {
        extra.insert("question_decomposition".into(), steps.clone());
    }
    let mut meta_rest = super::rest(meta, &META_READ);
    if let Some(ev) = meta_rest.remove("evidences") {
        extra.insert("evidences".into(), ev);
    }
    if !meta_rest.is_empty() {
        extra.insert("metadata".into(), Value::Object(meta_rest));
    }
    Ok(Converted {
        example: QaExample {
            id,
            dataset: String::new(),
            question,
            answers,
            kind,
            paragraphs,
            supporting_titles,
            extra,
        },
        skipped_supporting,
    })
}

/// `(title, sentences)` pairs from either layout of a context.
fn context(rec: &Rec<'_>, ctx: &Value, field: &str) -> Result<Vec<(String, Vec<String>)>> {
    if let Some(cols) = ctx.as_object() {
        let titles = cols
            .get("title")
            .ok_or_else(|| rec.bad(&format!("{field}.title"), "a value", super::MISSING.into()))?;
        let titles = rec.strings(titles, &format!("{field}.title"))?;
        let (key, sents) = ["sentences", "content"]
            .iter()
            .find_map(|k| cols.get(*k).map(|v| (*k, v)))
            .ok_or_else(|| {
                rec.bad(
                    &format!("{field}.sentences"),
                    "a list of sentence lists (`sentences` or `content`)",
                    super::MISSING.into(),
                )
            })?;
        let sents = rec.array(sents, &format!("{field}.{key}"))?;
        if sents.len() != titles.len() {
            return Err(rec.bad(
                &format!("{field}.{key}"),
                "one sentence list per title",
                format!("{} lists for {} titles", sents.len(), titles.len()),
            ));
        }
        titles
            .into_iter()
            .zip(sents)
            .enumerate()
            .map(|(i, (t, s))| Ok((t, rec.strings(s, &format!("{field}.{key}[{i}]"))?)))
            .collect()
    } else {
        let mut out = Vec::new();
        for (i, item) in rec.array(ctx, field)?.iter().enumerate() {
            let f = format!("{field}[{i}]");
            let pair = rec.array(item, &f)?;
            let [t, s] = pair.as_slice() else {
                return Err(rec.bad(&f, "a [title, [sentences]] pair", super::short(item)));
            };
            out.push((
                rec.string(t, &format!("{f}[0]"))?,
                rec.strings(s, &format!("{f}[1]"))?,
            ));
        }
        Ok(out)
    }
}

/// `(title, sentence index)` facts from either layout.
fn supporting_facts(rec: &Rec<'_>, sf: &Value, field: &str) -> Result<Vec<(String, usize)>> {
    if let Some(cols) = sf.as_object() {
        let col = |k: &str| {
            cols.get(k)
                .ok_or_else(|| rec.bad(&format!("{field}.{k}"), "a value", super::MISSING.into()))
        };
        let titles = rec.strings(col("title")?, &format!("{field}.title"))?;
        let ids = rec.array(col("sent_id")?, &format!("{field}.sent_id"))?;
        if ids.len() != titles.len() {
            return Err(rec.bad(
                &format!("{field}.sent_id"),
                "one sentence index per title",
                format!("{} indices for {} titles", ids.len(), titles.len()),
            ));
        }
        titles
            .into_iter()
            .zip(ids)
            .enumerate()
            .map(|(i, (t, s))| Ok((t, rec.index(s, &format!("{field}.sent_id[{i}]"))?)))
            .collect()
    } else {
        let mut out = Vec::new();
        for (i, item) in rec.array(sf, field)?.iter().enumerate() {
            let f = format!("{field}[{i}]");
            let pair = rec.array(item, &f)?;
            let [t, s] = pair.as_slice() else {
                return Err(rec.bad(&f, "a [title, sentence index] pair", super::short(item)));
            };
            out.push((
                rec.string(t, &format!("{f}[0]"))?,
                rec.index(s, &format!("{f}[1]"))?,
            ));
        }
        Ok(out)
    }
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
            path: Path::new("dev.jsonl"),
            at: RecordAt::Line(1),
        }
    }

    #[test]
    fn both_context_layouts_give_the_same_paragraphs() -> Result<()> {
        let columns = json!({
            "id": "f1", "question": "Q?", "golden_answers": ["A", "a"],
            "metadata": {
                "type": "bridge", "level": "easy",
                "context": {"title": ["T0", "T1"], "sentences": [["x.", " y."], ["z."]]},
                "supporting_facts": {"title": ["T1", "T0"], "sent_id": [0, 9]}
            }
        });
        let pairs = json!({
            "id": "f1", "question": "Q?", "golden_answers": ["A", "a"],
            "metadata": {
                "type": "bridge", "level": "easy",
                "context": [["T0", ["x.", " y."]], ["T1", ["z."]]],
                "supporting_facts": [["T1", 0], ["T0", 9]]
            }
        });
        let a = convert(&rec(), &columns)?;
        let b = convert(&rec(), &pairs)?;
        assert_eq!(a.example, b.example);
        assert_eq!(a.skipped_supporting, 1);
        let q = a.example;
        assert_eq!(q.answers, vec!["A".to_string(), "a".to_string()]);
        assert_eq!(q.kind.as_deref(), Some("bridge"));
        assert_eq!(q.paragraphs[0].text, "x. y.");
        assert_eq!(q.paragraphs[1].supporting_sentences, Some(vec![0]));
        assert_eq!(q.supporting_titles, Some(vec!["T1".into(), "T0".into()]));
        assert_eq!(q.extra.get("metadata"), Some(&json!({"level": "easy"})));
        Ok(())
    }

    #[test]
    fn musique_metadata_keeps_paragraphs_and_decomposition() -> Result<()> {
        let v = json!({
            "id": "2hop__1_2", "question": "Q?", "golden_answers": ["A"],
            "metadata": {
                "answerable": true,
                "paragraphs": [{"idx": 0, "title": "T", "paragraph_text": "x", "is_supporting": true}],
                "question_decomposition": [{"id": 1, "question": "q", "answer": "A", "paragraph_support_idx": 0}]
            }
        });
        let q = convert(&rec(), &v)?.example;
        assert_eq!(q.supporting_titles, Some(vec!["T".to_string()]));
        assert!(q.extra.contains_key("question_decomposition"));
        assert_eq!(q.extra.get("metadata"), Some(&json!({"answerable": true})));
        Ok(())
    }

    #[test]
    fn a_plain_record_needs_no_metadata() -> Result<()> {
        let q = convert(
            &rec(),
            &json!({"id": 5, "question": "Q?", "golden_answers": ["A"]}),
        )?;
        assert_eq!(q.example.id, "5");
        assert!(q.example.paragraphs.is_empty());
        assert_eq!(q.example.supporting_titles, None);
        Ok(())
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            (
                json!({"id": "f", "question": "Q?", "golden_answers": "A"}),
                "golden_answers",
            ),
            (
                json!({"id": "f", "question": "Q?", "golden_answers": ["A"], "metadata": []}),
                "metadata",
            ),
            (
                json!({"id": "f", "question": "Q?", "golden_answers": ["A"],
                       "metadata": {"context": {"title": ["T"], "sentences": [["x"], ["y"]]}}}),
                "metadata.context.sentences",
            ),
            (
                json!({"id": "f", "question": "Q?", "golden_answers": ["A"],
                       "metadata": {"context": {"title": ["T"], "sentences": [["x"]]},
                                    "supporting_facts": {"title": ["T"], "sent_id": ["0"]}}}),
                "metadata.supporting_facts.sent_id[0]",
            ),
            (json!({"question": "Q?", "golden_answers": ["A"]}), "id"),
        ];
        for (v, want) in cases {
            match convert(&rec(), &v) {
                Err(Error::BadField { field, .. }) => assert_eq!(field, want),
                other => panic!("expected BadField {want}, got {other:?}"),
            }
        }
    }
}
