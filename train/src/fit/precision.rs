//! Mixed-precision training: the forward and backward in `bf16` or `f16`, the weights the
//! optimizer updates (master weights), its moments and σ in `f32`.
//!
//! The trained weights stay f32 [`Var`](candle_core::Var)s. Each step builds the model from their half-precision
//! copies (`to_dtype`, a differentiable op: its backward converts the gradient back to f32, so
//! the gradients arrive on the master weights in f32) and from the frozen weights, converted
//! once. The loss is computed in f32 from the half-precision logits.
//!
//! `f16`'s range (largest finite 65504, smallest normal 6·10⁻⁵) loses small gradients to
//! underflow, so its loss is multiplied by a [`LossScaler`]'s scale before the backward and the
//! gradients divided by it after: a step whose gradients are not finite is skipped and the scale
//! halved; after [`LossScaleConfig::growth_interval`] finite steps in a row it doubles.
//! (`bf16` has f32's range and needs no scaling.)

use candle_core::{DType, Device};
use serde::{Deserialize, Serialize};
use steper_models::{DTypeChoice, Llama, LlamaConfig, Weights};

use crate::error::Result;

/// Settings of `f16`'s dynamic loss scaling (PyTorch's `GradScaler` defaults).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LossScaleConfig {
    /// The first scale.
    pub init: f64,
    /// Finite steps in a row after which the scale doubles.
    pub growth_interval: u64,
}

impl Default for LossScaleConfig {
    fn default() -> Self {
        LossScaleConfig {
            init: 65536.0,
            growth_interval: 2000,
        }
    }
}

/// The state of dynamic loss scaling (saved with a checkpoint, so a resumed run continues it).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LossScaler {
    /// The current scale.
    pub scale: f64,
    /// Finite steps since the scale last changed.
    pub good_steps: u64,
}

impl LossScaler {
    /// A scaler at the configured first scale.
    pub fn new(cfg: &LossScaleConfig) -> Self {
        LossScaler {
            scale: cfg.init,
            good_steps: 0,
        }
    }

    /// Records a step whose unscaled gradients were `finite` or not; returns whether the
    /// update is applied. A non-finite step halves the scale (never below 1 / 2²⁴, f16's
    /// smallest subnormal) and is skipped; `growth_interval` finite steps in a row double it.
    pub fn update(&mut self, finite: bool, cfg: &LossScaleConfig) -> bool {
        if finite {
            self.good_steps += 1;
            if cfg.growth_interval > 0 && self.good_steps >= cfg.growth_interval {
                self.scale *= 2.0;
                self.good_steps = 0;
            }
        } else {
            self.scale = (self.scale * 0.5).max(MIN_SCALE);
            self.good_steps = 0;
        }
        finite
    }
}

/// The smallest loss scale (f16's smallest subnormal).
const MIN_SCALE: f64 = 1.0 / 16_777_216.0;

/// The dtype training computes in for `choice` on `device`: `auto` and `f32` are f32; `bf16`
/// and `f16` are themselves where candle computes them on the device (an
/// [`steper_models::Error::UnsupportedDType`] otherwise).
pub fn training_dtype(choice: DTypeChoice, device: &Device) -> Result<DType> {
    match choice {
        DTypeChoice::Auto | DTypeChoice::F32 => Ok(DType::F32),
        DTypeChoice::BF16 | DTypeChoice::F16 => {
            let (d, _) = steper_models::dtype::resolve(choice, DType::F32, device)?;
            Ok(d)
        }
    }
}

/// How a mixed-precision step's model is built: the frozen weights (already in the compute
/// dtype) and the f32 trained ones (var-backed, converted at every step).
pub(crate) struct HalfModel {
    /// The compute dtype.
    pub dtype: DType,
    /// Constant weights in `dtype`: every weight not trained (the whole base of a LoRA run).
    pub base: Weights,
    /// The trained f32 weights (or the LoRA adapters), backed by the optimizer's vars.
    pub trained: Weights,
    /// LoRA: the adapters' scale (`trained` holds adapters, not weights).
    pub lora_scale: Option<f64>,
}

impl HalfModel {
    /// The model of the current master weights, differentiable back to them.
    pub fn build(&self, cfg: &LlamaConfig) -> Result<Llama> {
        let trained = self.trained.to_dtype(self.dtype)?;
        Ok(match self.lora_scale {
            Some(scale) => Llama::new(cfg, &self.base)?.with_lora(&trained, scale)?,
            None => {
                let mut w = self.base.clone();
                for (k, t) in trained.tensors() {
                    w.insert(k.clone(), t.clone());
                }
                Llama::new(cfg, &w)?
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scale_halves_on_overflow_and_doubles_after_the_interval() {
        let cfg = LossScaleConfig {
            init: 1024.0,
            growth_interval: 3,
        };
        let mut s = LossScaler::new(&cfg);
        assert!(s.update(true, &cfg));
        assert!(s.update(true, &cfg));
        assert_eq!(s.scale, 1024.0);
        assert!(!s.update(false, &cfg), "a non-finite step is skipped");
        assert_eq!((s.scale, s.good_steps), (512.0, 0));
        for _ in 0..3 {
            assert!(s.update(true, &cfg));
        }
        assert_eq!((s.scale, s.good_steps), (1024.0, 0));
        for _ in 0..40 {
            s.update(false, &cfg);
        }
        assert_eq!(s.scale, MIN_SCALE);
    }

    #[test]
    fn auto_and_f32_train_in_f32_and_half_types_are_honoured_on_the_cpu() -> Result<()> {
        let cpu = Device::Cpu;
        assert_eq!(training_dtype(DTypeChoice::Auto, &cpu)?, DType::F32);
        assert_eq!(training_dtype(DTypeChoice::F32, &cpu)?, DType::F32);
        assert_eq!(training_dtype(DTypeChoice::BF16, &cpu)?, DType::BF16);
        assert_eq!(training_dtype(DTypeChoice::F16, &cpu)?, DType::F16);
        Ok(())
    }
}
