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

/// Writes a new student (config.json, model.safetensors, tokenizer.json) into `out`: a Llama
/// with a tokenizer trained on `texts`.
pub fn init_student(texts: &[String], spec: &StudentSpec, out: &Path) -> Result<LlamaConfig> {
    init_student_of(texts, spec, "llama", out)
}

/// [`init_student`] of the family named by `model_type` (`llama`, `qwen2`: see
/// [`steper_models::arch`]).
pub fn init_student_of(
    texts: &[String],
    spec: &StudentSpec,
    model_type: &str,
    out: &Path,
) -> Result<LlamaConfig> {
    if texts.is_empty() {
        return Err(Error::Input("no texts to train the tokenizer on".into()));
    }
    let tok = train_tokenizer(texts, spec.vocab_size)?;
    let vocab = tok.get_vocab_size(true);
    write_student(&tok, spec, model_type, vocab, EOS_TOKEN, out)
}

/// A random student of `model_type`'s family that uses an existing tokenizer (`tokenizer.json`,
/// plain or compressed): a model shaped like a released one (its vocabulary included) for
/// benchmarks and device checks, without its weights. `spec.vocab_size` is the embedding's size
/// (0: the tokenizer's; larger pads it, as released models do); `eos_token` ends generation.
pub fn init_student_with_tokenizer(
    tokenizer: &Path,
    spec: &StudentSpec,
    model_type: &str,
    eos_token: &str,
    out: &Path,
) -> Result<LlamaConfig> {
    let mut text = String::new();
    std::io::Read::read_to_string(
        &mut steper_runtime::data::compress::open(tokenizer)?,
        &mut text,
    )
    .map_err(|e| Error::Input(format!("{}: {e}", tokenizer.display())))?;
    let tok: Tokenizer = text.parse().map_err(|e| {
        Error::Input(format!(
            "{}: not a tokenizer.json: {e}",
            tokenizer.display()
        ))
    })?;
    let have = tok.get_vocab_size(true);
    let vocab = match spec.vocab_size {
        0 => have,
        n if n >= have => n,
        n => {
            return Err(Error::Input(format!(
                "--vocab-size {n} is smaller than the {have} tokens of {}",
                tokenizer.display()
            )))
        }
    };
    write_student(&tok, spec, model_type, vocab, eos_token, out)
}

fn write_student(
    tok: &Tokenizer,
    spec: &StudentSpec,
    model_type: &str,
    vocab_size: usize,
    eos_token: &str,
    out: &Path,
) -> Result<LlamaConfig> {
    let eos = tok
        .token_to_id(eos_token)
        .ok_or_else(|| Error::Input(format!("the tokenizer has no end token {eos_token:?}")))?;
    let base = match model_type {
        "llama" => LlamaConfig::tiny(0),
        "qwen2" => LlamaConfig {
            max_window_layers: Some(spec.layers),
            ..LlamaConfig::tiny_qwen2(0)
        },
        other => {
            return Err(Error::Input(format!(
                "model type {other:?} is not one a student can be made of (llama, qwen2)"
            )))
        }
    };
    let cfg = LlamaConfig {
        hidden_size: spec.hidden,
        intermediate_size: spec.intermediate,
        num_hidden_layers: spec.layers,
        num_attention_heads: spec.heads,
        num_key_value_heads: Some(spec.kv_heads),
        max_position_embeddings: spec.context,
        vocab_size,
        tie_word_embeddings: true,
        bos_token_id: None,
        eos_token_id: Some(TokenIds::One(eos)),
        pad_token_id: Some(eos),
        ..base
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
