//! The Hugging Face `config.json` of a Llama-shaped model (the families of [`crate::arch`]).

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use steper_fsutil::write_atomic;

/// `rope_scaling` of a Hugging Face config. Only the `llama3` type changes the frequencies here.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RopeScaling {
    /// `"llama3"`; other types are rejected by [`LlamaConfig::validate`].
    #[serde(alias = "type")]
    pub rope_type: String,
    /// Overall factor (8.0 for Llama 3.1).
    pub factor: f64,
    /// Low-frequency factor (1.0 for Llama 3.1).
    #[serde(default = "default_low_freq")]
    pub low_freq_factor: f64,
    /// High-frequency factor (4.0 for Llama 3.1).
    #[serde(default = "default_high_freq")]
    pub high_freq_factor: f64,
    /// Context length of the original pre-training (8192 for Llama 3.1).
    #[serde(default = "default_orig_max")]
    pub original_max_position_embeddings: usize,
}

fn default_low_freq() -> f64 {
    1.0
}
fn default_high_freq() -> f64 {
    4.0
}
fn default_orig_max() -> usize {
    8192
}

/// A token id field that HF writes either as a number or a list of numbers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TokenIds {
    /// One id.
    One(u32),
    /// Several ids (any of them ends generation).
    Many(Vec<u32>),
}

impl TokenIds {
    /// All ids as a vector.
    pub fn to_vec(&self) -> Vec<u32> {
        match self {
            TokenIds::One(i) => vec![*i],
            TokenIds::Many(v) => v.clone(),
        }
    }
}

/// The fields of a Llama-family `config.json` that this crate uses. Other fields are ignored on
/// read and not written back.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    /// The family: the `model_type` of one of [`crate::arch::FAMILIES`].
    pub model_type: String,
    /// `["LlamaForCausalLM"]`, `["Qwen2ForCausalLM"]`.
    #[serde(default = "default_architectures")]
    pub architectures: Vec<String>,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the SwiGLU MLP.
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_hidden_layers: usize,
    /// Number of query heads.
    pub num_attention_heads: usize,
    /// Number of key/value heads (grouped-query attention); HF's default is the query heads.
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// Size of one head; HF's default is `hidden_size / num_attention_heads`.
    #[serde(default)]
    pub head_dim: Option<usize>,
    /// Epsilon of RMSNorm.
    pub rms_norm_eps: f64,
    /// RoPE base.
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    /// Optional RoPE frequency scaling.
    #[serde(default)]
    pub rope_scaling: Option<RopeScaling>,
    /// Longest context the model supports.
    pub max_position_embeddings: usize,
    /// Vocabulary size (rows of the embedding).
    pub vocab_size: usize,
    /// Whether `lm_head` shares the embedding matrix.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Beginning-of-sequence id.
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    /// End-of-sequence id(s).
    #[serde(default)]
    pub eos_token_id: Option<TokenIds>,
    /// Padding id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pad_token_id: Option<u32>,
    /// Weight dtype name as HF writes it (`float32`, `bfloat16`, ...), informational.
    #[serde(default = "default_torch_dtype")]
    pub torch_dtype: String,
    /// Llama: biases on q/k/v/o (HF's `attention_bias`). Qwen2 always has q/k/v biases.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attention_bias: Option<bool>,
    /// Llama: biases on the MLP (refused when true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mlp_bias: Option<bool>,
    /// MLP activation; only `silu` (SwiGLU) is implemented.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hidden_act: Option<String>,
    /// Qwen2: sliding-window attention switch (refused when it would apply to a layer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub use_sliding_window: Option<bool>,
    /// Qwen2: window size (read, kept, not used: sliding windows are refused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sliding_window: Option<usize>,
    /// Qwen2: layers below this index use full attention even with sliding windows on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_window_layers: Option<usize>,
}

/// `x > 0` and not NaN.
fn positive(x: f64) -> bool {
    x.is_finite() && x > 0.0
}

fn default_architectures() -> Vec<String> {
    vec!["LlamaForCausalLM".to_string()]
}
fn default_rope_theta() -> f64 {
    10000.0
}
fn default_torch_dtype() -> String {
    "float32".to_string()
}

