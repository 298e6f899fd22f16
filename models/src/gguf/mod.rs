//! Import of a llama.cpp GGUF file (`general.architecture` of a family in [`crate::arch`]:
//! `llama`, `qwen2`) into an HF-style checkpoint directory: every tensor dequantized to f32, Q/K
//! rows un-permuted back to HF's RoPE layout where the family's converter permuted them (Llama,
//! not Qwen2), tensor names mapped to HF names (biases included), `config.json` from the metadata and `tokenizer.json` rebuilt from the
//! `tokenizer.ggml.*` metadata. The way back, a trained checkpoint written as a GGUF that
//! llama.cpp runs, is [`export_gguf`] (module [`mod@write`]).

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

use crate::arch::{Family, Projection, LAYER_NORMS};
use crate::config::{LlamaConfig, TokenIds};
use crate::error::{Error, Result};
use crate::weights::{Weights, CONFIG_FILE, TOKENIZER_FILE};
use steper_fsutil::{Existing, StagingDir};

pub mod write;

pub use write::{export_gguf, GgufExportReport, GgufTensorType};

/// Tensor types this importer dequantizes (those candle's GGML kernels implement).
pub const SUPPORTED_TYPES: &[GgmlDType] = &[
    GgmlDType::F32,
    GgmlDType::F16,
    GgmlDType::BF16,
    GgmlDType::Q4_0,
    GgmlDType::Q4_1,
    GgmlDType::Q5_0,
    GgmlDType::Q5_1,
    GgmlDType::Q8_0,
    GgmlDType::Q2K,
    GgmlDType::Q3K,
    GgmlDType::Q4K,
    GgmlDType::Q5K,
    GgmlDType::Q6K,
    GgmlDType::Q8K,
];

/// What an import did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ImportReport {
    /// The GGUF file read.
    pub gguf: PathBuf,
    /// The checkpoint directory written.
    pub out: PathBuf,
    /// Number of tensors written.
    pub tensors: usize,
    /// Number of parameters.
    pub parameters: usize,
    /// Count of source tensors per GGML type.
    pub source_types: BTreeMap<String, usize>,
    /// Vocabulary size of the rebuilt tokenizer.
    pub vocab_size: usize,
    /// The `tokenizer.ggml.pre` name that chose the pre-tokenizer.
    pub pre_tokenizer: String,
    /// Model name from the metadata, if any.
    pub name: Option<String>,
}

/// A parsed GGUF file: metadata, tensor table, and the open file.
pub struct GgufFile {
    path: PathBuf,
    content: Content,
    file: File,
}

impl GgufFile {
    /// Opens and parses the header, metadata and tensor table, checking that every tensor lies
    /// inside the file.
    pub fn open(path: &Path) -> Result<Self> {
        let gerr = |message: String| Error::Gguf {
            path: path.to_path_buf(),
            message,
        };
        let mut file = File::open(path).map_err(|e| Error::io(path, e))?;
        let file_len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        let content =
            Content::read(&mut file).map_err(|e| gerr(format!("not a readable GGUF file: {e}")))?;
        for (name, info) in &content.tensor_infos {
            let elems = info.shape.elem_count();
            let bs = info.ggml_dtype.block_size();
            if elems % bs != 0 {
                return Err(gerr(format!(
                    "tensor `{name}`: {elems} elements is not a multiple of the block size {bs}"
                )));
            }
            let size = (elems / bs * info.ggml_dtype.type_size()) as u64;
            let end = content
                .tensor_data_offset
                .checked_add(info.offset)
                .and_then(|s| s.checked_add(size));
            match end {
                Some(end) if end <= file_len => {}
                _ => {
                    return Err(gerr(format!(
                        "tensor `{name}` ({:?}, {size} bytes at data offset {}) extends past the end of the file ({file_len} bytes): truncated or corrupted",
                        info.ggml_dtype, info.offset
                    )))
                }
            }
        }
        Ok(GgufFile {
            path: path.to_path_buf(),
            content,
            file,
        })
    }

    fn err(&self, message: impl Into<String>) -> Error {
        Error::Gguf {
            path: self.path.clone(),
            message: message.into(),
        }
    }

