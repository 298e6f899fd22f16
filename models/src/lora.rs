//! LoRA adapters (Hu et al. 2021): a projection `W` `[out, in]` becomes `W + (α / r) · B · A`
//! with `A` `[r, in]` (random) and `B` `[out, r]` (zero at the start), so only `r · (in + out)`
//! parameters per projection train. Adapters are named after their weight
//! (`model.layers.3.self_attn.q_proj.lora_a` / `.lora_b`), run unmerged during training
//! ([`crate::Llama::with_lora`]) and are folded into the weights for export ([`merge`]).

use std::collections::BTreeMap;
use std::ops::Range;

use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::config::LlamaConfig;
use crate::error::{Error, Result};
use crate::weights::Weights;

/// A projection an adapter can attach to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LoraTarget {
    /// `self_attn.q_proj`.
    Q,
    /// `self_attn.k_proj`.
    K,
    /// `self_attn.v_proj`.
    V,
    /// `self_attn.o_proj`.
    O,
    /// `mlp.gate_proj`.
    Gate,
    /// `mlp.up_proj`.
    Up,
    /// `mlp.down_proj`.
    Down,
}

impl LoraTarget {
    /// Every target, in layer order.
    pub const ALL: [LoraTarget; 7] = [
        LoraTarget::Q,
        LoraTarget::K,
        LoraTarget::V,
        LoraTarget::O,
        LoraTarget::Gate,
        LoraTarget::Up,
        LoraTarget::Down,
    ];

    /// The short name (`q`, …, `down`).
    pub fn short(self) -> &'static str {
        match self {
            LoraTarget::Q => "q",
            LoraTarget::K => "k",
            LoraTarget::V => "v",
            LoraTarget::O => "o",
            LoraTarget::Gate => "gate",
            LoraTarget::Up => "up",
            LoraTarget::Down => "down",
        }
    }

    /// The layer projection the adapter attaches to.
    pub fn projection(self) -> crate::arch::Projection {
        use crate::arch::Projection;
        match self {
            LoraTarget::Q => Projection::Q,
            LoraTarget::K => Projection::K,
            LoraTarget::V => Projection::V,
            LoraTarget::O => Projection::O,
            LoraTarget::Gate => Projection::Gate,
            LoraTarget::Up => Projection::Up,
            LoraTarget::Down => Projection::Down,
        }
    }

    /// The projection's name inside a layer.
    pub fn module(self) -> &'static str {
        self.projection().module()
    }

    /// Parses a comma-separated list (`q,k,v,o,gate,up,down`; `q_proj` etc. accepted too).
    /// An unknown name is an error naming it.
    pub fn parse_list(list: &str) -> Result<Vec<LoraTarget>> {
        let mut out = Vec::new();
        for raw in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let name = raw.strip_suffix("_proj").unwrap_or(raw);
            let t = LoraTarget::ALL
                .into_iter()
                .find(|t| t.short() == name)
                .ok_or_else(|| {
                    Error::Input(format!(
                        "unknown LoRA target `{raw}` (expected some of q, k, v, o, gate, up, down)"
                    ))
                })?;
            if !out.contains(&t) {
                out.push(t);
            }
        }
        if out.is_empty() {
            return Err(Error::Input("no LoRA target given".into()));
        }
        Ok(out)
    }
}

/// Adapter settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraConfig {
    /// Rank `r`.
    pub rank: usize,
    /// `α`; the update is scaled by `α / r`.
    pub alpha: f64,
    /// Projections that get an adapter.
    pub targets: Vec<LoraTarget>,
}

impl LoraConfig {
    /// `α / r`.
    pub fn scale(&self) -> f64 {
        self.alpha / self.rank as f64
    }
}

fn weight_shape(w: &Weights, name: &str) -> Result<(usize, usize)> {
    let t = w
        .tensors()
        .get(name)
        .ok_or_else(|| Error::Input(format!("LoRA target weight `{name}` is not in the model")))?;
    Ok(t.dims2()?)
}

