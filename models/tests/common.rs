//! Shared helpers of the models tests.
#![allow(dead_code)]

/// Max abs difference tolerated between two f32 implementations of the same forward pass.
pub const F32_LOGIT_ATOL: f32 = 1e-4;

/// Q8_0 keeps 8 bits per weight with one f16 scale per 32: for normal(0, 0.02) weights the
/// rounding error is below 0.02 * 4 / 127 ≈ 6e-4; a little slack for the scale's f16 rounding.
pub const Q8_0_WEIGHT_ATOL: f32 = 1e-3;

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
    write_family_gguf(path, cfg, w, dtype, arch, "smollm")
}

/// Writes a GGUF of `cfg`'s family the way llama.cpp's converter does for it: metadata under the
/// family's `general.architecture` prefix, Q/K rows (and their biases) permuted only where the
/// family's converter permutes them (Llama; not Qwen2), biases as `blk.N.attn_q.bias` (F32),
/// `pre` as `tokenizer.ggml.pre` (a bias absent from `w` is not written). `arch` overrides `general.architecture` (the keys keep the
/// family's prefix).
pub fn write_family_gguf(
    path: &std::path::Path,
    cfg: &LlamaConfig,
    w: &Weights,
    dtype: GgmlDType,
    arch: &str,
    pre: &str,
) -> anyhow::Result<()> {
    use gguf_file::Value;
    use steper_models::arch::{Projection, LAYER_NORMS};
    let fam = cfg.family();
    let prefix = fam.gguf_architecture;
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
            format!("{prefix}.block_count"),
            Value::U32(cfg.num_hidden_layers as u32),
        ),
        (
            format!("{prefix}.context_length"),
            Value::U32(cfg.max_position_embeddings as u32),
        ),
        (
            format!("{prefix}.embedding_length"),
            Value::U32(cfg.hidden_size as u32),
        ),
        (
            format!("{prefix}.feed_forward_length"),
            Value::U32(cfg.intermediate_size as u32),
        ),
        (
            format!("{prefix}.attention.head_count"),
            Value::U32(cfg.num_attention_heads as u32),
        ),
        (
            format!("{prefix}.attention.head_count_kv"),
            Value::U32(cfg.kv_heads() as u32),
        ),
        (
            format!("{prefix}.rope.freq_base"),
            Value::F32(cfg.rope_theta as f32),
        ),
        (
            format!("{prefix}.rope.dimension_count"),
            Value::U32(cfg.head_size() as u32),
        ),
        (
            format!("{prefix}.attention.layer_norm_rms_epsilon"),
            Value::F32(cfg.rms_norm_eps as f32),
        ),
        (
            format!("{prefix}.vocab_size"),
            Value::U32(cfg.vocab_size as u32),
        ),
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), Value::String(pre.into())),
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
        for (hf, gg) in LAYER_NORMS {
            qt.push((
                format!("blk.{l}.{gg}.weight"),
                q(&t(&format!("model.layers.{l}.{hf}.weight")), true)?,
            ));
        }
        for p in Projection::ALL {
            let heads = match p {
                Projection::Q if fam.gguf_permutes_qk => Some(cfg.num_attention_heads),
                Projection::K if fam.gguf_permutes_qk => Some(cfg.kv_heads()),
                _ => None,
            };
            let wt = t(&p.weight_name(l));
            let wt = match heads {
                Some(n) => permute_rope_rows(&wt, n)?,
                None => wt,
            };
            qt.push((format!("blk.{l}.{}.weight", p.gguf()), q(&wt, false)?));
            if let Some(b) = w
                .tensors()
                .get(&p.bias_name(l))
                .filter(|_| fam.has_bias(cfg, p))
            {
                let b = b.clone();
                let b = match heads {
                    Some(n) => permute_rope_rows(&b.unsqueeze(1)?, n)?.squeeze(1)?,
                    None => b,
                };
                qt.push((format!("blk.{l}.{}.bias", p.gguf()), q(&b, true)?));
            }
        }
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
