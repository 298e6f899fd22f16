//! Fused grouped-query attention on the CPU, forward and backward, tiled by query block.
//!
//! The composed form (`repeat_kv`, `q·kᵀ` as a batched matmul, the masked softmax, `p·v`, a
//! transpose) materialises the scores of every query against every key, the masked half of a
//! causal batch included, copies the shared key/value heads once per query head, and runs the
//! masked entries' `exp(-1e9)` through libm's slow underflow path. Profiled on a SmolLM2
//! training step at 1,024 tokens it was the largest cost after the linear layers.
//!
//! [`attention`] computes, for each (row, head, block of [`BLOCK`] queries), the scores of the
//! block against the keys up to the last one any of its queries may see (one GEMM), the softmax
//! over the allowed keys only, and the block's output (one GEMM), written straight into the
//! `[batch, seq, heads, head_dim]` layout the output projection reads. Key/value heads are read
//! in place by every query head of their group. The backward recomputes each block's
//! probabilities (no `[seq, keys]` tensor is kept between the passes) and forms the four
//! gradient GEMMs per block.
//!
//! Which keys a query may see is a [`KeyMask`]: causal with a per-row validity of every key
//! (left padding, a batched cache). A query that may see no key at all (a left-padding query)
//! attends uniformly to every key — the composed form's result with its finite mask value.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};
use gemm::{gemm, Parallelism};
use rayon::prelude::*;

/// Queries per tile.
pub const BLOCK: usize = 64;

/// Which keys each query may attend to: `[batch, queries, keys]`, with the end of each row's
/// allowed range precomputed.
#[derive(Debug, Clone)]
pub struct KeyMask {
    batch: usize,
    queries: usize,
    keys: usize,
    /// `None`: every query sees every key.
    allowed: Option<Vec<bool>>,
    /// Per `(row, query)`: the first allowed key (0 for a query that sees none).
    start: Vec<usize>,
    /// Per `(row, query)`: one past the last allowed key (`keys` for a query that sees none).
    end: Vec<usize>,
    /// Per `(row, query)`: every key in `start..end` is allowed (no hole), the common case
    /// of causal attention with left padding.
    dense: Vec<bool>,
    /// Per `(row, query)`: the query sees no key (attends uniformly to all).
    none: Vec<bool>,
}

impl KeyMask {
    /// Causal attention of `queries` new positions appended after `valid[r].len() − queries`
    /// cached ones: query `i` of row `r` may see key `j` when `j ≤ past + i` and `valid[r][j]`.
    pub fn causal(valid: &[Vec<bool>], queries: usize) -> candle_core::Result<Self> {
        let batch = valid.len();
        let keys = valid.first().map(|v| v.len()).unwrap_or(0);
        if valid.iter().any(|v| v.len() != keys) || keys < queries {
            candle_core::bail!(
                "key mask: every row needs the same number of keys (at least {queries} queries)"
            );
        }
        let past = keys - queries;
        let trivial = queries == 1 && valid.iter().all(|r| r.iter().all(|&v| v));
        if trivial {
            return Ok(KeyMask {
                batch,
                queries,
                keys,
                allowed: None,
                start: vec![0; batch * queries],
                end: vec![keys; batch * queries],
                dense: vec![true; batch * queries],
                none: vec![false; batch * queries],
            });
        }
        let mut allowed = vec![false; batch * queries * keys];
        let mut start = vec![0; batch * queries];
        let mut end = vec![keys; batch * queries];
        let mut dense = vec![true; batch * queries];
        let mut none = vec![false; batch * queries];
        for (r, row) in valid.iter().enumerate() {
            for i in 0..queries {
                let q = r * queries + i;
                let a = &mut allowed[q * keys..(q + 1) * keys];
                let (mut first, mut last, mut count) = (None, 0, 0);
                for j in 0..=past + i {
                    if row[j] {
                        a[j] = true;
                        first.get_or_insert(j);
                        last = j;
                        count += 1;
                    }
                }
                match first {
                    Some(f) => {
                        start[q] = f;
                        end[q] = last + 1;
                        dense[q] = count == last + 1 - f;
                    }
                    None => none[q] = true,
                }
            }
        }
        Ok(KeyMask {
            batch,
            queries,
            keys,
            allowed: Some(allowed),
            start,
            end,
            dense,
            none,
        })
    }

