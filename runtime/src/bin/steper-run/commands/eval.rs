//! `steper-run eval`: the loop over a QA file, per-question records and a summary.

use std::path::PathBuf;

use steper_runtime::data::{read_qa, ReadOptions};
use steper_runtime::eval::{evaluate_parallel, EvalOptions};

/// Arguments of `eval`.
#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    engine: super::ask::EngineArgs,
    /// QA file: the project's QA JSONL or any format `data convert` reads (HotpotQA, 2Wiki,
    /// MuSiQue, FlashRAG, IRCoT); plain, .gz or .zst.
    #[arg(long)]
    data: PathBuf,
    /// Evaluate only the first N questions.
    #[arg(long)]
    limit: Option<usize>,
    /// Per-question records (JSONL); the summary goes beside it as `<out>.summary.json`.
    #[arg(long)]
    out: PathBuf,
    /// Questions in flight at once: their decode steps run as one batched model call (prefill
    /// stays per question); 1 runs them one after another.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    batch: u64,
    /// Questions answered at once on their own threads and model sessions, each worker with
    /// `--batch` questions in flight; the cores are split between them unless `--threads` is set.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    workers: u64,
    /// Skip malformed lines of the data file.
    #[arg(long)]
    skip_bad: bool,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
}

/// Runs the evaluation and prints the summary.
pub fn run(a: Args) -> anyhow::Result<()> {
    let qa = read_qa(
        &a.data,
        ReadOptions {
            skip_bad: a.skip_bad,
        },
    )?;
    super::ask::report_skipped(&a.data, &qa.skipped);
    let workers = usize::try_from(a.workers)?;
    let (engine, opts) = a.engine.engine_for_workers(workers)?;
    let (summary, _) = evaluate_parallel(
        &engine,
        &qa.rows,
        &opts,
        &EvalOptions {
            limit: a.limit,
            progress: !a.json,
        },
        Some(&a.out),
        usize::try_from(a.batch)?,
        workers,
    )?;
    let mut v = serde_json::to_value(&summary)?;
    v["backend"] = serde_json::to_value(engine.info())?;
    v["kv_reuse"] = serde_json::json!(opts.kv_reuse);
    v["prompt_lookup"] = serde_json::json!(opts.prompt_lookup);
    v["framework"] = serde_json::json!(opts.loop_options.framework);
    v["demos"] = serde_json::json!(a.engine.demos);
    v["batch"] = serde_json::json!(a.batch);
    v["workers"] = serde_json::json!(a.workers);
    v["skipped_lines"] = serde_json::json!(qa.skipped.len());
    let mut summary_path = a.out.clone().into_os_string();
    summary_path.push(".summary.json");
    let summary_path = PathBuf::from(summary_path);
    steper_fsutil::write_atomic(&summary_path, serde_json::to_string_pretty(&v)?.as_bytes())?;
    if a.json {
        println!("{v}");
    } else {
        println!(
            "{} questions: EM {:.3}  F1 {:.3}  Acc {:.3}  mean steps {:.2}  ({} errors)",
            summary.questions,
            summary.em,
            summary.f1,
            summary.acc,
            summary.mean_steps,
            summary.errors
        );
        println!(
            "{:.3} questions/s (batch {}, {} worker(s)), {:.1} tokens/s; prefilled {} tokens, reused {} (ratio {:.2})",
            summary.questions_per_sec,
            a.batch,
            a.workers,
            summary.tokens_per_sec,
            summary.prefilled_tokens,
            summary.reused_tokens,
            summary.reuse_ratio
        );
        println!(
            "records: {}\nsummary: {}",
            a.out.display(),
            summary_path.display()
        );
    }
    Ok(())
}
