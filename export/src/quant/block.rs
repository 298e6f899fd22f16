//! The block format of a quantized weight: codes, per-block scales and zero points or float
//! offsets ([`BlockQuantized`]), the parameters of one block ([`BlockParams`], shared by
//! round-to-nearest and GPTQ) and the packings each ONNX form stores.

use super::{QuantBits, ZeroPoints};
use crate::error::{Error, Result};

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
    /// Signed zero points, one per block like `scales` (`None`: symmetric, all 0).
    pub zero_points: Option<Vec<i8>>,
    /// Float offsets, one per block like `scales`, added to every dequantized value of the block
    /// (`None`: all 0): the block minimum of [`ZeroPoints::Float`].
    pub offsets: Option<Vec<f32>>,
}

/// Checks that `block_size` divides the input dimension `cols` ([`Error::BlockSize`]) and that
/// `w` holds `rows × cols` weights ([`Error::Tensor`]).
pub(crate) fn check_layout(
    layer: &str,
    w: &[f32],
    rows: usize,
    cols: usize,
    block_size: usize,
) -> Result<()> {
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
            message: format!("expected {rows}×{cols} weights, got {}", w.len()),
        });
    }
    Ok(())
}

/// Quantizes the row-major `[rows, cols]` weight `w` of layer `layer` (see the module doc for
/// the formulas; `zero_points` picks the form of the blocks). `cols` must be a multiple of
/// `block_size`, else [`Error::BlockSize`].
pub fn quantize(
    layer: &str,
    w: &[f32],
    rows: usize,
    cols: usize,
    bits: QuantBits,
    block_size: usize,
    zero_points: ZeroPoints,
) -> Result<BlockQuantized> {
    check_layout(layer, w, rows, cols, block_size)?;
    let mut codes = Vec::with_capacity(w.len());
    let params: Vec<BlockParams> = w
        .chunks_exact(block_size)
        .map(|block| {
            let p = BlockParams::of(block, bits, zero_points);
            codes.extend(block.iter().map(|&x| p.code(x)));
            p
        })
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

/// The scale, zero point and offset of one block (module doc), and the code of a value under them —
/// shared by round-to-nearest ([`quantize`]) and GPTQ ([`gptq`]), so both store exactly the same
/// format.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct BlockParams {
    /// f16-exact scale (0 for an all-zero block).
    pub scale: f32,
    /// Signed zero point as a float code (0 unless [`ZeroPoints::Int`]).
    pub zero: f32,
    /// Float offset added to every value (0 unless [`ZeroPoints::Float`]).
    pub offset: f32,
    q_min: f32,
    q_max: f32,
}

impl BlockParams {
    /// The parameters of `block` in the form `zero_points` picks.
    pub fn of(block: &[f32], bits: QuantBits, zero_points: ZeroPoints) -> Self {
        let (q_min, q_max) = (bits.q_min() as f32, bits.q_max() as f32);
        let (mut zero, mut offset) = (0.0, 0.0);
        let scale = match zero_points {
            ZeroPoints::Int => {
                let lo = block.iter().copied().fold(0f32, f32::min);
                let hi = block.iter().copied().fold(0f32, f32::max);
                let scale = half::f16::from_f32((hi - lo) / (q_max - q_min)).to_f32();
                if scale != 0.0 && scale.is_finite() {
                    zero = (-lo / scale).round().clamp(0.0, q_max - q_min) + q_min;
                }
                scale
            }
            ZeroPoints::Float => {
                let lo = block.iter().copied().fold(f32::INFINITY, f32::min);
                let hi = block.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let lo = if lo.is_finite() { lo } else { 0.0 };
                let scale = half::f16::from_f32((hi - lo) / (q_max - q_min)).to_f32();
                // q_min stands for lo exactly: ŵ = q·scale + (lo - q_min·scale).
                offset = if scale.is_finite() {
                    lo - q_min * scale
                } else {
                    lo
                };
                scale
            }
            ZeroPoints::None => {
                let m = block
                    .iter()
                    .copied()
                    .fold(0f32, |a, x| if x.abs() > a.abs() { x } else { a });
                half::f16::from_f32(m / q_min).to_f32()
            }
        };
        BlockParams {
            scale,
            zero,
            offset,
            q_min,
            q_max,
        }
    }

    /// The code of `x`: `clamp(round((x - offset) / scale) + z)`.
    pub fn code(&self, x: f32) -> i8 {
        let q = if self.scale == 0.0 || !self.scale.is_finite() {
            self.zero
        } else {
            (((x - self.offset) / self.scale).round() + self.zero).clamp(self.q_min, self.q_max)
        };
        q as i8
    }

