//! Model families, each described once: its Hugging Face `model_type` / `architectures`, which
//! projections carry a bias, its GGUF names, the genai_config `type`, and any config check of its
//! own. The model, the weight list, the GGUF import, the ONNX export and `genai_config.json` all
//! read the description instead of keeping their own copy of the layer list, so a new family of
//! the Llama shape (pre-norm, RoPE, grouped-query attention, SwiGLU MLP) is one file here plus
//! its entry in [`FAMILIES`].

use std::path::Path;

use crate::config::LlamaConfig;
use crate::error::{Error, Result};

pub mod llama;
pub mod qwen2;

/// A linear projection of a decoder layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Projection {
    /// Queries.
    Q,
    /// Keys.
    K,
    /// Values.
    V,
    /// Attention output.
    O,
    /// MLP gate.
    Gate,
    /// MLP up.
    Up,
    /// MLP down.
    Down,
}

impl Projection {
    /// Every projection, in layer order.
    pub const ALL: [Projection; 7] = [
        Projection::Q,
        Projection::K,
        Projection::V,
        Projection::O,
        Projection::Gate,
        Projection::Up,
        Projection::Down,
    ];

    /// The HF module name inside a layer (`self_attn.q_proj`, …).
    pub fn module(self) -> &'static str {
        match self {
            Projection::Q => "self_attn.q_proj",
            Projection::K => "self_attn.k_proj",
            Projection::V => "self_attn.v_proj",
            Projection::O => "self_attn.o_proj",
            Projection::Gate => "mlp.gate_proj",
            Projection::Up => "mlp.up_proj",
            Projection::Down => "mlp.down_proj",
        }
    }

    /// llama.cpp's tensor name inside a block (`attn_q`, …).
    pub fn gguf(self) -> &'static str {
        match self {
            Projection::Q => "attn_q",
            Projection::K => "attn_k",
            Projection::V => "attn_v",
            Projection::O => "attn_output",
            Projection::Gate => "ffn_gate",
            Projection::Up => "ffn_up",
            Projection::Down => "ffn_down",
        }
    }

    /// `(out, in)` of the weight for `cfg`.
    pub fn shape(self, cfg: &LlamaConfig) -> (usize, usize) {
        let h = cfg.hidden_size;
        let d = cfg.head_size();
        match self {
            Projection::Q => (cfg.num_attention_heads * d, h),
            Projection::K | Projection::V => (cfg.kv_heads() * d, h),
            Projection::O => (h, cfg.num_attention_heads * d),
            Projection::Gate | Projection::Up => (cfg.intermediate_size, h),
            Projection::Down => (h, cfg.intermediate_size),
        }
    }

    /// HF name of the weight in layer `l`.
    pub fn weight_name(self, l: usize) -> String {
        format!("model.layers.{l}.{}.weight", self.module())
    }

    /// HF name of the bias in layer `l`.
    pub fn bias_name(self, l: usize) -> String {
        format!("model.layers.{l}.{}.bias", self.module())
    }
}

/// The two RMSNorms of a layer: `(HF module, llama.cpp name)`.
pub const LAYER_NORMS: [(&str, &str); 2] = [
    ("input_layernorm", "attn_norm"),
    ("post_attention_layernorm", "ffn_norm"),
];

/// One model family.
#[derive(Debug)]
pub struct Family {
    /// HF `config.json` `model_type`.
    pub model_type: &'static str,
    /// HF `architectures` entry of the causal-LM class (written into configs this crate makes).
    pub hf_architecture: &'static str,
    /// GGUF `general.architecture`, also the prefix of its metadata keys (`{name}.block_count`).
    pub gguf_architecture: &'static str,
    /// Whether llama.cpp's converter permutes the Q/K rows for interleaved RoPE (it does for
    /// `LlamaModel`; `Qwen2Model` keeps HF's layout).
    pub gguf_permutes_qk: bool,
    /// `tokenizer.ggml.pre` assumed when a GGUF of this family lacks the key.
    pub gguf_default_pre: &'static str,
    /// onnxruntime-genai `model.type`.
    pub genai_type: &'static str,
    /// RoPE base when neither the config nor the GGUF metadata gives one.
    pub default_rope_theta: f64,
    /// Projections that carry a bias for `cfg` (HF names `{module}.bias`).
    pub biases: fn(&LlamaConfig) -> &'static [Projection],
    /// Family-specific config checks (errors name the field).
    pub check: fn(&LlamaConfig, &Path) -> Result<()>,
}

/// Every family this crate implements, the first being the default.
pub const FAMILIES: &[&Family] = &[&llama::LLAMA, &qwen2::QWEN2];

/// The family of an HF `model_type`.
pub fn by_model_type(model_type: &str) -> Option<&'static Family> {
    FAMILIES
        .iter()
        .copied()
        .find(|f| f.model_type == model_type)
}

/// The family of a GGUF `general.architecture`.
pub fn by_gguf_architecture(name: &str) -> Option<&'static Family> {
    FAMILIES
        .iter()
        .copied()
        .find(|f| f.gguf_architecture == name)
}

/// The `model_type`s accepted, for error messages.
pub fn supported_model_types() -> Vec<&'static str> {
    FAMILIES.iter().map(|f| f.model_type).collect()
}

impl Family {
    /// Whether projection `p` carries a bias for `cfg`.
    pub fn has_bias(&self, cfg: &LlamaConfig, p: Projection) -> bool {
        (self.biases)(cfg).contains(&p)
    }

    /// Names and shapes of every tensor a model of `cfg` needs, in a stable order.
    pub fn tensors(&self, cfg: &LlamaConfig) -> Vec<(String, Vec<usize>)> {
        let h = cfg.hidden_size;
        let biased = (self.biases)(cfg);
        let mut v = vec![(
            "model.embed_tokens.weight".to_string(),
            vec![cfg.vocab_size, h],
        )];
        for l in 0..cfg.num_hidden_layers {
            for (norm, _) in LAYER_NORMS {
                v.push((format!("model.layers.{l}.{norm}.weight"), vec![h]));
            }
            for p in Projection::ALL {
                let (out, inp) = p.shape(cfg);
                v.push((p.weight_name(l), vec![out, inp]));
                if biased.contains(&p) {
                    v.push((p.bias_name(l), vec![out]));
                }
            }
        }
        v.push(("model.norm.weight".to_string(), vec![h]));
        if !cfg.tie_word_embeddings {
            v.push(("lm_head.weight".to_string(), vec![cfg.vocab_size, h]));
        }
        v
    }
}

/// `Error::Config` for `field` of the config at `path`.
pub(crate) fn config_error(path: &Path, field: &str, expected: &str, got: String) -> Error {
    Error::Config {
        path: path.to_path_buf(),
        field: field.to_string(),
        expected: expected.to_string(),
        got,
    }
}
