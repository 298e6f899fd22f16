//! `steper-run retrieval-eval`: recall of gold titles at k.

use std::path::PathBuf;

use steper_runtime::data::{read_qa, ReadOptions};
use steper_runtime::retrieval::{recall_at_k, Bm25Index};

/// Arguments of `retrieval-eval`.
#[derive(clap::Args)]
pub struct Args {
    /// Index directory.
    #[arg(long)]
    index: PathBuf,
    /// QA file, any format `data convert` reads (gold titles: paragraphs marked
    /// `is_supporting`).
    #[arg(long)]
    data: PathBuf,
    /// Cut-offs, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "2,5,10")]
    k: Vec<usize>,
    /// Skip malformed lines.
    #[arg(long)]
    skip_bad: bool,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

/// Prints recall@k and queries/s.
pub fn run(a: Args) -> anyhow::Result<()> {
    if a.k.is_empty() || a.k.contains(&0) {
        anyhow::bail!("--k: give positive cut-offs, e.g. --k 2,5,10");
    }
    let index = Bm25Index::open(&a.index)?;
    let qa = read_qa(
        &a.data,
        ReadOptions {
            skip_bad: a.skip_bad,
        },
    )?;
    super::ask::report_skipped(&a.data, &qa.skipped);
    let report = recall_at_k(&index, &qa.rows, &a.k, !a.json)?;
    if a.json {
        let recall: serde_json::Map<String, serde_json::Value> = report
            .recall
            .iter()
            .map(|(k, r)| (format!("recall@{k}"), serde_json::json!(r)))
            .collect();
        println!(
            "{}",
            serde_json::json!({
                "index": a.index, "data": a.data, "documents": index.num_docs(),
                "questions": report.questions, "recall": recall,
                "queries_per_sec": report.queries_per_sec,
                "skipped_lines": qa.skipped.len(),
            })
        );
    } else {
        println!(
            "{} questions, {} documents",
            report.questions,
            index.num_docs()
        );
        for (k, r) in &report.recall {
            println!("recall@{k:<3} {r:.3}");
        }
        println!("{:.0} queries/s", report.queries_per_sec);
    }
    Ok(())
}
