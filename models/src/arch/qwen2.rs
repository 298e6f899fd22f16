//! Qwen2 / Qwen2.5 (HF `Qwen2ForCausalLM`, llama.cpp `qwen2`): the Llama layer with biases on
//! the q/k/v projections (none on o_proj or the MLP), RoPE base usually 1e6, optional sliding
//! window attention (off in every released config, refused here when on).

use std::path::Path;

use super::{config_error, Family, Projection};
use crate::config::LlamaConfig;
use crate::error::Result;

/// The Qwen2 family (Qwen2, Qwen2.5, Qwen2.5-Instruct).
pub const QWEN2: Family = Family {
    model_type: "qwen2",
    hf_architecture: "Qwen2ForCausalLM",
    gguf_architecture: "qwen2",
    // convert_hf_to_gguf.py's `Qwen2Model` does not apply `LlamaModel.permute`.
    gguf_permutes_qk: false,
    gguf_default_pre: "qwen2",
    genai_type: "qwen2",
    default_rope_theta: 10000.0,
    biases,
    check,
};

fn biases(_: &LlamaConfig) -> &'static [Projection] {
    &[Projection::Q, Projection::K, Projection::V]
}

/// Sliding-window attention is refused: HF's Qwen2 applies it to layers
/// `max_window_layers..num_hidden_layers` when `use_sliding_window` is true. `attention_bias` is
/// not read: HF's `Qwen2Attention` always builds q/k/v with a bias.
fn check(cfg: &LlamaConfig, path: &Path) -> Result<()> {
    if cfg.use_sliding_window == Some(true) {
        let from = cfg.max_window_layers.unwrap_or(0);
        if from < cfg.num_hidden_layers {
            return Err(config_error(
                path,
                "use_sliding_window",
                &format!(
                    "false (sliding-window attention is not implemented; with sliding_window {:?} and max_window_layers {from} it would apply to layers {from}..{})",
                    cfg.sliding_window, cfg.num_hidden_layers
                ),
                "true".into(),
            ));
        }
    }
    Ok(())
}
