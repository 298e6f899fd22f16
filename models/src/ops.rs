//! Fused CPU kernels with their own backward for the three element-wise chains of the decoder:
//! RMSNorm, the last-dimension softmax of attention, and RoPE (HF half-rotation layout).
//!
//! Each is a candle custom op whose forward is one pass over the data (parallel over rows) and
//! whose backward is written out (`bwd`), so a training forward records one node per op instead
//! of the 6–10 nodes of the composed form (and the composed form's temporaries). candle-nn's own
//! fused ops (`ops::rms_norm`, `softmax_last_dim`, `rotary_emb::rope`) have no backward, which is
//! why these exist. The kernels are CPU-only and f32-only: on another device (CUDA) or in another
//! dtype, every public function here takes the composed form made of candle's own ops, whose
//! autograd gives the backward; the choice is made per call from the tensor's device and dtype.
//! [`Kernels::Composed`] (the `*_with` functions) forces the composed form on the CPU too, which
//! is how the tests compare the two paths' forwards and gradients.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor, D};
use rayon::prelude::*;

/// Rows of `src` (contiguous, last dim `n`) as a slice.
pub(crate) fn contiguous<'a, T>(
    src: &'a [T],
    l: &Layout,
    what: &str,
) -> candle_core::Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&src[a..b]),
        None => candle_core::bail!("{what}: input must be contiguous"),
    }
}

pub(crate) fn f32s<'a>(s: &'a CpuStorage, what: &str) -> candle_core::Result<&'a [f32]> {
    match s {
        CpuStorage::F32(v) => Ok(v),
        other => candle_core::bail!("{what}: f32 only, got {:?}", other.dtype()),
    }
}

/// `x / sqrt(mean(x²) + eps) · w` over the last dimension.
struct RmsNorm {
    eps: f32,
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "steper-rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous(f32s(s1, self.name())?, l1, self.name())?;
        let w = contiguous(f32s(s2, self.name())?, l2, self.name())?;
        let n = w.len();
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(n)
            .zip(x.par_chunks(n))
            .for_each(|(o, x)| {
                let ms = x.iter().map(|v| v * v).sum::<f32>() / n as f32;
                let r = 1.0 / (ms + self.eps).sqrt();
                for ((o, x), w) in o.iter_mut().zip(x).zip(w) {
                    *o = x * r * w;
                }
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        // y = x·r·w with r = (mean(x²) + eps)^-½:
        // dx = r·(g·w − x̂·mean(g·w·x̂)), x̂ = x·r;  dw = Σ_rows g·x̂.
        let x = x.contiguous()?;
        let g = g.contiguous()?;
        let n = w.dim(0)?;
        let (dx, dw) = rms_norm_bwd(&x, w, &g, self.eps, n)?;
        Ok((Some(dx), Some(dw)))
    }
}

fn rms_norm_bwd(
    x: &Tensor,
    w: &Tensor,
    g: &Tensor,
    eps: f32,
    n: usize,
) -> candle_core::Result<(Tensor, Tensor)> {
    let shape = x.shape().clone();
    let xs: Vec<f32> = x.flatten_all()?.to_vec1()?;
    let gs: Vec<f32> = g.flatten_all()?.to_vec1()?;
    let ws: Vec<f32> = w.to_vec1()?;
    let mut dx = vec![0f32; xs.len()];
    // Per-row partial dw, summed after (a deterministic order regardless of the thread count).
    const ROWS_PER_TASK: usize = 64;
    let partial: Vec<Vec<f32>> = dx
        .par_chunks_mut(n * ROWS_PER_TASK)
        .zip(xs.par_chunks(n * ROWS_PER_TASK))
        .zip(gs.par_chunks(n * ROWS_PER_TASK))
        .map(|((dx, x), g)| {
            let mut dw = vec![0f32; n];
            for ((dx, x), g) in dx.chunks_mut(n).zip(x.chunks(n)).zip(g.chunks(n)) {
                let ms = x.iter().map(|v| v * v).sum::<f32>() / n as f32;
                let r = 1.0 / (ms + eps).sqrt();
                let mut dot = 0f32;
                for i in 0..n {
                    dot += g[i] * ws[i] * x[i] * r;
                }
                let mean = dot / n as f32;
                for i in 0..n {
                    let xh = x[i] * r;
                    dx[i] = r * (g[i] * ws[i] - xh * mean);
                    dw[i] += g[i] * xh;
                }
            }
            dw
        })
        .collect();
    let mut dw = vec![0f32; n];
    for p in &partial {
        for (a, b) in dw.iter_mut().zip(p) {
            *a += b;
        }
    }
    Ok((
        Tensor::from_vec(dx, shape, x.device())?,
        Tensor::from_vec(dw, n, x.device())?,
    ))
}

/// Softmax over the last dimension.
struct Softmax;

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "steper-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous(f32s(s, self.name())?, l, self.name())?;
        let n = l.dims().last().copied().unwrap_or(1).max(1);
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(n)
            .zip(x.par_chunks(n))
            .for_each(|(o, x)| {
                let m = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let mut sum = 0f32;
                for (o, x) in o.iter_mut().zip(x) {
                    *o = (x - m).exp();
                    sum += *o;
                }
                let inv = 1.0 / sum;
                for o in o.iter_mut() {
                    *o *= inv;
                }
            });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        // dx = y·(g − Σ g·y)
        let y = y.contiguous()?;
        let g = g.contiguous()?;
        Ok(Some(g.apply_op2_no_bwd(&y, &SoftmaxBwd)?))
    }
}