/// Fresh adapters for `layers` of a model with weights `base`: `A` uniform in
/// `±1/sqrt(in)` (seeded), `B` zero, so the adapted model starts equal to the base.
pub fn init_adapters(
    cfg: &LlamaConfig,
    base: &Weights,
    lora: &LoraConfig,
    layers: Range<usize>,
    seed: u64,
    device: &Device,
) -> Result<Weights> {
    if lora.rank == 0 {
        return Err(Error::Input("LoRA rank must be positive".into()));
    }
    if layers.end > cfg.num_hidden_layers || layers.start >= layers.end {
        return Err(Error::Input(format!(
            "LoRA layers {layers:?} outside the model's {} layers",
            cfg.num_hidden_layers
        )));
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut out = BTreeMap::new();
    for l in layers {
        for t in &lora.targets {
            let p = format!("model.layers.{l}.{}", t.module());
            let (o, i) = weight_shape(base, &format!("{p}.weight"))?;
            let bound = 1.0 / (i as f64).sqrt();
            let a: Vec<f32> = (0..lora.rank * i)
                .map(|_| rng.random_range(-bound..bound) as f32)
                .collect();
            out.insert(
                format!("{p}.lora_a"),
                Tensor::from_vec(a, (lora.rank, i), device)?,
            );
            out.insert(
                format!("{p}.lora_b"),
                Tensor::zeros((o, lora.rank), DType::F32, device)?,
            );
        }
    }
    Ok(Weights::from_map(out))
}

/// `base` with every adapter folded in: `W ← W + scale · B · A` (HF-style weights again, no
/// adapter tensors). An adapter without its weight is an error naming it.
pub fn merge(base: &Weights, adapters: &Weights, scale: f64) -> Result<Weights> {
    let mut out = base.tensors().clone();
    for (name, a) in adapters.tensors() {
        let Some(p) = name.strip_suffix(".lora_a") else {
            if !name.ends_with(".lora_b") {
                return Err(Error::Input(format!(
                    "`{name}` is not a LoRA adapter (…lora_a / …lora_b)"
                )));
            }
            continue;
        };
        let b = adapters
            .tensors()
            .get(&format!("{p}.lora_b"))
            .ok_or_else(|| Error::Input(format!("LoRA adapter {p}: lora_b missing")))?;
        let wn = format!("{p}.weight");
        let w = out
            .get(&wn)
            .ok_or_else(|| {
                Error::Input(format!(
                    "LoRA adapter `{name}` matches no weight of the model"
                ))
            })?
            .clone();
        let delta = (b.matmul(a)? * scale)?.to_dtype(w.dtype())?;
        if delta.dims() != w.dims() {
            return Err(Error::Input(format!(
                "LoRA adapter {p}: update {:?} does not fit the weight {:?}",
                delta.dims(),
                w.dims()
            )));
        }
        out.insert(wn, (w + delta)?);
    }
    Ok(Weights::from_map(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Llama;

    /// Merged vs unmerged logits (f32; `x(W + sBA)ᵀ` vs `xWᵀ + s(xAᵀ)Bᵀ`, a different order of
    /// the same sums), relative to the logits' scale.
    const MERGE_RTOL: f64 = 1e-4;

    #[test]
    fn merged_logits_equal_unmerged_logits() -> Result<()> {
        let cfg = LlamaConfig::tiny(40);
        let dev = Device::Cpu;
        let base = Weights::random(&cfg, 3, &dev)?;
        let lora = LoraConfig {
            rank: 4,
            alpha: 8.0,
            targets: LoraTarget::ALL.to_vec(),
        };
        let n = cfg.num_hidden_layers;
        let mut adapters = init_adapters(&cfg, &base, &lora, 0..n, 5, &dev)?;
        // B is zero at init; give it values so the adapters change the output.
        let names: Vec<String> = adapters.tensors().keys().cloned().collect();
        for (i, k) in names.iter().enumerate() {
            if k.ends_with(".lora_b") {
                let t = adapters.tensors()[k].clone();
                let r = (Tensor::rand(-0.5f32, 0.5, t.dims(), &dev)? * (1.0 + i as f64 * 0.01))?;
                adapters.insert(k.clone(), r);
            }
        }
        let ids = Tensor::new(&[[1u32, 5, 7, 9, 2], [3, 4, 8, 30, 11]], &dev)?;
        let unmerged = Llama::new(&cfg, &base)?
            .with_lora(&adapters, lora.scale())?
            .forward(&ids, None)?;
        let plain = Llama::new(&cfg, &base)?.forward(&ids, None)?;
        let merged =
            Llama::new(&cfg, &merge(&base, &adapters, lora.scale())?)?.forward(&ids, None)?;
        let max = |t: &Tensor| -> Result<f64> {
            Ok(t.abs()?
                .max_all()?
                .to_dtype(DType::F64)?
                .to_scalar::<f64>()?)
        };
        let scale = max(&merged)?;
        let d = max(&(&merged - &unmerged)?)?;
        assert!(
            d <= MERGE_RTOL * scale,
            "merged vs unmerged: {d:e} (scale {scale})"
        );
        // And the adapters do change the model (the comparison is not trivially true).
        assert!(max(&(&merged - &plain)?)? > 100.0 * MERGE_RTOL * scale);
        Ok(())
    }

    #[test]
    fn unknown_targets_and_stray_adapters_are_errors_naming_them() -> Result<()> {
        assert_eq!(
            LoraTarget::parse_list("q, k_proj,down")?,
            vec![LoraTarget::Q, LoraTarget::K, LoraTarget::Down]
        );
        let e = LoraTarget::parse_list("q,query,v").unwrap_err().to_string();
        assert!(e.contains("`query`"), "{e}");
        let cfg = LlamaConfig::tiny(40);
        let dev = Device::Cpu;
        let base = Weights::random(&cfg, 3, &dev)?;
        let mut stray = Weights::from_map(BTreeMap::new());
        stray.insert(
            "model.layers.99.self_attn.q_proj.lora_a",
            Tensor::zeros((2, cfg.hidden_size), DType::F32, &dev)?,
        );
        stray.insert(
            "model.layers.99.self_attn.q_proj.lora_b",
            Tensor::zeros((cfg.hidden_size, 2), DType::F32, &dev)?,
        );
        let e = Llama::new(&cfg, &base)?
            .with_lora(&stray, 1.0)
            .err()
            .expect("stray adapter")
            .to_string();
        assert!(e.contains("model.layers.99"), "{e}");
        let e = merge(&base, &stray, 1.0)
            .err()
            .expect("stray adapter")
            .to_string();
        assert!(e.contains("model.layers.99"), "{e}");
        Ok(())
    }
}
