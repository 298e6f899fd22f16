//! Unit tests of the block quantizer: code ranges, rounding error, packing layouts.

use super::*;

fn ramp(n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| ((i * 7919 % 101) as f32 - 50.0) / 17.0)
        .collect()
}

#[test]
fn int4_codes_stay_in_range_and_the_extreme_is_exact() -> Result<()> {
    let w = ramp(4 * 64);
    let q = quantize("w", &w, 4, 64, QuantBits::Int4, 32, ZeroPoints::None)?;
    assert!(q.codes.iter().all(|&c| (-8..=7).contains(&c)));
    assert_eq!(q.scales.len(), 8);
    let d = q.dequantize();
    for (b, block) in w.chunks(32).enumerate() {
        // The first element of largest magnitude is the one the scale is taken from.
        let mut i = 0;
        for j in 1..32 {
            if block[j].abs() > block[i].abs() {
                i = j;
            }
        }
        // The extreme maps onto -8 · scale; the only error is the f16 rounding of the scale.
        let rel = (d[b * 32 + i] - block[i]).abs() / block[i].abs();
        assert!(rel < 1e-3, "block {b}: extreme off by {rel}");
        // Every element within half a step (plus the clamp at +7 of the far side).
        let step = q.scales[b].abs();
        for j in 0..32 {
            assert!((d[b * 32 + j] - block[j]).abs() <= step * 1.0 + 1e-6);
        }
    }
    Ok(())
}

#[test]
fn int8_error_is_at_most_half_a_step() -> Result<()> {
    let w = ramp(3 * 32);
    let q = quantize("w", &w, 3, 32, QuantBits::Int8, 16, ZeroPoints::None)?;
    let d = q.dequantize();
    for (i, (a, b)) in w.iter().zip(&d).enumerate() {
        let step = q.scales[i / 16].abs();
        // Half a step inside the code range; an element of the far sign beyond +127 steps
        // (only the mirror of the block's extreme) is clamped, at most one step off.
        let bound = if (a / step).abs() <= 127.0 { 0.5 } else { 1.0 };
        assert!((a - b).abs() <= step * bound + 1e-6, "element {i}");
    }
    Ok(())
}

#[test]
fn block_size_must_divide_the_input_dim() {
    let e = quantize(
        "model.layers.0.mlp.down_proj.weight",
        &ramp(2 * 48),
        2,
        48,
        QuantBits::Int4,
        32,
        ZeroPoints::None,
    )
    .err()
    .map(|e| e.to_string())
    .unwrap_or_default();
    assert!(
        e.contains("down_proj") && e.contains("--block-size") && e.contains("48"),
        "{e}"
    );
}

#[test]
fn packing_layouts() -> Result<()> {
    // Row 0: codes -8..7 then 7..-8; row 1 negated-ish pattern.
    let mut w = Vec::new();
    for r in 0..2 {
        for k in 0..32 {
            let c = if k < 16 {
                k as f32 - 8.0
            } else {
                23.0 - k as f32
            };
            w.push(if r == 0 { c } else { -c * 0.5 });
        }
    }
    let q = quantize("w", &w, 2, 32, QuantBits::Int4, 16, ZeroPoints::None)?;
    // Row 0 block 0: extreme is -8 → scale 1, codes equal the values.
    assert_eq!(q.scales[0], 1.0);
    assert_eq!(&q.codes[..16], &(-8..8).collect::<Vec<i8>>()[..]);
    let b = q.matmul_nbits_b();
    assert_eq!(b.len(), 2 * 32 / 2);
    // codes -8, -7 → unsigned 0, 1 → low nibble 0, high nibble 1.
    assert_eq!(b[0], 0x10);
    // Transposed int4: element (k=0, n=0) = -8 → 0x8 low nibble, (k=0, n=1) high nibble.
    let t = q.transposed_raw();
    assert_eq!(t.len(), 32);
    assert_eq!(t[0] & 0x0F, 0x8);
    assert_eq!(((t[0] >> 4) as i8) << 4 >> 4, q.codes[32]);
    let s = q.transposed_scales();
    assert_eq!(s, vec![q.scales[0], q.scales[2], q.scales[1], q.scales[3]]);
    Ok(())
}

#[test]
fn zero_block_quantizes_to_zero() -> Result<()> {
    let q = quantize(
        "w",
        &[0.0; 32],
        1,
        32,
        QuantBits::Int4,
        32,
        ZeroPoints::None,
    )?;
    assert!(q.dequantize().iter().all(|&x| x == 0.0));
    Ok(())
}

