//! `steper-run index`: build a BM25 index from a corpus or from the paragraphs of QA files.

use std::path::PathBuf;

use anyhow::Context;
use steper_runtime::data::{corpus_from_qa, read_corpus, read_qa, ReadOptions};
use steper_runtime::retrieval::{build_index, IndexOptions};

/// Arguments of `index`.
#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("source").required(true).args(["corpus", "from_qa"])))]
pub struct Args {
    /// Corpus JSONL (`{"id","title","text"}` per line).
    #[arg(long)]
    corpus: Option<PathBuf>,
    /// QA files whose paragraphs (deduplicated by title + text) make the corpus (any format
    /// `data convert` reads; plain, .gz or .zst).
    #[arg(long, num_args = 1..)]
    from_qa: Vec<PathBuf>,
    /// Output index directory (replaced if it holds a steper-run index).
    #[arg(long)]
    out: PathBuf,
    /// Skip malformed lines (and report how many) instead of stopping at the first.
    #[arg(long)]
    skip_bad: bool,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

/// Builds the index and prints documents and docs/s.
pub fn run(a: Args) -> anyhow::Result<()> {
    let opts = ReadOptions {
        skip_bad: a.skip_bad,
    };
    let mut skipped = 0;
    let (docs, source) = if let Some(corpus) = &a.corpus {
        let c = read_corpus(corpus, opts)?;
        super::ask::report_skipped(corpus, &c.skipped);
        skipped += c.skipped.len();
        (c.rows, corpus.clone())
    } else {
        let mut qa = Vec::new();
        for f in &a.from_qa {
            let l = read_qa(f, opts)?;
            super::ask::report_skipped(f, &l.skipped);
            skipped += l.skipped.len();
            qa.extend(l.rows);
        }
        (corpus_from_qa(&qa), a.from_qa[0].clone())
    };
    let stats = build_index(&docs, &a.out, &source, IndexOptions { progress: !a.json })
        .with_context(|| format!("building the index in {}", a.out.display()))?;
    if a.json {
        let mut v = serde_json::to_value(&stats)?;
        v["skipped_lines"] = serde_json::json!(skipped);
        println!("{v}");
    } else {
        println!(
            "indexed {} documents into {} in {:.2} s ({:.0} docs/s){}",
            stats.docs,
            stats.path.display(),
            stats.seconds,
            stats.docs_per_sec,
            if skipped > 0 {
                format!("; skipped {skipped} malformed lines")
            } else {
                String::new()
            }
        );
    }
    Ok(())
}
