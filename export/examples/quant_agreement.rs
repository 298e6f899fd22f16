//! Greedy agreement of a quantized export with the fp32 export on HotpotQA prompts (ONNX
//! Runtime CPU), printed as JSON:
//!
//! ```text
//! cargo run --release -p steper-export --example quant_agreement -- \
//!     --reference fp32-export --candidate int4-export \
//!     --data data/hotpotqa_dev500.jsonl.gz --prompts 8 --new-tokens 256 --threads 2
//! ```
//!
//! Prompt i renders question i of the file with its first `--passages` paragraphs through the
//! runtime's template (`steper_runtime::prompt::render`, the loop's first step).

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use steper_export::verify::greedy_agreement;
use steper_runtime::backend::{load_model, BackendKind, OrtOptions};
use steper_runtime::data::{read_qa, PromptPassage, ReadOptions};

#[derive(Parser)]
struct Args {
    /// The float export (reference).
    #[arg(long)]
    reference: PathBuf,
    /// The quantized export.
    #[arg(long)]
    candidate: PathBuf,
    /// QA dataset (JSONL).
    #[arg(long)]
    data: PathBuf,
    /// Questions used (the first N).
    #[arg(long, default_value_t = 8)]
    prompts: usize,
    /// Paragraphs per prompt.
    #[arg(long, default_value_t = 4)]
    passages: usize,
    /// Greedy tokens per prompt.
    #[arg(long, default_value_t = 256)]
    new_tokens: usize,
    /// ONNX Runtime intra-op threads.
    #[arg(long)]
    threads: Option<usize>,
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let kind = BackendKind::Ort(OrtOptions::default().with_intra_threads(a.threads));
    let r = load_model(&a.reference, &kind).with_context(|| a.reference.display().to_string())?;
    let c = load_model(&a.candidate, &kind).with_context(|| a.candidate.display().to_string())?;
    let qa = read_qa(&a.data, ReadOptions::default())?;
    let cap = r.manifest.loop_defaults.passage_word_cap;
    let mut prompts = Vec::new();
    for q in qa.rows.iter().take(a.prompts) {
        let passages: Vec<PromptPassage> = q
            .paragraphs
            .iter()
            .take(a.passages)
            .map(|p| PromptPassage {
                title: p.title.clone(),
                text: p.text.clone(),
            })
            .collect();
        let text = steper_runtime::prompt::render(&q.question, &passages, &[], cap);
        let enc = r
            .tokenizer
            .encode(text.as_str(), true)
            .map_err(|e| anyhow::anyhow!("tokenizer: {e}"))?;
        prompts.push(enc.get_ids().to_vec());
    }
    let rep = greedy_agreement(
        r.generator.as_ref(),
        c.generator.as_ref(),
        &prompts,
        a.new_tokens,
    )?;
    println!(
        "{}",
        serde_json::to_string_pretty(&serde_json::json!({
            "reference": a.reference,
            "candidate": a.candidate,
            "quantization": c.manifest.quantization,
            "agreement": rep,
        }))?
    );
    Ok(())
}
