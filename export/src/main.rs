//! `steper-export`: checkpoint → ONNX (KV cache) + manifest files, optionally verified against
//! the candle model on ONNX Runtime and tract. Thin: argument parsing and dispatch.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use steper_export::{export, verify, ExportDtype, ExportOptions, ExternalData};

/// Export a STEPER checkpoint to ONNX with a KV cache.
#[derive(Parser)]
#[command(name = "steper-export", version, about)]
struct Args {
    /// Checkpoint directory (config.json + model.safetensors [+ tokenizer.json]).
    #[arg(long)]
    checkpoint: PathBuf,
    /// Output directory.
    #[arg(long)]
    out: PathBuf,
    /// Weight precision: fp32 or fp16.
    #[arg(long, default_value = "fp32")]
    dtype: String,
    /// ONNX opset (17 or 18).
    #[arg(long, default_value_t = 17)]
    opset: i64,
    /// Always write the weights to model.onnx.data (otherwise only above 2 GB).
    #[arg(long)]
    external_data: bool,
    /// Run the export on ONNX Runtime and tract against the candle model and report parity.
    #[arg(long)]
    verify: bool,
    /// Decode steps checked by --verify (greedy tokens after the prompt).
    #[arg(long, default_value_t = 32)]
    verify_steps: usize,
    /// Prompt used by --verify (tokenized with the checkpoint's tokenizer when present).
    #[arg(long)]
    verify_prompt: Option<String>,
    /// Skip tract in --verify.
    #[arg(long)]
    no_tract: bool,
    /// Print the reports as JSON.
    #[arg(long)]
    json: bool,
}

fn main() -> std::process::ExitCode {
    match run(Args::parse()) {
        Ok(true) => std::process::ExitCode::SUCCESS,
        Ok(false) => std::process::ExitCode::from(2),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::from(1)
        }
    }
}

fn run(a: Args) -> anyhow::Result<bool> {
    let opts = ExportOptions {
        dtype: a.dtype.parse::<ExportDtype>()?,
        opset: a.opset,
        external_data: if a.external_data {
            ExternalData::Always
        } else {
            ExternalData::Auto
        },
    };
    let report = export(&a.checkpoint, &a.out, &opts)
        .with_context(|| format!("exporting {}", a.checkpoint.display()))?;
    if a.json && !a.verify {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else if !a.json {
        eprintln!(
            "wrote {} ({} nodes, {} MB of weights, {}, opset {}, IR {})",
            report.model_file.display(),
            report.nodes,
            report.weight_bytes / 1_000_000,
            report.dtype.as_str(),
            report.opset,
            report.ir_version
        );
    }
    if !a.verify {
        return Ok(true);
    }
    let vopts = verify::VerifyOptions {
        steps: a.verify_steps,
        prompt: a.verify_prompt.clone(),
        tract: !a.no_tract,
        ..verify::VerifyOptions::for_dtype(opts.dtype)
    };
    let v = verify::verify(&a.checkpoint, &a.out, &vopts).context("verifying the export")?;
    if a.json {
        println!("{}", serde_json::json!({"export": report, "verify": v}));
    } else {
        println!("{}", serde_json::to_string_pretty(&v)?);
    }
    Ok(v.pass)
}
