//! One batch through the student: the frozen bottom layers without an autograd graph (computed,
//! or read from a [`PrefixCache`]), the trained top layers, then the final norm, the vocabulary
//! projection and the cross-entropy at target positions only.
//!
//! Prompt positions carry no loss, so their logits are never needed: the hidden states of the
//! target positions are gathered first and only those rows go through `lm_head` (for a ~1k-token
//! step-wise record with ~50 target tokens that skips ~95 % of the head's forward and backward).

use candle_core::{Device, Tensor};
use steper_models::Llama;

use super::loss::{build_stage_masks, stage_losses, token_nll, StageLosses};
use super::prefix_cache::PrefixCache;
use super::Example;
use crate::error::Result;

/// A padded micro-batch (right padding) with the target positions listed.
pub(crate) struct Batch {
    /// `[b, t]` token ids.
    pub input: Tensor,
    /// `[b, t]` 1 = token, 0 = padding.
    pub mask: Tensor,
    /// `[b, t]` next-token labels (for the full-logits reference path).
    #[cfg(test)]
    pub labels: Tensor,
    /// `[b, t]` per-stage target masks (for the full-logits reference path).
    #[cfg(test)]
    pub stage_masks: [Tensor; 3],
    /// Target tokens per stage.
    pub counts: [usize; 3],
    /// Non-padding input tokens.
    pub tokens: usize,
    /// `[n]` u32: row-major indices into the flattened `[b·t]` positions that carry a label.
    pub target_rows: Tensor,
    /// `[n]` u32: the label of each target row.
    pub target_labels: Tensor,
    /// `[n]` f32 per stage: 1 where the target row belongs to an example of that stage.
    pub target_stage: [Tensor; 3],
}

pub(crate) fn make_batch(examples: &[&Example], dev: &Device) -> Result<Batch> {
    let t = examples.iter().map(|e| e.input_len()).max().unwrap_or(1);
    let b = examples.len();
    let mut input = vec![0u32; b * t];
    let mut mask = vec![0u32; b * t];
    let mut labels = vec![0u32; b * t];
    let mut label_mask = vec![vec![0f32; t]; b];
    let mut stages = Vec::with_capacity(b);
    let mut rows = Vec::new();
    let mut row_labels = Vec::new();
    let mut row_stage: [Vec<f32>; 3] = [Vec::new(), Vec::new(), Vec::new()];
    let mut tokens = 0;
    for (r, e) in examples.iter().enumerate() {
        let seq: Vec<u32> = e.prompt.iter().chain(e.target.iter()).copied().collect();
        let n = seq.len() - 1;
        for p in 0..n {
            input[r * t + p] = seq[p];
            mask[r * t + p] = 1;
            labels[r * t + p] = seq[p + 1];
            if p + 1 >= e.prompt.len() {
                label_mask[r][p] = 1.0;
                rows.push((r * t + p) as u32);
                row_labels.push(seq[p + 1]);
                for (j, col) in row_stage.iter_mut().enumerate() {
                    col.push(if e.stage.index() == j { 1.0 } else { 0.0 });
                }
            }
        }
        tokens += n;
        stages.push(e.stage);
    }
    #[cfg_attr(not(test), allow(unused_variables))]
    let (stage_masks, counts) = build_stage_masks(&label_mask, &stages, dev)?;
    let n = rows.len();
    let [s0, s1, s2] = row_stage;
    Ok(Batch {
        input: Tensor::from_vec(input, (b, t), dev)?,
        mask: Tensor::from_vec(mask, (b, t), dev)?,
        #[cfg(test)]
        labels: Tensor::from_vec(labels, (b, t), dev)?,
        #[cfg(test)]
        stage_masks,
        counts,
        tokens,
        target_rows: Tensor::from_vec(rows, n, dev)?,
        target_labels: Tensor::from_vec(row_labels, n, dev)?,
        target_stage: [
            Tensor::from_vec(s0, n, dev)?,
            Tensor::from_vec(s1, n, dev)?,
            Tensor::from_vec(s2, n, dev)?,
        ],
    })
}

