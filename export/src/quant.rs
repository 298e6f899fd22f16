//! Symmetric block-wise round-to-nearest weight quantization (`steper-export --quantize`).
//!
//! This module is the one place where weights are quantized and dequantized: the graph builder
//! packs [`BlockQuantized`] into the target's initializers, and `--verify` runs the candle model
//! on [`BlockQuantized::dequantize`] of the very same codes ([`dequantized_checkpoint`]), so the
//! export and its reference differ only by how a backend computes, never by the rounding.
//!
//! A weight `W` of a linear layer is read as `[N, K]` (HF's `[out, in]`) and cut into blocks of
//! `block_size` consecutive input elements of one output row. Per block, with `m` the element of
//! largest magnitude (its sign kept) and `q_min = -2^(bits-1)`:
//!
//! ```text
//! scale = f16_round(m / q_min)          (the extreme element maps exactly onto q_min)
//! q     = clamp(round(w / scale), q_min, 2^(bits-1) - 1)
//! ŵ     = q · scale
//! ```
//!
//! The zero point is 0 (stored as the format's implicit `2^(bits-1)` for `MatMulNBits`' unsigned
//! codes). Scales are rounded to values that f16 represents exactly, so a backend that keeps
//! scales in f16 (tract's Q4_0 packing, an fp16 export) dequantizes to exactly the same ŵ.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor};
use serde::Serialize;
use steper_models::{LlamaConfig, Weights};

use crate::error::{Error, Result};
use crate::graph::WeightSource;

/// `MatMulNBits` `accuracy_level` written by the `ort-cpu` target: 4 lets ONNX Runtime quantize
/// the activations to int8 per block and run integer dot products (VNNI/AVX2), the form
/// onnxruntime-genai's model builder emits for CPU.
pub const ACCURACY_LEVEL: i64 = 4;

/// Weight bit width.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum QuantBits {
    /// 4-bit codes in `[-8, 7]`.
    Int4,
    /// 8-bit codes in `[-128, 127]`.
    Int8,
}

impl QuantBits {
    /// 4 or 8.
    pub fn bits(self) -> u32 {
        match self {
            QuantBits::Int4 => 4,
            QuantBits::Int8 => 8,
        }
    }

    /// Smallest code (`-2^(bits-1)`).
    pub fn q_min(self) -> i32 {
        -(1 << (self.bits() - 1))
    }

    /// Largest code (`2^(bits-1) - 1`).
    pub fn q_max(self) -> i32 {
        (1 << (self.bits() - 1)) - 1
    }

    /// `int4` / `int8`.
    pub fn as_str(self) -> &'static str {
        match self {
            QuantBits::Int4 => "int4",
            QuantBits::Int8 => "int8",
        }
    }
}

impl std::str::FromStr for QuantBits {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "int4" | "4" => Ok(QuantBits::Int4),
            "int8" | "8" => Ok(QuantBits::Int8),
            _ => Err(Error::Option {
                option: "--quantize",
                expected: "int4 or int8".into(),
                got: s.into(),
            }),
        }
    }
}

/// Which ONNX form the quantized layers take.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum QuantTarget {
    /// `com.microsoft.MatMulNBits` (ONNX Runtime CPU/CUDA, onnxruntime-genai; tract reads the
    /// 4-bit form).
    #[serde(rename = "ort-cpu")]
    OrtCpu,
    /// Standard ONNX only: int4/int8 initializers → `DequantizeLinear` (opset 21, `block_size`)
    /// → `MatMul`, the weight-only form TensorRT 10 consumes.
    #[serde(rename = "portable")]
    Portable,
}

impl QuantTarget {
    /// `ort-cpu` / `portable`.
    pub fn as_str(self) -> &'static str {
        match self {
            QuantTarget::OrtCpu => "ort-cpu",
            QuantTarget::Portable => "portable",
        }
    }

    /// The ONNX operator the quantized layers use.
    pub fn op(self) -> &'static str {
        match self {
            QuantTarget::OrtCpu => "MatMulNBits",
            QuantTarget::Portable => "DequantizeLinear",
        }
    }
}

