//! `steper-train init-student`.

use std::path::PathBuf;

use anyhow::Result;
use steper_train::student::{corpus_texts, init_student, StudentSpec};

/// Arguments of `init-student`.
#[derive(clap::Args)]
pub struct Args {
    /// Corpus (JSONL) whose passages train the tokenizer.
    #[arg(long)]
    corpus: PathBuf,
    /// QA files whose questions and answers also train the tokenizer.
    #[arg(long)]
    qa: Vec<PathBuf>,
    /// Output checkpoint directory.
    #[arg(long)]
    out: PathBuf,
    /// Tokenizer vocabulary size.
    #[arg(long, default_value_t = 2048)]
    vocab_size: usize,
    /// Layers.
    #[arg(long, default_value_t = 4)]
    layers: usize,
    /// Hidden size.
    #[arg(long, default_value_t = 256)]
    hidden: usize,
    /// Query heads.
    #[arg(long, default_value_t = 8)]
    heads: usize,
    /// Key/value heads.
    #[arg(long, default_value_t = 2)]
    kv_heads: usize,
    /// MLP width.
    #[arg(long, default_value_t = 640)]
    intermediate: usize,
    /// Context length.
    #[arg(long, default_value_t = 1024)]
    context: usize,
    /// Seed of the weights.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

/// Trains the tokenizer and writes the random student.
pub fn run(a: Args) -> Result<()> {
    let texts = corpus_texts(&a.corpus, &a.qa)?;
    let spec = StudentSpec {
        vocab_size: a.vocab_size,
        layers: a.layers,
        hidden: a.hidden,
        heads: a.heads,
        kv_heads: a.kv_heads,
        intermediate: a.intermediate,
        context: a.context,
        seed: a.seed,
    };
    let cfg = init_student(&texts, &spec, &a.out)?;
    println!(
        "student → {}: vocab {}, {} layers, hidden {}, {:.2}M parameters",
        a.out.display(),
        cfg.vocab_size,
        cfg.num_hidden_layers,
        cfg.hidden_size,
        cfg.num_parameters() as f64 / 1e6
    );
    Ok(())
}
