//! Shared helpers of the models tests.
#![allow(dead_code)]

/// Max abs difference tolerated between two f32 implementations of the same forward pass.
pub const F32_LOGIT_ATOL: f32 = 1e-4;

/// Max abs difference of two float slices.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// A tiny GQA config: 2 layers, 4 heads / 2 KV heads.
pub fn tiny_gqa(vocab: usize) -> steper_models::LlamaConfig {
    let mut cfg = steper_models::LlamaConfig::tiny(vocab);
    cfg.num_hidden_layers = 2;
    cfg.num_attention_heads = 4;
    cfg.num_key_value_heads = Some(2);
    cfg.hidden_size = 64;
    cfg.intermediate_size = 96;
    cfg
}

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use steper_models::gguf::permute_rope_rows;
use steper_models::{LlamaConfig, Weights};

/// The 256 byte-level symbols in a fixed order, then `extra` merged tokens.
pub fn tiny_byte_vocab() -> (Vec<String>, Vec<String>) {
    let mut alphabet: Vec<char> = tokenizers::pre_tokenizers::byte_level::ByteLevel::alphabet()
        .into_iter()
        .collect();
    alphabet.sort();
    let mut tokens: Vec<String> = vec![
        "<|endoftext|>".into(),
        "<|im_start|>".into(),
        "<|im_end|>".into(),
    ];
    tokens.extend(alphabet.iter().map(|c| c.to_string()));
    let merges = vec![
        "t h".to_string(),
        "th e".to_string(),
        "Ġ the".to_string(),
        "i n".to_string(),
    ];
    tokens.extend(["th", "the", "Ġthe", "in"].iter().map(|s| s.to_string()));
    (tokens, merges)
}

/// Writes a llama GGUF of `cfg` / `w` the way llama.cpp's converter does (Q/K rows permuted,
/// GGUF names), with tensors stored as `dtype` (norms always F32). `arch` overrides
/// `general.architecture`.
pub fn write_tiny_gguf(
    path: &std::path::Path,
    cfg: &LlamaConfig,
    w: &Weights,
    dtype: GgmlDType,
    arch: &str,
) -> anyhow::Result<()> {
    use gguf_file::Value;
    let (tokens, merges) = tiny_byte_vocab();
    assert_eq!(
        tokens.len(),
        cfg.vocab_size,
        "config vocab must match tiny_byte_vocab"
    );
    let mut types = vec![Value::I32(1); tokens.len()];
    for t in types.iter_mut().take(3) {
        *t = Value::I32(3);
    }
    let meta: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(arch.into())),
        ("general.name".into(), Value::String("tiny".into())),
        (
            "llama.block_count".into(),
            Value::U32(cfg.num_hidden_layers as u32),
        ),
        (
            "llama.context_length".into(),
            Value::U32(cfg.max_position_embeddings as u32),
        ),
        (
            "llama.embedding_length".into(),
            Value::U32(cfg.hidden_size as u32),
        ),
        (
            "llama.feed_forward_length".into(),
            Value::U32(cfg.intermediate_size as u32),
        ),
        (
            "llama.attention.head_count".into(),
            Value::U32(cfg.num_attention_heads as u32),
        ),
        (
            "llama.attention.head_count_kv".into(),
            Value::U32(cfg.kv_heads() as u32),
        ),
        (
            "llama.rope.freq_base".into(),
            Value::F32(cfg.rope_theta as f32),
        ),
        (
            "llama.rope.dimension_count".into(),
            Value::U32(cfg.head_size() as u32),
        ),
        (
            "llama.attention.layer_norm_rms_epsilon".into(),
            Value::F32(cfg.rms_norm_eps as f32),
        ),
        ("llama.vocab_size".into(), Value::U32(cfg.vocab_size as u32)),
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), Value::String("smollm".into())),
        (
            "tokenizer.ggml.tokens".into(),
            Value::Array(tokens.iter().map(|t| Value::String(t.clone())).collect()),
        ),
        ("tokenizer.ggml.token_type".into(), Value::Array(types)),
        (
            "tokenizer.ggml.merges".into(),
            Value::Array(merges.iter().map(|t| Value::String(t.clone())).collect()),
        ),
        ("tokenizer.ggml.bos_token_id".into(), Value::U32(1)),
        ("tokenizer.ggml.eos_token_id".into(), Value::U32(2)),
        ("tokenizer.ggml.add_bos_token".into(), Value::Bool(false)),
    ];
    let mut qt: Vec<(String, QTensor)> = Vec::new();
    let t = |n: &str| w.tensors()[n].clone();
    let q = |x: &Tensor, norm: bool| -> anyhow::Result<QTensor> {
        Ok(QTensor::quantize(
            x,
            if norm { GgmlDType::F32 } else { dtype },
        )?)
    };
    qt.push((
        "token_embd.weight".into(),
        q(&t("model.embed_tokens.weight"), false)?,
    ));
    qt.push((
        "output_norm.weight".into(),
        q(&t("model.norm.weight"), true)?,
    ));
    if !cfg.tie_word_embeddings {
        qt.push(("output.weight".into(), q(&t("lm_head.weight"), false)?));
    }
    for l in 0..cfg.num_hidden_layers {
        let h = |s: &str| format!("model.layers.{l}.{s}.weight");
        let g = |s: &str| format!("blk.{l}.{s}.weight");
        qt.push((g("attn_norm"), q(&t(&h("input_layernorm")), true)?));
        qt.push((g("ffn_norm"), q(&t(&h("post_attention_layernorm")), true)?));
        qt.push((
            g("attn_q"),
            q(
                &permute_rope_rows(&t(&h("self_attn.q_proj")), cfg.num_attention_heads)?,
                false,
            )?,
        ));
        qt.push((
            g("attn_k"),
            q(
                &permute_rope_rows(&t(&h("self_attn.k_proj")), cfg.kv_heads())?,
                false,
            )?,
        ));
        qt.push((g("attn_v"), q(&t(&h("self_attn.v_proj")), false)?));
        qt.push((g("attn_output"), q(&t(&h("self_attn.o_proj")), false)?));
        qt.push((g("ffn_gate"), q(&t(&h("mlp.gate_proj")), false)?));
        qt.push((g("ffn_up"), q(&t(&h("mlp.up_proj")), false)?));
        qt.push((g("ffn_down"), q(&t(&h("mlp.down_proj")), false)?));
    }
    let mut f = std::fs::File::create(path)?;
    let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = qt.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(&mut f, &meta_refs, &t_refs)?;
    let _ = Device::Cpu;
    Ok(())
}

/// A tiny config sized for [`tiny_byte_vocab`] and block-32 quantization.
pub fn tiny_gguf_config() -> LlamaConfig {
    let mut cfg = tiny_gqa(tiny_byte_vocab().0.len());
    cfg.hidden_size = 64;
    cfg.intermediate_size = 128;
    cfg.max_position_embeddings = 256;
    cfg.rope_theta = 10000.0;
    cfg
}
