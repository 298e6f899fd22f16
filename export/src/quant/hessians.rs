//! The calibration Hessians GPTQ needs ([`super::gptq`]): for every linear weight, `H = Σ x xᵀ`
//! of the inputs it reads, summed over calibration tokens.
//!
//! `steper-calibrate --hessians` writes them into its output directory as [`HESSIANS_FILE`], a
//! safetensors file: one f32 `[K, K]` tensor per distinct layer input, keyed by the HF name of
//! the first weight that reads it (`model.layers.N.self_attn.q_proj.weight`); the other weights
//! that read the same input (k/v beside q, up beside gate) are aliases in the file's metadata
//! (`alias:<weight>` → key). The metadata also holds the format, the number of tokens summed
//! and the [`model_identity`] of the weights it was made from, which `steper-export
//! --calibration` compares with the checkpoint it exports before using any Hessian.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;
use steper_models::{LlamaConfig, Weights};

use crate::error::{Error, Result};

/// File name of the Hessians in a calibration directory.
pub const HESSIANS_FILE: &str = "hessians.safetensors";
/// `format` in the file's metadata.
pub const FORMAT: &str = "steper-hessians";
/// `version` in the file's metadata.
pub const VERSION: &str = "1";
const ALIAS: &str = "alias:";

/// The HF weight name of a linear weight initializer of a float `steper-export` graph: the
/// transposed `<weight>.T` a `MatMul` reads, or the `[out, in]` matrix a `Gemm` reads as is
/// (`lm_head.weight`, or `model.embed_tokens.weight` for tied embeddings).
pub fn weight_name(initializer: &str) -> &str {
    initializer.strip_suffix(".T").unwrap_or(initializer)
}

/// Identity of a model's linear weights: a 64-bit FNV-1a hash (hex) over `(name, rows, cols,
/// values)` of every weight, in name order, each weight row-major `[out, in]` as little-endian
/// f32 bits. The calibration (from the fp32 ONNX export) and the export (from the checkpoint)
/// compute it over the same weights, so equal identities mean the same model.
pub fn model_identity<'a>(weights: impl IntoIterator<Item = WeightRef<'a>>) -> String {
    let mut v: Vec<WeightRef<'a>> = weights.into_iter().collect();
    v.sort_by(|a, b| a.name.cmp(b.name));
    let mut h = Fnv::new();
    for w in &v {
        h.bytes(w.name.as_bytes());
        h.bytes(&(w.rows as u64).to_le_bytes());
        h.bytes(&(w.cols as u64).to_le_bytes());
        for x in w.data {
            h.bytes(&x.to_bits().to_le_bytes());
        }
    }
    format!("fnv1a64:{:016x}", h.0)
}

/// One weight of [`model_identity`]: row-major `[rows, cols]` (`[out, in]`).
#[derive(Debug, Clone, Copy)]
pub struct WeightRef<'a> {
    /// HF name.
    pub name: &'a str,
    /// Output features.
    pub rows: usize,
    /// Input features.
    pub cols: usize,
    /// The values.
    pub data: &'a [f32],
}

struct Fnv(u64);

