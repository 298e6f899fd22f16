//! Retrieval for the reasoning loop: the [`Retriever`] trait the loop calls, its [`Hit`]s, a
//! recall report over any retriever, and (feature `bm25`) BM25 over a tantivy index
//! ([`Bm25Index`], [`build_index`]).

use std::collections::HashSet;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::data::QaExample;
use crate::error::Result;
use crate::progress::Progress;

#[cfg(feature = "bm25")]
mod bm25;
#[cfg(feature = "bm25")]
pub use bm25::{build_index, Bm25Index, IndexOptions, IndexStats, ANALYZER};

/// One retrieved document and its BM25 score.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hit {
    /// Document id.
    pub id: String,
    /// Title.
    pub title: String,
    /// Text.
    pub text: String,
    /// BM25 score.
    pub score: f32,
}

/// A source of passages for the reasoning loop.
pub trait Retriever: Send + Sync {
    /// The best `k` documents for `query`, best first, leaving out documents whose id is in
    /// `exclude` (passages already held).
    fn retrieve(&self, query: &str, k: usize, exclude: &HashSet<String>) -> Result<Vec<Hit>>;
}

/// Recall of gold titles at several cut-offs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecallReport {
    /// Questions with at least one gold title (the others are not counted).
    pub questions: usize,
    /// `(k, recall@k)`: the mean over questions of the share of distinct gold titles among the
    /// titles of the top k documents retrieved for the question.
    pub recall: Vec<(usize, f64)>,
    /// Queries per second (one query per question, at the largest k).
    pub queries_per_sec: f64,
}

/// Retrieves the top `max(ks)` documents for each question (the question text is the query)
/// and reports recall of the gold titles ([`QaExample::gold_titles`]) at each k.
pub fn recall_at_k(
    index: &dyn Retriever,
    examples: &[QaExample],
    ks: &[usize],
    progress: bool,
) -> Result<RecallReport> {
    let kmax = ks.iter().copied().max().unwrap_or(0);
    let mut sums = vec![0.0f64; ks.len()];
    let mut n = 0usize;
    let none = HashSet::new();
    let bar = Progress::new(progress, examples.len() as u64, "retrieving");
    let start = Instant::now();
    for q in examples {
        bar.inc(1);
        let gold = q.gold_titles();
        if gold.is_empty() {
            continue;
        }
        n += 1;
        let hits = index.retrieve(&q.question, kmax, &none)?;
        for (s, &k) in sums.iter_mut().zip(ks) {
            let titles: HashSet<&str> = hits.iter().take(k).map(|h| h.title.as_str()).collect();
            let found = gold
                .iter()
                .filter(|g| titles.contains(String::as_str(g)))
                .count();
            *s += found as f64 / gold.len() as f64;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    bar.finish_and_clear();
    Ok(RecallReport {
        questions: n,
        recall: ks
            .iter()
            .zip(&sums)
            .map(|(&k, &s)| (k, if n == 0 { 0.0 } else { s / n as f64 }))
            .collect(),
        queries_per_sec: n as f64 / secs.max(f64::EPSILON),
    })
}
