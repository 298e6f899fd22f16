//! `steper.json`: the runtime manifest written beside an exported `model.onnx`.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The `format` value of every manifest.
pub const MANIFEST_FORMAT: &str = "steper-manifest";
/// The manifest version this runtime reads and writes.
pub const MANIFEST_VERSION: u32 = 1;
/// File name of the manifest inside an export directory.
pub const MANIFEST_FILE: &str = "steper.json";
/// The prompt template version this runtime renders (docs/DESIGN.md, "The prompt").
pub const TEMPLATE_VERSION: &str = "ircot-v1";

/// Reasoning-loop defaults stored with a model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoopDefaults {
    /// Phrase that introduces the answer (`So the answer is:`).
    pub stop_phrase: String,
    /// Maximum reasoning steps before forced aggregation.
    pub max_steps: usize,
    /// Passages retrieved per step.
    pub top_k: usize,
    /// Cap on passages held in total.
    pub max_passages: usize,
    /// Words kept per passage text.
    pub passage_word_cap: usize,
    /// Maximum new tokens per generated sentence.
    pub max_sentence_tokens: usize,
    /// The framework the model was trained for (`ircot` or `self-ask`). IRCoT is left out of
    /// the file, so manifests written before the choice existed read, and are written, as before.
    #[serde(default, skip_serializing_if = "crate::prompt::Framework::is_ircot")]
    pub framework: crate::prompt::Framework,
}

impl Default for LoopDefaults {
    fn default() -> Self {
        LoopDefaults {
            stop_phrase: "So the answer is:".into(),
            max_steps: 5,
            top_k: 4,
            max_passages: 15,
            passage_word_cap: 100,
            max_sentence_tokens: 48,
            framework: crate::prompt::Framework::Ircot,
        }
    }
}

/// The graph's shape facts and I/O names.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GraphInfo {
    /// Decoder layers (one past/present key and value each).
    pub num_layers: usize,
    /// Key/value heads held in the cache.
    pub num_kv_heads: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Size of one head.
    pub head_dim: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Logits per position.
    pub vocab_size: usize,
    /// Graph inputs, in order (`input_ids`, `attention_mask`, `position_ids`,
    /// `past_key_values.{i}.key|value`).
    pub inputs: Vec<String>,
    /// Graph outputs, in order (`logits`, `present.{i}.key|value`).
    pub outputs: Vec<String>,
    /// Name of the optional int64 scalar input that limits `logits` to the last N positions
    /// (HF's `logits_to_keep`; 0 = every position). It is an initializer-backed input whose
    /// default is 0, so a caller that does not feed it (onnxruntime-genai) gets every position.
    /// `None` for exports that always compute every position.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logits_to_keep: Option<String>,
    /// How the graph computes attention and grows its KV cache (absent: standard operators).
    #[serde(default, skip_serializing_if = "AttentionOp::is_standard")]
    pub attention: AttentionOp,
}

/// The attention form of an export (`steper-export --attention`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AttentionOp {
    /// Standard ONNX operators: `Concat` of the cache, `MatMul`/`Softmax` attention over an
    /// additive mask built from `attention_mask`. Runs everywhere (ONNX Runtime, TensorRT,
    /// tract) and takes left-padded batches.
    #[default]
    Standard,
    /// ONNX Runtime's `com.microsoft.GroupQueryAttention` contrib operator (one fused kernel
    /// appends the new keys/values and attends). ONNX Runtime only; it assumes every row's
    /// tokens start at position 0 (right padding), so left-padded batched decoding is refused.
    GroupQueryAttention,
}

impl AttentionOp {
    /// Whether this is [`AttentionOp::Standard`].
    pub fn is_standard(&self) -> bool {
        *self == AttentionOp::Standard
    }

    /// The name used on the command line and in `steper.json`.
    pub fn as_str(&self) -> &'static str {
        match self {
            AttentionOp::Standard => "standard",
            AttentionOp::GroupQueryAttention => "group-query-attention",
        }
    }
}