    /// The value code `q` stands for: `(q - z) · scale + offset`.
    pub fn value(&self, q: i8) -> f32 {
        (q as f32 - self.zero) * self.scale + self.offset
    }
}

impl BlockQuantized {
    /// The matrix of `codes` under the per-block `params` (row-major over `[rows, blocks]`),
    /// keeping the zero points or offsets that `zero_points` stores.
    pub(crate) fn from_params(
        rows: usize,
        cols: usize,
        block_size: usize,
        bits: QuantBits,
        codes: Vec<i8>,
        params: &[BlockParams],
        zero_points: ZeroPoints,
    ) -> Self {
        BlockQuantized {
            rows,
            cols,
            block_size,
            bits,
            codes,
            scales: params.iter().map(|p| p.scale).collect(),
            zero_points: (zero_points == ZeroPoints::Int)
                .then(|| params.iter().map(|p| p.zero as i8).collect()),
            offsets: (zero_points == ZeroPoints::Float)
                .then(|| params.iter().map(|p| p.offset).collect()),
        }
    }

    /// Blocks per row (`cols / block_size`).
    pub fn blocks_per_row(&self) -> usize {
        self.cols / self.block_size
    }

    /// The zero point of block `i` (row-major over `[rows, blocks]`; 0 when symmetric).
    fn zero_point(&self, i: usize) -> i8 {
        self.zero_points.as_ref().map(|z| z[i]).unwrap_or(0)
    }

    /// The float offset of block `i` (0 unless [`ZeroPoints::Float`]).
    fn offset(&self, i: usize) -> f32 {
        self.offsets.as_ref().map(|o| o[i]).unwrap_or(0.0)
    }

    /// The dequantized weight `ŵ = (q - z) · scale + offset`, row-major `[rows, cols]`.
    pub fn dequantize(&self) -> Vec<f32> {
        self.codes
            .chunks_exact(self.block_size)
            .zip(&self.scales)
            .enumerate()
            .flat_map(|(i, (b, &s))| {
                let z = self.zero_point(i) as f32;
                let o = self.offset(i);
                b.iter().map(move |&q| (q as f32 - z) * s + o)
            })
            .collect()
    }

    /// The offsets transposed to `[blocks, rows]` (`None` unless [`ZeroPoints::Float`]): the
    /// right-hand side of the block-sum correction `S(x) · O`, where `S(x)` sums each block of
    /// the input.
    pub fn transposed_offsets(&self) -> Option<Vec<f32>> {
        let o = self.offsets.as_ref()?;
        let nb = self.blocks_per_row();
        Some(
            (0..nb)
                .flat_map(|b| (0..self.rows).map(move |n| o[n * nb + b]))
                .collect(),
        )
    }

    /// `MatMulNBits` input `zero_points` (present only with zero points): uint8, unsigned
    /// `z + 2^(bits-1)`; for 4 bits two per byte (first in the low nibble), each row's blocks
    /// packed on their own (`[rows, ⌈blocks/2⌉]`), for 8 bits `[rows, blocks]`.
    pub fn matmul_nbits_zero_points(&self) -> Option<Vec<u8>> {
        let z = self.zero_points.as_ref()?;
        let offset = 1i32 << (self.bits.bits() - 1);
        let nb = self.blocks_per_row();
        let unsigned = |v: i8| (v as i32 + offset) as u8;
        Some(match self.bits {
            QuantBits::Int8 => z.iter().map(|&v| unsigned(v)).collect(),
            QuantBits::Int4 => z
                .chunks_exact(nb)
                .flat_map(|row| {
                    row.chunks(2).map(|p| {
                        (unsigned(p[0]) & 0x0F) | (p.get(1).map(|&v| unsigned(v)).unwrap_or(0) << 4)
                    })
                })
                .collect(),
        })
    }

    /// The zero points transposed to `[blocks, rows]` as the raw data of an ONNX `INT4` (packed
    /// pairwise over the flat tensor) or `INT8` tensor: `DequantizeLinear`'s zero point beside
    /// [`Self::transposed_scales`]. `None` when symmetric.
    pub fn transposed_zero_points(&self) -> Option<Vec<u8>> {
        let z = self.zero_points.as_ref()?;
        let nb = self.blocks_per_row();
        let t = (0..nb).flat_map(|b| (0..self.rows).map(move |n| z[n * nb + b]));
        Some(match self.bits {
            QuantBits::Int8 => t.map(|v| v as u8).collect(),
            QuantBits::Int4 => {
                let v: Vec<u8> = t.map(|q| (q as u8) & 0x0F).collect();
                v.chunks(2)
                    .map(|p| p[0] | (p.get(1).copied().unwrap_or(0) << 4))
                    .collect()
            }
        })
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
