//! `steper-train init-student`.

use std::path::PathBuf;

use anyhow::Result;
use steper_train::student::{
    corpus_texts, init_student_of, init_student_with_tokenizer, StudentSpec, EOS_TOKEN,
};

/// Arguments of `init-student`.
#[derive(clap::Args)]
pub struct Args {
    /// Corpus (JSONL) whose passages train the tokenizer.
    #[arg(long, required_unless_present = "tokenizer")]
    corpus: Option<PathBuf>,
    /// Use this tokenizer.json (plain, .gz or .zst) instead of training one: a random model
    /// shaped like a released one, e.g. SmolLM2's or Qwen2.5's shape for benchmarks.
    #[arg(long, conflicts_with_all = ["corpus", "qa"])]
    tokenizer: Option<PathBuf>,
    /// The end token (with --tokenizer; a trained tokenizer's is <|endoftext|>).
    #[arg(long, default_value = EOS_TOKEN, requires = "tokenizer")]
    eos_token: String,
    /// Architecture family: llama or qwen2 (q/k/v biases, RoPE base 1e6).
    #[arg(long, default_value = "llama")]
    model_type: String,
    /// QA files whose questions and answers also train the tokenizer.
    #[arg(long)]
    qa: Vec<PathBuf>,
    /// Output checkpoint directory.
    #[arg(long)]
    out: PathBuf,
    /// Tokenizer vocabulary size; with --tokenizer, the embedding's rows (default: the
    /// tokenizer's size; larger pads, as released models do).
    #[arg(long)]
    vocab_size: Option<usize>,
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
    let spec = StudentSpec {
        vocab_size: a
            .vocab_size
            .unwrap_or(if a.tokenizer.is_some() { 0 } else { 2048 }),
        layers: a.layers,
        hidden: a.hidden,
        heads: a.heads,
        kv_heads: a.kv_heads,
        intermediate: a.intermediate,
        context: a.context,
        seed: a.seed,
    };
    let cfg = match (&a.tokenizer, &a.corpus) {
        (Some(t), _) => init_student_with_tokenizer(t, &spec, &a.model_type, &a.eos_token, &a.out)?,
        (None, Some(c)) => init_student_of(&corpus_texts(c, &a.qa)?, &spec, &a.model_type, &a.out)?,
        (None, None) => anyhow::bail!("init-student needs --corpus or --tokenizer"),
    };
    println!(
        "{} student → {}: vocab {}, {} layers, hidden {}, {:.2}M parameters",
        cfg.model_type,
        a.out.display(),
        cfg.vocab_size,
        cfg.num_hidden_layers,
        cfg.hidden_size,
        cfg.num_parameters() as f64 / 1e6
    );
    Ok(())
}