/// `softmax(scale · x + mask)` over the last dimension for attention scores `x` `[b, h, s, t]`
/// and an additive mask `[b, 1, s, t]` (shared by the heads): one pass instead of a scale, a
/// broadcast add and a softmax.
struct MaskedSoftmax {
    scale: f32,
}

impl CustomOp2 for MaskedSoftmax {
    fn name(&self) -> &'static str {
        "steper-masked-softmax"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous(f32s(s1, self.name())?, l1, self.name())?;
        let m = contiguous(f32s(s2, self.name())?, l2, self.name())?;
        let (b, h, s, t) = l1.shape().dims4()?;
        if l2.dims() != [b, 1, s, t] {
            candle_core::bail!(
                "{}: mask must be [{b}, 1, {s}, {t}], got {:?}",
                self.name(),
                l2.dims()
            );
        }
        let scale = self.scale;
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(t)
            .zip(x.par_chunks(t))
            .enumerate()
            .for_each(|(row, (o, x))| {
                let (bi, i) = (row / (h * s), row % s);
                let m = &m[(bi * s + i) * t..(bi * s + i + 1) * t];
                let mut mx = f32::NEG_INFINITY;
                for ((o, x), m) in o.iter_mut().zip(x).zip(m) {
                    *o = x * scale + m;
                    mx = mx.max(*o);
                }
                let mut sum = 0f32;
                for o in o.iter_mut() {
                    *o = (*o - mx).exp();
                    sum += *o;
                }
                let inv = 1.0 / sum;
                for o in o.iter_mut() {
                    *o *= inv;
                }
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _mask: &Tensor,
        y: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let y = y.contiguous()?;
        let g = g.contiguous()?;
        let dx = (g.apply_op2_no_bwd(&y, &SoftmaxBwd)? * self.scale as f64)?;
        Ok((Some(dx), None))
    }
}

/// `(g, y) ↦ y·(g − Σ_last g·y)`.
struct SoftmaxBwd;

impl CustomOp2 for SoftmaxBwd {
    fn name(&self) -> &'static str {
        "steper-softmax-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = contiguous(f32s(s1, self.name())?, l1, self.name())?;
        let y = contiguous(f32s(s2, self.name())?, l2, self.name())?;
        let n = l1.dims().last().copied().unwrap_or(1).max(1);
        let mut out = vec![0f32; g.len()];
        out.par_chunks_mut(n)
            .zip(g.par_chunks(n).zip(y.par_chunks(n)))
            .for_each(|(o, (g, y))| {
                let dot: f32 = g.iter().zip(y).map(|(a, b)| a * b).sum();
                for ((o, g), y) in o.iter_mut().zip(g).zip(y) {
                    *o = y * (g - dot);
                }
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// RoPE on `x` `[b, h, t, d]` with `cos` / `sin` `[b, t, d/2]`: rotates the pairs
/// `(x[i], x[i + d/2])` by the position's angle; `sign = -1` rotates backwards (the backward
/// of the forward rotation).
struct Rope {
    sign: f32,
}

impl CustomOp3 for Rope {
    fn name(&self) -> &'static str {
        "steper-rope"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous(f32s(s1, self.name())?, l1, self.name())?;
        let cos = contiguous(f32s(s2, self.name())?, l2, self.name())?;
        let sin = contiguous(f32s(s3, self.name())?, l3, self.name())?;
        let (b, h, t, d) = l1.shape().dims4()?;
        let half = d / 2;
        if l2.dims() != [b, t, half] || l3.dims() != [b, t, half] {
            candle_core::bail!(
                "{}: cos/sin must be [{b}, {t}, {half}], got {:?} / {:?}",
                self.name(),
                l2.dims(),
                l3.dims()
            );
        }
        let sign = self.sign;
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(t * d)
            .zip(x.par_chunks(t * d))
            .enumerate()
            .for_each(|(bh, (o, x))| {
                let bi = bh / h;
                for p in 0..t {
                    let cs = &cos[(bi * t + p) * half..(bi * t + p + 1) * half];
                    let sn = &sin[(bi * t + p) * half..(bi * t + p + 1) * half];
                    let (o1, o2) = o[p * d..(p + 1) * d].split_at_mut(half);
                    let (x1, x2) = x[p * d..(p + 1) * d].split_at(half);
                    for i in 0..half {
                        let (c, s) = (cs[i], sign * sn[i]);
                        o1[i] = x1[i] * c - x2[i] * s;
                        o2[i] = x2[i] * c + x1[i] * s;
                    }
                }
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // The rotation is orthogonal: its transpose rotates by the opposite angle.
        let dx = g
            .contiguous()?
            .apply_op3_no_bwd(cos, sin, &Rope { sign: -self.sign })?;
        Ok((Some(dx), None, None))
    }
}

/// `silu(g) · u`, SwiGLU's gate (`silu(g) = g · σ(g)`), in one pass.
struct SwiGlu;

/// `σ(x)` from `e^{−|x|}` (never overflows; vectorises).
#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    let e = crate::attention::exp_nonpositive(-x.abs());
    let r = 1.0 / (1.0 + e);
    if x >= 0.0 {
        r
    } else {
        e * r
    }
}

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "steper-swiglu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = contiguous(f32s(s1, self.name())?, l1, self.name())?;
        let u = contiguous(f32s(s2, self.name())?, l2, self.name())?;
        if l1.dims() != l2.dims() {
            candle_core::bail!(
                "{}: gate {:?} and up {:?} differ in shape",
                self.name(),
                l1.dims(),
                l2.dims()
            );
        }
        let mut out = vec![0f32; g.len()];
        out.par_chunks_mut(ELEMWISE_CHUNK)
            .zip(
                g.par_chunks(ELEMWISE_CHUNK)
                    .zip(u.par_chunks(ELEMWISE_CHUNK)),
            )
            .for_each(|(o, (g, u))| {
                for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
                    *o = g * sigmoid(g) * u;
                }
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        g: &Tensor,
        u: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        // y = g·σ(g)·u: dy/du = silu(g); dy/dg = u·σ(g)·(1 + g·(1 − σ(g))).
        let both = g.apply_op3_no_bwd(u, &grad.contiguous()?, &SwiGluBwd)?;
        Ok((Some(both.get(0)?), Some(both.get(1)?)))
    }
}

/// Elements per parallel task of the element-wise kernels.
const ELEMWISE_CHUNK: usize = 1 << 14;

/// Both gradients of [`SwiGlu`] in one pass, stacked `[2, ..]` (gate first).
struct SwiGluBwd;

impl CustomOp3 for SwiGluBwd {
    fn name(&self) -> &'static str {
        "steper-swiglu-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = contiguous(f32s(s1, self.name())?, l1, self.name())?;
        let u = contiguous(f32s(s2, self.name())?, l2, self.name())?;
        let dy = contiguous(f32s(s3, self.name())?, l3, self.name())?;
        let n = g.len();
        let mut out = vec![0f32; 2 * n];
        let (dg, du) = out.split_at_mut(n);
        dg.par_chunks_mut(ELEMWISE_CHUNK)
            .zip(du.par_chunks_mut(ELEMWISE_CHUNK))
            .zip(g.par_chunks(ELEMWISE_CHUNK))
            .zip(
                u.par_chunks(ELEMWISE_CHUNK)
                    .zip(dy.par_chunks(ELEMWISE_CHUNK)),
            )
            .for_each(|(((dg, du), g), (u, dy))| {
                for i in 0..g.len() {
                    let s = sigmoid(g[i]);
                    du[i] = dy[i] * g[i] * s;
                    dg[i] = dy[i] * u[i] * s * (1.0 + g[i] * (1.0 - s));
                }
            });
        let mut dims = vec![2];
        dims.extend_from_slice(l1.dims());
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }
}

/// `x @ wᵀ` for `x` `[rows, in]` and a constant `w` `[out, in]`: the backward gives `x` its
/// gradient and `w` none. (candle's matmul backward always computes the right-hand side's
/// gradient, a full `[out, in]` GEMM plus a zero-filled accumulator, even for a weight nothing
/// trains: the frozen projections under LoRA and the frozen tied `lm_head`.)
struct FrozenLinear;

impl CustomOp2 for FrozenLinear {
    fn name(&self) -> &'static str {
        "steper-frozen-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (rows, inner) = l1.shape().dims2()?;
        let (out, w_inner) = l2.shape().dims2()?;
        if inner != w_inner {
            candle_core::bail!(
                "{}: input [{rows}, {inner}] does not match weight [{out}, {w_inner}]",
                self.name()
            );
        }
        let y = s1.matmul(s2, (1, rows, out, inner), l1, &l2.transpose(0, 1)?)?;
        Ok((y, Shape::from((rows, out))))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(g.matmul(w)?), None))
    }
}

