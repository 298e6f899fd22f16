//! On-disk cache of the frozen bottom of the student: for each example, the hidden states after
//! the first `layers` decoder layers (embeddings frozen too), so that epochs, modes and seeds
//! that see the same example run only the trained top layers.
//!
//! Layout of the cache directory:
//! - `hidden.bin`: the rows of every cached example, one after the other, little-endian f16 or
//!   f32 (`[len, hidden]` each);
//! - `index.json`: what the rows were computed with (a key of the config, the frozen layer count
//!   and the frozen weights; the dtype) and, per example (a key of its input tokens), the offset
//!   and length of its rows. The index is written atomically after the rows are appended, so an
//!   interrupted write leaves rows that no index names (they are cut off at the next open);
//! - `lock`: held while a run uses the cache (one run at a time).
//!
//! A cache whose index does not match the model (another checkpoint, other frozen layers,
//! another dtype) or whose data file is shorter than its index says is rebuilt from scratch;
//! examples not in the index are computed on first use and appended.
//!
//! Each example's rows are computed alone (batch of one, no padding) and rounded to the cache
//! dtype before their first use, so a run reads exactly the values a resumed or later run reads.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};
use steper_fsutil::write_atomic;
use steper_models::{Llama, Weights};

use super::Example;
use crate::error::{Error, Result};

const INDEX_FILE: &str = "index.json";
const DATA_FILE: &str = "hidden.bin";
const LOCK_FILE: &str = "lock";
const FORMAT_VERSION: u32 = 1;

/// Element type of the cached hidden states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum CacheDtype {
    /// Half precision (half the disk; rows rounded to ~3 significant digits).
    F16,
    /// Single precision (the values the plain path computes, up to batching order).
    F32,
}

impl CacheDtype {
    fn dtype(self) -> DType {
        match self {
            CacheDtype::F16 => DType::F16,
            CacheDtype::F32 => DType::F32,
        }
    }

    fn bytes(self) -> usize {
        match self {
            CacheDtype::F16 => 2,
            CacheDtype::F32 => 4,
        }
    }
}

/// What a run did with the cache.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct CacheStats {
    /// Examples read from the cache.
    pub hits: u64,
    /// Examples computed and appended.
    pub misses: u64,
    /// Whether an existing cache was discarded because it did not match (model, layers, dtype,
    /// or a truncated data file).
    pub rebuilt: bool,
    /// Why it was rebuilt.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rebuilt_because: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Index {
    version: u32,
    model_key: String,
    layers: usize,
    hidden: usize,
    dtype: CacheDtype,
    /// `[example key, offset in bytes, rows]`.
    entries: Vec<(String, u64, usize)>,
}

/// The cache of one (model, frozen layers, dtype).
pub struct PrefixCache {
    dir: PathBuf,
    index: Index,
    entries: HashMap<u64, (u64, usize)>,
    data: File,
    data_len: u64,
    dirty: bool,
    _lock: File,
    /// Counters of this run.
    pub stats: CacheStats,
}

/// 64-bit FNV-1a over words; stable across runs and platforms.
struct Fnv(u64);

impl Fnv {
    fn new() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
    fn word(&mut self, w: u64) {
        self.0 = (self.0 ^ w).wrapping_mul(0x0000_0100_0000_01b3);
    }
    fn bytes(&mut self, b: &[u8]) {
        for c in b.chunks(8) {
            let mut w = [0u8; 8];
            w[..c.len()].copy_from_slice(c);
            self.word(u64::from_le_bytes(w));
        }
        self.word(b.len() as u64);
    }
}

/// Key of an example's cached rows: its input tokens (`prompt ++ target` minus the last token).
fn example_key(e: &Example) -> u64 {
    let mut h = Fnv::new();
    let input = e.prompt.iter().chain(e.target.iter()).take(e.input_len());
    let mut n = 0u64;
    for &t in input {
        h.word(t as u64);
        n += 1;
    }
    h.word(n);
    h.0
}