#[test]
fn ort_cpu_checks_block_and_bits() {
    let mut o = QuantOptions::int4();
    o.block_size = 24;
    assert!(o.check().unwrap_err().to_string().contains("--block-size"));
    o.block_size = 32;
    o.bits = QuantBits::Int8;
    if !ORT_CPU_BITS.contains(&QuantBits::Int8) {
        assert!(o.check().unwrap_err().to_string().contains("--quantize"));
    }
    o.target = QuantTarget::Portable;
    assert!(o.check().is_ok());
}

#[test]
fn zero_points_use_the_whole_code_range_keep_zero_exact_and_stay_within_a_step() -> Result<()> {
    // One block all positive, one mixed, one all negative, one zero.
    let mut w: Vec<f32> = (0..32).map(|i| 0.1 + i as f32 * 0.05).collect();
    w.extend(ramp(32));
    w.extend((0..32).map(|i| -0.3 - i as f32 * 0.01));
    w.extend([0.0; 32]);
    for bits in [QuantBits::Int4, QuantBits::Int8] {
        let q = quantize("w", &w, 1, 128, bits, 32, ZeroPoints::Int)?;
        let z = q.zero_points.as_ref().expect("zero points");
        assert_eq!(z.len(), 4);
        let (lo, hi) = (bits.q_min() as i8, bits.q_max() as i8);
        assert!(q.codes.iter().all(|c| (lo..=hi).contains(c)));
        // The all-positive block's zero point sits at the bottom, the all-negative one's at the
        // top: the codes cover one side of 0 only.
        assert_eq!(z[0], lo, "{bits:?}");
        assert_eq!(z[2], hi, "{bits:?}");
        let d = q.dequantize();
        assert!(d[96..].iter().all(|&x| x == 0.0), "a zero block stays zero");
        // Half a step, or one where the f16-rounded scale pushes a block end past the last
        // code and it is clamped.
        for (i, (a, b)) in w.iter().zip(&d).enumerate() {
            let step = q.scales[i / 32];
            assert!(
                (a - b).abs() <= step + 1e-5,
                "{bits:?} element {i}: {a} vs {b}"
            );
        }
        let within_half = w
            .iter()
            .zip(&d)
            .enumerate()
            .filter(|(i, (a, b))| (*a - *b).abs() <= q.scales[i / 32] * 0.5 + 1e-5)
            .count();
        assert!(
            within_half >= 120,
            "{bits:?}: {within_half} of 128 within half a step"
        );
    }
    Ok(())
}

#[test]
fn zero_points_beat_symmetric_blocks_on_one_sided_weights() -> Result<()> {
    let w: Vec<f32> = (0..256)
        .map(|i| 0.2 + ((i * 37 % 64) as f32) / 100.0)
        .collect();
    let err = |zp: ZeroPoints| -> Result<f32> {
        let q = quantize("w", &w, 1, 256, QuantBits::Int4, 32, zp)?;
        Ok(w.iter()
            .zip(q.dequantize())
            .map(|(a, b)| (a - b).abs())
            .sum::<f32>()
            / w.len() as f32)
    };
    let (sym, asym) = (err(ZeroPoints::None)?, err(ZeroPoints::Int)?);
    assert!(asym < sym * 0.6, "asymmetric {asym} vs symmetric {sym}");
    // A float minimum does not widen the range to hold 0, so its step is finer still.
    let float = err(ZeroPoints::Float)?;
    assert!(
        float < asym * 0.8,
        "float minimum {float} vs integer zero point {asym}"
    );
    Ok(())
}

/// A Q4_1 block as llama.cpp writes it: f16 scale `d` and minimum `m`, codes 0..=15 with both
/// ends used; the weights are `m + d·q` in f32.
fn q4_1_grid_rows(rows: usize, cols: usize) -> Vec<f32> {
    (0..rows * cols / 32)
        .flat_map(|b| {
            let d = half::f16::from_f32(0.003 + (b % 7) as f32 * 0.0011).to_f32();
            let m = half::f16::from_f32(-(0.9 + (b % 11) as f32 * 0.37) * 7.0 * d).to_f32();
            (0..32).map(move |i| {
                let q = match i {
                    0 => 0,
                    1 => 15,
                    _ => (i * 7 + b * 3) % 16,
                };
                m + d * q as f32
            })
        })
        .collect()
}