/// Which implementation of the decoder's element-wise chains (and of attention, see
/// [`crate::model::Llama::with_kernels`]) runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Kernels {
    /// The fused kernels where the tensor is f32 on the CPU, else the composed form: chosen by
    /// each tensor's device and dtype (a CUDA tensor, or a half type, takes the composed form).
    #[default]
    Auto,
    /// Always the composed form, candle's own differentiable ops (what a GPU runs), also on the
    /// CPU: for comparing the two paths.
    Composed,
}

impl Kernels {
    /// Whether `x` takes the fused CPU kernel.
    fn fused(self, x: &Tensor) -> bool {
        self == Kernels::Auto && x.device().is_cpu() && x.dtype() == DType::F32
    }
}

/// `silu(g) · u` (SwiGLU), differentiable in both; one fused pass on the CPU in f32.
pub fn swiglu(g: &Tensor, u: &Tensor) -> candle_core::Result<Tensor> {
    swiglu_with(g, u, Kernels::Auto)
}

/// [`swiglu`] with the implementation chosen by `k`.
pub fn swiglu_with(g: &Tensor, u: &Tensor, k: Kernels) -> candle_core::Result<Tensor> {
    if k.fused(g) && u.dtype() == DType::F32 {
        return g.contiguous()?.apply_op2(&u.contiguous()?, SwiGlu);
    }
    g.silu()? * u
}

