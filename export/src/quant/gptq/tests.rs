//! GPTQ against round-to-nearest on constructed layers: the same format, equal results where
//! inputs are uncorrelated, a smaller output error where they are correlated.

use super::*;
use crate::quant::quantize;

/// `H⁻¹ H` from the factor is the identity to this (f64 on a 24×24 Hessian whose damped
/// condition number is ≈ 10⁴).
const LINALG_TOLERANCE: f64 = 1e-6;
/// GPTQ's output error on correlated inputs, as a share of round-to-nearest's, stays below this
/// (the paper's whole point; on these layers it is ≈ 0.3–0.6).
const GPTQ_ERROR_SHARE: f64 = 0.8;

/// xorshift64*: a seeded source for the constructed layers.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let v = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D);
        (v >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
    }
}

/// `t` tokens of `k` inputs that mix `k / 4` latent factors (strongly correlated columns) plus a
/// little noise, row-major `[t, k]`.
fn correlated_inputs(rng: &mut Rng, t: usize, k: usize) -> Vec<f64> {
    let f = (k / 4).max(1);
    let mix: Vec<f64> = (0..f * k).map(|_| rng.next()).collect();
    let mut x = vec![0f64; t * k];
    for r in 0..t {
        let z: Vec<f64> = (0..f).map(|_| rng.next()).collect();
        for c in 0..k {
            x[r * k + c] = (0..f).map(|j| z[j] * mix[j * k + c]).sum::<f64>() + 0.05 * rng.next();
        }
    }
    x
}

fn hessian(x: &[f64], t: usize, k: usize) -> Vec<f64> {
    let mut h = vec![0f64; k * k];
    for r in 0..t {
        let row = &x[r * k..(r + 1) * k];
        for i in 0..k {
            for j in 0..k {
                h[i * k + j] += row[i] * row[j];
            }
        }
    }
    h
}

/// `‖X (W − Ŵ)ᵀ‖²`.
fn output_error(x: &[f64], t: usize, k: usize, w: &[f32], q: &BlockQuantized) -> f64 {
    let d = q.dequantize();
    let mut total = 0.0;
    for r in 0..t {
        for n in 0..q.rows {
            let s: f64 = (0..k)
                .map(|c| x[r * k + c] * (w[n * k + c] - d[n * k + c]) as f64)
                .sum();
            total += s * s;
        }
    }
    total
}

fn weights(rng: &mut Rng, n: usize, k: usize) -> Vec<f32> {
    (0..n * k).map(|_| rng.next() as f32 * 0.1).collect()
}

#[test]
fn uncorrelated_inputs_give_round_to_nearest_exactly() -> Result<()> {
    let (n, k) = (8, 64);
    let w = weights(&mut Rng(7), n, k);
    let mut h = vec![0f64; k * k];
    for i in 0..k {
        h[i * k + i] = 3.0;
    }
    for zero_points in [ZeroPoints::None, ZeroPoints::Int, ZeroPoints::Float] {
        for bits in [QuantBits::Int4, QuantBits::Int8] {
            let g = quantize_gptq(
                "w",
                &w,
                n,
                k,
                &h,
                bits,
                32,
                zero_points,
                &Default::default(),
            )?;
            let r = quantize("w", &w, n, k, bits, 32, zero_points)?;
            assert_eq!(g, r, "{bits:?}, zero points {zero_points:?}");
        }
    }
    Ok(())
}

#[test]
fn correlated_inputs_lose_less_than_round_to_nearest() -> Result<()> {
    let mut rng = Rng(0x5eed);
    let (t, n, k) = (256, 12, 64);
    let x = correlated_inputs(&mut rng, t, k);
    let h = hessian(&x, t, k);
    let w = weights(&mut rng, n, k);
    for zero_points in [ZeroPoints::None, ZeroPoints::Int, ZeroPoints::Float] {
        let g = quantize_gptq(
            "w",
            &w,
            n,
            k,
            &h,
            QuantBits::Int4,
            32,
            zero_points,
            &Default::default(),
        )?;
        let r = quantize("w", &w, n, k, QuantBits::Int4, 32, zero_points)?;
        assert!(g.codes.iter().all(|&c| (-8..=7).contains(&c)));
        let (eg, er) = (
            output_error(&x, t, k, &w, &g),
            output_error(&x, t, k, &w, &r),
        );
        assert!(
            eg < GPTQ_ERROR_SHARE * er,
            "zero points {zero_points:?}: GPTQ {eg:.4} vs round-to-nearest {er:.4}"
        );
    }
    Ok(())
}

