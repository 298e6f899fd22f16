//! `steper-run compare`: paired differences of evaluation runs on the same questions.

use steper_runtime::eval::compare::{compare_files, CompareOptions, RunFiles, DEFAULT_LEVEL};

/// Arguments of `compare`.
#[derive(clap::Args)]
pub struct Args {
    /// Runs, the baseline first: `[LABEL=]FILE[,FILE…]`, the records of `steper-run eval --out`
    /// (plain, .gz or .zst), one file per dataset in the same order for every run. A run without
    /// a label is named by its first file's name (without `.jsonl`).
    #[arg(required = true, num_args = 2.., value_name = "RUN")]
    runs: Vec<String>,
    /// Dataset names, one per file of a run, comma-separated (default: the baseline's file
    /// names without `.jsonl`).
    #[arg(long, value_delimiter = ',', value_name = "NAMES")]
    datasets: Vec<String>,
    /// Paired bootstrap resamples.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    resamples: u64,
    /// Seed of the bootstrap resampling (the same seed gives the same intervals).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Print the comparison as JSON instead of markdown tables.
    #[arg(long)]
    json: bool,
}

/// Reads the runs, compares each with the first and prints the report.
pub fn run(a: Args) -> anyhow::Result<()> {
    let runs = RunFiles::parse_all(&a.runs)?;
    let comparison = compare_files(
        &runs,
        &CompareOptions {
            resamples: usize::try_from(a.resamples)?,
            seed: a.seed,
            level: DEFAULT_LEVEL,
            datasets: a.datasets,
        },
    )?;
    if a.json {
        println!("{}", serde_json::to_string(&comparison)?);
    } else {
        print!("{}", comparison.to_markdown());
    }
    Ok(())
}