/// `x @ wᵀ` for `x` `[rows, in]` and `w` `[out, in]`. When `w` is a constant (it tracks no
/// gradient) and `x` does, the backward computes `x`'s gradient only.
pub fn linear_2d(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    linear_2d_with(x, w, Kernels::Auto)
}

/// [`linear_2d`] with the implementation chosen by `k` (the composed form is candle's matmul,
/// which also computes the constant weight's unused gradient).
pub fn linear_2d_with(x: &Tensor, w: &Tensor, k: Kernels) -> candle_core::Result<Tensor> {
    if k == Kernels::Auto
        && x.track_op()
        && !w.track_op()
        && x.device().is_cpu()
        && x.dtype() == w.dtype()
    {
        return x.apply_op2(w, FrozenLinear);
    }
    x.matmul(&w.t()?)
}

/// RMSNorm over the last dimension, statistics in f32: `x / sqrt(mean(x²) + eps) · w`.
/// Differentiable in `x` and `w`.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    rms_norm_with(x, w, eps, Kernels::Auto)
}

/// [`rms_norm`] with the implementation chosen by `k`.
pub fn rms_norm_with(x: &Tensor, w: &Tensor, eps: f64, k: Kernels) -> candle_core::Result<Tensor> {
    if k.fused(x) && w.dtype() == DType::F32 {
        return x
            .contiguous()?
            .apply_op2(&w.contiguous()?, RmsNorm { eps: eps as f32 });
    }
    rms_norm_composed(x, w, eps)
}

