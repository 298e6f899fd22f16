//! Block-wise round-to-nearest weight quantization (`steper-export --quantize`), symmetric,
//! with per-block integer zero points (`--zero-points`) or with per-block float minimums
//! (`--zero-points float`).
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
//!
//! With zero points (asymmetric, as llama.cpp's Q4_1 and ONNX Runtime's own 4-bit quantizer),
//! a block's range `[lo, hi]` (widened to hold 0, so that 0 stays exact) maps onto all `2^bits`
//! codes, which spends no code on the side of 0 a block does not use:
//!
//! ```text
//! scale = f16_round((hi - lo) / (2^bits - 1))
//! z     = clamp(round(-lo / scale), 0, 2^bits - 1) - 2^(bits-1)      (signed zero point)
//! q     = clamp(round(w / scale) + z, q_min, 2^(bits-1) - 1)
//! ŵ     = (q - z) · scale
//! ```
//!
//! Codes and zero points are kept signed here; `MatMulNBits` stores both as unsigned (`+
//! 2^(bits-1)`), ONNX `DequantizeLinear` as signed INT4/INT8, and the two give the same ŵ.
//!
//! With float zero points (llama.cpp's Q4_1: a scale and a float minimum per block), the
//! block's own range `[lo, hi]` (not widened) maps onto the codes and `q_min` stands for `lo`
//! exactly:
//!
//! ```text
//! scale  = f16_round((hi - lo) / (2^bits - 1))
//! offset = lo - q_min · scale
//! q      = clamp(round((w - offset) / scale), q_min, 2^(bits-1) - 1)
//! ŵ      = q · scale + offset
//! ```
//!
//! A weight that is already on such a grid (a layer imported from a Q4_1 GGUF and left frozen
//! by training) comes back exactly, which an integer zero point cannot do: the minimum of a Q4_1
//! block is rarely a whole number of steps from 0. `MatMulNBits` takes float zero points only
//! on its slow unpacked path, so the `ort-cpu` form keeps the codes symmetric and adds the
//! offsets as a block-sum correction, `y = MatMulNBits(x) + S(x) · O`, with `S(x)` the sums of
//! each block of the input (`[.., K / block_size]`, a `Reshape` and a `ReduceSum`) and `O` the
//! offsets transposed (`[K / block_size, N]`, float).

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

/// How a block's codes are placed (`steper-export --zero-points`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ZeroPoints {
    /// Symmetric blocks: codes span ±max, zero point 0.
    #[default]
    None,
    /// An integer zero point per block (MatMulNBits `zero_points`, DequantizeLinear
    /// `x_zero_point`): codes span the block's [min, max] widened to hold 0.
    Int,
    /// A float minimum per block (llama.cpp's Q4_1 form): codes span the block's own [min, max];
    /// `ort-cpu` only.
    Float,
}

impl ZeroPoints {
    /// `none` / `int` / `float`.
    pub fn as_str(self) -> &'static str {
        match self {
            ZeroPoints::None => "none",
            ZeroPoints::Int => "int",
            ZeroPoints::Float => "float",
        }
    }
}

