//! 2WikiMultiHopQA's official files (`dev.json`, `train.json`): HotpotQA's shape (`_id`,
//! `question`, `answer`, `type`, `context`, `supporting_facts`) plus `evidences`
//! (`[subject, relation, object]` triples), which stay in the record as `evidences`.

use serde_json::Value;

use super::{hotpotqa, Converted, Rec};
use crate::error::Result;

/// Converts a 2WikiMultiHopQA record.
pub(super) fn convert(rec: &Rec<'_>, value: &Value) -> Result<Converted> {
    let obj = rec.object(value)?;
    if let Some(ev) = obj.get("evidences") {
        for (i, triple) in rec.array(ev, "evidences")?.iter().enumerate() {
            let field = format!("evidences[{i}]");
            if rec.array(triple, &field)?.len() != 3 {
                return Err(rec.bad(
                    &field,
                    "a [subject, relation, object] triple",
                    super::short(triple),
                ));
            }
        }
    }
    hotpotqa::convert_shape(rec, value, "2wikimultihopqa", &hotpotqa::READ)
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
            path: Path::new("dev.json"),
            at: RecordAt::Index(0),
        }
    }

    #[test]
    fn keeps_evidences_and_joins_sentences_with_spaces() -> Result<()> {
        let v = json!({
            "_id": "w1", "type": "comparison", "question": "Who was born first?", "answer": "B",
            "context": [["A", ["A was born in 1900.", "A died."]], ["B", ["B was born in 1890."]]],
            "supporting_facts": [["A", 0], ["B", 0], ["B", 4]],
            "evidences": [["A", "date of birth", "1900"], ["B", "date of birth", "1890"]]
        });
        let c = convert(&rec(), &v)?;
        assert_eq!(c.example.dataset, "2wikimultihopqa");
        assert_eq!(c.example.paragraphs[0].text, "A was born in 1900. A died.");
        assert_eq!(c.skipped_supporting, 1);
        assert_eq!(c.example.extra.get("evidences"), v.get("evidences"));
        Ok(())
    }

    #[test]
    fn an_evidence_that_is_not_a_triple_is_named() {
        let v = json!({
            "_id": "w1", "question": "Q?", "answer": "B", "context": [],
            "supporting_facts": [], "evidences": [["A", "r", "x"], ["A", "r"]]
        });
        match convert(&rec(), &v) {
            Err(Error::BadField { field, .. }) => assert_eq!(field, "evidences[1]"),
            other => panic!("expected BadField, got {other:?}"),
        }
    }
}
