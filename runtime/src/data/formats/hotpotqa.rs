//! HotpotQA's official files (`hotpot_dev_distractor_v1.json`, `hotpot_train_v1.1.json`): one
//! JSON array of `{_id, question, answer, type, level, context: [[title, [sentences]]],
//! supporting_facts: [[title, sentence index]]}`. 2WikiMultiHopQA shares the shape.

use serde_json::Value;

use super::{join_sentences, rest, unique_titles, Converted, Rec};
use crate::data::{Paragraph, QaExample};
use crate::error::Result;

/// The fields of the shared HotpotQA / 2Wiki shape this module reads.
pub(super) const READ: [&str; 6] = [
    "_id",
    "question",
    "answer",
    "type",
    "context",
    "supporting_facts",
];

/// Converts a HotpotQA record.
pub(super) fn convert(rec: &Rec<'_>, value: &Value) -> Result<Converted> {
    convert_shape(rec, value, "hotpotqa", &READ)
}

/// The HotpotQA shape, for HotpotQA and 2WikiMultiHopQA: `context` becomes the paragraphs
/// (`sentences` kept, `text` joined from them), `supporting_facts` their `is_supporting` and
/// `supporting_sentences` (a fact whose index is past the paragraph's last sentence, or whose
/// title no paragraph has, is dropped and counted). The fields outside `read` stay in the
/// record's extra fields (`level`, 2Wiki's `evidences`…).
pub(super) fn convert_shape(
    rec: &Rec<'_>,
    value: &Value,
    dataset: &str,
    read: &[&str],
) -> Result<Converted> {
    let obj = rec.object(value)?;
    let id = rec.id(rec.req(obj, "_id")?, "_id")?;
    let question = rec.string(rec.req(obj, "question")?, "question")?;
    let answer = rec.string(rec.req(obj, "answer")?, "answer")?;
    let kind = rec.opt_string(obj.get("type"), "type")?;

    let mut context = Vec::new();
    for (i, item) in rec
        .array(rec.req(obj, "context")?, "context")?
        .iter()
        .enumerate()
    {
        let field = format!("context[{i}]");
        let pair = rec.array(item, &field)?;
        let [title, sentences] = pair.as_slice() else {
            return Err(rec.bad(&field, "a [title, [sentences]] pair", super::short(item)));
        };
        context.push((
            rec.string(title, &format!("{field}[0]"))?,
            rec.strings(sentences, &format!("{field}[1]"))?,
        ));
    }
    let mut paragraphs = paragraphs_from_sentences(context);

    let (supporting_titles, skipped_supporting) = match obj.get("supporting_facts") {
        None | Some(Value::Null) => (None, 0),
        Some(list) => {
            let mut facts = Vec::new();
            for (i, fact) in rec.array(list, "supporting_facts")?.iter().enumerate() {
                let field = format!("supporting_facts[{i}]");
                let pair = rec.array(fact, &field)?;
                let [title, idx] = pair.as_slice() else {
                    return Err(rec.bad(
                        &field,
                        "a [title, sentence index] pair",
                        super::short(fact),
                    ));
                };
                facts.push((
                    rec.string(title, &format!("{field}[0]"))?,
                    rec.index(idx, &format!("{field}[1]"))?,
                ));
            }
            let (titles, skipped) = mark_supporting(&mut paragraphs, &facts);
            (Some(titles), skipped)
        }
    };

    Ok(Converted {
        example: QaExample {
            id,
            dataset: dataset.to_string(),
            question,
            answers: vec![answer],
            kind,
            paragraphs,
            supporting_titles,
            extra: rest(obj, read),
        },
        skipped_supporting,
    })
}

/// Paragraphs from `(title, sentences)` pairs: `text` joined from the sentences, which are
/// kept.
pub(super) fn paragraphs_from_sentences(context: Vec<(String, Vec<String>)>) -> Vec<Paragraph> {
    context
        .into_iter()
        .map(|(title, sentences)| Paragraph {
            title,
            text: join_sentences(&sentences),
            is_supporting: None,
            sentences: Some(sentences),
            supporting_sentences: None,
        })
        .collect()
}