    /// `(batch, queries, keys)`.
    pub fn dims(&self) -> (usize, usize, usize) {
        (self.batch, self.queries, self.keys)
    }

    /// Whether query `i` of row `r` may see key `j` (a query that sees no key counts as seeing
    /// all).
    pub fn allows(&self, r: usize, i: usize, j: usize) -> bool {
        let q = r * self.queries + i;
        self.none[q] || self.allowed.as_ref().is_none_or(|a| a[q * self.keys + j])
    }
}

/// Shapes of one call: q `[b, nh, s, d]`, k / v `[b, kvh, t, d]`, output `[b, s, nh, d]`.
#[derive(Clone, Copy)]
struct Geom {
    b: usize,
    nh: usize,
    kvh: usize,
    s: usize,
    t: usize,
    d: usize,
}

impl Geom {
    fn blocks(&self) -> usize {
        self.s.div_ceil(BLOCK)
    }
}

/// A raw pointer that tasks writing disjoint parts of one buffer may share.
#[derive(Clone, Copy)]
struct SharedMut(*mut f32);
// SAFETY: every task writes a disjoint set of elements (see the callers).
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}

impl SharedMut {
    /// The pointer (a method, so that closures capture the wrapper, not its field).
    fn get(&self) -> *mut f32 {
        self.0
    }
}

/// `dst (m×n) = [dst +] lhs (m×k) · rhs (k×n)`, every matrix given by its pointer and its
/// (row, column) strides in elements. Single-threaded: the callers parallelise over tiles.
///
/// # Safety
/// The pointers must address every element the strides and sizes reach.
#[allow(clippy::too_many_arguments)]
unsafe fn mm(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_strides: (usize, usize),
    accumulate: bool,
    lhs: *const f32,
    lhs_strides: (usize, usize),
    rhs: *const f32,
    rhs_strides: (usize, usize),
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                for j in 0..n {
                    // SAFETY: the caller's contract covers every (i, j) of the m × n block.
                    unsafe { *dst.add(i * dst_strides.0 + j * dst_strides.1) = 0.0 };
                }
            }
        }
        return;
    }
    // SAFETY: the caller's contract: the pointers address every element the strides reach.
    unsafe {
        gemm(
            m,
            n,
            k,
            dst,
            dst_strides.1 as isize,
            dst_strides.0 as isize,
            accumulate,
            lhs,
            lhs_strides.1 as isize,
            lhs_strides.0 as isize,
            rhs,
            rhs_strides.1 as isize,
            rhs_strides.0 as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            Parallelism::None,
        )
    };
}