impl std::str::FromStr for ZeroPoints {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "none" => Ok(ZeroPoints::None),
            "int" => Ok(ZeroPoints::Int),
            "float" => Ok(ZeroPoints::Float),
            _ => Err(Error::Option {
                option: "--zero-points",
                expected: "none, int or float".into(),
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
    /// Symmetric blocks, integer zero points or float minimums.
    pub zero_points: ZeroPoints,
    /// With int4 and float zero points: a layer (or the vocabulary projection) that int4 cannot
    /// reproduce exactly — one training moved off its GGUF's Q4_1 grid — is quantized to int8
    /// instead ([`off_grid`]).
    pub off_grid_int8: bool,
}

impl QuantOptions {
    /// int4, block 32, `ort-cpu`, lm_head quantized (the defaults of `steper-export --quantize`).
    pub fn int4() -> Self {
        QuantOptions {
            bits: QuantBits::Int4,
            block_size: 32,
            target: QuantTarget::OrtCpu,
            lm_head: true,
            zero_points: ZeroPoints::None,
            off_grid_int8: false,
        }
    }

    /// Checks the combination before any weight is read: `MatMulNBits` needs a power-of-two
    /// block of at least 16 and a bit width in [`ORT_CPU_BITS`].
    pub fn check(&self) -> Result<()> {
        if self.off_grid_int8
            && (self.bits != QuantBits::Int4 || self.zero_points != ZeroPoints::Float)
        {
            return Err(Error::Option {
                option: "--off-grid-int8",
                expected: "--quantize int4 --zero-points float beside it (only float zero points \
                           reproduce a layer that is still on its Q4_1 grid)"
                    .into(),
                got: format!(
                    "--quantize {} --zero-points {}",
                    self.bits.as_str(),
                    self.zero_points.as_str()
                ),
            });
        }
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
                if self.zero_points == ZeroPoints::Float {
                    return Err(Error::Option {
                        option: "--zero-points",
                        expected: "none or int with --target portable (DequantizeLinear takes \
                                   integer zero points; float ones need --target ort-cpu)"
                            .into(),
                        got: "float".into(),
                    });
                }
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
            zero_points: match (r.zero_points, r.float_zero_points) {
                (_, true) => ZeroPoints::Float,
                (true, false) => ZeroPoints::Int,
                (false, false) => ZeroPoints::None,
            },
            off_grid_int8: r.off_grid_int8,
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
            zero_points: self.zero_points != ZeroPoints::None,
            float_zero_points: self.zero_points == ZeroPoints::Float,
            off_grid_int8: self.off_grid_int8,
            layers,
            method: None,
            damp: None,
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

mod block;
pub(crate) use block::{check_layout, BlockParams};
pub use block::{quantize, BlockQuantized};

/// Reads and quantizes the weight `name` (`[out, in]`) of `w` (round-to-nearest), or returns
/// the codes `w` already holds for it ([`WeightSource::prequantized`]).
pub fn quantize_weight(
    w: &dyn WeightSource,
    name: &str,
    q: &QuantOptions,
) -> Result<BlockQuantized> {
    if let Some(bq) = w.prequantized(name) {
        return Ok(bq);
    }
    quantize_weight_with(w, name, q, &Quantizer::RoundToNearest)
}

/// How the weights are quantized.
#[derive(Debug, Clone, Copy)]
pub enum Quantizer<'a> {
    /// Every weight on its own ([`quantize`]).
    RoundToNearest,
    /// GPTQ ([`gptq::quantize_gptq`]) with the calibration Hessians of the weights' inputs.
    Gptq {
        /// The Hessians (one per quantized weight).
        hessians: &'a hessians::Hessians,
        /// Damping and batch.
        opts: gptq::GptqOptions,
    },
}

impl Quantizer<'_> {
    /// `rtn` or `gptq` (the manifest's `quantization.method`).
    pub fn method(&self) -> &'static str {
        match self {
            Quantizer::RoundToNearest => "rtn",
            Quantizer::Gptq { .. } => "gptq",
        }
    }
}

/// Reads the weight `name` (`[out, in]`) of `w` and quantizes it with `quantizer`.
pub fn quantize_weight_with(
    w: &dyn WeightSource,
    name: &str,
    q: &QuantOptions,
    quantizer: &Quantizer<'_>,
) -> Result<BlockQuantized> {
    let bits = if q.off_grid_int8 && off_grid(w, name, q)? {
        QuantBits::Int8
    } else {
        q.bits
    };
    quantize_weight_at(w, name, q, bits, quantizer)
}

/// [`quantize_weight_with`] at the width `bits`, already decided.
fn quantize_weight_at(
    w: &dyn WeightSource,
    name: &str,
    q: &QuantOptions,
    bits: QuantBits,
    quantizer: &Quantizer<'_>,
) -> Result<BlockQuantized> {
    let (data, shape) = w.tensor(name, false)?;
    let [rows, cols] = shape[..] else {
        return Err(Error::Tensor {
            name: name.into(),
            message: format!("expected a 2-D weight, got shape {shape:?}"),
        });
    };
    match quantizer {
        Quantizer::RoundToNearest => {
            quantize(name, &data, rows, cols, bits, q.block_size, q.zero_points)
        }
        Quantizer::Gptq { hessians, opts } => {
            let (k, h) = hessians.get(name).ok_or_else(|| Error::Tensor {
                name: name.into(),
                message: "no calibration Hessian for this weight".into(),
            })?;
            if k != cols {
                return Err(Error::Tensor {
                    name: name.into(),
                    message: format!(
                        "the calibration Hessian is {k}×{k}, the weight has {cols} inputs"
                    ),
                });
            }
            gptq::quantize_gptq(
                name,
                &data,
                rows,
                cols,
                h,
                bits,
                q.block_size,
                q.zero_points,
                opts,
            )
        }
    }
}

/// Relative error (to the matrix's largest magnitude) under which int4 counts as reproducing a
/// weight exactly: f32 rounding of `q · scale + offset`.
pub const ON_GRID_TOLERANCE: f32 = 1e-5;

/// Whether the weight `name` belongs to a unit that int4 blocks of `q`'s form cannot reproduce
/// within [`ON_GRID_TOLERANCE`]: for a layer's projections, any of the layer's seven weights
/// (they share fused kernels, so a layer is int4 or int8 as a whole); otherwise the weight
/// itself. A layer imported from a Q4_1 GGUF and left frozen by training is on the grid; one
/// that training moved is not, and its update is smaller than an int4 step (2 % of the weights'
/// norm against ~7 % per element for SmolLM2's top 2 layers), so int4 would erase it.
pub fn off_grid(w: &dyn WeightSource, name: &str, q: &QuantOptions) -> Result<bool> {
    let names: Vec<String> = match layer_of(name) {
        Some(l) => steper_models::arch::Projection::ALL
            .iter()
            .map(|p| p.weight_name(l))
            .collect(),
        None => vec![name.to_string()],
    };
    for n in &names {
        let (data, shape) = w.tensor(n, false)?;
        let [rows, cols] = shape[..] else {
            return Err(Error::Tensor {
                name: n.clone(),
                message: format!("expected a 2-D weight, got shape {shape:?}"),
            });
        };
        let bq = quantize(
            n,
            &data,
            rows,
            cols,
            QuantBits::Int4,
            q.block_size,
            q.zero_points,
        )?;
        let amax = data.iter().fold(0f32, |a, x| a.max(x.abs()));
        let tol = ON_GRID_TOLERANCE * amax;
        if data
            .iter()
            .zip(bq.dequantize())
            .any(|(a, b)| (a - b).abs() > tol)
        {
            return Ok(true);
        }
    }
    Ok(false)
}

/// The decoder layer a weight belongs to (`model.layers.L.…`), if any.
fn layer_of(name: &str) -> Option<usize> {
    name.strip_prefix("model.layers.")
        .and_then(|r| r.split('.').next())
        .and_then(|l| l.parse::<usize>().ok())
}

/// Every weight `q` quantizes ([`quantized_weights`]), quantized once with `quantizer`. With
/// `--off-grid-int8` each layer's width is decided once ([`off_grid`]) for its seven weights.
pub fn quantize_all(
    cfg: &LlamaConfig,
    w: &dyn WeightSource,
    q: &QuantOptions,
    quantizer: &Quantizer<'_>,
) -> Result<BTreeMap<String, BlockQuantized>> {
    let mut layer_off_grid: BTreeMap<usize, bool> = BTreeMap::new();
    quantized_weights(cfg, q)
        .into_iter()
        .map(|name| {
            let off = match (q.off_grid_int8, layer_of(&name)) {
                (false, _) => false,
                (true, Some(l)) => match layer_off_grid.get(&l) {
                    Some(&off) => off,
                    None => {
                        let off = off_grid(w, &name, q)?;
                        layer_off_grid.insert(l, off);
                        off
                    }
                },
                (true, None) => off_grid(w, &name, q)?,
            };
            let bits = if off { QuantBits::Int8 } else { q.bits };
            let bq = quantize_weight_at(w, &name, q, bits, quantizer)?;
            Ok((name, bq))
        })
        .collect()
}

/// Weights whose quantized codes are already computed (by [`quantize_all`]): the graph builder
/// and [`dequantized_checkpoint_from`] read the very same codes from it.
pub struct PreQuantized<'a> {
    /// The float weights.
    pub weights: &'a dyn WeightSource,
    /// The quantized ones, by HF name.
    pub quantized: &'a BTreeMap<String, BlockQuantized>,
}

