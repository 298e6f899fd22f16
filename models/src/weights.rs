//! Named model weights: random initialization, checkpoint directories (single or sharded
//! safetensors), and trainable copies.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::config::LlamaConfig;
use crate::error::{Error, Result};

/// File name of a single-file checkpoint.
pub const SAFETENSORS_FILE: &str = "model.safetensors";
/// File name of the index of a sharded checkpoint.
pub const SAFETENSORS_INDEX_FILE: &str = "model.safetensors.index.json";
/// File name of the config.
pub const CONFIG_FILE: &str = "config.json";
/// File name of the tokenizer.
pub const TOKENIZER_FILE: &str = "tokenizer.json";
/// Largest shard [`Weights::save_dir`] writes by default: transformers' `max_shard_size`
/// default of `save_pretrained` (5 GB, decimal).
pub const DEFAULT_MAX_SHARD_BYTES: usize = 5_000_000_000;

/// A set of named tensors with HF names.
#[derive(Clone, Default)]
pub struct Weights {
    tensors: BTreeMap<String, Tensor>,
}

impl Weights {
    /// Wraps a map of tensors.
    pub fn from_map(tensors: BTreeMap<String, Tensor>) -> Self {
        Weights { tensors }
    }

    /// The tensors by name.
    pub fn tensors(&self) -> &BTreeMap<String, Tensor> {
        &self.tensors
    }

    /// Adds or replaces one tensor.
    pub fn insert(&mut self, name: impl Into<String>, t: Tensor) {
        self.tensors.insert(name.into(), t);
    }