/// The attention probabilities of queries `i0..i1` of row `bi`, head `h` into `p`
/// (`(i1 − i0) × width`, row stride `width`); returns `width`, one past the last key any of
/// the block's queries may see. Entries a query may not see are exactly 0.
#[allow(clippy::too_many_arguments)]
fn block_probs(
    q: &[f32],
    k: &[f32],
    g: Geom,
    mask: &KeyMask,
    scale: f32,
    bi: usize,
    h: usize,
    i0: usize,
    i1: usize,
    p: &mut Vec<f32>,
) -> usize {
    let rows = i1 - i0;
    let kv = h / (g.nh / g.kvh);
    let qrow = |i: usize| bi * g.s + i;
    let width = (i0..i1).map(|i| mask.end[qrow(i)]).max().unwrap_or(0);
    p.clear();
    p.resize(rows * width, 0.0);
    // SAFETY: q rows i0..i1 of (bi, h) are `rows × d` at row stride d; the keys 0..width of
    // (bi, kv) are `width × d` (read transposed); p is `rows × width`.
    unsafe {
        mm(
            rows,
            width,
            g.d,
            p.as_mut_ptr(),
            (width, 1),
            false,
            q.as_ptr().add(((bi * g.nh + h) * g.s + i0) * g.d),
            (g.d, 1),
            k.as_ptr().add((bi * g.kvh + kv) * g.t * g.d),
            (1, g.d),
        );
    }
    for (r, row) in p.chunks_mut(width.max(1)).take(rows).enumerate() {
        let qi = qrow(i0 + r);
        if mask.none[qi] {
            // Sees nothing: uniform over every key (width is the full key count here).
            row.fill(1.0 / g.t as f32);
            continue;
        }
        let (lo, end) = (mask.start[qi], mask.end[qi]);
        if mask.dense[qi] {
            // Allowed keys lo..end, no hole: branch-free loops.
            row[..lo].fill(0.0);
            let x = &mut row[lo..end];
            let mx = scale_max(x, scale);
            let sum = exp_shifted(x, mx);
            let inv = 1.0 / sum;
            for v in x.iter_mut() {
                *v *= inv;
            }
        } else {
            let allowed = mask.allowed.as_ref().map(|a| &a[qi * g.t..qi * g.t + end]);
            let mut mx = f32::NEG_INFINITY;
            for (j, v) in row[..end].iter_mut().enumerate() {
                if allowed.is_none_or(|a| a[j]) {
                    *v *= scale;
                    mx = mx.max(*v);
                }
            }
            let mut sum = 0f32;
            for (j, v) in row[..end].iter_mut().enumerate() {
                *v = if allowed.is_none_or(|a| a[j]) {
                    exp_nonpositive(*v - mx)
                } else {
                    0.0
                };
                sum += *v;
            }
            let inv = 1.0 / sum;
            for v in &mut row[..end] {
                *v *= inv;
            }
        }
        row[end..].fill(0.0);
    }
    width
}

/// `eˣ` for `x ≤ 0` (softmax scores less their maximum), branch-free so that a loop of it
/// vectorises: Cody–Waite reduction `x = n·ln 2 + r` and a degree-6 polynomial for `eʳ`
/// (Cephes' `expf`), within [`EXP_RTOL`] of the exact value. Below −87 (where `eˣ` is under
/// 1.7e−38, negligible next to the softmax's largest term, 1) it returns `e⁻⁸⁷`.
#[inline(always)]
pub(crate) fn exp_nonpositive(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5 · 2²³: adding and subtracting it rounds to the nearest integer.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 0.0);
    // n = round(x·log₂e) sits in the low mantissa bits of `big` (|n| ≤ 126); integer ops on
    // the bits (not a saturating float → int cast) keep the loop vectorised.
    let big = x * std::f32::consts::LOG2_E + ROUND;
    let n = big - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 0.166_666_65)
        * r
        + 0.5;
    let e = p * r * r + r + 1.0;
    let two_n = (big
        .to_bits()
        .wrapping_sub(ROUND.to_bits())
        .wrapping_add(127))
        << 23;
    e * f32::from_bits(two_n)
}

/// Relative error bound of `exp_nonpositive` on `[−87, 0]`.
pub const EXP_RTOL: f64 = 5e-7;

/// Lanes of the partial sums and maxima below (one AVX-512 register of f32), so that the
/// reductions vectorise.
const LANES: usize = 16;

/// `x ← e^(x − shift)` over a slice (every `x ≤ shift`); returns the sum.
fn exp_shifted(x: &mut [f32], shift: f32) -> f32 {
    let mut acc = [0f32; LANES];
    let mut chunks = x.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for (a, v) in acc.iter_mut().zip(c.iter_mut()) {
            *v = exp_nonpositive(*v - shift);
            *a += *v;
        }
    }
    let mut sum: f32 = acc.iter().sum();
    for v in chunks.into_remainder() {
        *v = exp_nonpositive(*v - shift);
        sum += *v;
    }
    sum
}

