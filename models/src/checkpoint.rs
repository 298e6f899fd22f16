//! Checkpoint directories: `config.json` + safetensors (+ `tokenizer.json`,
//! `tokenizer_config.json`, `generation_config.json`).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use serde::Deserialize;

use crate::config::{LlamaConfig, TokenIds};
use crate::dtype::{resolve, DTypeChoice};
use crate::error::{Error, Result};
use crate::model::Llama;
use crate::weights::{Weights, CONFIG_FILE, TOKENIZER_FILE};

/// File name of the HF tokenizer config (special tokens, `chat_template`).
pub const TOKENIZER_CONFIG_FILE: &str = "tokenizer_config.json";
/// File name of the HF generation defaults (`eos_token_id` may list several ids).
pub const GENERATION_CONFIG_FILE: &str = "generation_config.json";
/// The files besides config and weights that travel unchanged with every checkpoint written
/// from a model directory (training never changes them).
pub const COMPANION_FILES: &[&str] = &[
    TOKENIZER_FILE,
    TOKENIZER_CONFIG_FILE,
    GENERATION_CONFIG_FILE,
    "special_tokens_map.json",
    "chat_template.jinja",
];

/// The fields of `generation_config.json` this crate uses; others are ignored.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct GenerationConfig {
    /// End-of-sequence id(s) generation stops at.
    #[serde(default)]
    pub eos_token_id: Option<TokenIds>,
    /// Beginning-of-sequence id.
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    /// Padding id.
    #[serde(default)]
    pub pad_token_id: Option<u32>,
}

impl GenerationConfig {
    /// Reads `generation_config.json` of `dir`; `None` when the directory has none.
    pub fn from_dir(dir: &Path) -> Result<Option<Self>> {
        let path = dir.join(GENERATION_CONFIG_FILE);
        if !path.is_file() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let g: GenerationConfig = serde_json::from_str(&text).map_err(|e| Error::Json {
            path: path.clone(),
            message: e.to_string(),
        })?;
        Ok(Some(g))
    }
}

/// A loaded checkpoint directory.
pub struct Checkpoint {
    /// The directory.
    pub dir: PathBuf,
    /// Its `config.json`.
    pub config: LlamaConfig,
    /// Its `generation_config.json`, if it has one.
    pub generation: Option<GenerationConfig>,
    /// Its weights, checked against the config, in the dtype the model computes in.
    pub weights: Weights,
    /// The dtype the safetensors files store the weights in.
    pub stored_dtype: DType,
}

