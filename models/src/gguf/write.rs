//! A trained checkpoint written as a GGUF file that llama.cpp (and everything built on it:
//! llama-cpp-python, llama-server, Ollama) runs: `steper-export --format gguf --gguf-base BASE`.
//!
//! The base is the GGUF the student started from (the one `steper-train import` read). Its
//! metadata — architecture keys, the tokenizer with its merges and pre-tokenizer name, the chat
//! template — is copied as it is, so llama.cpp tokenizes and formats exactly as for the base.
//! Each tensor is then compared with the checkpoint's (in GGUF layout: Q/K rows permuted back
//! where the family's converter permutes them):
//!
//! - a tensor the checkpoint holds exactly as the base stores it (dequantized), i.e. a layer
//!   training left frozen, is copied block for block: the frozen part of the model is the base's
//!   bytes, not a requantization of them;
//! - a tensor training changed is quantized as `trained` ([`GgufTensorType`], Q8_0 by default:
//!   an update smaller than a 4-bit step survives 8 bits), except where the base keeps it float
//!   (norms, biases: F32, as llama.cpp expects them).
//!
//! A base made for another model (layer count, widths, heads, vocabulary, RoPE) is refused
//! naming the field, before anything is written; the file is written atomically.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use serde::Serialize;

use super::{permute_rope_rows, tensor_map, GgufFile};
use crate::checkpoint::Checkpoint;
use crate::config::LlamaConfig;
use crate::error::{Error, Result};
use crate::weights::CONFIG_FILE;

/// How the tensors that training changed are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum GgufTensorType {
    /// 8-bit blocks of 32 with an f16 scale (llama.cpp's Q8_0).
    #[serde(rename = "q8_0")]
    Q8_0,
    /// Half precision.
    F16,
    /// Single precision.
    F32,
}

impl GgufTensorType {
    /// The GGML type.
    pub fn ggml(self) -> GgmlDType {
        match self {
            GgufTensorType::Q8_0 => GgmlDType::Q8_0,
            GgufTensorType::F16 => GgmlDType::F16,
            GgufTensorType::F32 => GgmlDType::F32,
        }
    }
}

impl std::str::FromStr for GgufTensorType {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "q8_0" => Ok(GgufTensorType::Q8_0),
            "f16" => Ok(GgufTensorType::F16),
            "f32" => Ok(GgufTensorType::F32),
            _ => Err(Error::Input(format!(
                "--gguf-type: expected q8_0, f16 or f32, got `{s}`"
            ))),
        }
    }
}

/// What a GGUF export wrote.
#[derive(Debug, Clone, Serialize)]
pub struct GgufExportReport {
    /// The checkpoint read.
    pub checkpoint: PathBuf,
    /// The base GGUF whose metadata and frozen tensors were copied.
    pub base: PathBuf,
    /// The GGUF written.
    pub out: PathBuf,
    /// Tensors written.
    pub tensors: usize,
    /// Tensors the checkpoint holds exactly as the base stores them, copied block for block.
    pub copied: usize,
    /// Tensors training changed (GGUF names), written anew.
    pub rewritten: Vec<String>,
    /// The type of the rewritten tensors (norms and biases stay F32).
    pub trained_type: GgufTensorType,
    /// Tensors written per GGML type.
    pub types: BTreeMap<String, usize>,
    /// Size of the file.
    pub bytes: u64,
}