/// `x ← x · scale` over a slice; returns the maximum.
fn scale_max(x: &mut [f32], scale: f32) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let mut chunks = x.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for (a, v) in acc.iter_mut().zip(c.iter_mut()) {
            *v *= scale;
            *a = if *v > *a { *v } else { *a };
        }
    }
    let mut mx = acc.iter().fold(f32::NEG_INFINITY, |m, &a| m.max(a));
    for v in chunks.into_remainder() {
        *v *= scale;
        mx = mx.max(*v);
    }
    mx
}

fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> candle_core::Result<&'a [f32]> {
    crate::ops::contiguous(crate::ops::f32s(s, what)?, l, what)
}

/// The fused attention op (see the module documentation).
struct Attention {
    mask: Arc<KeyMask>,
    scale: f32,
}

impl Attention {
    fn geom(&self, q: &[usize], k: &[usize], v: &[usize]) -> candle_core::Result<Geom> {
        let (&[b, nh, s, d], &[kb, kvh, t, kd]) = (q, k) else {
            candle_core::bail!("attention: q and k must be 4-d, got {q:?} and {k:?}");
        };
        if kb != b || kd != d || v != k || kvh == 0 || nh % kvh != 0 {
            candle_core::bail!(
                "attention: q {q:?}, k {k:?}, v {v:?} do not fit [b, heads, s, d] / [b, kv_heads, t, d]"
            );
        }
        if self.mask.dims() != (b, s, t) {
            candle_core::bail!(
                "attention: key mask {:?} does not fit batch {b}, {s} queries, {t} keys",
                self.mask.dims()
            );
        }
        Ok(Geom {
            b,
            nh,
            kvh,
            s,
            t,
            d,
        })
    }
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "steper-attention"
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
        let g = self.geom(l1.dims(), l2.dims(), l3.dims())?;
        let q = f32_slice(s1, l1, self.name())?;
        let k = f32_slice(s2, l2, self.name())?;
        let v = f32_slice(s3, l3, self.name())?;
        let mut out = vec![0f32; g.b * g.s * g.nh * g.d];
        let dst = SharedMut(out.as_mut_ptr());
        let nblk = g.blocks();
        (0..g.b * g.nh * nblk)
            .into_par_iter()
            .for_each_init(Vec::new, |p, task| {
                let (bi, h, blk) = (task / (g.nh * nblk), task / nblk % g.nh, task % nblk);
                let (i0, i1) = (blk * BLOCK, ((blk + 1) * BLOCK).min(g.s));
                let width = block_probs(q, k, g, &self.mask, self.scale, bi, h, i0, i1, p);
                let kv = h / (g.nh / g.kvh);
                // SAFETY: task (bi, h, blk) writes only out[bi, i0..i1, h, :], which no other
                // task writes; v rows 0..width of (bi, kv) exist since width ≤ t.
                unsafe {
                    mm(
                        i1 - i0,
                        g.d,
                        width,
                        dst.get().add(((bi * g.s + i0) * g.nh + h) * g.d),
                        (g.nh * g.d, 1),
                        false,
                        p.as_ptr(),
                        (width, 1),
                        v.as_ptr().add((bi * g.kvh + kv) * g.t * g.d),
                        (g.d, 1),
                    );
                }
            });
        Ok((CpuStorage::F32(out), Shape::from((g.b, g.s, g.nh, g.d))))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = self.geom(q.dims(), k.dims(), v.dims())?;
        let flat = |t: &Tensor| t.contiguous()?.flatten_all()?.to_vec1::<f32>();
        let (qv, kv_, vv, yv, dyv) = (flat(q)?, flat(k)?, flat(v)?, flat(y)?, flat(dy)?);
        let (qs, ks, vs, ys, dys) = (&qv[..], &kv_[..], &vv[..], &yv[..], &dyv[..]);
        let n_rep = g.nh / g.kvh;
        let (sd, td) = (g.s * g.d, g.t * g.d);
        let mut dq = vec![0f32; g.b * g.nh * sd];
        // Per query head; summed over each key/value head's group below.
        let mut dk_h = vec![0f32; g.b * g.nh * td];
        let mut dv_h = vec![0f32; g.b * g.nh * td];
        let scale = self.scale;
        dq.par_chunks_mut(sd)
            .zip(dk_h.par_chunks_mut(td).zip(dv_h.par_chunks_mut(td)))
            .enumerate()
            .for_each(|(task, (dq, (dk, dv)))| {
                let (bi, h) = (task / g.nh, task % g.nh);
                let kv = h / n_rep;
                let kbase = (bi * g.kvh + kv) * td;
                let (mut p, mut dp) = (Vec::new(), Vec::new());
                for blk in 0..g.blocks() {
                    let (i0, i1) = (blk * BLOCK, ((blk + 1) * BLOCK).min(g.s));
                    let rows = i1 - i0;
                    let w = block_probs(qs, ks, g, &self.mask, scale, bi, h, i0, i1, &mut p);
                    let orow = ((bi * g.s + i0) * g.nh + h) * g.d;
                    let ostride = g.nh * g.d;
                    dp.clear();
                    dp.resize(rows * w, 0.0);
                    // SAFETY: all operands are the block's rows / the first w keys, in bounds
                    // by construction; dq / dk / dv are this task's own chunks.
                    unsafe {
                        // dV += Pᵀ · dY
                        mm(
                            w,
                            g.d,
                            rows,
                            dv.as_mut_ptr(),
                            (g.d, 1),
                            true,
                            p.as_ptr(),
                            (1, w),
                            dys.as_ptr().add(orow),
                            (ostride, 1),
                        );
                        // dP = dY · Vᵀ
                        mm(
                            rows,
                            w,
                            g.d,
                            dp.as_mut_ptr(),
                            (w, 1),
                            false,
                            dys.as_ptr().add(orow),
                            (ostride, 1),
                            vs.as_ptr().add(kbase),
                            (1, g.d),
                        );
                    }
                    // dS = P ⊙ (dP − Σⱼ dY·Y) · scale
                    for r in 0..rows {
                        let o = orow + r * ostride;
                        let dot: f32 = dys[o..o + g.d]
                            .iter()
                            .zip(&ys[o..o + g.d])
                            .map(|(a, b)| a * b)
                            .sum();
                        for (ds, pv) in dp[r * w..(r + 1) * w].iter_mut().zip(&p[r * w..]) {
                            *ds = pv * (*ds - dot) * scale;
                        }
                    }
                    unsafe {
                        // dQ = dS · K
                        mm(
                            rows,
                            g.d,
                            w,
                            dq.as_mut_ptr().add(i0 * g.d),
                            (g.d, 1),
                            false,
                            dp.as_ptr(),
                            (w, 1),
                            ks.as_ptr().add(kbase),
                            (g.d, 1),
                        );
                        // dK += dSᵀ · Q
                        mm(
                            w,
                            g.d,
                            rows,
                            dk.as_mut_ptr(),
                            (g.d, 1),
                            true,
                            dp.as_ptr(),
                            (1, w),
                            qs.as_ptr().add(((bi * g.nh + h) * g.s + i0) * g.d),
                            (g.d, 1),
                        );
                    }
                }
            });
        let group_sum = |per_head: &[f32]| {
            let mut out = vec![0f32; g.b * g.kvh * td];
            out.par_chunks_mut(td).enumerate().for_each(|(task, o)| {
                let (bi, kv) = (task / g.kvh, task % g.kvh);
                for r in 0..n_rep {
                    let src = &per_head[(bi * g.nh + kv * n_rep + r) * td..][..td];
                    for (o, s) in o.iter_mut().zip(src) {
                        *o += s;
                    }
                }
            });
            out
        };
        let dev = q.device();
        Ok((
            Some(Tensor::from_vec(dq, q.shape(), dev)?),
            Some(Tensor::from_vec(group_sum(&dk_h), k.shape(), dev)?),
            Some(Tensor::from_vec(group_sum(&dv_h), v.shape(), dev)?),
        ))
    }
}