impl Checkpoint {
    /// Loads config and weights (converted to `dtype`) from `dir`.
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        Self::load_inner(dir, Some(dtype), device)
    }

    /// Loads config and weights with a `--dtype` choice: `auto` keeps the stored dtype where
    /// the device computes in it at full speed and converts to `f32` where it does not (see
    /// [`crate::dtype`]); an explicit dtype the device cannot compute is
    /// [`Error::UnsupportedDType`]. [`Checkpoint::dtype_note`] says when a conversion happened.
    pub fn load_with(dir: &Path, choice: DTypeChoice, device: &Device) -> Result<Self> {
        if choice != DTypeChoice::Auto {
            // Fail before reading the weights when the device cannot compute the choice.
            resolve(choice, DType::F32, device)?;
        }
        let mut ck = Self::load_inner(dir, None, device)?;
        let (dtype, _) = resolve(choice, ck.stored_dtype, device)?;
        if dtype != ck.stored_dtype {
            ck.weights = ck.weights.to_dtype(dtype)?;
        }
        Ok(ck)
    }

    /// A line for the user when the weights are held in another dtype than stored.
    pub fn dtype_note(&self) -> Option<String> {
        let held = self.weights.dtype();
        (held != self.stored_dtype).then(|| {
            format!(
                "{}: weights stored as {}, computing in {}",
                self.dir.display(),
                self.stored_dtype.as_str(),
                held.as_str()
            )
        })
    }

    /// The ids that end generation: `config.json`'s `eos_token_id` (a number or a list), then
    /// those of `generation_config.json` not already listed.
    pub fn eos_ids(&self) -> Vec<u32> {
        let mut ids = self.config.eos_ids();
        if let Some(g) = self
            .generation
            .as_ref()
            .and_then(|g| g.eos_token_id.as_ref())
        {
            for id in g.to_vec() {
                if !ids.contains(&id) {
                    ids.push(id);
                }
            }
        }
        ids
    }

    fn load_inner(dir: &Path, dtype: Option<DType>, device: &Device) -> Result<Self> {
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
        let generation = GenerationConfig::from_dir(dir)?;
        let stored = Weights::load_dir_stored(dir, device)?;
        let stored_dtype = stored.dtype();
        let weights = match dtype {
            Some(d) => stored.to_dtype(d)?,
            None => stored,
        };
        weights.check(&config, dir)?;
        Ok(Checkpoint {
            dir: dir.to_path_buf(),
            config,
            generation,
            weights,
            stored_dtype,
        })
    }

    /// Builds the model; its config's `eos_token_id` lists every id of
    /// [`Checkpoint::eos_ids`], so generation stops at those of `generation_config.json` too.
    pub fn model(&self) -> Result<Llama> {
        let ids = self.eos_ids();
        if ids == self.config.eos_ids() {
            return Llama::new(&self.config, &self.weights);
        }
        let mut cfg = self.config.clone();
        cfg.eos_token_id = Some(TokenIds::Many(ids));
        Llama::new(&cfg, &self.weights)
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
        let mut config = config.clone();
        config.torch_dtype = crate::dtype::torch_dtype_name(weights.dtype()).into();
        config.save(&dir.join(CONFIG_FILE))
    }
}

/// Copies the [`COMPANION_FILES`] that `from` has into `to` (each atomically, byte for byte);
/// returns the names copied. Used so a checkpoint written from a model directory keeps its
/// tokenizer, chat template and generation defaults.
pub fn copy_companion_files(from: &Path, to: &Path) -> Result<Vec<&'static str>> {
    let mut copied = Vec::new();
    for name in COMPANION_FILES {
        let src = from.join(name);
        if src.is_file() {
            let bytes = std::fs::read(&src).map_err(|e| Error::io(&src, e))?;
            steper_fsutil::write_atomic(&to.join(name), &bytes)?;
            copied.push(*name);
        }
    }
    Ok(copied)
}

/// Loads a `tokenizer.json`, checking that its ids fit a vocabulary of `vocab_size`.
pub fn load_tokenizer(path: &Path, vocab_size: usize) -> Result<tokenizers::Tokenizer> {
    if !path.is_file() {
        return Err(Error::Tokenizer(format!(
            "{}: file not found",
            path.display()
        )));
    }
    // tokenizers 0.23 panics (instead of returning its error) on a syntax error inside the
    // `decoder` object: caught here and reported as the file's error.
    let tok = std::panic::catch_unwind(|| tokenizers::Tokenizer::from_file(path))
        .map_err(|_| {
            Error::Tokenizer(format!(
                "{}: not a readable tokenizer.json (malformed `decoder`)",
                path.display()
            ))
        })?
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by fuzzing: a syntax error inside the `decoder` object made the tokenizers crate
    /// panic ("Helper") instead of returning its error.
    #[test]
    fn a_tokenizer_json_with_a_syntax_error_in_its_decoder_is_an_error_naming_the_file(
    ) -> std::io::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("tokenizer.json");
        std::fs::write(
            &path,
            r#"{"version":"1.0","decoder":{"type":"ByteLevel","add_prefix_space":true "trim_offsets":true},"model":{"type":"BPE","vocab":{},"merges":[]}}"#,
        )?;
        let e = load_tokenizer(&path, 100).err().map(|e| e.to_string());
        let e = e.unwrap_or_default();
        assert!(e.contains("tokenizer.json") && e.contains("decoder"), "{e}");
        Ok(())
    }
}