impl std::str::FromStr for AttentionOp {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "standard" => Ok(AttentionOp::Standard),
            "gqa" | "group-query-attention" => Ok(AttentionOp::GroupQueryAttention),
            other => Err(Error::InvalidOption {
                option: "attention".into(),
                expected: "standard or gqa (group-query-attention)".into(),
                got: other.into(),
            }),
        }
    }
}

/// Contents of `steper.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Always [`MANIFEST_FORMAT`].
    pub format: String,
    /// [`MANIFEST_VERSION`].
    pub version: u32,
    /// Prompt template version the model was trained with.
    pub template_version: String,
    /// How step prompts are laid out (`plain`, the default, is left out of the file; `chat`
    /// renders them with the model's chat template from `tokenizer_config.json`).
    #[serde(default, skip_serializing_if = "crate::prompt::PromptFormat::is_plain")]
    pub prompt_format: crate::prompt::PromptFormat,
    /// The ONNX file, relative to the manifest.
    pub model_file: String,
    /// The tokenizer file, relative to the manifest.
    pub tokenizer_file: String,
    /// `fp32`, `fp16` or `int8` (QDQ).
    pub dtype: String,
    /// Longest sequence the model accepts.
    pub context_length: usize,
    /// BOS id, if the model uses one.
    pub bos_token_id: Option<u32>,
    /// Ids that end a generated sentence (any of them; Llama-3.x lists several). A manifest
    /// that wrote one id as `eos_token_id` (a number) is read as a list of one.
    #[serde(alias = "eos_token_id", deserialize_with = "one_or_many_ids")]
    pub eos_token_ids: Vec<u32>,
    /// Padding id.
    pub pad_token_id: Option<u32>,
    /// Graph facts and I/O names.
    pub graph: GraphInfo,
    /// Loop defaults.
    #[serde(rename = "loop")]
    pub loop_defaults: LoopDefaults,
    /// What produced the export (tool and version), informational.
    #[serde(default)]
    pub producer: String,
    /// Weight quantization of the linear layers, if any (`None`: float weights).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantization: Option<WeightQuantization>,
}

/// How an export's linear-layer weights are quantized (`steper-export --quantize`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WeightQuantization {
    /// Bits per weight: 4 or 8.
    pub bits: u32,
    /// Weights per block along the input dimension, one scale (and with `zero_points` one zero
    /// point) per block.
    pub block_size: usize,
    /// `ort-cpu` (`com.microsoft.MatMulNBits`) or `portable` (ONNX `DequantizeLinear` + `MatMul`).
    pub target: String,
    /// The ONNX form written: `MatMulNBits` or `DequantizeLinear`.
    pub op: String,
    /// `MatMulNBits` `accuracy_level` (4 = int8 compute), when that op is used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accuracy_level: Option<u32>,
    /// Whether the vocabulary projection (lm_head / tied embedding) is quantized too.
    pub lm_head: bool,
    /// Per-block zero points (asymmetric blocks); absent or false: symmetric, zero point 0.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub zero_points: bool,
    /// The zero points are float block minimums (llama.cpp's Q4_1 form), added to the integer
    /// product as a block-sum correction; absent or false: integer zero points.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub float_zero_points: bool,
    /// Layers (and a vocabulary projection) that int4 could not reproduce exactly were quantized
    /// to int8 instead (`steper-export --off-grid-int8`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub off_grid_int8: bool,
    /// Number of linear layers quantized.
    pub layers: usize,
    /// How the codes were chosen: `gptq` (second-order error compensation with calibration
    /// Hessians); absent: round-to-nearest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// GPTQ's damping, relative to the mean of the Hessian's diagonal (with `method: gptq`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub damp: Option<f64>,
}