/// Writes `checkpoint` as the GGUF file `out`, with `base`'s metadata and, for every tensor
/// training left as the base stores it, the base's own blocks (see the module doc).
pub fn export_gguf(
    checkpoint: &Path,
    base: &Path,
    out: &Path,
    trained: GgufTensorType,
) -> Result<GgufExportReport> {
    let ck = Checkpoint::load(checkpoint, DType::F32, &Device::Cpu)?;
    let mut src = GgufFile::open(base)?;
    let base_cfg = src.llama_config()?;
    same_model(&ck.config, &base_cfg, &checkpoint.join(CONFIG_FILE), base)?;

    let maps = tensor_map(&ck.config);
    let known: BTreeSet<&str> = maps.iter().map(|m| m.gguf.as_str()).collect();
    if let Some(extra) = src
        .content
        .tensor_infos
        .keys()
        .find(|k| !known.contains(k.as_str()))
    {
        return Err(src.err(format!(
            "tensor `{extra}` is not one of the {} model's tensors, so the checkpoint cannot supply it",
            ck.config.model_type
        )));
    }

    let mut written: Vec<(String, QTensor)> = Vec::with_capacity(maps.len());
    let mut rewritten = Vec::new();
    for m in &maps {
        let stored = src.read_stored(&m.gguf)?;
        let ours = ck
            .weights
            .tensors()
            .get(&m.hf)
            .ok_or_else(|| Error::Checkpoint {
                path: checkpoint.to_path_buf(),
                message: format!("missing tensor `{}` (GGUF `{}`)", m.hf, m.gguf),
            })?;
        let ours = match m.permuted_heads {
            Some(n) => m.map_rows(ours, |x| permute_rope_rows(x, n))?,
            None => ours.clone(),
        };
        let base_values = stored.dequantize(&Device::Cpu)?;
        if base_values.dims() != ours.dims() {
            return Err(src.err(format!(
                "tensor `{}` is {:?}, the checkpoint's `{}` is {:?} in GGUF layout",
                m.gguf,
                base_values.dims(),
                m.hf,
                ours.dims()
            )));
        }
        if values(&base_values)? == values(&ours)? {
            written.push((m.gguf.clone(), stored));
        } else {
            let ty = rewritten_type(stored.dtype(), &ours, trained);
            written.push((m.gguf.clone(), QTensor::quantize(&ours, ty)?));
            rewritten.push(m.gguf.clone());
        }
    }
    // The base's tensor order (llama.cpp does not need it, but a diff of two files reads better).
    written.sort_by_key(|(name, _)| src.content.tensor_infos[name].offset);

    // Every key as it is, `general.architecture` first; the data is written 32-byte aligned, so
    // a base's other `general.alignment` would misdescribe it.
    let mut meta: Vec<(&str, &gguf_file::Value)> = src
        .content
        .metadata
        .iter()
        .filter(|(k, v)| {
            k.as_str() != "general.alignment" || matches!(v, gguf_file::Value::U32(32))
        })
        .map(|(k, v)| (k.as_str(), v))
        .collect();
    meta.sort_by_key(|(k, _)| (*k != "general.architecture", *k));
    let tensors: Vec<(&str, &QTensor)> = written.iter().map(|(n, t)| (n.as_str(), t)).collect();
    steper_fsutil::write_atomic_with(out, |w| {
        gguf_file::write(w, &meta, &tensors).map_err(std::io::Error::other)
    })?;

    // Read back: the header, the tensor table and every tensor's extent.
    GgufFile::open(out)?;
    let mut types = BTreeMap::new();
    for (_, t) in &written {
        *types.entry(format!("{:?}", t.dtype())).or_insert(0) += 1;
    }
    let bytes = std::fs::metadata(out).map_err(|e| Error::io(out, e))?.len();
    Ok(GgufExportReport {
        checkpoint: checkpoint.to_path_buf(),
        base: base.to_path_buf(),
        out: out.to_path_buf(),
        tensors: written.len(),
        copied: written.len() - rewritten.len(),
        rewritten,
        trained_type: trained,
        types,
        bytes,
    })
}

fn values(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.flatten_all()?.to_vec1::<f32>()?)
}

/// The type a changed tensor is written in: F32 where the base keeps it float (norms, biases),
/// else `trained` when its rows fill whole blocks, else F32.
fn rewritten_type(base: GgmlDType, t: &Tensor, trained: GgufTensorType) -> GgmlDType {
    let ty = trained.ggml();
    let row = t.dims().last().copied().unwrap_or(0);
    if matches!(base, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16)
        || !row.is_multiple_of(ty.block_size())
    {
        GgmlDType::F32
    } else {
        ty
    }
}

/// Refuses a base GGUF made for another model than the checkpoint's, naming the first field
/// that differs.
fn same_model(ours: &LlamaConfig, base: &LlamaConfig, config: &Path, gguf: &Path) -> Result<()> {
    let fields: [(&str, String, String); 11] = [
        (
            "model_type",
            ours.model_type.clone(),
            base.model_type.clone(),
        ),
        (
            "hidden_size",
            ours.hidden_size.to_string(),
            base.hidden_size.to_string(),
        ),
        (
            "intermediate_size",
            ours.intermediate_size.to_string(),
            base.intermediate_size.to_string(),
        ),
        (
            "num_hidden_layers",
            ours.num_hidden_layers.to_string(),
            base.num_hidden_layers.to_string(),
        ),
        (
            "num_attention_heads",
            ours.num_attention_heads.to_string(),
            base.num_attention_heads.to_string(),
        ),
        (
            "num_key_value_heads",
            ours.kv_heads().to_string(),
            base.kv_heads().to_string(),
        ),
        (
            "head_dim",
            ours.head_size().to_string(),
            base.head_size().to_string(),
        ),
        (
            "vocab_size",
            ours.vocab_size.to_string(),
            base.vocab_size.to_string(),
        ),
        (
            "tie_word_embeddings",
            ours.tie_word_embeddings.to_string(),
            base.tie_word_embeddings.to_string(),
        ),
        (
            "rope_theta",
            format!("{:e}", ours.rope_theta as f32),
            format!("{:e}", base.rope_theta as f32),
        ),
        (
            "rms_norm_eps",
            format!("{:e}", ours.rms_norm_eps as f32),
            format!("{:e}", base.rms_norm_eps as f32),
        ),
    ];
    for (field, got, expected) in fields {
        if got != expected {
            return Err(Error::Config {
                path: config.to_path_buf(),
                field: field.into(),
                expected: format!("{expected}, as in the base GGUF {}", gguf.display()),
                got,
            });
        }
    }
    if ours.rope_scaling.is_some() {
        return Err(Error::Config {
            path: config.to_path_buf(),
            field: "rope_scaling".into(),
            expected: format!(
                "none, as in the base GGUF {} (a GGUF cannot carry HF rope_scaling)",
                gguf.display()
            ),
            got: "a scaling".into(),
        });
    }
    Ok(())
}
