//! Calibration prompts and range collection on ONNX Runtime (CPU).
//!
//! Prompts are rendered by the runtime's template from step-wise records (balanced across the
//! init / expand / aggregate stages) and fitted into the model's context; each is prefilled
//! once through the augmented graph (every MatMul / Gemm tensor an output) and every tensor's
//! values are added to its [`TensorStats`].

use std::borrow::Cow;
use std::collections::HashSet;
use std::path::Path;

use ort::session::{Session, SessionInputValue};
use ort::value::Tensor;
use serde::Serialize;
use steper_runtime::data::{Stage, StepwiseRecord};
use steper_runtime::Manifest;

use crate::hist::TensorStats;
use crate::{Error, Result};

/// One tokenized calibration (or held-out) prompt.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Prompt {
    /// `qid/stage/step` of the record it was rendered from.
    pub source: String,
    /// Stage of the record.
    pub stage: Stage,
    /// Token ids (the tokenizer's special tokens included).
    pub ids: Vec<u32>,
}

/// Picks up to `n` records round-robin over the stages (init, expand, aggregate; in file
/// order within a stage), skipping records in `exclude_qids`. Returns record indices.
pub fn balanced(
    records: &[StepwiseRecord],
    n: usize,
    exclude_qids: &HashSet<String>,
) -> Vec<usize> {
    let mut by_stage: [Vec<usize>; 3] = Default::default();
    for (i, r) in records.iter().enumerate() {
        if exclude_qids.contains(&r.qid) {
            continue;
        }
        let k = match r.stage {
            Stage::Init => 0,
            Stage::Expand => 1,
            Stage::Aggregate => 2,
        };
        by_stage[k].push(i);
    }
    let mut pos = [0usize; 3];
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let mut took = false;
        for k in 0..3 {
            if out.len() < n && pos[k] < by_stage[k].len() {
                out.push(by_stage[k][pos[k]]);
                pos[k] += 1;
                took = true;
            }
        }
        if !took {
            break;
        }
    }
    out
}

/// Renders and tokenizes `record` with the runtime template, fitted into `budget` tokens.
pub fn render_prompt(
    record: &StepwiseRecord,
    tokenizer: &tokenizers::Tokenizer,
    word_cap: usize,
    budget: usize,
) -> Result<Prompt> {
    render_prompt_in(
        &steper_runtime::prompt::PromptLayout::Plain,
        record,
        tokenizer,
        word_cap,
        budget,
    )
}

/// [`render_prompt`] with the prompt laid out by `layout` (the model's `--prompt-format`).
pub fn render_prompt_in(
    layout: &steper_runtime::prompt::PromptLayout,
    record: &StepwiseRecord,
    tokenizer: &tokenizers::Tokenizer,
    word_cap: usize,
    budget: usize,
) -> Result<Prompt> {
    let count = |s: &str| -> steper_runtime::Result<usize> {
        tokenizer
            .encode(s, true)
            .map(|e| e.get_ids().len())
            .map_err(|e| steper_runtime::Error::Tokenizer(e.to_string()))
    };
    let fitted = layout.fit(
        &record.question,
        &record.passages,
        &record.reasoning,
        None,
        word_cap,
        budget,
        count,
    )?;
    let ids = tokenizer
        .encode(fitted.text.as_str(), true)
        .map_err(|e| Error::Stats(format!("tokenizer: {e}")))?
        .get_ids()
        .to_vec();
    Ok(Prompt {
        source: format!(
            "{}/{}/{}",
            record.qid,
            match record.stage {
                Stage::Init => "init",
                Stage::Expand => "expand",
                Stage::Aggregate => "aggregate",
            },
            record.step
        ),
        stage: record.stage,
        ids,
    })
}