/// The composed (reference) RMSNorm.
pub fn rms_norm_composed(x: &Tensor, w: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    let dtype = x.dtype();
    let xf = x.to_dtype(DType::F32)?;
    let var = xf.sqr()?.mean_keepdim(D::Minus1)?;
    let xn = xf.broadcast_div(&(var + eps)?.sqrt()?)?;
    xn.to_dtype(dtype)?.broadcast_mul(w)
}

/// Softmax over the last dimension (differentiable).
pub fn softmax_last_dim(x: &Tensor) -> candle_core::Result<Tensor> {
    softmax_last_dim_with(x, Kernels::Auto)
}

/// [`softmax_last_dim`] with the implementation chosen by `k` (the composed form is
/// `candle_nn::ops::softmax`).
pub fn softmax_last_dim_with(x: &Tensor, k: Kernels) -> candle_core::Result<Tensor> {
    if k.fused(x) {
        return x.contiguous()?.apply_op1(Softmax);
    }
    candle_nn::ops::softmax(x, D::Minus1)
}

/// Attention probabilities `softmax(scale · x + mask)` over the last dimension, for scores `x`
/// `[b, h, s, t]` and an optional additive mask `[b, 1, s, t]`. Differentiable in `x`.
pub fn attention_softmax(
    x: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
) -> candle_core::Result<Tensor> {
    attention_softmax_with(x, mask, scale, Kernels::Auto)
}

/// [`attention_softmax`] with the implementation chosen by `k`.
pub fn attention_softmax_with(
    x: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
    k: Kernels,
) -> candle_core::Result<Tensor> {
    match mask {
        Some(m) if k.fused(x) && m.dtype() == DType::F32 => x.contiguous()?.apply_op2(
            &m.contiguous()?,
            MaskedSoftmax {
                scale: scale as f32,
            },
        ),
        Some(m) => softmax_last_dim_with(&(x * scale)?.broadcast_add(m)?, k),
        None => softmax_last_dim_with(&(x * scale)?, k),
    }
}

/// RoPE in HF's `rotate_half` layout, `x · cos + cat(−x₂, x₁) · sin`, for `x` `[b, h, t, d]`
/// and `cos` / `sin` `[b, t, d/2]` (one angle per pair). Differentiable in `x`.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    rope_with(x, cos, sin, Kernels::Auto)
}

/// [`rope`] with the implementation chosen by `k`.
pub fn rope_with(
    x: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    k: Kernels,
) -> candle_core::Result<Tensor> {
    if k.fused(x) && cos.dtype() == DType::F32 {
        return x.contiguous()?.apply_op3(
            &cos.contiguous()?,
            &sin.contiguous()?,
            Rope { sign: 1.0 },
        );
    }
    rope_composed(x, cos, sin)
}

