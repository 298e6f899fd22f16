//! A from-scratch student: a byte-level BPE tokenizer trained on the data with the `tokenizers`
//! crate and a small randomly initialized Llama.

use std::path::Path;

use candle_core::Device;
use steper_models::{Checkpoint, LlamaConfig, TokenIds, Weights};
use tokenizers::models::bpe::{BpeTrainer, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

use crate::error::{Error, Result};

/// Shape of a from-scratch student.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StudentSpec {
    /// Target vocabulary size of the trained tokenizer.
    pub vocab_size: usize,
    /// Decoder layers.
    pub layers: usize,
    /// Residual width.
    pub hidden: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// MLP width.
    pub intermediate: usize,
    /// Context length.
    pub context: usize,
    /// Seed of the weights.
    pub seed: u64,
}

impl Default for StudentSpec {
    fn default() -> Self {
        StudentSpec {
            vocab_size: 2048,
            layers: 4,
            hidden: 256,
            heads: 8,
            kv_heads: 2,
            intermediate: 640,
            context: 1024,
            seed: 0,
        }
    }
}

/// The end-of-sequence token of trained tokenizers (id 0).
pub const EOS_TOKEN: &str = "<|endoftext|>";

/// Trains a byte-level BPE tokenizer on `texts`.
pub fn train_tokenizer(texts: &[String], vocab_size: usize) -> Result<Tokenizer> {
    let mut trainer: tokenizers::models::TrainerWrapper = BpeTrainer::builder()
        .vocab_size(vocab_size)
        .min_frequency(2)
        .show_progress(false)
        .special_tokens(vec![AddedToken::from(EOS_TOKEN, true)])
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build()
        .into();
    let mut tok = Tokenizer::new(BPE::default());
    tok.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
    tok.with_decoder(Some(tokenizers::decoders::byte_level::ByteLevel::default()));
    tok.train(&mut trainer, texts.iter())
        .map_err(|e| Error::Input(format!("tokenizer training failed: {e}")))?;
    Ok(tok)
}

/// The texts a from-scratch tokenizer is trained on: every passage of `corpus` as the prompt
/// shows it (`Wikipedia Title: …` then the text), then every question of the `qa` files with
/// its answer in the step format.
pub fn corpus_texts(corpus: &Path, qa: &[std::path::PathBuf]) -> Result<Vec<String>> {
    use steper_runtime::data::{read_corpus, read_qa, ReadOptions};
    let mut texts: Vec<String> = read_corpus(corpus, ReadOptions::default())?
        .rows
        .into_iter()
        .map(|d| format!("Wikipedia Title: {}\n{}", d.title, d.text))
        .collect();
    for q in qa {
        for ex in read_qa(q, ReadOptions::default())?.rows {
            texts.push(format!(
                "Q: {}\nA: So the answer is: {}.",
                ex.question,
                ex.answers.join(", ")
            ));
        }
    }
    Ok(texts)
}

/// Writes a new student (config.json, model.safetensors, tokenizer.json) into `out`.
pub fn init_student(texts: &[String], spec: &StudentSpec, out: &Path) -> Result<LlamaConfig> {
    if texts.is_empty() {
        return Err(Error::Input("no texts to train the tokenizer on".into()));
    }
    let tok = train_tokenizer(texts, spec.vocab_size)?;
    let eos = tok
        .token_to_id(EOS_TOKEN)
        .ok_or_else(|| Error::Input("trained tokenizer lacks its EOS token".into()))?;
    let cfg = LlamaConfig {
        hidden_size: spec.hidden,
        intermediate_size: spec.intermediate,
        num_hidden_layers: spec.layers,
        num_attention_heads: spec.heads,
        num_key_value_heads: Some(spec.kv_heads),
        max_position_embeddings: spec.context,
        vocab_size: tok.get_vocab_size(true),
        tie_word_embeddings: true,
        bos_token_id: None,
        eos_token_id: Some(TokenIds::One(eos)),
        pad_token_id: Some(eos),
        ..LlamaConfig::tiny(0)
    };
    cfg.validate(out)?;
    let w = Weights::random(&cfg, spec.seed, &Device::Cpu)?;
    let stage = steper_fsutil::StagingDir::new(out, steper_fsutil::Existing::Refuse)?;
    Checkpoint::save(stage.path(), &cfg, &w, None)?;
    let tp = stage.path().join("tokenizer.json");
    tok.save(&tp, false)
        .map_err(|e| Error::Input(format!("{}: {e}", tp.display())))?;
    stage.commit()?;
    Ok(cfg)
}