impl Manifest {
    /// Reads and checks `steper.json` (format, version, template version, I/O names).
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let m: Manifest = serde_json::from_str(&text).map_err(|e| Error::BadLine {
            path: path.to_path_buf(),
            line: e.line(),
            message: e.to_string(),
        })?;
        m.check(path)?;
        Ok(m)
    }

    /// Checks the fields a runtime relies on.
    pub fn check(&self, path: &Path) -> Result<()> {
        let bad = |message: String| Error::Model {
            path: path.to_path_buf(),
            message,
        };
        if self.format != MANIFEST_FORMAT {
            return Err(bad(format!(
                "field `format`: expected {MANIFEST_FORMAT:?}, got {:?}",
                self.format
            )));
        }
        if self.version != MANIFEST_VERSION {
            return Err(bad(format!(
                "field `version`: this runtime reads manifest version {MANIFEST_VERSION}, got {}",
                self.version
            )));
        }
        if self.template_version != TEMPLATE_VERSION {
            return Err(bad(format!(
                "field `template_version`: expected {TEMPLATE_VERSION:?}, got {:?}",
                self.template_version
            )));
        }
        let g = &self.graph;
        let want_in = Self::input_names(g.num_layers);
        if g.inputs != want_in {
            return Err(bad(format!(
                "field `graph.inputs`: expected {want_in:?}, got {:?}",
                g.inputs
            )));
        }
        let want_out = Self::output_names(g.num_layers);
        if g.outputs != want_out {
            return Err(bad(format!(
                "field `graph.outputs`: expected {want_out:?}, got {:?}",
                g.outputs
            )));
        }
        if self.context_length == 0 || g.vocab_size == 0 || g.head_dim == 0 || g.num_kv_heads == 0 {
            return Err(bad(
                "fields `context_length`, `graph.vocab_size`, `graph.head_dim`, `graph.num_kv_heads` must be positive".into(),
            ));
        }
        Ok(())
    }

    /// Writes the manifest (pretty JSON) atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self).map_err(|e| Error::Json {
            what: "manifest",
            message: e.to_string(),
        })?;
        Ok(steper_fsutil::write_atomic(path, text.as_bytes())?)
    }

    /// Optimum's input names for `layers` decoder layers.
    pub fn input_names(layers: usize) -> Vec<String> {
        let mut v = vec![
            "input_ids".to_string(),
            "attention_mask".to_string(),
            "position_ids".to_string(),
        ];
        for i in 0..layers {
            v.push(format!("past_key_values.{i}.key"));
            v.push(format!("past_key_values.{i}.value"));
        }
        v
    }

    /// Optimum's output names for `layers` decoder layers.
    pub fn output_names(layers: usize) -> Vec<String> {
        let mut v = vec!["logits".to_string()];
        for i in 0..layers {
            v.push(format!("present.{i}.key"));
            v.push(format!("present.{i}.value"));
        }
        v
    }
}

/// A token id list written either as one number or as a list of numbers.
fn one_or_many_ids<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<Vec<u32>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Ids {
        One(u32),
        Many(Vec<u32>),
    }
    Ok(match Ids::deserialize(d)? {
        Ids::One(i) => vec![i],
        Ids::Many(v) => v,
    })
}

#[cfg(test)]
mod eos_ids_tests {
    use super::*;

    /// `json` with its `eos_token_ids` entry replaced by `key: value`.
    fn with_eos(key: &str, value: serde_json::Value) -> serde_json::Result<Manifest> {
        let mut v = serde_json::json!({
            "format": MANIFEST_FORMAT, "version": MANIFEST_VERSION,
            "template_version": crate::TEMPLATE_VERSION, "model_file": "model.onnx",
            "tokenizer_file": "tokenizer.json", "dtype": "fp32", "context_length": 64,
            "bos_token_id": 1, "pad_token_id": null,
            "graph": {"num_layers": 1, "num_kv_heads": 1, "num_attention_heads": 1,
                      "head_dim": 8, "hidden_size": 8, "vocab_size": 16,
                      "inputs": Manifest::input_names(1), "outputs": Manifest::output_names(1)},
        });
        v["loop"] = serde_json::to_value(LoopDefaults::default())?;
        v[key] = value;
        serde_json::from_value(v)
    }

