//! Shared helpers of the models tests.
#![allow(dead_code)]

/// Max abs difference tolerated between two f32 implementations of the same forward pass.
pub const F32_LOGIT_ATOL: f32 = 1e-4;

/// Max abs difference of two float slices.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
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
