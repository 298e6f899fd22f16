//! BM25 recall of gold titles over the HotpotQA dev500 paragraph pool (the bar:
//! recall@10 ≥ 0.85, recall@2 ≥ 0.50; a plain BM25 reaches .89 / .56).

mod common;

use std::collections::HashSet;

use anyhow::Result;
use steper_runtime::data::{corpus_from_qa, read_qa, ReadOptions};
use steper_runtime::retrieval::{build_index, recall_at_k, Bm25Index, IndexOptions};

/// Floors of the bar.
const MIN_RECALL_AT_10: f64 = 0.85;
const MIN_RECALL_AT_2: f64 = 0.50;

#[test]
fn hotpotqa_pool_recall_meets_the_bar() -> Result<()> {
    let path = common::data_file("hotpotqa_dev500.jsonl.gz")?;
    let qa = read_qa(&path, ReadOptions::default())?;
    assert_eq!(qa.rows.len(), 500);
    let docs = corpus_from_qa(&qa.rows);
    let tmp = tempfile::tempdir()?;
    let out = tmp.path().join("index");
    let stats = build_index(&docs, &out, &path, IndexOptions::default())?;
    assert_eq!(stats.docs, docs.len());
    let index = Bm25Index::open(&out)?;
    let report = recall_at_k(&index, &qa.rows, &[2, 5, 10], false)?;
    eprintln!("hotpotqa dev500: {report:?}");
    let r = |k: usize| {
        report
            .recall
            .iter()
            .find(|x| x.0 == k)
            .map(|x| x.1)
            .unwrap_or(0.0)
    };
    assert!(r(10) >= MIN_RECALL_AT_10, "recall@10 {}", r(10));
    assert!(r(2) >= MIN_RECALL_AT_2, "recall@2 {}", r(2));
    assert!(r(2) <= r(5) && r(5) <= r(10));
    // Excluding held ids never returns them.
    let first = index.search(&qa.rows[0].question, 4, &HashSet::new())?;
    let held: HashSet<String> = first.iter().map(|h| h.id.clone()).collect();
    let next = index.search(&qa.rows[0].question, 4, &held)?;
    assert_eq!(next.len(), 4);
    assert!(next.iter().all(|h| !held.contains(&h.id)));
    Ok(())
}