    /// The tensor `name`, checked against `shape`.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self.tensors.get(name).ok_or_else(|| Error::Checkpoint {
            path: "<weights>".into(),
            message: format!("missing tensor `{name}`"),
        })?;
        if t.dims() != shape {
            return Err(Error::Checkpoint {
                path: "<weights>".into(),
                message: format!(
                    "tensor `{name}` has shape {:?}, expected {shape:?}",
                    t.dims()
                ),
            });
        }
        Ok(t.clone())
    }

    /// Names and shapes of every tensor a model of `cfg` needs, in a stable order (the
    /// family's list, [`crate::arch::Family::tensors`]).
    pub fn expected(cfg: &LlamaConfig) -> Vec<(String, Vec<usize>)> {
        cfg.family().tensors(cfg)
    }

    /// Random weights for `cfg`, reproducible from `seed`: normal(0, 0.02) for matrices (HF's
    /// `initializer_range`) and biases (HF starts them at zero; random values keep a test's
    /// biases visible in the outputs), ones for norms.
    pub fn random(cfg: &LlamaConfig, seed: u64, device: &Device) -> Result<Self> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut tensors = BTreeMap::new();
        for (name, shape) in Self::expected(cfg) {
            let n: usize = shape.iter().product();
            let data = if shape.len() == 1 && !name.ends_with(".bias") {
                vec![1f32; n]
            } else {
                normal_vec(&mut rng, n, 0.02)
            };
            tensors.insert(name, Tensor::from_vec(data, shape, device)?);
        }
        Ok(Weights { tensors })
    }

    /// Loads `model.safetensors` or the shards listed in `model.safetensors.index.json` from a
    /// checkpoint directory, converted to `dtype`.
    pub fn load_dir(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        Self::load_dir_with(dir, Some(dtype), device)
    }

    /// Like [`Weights::load_dir`], each tensor kept in the dtype the file stores it in.
    pub fn load_dir_stored(dir: &Path, device: &Device) -> Result<Self> {
        Self::load_dir_with(dir, None, device)
    }

    fn load_dir_with(dir: &Path, dtype: Option<DType>, device: &Device) -> Result<Self> {
        let files = safetensors_files(dir)?;
        let mut tensors = BTreeMap::new();
        for f in files {
            let loaded =
                candle_core::safetensors::load(&f, device).map_err(|e| Error::Checkpoint {
                    path: f.clone(),
                    message: format!("cannot read safetensors: {e}"),
                })?;
            for (k, t) in loaded {
                let t = match dtype {
                    Some(d) if t.dtype() != d => t.to_dtype(d)?,
                    _ => t,
                };
                tensors.insert(k, t);
            }
        }
        Ok(Weights { tensors })
    }

    /// The dtype the weights are held in: that of the token embedding (HF checkpoints store
    /// every floating tensor in one dtype), else of the first tensor, else `f32`.
    pub fn dtype(&self) -> DType {
        self.tensors
            .get("model.embed_tokens.weight")
            .or_else(|| self.tensors.values().next())
            .map(|t| t.dtype())
            .unwrap_or(DType::F32)
    }

    /// A copy with every floating tensor converted to `dtype` (tensors already in it are
    /// shared, not copied).
    pub fn to_dtype(&self, dtype: DType) -> Result<Weights> {
        let mut tensors = BTreeMap::new();
        for (k, t) in &self.tensors {
            let t = if t.dtype().is_float() && t.dtype() != dtype {
                t.to_dtype(dtype)?
            } else {
                t.clone()
            };
            tensors.insert(k.clone(), t);
        }
        Ok(Weights { tensors })
    }

    /// Checks that every tensor `cfg` needs is present with the right shape.
    pub fn check(&self, cfg: &LlamaConfig, dir: &Path) -> Result<()> {
        for (name, shape) in Self::expected(cfg) {
            match self.tensors.get(&name) {
                None => {
                    return Err(Error::Checkpoint {
                        path: dir.to_path_buf(),
                        message: format!("missing tensor `{name}`"),
                    })
                }
                Some(t) if t.dims() != shape.as_slice() => {
                    return Err(Error::Checkpoint {
                        path: dir.to_path_buf(),
                        message: format!(
                            "tensor `{name}` has shape {:?}, config.json implies {shape:?}",
                            t.dims()
                        ),
                    })
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Saves into `dir` as `model.safetensors`, or as shards of at most `max_shard_bytes` with
    /// `model.safetensors.index.json` when the weights are larger. Each file is written
    /// atomically; stale files of the other layout are removed.
    pub fn save_dir(&self, dir: &Path, max_shard_bytes: Option<usize>) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let total: usize = self
            .tensors
            .values()
            .map(|t| t.elem_count() * t.dtype().size_in_bytes())
            .sum();
        let limit = max_shard_bytes.unwrap_or(usize::MAX);
        if total <= limit {
            save_safetensors(&dir.join(SAFETENSORS_FILE), self.tensors.iter())?;
            let idx = dir.join(SAFETENSORS_INDEX_FILE);
            if idx.exists() {
                std::fs::remove_file(&idx).map_err(|e| Error::io(&idx, e))?;
            }
            return remove_stale_shards(dir, &[]);
        }
        let mut shards: Vec<Vec<(&String, &Tensor)>> = vec![Vec::new()];
        let mut cur = 0usize;
        for (k, t) in &self.tensors {
            let sz = t.elem_count() * t.dtype().size_in_bytes();
            if cur > 0 && cur + sz > limit {
                shards.push(Vec::new());
                cur = 0;
            }
            cur += sz;
            if let Some(last) = shards.last_mut() {
                last.push((k, t));
            }
        }
        let n = shards.len();
        let mut weight_map = serde_json::Map::new();
        for (i, shard) in shards.iter().enumerate() {
            let name = format!("model-{:05}-of-{:05}.safetensors", i + 1, n);
            save_safetensors(&dir.join(&name), shard.iter().copied())?;
            for (k, _) in shard {
                weight_map.insert((*k).clone(), serde_json::Value::String(name.clone()));
            }
        }
        let index = serde_json::json!({
            "metadata": {"total_size": total},
            "weight_map": weight_map,
        });
        let text = serde_json::to_string_pretty(&index).unwrap_or_default();
        steper_fsutil::write_atomic(&dir.join(SAFETENSORS_INDEX_FILE), text.as_bytes())?;
        let single = dir.join(SAFETENSORS_FILE);
        if single.exists() {
            std::fs::remove_file(&single).map_err(|e| Error::io(&single, e))?;
        }
        let names: Vec<String> = (1..=n)
            .map(|i| format!("model-{i:05}-of-{n:05}.safetensors"))
            .collect();
        remove_stale_shards(dir, &names)
    }

    /// A copy with every tensor on `device` (tensors already there are shared, not copied).
    pub fn to_device(&self, device: &Device) -> Result<Weights> {
        let mut tensors = BTreeMap::new();
        for (k, t) in &self.tensors {
            tensors.insert(k.clone(), t.to_device(device)?);
        }
        Ok(Weights { tensors })
    }

    /// Turns every tensor into a trainable [`Var`]; returns weights backed by the vars (so a
    /// model built from them records gradients) and the vars by name.
    pub fn into_vars(self) -> Result<(Weights, Vec<(String, Var)>)> {
        let mut vars = Vec::with_capacity(self.tensors.len());
        let mut tensors = BTreeMap::new();
        for (k, t) in self.tensors {
            let v = Var::from_tensor(&t)?;
            tensors.insert(k.clone(), v.as_tensor().clone());
            vars.push((k, v));
        }
        Ok((Weights { tensors }, vars))
    }

    /// Total number of scalar parameters.
    pub fn num_parameters(&self) -> usize {
        self.tensors.values().map(|t| t.elem_count()).sum()
    }
}

fn save_safetensors<'a>(
    path: &Path,
    tensors: impl Iterator<Item = (&'a String, &'a Tensor)>,
) -> Result<()> {
    let list: Vec<(&String, &Tensor)> = tensors.collect();
    let mut metadata = std::collections::HashMap::new();
    metadata.insert("format".to_string(), "pt".to_string());
    let bytes = safetensors::serialize(list, Some(metadata)).map_err(|e| Error::Checkpoint {
        path: path.to_path_buf(),
        message: format!("cannot serialize safetensors: {e}"),
    })?;
    Ok(steper_fsutil::write_atomic(path, &bytes)?)
}

/// Removes `model-XXXXX-of-YYYYY.safetensors` files of an earlier save that `keep` does not
/// name, so a directory never holds shards its index does not list.
fn remove_stale_shards(dir: &Path, keep: &[String]) -> Result<()> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    for e in entries {
        let e = e.map_err(|e| Error::io(dir, e))?;
        let name = e.file_name().to_string_lossy().into_owned();
        let shard =
            name.starts_with("model-") && name.contains("-of-") && name.ends_with(".safetensors");
        if shard && !keep.contains(&name) {
            let p = e.path();
            std::fs::remove_file(&p).map_err(|e| Error::io(&p, e))?;
        }
    }
    Ok(())
}