impl WeightSource for PreQuantized<'_> {
    fn tensor(&self, name: &str, transpose: bool) -> Result<(Vec<f32>, Vec<usize>)> {
        self.weights.tensor(name, transpose)
    }

    fn prequantized(&self, name: &str) -> Option<BlockQuantized> {
        self.quantized.get(name).cloned()
    }
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
    dequantized_checkpoint_with(cfg, weights, q, &Quantizer::RoundToNearest)
}

/// [`dequantized_checkpoint`] of weights quantized by `quantizer`.
pub fn dequantized_checkpoint_with(
    cfg: &LlamaConfig,
    weights: &Weights,
    q: &QuantOptions,
    quantizer: &Quantizer<'_>,
) -> Result<(LlamaConfig, Weights)> {
    let quantized = quantize_all(cfg, weights, q, quantizer)?;
    dequantized_checkpoint_from(cfg, weights, q, &quantized)
}

/// [`dequantized_checkpoint`] of the codes `quantized` ([`quantize_all`]'s result; every weight
/// `q` quantizes must be there).
pub fn dequantized_checkpoint_from(
    cfg: &LlamaConfig,
    weights: &Weights,
    q: &QuantOptions,
    quantized: &BTreeMap<String, BlockQuantized>,
) -> Result<(LlamaConfig, Weights)> {
    let mut cfg = cfg.clone();
    let mut map: BTreeMap<String, Tensor> = weights.tensors().clone();
    let names = quantized_weights(&cfg, q);
    let tied_head = q.lm_head && cfg.tie_word_embeddings;
    for name in &names {
        let bq = quantized.get(name).ok_or_else(|| Error::Tensor {
            name: name.clone(),
            message: "not among the quantized weights".into(),
        })?;
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

pub mod gptq;
pub mod hessians;

#[cfg(test)]
mod tests;