    /// A metadata value.
    pub fn meta(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    fn meta_u64(&self, key: &str) -> Result<u64> {
        let v = self
            .meta(key)
            .ok_or_else(|| self.err(format!("missing metadata key `{key}`")))?;
        value_u64(v)
            .ok_or_else(|| self.err(format!("metadata `{key}`: expected an integer, got {v:?}")))
    }

    fn meta_u64_opt(&self, key: &str) -> Result<Option<u64>> {
        match self.meta(key) {
            None => Ok(None),
            Some(_) => self.meta_u64(key).map(Some),
        }
    }

    fn meta_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.meta(key) {
            None => Ok(None),
            Some(Value::F32(v)) => Ok(Some(*v as f64)),
            Some(Value::F64(v)) => Ok(Some(*v)),
            Some(v) => value_u64(v)
                .map(|x| Some(x as f64))
                .ok_or_else(|| self.err(format!("metadata `{key}`: expected a number, got {v:?}"))),
        }
    }

    fn meta_str(&self, key: &str) -> Result<Option<String>> {
        match self.meta(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(v) => Err(self.err(format!("metadata `{key}`: expected a string, got {v:?}"))),
        }
    }

    fn meta_str_array(&self, key: &str) -> Result<Vec<String>> {
        match self.meta(key) {
            Some(Value::Array(items)) => items
                .iter()
                .enumerate()
                .map(|(i, v)| match v {
                    Value::String(s) => Ok(s.clone()),
                    other => Err(self.err(format!(
                        "metadata `{key}`[{i}]: expected a string, got {other:?}"
                    ))),
                })
                .collect(),
            Some(v) => Err(self.err(format!(
                "metadata `{key}`: expected an array of strings, got {}",
                type_name(v)
            ))),
            None => Err(self.err(format!("missing metadata key `{key}`"))),
        }
    }

    /// The `general.architecture` value.
    pub fn architecture(&self) -> Result<String> {
        self.meta_str("general.architecture")?
            .ok_or_else(|| self.err("missing metadata key `general.architecture`"))
    }