/// Relative tolerance of a value that should come back exactly up to f32 rounding.
const F32_ROUNDING: f32 = 1e-6;

#[test]
fn float_zero_points_bring_back_q4_1_weights_exactly_and_integer_ones_cannot() -> Result<()> {
    let (rows, cols) = (8, 128);
    let w = q4_1_grid_rows(rows, cols);
    let q = quantize("w", &w, rows, cols, QuantBits::Int4, 32, ZeroPoints::Float)?;
    assert!(q.zero_points.is_none());
    assert_eq!(q.offsets.as_ref().map(Vec::len), Some(rows * cols / 32));
    assert!(q.codes.iter().all(|&c| (-8..=7).contains(&c)));
    let amax = w.iter().fold(0f32, |a, x| a.max(x.abs()));
    for (i, (a, b)) in w.iter().zip(q.dequantize()).enumerate() {
        assert!(
            (a - b).abs() <= F32_ROUNDING * amax,
            "weight {i}: {a} came back as {b}"
        );
    }
    // An integer zero point shifts the whole block by the minimum's distance to the grid.
    let int = quantize("w", &w, rows, cols, QuantBits::Int4, 32, ZeroPoints::Int)?;
    let worst = w
        .iter()
        .zip(int.dequantize())
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(
        worst > 1e-4,
        "integer zero points reproduced the Q4_1 grid ({worst})"
    );
    Ok(())
}

#[test]
fn float_zero_point_blocks_stay_within_half_a_step_and_keep_constant_blocks_exact() -> Result<()> {
    let w = ramp(2 * 64);
    let q = quantize("w", &w, 2, 64, QuantBits::Int4, 32, ZeroPoints::Float)?;
    for (b, block) in w.chunks(32).enumerate() {
        let s = q.scales[b];
        let lo = block.iter().copied().fold(f32::INFINITY, f32::min);
        let hi = block.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        assert!(
            (s - (hi - lo) / 15.0).abs() <= 1e-3 * s,
            "block {b}: scale {s}"
        );
        let d = &q.dequantize()[b * 32..(b + 1) * 32];
        for (a, r) in block.iter().zip(d) {
            assert!(
                (a - r).abs() <= 0.5 * s * (1.0 + 1e-3),
                "block {b}: {a} → {r}"
            );
        }
    }
    let c = quantize(
        "w",
        &[0.25; 32],
        1,
        32,
        QuantBits::Int4,
        32,
        ZeroPoints::Float,
    )?;
    assert!(c.dequantize().iter().all(|&x| x == 0.25));
    // Transposed to [blocks, rows] for the block-sum correction.
    let o = q.offsets.clone().expect("offsets");
    assert_eq!(q.transposed_offsets(), Some(vec![o[0], o[2], o[1], o[3]]));
    Ok(())
}

#[test]
fn zero_point_packing_layouts() -> Result<()> {
    // 2 rows × 3 blocks of 16: zero points known by construction.
    let mut w = Vec::new();
    for r in 0..2 {
        for b in 0..3 {
            for k in 0..16 {
                // Block ranges [0, 15·s] (z = -8), [-15·s, 0] (z = 7) and [-5·s, 10·s] (z = -3).
                let v = match b {
                    0 => k as f32,
                    1 => -(k as f32),
                    _ => k as f32 - 5.0,
                };
                w.push(v * (r + 1) as f32);
            }
        }
    }
    let q = quantize("w", &w, 2, 48, QuantBits::Int4, 16, ZeroPoints::Int)?;
    assert_eq!(
        q.zero_points.as_deref(),
        Some(&[-8i8, 7, -3, -8, 7, -3][..])
    );
    // MatMulNBits: unsigned z + 8 → 0, 15, 5 per row; each row packed on its own (2 bytes).
    assert_eq!(
        q.matmul_nbits_zero_points(),
        Some(vec![0xF0, 0x05, 0xF0, 0x05])
    );
    // DequantizeLinear: [blocks, rows] signed nibbles packed over the flat tensor:
    // (b0: -8, -8), (b1: 7, 7), (b2: -3, -3).
    assert_eq!(q.transposed_zero_points(), Some(vec![0x88, 0x77, 0xDD]));
    assert_eq!(
        quantize("w", &w, 2, 48, QuantBits::Int4, 16, ZeroPoints::None)?.matmul_nbits_zero_points(),
        None
    );
    Ok(())
}