/// Grouped-query attention `softmax(scale · q·kᵀ, masked) · v` for q `[b, heads, s, d]` and
/// k / v `[b, kv_heads, t, d]` (f32, CPU; `heads` a multiple of `kv_heads`), with which key each
/// query may see given by `mask` (`[b, s, t]`). Returns `[b, s, heads, d]`. Differentiable in
/// q, k and v.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Arc<KeyMask>,
    scale: f64,
) -> candle_core::Result<Tensor> {
    q.contiguous()?.apply_op3(
        &k.contiguous()?,
        &v.contiguous()?,
        Attention {
            mask,
            scale: scale as f32,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::tests::{close, randn, FWD_ATOL, GRAD_RTOL};
    use candle_core::{Device, Var, D};

    /// The composed form: `repeat_kv`, `q·kᵀ`, additive mask (−1e9), softmax, `·v`, transpose.
    fn composed(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: &KeyMask,
        scale: f64,
    ) -> candle_core::Result<Tensor> {
        let (b, nh, s, _) = q.dims4()?;
        let (_, kvh, t, d) = k.dims4()?;
        let rep = |x: &Tensor| {
            x.unsqueeze(2)?
                .expand((b, kvh, nh / kvh, t, d))?
                .reshape((b, nh, t, d))
        };
        let (k, v) = (rep(k)?, rep(v)?);
        let mut add = vec![0f32; b * s * t];
        for r in 0..b {
            for i in 0..s {
                for j in 0..t {
                    if !mask.allows(r, i, j) || mask.none[r * s + i] {
                        add[(r * s + i) * t + j] = -1e9;
                    }
                }
            }
        }
        let add = Tensor::from_vec(add, (b, 1, s, t), &Device::Cpu)?;
        let x = (q.matmul(&k.t()?.contiguous()?)? * scale)?.broadcast_add(&add)?;
        let x = x.broadcast_sub(&x.max_keepdim(D::Minus1)?)?.exp()?;
        let p = x.broadcast_div(&x.sum_keepdim(D::Minus1)?)?;
        p.matmul(&v)?.transpose(1, 2)?.contiguous()
    }

    /// Row 0 sees everything causal; row 1 is left-padded by `pad` and has a cached hole.
    fn valid(b: usize, t: usize, pad: usize) -> Vec<Vec<bool>> {
        (0..b)
            .map(|r| {
                (0..t)
                    .map(|j| r == 0 || (j >= pad && j != pad + 3))
                    .collect()
            })
            .collect()
    }

    fn check(b: usize, nh: usize, kvh: usize, s: usize, past: usize, d: usize) {
        let t = past + s;
        let mask = Arc::new(KeyMask::causal(&valid(b, t, 5.min(t - 1)), s).expect("mask"));
        let q = Var::from_tensor(&randn(&[b, nh, s, d], 1).expect("q")).expect("var");
        let k = Var::from_tensor(&randn(&[b, kvh, t, d], 2).expect("k")).expect("var");
        let v = Var::from_tensor(&randn(&[b, kvh, t, d], 3).expect("v")).expect("var");
        let scale = 1.0 / (d as f64).sqrt();
        let fast = attention(
            q.as_tensor(),
            k.as_tensor(),
            v.as_tensor(),
            mask.clone(),
            scale,
        )
        .expect("fused");
        let slow =
            composed(q.as_tensor(), k.as_tensor(), v.as_tensor(), &mask, scale).expect("composed");
        assert_eq!(fast.dims(), &[b, s, nh, d]);
        let what = format!("b {b} heads {nh}/{kvh} s {s} past {past}");
        close(&format!("{what}: forward"), &fast, &slow, FWD_ATOL);
        let w = randn(&[b, s, nh, d], 4).expect("projection");
        let gf = (&fast * &w)
            .and_then(|x| x.sum_all())
            .expect("loss")
            .backward()
            .expect("bwd");
        let gs = (&slow * &w)
            .and_then(|x| x.sum_all())
            .expect("loss")
            .backward()
            .expect("bwd");
        for (name, var) in [("dq", &q), ("dk", &k), ("dv", &v)] {
            let a = gf.get(var.as_tensor()).expect("fused gradient");
            let b = gs.get(var.as_tensor()).expect("composed gradient");
            close(&format!("{what}: {name}"), a, b, GRAD_RTOL);
        }
    }

    #[test]
    fn fused_attention_matches_the_composed_form_forward_and_backward() {
        // GQA, a query block boundary crossed (BLOCK = 64), left padding with fully masked
        // queries, and a cache hole.
        check(2, 4, 2, 70, 0, 8);
        // Appended after cached positions, one block.
        check(2, 6, 3, 9, 7, 16);
        // One decode step against a cache, plain multi-head.
        check(1, 2, 2, 1, 12, 8);
        check(3, 3, 1, 1, 6, 4);
    }

    #[test]
    fn a_query_that_sees_no_key_attends_uniformly() -> candle_core::Result<()> {
        // Row 0's first three keys are padding: its first three queries see nothing.
        let valid = vec![vec![false, false, false, true, true]];
        let mask = Arc::new(KeyMask::causal(&valid, 5)?);
        let v = randn(&[1, 1, 5, 4], 7)?;
        let y = attention(
            &randn(&[1, 1, 5, 4], 8)?,
            &randn(&[1, 1, 5, 4], 9)?,
            &v,
            mask,
            0.5,
        )?;
        let mean = v.mean_keepdim(2)?.flatten_all()?;
        for i in 0..3 {
            close(
                "uniform row",
                &y.get(0)?.get(i)?.flatten_all()?,
                &mean,
                FWD_ATOL,
            );
        }
        // Query 3 sees only key 3.
        close(
            "single key",
            &y.get(0)?.get(3)?.flatten_all()?,
            &v.get(0)?.get(0)?.get(3)?,
            FWD_ATOL,
        );
        Ok(())
    }

    #[test]
    fn the_softmax_exponential_is_within_its_tolerance_of_the_exact_one() {
        let mut worst = 0f64;
        for i in 0..=870_000 {
            let x = -(i as f64) * 1e-4;
            let exact = x.exp();
            let got = exp_nonpositive(x as f32) as f64;
            // Exact to f32 rounding of the input: compare with e^(x as f32).
            let exact_f = (x as f32 as f64).exp();
            let rel = ((got - exact_f) / exact_f).abs();
            worst = worst.max(rel);
            assert!(
                rel <= EXP_RTOL,
                "exp({x}) = {got}, exact {exact}: rel {rel:e}"
            );
        }
        assert!(worst > 0.0, "compared against itself?");
        assert_eq!(exp_nonpositive(0.0), 1.0);
        assert!(exp_nonpositive(-1e9) < 2e-38);
    }

    #[test]
    fn a_mask_that_does_not_fit_is_an_error() -> candle_core::Result<()> {
        let mask = Arc::new(KeyMask::causal(&[vec![true; 4]], 4)?);
        let q = randn(&[1, 2, 3, 4], 1)?;
        let k = randn(&[1, 1, 4, 4], 2)?;
        let err = attention(&q, &k, &k, mask, 1.0).expect_err("3 queries vs a 4-query mask");
        assert!(err.to_string().contains("key mask"), "{err}");
        assert!(KeyMask::causal(&[vec![true; 2], vec![true; 3]], 2).is_err());
        Ok(())
    }
}
