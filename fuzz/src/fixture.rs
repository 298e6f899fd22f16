//! The files the checkpoint and ONNX targets load their fuzzed input beside: a tiny checkpoint
//! (its `config.json`, weights and a sharded copy of them) and its tract-ready export.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::{DType, Device};
use steper_models::weights::SAFETENSORS_INDEX_FILE;
use steper_models::Weights;
use steper_runtime::Manifest;
use steper_train::student::{init_student, StudentSpec};

/// Largest shard of the sharded copy of the weights (bytes): small enough for several shards.
const SHARD_BYTES: usize = 16 * 1024;

/// The tiny checkpoint's shape: one layer, hidden 16, a 300-token vocabulary.
fn spec() -> StudentSpec {
    StudentSpec {
        vocab_size: 300,
        layers: 1,
        hidden: 16,
        heads: 2,
        kv_heads: 1,
        intermediate: 32,
        context: 64,
        seed: 0,
    }
}

/// Texts the tiny tokenizer is trained on.
const TEXTS: [&str; 3] = [
    "Wikipedia Title: Fuzz\nThe fuzzer feeds every parser bytes it did not expect.",
    "Wikipedia Title: Parser\nA parser answers bad input with an error naming the field.",
    "So the answer is: yes.",
];

/// The fixture on disk.
#[derive(Debug, Clone)]
pub struct Fixture {
    /// The checkpoint folder (`config.json`, `model.safetensors`, `tokenizer.json`).
    pub checkpoint: PathBuf,
    /// The shards of the sharded copy of its weights.
    pub shards: Vec<PathBuf>,
    /// The sharded copy's `model.safetensors.index.json`.
    pub index: PathBuf,
    /// The export folder (`model.onnx`, `steper.json`, `genai_config.json`, `tokenizer.json`).
    pub export: PathBuf,
    /// The export's manifest.
    pub manifest: Manifest,
}

impl Fixture {
    /// Makes the fixture in `dir` (replacing what is there).
    pub fn make(dir: &Path) -> Result<Fixture> {
        if dir.exists() {
            std::fs::remove_dir_all(dir).with_context(|| format!("clearing {}", dir.display()))?;
        }
        let checkpoint = dir.join("checkpoint");
        let texts: Vec<String> = TEXTS.iter().map(|s| s.to_string()).collect();
        init_student(&texts, &spec(), &checkpoint).context("making the tiny checkpoint")?;
        let sharded = dir.join("sharded");
        Weights::load_dir(&checkpoint, DType::F32, &Device::Cpu)?
            .save_dir(&sharded, Some(SHARD_BYTES))
            .context("writing the sharded copy")?;
        let mut shards: Vec<PathBuf> = std::fs::read_dir(&sharded)?
            .map(|e| e.map(|e| e.path()))
            .collect::<std::io::Result<_>>()?;
        shards.retain(|p| p.extension().is_some_and(|x| x == "safetensors"));
        shards.sort();
        let export = dir.join("export");
        steper_export::export(
            &checkpoint,
            &export,
            &steper_export::ExportOptions::default(),
        )
        .context("exporting the tiny checkpoint")?;
        let manifest = Manifest::load(&export.join("steper.json"))?;
        Ok(Fixture {
            checkpoint,
            shards,
            index: sharded.join(SAFETENSORS_INDEX_FILE),
            export,
            manifest,
        })
    }
}