/// Key of what the rows depend on: the config, the frozen layer count, the dtype, the model's
/// compute dtype and the values of the embeddings and of the frozen layers' weights.
fn model_key(model: &Llama, weights: &Weights, layers: usize, dtype: CacheDtype) -> Result<String> {
    let mut h = Fnv::new();
    let cfg = serde_json::to_string(model.config()).map_err(|e| Error::Input(e.to_string()))?;
    h.bytes(cfg.as_bytes());
    h.word(layers as u64);
    h.word(dtype.bytes() as u64);
    // Rows computed in a half type differ from f32's (an f32 model keeps the key it always had).
    if model.dtype() != DType::F32 {
        h.bytes(model.dtype().as_str().as_bytes());
    }
    for (name, t) in weights.tensors() {
        let frozen_layer = name
            .strip_prefix("model.layers.")
            .and_then(|r| r.split('.').next())
            .and_then(|n| n.parse::<usize>().ok())
            .map(|l| l < layers)
            .unwrap_or(false);
        if frozen_layer || name == "model.embed_tokens.weight" {
            h.bytes(name.as_bytes());
            let v: Vec<f32> = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
            for pair in v.chunks(2) {
                let lo = pair[0].to_bits() as u64;
                let hi = pair.get(1).map(|x| x.to_bits() as u64).unwrap_or(0);
                h.word(lo | (hi << 32));
            }
        }
    }
    Ok(format!("{:016x}", h.0))
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl PrefixCache {
    /// Opens (or creates, or rebuilds) the cache in `dir` for the first `layers` layers of
    /// `model`, whose weights are `weights`.
    pub fn open(
        dir: &Path,
        model: &Llama,
        weights: &Weights,
        layers: usize,
        dtype: CacheDtype,
    ) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let lock_path = dir.join(LOCK_FILE);
        let lock = File::create(&lock_path).map_err(io(&lock_path))?;
        if lock.try_lock().is_err() {
            return Err(Error::Input(format!(
                "prefix cache {} is in use by another run (one run at a time)",
                dir.display()
            )));
        }
        let key = model_key(model, weights, layers, dtype)?;
        let hidden = model.config().hidden_size;
        let fresh = Index {
            version: FORMAT_VERSION,
            model_key: key.clone(),
            layers,
            hidden,
            dtype,
            entries: Vec::new(),
        };
        let index_path = dir.join(INDEX_FILE);
        let data_path = dir.join(DATA_FILE);
        let mut stats = CacheStats::default();
        let existing: Option<std::result::Result<Index, serde_json::Error>> =
            std::fs::read_to_string(&index_path)
                .ok()
                .map(|t| serde_json::from_str(&t));
        let existing = match existing {
            None => None,
            Some(Err(e)) => {
                stats.rebuilt = true;
                stats.rebuilt_because = Some(format!("unreadable index: {e}"));
                None
            }
            Some(Ok(ix)) => {
                let why = if ix.version != FORMAT_VERSION {
                    Some(format!("format version {}", ix.version))
                } else if ix.model_key != key || ix.layers != layers || ix.hidden != hidden {
                    Some(format!(
                        "made for another model or frozen-layer count (key {}, {} layers; now {key}, {layers})",
                        ix.model_key, ix.layers
                    ))
                } else if ix.dtype != dtype {
                    Some(format!("dtype {:?}, now {dtype:?}", ix.dtype))
                } else {
                    None
                };
                match why {
                    Some(w) => {
                        stats.rebuilt = true;
                        stats.rebuilt_because = Some(w);
                        None
                    }
                    None => Some(ix),
                }
            }
        };
        let row_bytes = (hidden * dtype.bytes()) as u64;
        let mut index = existing.unwrap_or(fresh.clone());
        let needed = index
            .entries
            .iter()
            .map(|(_, off, rows)| off + *rows as u64 * row_bytes)
            .max()
            .unwrap_or(0);
        let on_disk = std::fs::metadata(&data_path).map(|m| m.len()).unwrap_or(0);
        if on_disk < needed {
            stats.rebuilt = true;
            stats.rebuilt_because = Some(format!(
                "{} holds {on_disk} bytes, the index needs {needed}",
                data_path.display()
            ));
            index = fresh;
        }
        let data = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&data_path)
            .map_err(io(&data_path))?;
        // Rows no index names (an interrupted append, or a discarded cache) are cut off.
        let keep = if index.entries.is_empty() { 0 } else { needed };
        data.set_len(keep).map_err(io(&data_path))?;
        let mut entries = HashMap::with_capacity(index.entries.len());
        for (k, off, rows) in &index.entries {
            let k = u64::from_str_radix(k, 16).map_err(|_| {
                Error::Input(format!("{}: bad example key {k}", index_path.display()))
            })?;
            entries.insert(k, (*off, *rows));
        }
        let mut cache = PrefixCache {
            dir: dir.to_path_buf(),
            index,
            entries,
            data,
            data_len: keep,
            dirty: stats.rebuilt,
            _lock: lock,
            stats,
        };
        cache.flush()?;
        Ok(cache)
    }

    /// Frozen layer count the cache was made for.
    pub fn layers(&self) -> usize {
        self.index.layers
    }

    /// Hidden states `[b, t, hidden]` (model dtype) after the frozen layers for `examples`,
    /// right-padded with zeros to `t` positions; examples not cached yet are computed, appended
    /// and counted as misses.
    pub fn batch_hidden(
        &mut self,
        model: &Llama,
        examples: &[&Example],
        t: usize,
    ) -> Result<Tensor> {
        let d = self.index.hidden;
        let mut rows = Vec::with_capacity(examples.len());
        for e in examples {
            let x = self.example_hidden(model, e)?;
            let n = x.dim(0)?;
            let x = if n < t {
                Tensor::cat(&[&x, &Tensor::zeros((t - n, d), x.dtype(), x.device())?], 0)?
            } else {
                x
            };
            rows.push(x);
        }
        Ok(Tensor::stack(&rows, 0)?)
    }

    fn example_hidden(&mut self, model: &Llama, e: &Example) -> Result<Tensor> {
        let key = example_key(e);
        let d = self.index.hidden;
        let dt = self.index.dtype;
        let dev = model.device().clone();
        if let Some(&(off, rows)) = self.entries.get(&key) {
            let mut buf = vec![0u8; rows * d * dt.bytes()];
            let path = self.dir.join(DATA_FILE);
            self.data.read_exact_at(&mut buf, off).map_err(io(&path))?;
            self.stats.hits += 1;
            let t = Tensor::from_raw_buffer(&buf, dt.dtype(), &[rows, d], &dev)?;
            return Ok(t.to_dtype(model.dtype())?);
        }
        let n = e.input_len();
        let ids: Vec<u32> = e
            .prompt
            .iter()
            .chain(e.target.iter())
            .take(n)
            .copied()
            .collect();
        let ids = Tensor::from_vec(ids, (1, n), &dev)?;
        let seq = model.prepare(&ids, None)?;
        let x = model
            .forward_layers(&model.embed(&seq)?, &seq, 0..self.index.layers)?
            .detach()
            .squeeze(0)?
            .to_dtype(dt.dtype())?;
        let bytes: Vec<u8> = match dt {
            CacheDtype::F16 => x
                .flatten_all()?
                .to_vec1::<half::f16>()?
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
            CacheDtype::F32 => x
                .flatten_all()?
                .to_vec1::<f32>()?
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
        };
        let path = self.dir.join(DATA_FILE);
        self.data
            .write_all_at(&bytes, self.data_len)
            .map_err(io(&path))?;
        let off = self.data_len;
        self.data_len += bytes.len() as u64;
        self.entries.insert(key, (off, n));
        self.index.entries.push((format!("{key:016x}"), off, n));
        self.dirty = true;
        self.stats.misses += 1;
        Ok(x.to_dtype(model.dtype())?)
    }

    /// Makes appended rows durable and writes the index atomically (a no-op when nothing was
    /// added).
    pub fn flush(&mut self) -> Result<()> {
        if !self.dirty {
            return Ok(());
        }
        let path = self.dir.join(DATA_FILE);
        self.data.flush().map_err(io(&path))?;
        self.data.sync_data().map_err(io(&path))?;
        let text = serde_json::to_string(&self.index).map_err(|e| Error::Input(e.to_string()))?;
        write_atomic(&self.dir.join(INDEX_FILE), text.as_bytes())?;
        self.dirty = false;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fit::forward::tests::{assert_close, examples, tiny};
    use crate::fit::forward::{batch_losses, make_batch, Prefix};
    use crate::fit::loss::combine;
    use crate::fit::LossMode;
    use candle_core::Device;

    /// The cached (batch of one, f32) and the batched frozen prefix differ only by summation
    /// order inside the matmuls: loss agreement.
    const CACHE_F32_LOSS_RTOL: f64 = 1e-5;
    /// Gradient agreement (relative to each parameter's largest gradient) with an f32 cache.
    const CACHE_F32_GRAD_RTOL: f64 = 1e-4;
    /// Loss agreement with an f16 cache (hidden states rounded to 11 significant bits).
    const CACHE_F16_LOSS_RTOL: f64 = 5e-3;

    fn top_trained(
        cfg: &steper_models::LlamaConfig,
        w: Weights,
    ) -> Result<(Weights, Vec<(String, candle_core::Var)>)> {
        let n = cfg.num_hidden_layers;
        let mut frozen = std::collections::BTreeMap::new();
        let mut trained = std::collections::BTreeMap::new();
        for (k, t) in w.tensors() {
            if k.starts_with(&format!("model.layers.{}.", n - 1)) || k == "model.norm.weight" {
                trained.insert(k.clone(), t.clone());
            } else {
                frozen.insert(k.clone(), t.clone());
            }
        }
        let (trained, vars) = Weights::from_map(trained).into_vars()?;
        let mut all = Weights::from_map(frozen);
        for (k, t) in trained.tensors() {
            all.insert(k.clone(), t.clone());
        }
        Ok((all, vars))
    }

    #[test]
    fn cached_prefix_gives_the_plain_loss_and_gradients_and_is_reused() -> anyhow::Result<()> {
        let tmp = tempfile::tempdir()?;
        let (cfg, w) = tiny()?;
        let k = cfg.num_hidden_layers - 1;
        let (all, vars) = top_trained(&cfg, w)?;
        let model = Llama::new(&cfg, &all)?;
        let ex = examples();
        let refs: Vec<&Example> = ex.iter().collect();
        let batch = make_batch(&refs, &Device::Cpu)?;
        let s: [Tensor; 3] = std::array::from_fn(|_| Tensor::new(0.2f32, &Device::Cpu).unwrap());
        let loss = |p: &mut Prefix<'_>| -> Result<Tensor> {
            Ok(combine(
                &batch_losses(&model, &refs, &batch, p)?,
                LossMode::Steper,
                &s,
            )?
            .expect("stages present"))
        };
        let plain = loss(&mut Prefix {
            frozen_layers: k,
            cache: None,
        })?;
        let dir = tmp.path().join("cache");
        let mut cache = PrefixCache::open(&dir, &model, &all, k, CacheDtype::F32)?;
        let cached = loss(&mut Prefix {
            frozen_layers: k,
            cache: Some(&mut cache),
        })?;
        assert_eq!(cache.stats.misses, ex.len() as u64);
        assert_eq!(cache.stats.hits, 0);
        let (lp, lc): (f32, f32) = (plain.to_scalar()?, cached.to_scalar()?);
        assert!(
            ((lp - lc) as f64).abs() <= CACHE_F32_LOSS_RTOL * lp.abs() as f64,
            "{lp} vs {lc}"
        );
        let gp = plain.backward()?;
        let gc = cached.backward()?;
        for (name, v) in &vars {
            let a = gp.get(v.as_tensor()).expect("plain gradient");
            let b = gc.get(v.as_tensor()).expect("cached gradient");
            assert_close(name, a, b, CACHE_F32_GRAD_RTOL)?;
        }
        // A second pass reads every example back, bit for bit the same loss.
        let again = loss(&mut Prefix {
            frozen_layers: k,
            cache: Some(&mut cache),
        })?;
        assert_eq!(cache.stats.hits, ex.len() as u64);
        assert_eq!(again.to_scalar::<f32>()?, lc);
        cache.flush()?;
        drop(cache);
        // Reopened by a later run: everything is a hit, same loss.
        let mut cache = PrefixCache::open(&dir, &model, &all, k, CacheDtype::F32)?;
        assert!(!cache.stats.rebuilt);
        let later = loss(&mut Prefix {
            frozen_layers: k,
            cache: Some(&mut cache),
        })?;
        assert_eq!((cache.stats.hits, cache.stats.misses), (ex.len() as u64, 0));
        assert_eq!(later.to_scalar::<f32>()?, lc);
        drop(cache);
        // f16 rows: another dtype rebuilds, the loss stays close.
        let mut c16 = PrefixCache::open(&dir, &model, &all, k, CacheDtype::F16)?;
        assert!(c16.stats.rebuilt, "{:?}", c16.stats);
        let l16 = loss(&mut Prefix {
            frozen_layers: k,
            cache: Some(&mut c16),
        })?;
        let l16: f32 = l16.to_scalar()?;
        assert!(
            ((l16 - lp) as f64).abs() <= CACHE_F16_LOSS_RTOL * lp.abs() as f64,
            "{l16} vs {lp}"
        );
        Ok(())
    }

    #[test]
    fn a_cache_of_another_model_or_a_truncated_one_is_rebuilt() -> anyhow::Result<()> {
        let tmp = tempfile::tempdir()?;
        let (cfg, w) = tiny()?;
        let k = cfg.num_hidden_layers - 1;
        let (all, _) = top_trained(&cfg, w)?;
        let model = Llama::new(&cfg, &all)?;
        let ex = examples();
        let refs: Vec<&Example> = ex.iter().collect();
        let dir = tmp.path().join("cache");
        {
            let mut c = PrefixCache::open(&dir, &model, &all, k, CacheDtype::F32)?;
            let first = c.batch_hidden(&model, &refs, 20)?;
            c.flush()?;
            // The lock keeps a second run out while the first holds the cache.
            let second = PrefixCache::open(&dir, &model, &all, k, CacheDtype::F32);
            assert!(matches!(second, Err(Error::Input(ref m)) if m.contains("in use")));
            drop(first);
        }
        // Other weights (another seed): detected by the key.
        let (all2, _) = top_trained(&cfg, Weights::random(&cfg, 99, &Device::Cpu)?)?;
        let model2 = Llama::new(&cfg, &all2)?;
        let c = PrefixCache::open(&dir, &model2, &all2, k, CacheDtype::F32)?;
        assert!(c.stats.rebuilt);
        assert!(c
            .stats
            .rebuilt_because
            .as_deref()
            .unwrap_or("")
            .contains("another model"));
        drop(c);
        // Another frozen-layer count.
        let c = PrefixCache::open(&dir, &model2, &all2, k - 1, CacheDtype::F32)?;
        assert!(c.stats.rebuilt);
        drop(c);
        // A data file shorter than its index.
        let mut c = PrefixCache::open(&dir, &model, &all, k, CacheDtype::F32)?;
        c.batch_hidden(&model, &refs, 20)?;
        c.flush()?;
        drop(c);
        let data = dir.join(DATA_FILE);
        let len = std::fs::metadata(&data)?.len();
        File::options().write(true).open(&data)?.set_len(len / 2)?;
        let mut c = PrefixCache::open(&dir, &model, &all, k, CacheDtype::F32)?;
        assert!(c.stats.rebuilt, "{:?}", c.stats);
        c.batch_hidden(&model, &refs, 20)?;
        assert_eq!(c.stats.misses, ex.len() as u64);
        Ok(())
    }
}
