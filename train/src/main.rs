//! `steper-train`: import models, generate with them, build step-wise data and train students.
//! Thin: clap arguments and dispatch; the work is in `steper_train` and `steper_models`.

mod commands;

use clap::{Parser, Subcommand};

/// STEPER training tools.
#[derive(Parser)]
#[command(name = "steper-train", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Import a llama.cpp GGUF file (architecture llama) as an HF-style checkpoint directory.
    Import(commands::import::Args),
    /// Generate a continuation of a prompt with a checkpoint (candle, KV cache).
    Generate(commands::generate::Args),
    /// Generate a synthetic multi-hop world (corpus + 2/3/4-hop questions with gold chains).
    Synth(commands::synth::Args),
    /// Train a student on step-wise records (σ-weighted STEPER loss, uniform, or vanilla-KD).
    Fit(commands::fit::Args),
    /// Run a teacher through the reasoning loop and write step-wise records.
    Distill(commands::distill::Args),
    /// Create a from-scratch student: a BPE tokenizer trained on the data and random weights.
    InitStudent(commands::init_student::Args),
    /// Draw PNG charts of a run's stage losses and σ from train_log.jsonl.
    Plot(commands::plot::Args),
    /// Benchmark training throughput (tokens/s, peak memory) on fixed-shape random batches; prints JSON.
    BenchFit(commands::bench_fit::Args),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Import(a) => commands::import::run(a),
        Command::Generate(a) => commands::generate::run(a),
        Command::Synth(a) => commands::synth::run(a),
        Command::Fit(a) => commands::fit::run(a),
        Command::Distill(a) => commands::distill::run(a),
        Command::InitStudent(a) => commands::init_student::run(a),
        Command::Plot(a) => commands::plot::run(a),
        Command::BenchFit(a) => commands::bench_fit::run(a),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::from(1)
        }
    }
}