impl Fnv {
    fn new() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
    fn bytes(&mut self, b: &[u8]) {
        for &x in b {
            self.0 ^= x as u64;
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
}

/// The weights whose inputs calibration sums Hessians for, in a model of `cfg`: every layer's
/// seven linear weights and the vocabulary projection ([`super::head_weight`]).
pub fn linear_weights(cfg: &LlamaConfig) -> Vec<String> {
    let mut v = Vec::new();
    for l in 0..cfg.num_hidden_layers {
        for p in steper_models::arch::Projection::ALL {
            v.push(p.weight_name(l));
        }
    }
    v.push(super::head_weight(cfg).into());
    v
}

/// [`model_identity`] of the checkpoint weights `w` of a model of `cfg`.
pub fn checkpoint_identity(cfg: &LlamaConfig, w: &Weights) -> Result<String> {
    use crate::graph::WeightSource;
    let mut owned = Vec::new();
    for name in linear_weights(cfg) {
        let (data, shape) = w.tensor(&name, false)?;
        let [rows, cols] = shape[..] else {
            return Err(Error::Tensor {
                name,
                message: format!("expected a 2-D weight, got shape {shape:?}"),
            });
        };
        owned.push((name, rows, cols, data));
    }
    Ok(model_identity(owned.iter().map(
        |(name, rows, cols, data)| WeightRef {
            name,
            rows: *rows,
            cols: *cols,
            data,
        },
    )))
}

/// Hessians of a model's linear layers (see the module doc).
#[derive(Debug, Clone, PartialEq)]
pub struct Hessians {
    /// Calibration tokens summed.
    pub tokens: u64,
    /// [`model_identity`] of the model they were collected on.
    pub model: String,
    /// One `(K, row-major [K, K] sum)` per distinct input, keyed by its first weight.
    mats: BTreeMap<String, (usize, Vec<f64>)>,
    /// Weight → key of `mats`, for every weight (a key maps to itself).
    by_weight: BTreeMap<String, String>,
}

impl Hessians {
    /// Empty, for `tokens` tokens of the model `model` ([`model_identity`]).
    pub fn new(model: String, tokens: u64) -> Self {
        Hessians {
            tokens,
            model,
            mats: BTreeMap::new(),
            by_weight: BTreeMap::new(),
        }
    }

    /// Adds the `[k, k]` Hessian `h` of the input read by `weights` (HF names, at least one).
    pub fn insert(&mut self, weights: &[String], k: usize, h: Vec<f64>) -> Result<()> {
        let Some(key) = weights.first() else {
            return Err(Error::Unsupported("a Hessian read by no weight".into()));
        };
        if h.len() != k * k {
            return Err(Error::Tensor {
                name: key.clone(),
                message: format!("expected a {k}×{k} Hessian, got {} values", h.len()),
            });
        }
        for w in weights {
            self.by_weight.insert(w.clone(), key.clone());
        }
        self.mats.insert(key.clone(), (k, h));
        Ok(())
    }

    /// The Hessian of the input `weight` reads: `(K, row-major [K, K])`.
    pub fn get(&self, weight: &str) -> Option<(usize, &[f64])> {
        let key = self.by_weight.get(weight)?;
        self.mats.get(key).map(|(k, h)| (*k, h.as_slice()))
    }

    /// The weights that have a Hessian, in name order.
    pub fn weights(&self) -> impl Iterator<Item = &str> {
        self.by_weight.keys().map(String::as_str)
    }

    /// The safetensors bytes (f32 tensors; metadata: format, version, tokens, model, aliases).
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let raw: Vec<(&String, usize, Vec<u8>)> = self
            .mats
            .iter()
            .map(|(name, (k, h))| {
                let b: Vec<u8> = h.iter().flat_map(|&x| (x as f32).to_le_bytes()).collect();
                (name, *k, b)
            })
            .collect();
        let mut views = Vec::with_capacity(raw.len());
        for (name, k, b) in &raw {
            let v = TensorView::new(Dtype::F32, vec![*k, *k], b).map_err(|e| Error::Tensor {
                name: (*name).clone(),
                message: e.to_string(),
            })?;
            views.push(((*name).clone(), v));
        }
        let mut meta: HashMap<String, String> = HashMap::new();
        meta.insert("format".into(), FORMAT.into());
        meta.insert("version".into(), VERSION.into());
        meta.insert("tokens".into(), self.tokens.to_string());
        meta.insert("model".into(), self.model.clone());
        for (w, key) in &self.by_weight {
            if w != key {
                meta.insert(format!("{ALIAS}{w}"), key.clone());
            }
        }
        safetensors::serialize(views, Some(meta)).map_err(|e| Error::Tensor {
            name: HESSIANS_FILE.into(),
            message: e.to_string(),
        })
    }

    /// Writes [`HESSIANS_FILE`] into `dir` atomically; returns its path.
    pub fn save(&self, dir: &Path) -> Result<PathBuf> {
        let path = dir.join(HESSIANS_FILE);
        steper_fsutil::write_atomic(&path, &self.to_bytes()?)?;
        Ok(path)
    }

    /// Reads `bytes` of the file `path` (named in errors).
    pub fn from_bytes(bytes: &[u8], path: &Path) -> Result<Self> {
        let bad = |message: String| Error::Calibration {
            dir: path.to_path_buf(),
            message,
        };
        let (_, meta) = SafeTensors::read_metadata(bytes)
            .map_err(|e| bad(format!("not a safetensors file: {e}")))?;
        let m = meta.metadata().clone().unwrap_or_default();
        if m.get("format").map(String::as_str) != Some(FORMAT) {
            return Err(bad(format!("metadata `format` is not `{FORMAT}`")));
        }
        if m.get("version").map(String::as_str) != Some(VERSION) {
            return Err(bad(format!(
                "metadata `version` {:?}, expected {VERSION}",
                m.get("version")
            )));
        }
        let tokens = m
            .get("tokens")
            .and_then(|t| t.parse::<u64>().ok())
            .ok_or_else(|| bad("metadata `tokens` is missing or not a count".into()))?;
        let model = m
            .get("model")
            .cloned()
            .ok_or_else(|| bad("metadata `model` (the model identity) is missing".into()))?;
        let st = SafeTensors::deserialize(bytes)
            .map_err(|e| bad(format!("not a safetensors file: {e}")))?;
        let mut out = Hessians::new(model, tokens);
        for name in st.names() {
            let t = st
                .tensor(name)
                .map_err(|e| bad(format!("tensor `{name}`: {e}")))?;
            let k = match t.shape() {
                [a, b] if a == b => *a,
                s => {
                    return Err(bad(format!(
                        "tensor `{name}`: shape {s:?}, expected [K, K]"
                    )))
                }
            };
            let h: Vec<f64> = match t.dtype() {
                Dtype::F32 => t
                    .data()
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64)
                    .collect(),
                Dtype::F64 => t
                    .data()
                    .chunks_exact(8)
                    .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
                    .collect(),
                d => {
                    return Err(bad(format!(
                        "tensor `{name}`: dtype {d:?}, expected F32 or F64"
                    )))
                }
            };
            out.insert(&[name.to_string()], k, h)?;
        }
        for (key, target) in &m {
            if let Some(w) = key.strip_prefix(ALIAS) {
                if !out.mats.contains_key(target) {
                    return Err(bad(format!(
                        "alias `{w}` names `{target}`, which the file does not hold"
                    )));
                }
                out.by_weight.insert(w.to_string(), target.clone());
            }
        }
        Ok(out)
    }

