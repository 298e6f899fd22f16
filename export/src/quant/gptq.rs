//! GPTQ: block-wise int4/int8 weights with second-order error compensation (Frantar, Ashkboos,
//! Hoefler, Alistarh, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
//! Transformers", ICLR 2023).
//!
//! Round-to-nearest ([`super::quantize`]) rounds every weight on its own. GPTQ quantizes the
//! input columns of a linear layer one after another and, after each, moves the rounding error
//! onto the columns not yet quantized, weighted by how the layer's inputs correlate — the
//! Hessian `H = Σ x xᵀ` of the layer's output error `‖X (W − Ŵ)ᵀ‖²` over calibration tokens. Its
//! result is stored in exactly the same format as round-to-nearest ([`BlockQuantized`]: the same
//! block parameters from `BlockParams`, taken when a block's first column is reached, from the
//! block's weights as compensated so far), so the graph, the manifest and the dequantized
//! reference are unchanged.
//!
//! For one layer `W` `[N, K]` and its `H` `[K, K]`:
//!
//! ```text
//! H += λ · mean(diag H) · I             (damping; a column no token reached gets diag 1)
//! U  = upper Cholesky factor of H⁻¹     (H⁻¹ = Uᵀ U)
//! for each column i (in lazy batches of `batch` columns):
//!     at a block start: params of every row's block from the current W[:, i..i+block]
//!     ŵ = dequant(quant(W[:, i]));  e = (W[:, i] − ŵ) / U[i, i]
//!     W[:, j] −= e · U[i, j]  for j > i   (within the batch now, beyond it after the batch)
//! ```
//!
//! Unlike the paper's reference code, a column that no calibration token reached keeps its
//! weight (rounded to nearest) instead of being zeroed: a channel unseen in calibration can still
//! carry signal at run time.

use super::{BlockParams, BlockQuantized, QuantBits, ZeroPoints};
use crate::error::{Error, Result};

/// How GPTQ runs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GptqOptions {
    /// Damping λ, relative to the mean of the Hessian's diagonal (the paper's 1 %).
    pub damp: f64,
    /// Columns updated together before the rest of the matrix is (rounded up to a multiple of
    /// the quantization block).
    pub batch: usize,
}

impl Default for GptqOptions {
    fn default() -> Self {
        GptqOptions {
            damp: 0.01,
            batch: 128,
        }
    }
}

/// Times the damping is raised ×10 when `H` is still not positive definite.
const DAMP_RETRIES: usize = 4;

/// Quantizes the row-major `[rows, cols]` weight `w` of `layer` with GPTQ, given the row-major
/// `[cols, cols]` Hessian `h` of its inputs (any positive multiple of `Σ x xᵀ`).
#[allow(clippy::too_many_arguments)]
pub fn quantize_gptq(
    layer: &str,
    w: &[f32],
    rows: usize,
    cols: usize,
    h: &[f64],
    bits: QuantBits,
    block_size: usize,
    zero_points: ZeroPoints,
    opts: &GptqOptions,
) -> Result<BlockQuantized> {
    super::check_layout(layer, w, rows, cols, block_size)?;
    let bad = |message: String| Error::Tensor {
        name: layer.into(),
        message,
    };
    if h.len() != cols * cols {
        return Err(bad(format!(
            "expected a {cols}×{cols} Hessian of the layer's inputs, got {} values",
            h.len()
        )));
    }
    if let Some(i) = h.iter().position(|v| !v.is_finite()) {
        return Err(bad(format!(
            "the Hessian holds a non-finite value at row {}, column {}",
            i / cols,
            i % cols
        )));
    }
    if opts.damp.is_nan() || opts.damp <= 0.0 || !opts.damp.is_finite() {
        return Err(bad(format!("damping must be positive, got {}", opts.damp)));
    }
    let u = inverse_cholesky_upper(layer, h, cols, opts.damp)?;
    let batch = opts.batch.max(1).div_ceil(block_size) * block_size;
    let nb = cols / block_size;

    let mut w: Vec<f64> = w.iter().map(|&x| x as f64).collect();
    let mut codes = vec![0i8; rows * cols];
    let mut params: Vec<Option<BlockParams>> = vec![None; rows * nb];
    let mut err = vec![0f64; rows * batch];
    let mut start = 0;
    while start < cols {
        let end = (start + batch).min(cols);
        for i in start..end {
            let d = u[i * cols + i];
            for r in 0..rows {
                let row = &mut w[r * cols..(r + 1) * cols];
                let b = i / block_size;
                if i % block_size == 0 {
                    let block: Vec<f32> =
                        row[i..i + block_size].iter().map(|&x| x as f32).collect();
                    params[r * nb + b] = Some(BlockParams::of(&block, bits, zero_points));
                }
                let p = params[r * nb + b].expect("set at the block's first column");
                let q = p.code(row[i] as f32);
                codes[r * cols + i] = q;
                let e = (row[i] - p.value(q) as f64) / d;
                err[r * batch + (i - start)] = e;
                let ui = &u[i * cols..(i + 1) * cols];
                for j in i + 1..end {
                    row[j] -= e * ui[j];
                }
            }
        }
        // The batch's errors reach the columns after it in one pass.
        for r in 0..rows {
            let e = &err[r * batch..r * batch + (end - start)];
            let row = &mut w[r * cols..(r + 1) * cols];
            for (t, &et) in e.iter().enumerate() {
                if et == 0.0 {
                    continue;
                }
                let ui = &u[(start + t) * cols..(start + t + 1) * cols];
                for j in end..cols {
                    row[j] -= et * ui[j];
                }
            }
        }
        start = end;
    }
    let params: Vec<BlockParams> = params
        .into_iter()
        .map(|p| p.expect("every block reached"))
        .collect();
    Ok(BlockQuantized::from_params(
        rows,
        cols,
        block_size,
        bits,
        codes,
        &params,
        zero_points,
    ))
}

