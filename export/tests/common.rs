//! Fixtures shared by the export tests: a tiny random GQA model, its tokenizer, and the ONNX
//! Runtime library.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Once;

use anyhow::{Context, Result};
use candle_core::Device;
use steper_models::{Checkpoint, LlamaConfig, RopeScaling, Weights};

/// Vocabulary of the tiny model.
pub const VOCAB: usize = 96;

/// Makes sure `ORT_DYLIB_PATH` points at an ONNX Runtime library, installing it with
/// `scripts/install-ort.sh` when unset (never skipping).
pub fn ensure_ort() -> Result<()> {
    static ONCE: Once = Once::new();
    let mut err = None;
    ONCE.call_once(|| {
        if std::env::var_os("ORT_DYLIB_PATH").is_some() {
            return;
        }
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        match std::process::Command::new("bash")
            .arg(root.join("scripts/install-ort.sh"))
            .current_dir(&root)
            .output()
        {
            Ok(o) if o.status.success() => {
                let p = String::from_utf8_lossy(&o.stdout).trim().to_string();
                std::env::set_var("ORT_DYLIB_PATH", p);
            }
            Ok(o) => {
                err = Some(format!(
                    "install-ort.sh failed: {}",
                    String::from_utf8_lossy(&o.stderr)
                ))
            }
            Err(e) => err = Some(format!("cannot run install-ort.sh: {e}")),
        }
    });
    match err {
        Some(e) => anyhow::bail!(e),
        None => Ok(()),
    }
}

/// The tiny config: GQA (4 heads, 2 KV heads), tied embeddings, llama3 RoPE scaling.
pub fn tiny_config() -> LlamaConfig {
    let mut cfg = LlamaConfig::tiny(VOCAB);
    cfg.tie_word_embeddings = true;
    cfg.rope_scaling = Some(RopeScaling {
        rope_type: "llama3".into(),
        factor: 8.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: 64,
    });
    cfg.max_position_embeddings = 256;
    cfg
}

/// Random weights scaled so that logits are far from uniform (greedy ties would make token
/// comparisons meaningless).
pub fn tiny_weights(cfg: &LlamaConfig, seed: u64) -> Result<Weights> {
    let w = Weights::random(cfg, seed, &Device::Cpu)?;
    let mut out = Weights::default();
    for (name, t) in w.tensors() {
        let t = if t.rank() == 2 {
            (t * 12.0)?
        } else {
            t.clone()
        };
        out.insert(name.clone(), t);
    }
    Ok(out)
}

/// A word-level tokenizer with `n` tokens `t0 … t{n-1}`.
pub fn write_tokenizer(path: &Path, n: usize) -> Result<()> {
    use tokenizers::models::wordlevel::WordLevel;
    let vocab: HashMap<String, u32> = (0..n as u32).map(|i| (format!("t{i}"), i)).collect();
    let model = WordLevel::builder()
        .vocab(vocab.into_iter().collect())
        .unk_token("t0".into())
        .build()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut tok = tokenizers::Tokenizer::new(model);
    tok.with_pre_tokenizer(Some(tokenizers::pre_tokenizers::whitespace::Whitespace {}));
    tok.save(path, false).map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}

/// Writes the tiny checkpoint (with tokenizer) into `dir`.
pub fn tiny_checkpoint(dir: &Path, cfg: &LlamaConfig, seed: u64) -> Result<()> {
    let w = tiny_weights(cfg, seed)?;
    Checkpoint::save(dir, cfg, &w, None).context("saving checkpoint")?;
    write_tokenizer(&dir.join("tokenizer.json"), cfg.vocab_size)?;
    Ok(())
}

/// A temporary checkpoint and its export of `dtype`.
pub struct Fixture {
    /// Keeps the directory alive.
    pub _tmp: tempfile::TempDir,
    /// Checkpoint directory.
    pub ckpt: PathBuf,
    /// Export directory.
    pub out: PathBuf,
    /// The config.
    pub cfg: LlamaConfig,
}

/// Builds a checkpoint and exports it.
pub fn fixture(dtype: steper_export::ExportDtype) -> Result<Fixture> {
    ensure_ort()?;
    let tmp = tempfile::tempdir()?;
    let ckpt = tmp.path().join("ckpt");
    let out = tmp.path().join("export");
    let cfg = tiny_config();
    tiny_checkpoint(&ckpt, &cfg, 7)?;
    let opts = steper_export::ExportOptions {
        dtype,
        ..Default::default()
    };
    steper_export::export(&ckpt, &out, &opts)?;
    Ok(Fixture {
        _tmp: tmp,
        ckpt,
        out,
        cfg,
    })
}

/// A prompt of `n` ids.
pub fn prompt(n: usize) -> Vec<u32> {
    (0..n as u32).map(|i| (i * 37 + 5) % VOCAB as u32).collect()
}
