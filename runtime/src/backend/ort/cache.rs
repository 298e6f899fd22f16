//! The two KV caches: the concatenating one (the last call's `present.*` values) and the
//! in-place one (batch 1, preallocated buffers bound as past and present), and their re-layouts.

use ::ort::value::{DynValue, Tensor};

use super::{backend_err, grown_capacity, OrtGenerator};
use crate::backend::BatchCache;
use crate::error::{Error, Result};

/// The ONNX Runtime cache: the last call's `present.*` values.
pub(super) struct OrtCache {
    pub(super) values: Vec<DynValue>,
}

/// A batch-1 cache kept in place ([`KvCacheMode::InPlace`]): one `[1, kv_heads, capacity,
/// head_dim]` buffer per `past_key_values.*` input, bound as that input and as its `present.*`
/// output; positions at and after the cache's length are stale and never read (the graph's
/// `seqlens_k` comes from the attention mask).
///
/// [`KvCacheMode::InPlace`]: super::KvCacheMode::InPlace
pub(super) struct InPlaceCache {
    pub(super) buffers: Vec<Tensor<f32>>,
    pub(super) capacity: usize,
}

// SAFETY: as for `OrtCache`: the buffers are owned here and bound to a session only for the
// duration of one call made through `&mut` access to this cache.
unsafe impl Send for InPlaceCache {}

// SAFETY: ONNX Runtime values are plain buffers owned by this struct; nothing else aliases them
// once a call has returned, so moving them between threads is sound.
unsafe impl Send for OrtCache {}

/// Rows of `[rows, past, dim]` data re-laid as `[rows, pad + (past - keep_from), dim]`: `pad`
/// zero positions in front, then positions `keep_from..past` of each row.
fn relayout_rows<T: Copy + Default>(
    data: &[T],
    rows: usize,
    past: usize,
    dim: usize,
    keep_from: usize,
    pad: usize,
) -> Vec<T> {
    let kept = past - keep_from;
    let mut out = vec![T::default(); rows * (pad + kept) * dim];
    for r in 0..rows {
        let src = &data[(r * past + keep_from) * dim..(r + 1) * past * dim];
        let at = (r * (pad + kept) + pad) * dim;
        out[at..at + kept * dim].copy_from_slice(src);
    }
    out
}

/// Copies `src` (`[heads, sp, dim]` of a batch-1 cache) into row `row` of `dst`
/// (`[batch, heads, dp, dim]`), ending at its last position.
pub(super) fn place_rows<T: Copy>(
    dst: &mut [T],
    src: &[T],
    row: usize,
    heads: usize,
    dp: usize,
    sp: usize,
    dim: usize,
) {
    for h in 0..heads {
        let at = ((row * heads + h) * dp + dp - sp) * dim;
        dst[at..at + sp * dim].copy_from_slice(&src[h * sp * dim..(h + 1) * sp * dim]);
    }
}

impl OrtGenerator {
    /// A cache tensor of `shape` from `data` in the cache's element type.
    pub(super) fn tensor<T>(&self, shape: [usize; 4], data: Vec<T>) -> Result<DynValue>
    where
        T: ::ort::value::PrimitiveTensorElementType + std::fmt::Debug + Clone + 'static,
    {
        Ok(Tensor::from_array((shape, data))
            .map_err(backend_err)?
            .into_dyn())
    }

    fn relayout_value(
        &self,
        v: &DynValue,
        batch: usize,
        past: usize,
        keep_from: usize,
        pad: usize,
    ) -> Result<DynValue> {
        let (rows, d) = (batch * self.kv_heads, self.head_dim);
        let shape = [batch, self.kv_heads, pad + past - keep_from, d];
        if self.cache_f16 {
            let (_, x) = v.try_extract_tensor::<half::f16>().map_err(backend_err)?;
            self.tensor(shape, relayout_rows(x, rows, past, d, keep_from, pad))
        } else {
            let (_, x) = v.try_extract_tensor::<f32>().map_err(backend_err)?;
            self.tensor(shape, relayout_rows(x, rows, past, d, keep_from, pad))
        }
    }

