//! Llama (HF `LlamaForCausalLM`, llama.cpp `llama`): no biases unless `attention_bias`.

use std::path::Path;

use super::{config_error, Family, Projection};
use crate::config::LlamaConfig;
use crate::error::Result;

/// The Llama family (SmolLM2, Llama-2/3.x, TinyLlama, …).
pub const LLAMA: Family = Family {
    model_type: "llama",
    hf_architecture: "LlamaForCausalLM",
    gguf_architecture: "llama",
    gguf_permutes_qk: true,
    gguf_default_pre: "default",
    genai_type: "llama",
    default_rope_theta: 10000.0,
    biases,
    check,
};

/// HF's `attention_bias` puts a bias on all four attention projections.
fn biases(cfg: &LlamaConfig) -> &'static [Projection] {
    if cfg.attention_bias == Some(true) {
        &[Projection::Q, Projection::K, Projection::V, Projection::O]
    } else {
        &[]
    }
}

fn check(cfg: &LlamaConfig, path: &Path) -> Result<()> {
    if cfg.mlp_bias == Some(true) {
        return Err(config_error(
            path,
            "mlp_bias",
            "false (MLP biases are not implemented)",
            "true".into(),
        ));
    }
    Ok(())
}
