//! `steper-train distill`.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use steper_runtime::data::{read_qa, ReadOptions};
use steper_runtime::reasoning::LoopOptions;
use steper_runtime::retrieval::Bm25Index;
use steper_train::distill::{distill, DistillOptions, Filter};
use steper_train::teacher::{CandleTeacher, GoldTeacher};

/// Arguments of `distill`.
#[derive(clap::Args)]
pub struct Args {
    /// `gold` (annotation-derived) or `checkpoint:DIR` (a local Llama-family checkpoint in candle).
    #[arg(long)]
    teacher: String,
    /// QA questions (JSONL).
    #[arg(long)]
    data: PathBuf,
    /// BM25 index (`steper-run index`).
    #[arg(long)]
    index: PathBuf,
    /// Output directory (traces.jsonl, stepwise.jsonl, vanilla.jsonl, summary.json); a run
    /// there is resumed.
    #[arg(long)]
    out: PathBuf,
    /// Answer filter for keeping a question's records.
    #[arg(long, value_enum, default_value_t = Filter::Em)]
    filter: Filter,
    /// Also write Vanilla-KD records.
    #[arg(long)]
    vanilla: bool,
    /// Only the first N questions.
    #[arg(long)]
    limit: Option<usize>,
    /// Passages per step.
    #[arg(long, default_value_t = 4)]
    top_k: usize,
    /// Maximum steps.
    #[arg(long, default_value_t = 5)]
    max_steps: usize,
    /// Student checkpoint whose tokenizer and context the gold teacher's prompts must fit.
    #[arg(long)]
    fit_student: Option<PathBuf>,
    /// Skip malformed question lines (counted).
    #[arg(long)]
    skip_bad: bool,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
}

/// Runs the teacher over the questions.
pub fn run(a: Args) -> Result<()> {
    let mut qs = read_qa(
        &a.data,
        ReadOptions {
            skip_bad: a.skip_bad,
        },
    )?
    .rows;
    if let Some(n) = a.limit {
        qs.truncate(n);
    }
    let index = Bm25Index::open(&a.index)?;
    let opts = DistillOptions {
        loop_opts: LoopOptions {
            top_k: a.top_k,
            max_steps: a.max_steps,
            ..Default::default()
        },
        filter: a.filter,
        vanilla: a.vanilla,
        stop_after: None,
    };
    let summary = if a.teacher == "gold" {
        let mut t = GoldTeacher::new();
        if let Some(s) = &a.fit_student {
            let cfg = steper_models::LlamaConfig::from_file(&s.join("config.json"))?;
            let tok = steper_models::load_tokenizer(&s.join("tokenizer.json"), cfg.vocab_size)?;
            t = t.with_budget(tok, cfg.max_position_embeddings);
        }
        distill(
            &qs,
            &index,
            &mut t,
            |t, q| t.set_example(q),
            &opts,
            &a.out,
            !a.json,
        )?
    } else if let Some(dir) = a.teacher.strip_prefix("checkpoint:") {
        let ck =
            steper_models::Checkpoint::load(std::path::Path::new(dir), DType::F32, &Device::Cpu)
                .with_context(|| format!("teacher checkpoint {dir}"))?;
        let mut t = CandleTeacher::new(ck.model()?, ck.tokenizer()?, format!("checkpoint:{dir}"));
        distill(&qs, &index, &mut t, |_, _| {}, &opts, &a.out, !a.json)?
    } else {
        bail!("--teacher must be `gold` or `checkpoint:DIR`, got {:?} (the OpenAI-compatible teacher is not built yet)", a.teacher);
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        println!(
            "{} questions, {} passed ({:.1}%), records init/expand/aggregate {}/{}/{}, vanilla {}, mean steps {:.2}, teacher {:.1} tok/s → {}",
            summary.questions, summary.passed, 100.0 * summary.pass_rate, summary.records[0], summary.records[1], summary.records[2],
            summary.vanilla_records, summary.mean_steps, summary.teacher_tokens_per_sec, a.out.display()
        );
    }
    Ok(())
}
