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

/// Rows gathered before one `Xᵀ X` product is added to the sum (bounds the buffer at
/// `GRAM_ROWS × K` f64s).
const GRAM_ROWS: usize = 256;

/// A running `Σ x xᵀ` of `k`-channel rows (f64).
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
    /// non-finite value is skipped (counted in [`Self::skipped`]). Rows are gathered in f64 and
    /// added `GRAM_ROWS` at a time as one `Xᵀ X` matrix product (a rank-1 update per row sweeps
    /// the whole `K × K` sum once per token, which made a 128-prompt collection take most of an
    /// hour on SmolLM2-135M).
    pub fn add(&mut self, data: &[f32]) -> std::result::Result<(), String> {
        let k = self.k;
        if k == 0 || !data.len().is_multiple_of(k) {
            return Err(format!(
                "{} values do not split into rows of {k} channels",
                data.len()
            ));
        }
        let mut x: Vec<f64> = Vec::with_capacity(GRAM_ROWS.min(data.len() / k) * k);
        for row in data.chunks_exact(k) {
            if row.iter().any(|v| !v.is_finite()) {
                self.skipped += 1;
                continue;
            }
            x.extend(row.iter().map(|&v| v as f64));
            self.rows += 1;
            if x.len() == GRAM_ROWS * k {
                add_gram(&mut self.sum, &x, k);
                x.clear();
            }
        }
        add_gram(&mut self.sum, &x, k);
        Ok(())
    }

    /// The full symmetric `[K, K]` matrix, row-major (the upper triangle mirrored, so it is
    /// exactly symmetric whatever order the product summed in).
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

/// `sum += Xᵀ X` for the row-major `[n, k]` rows `x` (`n = x.len() / k`) and the row-major
/// `[k, k]` `sum`.
fn add_gram(sum: &mut [f64], x: &[f64], k: usize) {
    let n = x.len() / k;
    assert!(
        k > 0 && sum.len() == k * k && x.len() == n * k,
        "add_gram: a {k}×{k} sum and rows of {k}"
    );
    if n == 0 {
        return;
    }
    // SAFETY: dst is the k × k `sum` (row stride k, column stride 1); lhs is Xᵀ, k × n, read
    // from `x` with row stride 1 and column stride k (element (i, r) = x[r k + i]); rhs is X,
    // n × k (element (r, j) = x[r k + j]). Every index the strides reach is below k·k for dst
    // and below n·k for both operands, which the assert above checks; dst does not alias x.
    unsafe {
        gemm::gemm(
            k,
            k,
            n,
            sum.as_mut_ptr(),
            1,
            k as isize,
            true,
            x.as_ptr(),
            k as isize,
            1,
            x.as_ptr(),
            1,
            k as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::Rayon(0),
        )
    };
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

    /// f64 sums of f32 products in another order: equal to this relative error.
    const GRAM_ORDER_TOLERANCE: f64 = 1e-12;

    #[test]
    fn sums_over_several_products_equal_the_row_by_row_definition() {
        // 37 channels, 2·GRAM_ROWS + 11 rows in two calls, every 50th row non-finite.
        let k = 37;
        let n = 2 * GRAM_ROWS + 11;
        let mut state = 12345u64;
        let mut next = || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 33) as f32 / (1u64 << 31) as f32) * 4.0 - 2.0
        };
        let mut data: Vec<f32> = (0..n * k).map(|_| next()).collect();
        for r in (0..n).step_by(50) {
            data[r * k + 3] = f32::INFINITY;
        }
        let mut s = HessianSum::new(k);
        let split = 100 * k;
        s.add(&data[..split]).unwrap();
        s.add(&data[split..]).unwrap();
        let mut want = vec![0f64; k * k];
        let mut kept = 0;
        for row in data
            .chunks_exact(k)
            .filter(|r| r.iter().all(|v| v.is_finite()))
        {
            kept += 1;
            for i in 0..k {
                for j in 0..k {
                    want[i * k + j] += row[i] as f64 * row[j] as f64;
                }
            }
        }
        assert_eq!((s.rows, s.skipped), (kept, n as u64 - kept));
        let m = s.matrix();
        for (idx, (&got, &w)) in m.iter().zip(&want).enumerate() {
            assert!(
                (got - w).abs() <= GRAM_ORDER_TOLERANCE * w.abs().max(1.0),
                "({}, {}): {got} vs {w}",
                idx / k,
                idx % k
            );
            assert_eq!(got, m[(idx % k) * k + idx / k], "not symmetric");
        }
    }
}