    pub(super) fn relayout(
        &self,
        cache: &mut BatchCache,
        keep_from: usize,
        pad: usize,
    ) -> Result<()> {
        let (b, past) = (cache.batch, cache.past);
        let oc = cache
            .inner
            .downcast_mut::<OrtCache>()
            .ok_or_else(not_a_concat_cache)?;
        let values = oc
            .values
            .iter()
            .map(|v| self.relayout_value(v, b, past, keep_from, pad))
            .collect::<Result<Vec<_>>>()?;
        oc.values = values;
        cache.past = pad + past - keep_from;
        Ok(())
    }
}

/// The error of a batched-cache operation (re-layout, placing a row) on a cache that is not a
/// concatenated ONNX Runtime cache.
pub(super) fn not_a_concat_cache() -> Error {
    Error::Misuse {
        call: "BatchDecoder",
        problem: "the cache belongs to another backend, or is an in-place cache (batch 1, \
                  kv_cache in-place), which is not re-laid or batched"
            .into(),
    }
}

impl OrtGenerator {
    /// Grows the buffers of an in-place cache holding `past` positions to hold `needed`
    /// ([`grown_capacity`]), copying the `past` valid positions of every head.
    pub(super) fn grow_in_place(
        &self,
        ip: &mut InPlaceCache,
        past: usize,
        needed: usize,
    ) -> Result<()> {
        let cap = grown_capacity(ip.capacity, needed, self.info.context_length);
        *ip = self.copy_in_place(ip, past, cap)?;
        Ok(())
    }

    /// New in-place buffers of `cap` positions holding the first `past` positions of `ip`'s.
    pub(super) fn copy_in_place(
        &self,
        ip: &InPlaceCache,
        past: usize,
        cap: usize,
    ) -> Result<InPlaceCache> {
        let (heads, d, old) = (self.kv_heads, self.head_dim, ip.capacity);
        let alloc = ::ort::memory::Allocator::default();
        let mut buffers = Vec::with_capacity(self.past_names.len());
        for i in 0..self.past_names.len() {
            let mut t = Tensor::<f32>::new(&alloc, [1, heads, cap, d]).map_err(backend_err)?;
            if past > 0 {
                let (_, src) = ip.buffers[i].extract_tensor();
                let (_, dst) = t.extract_tensor_mut();
                for h in 0..heads {
                    dst[h * cap * d..(h * cap + past) * d]
                        .copy_from_slice(&src[h * old * d..(h * old + past) * d]);
                }
            }
            buffers.push(t);
        }
        Ok(InPlaceCache {
            buffers,
            capacity: cap,
        })
    }

    /// The first `len` of `past` positions of every row of a concatenating cache, re-laid as
    /// new values.
    pub(super) fn kept_values(
        &self,
        oc: &OrtCache,
        batch: usize,
        past: usize,
        len: usize,
    ) -> Result<Vec<DynValue>> {
        let rows = batch * self.kv_heads;
        let d = self.head_dim;
        let shape = [batch, self.kv_heads, len, d];
        let keep = |r: usize| r * past * d..(r * past + len) * d;
        let mut values = Vec::with_capacity(oc.values.len());
        for v in &oc.values {
            values.push(if self.cache_f16 {
                let (_, x) = v.try_extract_tensor::<half::f16>().map_err(backend_err)?;
                self.tensor(shape, (0..rows).flat_map(|r| x[keep(r)].to_vec()).collect())?
            } else {
                let (_, x) = v.try_extract_tensor::<f32>().map_err(backend_err)?;
                self.tensor(shape, (0..rows).flat_map(|r| x[keep(r)].to_vec()).collect())?
            });
        }
        Ok(values)
    }
}
