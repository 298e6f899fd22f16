//! GPTQ's calibration Hessians (`--hessians`): for every input of a linear layer, `H = Σ x xᵀ`
//! over the calibration tokens, summed in f64 during the same collection pass as the ranges, and
//! written as `steper_export::quant::hessians::HESSIANS_FILE` keyed by the HF names of the
//! weights that read the input, with the identity of the model's weights, for `steper-export
//! --quantize int4 --calibration DIR`.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use steper_export::quant::hessians::{model_identity, weight_name, Hessians, WeightRef};
use tract_onnx::pb::ModelProto;

use crate::graph::{tensor_f32, Target};
use crate::{Error, Result};

/// A running `Σ x xᵀ` of `k`-channel rows (upper triangle kept, f64).
#[derive(Debug, Clone, PartialEq)]
pub struct HessianSum {
    k: usize,
    sum: Vec<f64>,
    /// Rows added.
    pub rows: u64,
    /// Rows skipped because they held a non-finite value.
    pub skipped: u64,
}

impl HessianSum {
    /// An empty sum over `k` channels.
    pub fn new(k: usize) -> Self {
        HessianSum {
            k,
            sum: vec![0.0; k * k],
            rows: 0,
            skipped: 0,
        }
    }

    /// Channels `K`.
    pub fn channels(&self) -> usize {
        self.k
    }

    /// Adds every row of `data` (rows of `K` channels, the last dimension); a row with a
    /// non-finite value is skipped (counted in [`Self::skipped`]).
    pub fn add(&mut self, data: &[f32]) -> std::result::Result<(), String> {
        let k = self.k;
        if k == 0 || !data.len().is_multiple_of(k) {
            return Err(format!(
                "{} values do not split into rows of {k} channels",
                data.len()
            ));
        }
        let mut x = vec![0f64; k];
        for row in data.chunks_exact(k) {
            if row.iter().any(|v| !v.is_finite()) {
                self.skipped += 1;
                continue;
            }
            for (d, &v) in x.iter_mut().zip(row) {
                *d = v as f64;
            }
            for i in 0..k {
                let xi = x[i];
                if xi == 0.0 {
                    continue;
                }
                for (s, &xj) in self.sum[i * k + i..(i + 1) * k].iter_mut().zip(&x[i..]) {
                    *s += xi * xj;
                }
            }
            self.rows += 1;
        }
        Ok(())
    }

    /// The full symmetric `[K, K]` matrix, row-major.
    pub fn matrix(&self) -> Vec<f64> {
        let k = self.k;
        let mut m = self.sum.clone();
        for i in 0..k {
            for j in 0..i {
                m[i * k + j] = m[j * k + i];
            }
        }
        m
    }
}

/// One linear weight read back from the graph: HF name, `[out, in]` values, out, in.
type GraphWeight = (String, Vec<f32>, usize, usize);

/// The weights of `model` that `targets` read, each once (for [`model_identity`]).
fn target_weights(model: &ModelProto, targets: &[Target], path: &Path) -> Result<Vec<GraphWeight>> {
    let graph = model.graph.as_ref().ok_or_else(|| Error::Model {
        path: path.to_path_buf(),
        message: "the model has no graph".into(),
    })?;
    let inits: HashMap<&str, _> = graph
        .initializer
        .iter()
        .map(|t| (t.name.as_str(), t))
        .collect();
    let mut seen = BTreeMap::new();
    for t in targets {
        let name = weight_name(&t.weight).to_string();
        if seen.contains_key(&name) {
            continue;
        }
        let init = inits.get(t.weight.as_str()).ok_or_else(|| Error::Model {
            path: path.to_path_buf(),
            message: format!("no initializer `{}`", t.weight),
        })?;
        let v = tensor_f32(init)?;
        let (d0, d1) = (init.dims[0] as usize, init.dims[1] as usize);
        // axis 1 indexes the outputs: the initializer is [in, out], transposed back.
        let (w, rows, cols) = if t.axis == 1 {
            let mut w = vec![0f32; v.len()];
            for i in 0..d0 {
                for o in 0..d1 {
                    w[o * d0 + i] = v[i * d1 + o];
                }
            }
            (w, d1, d0)
        } else {
            (v, d0, d1)
        };
        seen.insert(name, (w, rows, cols));
    }
    Ok(seen
        .into_iter()
        .map(|(n, (w, r, c))| (n, w, r, c))
        .collect())
}

/// The identity of the linear weights of the fp32 export `model` (read from `path`), as
/// `steper-export` computes it from the checkpoint.
pub fn export_identity(model: &ModelProto, targets: &[Target], path: &Path) -> Result<String> {
    let ws = target_weights(model, targets, path)?;
    Ok(model_identity(ws.iter().map(|(name, data, rows, cols)| {
        WeightRef {
            name,
            rows: *rows,
            cols: *cols,
            data,
        }
    })))
}

/// The Hessians of `targets` from the sums collected per input tensor (`sums`, keyed by the
/// targets' `activation`), for `tokens` calibration tokens of the fp32 export `model` (`path`).
pub fn hessians(
    model: &ModelProto,
    targets: &[Target],
    sums: &HashMap<String, HessianSum>,
    tokens: u64,
    path: &Path,
) -> Result<Hessians> {
    let mut out = Hessians::new(export_identity(model, targets, path)?, tokens);
    // Inputs in graph order, each with the weights that read it.
    let mut by_input: Vec<(&str, Vec<String>)> = Vec::new();
    for t in targets {
        let w = weight_name(&t.weight).to_string();
        match by_input.iter_mut().find(|(a, _)| *a == t.activation) {
            Some((_, v)) => {
                if !v.contains(&w) {
                    v.push(w)
                }
            }
            None => by_input.push((t.activation.as_str(), vec![w])),
        }
    }
    for (input, weights) in by_input {
        let s = sums.get(input).ok_or_else(|| {
            Error::Stats(format!(
                "no Hessian was collected for `{input}` (read by {})",
                weights.join(", ")
            ))
        })?;
        if s.rows == 0 {
            return Err(Error::Stats(format!(
                "`{input}` (read by {}) saw no finite calibration token",
                weights.join(", ")
            )));
        }
        out.insert(&weights, s.channels(), s.matrix())?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sum_is_the_symmetric_gram_matrix_of_the_rows() {
        let mut s = HessianSum::new(3);
        s.add(&[1.0, 2.0, 0.0, -1.0, 0.5, 3.0]).unwrap();
        s.add(&[f32::NAN, 1.0, 1.0]).unwrap();
        let m = s.matrix();
        let rows = [[1.0f64, 2.0, 0.0], [-1.0, 0.5, 3.0]];
        for i in 0..3 {
            for j in 0..3 {
                let want: f64 = rows.iter().map(|r| r[i] * r[j]).sum();
                assert_eq!(m[i * 3 + j], want, "({i}, {j})");
            }
        }
        assert_eq!((s.rows, s.skipped), (2, 1));
        assert!(s.add(&[1.0, 2.0]).is_err());
    }
}
