//! The STEPER objective (docs/DESIGN.md, "Training objective"): per-stage mean token cross-entropy on
//! target tokens, combined with learned difficulties s_j = log σ_j:
//!
//! `L = Σ_j [ exp(-2 s_j) / 2 · L_j + s_j ]` over the stages present in the batch.

use candle_core::{DType, Tensor, D};

use crate::error::Result;
use crate::fit::{LossMode, Stage};

/// Per-stage mean cross-entropy of one batch: `Some(L_j)` for the stages present.
pub struct StageLosses {
    /// Indexed by [`Stage::index`].
    pub losses: [Option<Tensor>; 3],
    /// Target tokens per stage in the batch.
    pub tokens: [usize; 3],
}

/// Token-level cross-entropy `[batch, seq]` of `logits` `[batch, seq, vocab]` against `labels`
/// `[batch, seq]` (u32).
pub fn token_nll(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let logp = candle_nn::ops::log_softmax(&logits.to_dtype(DType::F32)?, D::Minus1)?;
    let picked = logp
        .gather(&labels.unsqueeze(D::Minus1)?, D::Minus1)?
        .squeeze(D::Minus1)?;
    Ok(picked.neg()?)
}

/// Mean NLL per stage. `stage_masks[j]` is `[batch, seq]` f32 with 1 on target tokens of
/// examples of stage j (prompt and padding tokens carry 0, so they contribute no loss).
pub fn stage_losses(
    nll: &Tensor,
    stage_masks: &[Tensor; 3],
    counts: [usize; 3],
) -> Result<StageLosses> {
    let mut losses: [Option<Tensor>; 3] = [None, None, None];
    for j in 0..3 {
        if counts[j] > 0 {
            let s = (nll * &stage_masks[j])?.sum_all()?;
            losses[j] = Some((s / counts[j] as f64)?);
        }
    }
    Ok(StageLosses {
        losses,
        tokens: counts,
    })
}

/// Combines the stage losses into the training objective.
///
/// - `Steper`: `Σ_j exp(-2 s_j)/2 · L_j + s_j` (a stage absent from the batch omits its term).
/// - `Uniform`: the mean of the present `L_j`.
/// - `Vanilla`: the single term present (all vanilla examples are one stage).
pub fn combine(
    losses: &StageLosses,
    mode: LossMode,
    log_sigma: &[Tensor; 3],
) -> Result<Option<Tensor>> {
    let present: Vec<(usize, &Tensor)> = losses
        .losses
        .iter()
        .enumerate()
        .filter_map(|(j, l)| l.as_ref().map(|l| (j, l)))
        .collect();
    if present.is_empty() {
        return Ok(None);
    }
    let mut total: Option<Tensor> = None;
    for (j, l) in &present {
        let term = match mode {
            LossMode::Steper => {
                let s = &log_sigma[*j];
                let w = ((s * -2.0)?.exp()? * 0.5)?;
                ((l.broadcast_mul(&w))? + s)?
            }
            LossMode::Uniform | LossMode::Vanilla => (*l).clone(),
        };
        total = Some(match total {
            None => term,
            Some(t) => (t + term)?,
        });
    }
    let total = total.map(|t| match mode {
        LossMode::Uniform | LossMode::Vanilla => t / present.len() as f64,
        LossMode::Steper => Ok(t),
    });
    total.transpose().map_err(Into::into)
}

