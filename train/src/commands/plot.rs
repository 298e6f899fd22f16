//! `steper-train plot`.

use std::path::PathBuf;

use anyhow::Result;
use steper_train::plot::{plot_log, PlotOptions, DEFAULT_SIZE};

/// Arguments of `plot`.
#[derive(clap::Args)]
pub struct Args {
    /// A `train_log.jsonl` written by `steper-train fit` (or the run directory holding it).
    #[arg(long)]
    log: PathBuf,
    /// Output directory for losses.png and sigma.png.
    #[arg(long)]
    out: PathBuf,
    /// Moving-average window drawn over the per-step losses (1: raw only).
    #[arg(long, default_value_t = 20)]
    smooth: usize,
    /// Width of each chart in pixels.
    #[arg(long, default_value_t = DEFAULT_SIZE.0)]
    width: u32,
    /// Height of each chart in pixels.
    #[arg(long, default_value_t = DEFAULT_SIZE.1)]
    height: u32,
    /// Title prefix (e.g. the run's name).
    #[arg(long)]
    title: Option<String>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

/// Writes the charts.
pub fn run(a: Args) -> Result<()> {
    let log = if a.log.is_dir() {
        a.log.join("train_log.jsonl")
    } else {
        a.log
    };
    let opts = PlotOptions {
        size: (a.width, a.height),
        smooth: a.smooth,
        title: a.title,
    };
    let report = plot_log(&log, &a.out, &opts)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "{} steps → {} and {}; final σ init/expand/aggregate {:.3}/{:.3}/{:.3}{}",
            report.steps,
            report.losses_png.display(),
            report.sigma_png.display(),
            report.final_sigma[0],
            report.final_sigma[1],
            report.final_sigma[2],
            if report.font.is_none() {
                " (no TrueType font found: charts have no text; set STEPER_PLOT_FONT)"
            } else {
                ""
            }
        );
    }
    Ok(())
}