    /// The family of `general.architecture`; an unknown one is an error listing those known.
    pub fn family(&self) -> Result<&'static Family> {
        let arch = self.architecture()?;
        crate::arch::by_gguf_architecture(&arch).ok_or_else(|| {
            let known: Vec<&str> = crate::arch::FAMILIES
                .iter()
                .map(|f| f.gguf_architecture)
                .collect();
            self.err(format!(
                "general.architecture `{arch}` is not supported (supported: {known:?})"
            ))
        })
    }

    /// The HF config implied by the `{arch}.*` metadata.
    pub fn llama_config(&self) -> Result<LlamaConfig> {
        let fam = self.family()?;
        let key = |k: &str| format!("{}.{k}", fam.gguf_architecture);
        if self.content.tensor_infos.contains_key("rope_freqs.weight") {
            return Err(self.err(
                "tensor `rope_freqs.weight` (llama3 RoPE frequency factors) is not supported: the HF rope_scaling parameters cannot be recovered from it",
            ));
        }
        let hidden = self.meta_u64(&key("embedding_length"))? as usize;
        let heads = self.meta_u64(&key("attention.head_count"))? as usize;
        let kv = self
            .meta_u64_opt(&key("attention.head_count_kv"))?
            .map(|v| v as usize)
            .unwrap_or(heads);
        let head_dim = self
            .meta_u64_opt(&key("attention.key_length"))?
            .or(self.meta_u64_opt(&key("rope.dimension_count"))?)
            .map(|v| v as usize)
            .unwrap_or(hidden / heads.max(1));
        let vocab = match self.meta_u64_opt(&key("vocab_size"))? {
            Some(v) => v as usize,
            None => self
                .content
                .tensor_infos
                .get("token_embd.weight")
                .map(|t| t.shape.dims()[0])
                .ok_or_else(|| {
                    self.err(format!(
                        "missing `{}` and `token_embd.weight`",
                        key("vocab_size")
                    ))
                })?,
        };
        let cfg = LlamaConfig {
            model_type: fam.model_type.into(),
            architectures: vec![fam.hf_architecture.into()],
            hidden_size: hidden,
            intermediate_size: self.meta_u64(&key("feed_forward_length"))? as usize,
            num_hidden_layers: self.meta_u64(&key("block_count"))? as usize,
            num_attention_heads: heads,
            num_key_value_heads: Some(kv),
            head_dim: if head_dim * heads == hidden {
                None
            } else {
                Some(head_dim)
            },
            rms_norm_eps: self
                .meta_f64(&key("attention.layer_norm_rms_epsilon"))?
                .unwrap_or(1e-5),
            rope_theta: self
                .meta_f64(&key("rope.freq_base"))?
                .unwrap_or(fam.default_rope_theta),
            rope_scaling: None,
            max_position_embeddings: self.meta_u64_opt(&key("context_length"))?.unwrap_or(2048)
                as usize,
            vocab_size: vocab,
            tie_word_embeddings: !self.content.tensor_infos.contains_key("output.weight"),
            bos_token_id: self
                .meta_u64_opt("tokenizer.ggml.bos_token_id")?
                .map(|v| v as u32),
            eos_token_id: self
                .meta_u64_opt("tokenizer.ggml.eos_token_id")?
                .map(|v| TokenIds::One(v as u32)),
            pad_token_id: self
                .meta_u64_opt("tokenizer.ggml.padding_token_id")?
                .map(|v| v as u32),
            torch_dtype: "float32".into(),
            attention_bias: None,
            mlp_bias: None,
            hidden_act: None,
            use_sliding_window: None,
            sliding_window: None,
            max_window_layers: None,
        };
        cfg.validate(&self.path)?;
        Ok(cfg)
    }

    /// One tensor as stored (its blocks as they are in the file), with its GGUF (row-major,
    /// reversed) shape.
    fn read_stored(&mut self, name: &str) -> Result<QTensor> {
        let info = self
            .content
            .tensor_infos
            .get(name)
            .ok_or_else(|| self.err(format!("missing tensor `{name}`")))?;
        if !SUPPORTED_TYPES.contains(&info.ggml_dtype) {
            return Err(self.err(format!(
                "tensor `{name}` has type {:?}, which cannot be dequantized (supported: {SUPPORTED_TYPES:?})",
                info.ggml_dtype
            )));
        }
        info.read(
            &mut self.file,
            self.content.tensor_data_offset,
            &Device::Cpu,
        )
        .map_err(|e| Error::Gguf {
            path: self.path.clone(),
            message: format!("tensor `{name}`: {e}"),
        })
    }

    /// Dequantizes one tensor to f32 with its GGUF (row-major, reversed) shape.
    fn dequantize(&mut self, name: &str) -> Result<Tensor> {
        let q = self.read_stored(name)?;
        let t = q.dequantize(&Device::Cpu)?;
        let v: Vec<f32> = t.flatten_all()?.to_vec1()?;
        if let Some(i) = v.iter().position(|x| !x.is_finite()) {
            return Err(self.err(format!(
                "tensor `{name}` holds a non-finite value at element {i}: corrupted data"
            )));
        }
        Ok(t)
    }

    /// All weights in HF layout and names, dequantized to f32.
    pub fn hf_weights(&mut self, cfg: &LlamaConfig) -> Result<Weights> {
        let mut w = Weights::default();
        for m in tensor_map(cfg) {
            let t = self.dequantize(&m.gguf)?;
            // llama.cpp's `permute` for interleaved RoPE, undone for HF's half rotation.
            let t = match m.permuted_heads {
                Some(n) => m.map_rows(&t, |x| unpermute_rope_rows(x, n))?,
                None => t,
            };
            w.insert(m.hf, t);
        }
        w.check(cfg, &self.path)?;
        Ok(w)
    }

    /// Counts of source tensors per GGML type.
    pub fn type_counts(&self) -> BTreeMap<String, usize> {
        let mut m = BTreeMap::new();
        for info in self.content.tensor_infos.values() {
            *m.entry(format!("{:?}", info.ggml_dtype)).or_insert(0) += 1;
        }
        m
    }

    /// Rebuilds a Hugging Face tokenizer from the `tokenizer.ggml.*` metadata.
    pub fn tokenizer(&self) -> Result<(tokenizers::Tokenizer, String)> {
        let model = self.meta_str("tokenizer.ggml.model")?.unwrap_or_default();
        if model != "gpt2" {
            return Err(self.err(format!(
                "tokenizer.ggml.model `{model}` is not supported (only `gpt2`, byte-level BPE)"
            )));
        }
        let pre = self.meta_str("tokenizer.ggml.pre")?.unwrap_or_else(|| {
            self.family()
                .map(|f| f.gguf_default_pre)
                .unwrap_or("default")
                .to_string()
        });
        let tokens = self.meta_str_array("tokenizer.ggml.tokens")?;
        let merges = self.meta_str_array("tokenizer.ggml.merges")?;
        let types: Vec<i64> = match self.meta("tokenizer.ggml.token_type") {
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| {
                    value_u64(v)
                        .map(|x| x as i64)
                        .or(match v {
                            Value::I32(x) => Some(*x as i64),
                            _ => None,
                        })
                        .unwrap_or(1)
                })
                .collect(),
            _ => vec![1; tokens.len()],
        };
        if types.len() != tokens.len() {
            return Err(self.err(format!(
                "tokenizer.ggml.token_type has {} entries, tokenizer.ggml.tokens has {}",
                types.len(),
                tokens.len()
            )));
        }
        let add_bos = matches!(
            self.meta("tokenizer.ggml.add_bos_token"),
            Some(Value::Bool(true))
        );
        let bos = self
            .meta_u64_opt("tokenizer.ggml.bos_token_id")?
            .map(|v| v as u32);
        let spec = crate::tokenizer::GgufTokenizerSpec {
            tokens,
            merges,
            token_types: types,
            pre: pre.clone(),
            add_bos: if add_bos { bos } else { None },
        };
        let tok = crate::tokenizer::build_byte_level_bpe(&spec).map_err(|e| self.err(e))?;
        Ok((tok, pre))
    }
}

