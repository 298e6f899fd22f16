//! `steper-run ask`: answer one question and show the trace.

use std::path::{Path, PathBuf};

use steper_runtime::{BackendKind, Engine, OrtOptions, Reasoning};

/// Which backend runs the model.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum Backend {
    /// ONNX Runtime (CPU execution provider).
    Ort,
    /// tract (pure Rust).
    Tract,
}

impl Backend {
    /// The library's backend value.
    pub fn kind(self, threads: Option<usize>) -> BackendKind {
        match self {
            Backend::Ort => BackendKind::Ort(OrtOptions {
                intra_threads: threads,
                ..OrtOptions::default()
            }),
            Backend::Tract => BackendKind::Tract,
        }
    }
}

/// Model, index and loop flags shared by `ask` and `eval`.
#[derive(clap::Args)]
pub struct EngineArgs {
    /// Export directory (steper.json, model.onnx, tokenizer.json).
    #[arg(long)]
    pub model: PathBuf,
    /// Index directory written by `steper-run index`.
    #[arg(long)]
    pub index: PathBuf,
    /// Backend.
    #[arg(long, value_enum, default_value = "ort")]
    pub backend: Backend,
    /// ONNX Runtime intra-op threads (default: one per core).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Prefill every step from scratch instead of reusing the KV cache of the common prefix.
    #[arg(long)]
    pub no_kv_reuse: bool,
    /// Maximum steps (default: the model's manifest).
    #[arg(long)]
    pub max_steps: Option<usize>,
    /// Passages retrieved per step (default: the model's manifest).
    #[arg(long)]
    pub top_k: Option<usize>,
}

impl EngineArgs {
    /// Loads the engine and the options the flags ask for.
    pub fn engine(&self) -> anyhow::Result<(Engine, steper_runtime::ReasonOptions)> {
        let engine = Engine::builder()
            .model_dir(&self.model)
            .backend(self.backend.kind(self.threads))
            .index(&self.index)
            .build()?;
        let mut opts = engine.default_options();
        opts.kv_reuse = !self.no_kv_reuse;
        if let Some(n) = self.max_steps {
            opts.loop_options.max_steps = n;
        }
        if let Some(k) = self.top_k {
            opts.loop_options.top_k = k;
        }
        opts.loop_options.validate()?;
        Ok((engine, opts))
    }
}

/// Arguments of `ask`.
#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    engine: EngineArgs,
    /// Print the answer and trace as JSON.
    #[arg(long)]
    json: bool,
    /// The question.
    question: String,
}

/// Answers the question and prints the trace.
pub fn run(a: Args) -> anyhow::Result<()> {
    let (engine, opts) = a.engine.engine()?;
    let r = engine.reason(&a.question, &opts)?;
    if a.json {
        println!(
            "{}",
            serde_json::json!({"backend": engine.info(), "reasoning": r})
        );
    } else {
        print_trace(&r);
        let i = engine.info();
        println!("(backend {} on {})", i.backend, i.providers.join(", "));
    }
    Ok(())
}

/// Prints a readable trace: steps, passages, confidence, answer.
pub fn print_trace(r: &Reasoning) {
    println!("Q: {}", r.question);
    for s in &r.steps {
        println!(
            "\nstep {} ({:?}{}){}",
            s.step,
            s.stage,
            if s.forced { ", forced" } else { "" },
            if s.truncated {
                format!(
                    " [prompt cut to fit: {} words, {} passages dropped]",
                    s.words_dropped, s.passages_dropped
                )
            } else {
                String::new()
            }
        );
        if !s.query.is_empty() {
            println!("  query: {}", s.query);
        }
        for p in &s.retrieved {
            println!("  + [{:6.2}] {} ({})", p.score, p.title, p.id);
        }
        println!("  > {}", s.sentence);
        println!(
            "  {} tokens, p̄ {:.3}, H̄ {:.3} nats; prefill {} (+{} reused) {:.1} ms, decode {:.1} ms",
            s.new_tokens,
            s.mean_prob.unwrap_or(f64::NAN),
            s.mean_entropy.unwrap_or(f64::NAN),
            s.prefilled_tokens,
            s.reused_tokens,
            s.prefill_ms,
            s.decode_ms
        );
    }
    println!(
        "\nanswer: {}{}",
        r.answer,
        if r.forced { " (forced)" } else { "" }
    );
}

/// Tells stderr about skipped malformed lines.
pub fn report_skipped(path: &Path, skipped: &[(usize, String)]) {
    if skipped.is_empty() {
        return;
    }
    eprintln!(
        "{}: skipped {} malformed line(s)",
        path.display(),
        skipped.len()
    );
    for (line, msg) in skipped.iter().take(5) {
        eprintln!("  {}:{line}: {msg}", path.display());
    }
}
