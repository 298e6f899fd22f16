//! `steper-run`: the STEPER runtime command line. Thin: argument parsing and dispatch; the work
//! is in `steper_runtime`.

mod commands;

use clap::{Parser, Subcommand};

/// Run STEPER students: retrieval, multi-step reasoning, evaluation and benchmarks.
#[derive(Parser)]
#[command(name = "steper-run", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the runtime version and the ONNX Runtime library in use.
    Version(commands::version::Args),
    /// Prefill / decode tokens per second of exports on ort and tract.
    BenchDecode(commands::bench::Args),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Version(a) => commands::version::run(a),
        Command::BenchDecode(a) => commands::bench::run(a),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::from(1)
        }
    }
}
