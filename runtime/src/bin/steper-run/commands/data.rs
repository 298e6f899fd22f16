//! `steper-run data`: dataset files. `data convert` reads a QA file in any format the runtime
//! knows and writes it in the project's QA schema.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use steper_runtime::data::compress::Compression;
use steper_runtime::data::{read_qa_file, QaFormat, ReadOptions};

/// Arguments of `data`.
#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Subcommand)]
enum Command {
    /// Convert a QA file into the project's QA JSONL. Reads HotpotQA's and 2WikiMultiHopQA's
    /// official JSON, MuSiQue's JSONL, FlashRAG's JSONL, IRCoT's processed files and the project's
    /// own schema; one JSON array or JSONL; plain, .gz or .zst.
    Convert(ConvertArgs),
}

/// Arguments of `data convert`.
#[derive(clap::Args)]
struct ConvertArgs {
    /// The input's format; `auto` tells it by the keys of the first record.
    #[arg(long, default_value = "auto", value_parser = ["auto", "steper", "hotpotqa", "2wiki", "musique", "flashrag", "ircot"])]
    from: String,
    /// The QA file to read.
    input: PathBuf,
    /// Output QA JSONL (written atomically; gzip when the name ends in .gz, Zstandard in .zst).
    #[arg(long)]
    out: PathBuf,
    /// Skip malformed records (and report them) instead of stopping at the first.
    #[arg(long)]
    skip_bad: bool,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
}

/// Runs a `data` subcommand.
pub fn run(a: Args) -> anyhow::Result<()> {
    match a.command {
        Command::Convert(c) => convert(c),
    }
}

fn convert(a: ConvertArgs) -> anyhow::Result<()> {
    let format = match a.from.as_str() {
        "auto" => None,
        name => Some(name.parse::<QaFormat>()?),
    };
    let file = read_qa_file(
        &a.input,
        format,
        ReadOptions {
            skip_bad: a.skip_bad,
        },
    )?;
    let mut bytes = Vec::new();
    for q in &file.rows {
        serde_json::to_writer(&mut bytes, q)?;
        bytes.push(b'\n');
    }
    let bytes = match Compression::from_extension(&a.out) {
        Compression::None => bytes,
        Compression::Gzip => {
            let mut enc = flate2::GzBuilder::new().write(Vec::new(), flate2::Compression::best());
            enc.write_all(&bytes)?;
            enc.finish()?
        }
        Compression::Zstd => ruzstd::encoding::compress_to_vec(
            bytes.as_slice(),
            ruzstd::encoding::CompressionLevel::Fastest,
        ),
    };
    steper_fsutil::write_atomic(&a.out, &bytes)
        .with_context(|| format!("writing {}", a.out.display()))?;
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "input": a.input,
                "output": a.out,
                "format": file.format.name(),
                "records": file.rows.len(),
                "skipped_records": file.skipped.len(),
                "skipped_supporting_facts": file.skipped_supporting,
            })
        );
    } else {
        for (at, msg) in file.skipped.iter().take(5) {
            eprintln!("  {}: {at}: {msg}", a.input.display());
        }
        println!(
            "{}: {} questions read as {}, written to {}{}{}",
            a.input.display(),
            file.rows.len(),
            file.format,
            a.out.display(),
            if file.skipped.is_empty() {
                String::new()
            } else {
                format!("; skipped {} malformed records", file.skipped.len())
            },
            if file.skipped_supporting == 0 {
                String::new()
            } else {
                format!(
                    "; {} supporting facts point past their paragraph's sentences (skipped)",
                    file.skipped_supporting
                )
            },
        );
    }
    Ok(())
}
