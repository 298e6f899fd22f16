//! Rebuilding a Hugging Face `tokenizer.json` (byte-level BPE) from GGUF tokenizer metadata.

use std::collections::HashMap;

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, Tokenizer};

/// GGUF `token_type` of a control (special) token.
pub const TOKEN_TYPE_CONTROL: i64 = 3;
/// GGUF `token_type` of a user-defined added token.
pub const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// The pre-tokenizer names (`tokenizer.ggml.pre`) this rebuild knows.
pub const SUPPORTED_PRE: &[&str] = &["smollm", "gpt2", "default"];

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
