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

/// candle allocates every intermediate tensor anew. glibc's malloc serves blocks above its
/// mmap threshold with fresh mappings and trims freed heap tops, so each large activation is
/// page-faulted and zeroed in again on every step (~20 % of a SmolLM2 step in
/// `experiments/bench-train`). Raise the threshold to its 64-bit maximum and keep freed memory
/// (trim threshold, top pad), so blocks are reused: +22 % tokens/s on the cached SmolLM2 row
/// there, for ~0.3–0.7 GB more peak RSS.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; called first thing in main, before any
    // other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TOP_PAD, 1 << 30);
    }
}

fn main() -> std::process::ExitCode {
    keep_freed_memory();
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