/// The safetensors files of a checkpoint directory, in load order.
pub fn safetensors_files(dir: &Path) -> Result<Vec<std::path::PathBuf>> {
    let single = dir.join(SAFETENSORS_FILE);
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join(SAFETENSORS_INDEX_FILE);
    if !index.is_file() {
        return Err(Error::Checkpoint {
            path: dir.to_path_buf(),
            message: format!("neither {SAFETENSORS_FILE} nor {SAFETENSORS_INDEX_FILE} found"),
        });
    }
    let text = std::fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::Json {
        path: index.clone(),
        message: e.to_string(),
    })?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| Error::Json {
            path: index.clone(),
            message: "missing object field `weight_map`".into(),
        })?;
    let mut files: Vec<String> = Vec::new();
    for (k, f) in map {
        let f = f.as_str().ok_or_else(|| Error::Json {
            path: index.clone(),
            message: format!("weight_map[{k:?}]: expected a file name string"),
        })?;
        if !files.iter().any(|x| x == f) {
            files.push(f.to_string());
        }
    }
    files.sort();
    let mut out = Vec::new();
    for f in files {
        let p = dir.join(&f);
        if !p.is_file() {
            return Err(Error::MissingShard {
                index: index.clone(),
                shard: p,
            });
        }
        out.push(p);
    }
    Ok(out)
}

/// `n` samples of normal(0, std) from a seeded generator (Box–Muller).
pub(crate) fn normal_vec(rng: &mut ChaCha8Rng, n: usize, std: f32) -> Vec<f32> {
    use rand::Rng;
    let mut out = Vec::with_capacity(n + 1);
    while out.len() < n {
        let u1: f64 = rng.random::<f64>().max(1e-300);
        let u2: f64 = rng.random::<f64>();
        let r = (-2.0 * u1.ln()).sqrt();
        let th = 2.0 * std::f64::consts::PI * u2;
        out.push((r * th.cos()) as f32 * std);
        out.push((r * th.sin()) as f32 * std);
    }
    out.truncate(n);
    out
}