/// How the bottom of the student runs.
pub(crate) struct Prefix<'a> {
    /// Bottom layers that are frozen together with the embeddings (0 = none): they run without
    /// an autograd graph.
    pub frozen_layers: usize,
    /// Where their outputs are kept across steps, epochs and runs (optional).
    pub cache: Option<&'a mut PrefixCache>,
}

/// Hidden states `[b, t, hidden]` after the last decoder layer.
pub(crate) fn hidden_states(
    model: &Llama,
    examples: &[&Example],
    batch: &Batch,
    prefix: &mut Prefix<'_>,
) -> Result<Tensor> {
    let n_layers = model.config().num_hidden_layers;
    let k = prefix.frozen_layers.min(n_layers);
    let seq = model.prepare(&batch.input, Some(&batch.mask))?;
    let x = if k == 0 {
        model.embed(&seq)?
    } else if let Some(cache) = prefix.cache.as_deref_mut() {
        let (_, t) = seq.dims();
        cache.batch_hidden(model, examples, t)?
    } else {
        // Constant weights and inputs: candle records no graph for these ops; detach makes the
        // boundary explicit.
        model
            .forward_layers(&model.embed(&seq)?, &seq, 0..k)?
            .detach()
    };
    Ok(model.forward_layers(&x, &seq, k..n_layers)?)
}

/// Per-stage mean losses of a batch with logits at target positions only.
pub(crate) fn batch_losses(
    model: &Llama,
    examples: &[&Example],
    batch: &Batch,
    prefix: &mut Prefix<'_>,
) -> Result<StageLosses> {
    let h = hidden_states(model, examples, batch, prefix)?;
    let (b, t, d) = h.dims3()?;
    let rows = h.reshape((b * t, d))?.index_select(&batch.target_rows, 0)?;
    let logits = model.head(&rows)?;
    let nll = token_nll(&logits, &batch.target_labels)?;
    stage_losses(&nll, &batch.target_stage, batch.counts)
}

