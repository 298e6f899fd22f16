//! AdamW with decoupled weight decay, warmup + cosine schedule, global-norm clipping; state that
//! can be saved and restored exactly.

use std::collections::BTreeMap;

use candle_core::{Tensor, Var};

use crate::error::Result;

/// Optimizer hyper-parameters.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct AdamWConfig {
    /// Peak learning rate.
    pub lr: f64,
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Denominator epsilon.
    pub eps: f64,
    /// Decoupled weight decay (not applied to σ, norms or biases).
    pub weight_decay: f64,
    /// Peak learning rate of the σ parameters (`None`: `lr`). The three s_j = log σ_j are
    /// scalars whose Adam step is at most about the learning rate, so at a weight learning rate
    /// of 1e-4 they could move by 0.01 in 100 steps: short runs need their own rate. Follows
    /// the same warmup and decay as `lr`.
    #[serde(default)]
    pub sigma_lr: Option<f64>,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
            sigma_lr: None,
        }
    }
}

/// One optimized parameter.
pub struct Param {
    /// Name (HF tensor name, or `sigma.init` etc.).
    pub name: String,
    /// The variable.
    pub var: Var,
    /// Whether weight decay applies.
    pub decay: bool,
    /// This parameter's learning rate as a multiple of the scheduled one (1 by default).
    pub lr_scale: f64,
    m: Tensor,
    v: Tensor,
}

/// AdamW over a fixed list of parameters.
pub struct AdamW {
    /// Hyper-parameters.
    pub cfg: AdamWConfig,
    /// Parameters in a fixed order.
    pub params: Vec<Param>,
    /// Number of updates done.
    pub t: u64,
}

