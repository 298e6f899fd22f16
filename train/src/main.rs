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
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Import(a) => commands::import::run(a),
        Command::Generate(a) => commands::generate::run(a),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::from(1)
        }
    }
}