impl std::str::FromStr for QuantTarget {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "ort-cpu" => Ok(QuantTarget::OrtCpu),
            "portable" => Ok(QuantTarget::Portable),
            _ => Err(Error::Option {
                option: "--target",
                expected: "ort-cpu or portable".into(),
                got: s.into(),
            }),
        }
    }
}

/// Weight quantization of an export.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct QuantOptions {
    /// Bit width.
    pub bits: QuantBits,
    /// Input elements per block (one scale each); must divide every quantized layer's input
    /// dimension.
    pub block_size: usize,
    /// ONNX form.
    pub target: QuantTarget,
    /// Quantize the vocabulary projection (lm_head, or the tied embedding's use as lm_head; the
    /// embedding lookup always keeps float weights).
    pub lm_head: bool,
}

impl QuantOptions {
    /// int4, block 32, `ort-cpu`, lm_head quantized (the defaults of `steper-export --quantize`).
    pub fn int4() -> Self {
        QuantOptions {
            bits: QuantBits::Int4,
            block_size: 32,
            target: QuantTarget::OrtCpu,
            lm_head: true,
        }
    }

    /// Checks the combination before any weight is read: `MatMulNBits` needs a power-of-two
    /// block of at least 16 and a bit width in [`ORT_CPU_BITS`].
    pub fn check(&self) -> Result<()> {
        match self.target {
            QuantTarget::OrtCpu => {
                if self.block_size < 16 || !self.block_size.is_power_of_two() {
                    return Err(Error::Option {
                        option: "--block-size",
                        expected: "a power of two ≥ 16 for --target ort-cpu (MatMulNBits)".into(),
                        got: self.block_size.to_string(),
                    });
                }
                if !ORT_CPU_BITS.contains(&self.bits) {
                    return Err(Error::Option {
                        option: "--quantize",
                        expected:
                            "a bit width ONNX Runtime 1.31's CPU MatMulNBits runs (int4, int8)"
                                .into(),
                        got: self.bits.as_str().into(),
                    });
                }
            }
            QuantTarget::Portable => {
                if self.block_size < 2 {
                    return Err(Error::Option {
                        option: "--block-size",
                        expected: "at least 2".into(),
                        got: self.block_size.to_string(),
                    });
                }
            }
        }
        Ok(())
    }

    /// Reads back the options from a manifest record (`steper.json` `quantization`).
    pub fn from_record(r: &steper_runtime::manifest::WeightQuantization) -> Result<Self> {
        let bits = match r.bits {
            4 => QuantBits::Int4,
            8 => QuantBits::Int8,
            b => {
                return Err(Error::Option {
                    option: "quantization.bits",
                    expected: "4 or 8".into(),
                    got: b.to_string(),
                })
            }
        };
        Ok(QuantOptions {
            bits,
            block_size: r.block_size,
            target: r.target.parse().map_err(|_| Error::Option {
                option: "quantization.target",
                expected: "ort-cpu or portable".into(),
                got: r.target.clone(),
            })?,
            lm_head: r.lm_head,
        })
    }

    /// The manifest record of an export of `layers` quantized linear layers.
    pub fn record(&self, layers: usize) -> steper_runtime::manifest::WeightQuantization {
        steper_runtime::manifest::WeightQuantization {
            bits: self.bits.bits(),
            block_size: self.block_size,
            target: self.target.as_str().into(),
            op: self.target.op().into(),
            accuracy_level: (self.target == QuantTarget::OrtCpu).then_some(ACCURACY_LEVEL as u32),
            lm_head: self.lm_head,
            layers,
        }
    }
}

/// Bit widths the `ort-cpu` target accepts: ONNX Runtime 1.31's CPU `MatMulNBits` runs both
/// (test `int8_ort_cpu_matches_or_is_refused_naming_the_option` checks 8-bit).
pub const ORT_CPU_BITS: &[QuantBits] = &[QuantBits::Int4, QuantBits::Int8];