/// Undoes llama.cpp's `permute(w, n_head)` of the Q/K projection rows (convert_hf_to_gguf.py):
/// GGUF rows are `[head, half, pair]` interleaved; HF rows are `[head, pair, half]`.
pub fn unpermute_rope_rows(w: &Tensor, n_head: usize) -> Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    if n_head == 0 || rows % (2 * n_head) != 0 {
        return Err(Error::Input(format!(
            "cannot un-permute a [{rows}, {cols}] projection for {n_head} heads"
        )));
    }
    let half = rows / n_head / 2;
    Ok(w.reshape((n_head, half, 2, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((rows, cols))?)
}

/// The inverse of [`unpermute_rope_rows`] (what llama.cpp's converter does), used by tests to
/// build GGUF files.
pub fn permute_rope_rows(w: &Tensor, n_head: usize) -> Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    if n_head == 0 || rows % (2 * n_head) != 0 {
        return Err(Error::Input(format!(
            "cannot permute a [{rows}, {cols}] projection for {n_head} heads"
        )));
    }
    let half = rows / n_head / 2;
    Ok(w.reshape((n_head, 2, half, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((rows, cols))?)
}

/// How one GGUF tensor of a family's model maps onto its HF tensor.
#[derive(Debug, Clone)]
pub struct TensorMapping {
    /// The GGUF name (`blk.0.attn_q.weight`).
    pub gguf: String,
    /// The HF name (`model.layers.0.self_attn.q_proj.weight`).
    pub hf: String,
    /// The head count of llama.cpp's Q/K row permutation, where the family's converter permutes
    /// this tensor's rows.
    pub permuted_heads: Option<usize>,
    /// A bias (one dimension: its rows are permuted as a column).
    pub bias: bool,
}

impl TensorMapping {
    /// Applies a row operation (a permutation) to the tensor, a bias as a one-column matrix.
    pub fn map_rows(&self, t: &Tensor, f: impl Fn(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
        if self.bias {
            Ok(f(&t.unsqueeze(1)?)?.squeeze(1)?)
        } else {
            f(t)
        }
    }
}

/// Every tensor of `cfg`'s model as llama.cpp's converter names and lays it out, in the
/// converter's order (embedding, final norm, output head when untied, then per layer the norms,
/// the projections and their biases).
pub fn tensor_map(cfg: &LlamaConfig) -> Vec<TensorMapping> {
    let fam = cfg.family();
    let plain = |gguf: &str, hf: &str| TensorMapping {
        gguf: gguf.into(),
        hf: hf.into(),
        permuted_heads: None,
        bias: false,
    };
    let mut out = vec![
        plain("token_embd.weight", "model.embed_tokens.weight"),
        plain("output_norm.weight", "model.norm.weight"),
    ];
    if !cfg.tie_word_embeddings {
        out.push(plain("output.weight", "lm_head.weight"));
    }
    for l in 0..cfg.num_hidden_layers {
        for (hf, gg) in LAYER_NORMS {
            out.push(plain(
                &format!("blk.{l}.{gg}.weight"),
                &format!("model.layers.{l}.{hf}.weight"),
            ));
        }
        for p in Projection::ALL {
            let heads = match p {
                Projection::Q if fam.gguf_permutes_qk => Some(cfg.num_attention_heads),
                Projection::K if fam.gguf_permutes_qk => Some(cfg.kv_heads()),
                _ => None,
            };
            out.push(TensorMapping {
                gguf: format!("blk.{l}.{}.weight", p.gguf()),
                hf: p.weight_name(l),
                permuted_heads: heads,
                bias: false,
            });
            if fam.has_bias(cfg, p) {
                out.push(TensorMapping {
                    gguf: format!("blk.{l}.{}.bias", p.gguf()),
                    hf: p.bias_name(l),
                    permuted_heads: heads,
                    bias: true,
                });
            }
        }
    }
    out
}

/// Imports `gguf` into a new checkpoint directory `out` (`config.json`, `model.safetensors`,
/// `tokenizer.json`). The directory is built under a temporary name and renamed into place, so a
/// failed import writes nothing.
pub fn import_gguf(gguf: &Path, out: &Path) -> Result<ImportReport> {
    let mut f = GgufFile::open(gguf)?;
    let cfg = f.llama_config()?;
    let (tok, pre) = f.tokenizer()?;
    let tok_vocab = tok.get_vocab_size(true);
    if tok_vocab > cfg.vocab_size {
        return Err(f.err(format!(
            "tokenizer has {tok_vocab} tokens but the embedding has {} rows",
            cfg.vocab_size
        )));
    }
    let weights = f.hf_weights(&cfg)?;
    let stage = StagingDir::new(out, Existing::Refuse)?;
    cfg.save(&stage.path().join(CONFIG_FILE))?;
    weights.save_dir(stage.path(), None)?;
    let tok_path = stage.path().join(TOKENIZER_FILE);
    tok.save(&tok_path, false)
        .map_err(|e| Error::Tokenizer(format!("{}: {e}", tok_path.display())))?;
    // `tokenizer.chat_template` and the BOS/EOS texts as transformers keeps them, so the chat
    // prompt format and the server's chat endpoint find the model's template.
    let mut tok_config = serde_json::json!({});
    if let Some(t) = f.meta_str("tokenizer.chat_template")? {
        tok_config["chat_template"] = serde_json::Value::String(t);
    }
    for (field, key) in [
        ("bos_token", "tokenizer.ggml.bos_token_id"),
        ("eos_token", "tokenizer.ggml.eos_token_id"),
    ] {
        let text = f
            .meta(key)
            .and_then(value_u64)
            .and_then(|id| u32::try_from(id).ok())
            .and_then(|id| tok.id_to_token(id));
        if let Some(text) = text {
            tok_config[field] = serde_json::Value::String(text);
        }
    }
    let tok_config_path = stage.path().join("tokenizer_config.json");
    let bytes = serde_json::to_vec_pretty(&tok_config)
        .map_err(|e| Error::Tokenizer(format!("{}: {e}", tok_config_path.display())))?;
    std::fs::write(&tok_config_path, bytes).map_err(|e| Error::io(&tok_config_path, e))?;
    let name = f.meta_str("general.name")?;
    stage.commit()?;
    Ok(ImportReport {
        gguf: gguf.to_path_buf(),
        out: out.to_path_buf(),
        tensors: weights.tensors().len(),
        parameters: weights.num_parameters(),
        source_types: f.type_counts(),
        vocab_size: tok_vocab,
        pre_tokenizer: pre,
        name,
    })
}

fn value_u64(v: &Value) -> Option<u64> {
    match v {
        Value::U8(x) => Some(*x as u64),
        Value::U16(x) => Some(*x as u64),
        Value::U32(x) => Some(*x as u64),
        Value::U64(x) => Some(*x),
        Value::I8(x) if *x >= 0 => Some(*x as u64),
        Value::I16(x) if *x >= 0 => Some(*x as u64),
        Value::I32(x) if *x >= 0 => Some(*x as u64),
        Value::I64(x) if *x >= 0 => Some(*x as u64),
        _ => None,
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Bool(_) => "a bool",
        Value::F32(_) | Value::F64(_) => "a float",
        _ => "an integer",
    }
}