#[test]
fn a_batch_smaller_than_the_matrix_gives_the_same_result() -> Result<()> {
    // Lazy batches only reorder the updates: one batch of all columns and batches of one block
    // agree up to floating-point reassociation, which moves no code here.
    let mut rng = Rng(42);
    let (t, n, k) = (128, 6, 96);
    let x = correlated_inputs(&mut rng, t, k);
    let h = hessian(&x, t, k);
    let w = weights(&mut rng, n, k);
    let one = GptqOptions {
        batch: k,
        ..Default::default()
    };
    let small = GptqOptions {
        batch: 32,
        ..Default::default()
    };
    let a = quantize_gptq(
        "w",
        &w,
        n,
        k,
        &h,
        QuantBits::Int4,
        32,
        ZeroPoints::None,
        &one,
    )?;
    let b = quantize_gptq(
        "w",
        &w,
        n,
        k,
        &h,
        QuantBits::Int4,
        32,
        ZeroPoints::None,
        &small,
    )?;
    assert_eq!(a, b);
    Ok(())
}

#[test]
fn an_input_no_token_reached_keeps_its_weight() -> Result<()> {
    let mut rng = Rng(3);
    let (t, n, k) = (128, 4, 32);
    let mut x = correlated_inputs(&mut rng, t, k);
    let dead = 5;
    for r in 0..t {
        x[r * k + dead] = 0.0;
    }
    let h = hessian(&x, t, k);
    let w = weights(&mut rng, n, k);
    let g = quantize_gptq(
        "w",
        &w,
        n,
        k,
        &h,
        QuantBits::Int4,
        32,
        ZeroPoints::None,
        &Default::default(),
    )?;
    let d = g.dequantize();
    for r in 0..n {
        // Nothing is moved onto the dead input, so it is rounded from its own weight: within
        // one step (the block's scale) of it, not zeroed.
        let step = g.scales[r].abs();
        let (orig, got) = (w[r * k + dead], d[r * k + dead]);
        assert!((orig - got).abs() <= step, "row {r}: {orig} → {got}");
    }
    Ok(())
}

#[test]
fn bad_hessians_are_refused_naming_the_layer() {
    let w = vec![0.1f32; 2 * 32];
    let name = "model.layers.3.mlp.up_proj.weight";
    let opts = GptqOptions::default();
    let e = quantize_gptq(
        name,
        &w,
        2,
        32,
        &[1.0; 31 * 31],
        QuantBits::Int4,
        32,
        ZeroPoints::None,
        &opts,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains(name) && e.contains("32×32 Hessian"), "{e}");
    let mut h = vec![0f64; 32 * 32];
    h[33] = f64::NAN;
    let e = quantize_gptq(
        name,
        &w,
        2,
        32,
        &h,
        QuantBits::Int4,
        32,
        ZeroPoints::None,
        &opts,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("row 1, column 1"), "{e}");
    // Negative definite: damping cannot rescue it.
    let mut h = vec![0f64; 32 * 32];
    for i in 0..32 {
        h[i * 32 + i] = 1.0;
    }
    h[0] = 1.0;
    h[1] = -5000.0;
    h[32] = -5000.0;
    let e = quantize_gptq(
        name,
        &w,
        2,
        32,
        &h,
        QuantBits::Int4,
        32,
        ZeroPoints::None,
        &opts,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("not positive definite"), "{e}");
    let e = quantize_gptq(
        name,
        &w,
        2,
        32,
        &h,
        QuantBits::Int4,
        24,
        ZeroPoints::None,
        &opts,
    )
    .unwrap_err();
    assert!(matches!(e, Error::BlockSize { .. }), "{e}");
}

#[test]
fn the_factor_inverts_the_damped_hessian() -> Result<()> {
    let mut rng = Rng(11);
    let (t, k) = (64, 24);
    let x = correlated_inputs(&mut rng, t, k);
    let h = hessian(&x, t, k);
    let damp = 0.01;
    let u = inverse_cholesky_upper("w", &h, k, damp)?;
    let mean = (0..k).map(|i| h[i * k + i]).sum::<f64>() / k as f64;
    for i in 0..k {
        for j in 0..i {
            assert_eq!(u[i * k + j], 0.0, "U is upper triangular");
        }
    }
    // (Uᵀ U) (H + λ mean I) = I
    for i in 0..k {
        for j in 0..k {
            let mut s = 0.0;
            for m in 0..k {
                let inv_im: f64 = (0..k).map(|r| u[r * k + i] * u[r * k + m]).sum();
                let a_mj = h[m * k + j] + if m == j { damp * mean } else { 0.0 };
                s += inv_im * a_mj;
            }
            let want = if i == j { 1.0 } else { 0.0 };
            assert!((s - want).abs() < LINALG_TOLERANCE, "({i},{j}): {s}");
        }
    }
    Ok(())
}
