//! `steper-train synth`.

use std::path::PathBuf;

use anyhow::Result;
use steper_train::synth::{generate_world, SynthConfig};

/// Arguments of `synth`.
#[derive(clap::Args)]
pub struct Args {
    /// Seed of the world.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Output directory: corpus.jsonl, train.jsonl, dev.jsonl, test.jsonl.
    #[arg(long)]
    out: PathBuf,
    /// Number of people.
    #[arg(long, default_value_t = 160)]
    people: usize,
    /// Number of companies.
    #[arg(long, default_value_t = 40)]
    companies: usize,
    /// Number of cities.
    #[arg(long, default_value_t = 40)]
    cities: usize,
    /// Number of countries.
    #[arg(long, default_value_t = 12)]
    countries: usize,
    /// Questions per hop count (2, 3, 4).
    #[arg(long, default_value_t = 200)]
    questions_per_hop: usize,
    /// Share of question chains in dev and in test, each.
    #[arg(long, default_value_t = 0.15)]
    heldout_fraction: f64,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
}

/// Generates and writes the world.
pub fn run(a: Args) -> Result<()> {
    let cfg = SynthConfig {
        seed: a.seed,
        countries: a.countries,
        cities: a.cities,
        companies: a.companies,
        people: a.people,
        questions_per_hop: a.questions_per_hop,
        heldout_fraction: a.heldout_fraction,
    };
    let w = generate_world(&cfg);
    steper_train::synth::write_world(&w, &a.out)?;
    let summary = serde_json::json!({
        "out": a.out, "seed": a.seed, "passages": w.corpus.len(),
        "train": w.train.len(), "dev": w.dev.len(), "test": w.test.len(),
    });
    if a.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        println!(
            "synthetic world (seed {}): {} passages, {} train / {} dev / {} test questions → {}",
            a.seed,
            w.corpus.len(),
            w.train.len(),
            w.dev.len(),
            w.test.len(),
            a.out.display()
        );
    }
    Ok(())
}