/// The composed (reference) RoPE.
pub fn rope_composed(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let cos = Tensor::cat(&[cos, cos], D::Minus1)?.unsqueeze(1)?;
    let sin = Tensor::cat(&[sin, sin], D::Minus1)?.unsqueeze(1)?;
    let x1 = x.narrow(D::Minus1, 0, d / 2)?;
    let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
    let rot = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    x.broadcast_mul(&cos)? + rot.broadcast_mul(&sin)?
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Forward agreement of a fused kernel with its composed form (f32, a different order of
    /// the same operations).
    pub(crate) const FWD_ATOL: f64 = 1e-5;
    /// Gradient agreement with the composed form's autograd, relative to the gradient's scale.
    pub(crate) const GRAD_RTOL: f64 = 1e-4;

    pub(crate) fn max_abs(t: &Tensor) -> f64 {
        t.abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    }

    pub(crate) fn close(name: &str, a: &Tensor, b: &Tensor, tol: f64) {
        let scale = max_abs(a).max(max_abs(b)).max(1.0);
        let d = max_abs(&(a - b).unwrap());
        assert!(
            d <= tol * scale,
            "{name}: max |Δ| {d:e} > {tol:e} × {scale}"
        );
    }

    /// A random tensor; values of both signs and several magnitudes.
    pub(crate) fn randn(shape: &[usize], seed: u64) -> candle_core::Result<Tensor> {
        let n: usize = shape.iter().product();
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let v: Vec<f32> = (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 11) as f64 / (1u64 << 53) as f64 * 4.0 - 2.0) as f32
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu)
    }

    /// A fixed random projection of `y` to a scalar, so that the upstream gradient is not
    /// uniform.
    fn project(y: &Tensor, seed: u64) -> candle_core::Result<Tensor> {
        (y * randn(y.dims(), seed)?)?.sum_all()
    }

    #[test]
    fn rms_norm_matches_the_composed_form_forward_and_backward() -> candle_core::Result<()> {
        let x = Var::from_tensor(&randn(&[3, 5, 16], 1)?)?;
        let w = Var::from_tensor(&(randn(&[16], 2)? + 1.5)?)?;
        let fast = rms_norm(x.as_tensor(), w.as_tensor(), 1e-5)?;
        let slow = rms_norm_with(x.as_tensor(), w.as_tensor(), 1e-5, Kernels::Composed)?;
        close("forward", &fast, &slow, FWD_ATOL);
        let gf = project(&fast, 3)?.backward()?;
        let gs = project(&slow, 3)?.backward()?;
        for (n, v) in [("x", &x), ("w", &w)] {
            close(
                n,
                gf.get(v.as_tensor()).expect("fused grad"),
                gs.get(v.as_tensor()).expect("composed grad"),
                GRAD_RTOL,
            );
        }
        Ok(())
    }

    #[test]
    fn softmax_matches_the_composed_form_forward_and_backward() -> candle_core::Result<()> {
        let x = Var::from_tensor(&(randn(&[2, 3, 4, 9], 4)? * 3.0)?)?;
        let fast = softmax_last_dim(x.as_tensor())?;
        let slow = softmax_last_dim_with(x.as_tensor(), Kernels::Composed)?;
        close("forward", &fast, &slow, FWD_ATOL);
        let gf = project(&fast, 5)?.backward()?;
        let gs = project(&slow, 5)?.backward()?;
        close(
            "x",
            gf.get(x.as_tensor()).expect("fused grad"),
            gs.get(x.as_tensor()).expect("composed grad"),
            GRAD_RTOL,
        );
        // A masked entry (the additive mask's −1e9) gets probability and gradient 0.
        let m = Tensor::new(&[[0f32, -1e9, 0.5]], &Device::Cpu)?;
        let p: Vec<Vec<f32>> = softmax_last_dim(&m)?.to_vec2()?;
        assert_eq!(p[0][1], 0.0);
        Ok(())
    }

    #[test]
    fn masked_softmax_matches_the_composed_form_forward_and_backward() -> candle_core::Result<()> {
        let (b, h, q, t) = (2, 3, 4, 6);
        let x = Var::from_tensor(&(randn(&[b, h, q, t], 12)? * 2.0)?)?;
        // A causal mask with the last key of row 1 padded.
        let mut m = vec![0f32; b * q * t];
        for r in 0..b {
            for i in 0..q {
                for j in 0..t {
                    if j > i + 2 || (r == 1 && j == t - 1) {
                        m[(r * q + i) * t + j] = -1e9;
                    }
                }
            }
        }
        let mask = Tensor::from_vec(m, (b, 1, q, t), &Device::Cpu)?;
        let scale = 0.35;
        let fast = attention_softmax(x.as_tensor(), Some(&mask), scale)?;
        let slow = attention_softmax_with(x.as_tensor(), Some(&mask), scale, Kernels::Composed)?;
        close("forward", &fast, &slow, FWD_ATOL);
        let gf = project(&fast, 13)?.backward()?;
        let gs = project(&slow, 13)?.backward()?;
        close(
            "x",
            gf.get(x.as_tensor()).expect("fused grad"),
            gs.get(x.as_tensor()).expect("composed grad"),
            GRAD_RTOL,
        );
        Ok(())
    }

    #[test]
    fn rope_matches_the_composed_form_forward_and_backward() -> candle_core::Result<()> {
        let (b, h, t, d) = (2, 3, 5, 8);
        let x = Var::from_tensor(&randn(&[b, h, t, d], 6)?)?;
        let ang = randn(&[b, t, d / 2], 7)?;
        let (cos, sin) = (ang.cos()?, ang.sin()?);
        let fast = rope(x.as_tensor(), &cos, &sin)?;
        let slow = rope_with(x.as_tensor(), &cos, &sin, Kernels::Composed)?;
        close("forward", &fast, &slow, FWD_ATOL);
        let gf = project(&fast, 8)?.backward()?;
        let gs = project(&slow, 8)?.backward()?;
        close(
            "x",
            gf.get(x.as_tensor()).expect("fused grad"),
            gs.get(x.as_tensor()).expect("composed grad"),
            GRAD_RTOL,
        );
        Ok(())
    }

    #[test]
    fn swiglu_matches_the_composed_form_forward_and_backward() -> candle_core::Result<()> {
        // Gates over a wide range, including large magnitudes where σ saturates.
        let g = Var::from_tensor(&(randn(&[3, 7, 40], 14)? * 6.0)?)?;
        let u = Var::from_tensor(&randn(&[3, 7, 40], 15)?)?;
        let fast = swiglu(g.as_tensor(), u.as_tensor())?;
        let slow = swiglu_with(g.as_tensor(), u.as_tensor(), Kernels::Composed)?;
        close("forward", &fast, &slow, FWD_ATOL);
        let gf = project(&fast, 16)?.backward()?;
        let gs = project(&slow, 16)?.backward()?;
        for (n, v) in [("gate", &g), ("up", &u)] {
            close(
                n,
                gf.get(v.as_tensor()).expect("fused grad"),
                gs.get(v.as_tensor()).expect("composed grad"),
                GRAD_RTOL,
            );
        }
        let e = swiglu(&g.as_tensor().narrow(2, 0, 3)?, u.as_tensor()).unwrap_err();
        assert!(e.to_string().contains("differ in shape"), "{e}");
        Ok(())
    }

    #[test]
    fn frozen_linear_gives_the_input_its_gradient_and_the_weight_none() -> candle_core::Result<()> {
        let x = Var::from_tensor(&randn(&[9, 12], 17)?)?;
        let w = randn(&[5, 12], 18)?;
        let y = linear_2d(x.as_tensor(), &w)?;
        // The same matmul kernel as `x @ wᵀ`: bit-identical.
        let reference = linear_2d_with(x.as_tensor(), &w, Kernels::Composed)?;
        assert_eq!(
            y.flatten_all()?.to_vec1::<f32>()?,
            reference.flatten_all()?.to_vec1::<f32>()?
        );
        let gf = project(&y, 19)?.backward()?;
        let gs = project(&reference, 19)?.backward()?;
        close(
            "x",
            gf.get(x.as_tensor()).expect("fused grad"),
            gs.get(x.as_tensor()).expect("composed grad"),
            GRAD_RTOL,
        );
        // candle's matmul computes a gradient for the constant (`[12, 5]`, stored under its
        // transpose's id); the frozen linear computes none.
        let weight_shaped = |g: &candle_core::backprop::GradStore| {
            g.get_ids()
                .filter_map(|id| g.get_id(*id))
                .filter(|t| t.dims() == [5, 12] || t.dims() == [12, 5])
                .count()
        };
        assert_eq!(
            weight_shaped(&gs),
            1,
            "the composed form's wasted weight gradient"
        );
        assert_eq!(weight_shaped(&gf), 0, "the frozen weight got a gradient");
        // A trainable weight takes candle's matmul and gets its gradient.
        let wv = Var::from_tensor(&w)?;
        let g = project(&linear_2d(x.as_tensor(), wv.as_tensor())?, 19)?.backward()?;
        assert!(g.get(wv.as_tensor()).is_some());
        let e = linear_2d(x.as_tensor(), &randn(&[5, 11], 20)?).unwrap_err();
        assert!(e.to_string().contains("does not match weight"), "{e}");
        Ok(())
    }

    /// bf16 against f32 on the same values: bf16 keeps 8 significant bits (relative rounding
    /// 2⁻⁸ per element, a few roundings per chain).
    const BF16_RTOL: f64 = 3e-2;

    #[test]
    fn half_inputs_take_the_composed_form_with_its_gradient() -> candle_core::Result<()> {
        // A bf16 tensor is not the fused kernels' (f32, CPU): every op takes the composed form,
        // as a CUDA tensor does, and is differentiable.
        let bf = |t: Tensor| t.to_dtype(DType::BF16);
        let x32 = randn(&[2, 3, 4, 8], 21)?;
        let x = Var::from_tensor(&bf(x32.clone())?)?;
        let w = (randn(&[8], 22)? + 1.5)?;
        let ang = randn(&[2, 4, 4], 23)?;
        let (cos, sin) = (ang.cos()?, ang.sin()?);
        let y = rms_norm(x.as_tensor(), &bf(w.clone())?, 1e-5)?;
        let y = rope(&y, &bf(cos.clone())?, &bf(sin.clone())?)?;
        let y = softmax_last_dim(&swiglu(&y, x.as_tensor())?)?;
        assert_eq!(y.dtype(), DType::BF16);
        let r = rms_norm(&x32, &w, 1e-5)?;
        let r = softmax_last_dim(&swiglu(&rope(&r, &cos, &sin)?, &x32)?)?;
        close("bf16 forward", &y.to_dtype(DType::F32)?, &r, BF16_RTOL);
        let g = project(&y.to_dtype(DType::F32)?, 24)?.backward()?;
        let gx = g.get(x.as_tensor()).expect("bf16 grad");
        assert_eq!(gx.dtype(), DType::BF16);
        let x32v = Var::from_tensor(&x32)?;
        let r = rms_norm(x32v.as_tensor(), &w, 1e-5)?;
        let r = softmax_last_dim(&swiglu(&rope(&r, &cos, &sin)?, x32v.as_tensor())?)?;
        let gr = project(&r, 24)?.backward()?;
        close(
            "bf16 gradient",
            &gx.to_dtype(DType::F32)?,
            gr.get(x32v.as_tensor()).expect("f32 grad"),
            BF16_RTOL,
        );
        Ok(())
    }

    #[test]
    fn rms_norm_gradient_matches_finite_differences() -> candle_core::Result<()> {
        // Central differences in f64 of the composed form, against the fused backward.
        const FD_EPS: f64 = 1e-3;
        /// f32 forward evaluated at ±1e-3: the difference quotient carries ~1e-4 of noise.
        const FD_ATOL: f64 = 2e-3;
        let x0 = randn(&[2, 8], 9)?;
        let w0 = (randn(&[8], 10)? + 1.0)?;
        let r = randn(&[2, 8], 11)?;
        let f = |x: &Tensor, w: &Tensor| -> candle_core::Result<f64> {
            let y = rms_norm_composed(&x.to_dtype(DType::F64)?, &w.to_dtype(DType::F64)?, 1e-5)?;
            (y * r.to_dtype(DType::F64)?)?.sum_all()?.to_scalar::<f64>()
        };
        let x = Var::from_tensor(&x0)?;
        let w = Var::from_tensor(&w0)?;
        let y = rms_norm(x.as_tensor(), w.as_tensor(), 1e-5)?;
        let g = (y * &r)?.sum_all()?.backward()?;
        let gx: Vec<f32> = g
            .get(x.as_tensor())
            .expect("x grad")
            .flatten_all()?
            .to_vec1()?;
        let gw: Vec<f32> = g.get(w.as_tensor()).expect("w grad").to_vec1()?;
        let xv: Vec<f32> = x0.flatten_all()?.to_vec1()?;
        for i in 0..xv.len() {
            let mut p = xv.clone();
            p[i] += FD_EPS as f32;
            let mut m = xv.clone();
            m[i] -= FD_EPS as f32;
            let fd = (f(&Tensor::from_vec(p, (2, 8), &Device::Cpu)?, &w0)?
                - f(&Tensor::from_vec(m, (2, 8), &Device::Cpu)?, &w0)?)
                / (2.0 * FD_EPS);
            assert!(
                (fd - gx[i] as f64).abs() <= FD_ATOL,
                "x[{i}]: {fd} vs {}",
                gx[i]
            );
        }
        let wv: Vec<f32> = w0.to_vec1()?;
        for i in 0..wv.len() {
            let mut p = wv.clone();
            p[i] += FD_EPS as f32;
            let mut m = wv.clone();
            m[i] -= FD_EPS as f32;
            let fd = (f(&x0, &Tensor::new(p.as_slice(), &Device::Cpu)?)?
                - f(&x0, &Tensor::new(m.as_slice(), &Device::Cpu)?)?)
                / (2.0 * FD_EPS);
            assert!(
                (fd - gw[i] as f64).abs() <= FD_ATOL,
                "w[{i}]: {fd} vs {}",
                gw[i]
            );
        }
        Ok(())
    }
}