/// Calibration prompts (`n`, balanced) and held-out prompts (`holdout`, balanced, from other
/// questions when there are enough) rendered from `records`.
pub fn split_prompts(
    layout: &steper_runtime::prompt::PromptLayout,
    records: &[StepwiseRecord],
    n: usize,
    holdout: usize,
    tokenizer: &tokenizers::Tokenizer,
    word_cap: usize,
    budget: usize,
) -> Result<(Vec<Prompt>, Vec<Prompt>)> {
    let calib = balanced(records, n, &HashSet::new());
    let qids: HashSet<String> = calib.iter().map(|&i| records[i].qid.clone()).collect();
    let mut held = balanced(records, holdout, &qids);
    if held.len() < holdout {
        let taken: HashSet<usize> = calib.iter().chain(&held).copied().collect();
        held.extend(
            (0..records.len())
                .filter(|i| !taken.contains(i))
                .take(holdout - held.len()),
        );
    }
    let render = |ix: &[usize]| -> Result<Vec<Prompt>> {
        ix.iter()
            .map(|&i| render_prompt_in(layout, &records[i], tokenizer, word_cap, budget))
            .filter(|p| !matches!(p, Ok(p) if p.ids.is_empty()))
            .collect()
    };
    Ok((render(&calib)?, render(&held)?))
}

/// Folds `data` (rows of `k` channels) into the running per-channel maxima `acc` of |x|
/// (non-finite values are skipped; `acc` empty = nothing seen yet).
pub fn channel_max(acc: &mut Vec<f32>, data: &[f32], k: usize) -> std::result::Result<(), String> {
    if k == 0 || !data.len().is_multiple_of(k) {
        return Err(format!(
            "{} values do not split into rows of {k} channels",
            data.len()
        ));
    }
    if acc.is_empty() {
        acc.resize(k, 0.0);
    } else if acc.len() != k {
        return Err(format!("{k} channels, earlier prompts had {}", acc.len()));
    }
    for row in data.chunks_exact(k) {
        for (a, &x) in acc.iter_mut().zip(row) {
            if x.is_finite() {
                *a = a.max(x.abs());
            }
        }
    }
    Ok(())
}

pub(crate) fn ort_err(e: impl std::fmt::Display) -> Error {
    Error::Ort(e.to_string())
}

/// An ONNX Runtime CPU session over the augmented graph that collects tensor statistics.
pub struct Collector {
    session: Session,
    manifest: Manifest,
    names: Vec<String>,
    /// Statistics, one per name.
    pub stats: Vec<TensorStats>,
    /// Per-channel max |x| over the last dimension, for the names asked for (the inputs of the
    /// linear layers, which SmoothQuant-style smoothing needs); `None` for the others.
    pub channels: Vec<Option<Vec<f32>>>,
    /// `Σ x xᵀ` over the last dimension, for the names asked for by [`Self::with_hessians`]
    /// (GPTQ's Hessians); `None` for the others.
    pub hessians: Vec<Option<crate::hessian::HessianSum>>,
}

impl Collector {
    /// Opens `augmented` (a graph with `names` among its outputs) on ONNX Runtime's CPU
    /// provider, with `bins` histogram bins per tensor; the tensors of `names` that are also in
    /// `per_channel` get per-channel maxima too.
    pub fn new(
        augmented: &Path,
        manifest: &Manifest,
        names: Vec<String>,
        per_channel: &[String],
        bins: usize,
        threads: Option<usize>,
    ) -> Result<Self> {
        let env = steper_runtime::backend::environment(None)?;
        let mut b = Session::builder(&env).map_err(ort_err)?;
        if let Some(n) = threads {
            b = b.with_intra_threads(n).map_err(ort_err)?;
        }
        let session = b.commit_from_file(augmented).map_err(|e| Error::Model {
            path: augmented.to_path_buf(),
            message: format!("ONNX Runtime cannot load the augmented graph: {e}"),
        })?;
        let stats = names.iter().map(|_| TensorStats::new(bins)).collect();
        let channels = names
            .iter()
            .map(|n| per_channel.contains(n).then(Vec::new))
            .collect();
        let hessians = names.iter().map(|_| None).collect();
        Ok(Collector {
            session,
            manifest: manifest.clone(),
            names,
            stats,
            channels,
            hessians,
        })
    }