    /// Reads [`HESSIANS_FILE`] of the calibration directory `dir`.
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join(HESSIANS_FILE);
        let bytes = std::fs::read(&path).map_err(|e| Error::Calibration {
            dir: dir.to_path_buf(),
            message: format!(
                "cannot read {HESSIANS_FILE} ({e}); run steper-calibrate with --hessians"
            ),
        })?;
        Self::from_bytes(&bytes, &path)
    }

    /// Loads the Hessians of `dir` for the checkpoint of `cfg` and `w`, refusing a directory
    /// made for another model ([`Error::Calibration`] naming it) or one that lacks the Hessian
    /// of a weight in `needed` ([`Error::MissingHessian`] naming the weight and the directory).
    pub fn load_for(dir: &Path, cfg: &LlamaConfig, w: &Weights, needed: &[String]) -> Result<Self> {
        let h = Self::load(dir)?;
        let id = checkpoint_identity(cfg, w)?;
        if h.model != id {
            return Err(Error::Calibration {
                dir: dir.to_path_buf(),
                message: format!(
                    "made for another model (weights {}, this checkpoint's {id}); calibrate \
                     the fp32 export of this checkpoint",
                    h.model
                ),
            });
        }
        if let Some(missing) = needed.iter().find(|n| h.get(n).is_none()) {
            return Err(Error::MissingHessian {
                dir: dir.to_path_buf(),
                weight: missing.clone(),
            });
        }
        Ok(h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weight_names_of_matmul_and_gemm_initializers() {
        assert_eq!(
            weight_name("model.layers.3.mlp.down_proj.weight.T"),
            "model.layers.3.mlp.down_proj.weight"
        );
        assert_eq!(weight_name("lm_head.weight"), "lm_head.weight");
        assert_eq!(
            weight_name("model.embed_tokens.weight"),
            "model.embed_tokens.weight"
        );
    }

    fn sample() -> Hessians {
        let mut h = Hessians::new("fnv1a64:0123456789abcdef".into(), 17);
        let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        h.insert(
            &names(&[
                "model.layers.0.self_attn.q_proj.weight",
                "model.layers.0.self_attn.k_proj.weight",
                "model.layers.0.self_attn.v_proj.weight",
            ]),
            2,
            vec![4.0, 1.5, 1.5, 9.0],
        )
        .unwrap();
        h.insert(
            &names(&["model.layers.0.mlp.down_proj.weight"]),
            3,
            vec![1.0, 0.0, 0.25, 0.0, 2.0, 0.0, 0.25, 0.0, 3.0],
        )
        .unwrap();
        h
    }

    #[test]
    fn safetensors_round_trip_keeps_matrices_aliases_tokens_and_identity() {
        let h = sample();
        let bytes = h.to_bytes().unwrap();
        let back = Hessians::from_bytes(&bytes, Path::new("x/hessians.safetensors")).unwrap();
        assert_eq!(back, h);
        let (k, m) = back.get("model.layers.0.self_attn.v_proj.weight").unwrap();
        assert_eq!((k, m), (2, &[4.0, 1.5, 1.5, 9.0][..]));
        assert!(back.get("model.layers.0.mlp.up_proj.weight").is_none());
        assert_eq!(back.weights().count(), 4);
    }

    #[test]
    fn a_file_of_another_format_is_refused_naming_it() {
        let st = safetensors::serialize(
            [(
                "w",
                TensorView::new(Dtype::F32, vec![1, 1], &[0u8; 4]).unwrap(),
            )],
            None,
        )
        .unwrap();
        let e = Hessians::from_bytes(&st, Path::new("cal/hessians.safetensors"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("cal/hessians.safetensors") && e.contains("format"),
            "{e}"
        );
    }

    #[test]
    fn identity_depends_on_every_value_and_not_on_order() {
        let a = [1.0f32, 2.0, 3.0, 4.0];
        let b = [5.0f32, 6.0];
        let w = |name, rows, cols, data| WeightRef {
            name,
            rows,
            cols,
            data,
        };
        let id = model_identity([w("a", 2, 2, &a[..]), w("b", 1, 2, &b[..])]);
        assert_eq!(
            id,
            model_identity([w("b", 1, 2, &b[..]), w("a", 2, 2, &a[..])])
        );
        let a2 = [1.0f32, 2.0, 3.0, 4.5];
        assert_ne!(
            id,
            model_identity([w("a", 2, 2, &a2[..]), w("b", 1, 2, &b[..])])
        );
        assert_ne!(
            id,
            model_identity([w("a", 1, 4, &a[..]), w("b", 1, 2, &b[..])])
        );
    }
}