/// The weight names (`….weight`) that `q` quantizes in a model of `cfg`: every layer's seven
/// linear weights (their biases stay float), then the vocabulary projection when asked (`lm_head.weight`, or
/// `model.embed_tokens.weight` for tied embeddings).
pub fn quantized_weights(cfg: &LlamaConfig, q: &QuantOptions) -> Vec<String> {
    let mut v = Vec::new();
    for l in 0..cfg.num_hidden_layers {
        for p in steper_models::arch::Projection::ALL {
            v.push(p.weight_name(l));
        }
    }
    if q.lm_head {
        v.push(head_weight(cfg).into());
    }
    v
}

/// The tensor the vocabulary projection reads.
pub fn head_weight(cfg: &LlamaConfig) -> &'static str {
    if cfg.tie_word_embeddings {
        "model.embed_tokens.weight"
    } else {
        "lm_head.weight"
    }
}

/// A `[rows, cols]` matrix quantized along `cols` (rows = output features `N`, cols = input
/// features `K`).
#[derive(Debug, Clone, PartialEq)]
pub struct BlockQuantized {
    /// Output features `N`.
    pub rows: usize,
    /// Input features `K`.
    pub cols: usize,
    /// Input elements per block.
    pub block_size: usize,
    /// Bit width.
    pub bits: QuantBits,
    /// Signed codes, row-major `[rows, cols]`.
    pub codes: Vec<i8>,
    /// One scale per block, row-major `[rows, cols / block_size]`.
    pub scales: Vec<f32>,
}

/// Quantizes the row-major `[rows, cols]` weight `w` of layer `layer` (see the module doc for
/// the formula). `cols` must be a multiple of `block_size`, else [`Error::BlockSize`].
pub fn quantize(
    layer: &str,
    w: &[f32],
    rows: usize,
    cols: usize,
    bits: QuantBits,
    block_size: usize,
) -> Result<BlockQuantized> {
    if block_size == 0 || !cols.is_multiple_of(block_size) {
        return Err(Error::BlockSize {
            layer: layer.into(),
            input_dim: cols,
            block_size,
        });
    }
    if w.len() != rows * cols {
        return Err(Error::Tensor {
            name: layer.into(),
            message: format!("expected {rows}×{cols} values, got {}", w.len()),
        });
    }
    let (q_min, q_max) = (bits.q_min() as f32, bits.q_max() as f32);
    let mut codes = Vec::with_capacity(w.len());
    let mut scales = Vec::with_capacity(w.len() / block_size);
    for block in w.chunks_exact(block_size) {
        let m = block
            .iter()
            .copied()
            .fold(0f32, |a, x| if x.abs() > a.abs() { x } else { a });
        let scale = half::f16::from_f32(m / q_min).to_f32();
        scales.push(scale);
        for &x in block {
            let q = if scale == 0.0 || !scale.is_finite() {
                0.0
            } else {
                (x / scale).round().clamp(q_min, q_max)
            };
            codes.push(q as i8);
        }
    }
    Ok(BlockQuantized {
        rows,
        cols,
        block_size,
        bits,
        codes,
        scales,
    })
}

impl BlockQuantized {
    /// Blocks per row (`cols / block_size`).
    pub fn blocks_per_row(&self) -> usize {
        self.cols / self.block_size
    }

    /// The dequantized weight `ŵ = q · scale`, row-major `[rows, cols]`.
    pub fn dequantize(&self) -> Vec<f32> {
        self.codes
            .chunks_exact(self.block_size)
            .zip(&self.scales)
            .flat_map(|(b, &s)| b.iter().map(move |&q| q as f32 * s))
            .collect()
    }

    /// `MatMulNBits` input B: uint8 `[rows, blocks, block_size · bits / 8]`, unsigned codes
    /// `q + 2^(bits-1)` (so the default zero point applies), for 4 bits two per byte with the
    /// first element in the low nibble.
    pub fn matmul_nbits_b(&self) -> Vec<u8> {
        let offset = 1i32 << (self.bits.bits() - 1);
        let unsigned = self.codes.iter().map(|&q| (q as i32 + offset) as u8);
        match self.bits {
            QuantBits::Int8 => unsigned.collect(),
            QuantBits::Int4 => {
                let u: Vec<u8> = unsigned.collect();
                // cols is a multiple of block_size, which is even for MatMulNBits, so pairs never
                // straddle a block.
                u.chunks(2)
                    .map(|p| (p[0] & 0x0F) | (p.get(1).copied().unwrap_or(0) << 4))
                    .collect()
            }
        }
    }