impl LlamaConfig {
    /// A small config for tests and from-scratch students.
    pub fn tiny(vocab_size: usize) -> Self {
        LlamaConfig {
            model_type: "llama".into(),
            architectures: default_architectures(),
            hidden_size: 64,
            intermediate_size: 128,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: Some(2),
            head_dim: None,
            rms_norm_eps: 1e-5,
            rope_theta: 10000.0,
            rope_scaling: None,
            max_position_embeddings: 512,
            vocab_size,
            tie_word_embeddings: false,
            bos_token_id: Some(1),
            eos_token_id: Some(TokenIds::One(2)),
            pad_token_id: None,
            torch_dtype: default_torch_dtype(),
            attention_bias: None,
            mlp_bias: None,
            hidden_act: None,
            use_sliding_window: None,
            sliding_window: None,
            max_window_layers: None,
        }
    }

    /// [`LlamaConfig::tiny`] of the Qwen2 family (q/k/v biases, RoPE base 1e6, tied
    /// embeddings as Qwen2.5-0.5B).
    pub fn tiny_qwen2(vocab_size: usize) -> Self {
        let fam = &crate::arch::qwen2::QWEN2;
        LlamaConfig {
            model_type: fam.model_type.into(),
            architectures: vec![fam.hf_architecture.into()],
            rope_theta: 1_000_000.0,
            rms_norm_eps: 1e-6,
            tie_word_embeddings: true,
            use_sliding_window: Some(false),
            sliding_window: Some(4096),
            max_window_layers: Some(2),
            hidden_act: Some("silu".into()),
            ..Self::tiny(vocab_size)
        }
    }

