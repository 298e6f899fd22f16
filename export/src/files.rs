//! The files written beside `model.onnx`: `steper.json`, `genai_config.json` and the tokenizer
//! files.

use std::path::Path;

use serde_json::{json, Value};
use steper_models::LlamaConfig;
use steper_runtime::manifest::{GraphInfo, LoopDefaults, MANIFEST_FORMAT, MANIFEST_VERSION};
use steper_runtime::{Manifest, TEMPLATE_VERSION};

use crate::error::{Error, Result};
use crate::{ExportDtype, MODEL_FILE};

/// File name of the tokenizer in an export directory.
pub const TOKENIZER_FILE: &str = "tokenizer.json";
/// File name of the onnxruntime-genai config.
pub const GENAI_CONFIG_FILE: &str = "genai_config.json";
/// File name of the HF tokenizer config (onnxruntime-genai's tokenizer reads it).
pub const TOKENIZER_CONFIG_FILE: &str = "tokenizer_config.json";

/// The runtime manifest of an export of `cfg`.
pub fn manifest(cfg: &LlamaConfig, dtype: ExportDtype) -> Manifest {
    let layers = cfg.num_hidden_layers;
    Manifest {
        format: MANIFEST_FORMAT.into(),
        version: MANIFEST_VERSION,
        template_version: TEMPLATE_VERSION.into(),
        prompt_format: Default::default(),
        model_file: MODEL_FILE.into(),
        tokenizer_file: TOKENIZER_FILE.into(),
        dtype: dtype.as_str().into(),
        context_length: cfg.max_position_embeddings,
        bos_token_id: cfg.bos_token_id,
        eos_token_ids: cfg.eos_ids(),
        pad_token_id: pad_id(cfg),
        graph: GraphInfo {
            num_layers: layers,
            num_kv_heads: cfg.kv_heads(),
            num_attention_heads: cfg.num_attention_heads,
            head_dim: cfg.head_size(),
            hidden_size: cfg.hidden_size,
            vocab_size: cfg.vocab_size,
            inputs: Manifest::input_names(layers),
            outputs: Manifest::output_names(layers),
            logits_to_keep: Some(crate::graph::LOGITS_TO_KEEP.into()),
            attention: Default::default(),
        },
        loop_defaults: LoopDefaults::default(),
        producer: format!("steper-export {}", env!("CARGO_PKG_VERSION")),
        quantization: None,
    }
}

fn pad_id(cfg: &LlamaConfig) -> Option<u32> {
    cfg.pad_token_id.or_else(|| cfg.eos_ids().first().copied())
}

/// `genai_config.json` in onnxruntime-genai's format for an export of `cfg` (decoder-only,
/// separate past/present buffers: the standard graph concatenates the cache; `export` turns
/// `past_present_share_buffer` on for a GroupQueryAttention graph). A weight quantization is
/// recorded as the session option `steper.weight_quantization` (onnxruntime-genai hands unknown
/// session-option strings to ONNX Runtime as config entries, which ignores keys it does not
/// know), so the file says what was quantized without a key the genai parser would reject.
pub fn genai_config(cfg: &LlamaConfig, quant: Option<&crate::QuantOptions>) -> Value {
    let mut session_options = json!({
        "log_id": "onnxruntime-genai",
        "provider_options": []
    });
    if let Some(q) = quant {
        session_options["steper.weight_quantization"] = json!(crate::graph::describe(q));
    }
    let eos = cfg.eos_ids();
    let eos_json = if eos.len() == 1 {
        json!(eos[0])
    } else {
        json!(eos)
    };
    json!({
        "model": {
            "bos_token_id": cfg.bos_token_id.unwrap_or(0),
            "context_length": cfg.max_position_embeddings,
            "decoder": {
                "session_options": session_options,
                "filename": MODEL_FILE,
                "head_size": cfg.head_size(),
                "hidden_size": cfg.hidden_size,
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "position_ids": "position_ids",
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value"
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value"
                },
                "num_attention_heads": cfg.num_attention_heads,
                "num_hidden_layers": cfg.num_hidden_layers,
                "num_key_value_heads": cfg.kv_heads()
            },
            "eos_token_id": eos_json,
            "pad_token_id": pad_id(cfg).unwrap_or(0),
            "type": cfg.family().genai_type,
            "vocab_size": cfg.vocab_size
        },
        "search": {
            "diversity_penalty": 0.0,
            "do_sample": false,
            "early_stopping": true,
            "length_penalty": 1.0,
            "max_length": cfg.max_position_embeddings,
            "min_length": 0,
            "no_repeat_ngram_size": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": false,
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0
        }
    })
}

/// Copies the checkpoint's `tokenizer_config.json`, or writes a minimal one (onnxruntime-genai's
/// tokenizer wants it beside `tokenizer.json`).
pub fn write_tokenizer_config(checkpoint: &Path, out: &Path) -> Result<()> {
    let src = checkpoint.join(TOKENIZER_CONFIG_FILE);
    let dst = out.join(TOKENIZER_CONFIG_FILE);
    let bytes = if src.is_file() {
        std::fs::read(&src).map_err(|e| Error::io(&src, e))?
    } else {
        serde_json::to_vec_pretty(&json!({
            "tokenizer_class": "GPT2Tokenizer",
            "clean_up_tokenization_spaces": false,
            "model_max_length": 1_000_000
        }))?
    };
    steper_fsutil::write_atomic(&dst, &bytes)?;
    // transformers ≥ 4.43 may keep the chat template in its own file.
    let jinja = checkpoint.join(steper_runtime::prompt::chat::CHAT_TEMPLATE_FILE);
    if jinja.is_file() {
        let bytes = std::fs::read(&jinja).map_err(|e| Error::io(&jinja, e))?;
        steper_fsutil::write_atomic(
            &out.join(steper_runtime::prompt::chat::CHAT_TEMPLATE_FILE),
            &bytes,
        )?;
    }
    Ok(())
}
