//! The composed path (candle's own ops: what a CUDA device runs) against the fused CPU kernels,
//! on a whole model: forward logits and the gradient of every weight, run on the CPU with
//! [`Kernels::Composed`] forcing the composed path.

mod common;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use common::tiny_gqa;
use steper_models::ops::Kernels;
use steper_models::{Llama, LlamaConfig, Weights};

/// Logits of the two paths (f32, the same sums in another order and tiling).
const LOGIT_ATOL: f64 = 1e-4;
/// Per-weight gradient agreement, relative to the largest gradient of that weight.
const GRAD_RTOL: f64 = 1e-3;

fn max_abs(t: &Tensor) -> Result<f64> {
    Ok(t.abs()?
        .max_all()?
        .to_dtype(DType::F64)?
        .to_scalar::<f64>()?)
}

/// A right-padded batch of two rows (the training layout) and its mask.
fn batch(cfg: &LlamaConfig) -> Result<(Tensor, Tensor)> {
    let v = cfg.vocab_size as u32;
    let ids: Vec<u32> = (0..2 * 9).map(|i| (i * 13 + 5) % v).collect();
    let mask: Vec<u32> = (0..2 * 9).map(|i| u32::from(i < 9 || i % 9 < 6)).collect();
    Ok((
        Tensor::from_vec(ids, (2, 9), &Device::Cpu)?,
        Tensor::from_vec(mask, (2, 9), &Device::Cpu)?,
    ))
}

#[test]
fn composed_kernels_match_the_fused_ones_forward_and_gradients() -> Result<()> {
    let cfg = tiny_gqa(89);
    let (w, vars) = Weights::random(&cfg, 5, &Device::Cpu)?.into_vars()?;
    let (ids, mask) = batch(&cfg)?;
    // A fixed projection of the logits, so the upstream gradient is not uniform.
    let proj = Tensor::from_vec(
        (0..2 * 9 * cfg.vocab_size)
            .map(|i| ((i * 7919) % 101) as f32 / 50.0 - 1.0)
            .collect::<Vec<f32>>(),
        (2, 9, cfg.vocab_size),
        &Device::Cpu,
    )?;
    let fused = Llama::new(&cfg, &w)?;
    assert_eq!(fused.kernels(), Kernels::Auto);
    let composed = Llama::new(&cfg, &w)?.with_kernels(Kernels::Composed);
    let lf = fused.forward(&ids, Some(&mask))?;
    let lc = composed.forward(&ids, Some(&mask))?;
    let d = max_abs(&(&lf - &lc)?)?;
    assert!(d <= LOGIT_ATOL, "logits differ by {d:e}");
    let gf = (&lf * &proj)?.sum_all()?.backward()?;
    let gc = (&lc * &proj)?.sum_all()?.backward()?;
    for (name, v) in &vars {
        let a = gf.get(v.as_tensor());
        let b = gc.get(v.as_tensor());
        let (a, b) = match (a, b) {
            (Some(a), Some(b)) => (a, b),
            (None, None) => continue,
            _ => panic!("{name}: one path has a gradient, the other none"),
        };
        let scale = max_abs(a)?.max(max_abs(b)?).max(1e-6);
        let d = max_abs(&(a - b)?)?;
        assert!(
            d <= GRAD_RTOL * scale,
            "{name}: gradients differ by {d:e} (scale {scale:e})"
        );
    }
    Ok(())
}

#[test]
fn composed_kernels_match_the_fused_ones_in_cached_generation() -> Result<()> {
    let cfg = tiny_gqa(71);
    let w = Weights::random(&cfg, 6, &Device::Cpu)?;
    let fused = Llama::new(&cfg, &w)?;
    let composed = Llama::new(&cfg, &w)?.with_kernels(Kernels::Composed);
    let (mut cf, mut cc) = (fused.new_cache(1), composed.new_cache(1));
    let prompt = Tensor::new(&[[3u32, 9, 27, 11, 5]], &Device::Cpu)?;
    let mut a = fused.forward_cached(&prompt, None, &mut cf)?;
    let mut b = composed.forward_cached(&prompt, None, &mut cc)?;
    for step in 0..4u32 {
        let d = max_abs(&(&a - &b)?)?;
        assert!(d <= LOGIT_ATOL, "step {step}: logits differ by {d:e}");
        let next = Tensor::new(&[[(step * 17 + 2) % 71]], &Device::Cpu)?;
        a = fused.forward_cached(&next, None, &mut cf)?;
        b = composed.forward_cached(&next, None, &mut cc)?;
    }
    Ok(())
}
