//! `steper-run`: the STEPER runtime command line. Thin: argument parsing and dispatch; the work
//! is in `steper_runtime`.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

mod commands;

use clap::{Parser, Subcommand};

/// Run STEPER students: retrieval, multi-step reasoning, evaluation and benchmarks.
#[derive(Parser)]
#[command(name = "steper-run", version, about)]
struct Cli {
    /// The ONNX Runtime library (libonnxruntime.so) of the ort backend. Default: ORT_DYLIB_PATH,
    /// else `.cache/onnxruntime/libonnxruntime.so.VERSION` (made by scripts/install-ort.sh) in
    /// the current directory or two levels above this executable (a workspace's target/*/).
    #[arg(long, global = true, value_name = "PATH")]
    ort_library: Option<std::path::PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the runtime version and the ONNX Runtime library in use.
    Version(commands::version::Args),
    /// Build a BM25 index from a corpus or from the paragraphs of QA files.
    Index(commands::index::Args),
    /// Recall of gold titles in the top k of an index.
    RetrievalEval(commands::retrieval_eval::Args),
    /// Answer one question with the multi-step loop and show the trace.
    Ask(commands::ask::Args),
    /// Evaluate the loop over a QA file (records + summary).
    Eval(commands::eval::Args),
    /// Compare evaluation runs on the same questions: paired differences with bootstrap
    /// intervals and sign tests, per dataset and pooled.
    Compare(commands::compare::Args),
    /// Prefill / decode tokens per second of exports on ort and tract.
    BenchDecode(commands::bench::Args),
    /// Serve /v1/reason, /v1/completions (OpenAI-compatible), /healthz and /metrics over HTTP.
    Serve(commands::serve::Args),
    /// Load-test a server: requests/s, p50/p95/p99 latency, drift and peak RSS per client count.
    BenchServe(commands::bench_serve::Args),
    /// Dataset files: convert HotpotQA, 2WikiMultiHopQA, MuSiQue, FlashRAG and IRCoT files into
    /// the project's QA schema.
    Data(commands::data::Args),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // Every ort session of this process is built from options that name no library, so they
    // read the variable; set once, before any thread starts.
    steper_runtime::backend::set_library_env(cli.ort_library);
    let result = match cli.command {
        Command::Version(a) => commands::version::run(a),
        Command::Index(a) => commands::index::run(a),
        Command::RetrievalEval(a) => commands::retrieval_eval::run(a),
        Command::Ask(a) => commands::ask::run(a),
        Command::Eval(a) => commands::eval::run(a),
        Command::Compare(a) => commands::compare::run(a),
        Command::BenchDecode(a) => commands::bench::run(a),
        Command::Serve(a) => commands::serve::run(a),
        Command::BenchServe(a) => commands::bench_serve::run(a),
        Command::Data(a) => commands::data::run(a),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::from(1)
        }
    }
}