impl AdamW {
    /// New optimizer with zero moments.
    pub fn new(cfg: AdamWConfig, params: Vec<(String, Var, bool)>) -> Result<Self> {
        let params = params
            .into_iter()
            .map(|(name, var, decay)| {
                let z = var.as_tensor().zeros_like()?;
                Ok(Param {
                    name,
                    lr_scale: 1.0,
                    m: z.clone(),
                    v: z,
                    var,
                    decay,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(AdamW { cfg, params, t: 0 })
    }

    /// Applies one update with learning rate `lr` and the given gradients (by parameter index;
    /// `None` = no gradient, the parameter is left untouched).
    pub fn step(&mut self, grads: &[Option<Tensor>], lr: f64) -> Result<()> {
        self.t += 1;
        let c = &self.cfg;
        let bc1 = 1.0 - c.beta1.powi(self.t as i32);
        let bc2 = 1.0 - c.beta2.powi(self.t as i32);
        for (p, g) in self.params.iter_mut().zip(grads) {
            let Some(g) = g else { continue };
            let lr = lr * p.lr_scale;
            p.m = ((&p.m * c.beta1)? + (g * (1.0 - c.beta1))?)?;
            p.v = ((&p.v * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let mhat = (&p.m / bc1)?;
            let vhat = (&p.v / bc2)?;
            let upd = (mhat / (vhat.sqrt()? + c.eps)?)?;
            let mut w = p.var.as_tensor().clone();
            if p.decay && c.weight_decay > 0.0 {
                w = (&w * (1.0 - lr * c.weight_decay))?;
            }
            p.var.set(&(w - (upd * lr)?)?)?;
        }
        Ok(())
    }

    /// Moments as named tensors (`{name}.m`, `{name}.v`) for `optimizer.safetensors`.
    pub fn state_tensors(&self) -> BTreeMap<String, Tensor> {
        let mut out = BTreeMap::new();
        for p in &self.params {
            out.insert(format!("{}.m", p.name), p.m.clone());
            out.insert(format!("{}.v", p.name), p.v.clone());
        }
        out
    }

    /// Restores moments saved by [`AdamW::state_tensors`].
    pub fn load_state(&mut self, t: u64, state: &BTreeMap<String, Tensor>) -> Result<()> {
        for p in &mut self.params {
            let m = state.get(&format!("{}.m", p.name));
            let v = state.get(&format!("{}.v", p.name));
            match (m, v) {
                (Some(m), Some(v)) if m.dims() == p.m.dims() && v.dims() == p.v.dims() => {
                    p.m = m.clone();
                    p.v = v.clone();
                }
                _ => {
                    return Err(crate::Error::Input(format!(
                        "optimizer state lacks moments for `{}` (or their shape differs)",
                        p.name
                    )))
                }
            }
        }
        self.t = t;
        Ok(())
    }
}

/// Linear warmup to the peak, then cosine decay to `min_ratio · peak` at `total` steps.
pub fn lr_at(step: u64, total: u64, warmup: u64, peak: f64, min_ratio: f64) -> f64 {
    if warmup > 0 && step < warmup {
        return peak * (step + 1) as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1);
    let progress = ((step - warmup.min(step)) as f64 / span as f64).min(1.0);
    let cos = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
    peak * (min_ratio + (1.0 - min_ratio) * cos)
}

/// Global L2 norm of the gradients.
pub fn global_norm(grads: &[Option<Tensor>]) -> Result<f64> {
    let mut sq = 0f64;
    for g in grads.iter().flatten() {
        let s: f32 = g.sqr()?.sum_all()?.to_scalar()?;
        sq += s as f64;
    }
    Ok(sq.sqrt())
}

/// Scales gradients so their global norm is at most `max_norm`; returns the norm before.
pub fn clip_global_norm(grads: &mut [Option<Tensor>], max_norm: f64) -> Result<f64> {
    let norm = global_norm(grads)?;
    if norm > max_norm && norm.is_finite() {
        let scale = max_norm / (norm + 1e-6);
        for g in grads.iter_mut().flatten() {
            *g = (&*g * scale)?;
        }
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn clipping_caps_the_global_norm() -> Result<()> {
        let mut g = vec![
            Some(Tensor::new(&[3.0f32, 4.0], &Device::Cpu)?),
            None,
            Some(Tensor::new(&[12.0f32], &Device::Cpu)?),
        ];
        let before = clip_global_norm(&mut g, 1.0)?;
        assert!((before - 13.0).abs() < 1e-6);
        let after = global_norm(&g)?;
        assert!((after - 1.0).abs() < 1e-4, "{after}");
        // Below the cap nothing changes.
        let mut small = vec![Some(Tensor::new(&[0.3f32], &Device::Cpu)?)];
        clip_global_norm(&mut small, 1.0)?;
        let v: Vec<f32> = small[0].as_ref().unwrap().to_vec1()?;
        assert_eq!(v, vec![0.3]);
        Ok(())
    }

    #[test]
    fn schedule_warms_up_then_decays() {
        let peak = 1e-3;
        assert!((lr_at(0, 100, 10, peak, 0.1) - 1e-4).abs() < 1e-12);
        assert!((lr_at(9, 100, 10, peak, 0.1) - peak).abs() < 1e-12);
        assert!((lr_at(10, 100, 10, peak, 0.1) - peak).abs() < 1e-12);
        assert!((lr_at(100, 100, 10, peak, 0.1) - 1e-4).abs() < 1e-12);
        assert!(lr_at(55, 100, 10, peak, 0.1) < peak && lr_at(55, 100, 10, peak, 0.1) > 1e-4);
    }

    #[test]
    fn adamw_first_step_moves_by_lr() -> Result<()> {
        let v = Var::new(&[1.0f32, -2.0], &Device::Cpu)?;
        let mut opt = AdamW::new(
            AdamWConfig {
                weight_decay: 0.0,
                ..Default::default()
            },
            vec![("w".into(), v.clone(), true)],
        )?;
        let g = Tensor::new(&[0.5f32, -3.0], &Device::Cpu)?;
        opt.step(&[Some(g)], 0.1)?;
        let w: Vec<f32> = v.as_tensor().to_vec1()?;
        // Bias-corrected first step: update = sign(g) · lr.
        assert!(
            (w[0] - 0.9).abs() < 1e-5 && (w[1] + 1.9).abs() < 1e-5,
            "{w:?}"
        );
        Ok(())
    }

    #[test]
    fn lr_scale_multiplies_one_parameters_step() -> Result<()> {
        /// Named tolerance for f32 parameters after one step.
        const EPS: f32 = 1e-5;
        let a = Var::new(&[1.0f32], &Device::Cpu)?;
        let b = Var::new(&[1.0f32], &Device::Cpu)?;
        let mut opt = AdamW::new(
            AdamWConfig {
                weight_decay: 0.0,
                ..Default::default()
            },
            vec![
                ("w".into(), a.clone(), true),
                ("sigma.init".into(), b.clone(), false),
            ],
        )?;
        opt.params[1].lr_scale = 10.0;
        let g = Tensor::new(&[1.0f32], &Device::Cpu)?;
        opt.step(&[Some(g.clone()), Some(g)], 0.01)?;
        let (a, b): (Vec<f32>, Vec<f32>) = (a.as_tensor().to_vec1()?, b.as_tensor().to_vec1()?);
        assert!((a[0] - 0.99).abs() < EPS, "{a:?}");
        assert!((b[0] - 0.9).abs() < EPS, "{b:?}");
        Ok(())
    }
}