/// Marks the paragraphs named by `(title, sentence index)` facts: `is_supporting` on every
/// paragraph (true where a fact names its title), `supporting_sentences` on those named, each
/// index on the first paragraph of that title that has the sentence. Returns the facts' titles
/// (in order of first appearance) and the number of facts dropped (an index past the last
/// sentence, or a title no paragraph has).
pub(super) fn mark_supporting(
    paragraphs: &mut [Paragraph],
    facts: &[(String, usize)],
) -> (Vec<String>, usize) {
    let mut skipped = 0;
    for p in paragraphs.iter_mut() {
        p.is_supporting = Some(false);
    }
    for (title, idx) in facts {
        let mut placed = false;
        for p in paragraphs.iter_mut().filter(|p| &p.title == title) {
            p.is_supporting = Some(true);
            let in_range = p.sentences.as_ref().is_some_and(|s| *idx < s.len());
            let list = p.supporting_sentences.get_or_insert_with(Vec::new);
            if in_range && !placed {
                list.push(*idx);
                placed = true;
            }
        }
        if !placed {
            skipped += 1;
        }
    }
    (
        unique_titles(facts.iter().map(|(t, _)| t.as_str())),
        skipped,
    )
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
            path: Path::new("hotpot.json"),
            at: RecordAt::Index(3),
        }
    }

    fn record() -> Value {
        json!({
            "_id": "h1", "question": "Who?", "answer": "A", "type": "bridge", "level": "hard",
            "context": [["T1", ["One.", " Two."]], ["T2", ["Three."]], ["T3", ["x"]]],
            "supporting_facts": [["T2", 0], ["T1", 1], ["T1", 5], ["Nowhere", 0]]
        })
    }

    #[test]
    fn maps_context_and_supporting_facts() -> Result<()> {
        let c = convert(&rec(), &record())?;
        let q = c.example;
        assert_eq!(q.id, "h1");
        assert_eq!(q.dataset, "hotpotqa");
        assert_eq!(q.answers, vec!["A".to_string()]);
        assert_eq!(q.kind.as_deref(), Some("bridge"));
        assert_eq!(q.paragraphs[0].text, "One. Two.");
        assert_eq!(q.paragraphs[0].supporting_sentences, Some(vec![1]));
        assert_eq!(q.paragraphs[1].supporting_sentences, Some(vec![0]));
        assert_eq!(q.paragraphs[2].supporting_sentences, None);
        assert_eq!(
            q.paragraphs
                .iter()
                .map(|p| p.is_supporting)
                .collect::<Vec<_>>(),
            vec![Some(true), Some(true), Some(false)]
        );
        assert_eq!(
            q.supporting_titles,
            Some(vec!["T2".into(), "T1".into(), "Nowhere".into()])
        );
        // T1's index 5 and the unknown title are dropped and counted
        assert_eq!(c.skipped_supporting, 2);
        assert_eq!(q.extra.get("level"), Some(&json!("hard")));
        assert!(!q.extra.contains_key("context"));
        Ok(())
    }

    #[test]
    fn without_supporting_facts_nothing_is_marked() -> Result<()> {
        let mut v = record();
        if let Some(o) = v.as_object_mut() {
            o.remove("supporting_facts");
        }
        let q = convert(&rec(), &v)?.example;
        assert_eq!(q.supporting_titles, None);
        assert!(q.paragraphs.iter().all(|p| p.is_supporting.is_none()));
        Ok(())
    }

    fn expect_bad_field(v: Value, want_field: &str) {
        match convert(&rec(), &v) {
            Err(Error::BadField {
                path, at, field, ..
            }) => {
                assert_eq!(path, Path::new("hotpot.json"));
                assert_eq!(at, RecordAt::Index(3));
                assert_eq!(field, want_field);
            }
            other => panic!("expected BadField {want_field}, got {other:?}"),
        }
    }

    #[test]
    fn errors_name_the_field() {
        let mut v = record();
        v["_id"] = json!(null);
        expect_bad_field(v, "_id");
        let mut v = record();
        if let Some(o) = v.as_object_mut() {
            o.remove("answer");
        }
        expect_bad_field(v, "answer");
        let mut v = record();
        v["context"][1] = json!(["T2"]);
        expect_bad_field(v, "context[1]");
        let mut v = record();
        v["context"][1][1][0] = json!(7);
        expect_bad_field(v, "context[1][1][0]");
        let mut v = record();
        v["supporting_facts"][2][1] = json!(-1);
        expect_bad_field(v, "supporting_facts[2][1]");
        let mut v = record();
        v["supporting_facts"] = json!({"T1": 0});
        expect_bad_field(v, "supporting_facts");
        expect_bad_field(json!("a string"), "(record)");
    }
}
