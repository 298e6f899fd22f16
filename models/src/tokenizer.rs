//! Rebuilding a Hugging Face `tokenizer.json` (byte-level BPE) from GGUF tokenizer metadata.

use std::collections::HashMap;

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::unicode::NFC;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

/// GGUF `token_type` of a control (special) token.
pub const TOKEN_TYPE_CONTROL: i64 = 3;
/// GGUF `token_type` of a user-defined added token.
pub const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// The pre-tokenizer names (`tokenizer.ggml.pre`) this rebuild knows.
pub const SUPPORTED_PRE: &[&str] = &["smollm", "gpt2", "default", "qwen2", "llama-bpe"];

/// Qwen2's split pattern (transformers' `Qwen2Converter`, the `Split` of Qwen2.5's
/// `tokenizer.json`): like Llama-3's but one digit per piece.
pub const QWEN2_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Llama-3's split pattern (llama.cpp `llama-bpe`, the `Split` of Llama-3.x's `tokenizer.json`):
/// digits in groups of up to three.
pub const LLAMA3_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// A regex split (each match its own piece, as HF's `Split(behavior="isolated")`) followed by
/// the byte-level mapping without its own GPT-2 regex.
fn regex_then_byte_level(pattern: &str) -> Result<PreTokenizerWrapper, String> {
    let split = Split::new(
        SplitPattern::Regex(pattern.to_string()),
        SplitDelimiterBehavior::Isolated,
        false,
    )
    .map_err(|e| format!("cannot compile the split pattern: {e}"))?;
    Ok(Sequence::new(vec![
        split.into(),
        ByteLevel::new(false, true, false).into(),
    ])
    .into())
}

/// The pieces of a GGUF `gpt2` tokenizer.
pub struct GgufTokenizerSpec {
    /// `tokenizer.ggml.tokens`, id order.
    pub tokens: Vec<String>,
    /// `tokenizer.ggml.merges`, `"a b"` strings in rank order.
    pub merges: Vec<String>,
    /// `tokenizer.ggml.token_type` per token.
    pub token_types: Vec<i64>,
    /// `tokenizer.ggml.pre`.
    pub pre: String,
    /// BOS id to prepend when `tokenizer.ggml.add_bos_token` is true.
    pub add_bos: Option<u32>,
}

/// Builds the tokenizer; the error text names what is unsupported or inconsistent.
pub fn build_byte_level_bpe(spec: &GgufTokenizerSpec) -> Result<Tokenizer, String> {
    let pre: PreTokenizerWrapper = match spec.pre.as_str() {
        // llama.cpp's `smollm` pre-tokenizer: each digit alone, then GPT-2 byte-level splitting.
        "smollm" => Sequence::new(vec![
            Digits::new(true).into(),
            ByteLevel::new(false, true, true).into(),
        ])
        .into(),
        "gpt2" | "default" => ByteLevel::new(false, true, true).into(),
        "qwen2" => regex_then_byte_level(QWEN2_PATTERN)?,
        "llama-bpe" => regex_then_byte_level(LLAMA3_PATTERN)?,
        other => {
            return Err(format!(
                "tokenizer.ggml.pre `{other}` is not supported (supported: {SUPPORTED_PRE:?})"
            ))
        }
    };
    let mut vocab: HashMap<String, u32> = HashMap::with_capacity(spec.tokens.len());
    let mut ordered: Vec<(String, u32)> = Vec::with_capacity(spec.tokens.len());
    for (i, t) in spec.tokens.iter().enumerate() {
        if vocab.insert(t.clone(), i as u32).is_some() {
            return Err(format!(
                "tokenizer.ggml.tokens: token {t:?} appears twice (id {i})"
            ));
        }
        ordered.push((t.clone(), i as u32));
    }
    let mut merges = Vec::with_capacity(spec.merges.len());
    for (i, m) in spec.merges.iter().enumerate() {
        let (a, b) = m
            .split_once(' ')
            .ok_or_else(|| format!("tokenizer.ggml.merges[{i}]: expected \"a b\", got {m:?}"))?;
        merges.push((a.to_string(), b.to_string()));
    }
    let bpe = BPE::builder()
        .vocab_and_merges(ordered.into_iter().collect::<Vocab>(), merges)
        .build()
        .map_err(|e| format!("cannot build BPE: {e}"))?;
    let mut tok = Tokenizer::new(bpe);
    tok.with_pre_tokenizer(Some(pre));
    if spec.pre == "qwen2" {
        // Qwen2's tokenizer.json normalizes to NFC before splitting.
        tok.with_normalizer(Some(NFC))
            .map_err(|e| format!("cannot set the NFC normalizer: {e}"))?;
    }
    tok.with_decoder(Some(ByteLevelDecoder::default()));
    let mut specials = Vec::new();
    let mut user = Vec::new();
    for (i, (t, &ty)) in spec.tokens.iter().zip(&spec.token_types).enumerate() {
        match ty {
            TOKEN_TYPE_CONTROL => specials.push((i, AddedToken::from(t.clone(), true))),
            TOKEN_TYPE_USER_DEFINED => user.push((i, AddedToken::from(t.clone(), false))),
            _ => {}
        }
    }
    tok.add_special_tokens(specials.iter().map(|(_, t)| t.clone()))
        .map_err(|e| format!("cannot add special tokens: {e}"))?;
    tok.add_tokens(user.iter().map(|(_, t)| t.clone()))
        .map_err(|e| format!("cannot add user-defined tokens: {e}"))?;
    for (i, t) in specials.iter().chain(user.iter()) {
        if tok.token_to_id(&t.content) != Some(*i as u32) {
            return Err(format!(
                "added token {:?} did not keep its id {i}",
                t.content
            ));
        }
    }
    if let Some(bos) = spec.add_bos {
        let bos_tok = spec
            .tokens
            .get(bos as usize)
            .ok_or_else(|| format!("bos id {bos} outside the vocabulary"))?;
        let tp = TemplateProcessing::builder()
            .try_single(format!("{bos_tok}:0 $A:0"))
            .and_then(|b| b.try_pair(format!("{bos_tok}:0 $A:0 $B:1")))
            .map_err(|e| format!("cannot build post-processor: {e}"))?
            .special_tokens(vec![(bos_tok.clone(), bos)])
            .build()
            .map_err(|e| format!("cannot build post-processor: {e}"))?;
        tok.with_post_processor(Some(tp));
    }
    Ok(tok)
}