/// The reference: logits for every position, loss masked to the targets (what an HF-style
/// training step does). Kept for tests and comparisons.
#[cfg(test)]
pub(crate) fn batch_losses_full(model: &Llama, batch: &Batch) -> Result<StageLosses> {
    let logits = model.forward(&batch.input, Some(&batch.mask))?;
    let nll = token_nll(&logits, &batch.labels)?;
    stage_losses(&nll, &batch.stage_masks, batch.counts)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::fit::loss::combine;
    use crate::fit::{LossMode, Stage};
    use candle_core::DType;
    use steper_models::{LlamaConfig, Weights};

    /// Loss agreement between the target-only and the full-logits paths (f32; the same sums in
    /// another order).
    const LOSS_RTOL: f64 = 1e-5;
    /// Per-element gradient agreement, relative to the largest gradient of that parameter.
    const GRAD_RTOL: f64 = 1e-4;

    pub(crate) fn tiny() -> Result<(LlamaConfig, Weights)> {
        let mut cfg = LlamaConfig::tiny(40);
        cfg.max_position_embeddings = 64;
        let w = Weights::random(&cfg, 7, &Device::Cpu)?;
        Ok((cfg, w))
    }

    pub(crate) fn examples() -> Vec<Example> {
        let stages = [Stage::Init, Stage::Expand, Stage::Aggregate, Stage::Expand];
        (0..4u32)
            .map(|q| Example {
                stage: stages[q as usize],
                prompt: (0..(5 + 2 * q)).map(|i| 3 + (q * 7 + i * 5) % 35).collect(),
                target: (0..(2 + q % 2))
                    .map(|i| 3 + (q * 3 + i * 11) % 35)
                    .collect(),
            })
            .collect()
    }

    pub(crate) fn max_abs(t: &Tensor) -> Result<f64> {
        Ok(t.abs()?
            .max_all()?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?)
    }

    /// Asserts two gradients agree within `rtol` of the larger one's scale.
    pub(crate) fn assert_close(name: &str, a: &Tensor, b: &Tensor, rtol: f64) -> Result<()> {
        let scale = max_abs(a)?.max(max_abs(b)?).max(1e-12);
        let diff = max_abs(&(a - b)?)?;
        assert!(
            diff <= rtol * scale,
            "{name}: max |Δ| {diff:e} exceeds {rtol:e} × {scale:e}"
        );
        Ok(())
    }

    #[test]
    fn target_only_logits_give_the_full_loss_and_gradients() -> Result<()> {
        let (cfg, w) = tiny()?;
        let (w, vars) = w.into_vars()?;
        let model = Llama::new(&cfg, &w)?;
        let ex = examples();
        let refs: Vec<&Example> = ex.iter().collect();
        let batch = make_batch(&refs, &Device::Cpu)?;
        let s = [
            Tensor::new(0.1f32, &Device::Cpu)?,
            Tensor::new(-0.2f32, &Device::Cpu)?,
            Tensor::new(0.3f32, &Device::Cpu)?,
        ];
        let mut prefix = Prefix {
            frozen_layers: 0,
            cache: None,
        };
        let fast = combine(
            &batch_losses(&model, &refs, &batch, &mut prefix)?,
            LossMode::Steper,
            &s,
        )?
        .expect("stages present");
        let full = combine(&batch_losses_full(&model, &batch)?, LossMode::Steper, &s)?
            .expect("stages present");
        let (lf, lr): (f32, f32) = (fast.to_scalar()?, full.to_scalar()?);
        assert!(
            ((lf - lr) as f64).abs() <= LOSS_RTOL * lr.abs() as f64,
            "loss {lf} vs {lr}"
        );
        let gf = fast.backward()?;
        let gr = full.backward()?;
        assert!(!vars.is_empty());
        for (name, v) in &vars {
            let a = gf.get(v.as_tensor());
            let b = gr.get(v.as_tensor());
            match (a, b) {
                (Some(a), Some(b)) => assert_close(name, a, b, GRAD_RTOL)?,
                _ => panic!("{name}: gradient missing on one path"),
            }
        }
        Ok(())
    }

    #[test]
    fn frozen_prefix_without_cache_gives_the_plain_loss_and_gradients() -> Result<()> {
        let (cfg, w) = tiny()?;
        let n = cfg.num_hidden_layers;
        assert!(n >= 2);
        // The top layer (and the final norm / head) train; embeddings and the rest are constant.
        let mut frozen = std::collections::BTreeMap::new();
        let mut trained = std::collections::BTreeMap::new();
        for (k, t) in w.tensors() {
            let top = k.starts_with(&format!("model.layers.{}.", n - 1));
            if top || k == "model.norm.weight" {
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
        let model = Llama::new(&cfg, &all)?;
        let ex = examples();
        let refs: Vec<&Example> = ex.iter().collect();
        let batch = make_batch(&refs, &Device::Cpu)?;
        let s: [Tensor; 3] = std::array::from_fn(|_| Tensor::new(0f32, &Device::Cpu).unwrap());
        let run = |k: usize| -> Result<(f32, candle_core::backprop::GradStore)> {
            let mut p = Prefix {
                frozen_layers: k,
                cache: None,
            };
            let l = combine(
                &batch_losses(&model, &refs, &batch, &mut p)?,
                LossMode::Uniform,
                &s,
            )?
            .expect("stages present");
            Ok((l.to_scalar()?, l.backward()?))
        };
        let (l0, g0) = run(0)?;
        let (l1, g1) = run(n - 1)?;
        // Same ops in the same order: identical.
        assert_eq!(l0, l1);
        for (name, v) in &vars {
            let a = g0.get(v.as_tensor()).expect("plain gradient");
            let b = g1.get(v.as_tensor()).expect("prefix gradient");
            assert_close(name, a, b, 0.0)?;
        }
        Ok(())
    }
}
