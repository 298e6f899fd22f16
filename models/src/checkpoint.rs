//! Checkpoint directories: `config.json` + safetensors (+ `tokenizer.json`).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};

use crate::config::LlamaConfig;
use crate::error::{Error, Result};
use crate::model::Llama;
use crate::weights::{Weights, CONFIG_FILE, TOKENIZER_FILE};

/// A loaded checkpoint directory.
pub struct Checkpoint {
    /// The directory.
    pub dir: PathBuf,
    /// Its `config.json`.
    pub config: LlamaConfig,
    /// Its weights, checked against the config.
    pub weights: Weights,
}

impl Checkpoint {
    /// Loads config and weights (converted to `dtype`) from `dir`.
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::Checkpoint {
                path: dir.to_path_buf(),
                message: "not a directory".into(),
            });
        }
        let cfg_path = dir.join(CONFIG_FILE);
        if !cfg_path.is_file() {
            return Err(Error::Checkpoint {
                path: dir.to_path_buf(),
                message: format!("{CONFIG_FILE} not found"),
            });
        }
        let config = LlamaConfig::from_file(&cfg_path)?;
        let weights = Weights::load_dir(dir, dtype, device)?;
        weights.check(&config, dir)?;
        Ok(Checkpoint {
            dir: dir.to_path_buf(),
            config,
            weights,
        })
    }

    /// Builds the model.
    pub fn model(&self) -> Result<Llama> {
        Llama::new(&self.config, &self.weights)
    }

    /// Loads `tokenizer.json` of the checkpoint and checks it fits the vocabulary.
    pub fn tokenizer(&self) -> Result<tokenizers::Tokenizer> {
        load_tokenizer(&self.dir.join(TOKENIZER_FILE), self.config.vocab_size)
    }

    /// Writes `config.json` and the weights into `dir` (each file atomically).
    pub fn save(
        dir: &Path,
        config: &LlamaConfig,
        weights: &Weights,
        max_shard_bytes: Option<usize>,
    ) -> Result<()> {
        weights.check(config, dir)?;
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        weights.save_dir(dir, max_shard_bytes)?;
        config.save(&dir.join(CONFIG_FILE))
    }
}

/// Loads a `tokenizer.json`, checking that its ids fit a vocabulary of `vocab_size`.
pub fn load_tokenizer(path: &Path, vocab_size: usize) -> Result<tokenizers::Tokenizer> {
    if !path.is_file() {
        return Err(Error::Tokenizer(format!(
            "{}: file not found",
            path.display()
        )));
    }
    let tok = tokenizers::Tokenizer::from_file(path)
        .map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))?;
    let n = tok.get_vocab_size(true);
    if n > vocab_size {
        return Err(Error::Tokenizer(format!(
            "{}: {n} tokens, but the model's vocab_size is {vocab_size}",
            path.display()
        )));
    }
    Ok(tok)
}