    /// The family of [`LlamaConfig::model_type`] (see [`crate::arch`]); Llama for a config that
    /// was never validated and names an unknown type.
    pub fn family(&self) -> &'static crate::arch::Family {
        crate::arch::by_model_type(&self.model_type).unwrap_or(&crate::arch::llama::LLAMA)
    }

    /// Parses a config from JSON text; `path` only labels errors.
    pub fn from_json_str(text: &str, path: &Path) -> Result<Self> {
        let cfg: LlamaConfig = serde_json::from_str(text).map_err(|e| Error::Json {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        cfg.validate(path)?;
        Ok(cfg)
    }

    /// Reads and validates `config.json` (or any file path given).
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json_str(&text, path)
    }

    /// Serializes as pretty JSON.
    pub fn to_json_string(&self) -> String {
        // Serialization of plain numbers and strings cannot fail.
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// Writes the config atomically to `path`.
    pub fn save(&self, path: &Path) -> Result<()> {
        Ok(write_atomic(path, self.to_json_string().as_bytes())?)
    }

    /// Checks the values, naming the first field that is wrong.
    pub fn validate(&self, path: &Path) -> Result<()> {
        let bad = |field: &str, expected: &str, got: String| Error::Config {
            path: path.to_path_buf(),
            field: field.to_string(),
            expected: expected.to_string(),
            got,
        };
        let Some(family) = crate::arch::by_model_type(&self.model_type) else {
            return Err(bad(
                "model_type",
                &format!(
                    "one of the supported model types {:?}",
                    crate::arch::supported_model_types()
                ),
                format!("{:?}", self.model_type),
            ));
        };
        if let Some(act) = &self.hidden_act {
            if act != "silu" {
                return Err(bad(
                    "hidden_act",
                    "\"silu\" (the SwiGLU MLP)",
                    format!("{act:?}"),
                ));
            }
        }
        (family.check)(self, path)?;
        for (field, v) in [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("max_position_embeddings", self.max_position_embeddings),
            ("vocab_size", self.vocab_size),
        ] {
            if v == 0 {
                return Err(bad(field, "a positive integer", "0".into()));
            }
        }
        let kv = self.kv_heads();
        if kv == 0 || !self.num_attention_heads.is_multiple_of(kv) {
            return Err(bad(
                "num_key_value_heads",
                &format!(
                    "a divisor of num_attention_heads ({})",
                    self.num_attention_heads
                ),
                kv.to_string(),
            ));
        }
        if self.head_dim.is_none() && !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(bad(
                "hidden_size",
                "a multiple of num_attention_heads when head_dim is absent",
                self.hidden_size.to_string(),
            ));
        }
        if !self.head_size().is_multiple_of(2) {
            return Err(bad(
                "head_dim",
                "an even number (RoPE)",
                self.head_size().to_string(),
            ));
        }
        if !positive(self.rms_norm_eps) {
            return Err(bad(
                "rms_norm_eps",
                "a positive number",
                self.rms_norm_eps.to_string(),
            ));
        }
        if !positive(self.rope_theta) {
            return Err(bad(
                "rope_theta",
                "a positive number",
                self.rope_theta.to_string(),
            ));
        }
        if let Some(rs) = &self.rope_scaling {
            if rs.rope_type != "llama3" {
                return Err(bad(
                    "rope_scaling.rope_type",
                    "\"llama3\"",
                    format!("{:?}", rs.rope_type),
                ));
            }
            if !positive(rs.factor)
                || !positive(rs.low_freq_factor)
                || rs.high_freq_factor <= rs.low_freq_factor
            {
                return Err(bad(
                    "rope_scaling",
                    "factor > 0 and high_freq_factor > low_freq_factor > 0",
                    format!("{rs:?}"),
                ));
            }
        }
        Ok(())
    }

    /// Number of key/value heads.
    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// Size of one attention head.
    pub fn head_size(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// End-of-sequence ids (may be empty).
    pub fn eos_ids(&self) -> Vec<u32> {
        self.eos_token_id
            .as_ref()
            .map(|t| t.to_vec())
            .unwrap_or_default()
    }

    /// The inverse RoPE frequencies (`head_dim / 2` values), with llama3 scaling applied.
    /// Follows `_compute_llama3_parameters` of HF transformers `modeling_rope_utils.py`.
    pub fn inv_freq(&self) -> Vec<f32> {
        let d = self.head_size();
        let base: Vec<f64> = (0..d / 2)
            .map(|i| 1.0 / self.rope_theta.powf(2.0 * i as f64 / d as f64))
            .collect();
        let Some(rs) = &self.rope_scaling else {
            return base.iter().map(|&f| f as f32).collect();
        };
        let old = rs.original_max_position_embeddings as f64;
        let low_wavelen = old / rs.low_freq_factor;
        let high_wavelen = old / rs.high_freq_factor;
        base.iter()
            .map(|&f| {
                let wavelen = 2.0 * std::f64::consts::PI / f;
                let v = if wavelen < high_wavelen {
                    f
                } else if wavelen > low_wavelen {
                    f / rs.factor
                } else {
                    let smooth = (old / wavelen - rs.low_freq_factor)
                        / (rs.high_freq_factor - rs.low_freq_factor);
                    (1.0 - smooth) * f / rs.factor + smooth * f
                };
                v as f32
            })
            .collect()
    }

    /// Number of parameters of the model this config describes.
    pub fn num_parameters(&self) -> usize {
        self.family()
            .tensors(self)
            .iter()
            .map(|(_, shape)| shape.iter().product::<usize>())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() -> Result<()> {
        let mut cfg = LlamaConfig::tiny(100);
        cfg.rope_scaling = Some(RopeScaling {
            rope_type: "llama3".into(),
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 64,
        });
        cfg.eos_token_id = Some(TokenIds::Many(vec![2, 3]));
        let text = cfg.to_json_string();
        let back = LlamaConfig::from_json_str(&text, Path::new("mem"))?;
        assert_eq!(cfg, back);
        Ok(())
    }

    #[test]
    fn missing_field_is_named() {
        let cfg = LlamaConfig::tiny(100);
        let mut v: serde_json::Value = serde_json::from_str(&cfg.to_json_string()).unwrap();
        v.as_object_mut().unwrap().remove("intermediate_size");
        let err = LlamaConfig::from_json_str(&v.to_string(), Path::new("x/config.json"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("intermediate_size"), "{err}");
        assert!(err.contains("x/config.json"), "{err}");
    }

    #[test]
    fn unknown_model_type_is_rejected() {
        let mut cfg = LlamaConfig::tiny(100);
        cfg.model_type = "gpt2".into();
        let err = LlamaConfig::from_json_str(&cfg.to_json_string(), Path::new("c.json"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("model_type") && err.contains("gpt2"), "{err}");
        assert!(
            err.contains("\"llama\"") && err.contains("\"qwen2\""),
            "{err}"
        );
    }

    /// Qwen2.5-0.5B-Instruct's `config.json` as published.
    const QWEN25_05B: &str = r#"{"architectures":["Qwen2ForCausalLM"],"attention_dropout":0.0,
        "bos_token_id":151643,"eos_token_id":151645,"hidden_act":"silu","hidden_size":896,
        "initializer_range":0.02,"intermediate_size":4864,"max_position_embeddings":32768,
        "max_window_layers":21,"model_type":"qwen2","num_attention_heads":14,"num_hidden_layers":24,
        "num_key_value_heads":2,"rms_norm_eps":1e-06,"rope_theta":1000000.0,"sliding_window":32768,
        "tie_word_embeddings":true,"torch_dtype":"bfloat16","transformers_version":"4.43.1",
        "use_cache":true,"use_sliding_window":false,"vocab_size":151936}"#;

    #[test]
    fn hf_qwen25_config_parses_with_qkv_biases() -> Result<()> {
        let cfg = LlamaConfig::from_json_str(QWEN25_05B, Path::new("qwen"))?;
        assert_eq!(cfg.family().model_type, "qwen2");
        assert_eq!(cfg.head_size(), 64);
        assert_eq!(cfg.rope_theta, 1e6);
        assert!(cfg.tie_word_embeddings);
        // 494M parameters (Qwen2.5-0.5B's model card), q/k/v biases included.
        assert!(
            (cfg.num_parameters() as f64 - 494.0e6).abs() < 0.5e6,
            "{}",
            cfg.num_parameters()
        );
        let names: Vec<String> = cfg
            .family()
            .tensors(&cfg)
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        for p in ["q_proj", "k_proj", "v_proj"] {
            assert!(
                names.contains(&format!("model.layers.0.self_attn.{p}.bias")),
                "{p}"
            );
        }
        assert!(!names
            .iter()
            .any(|n| n.contains("o_proj.bias") || n.contains("mlp") && n.ends_with(".bias")));
        // Read and written back.
        let back = LlamaConfig::from_json_str(&cfg.to_json_string(), Path::new("mem"))?;
        assert_eq!(cfg, back);
        Ok(())
    }

    #[test]
    fn enabled_sliding_window_is_refused_naming_the_field() {
        let mut v: serde_json::Value = serde_json::from_str(QWEN25_05B).unwrap();
        v["use_sliding_window"] = serde_json::Value::Bool(true);
        let err = LlamaConfig::from_json_str(&v.to_string(), Path::new("q/config.json"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("use_sliding_window") && err.contains("q/config.json"),
            "{err}"
        );
        assert!(err.contains("max_window_layers 21"), "{err}");
        // On, but from a layer past the last one: every layer keeps full attention.
        v["max_window_layers"] = serde_json::json!(24);
        assert!(LlamaConfig::from_json_str(&v.to_string(), Path::new("q")).is_ok());
    }

    #[test]
    fn other_activations_and_mlp_biases_are_refused() {
        let mut cfg = LlamaConfig::tiny(10);
        cfg.hidden_act = Some("gelu".into());
        let err = cfg.validate(Path::new("c")).unwrap_err().to_string();
        assert!(err.contains("hidden_act") && err.contains("gelu"), "{err}");
        let mut cfg = LlamaConfig::tiny(10);
        cfg.mlp_bias = Some(true);
        let err = cfg.validate(Path::new("c")).unwrap_err().to_string();
        assert!(err.contains("mlp_bias"), "{err}");
    }

    #[test]
    fn hf_smollm2_config_parses() -> Result<()> {
        let text = r#"{"architectures":["LlamaForCausalLM"],"attention_bias":false,"bos_token_id":1,
        "eos_token_id":2,"hidden_act":"silu","hidden_size":576,"initializer_range":0.041666666666666664,
        "intermediate_size":1536,"max_position_embeddings":8192,"model_type":"llama",
        "num_attention_heads":9,"num_hidden_layers":30,"num_key_value_heads":3,"pretraining_tp":1,
        "rms_norm_eps":1e-05,"rope_scaling":null,"rope_theta":100000,"tie_word_embeddings":true,
        "torch_dtype":"bfloat16","transformers_version":"4.42.3","use_cache":true,"vocab_size":49152}"#;
        let cfg = LlamaConfig::from_json_str(text, Path::new("smollm2"))?;
        assert_eq!(cfg.head_size(), 64);
        assert_eq!(cfg.kv_heads(), 3);
        assert!((cfg.num_parameters() as f64 - 134.5e6).abs() < 0.1e6);
        Ok(())
    }

    #[test]
    fn llama3_scaling_keeps_high_frequencies() {
        let mut cfg = LlamaConfig::tiny(10);
        cfg.head_dim = Some(128);
        cfg.rope_theta = 500000.0;
        let plain = cfg.inv_freq();
        cfg.rope_scaling = Some(RopeScaling {
            rope_type: "llama3".into(),
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192,
        });
        let scaled = cfg.inv_freq();
        assert_eq!(plain[0], scaled[0]);
        let last = plain.len() - 1;
        assert!((plain[last] / 8.0 - scaled[last]).abs() < 1e-12);
    }
}