    /// The weight transposed to `[cols, rows]` (MatMul's right-hand layout) as the raw data of
    /// an ONNX `INT4` (two's complement nibbles, element 0 in the low nibble, the flat tensor
    /// packed pairwise) or `INT8` tensor.
    pub fn transposed_raw(&self) -> Vec<u8> {
        let (r, c) = (self.rows, self.cols);
        let t = (0..c).flat_map(|k| (0..r).map(move |n| self.codes[n * c + k]));
        match self.bits {
            QuantBits::Int8 => t.map(|q| q as u8).collect(),
            QuantBits::Int4 => {
                let v: Vec<u8> = t.map(|q| (q as u8) & 0x0F).collect();
                v.chunks(2)
                    .map(|p| p[0] | (p.get(1).copied().unwrap_or(0) << 4))
                    .collect()
            }
        }
    }

    /// The scales transposed to `[blocks, rows]`, the `DequantizeLinear` scale of
    /// [`Self::transposed_raw`] with `axis = 0`.
    pub fn transposed_scales(&self) -> Vec<f32> {
        let nb = self.blocks_per_row();
        (0..nb)
            .flat_map(|b| (0..self.rows).map(move |n| self.scales[n * nb + b]))
            .collect()
    }
}

/// Reads and quantizes the weight `name` (`[out, in]`) of `w`.
pub fn quantize_weight(
    w: &dyn WeightSource,
    name: &str,
    q: &QuantOptions,
) -> Result<BlockQuantized> {
    let (data, shape) = w.tensor(name, false)?;
    let [rows, cols] = shape[..] else {
        return Err(Error::Tensor {
            name: name.into(),
            message: format!("expected a 2-D weight, got shape {shape:?}"),
        });
    };
    quantize(name, &data, rows, cols, q.bits, q.block_size)
}

/// The reference of a quantized export: the checkpoint's config and weights with every weight
/// that `q` quantizes replaced by its dequantized form. With tied embeddings and a quantized
/// lm_head, the config is untied and `lm_head.weight` holds the dequantized embedding while the
/// embedding lookup keeps the float weights — exactly what the graph computes.
pub fn dequantized_checkpoint(
    cfg: &LlamaConfig,
    weights: &Weights,
    q: &QuantOptions,
) -> Result<(LlamaConfig, Weights)> {
    let mut cfg = cfg.clone();
    let mut map: BTreeMap<String, Tensor> = weights.tensors().clone();
    let names = quantized_weights(&cfg, q);
    let tied_head = q.lm_head && cfg.tie_word_embeddings;
    for name in &names {
        let bq = quantize_weight(weights, name, q)?;
        let t = Tensor::from_vec(bq.dequantize(), (bq.rows, bq.cols), &Device::Cpu)
            .and_then(|t| t.to_dtype(DType::F32))
            .map_err(|e| Error::Tensor {
                name: name.clone(),
                message: e.to_string(),
            })?;
        if tied_head && name == "model.embed_tokens.weight" {
            map.insert("lm_head.weight".into(), t);
        } else {
            map.insert(name.clone(), t);
        }
    }
    if tied_head {
        cfg.tie_word_embeddings = false;
    }
    Ok((cfg, Weights::from_map(map)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ramp(n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 7919 % 101) as f32 - 50.0) / 17.0)
            .collect()
    }

    #[test]
    fn int4_codes_stay_in_range_and_the_extreme_is_exact() -> Result<()> {
        let w = ramp(4 * 64);
        let q = quantize("w", &w, 4, 64, QuantBits::Int4, 32)?;
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
        let q = quantize("w", &w, 3, 32, QuantBits::Int8, 16)?;
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
        let q = quantize("w", &w, 2, 32, QuantBits::Int4, 16)?;
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
        let q = quantize("w", &[0.0; 32], 1, 32, QuantBits::Int4, 32)?;
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
}