    #[test]
    fn several_eos_ids_and_an_old_single_id_are_read() -> serde_json::Result<()> {
        let m = with_eos("eos_token_ids", serde_json::json!([128001, 128008, 128009]))?;
        assert_eq!(m.eos_token_ids, vec![128001, 128008, 128009]);
        let m = with_eos("eos_token_ids", serde_json::json!(2))?;
        assert_eq!(m.eos_token_ids, vec![2]);
        let m = with_eos("eos_token_id", serde_json::json!(2))?;
        assert_eq!(m.eos_token_ids, vec![2]);
        // Written back as the list.
        let text = serde_json::to_string(&m)?;
        assert!(text.contains("\"eos_token_ids\":[2]"), "{text}");
        Ok(())
    }

    #[test]
    fn the_framework_defaults_to_ircot_and_old_manifests_are_written_as_read(
    ) -> serde_json::Result<()> {
        // A manifest written before the framework choice: no `framework` in `loop`.
        let old = with_eos("eos_token_ids", serde_json::json!([2]))?;
        let old_text = serde_json::to_string_pretty(&old)?;
        assert!(!old_text.contains("framework"), "{old_text}");
        let read: Manifest = serde_json::from_str(&old_text)?;
        assert_eq!(
            read.loop_defaults.framework,
            crate::prompt::Framework::Ircot
        );
        assert_eq!(serde_json::to_string_pretty(&read)?, old_text);
        assert_eq!(
            crate::LoopOptions::from(&read.loop_defaults).framework,
            crate::prompt::Framework::Ircot
        );
        // A Self-Ask model names its framework, and the loop options take it.
        let mut sa = read;
        sa.loop_defaults.framework = crate::prompt::Framework::SelfAsk;
        let text = serde_json::to_string(&sa)?;
        assert!(text.contains("\"framework\":\"self-ask\""), "{text}");
        let back: Manifest = serde_json::from_str(&text)?;
        assert_eq!(
            crate::LoopOptions::from(&back.loop_defaults).framework,
            crate::prompt::Framework::SelfAsk
        );
        // An unknown framework is refused with the field's name.
        let bad = text.replace("\"self-ask\"", "\"selfask\"");
        let err = serde_json::from_str::<Manifest>(&bad)
            .map(|_| ())
            .unwrap_err();
        assert!(err.to_string().contains("selfask"), "{err}");
        Ok(())
    }

    #[test]
    fn a_quantization_record_without_method_reads_as_round_to_nearest_and_gptq_round_trips(
    ) -> serde_json::Result<()> {
        // A record written before GPTQ: no `method` or `damp`.
        let old = serde_json::json!({"bits": 4, "block_size": 32, "target": "ort-cpu",
            "op": "MatMulNBits", "accuracy_level": 4, "lm_head": true, "layers": 211});
        let mut v = serde_json::to_value(with_eos("eos_token_ids", serde_json::json!([2]))?)?;
        v["quantization"] = old;
        let m: Manifest = serde_json::from_value(v)?;
        let q = m.quantization.clone().expect("quantization read");
        assert_eq!((q.method, q.damp), (None, None));
        let text = serde_json::to_string(&m)?;
        assert!(!text.contains("method") && !text.contains("damp"), "{text}");
        let mut g = m;
        if let Some(q) = g.quantization.as_mut() {
            q.method = Some("gptq".into());
            q.damp = Some(0.01);
        }
        let back: Manifest = serde_json::from_str(&serde_json::to_string(&g)?)?;
        assert_eq!(back.quantization, g.quantization);
        Ok(())
    }
}