    /// Also sums `Σ x xᵀ` (over the last dimension) of the collected tensors in `inputs`.
    pub fn with_hessians(mut self, inputs: &[String]) -> Self {
        self.hessians = self
            .names
            .iter()
            .map(|n| {
                inputs
                    .contains(n)
                    .then(|| crate::hessian::HessianSum::new(0))
            })
            .collect();
        self
    }

    /// The collected tensor names.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// Prefills `ids` (batch 1, empty cache) and adds every collected tensor's values.
    pub fn observe(&mut self, ids: &[u32]) -> Result<()> {
        if ids.is_empty() {
            return Err(Error::Stats("a calibration prompt has no tokens".into()));
        }
        let g = &self.manifest.graph;
        let s = ids.len();
        let i64s = |v: Vec<i64>| -> Result<SessionInputValue<'static>> {
            Ok(Tensor::from_array(([1usize, s], v))
                .map_err(ort_err)?
                .into())
        };
        let mut feed: Vec<(Cow<'_, str>, SessionInputValue<'_>)> = vec![
            (
                "input_ids".into(),
                i64s(ids.iter().map(|&t| t as i64).collect())?,
            ),
            ("attention_mask".into(), i64s(vec![1; s])?),
            ("position_ids".into(), i64s((0..s as i64).collect())?),
        ];
        for name in g.inputs.iter().skip(3) {
            let empty =
                Tensor::from_array(([1usize, g.num_kv_heads, 0, g.head_dim], Vec::<f32>::new()))
                    .map_err(ort_err)?;
            feed.push((Cow::Owned(name.clone()), empty.into()));
        }
        let out = self.session.run(feed).map_err(ort_err)?;
        for (((name, st), ch), hs) in self
            .names
            .iter()
            .zip(self.stats.iter_mut())
            .zip(self.channels.iter_mut())
            .zip(self.hessians.iter_mut())
        {
            let v = out
                .get(name)
                .ok_or_else(|| Error::Ort(format!("the augmented graph has no output `{name}`")))?;
            let (shape, data) = v
                .try_extract_tensor::<f32>()
                .map_err(|e| Error::Ort(format!("output `{name}` is not an f32 tensor: {e}")))?;
            st.observe(data);
            if let Some(ch) = ch {
                let k = shape.last().copied().unwrap_or(0).max(0) as usize;
                channel_max(ch, data, k).map_err(|m| Error::Stats(format!("`{name}`: {m}")))?;
            }
            if let Some(hs) = hs {
                let k = shape.last().copied().unwrap_or(0).max(0) as usize;
                if hs.channels() == 0 {
                    *hs = crate::hessian::HessianSum::new(k);
                } else if hs.channels() != k {
                    return Err(Error::Stats(format!(
                        "`{name}`: {k} channels, earlier prompts had {}",
                        hs.channels()
                    )));
                }
                hs.add(data)
                    .map_err(|m| Error::Stats(format!("`{name}`: {m}")))?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::channel_max;

    #[test]
    fn channel_max_keeps_the_largest_magnitude_per_last_dim_channel() {
        let mut acc = Vec::new();
        channel_max(&mut acc, &[1.0, -5.0, 2.0, -3.0, 4.0, f32::NAN], 3).unwrap();
        assert_eq!(acc, vec![3.0, 5.0, 2.0]);
        channel_max(&mut acc, &[-7.0, 0.0, 0.5], 3).unwrap();
        assert_eq!(acc, vec![7.0, 5.0, 2.0]);
    }

    #[test]
    fn channel_max_rejects_a_shape_that_changes_or_does_not_split() {
        let mut acc = Vec::new();
        assert!(channel_max(&mut acc, &[1.0, 2.0, 3.0], 2).is_err());
        assert!(channel_max(&mut acc, &[1.0, 2.0], 0).is_err());
        channel_max(&mut acc, &[1.0, 2.0], 2).unwrap();
        let e = channel_max(&mut acc, &[1.0, 2.0, 3.0], 3).unwrap_err();
        assert!(e.contains("earlier prompts had 2"), "{e}");
    }
}