/// `U`, upper triangular with `(H + λ·mean(diag)·I)⁻¹ = Uᵀ U`, row-major `[n, n]`. A zero
/// diagonal entry (an input no token reached) is set to 1 first. The damping is raised ×10 up to
/// [`DAMP_RETRIES`] times while the matrix is not positive definite.
fn inverse_cholesky_upper(layer: &str, h: &[f64], n: usize, damp: f64) -> Result<Vec<f64>> {
    let mut base = h.to_vec();
    for i in 0..n {
        if base[i * n + i] <= 0.0 {
            base[i * n + i] = 1.0;
        }
    }
    let mean = (0..n).map(|i| base[i * n + i]).sum::<f64>() / n.max(1) as f64;
    let mut lambda = damp;
    for _ in 0..=DAMP_RETRIES {
        let mut a = base.clone();
        for i in 0..n {
            a[i * n + i] += lambda * mean;
        }
        if let Some(l) = cholesky_lower(&a, n) {
            let inv = inverse_from_cholesky(&l, n);
            if let Some(m) = cholesky_lower(&inv, n) {
                // U = Mᵀ
                let mut u = vec![0f64; n * n];
                for i in 0..n {
                    for j in 0..=i {
                        u[j * n + i] = m[i * n + j];
                    }
                }
                return Ok(u);
            }
        }
        lambda *= 10.0;
    }
    Err(Error::Tensor {
        name: layer.into(),
        message: format!(
            "the inputs' Hessian is not positive definite even with damping {lambda:e} × its mean \
             diagonal: the calibration data does not describe this layer"
        ),
    })
}

/// Lower `L` with `a = L Lᵀ`, or `None` when `a` is not (numerically) positive definite.
fn cholesky_lower(a: &[f64], n: usize) -> Option<Vec<f64>> {
    let mut l = vec![0f64; n * n];
    for i in 0..n {
        for j in 0..=i {
            let dot: f64 = (0..j).map(|k| l[i * n + k] * l[j * n + k]).sum();
            let v = a[i * n + j] - dot;
            if i == j {
                if v.is_nan() || v <= 0.0 || !v.is_finite() {
                    return None;
                }
                l[i * n + i] = v.sqrt();
            } else {
                l[i * n + j] = v / l[j * n + j];
            }
        }
    }
    Some(l)
}

/// `(L Lᵀ)⁻¹` from the lower Cholesky factor `L`: `L⁻ᵀ L⁻¹`, symmetric.
fn inverse_from_cholesky(l: &[f64], n: usize) -> Vec<f64> {
    // X = L⁻¹ (lower triangular), by forward substitution column by column.
    let mut x = vec![0f64; n * n];
    for c in 0..n {
        x[c * n + c] = 1.0 / l[c * n + c];
        for i in c + 1..n {
            let s: f64 = (c..i).map(|k| l[i * n + k] * x[k * n + c]).sum();
            x[i * n + c] = -s / l[i * n + i];
        }
    }
    // Xᵀ X
    let mut inv = vec![0f64; n * n];
    for i in 0..n {
        for j in 0..=i {
            let s: f64 = (i..n).map(|k| x[k * n + i] * x[k * n + j]).sum();
            inv[i * n + j] = s;
            inv[j * n + i] = s;
        }
    }
    inv
}

#[cfg(test)]
mod tests;
