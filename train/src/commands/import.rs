//! `steper-train import`.

use std::path::PathBuf;

use anyhow::Result;

/// Arguments of `import`.
#[derive(clap::Args)]
pub struct Args {
    /// The GGUF file (llama architecture; Q4_0, Q4_1, Q5_x, Q8_0, K-quants, F16, BF16 or F32).
    #[arg(long)]
    gguf: PathBuf,
    /// The checkpoint directory to create (must not exist or be empty).
    #[arg(long)]
    out: PathBuf,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

/// Runs the import and prints what was written.
pub fn run(a: Args) -> Result<()> {
    let spinner = indicatif::ProgressBar::new_spinner();
    spinner.set_message(format!("importing {}", a.gguf.display()));
    spinner.enable_steady_tick(std::time::Duration::from_millis(120));
    let t0 = std::time::Instant::now();
    let report = steper_models::gguf::import_gguf(&a.gguf, &a.out);
    spinner.finish_and_clear();
    let report = report?;
    let secs = t0.elapsed().as_secs_f64();
    if a.json {
        let mut v = serde_json::to_value(&report)?;
        v["seconds"] = serde_json::json!(secs);
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!(
            "imported {} ({}) → {}: {} tensors, {:.1}M parameters, vocab {} ({} pre-tokenizer), types {:?}, {secs:.1}s",
            a.gguf.display(),
            report.name.as_deref().unwrap_or("unnamed"),
            a.out.display(),
            report.tensors,
            report.parameters as f64 / 1e6,
            report.vocab_size,
            report.pre_tokenizer,
            report.source_types,
        );
    }
    Ok(())
}