/// Stage of a label position helper: builds `[batch, seq]` masks per stage.
pub fn build_stage_masks(
    label_mask: &[Vec<f32>],
    stages: &[Stage],
    device: &candle_core::Device,
) -> Result<([Tensor; 3], [usize; 3])> {
    let b = label_mask.len();
    let t = label_mask.first().map(|r| r.len()).unwrap_or(0);
    let mut masks = [vec![0f32; b * t], vec![0f32; b * t], vec![0f32; b * t]];
    let mut counts = [0usize; 3];
    for (r, (row, st)) in label_mask.iter().zip(stages).enumerate() {
        let j = st.index();
        for (c, &m) in row.iter().enumerate() {
            if m > 0.0 {
                masks[j][r * t + c] = 1.0;
                counts[j] += 1;
            }
        }
    }
    let [a, bb, c] = masks;
    Ok((
        [
            Tensor::from_vec(a, (b, t), device)?,
            Tensor::from_vec(bb, (b, t), device)?,
            Tensor::from_vec(c, (b, t), device)?,
        ],
        counts,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    const LOSS_ATOL: f64 = 1e-6;

    fn scalar(v: f32) -> Tensor {
        Tensor::new(v, &Device::Cpu).unwrap()
    }

    #[test]
    fn steper_formula_matches_hand_computation() -> Result<()> {
        let l = [1.5f32, 0.7, 2.2];
        let s = [0.3f32, -0.2, 0.0];
        let losses = StageLosses {
            losses: [Some(scalar(l[0])), Some(scalar(l[1])), Some(scalar(l[2]))],
            tokens: [1, 1, 1],
        };
        let ls = [scalar(s[0]), scalar(s[1]), scalar(s[2])];
        let got: f32 = combine(&losses, LossMode::Steper, &ls)?
            .unwrap()
            .to_scalar()?;
        let want: f64 = (0..3)
            .map(|j| (-2.0 * s[j] as f64).exp() / 2.0 * l[j] as f64 + s[j] as f64)
            .sum();
        assert!(
            (got as f64 - want).abs() < LOSS_ATOL * 10.0,
            "{got} vs {want}"
        );
        let uni: f32 = combine(&losses, LossMode::Uniform, &ls)?
            .unwrap()
            .to_scalar()?;
        assert!((uni as f64 - (1.5 + 0.7 + 2.2) / 3.0).abs() < LOSS_ATOL * 10.0);
        Ok(())
    }

    #[test]
    fn missing_stage_omits_its_term() -> Result<()> {
        let losses = StageLosses {
            losses: [Some(scalar(1.0)), None, Some(scalar(3.0))],
            tokens: [2, 0, 5],
        };
        let ls = [scalar(0.5), scalar(100.0), scalar(0.0)];
        let got: f32 = combine(&losses, LossMode::Steper, &ls)?
            .unwrap()
            .to_scalar()?;
        let want = (-1.0f64).exp() / 2.0 * 1.0 + 0.5 + 0.5 * 3.0;
        assert!((got as f64 - want).abs() < 1e-5, "{got} vs {want}");
        let none = StageLosses {
            losses: [None, None, None],
            tokens: [0; 3],
        };
        assert!(combine(&none, LossMode::Steper, &ls)?.is_none());
        Ok(())
    }

    #[test]
    fn sigma_gradient_matches_finite_differences() -> Result<()> {
        // d/ds [exp(-2s)/2 · L + s] = 1 - exp(-2s) · L
        let l = [1.3f64, 0.4, 2.5];
        let s0 = [0.2f64, -0.4, 0.7];
        let vars: Vec<Var> = s0
            .iter()
            .map(|&s| Var::new(s as f32, &Device::Cpu).unwrap())
            .collect();
        let ls = [
            vars[0].as_tensor().clone(),
            vars[1].as_tensor().clone(),
            vars[2].as_tensor().clone(),
        ];
        let losses = StageLosses {
            losses: [
                Some(scalar(l[0] as f32)),
                Some(scalar(l[1] as f32)),
                Some(scalar(l[2] as f32)),
            ],
            tokens: [1, 1, 1],
        };
        let total = combine(&losses, LossMode::Steper, &ls)?.unwrap();
        let grads = total.backward()?;
        let f = |s: [f64; 3]| -> f64 {
            (0..3)
                .map(|j| (-2.0 * s[j]).exp() / 2.0 * l[j] + s[j])
                .sum()
        };
        let eps = 1e-4;
        for j in 0..3 {
            let g: f32 = grads.get(vars[j].as_tensor()).unwrap().to_scalar()?;
            let mut a = s0;
            a[j] += eps;
            let mut b = s0;
            b[j] -= eps;
            let fd = (f(a) - f(b)) / (2.0 * eps);
            assert!(
                (g as f64 - fd).abs() < 1e-3,
                "stage {j}: autograd {g} vs finite difference {fd}"
            );
            let closed = 1.0 - (-2.0 * s0[j]).exp() * l[j];
            assert!((g as f64 - closed).abs() < 1e-3);
        }
        Ok(())
    }

    #[test]
    fn prompt_tokens_carry_no_loss() -> Result<()> {
        // Two rows; only positions flagged in the label mask count.
        let logits = Tensor::new(
            &[
                [[2.0f32, 0.0, 0.0], [0.0, 3.0, 0.0]],
                [[0.0f32, 0.0, 1.0], [9.0, 0.0, 0.0]],
            ],
            &Device::Cpu,
        )?;
        let labels = Tensor::new(&[[0u32, 2], [2, 1]], &Device::Cpu)?;
        let nll = token_nll(&logits, &labels)?;
        let mask = vec![vec![0.0, 1.0], vec![1.0, 0.0]];
        let (masks, counts) =
            build_stage_masks(&mask, &[Stage::Init, Stage::Expand], &Device::Cpu)?;
        assert_eq!(counts, [1, 1, 0]);
        let sl = stage_losses(&nll, &masks, counts)?;
        let li: f32 = sl.losses[0].as_ref().unwrap().to_scalar()?;
        let le: f32 = sl.losses[1].as_ref().unwrap().to_scalar()?;
        // Row 0, position 1: label 2 under logits [0, 3, 0].
        let want_i = -((0f64).exp() / (1.0 + 3f64.exp() + 1.0)).ln();
        let want_e = -((1f64).exp() / (1.0 + 1.0 + 1f64.exp())).ln();
        assert!((li as f64 - want_i).abs() < 1e-5, "{li} {want_i}");
        assert!((le as f64 - want_e).abs() < 1e-5, "{le} {want_e}");
        assert!(sl.losses[2].is_none());
        Ok(())
    }
}
