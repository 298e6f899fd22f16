//! The batched step ([`BatchDecoder`]) on ONNX Runtime: a call on either kind of cache, and the
//! cache operations (truncate, copy, pad, trim, place a row) the loop and the batcher use.

use std::any::Any;
use std::borrow::Cow;

use ::ort::session::SessionInputValue;
use ::ort::value::{DynValue, Tensor};

use super::cache::{not_a_concat_cache, place_rows, InPlaceCache, OrtCache};
use super::{backend_err, OrtGenerator};
use crate::backend::{BatchCache, BatchDecoder, BatchInput};
use crate::error::{Error, Result};
use crate::generator::{Logits, LogitsMode};

/// The logits a call returns in `mode`, copied out of the graph's `logits` output (`[b, s,
/// vocab]`, or `[b, 1, vocab]` when the graph kept the last position only).
fn logits_of(
    logits: &DynValue,
    b: usize,
    s: usize,
    mode: LogitsMode,
    keep_last: bool,
) -> Result<Logits> {
    let (shape, data) = logits.try_extract_tensor::<f32>().map_err(backend_err)?;
    let vocab = *shape.last().unwrap_or(&0) as usize;
    Ok(match mode {
        LogitsMode::All => Logits {
            rows: b * s,
            vocab,
            data: data.to_vec(),
        },
        LogitsMode::Last if keep_last => Logits {
            rows: b,
            vocab,
            data: data.to_vec(),
        },
        LogitsMode::Last => {
            let mut v = Vec::with_capacity(b * vocab);
            for r in 0..b {
                let off = (r * s + s - 1) * vocab;
                v.extend_from_slice(&data[off..off + vocab]);
            }
            Logits {
                rows: b,
                vocab,
                data: v,
            }
        }
    })
}

impl OrtGenerator {
    /// [`BatchDecoder::step`] on an in-place cache (batch 1, no padding: checked by the
    /// caller): the cache buffers are bound as both past and present, the logits to a
    /// CPU-allocated output.
    fn step_in_place(
        &self,
        cache: &mut BatchCache,
        input: &BatchInput,
        mode: LogitsMode,
    ) -> Result<Logits> {
        let (past, s) = (cache.past, input.seq);
        let ip = cache
            .inner
            .downcast_mut::<InPlaceCache>()
            .ok_or(Error::ForeignSequence)?;
        if past + s > ip.capacity {
            self.grow_in_place(ip, past, past + s)?;
        }
        let row = |v: &[i64]| -> Result<Tensor<i64>> {
            Tensor::from_array(([1, v.len()], v.to_vec())).map_err(backend_err)
        };
        let ids = row(&input.input_ids)?;
        let mask = row(&input.attention_mask)?;
        let pos = row(&input.position_ids)?;
        let keep = match (&self.logits_to_keep, mode) {
            (Some(name), LogitsMode::Last) => Some((
                name,
                Tensor::from_array(((), vec![1i64])).map_err(backend_err)?,
            )),
            _ => None,
        };
        let mut session = self.sessions.checkout()?;
        let session = session.session()?;
        let mut bind = session.create_binding().map_err(backend_err)?;
        bind.bind_input("input_ids", &ids).map_err(backend_err)?;
        bind.bind_input("attention_mask", &mask)
            .map_err(backend_err)?;
        bind.bind_input("position_ids", &pos).map_err(backend_err)?;
        if let Some((name, one)) = &keep {
            bind.bind_input(name.as_str(), one).map_err(backend_err)?;
        }
        for (name, buf) in self.past_names.iter().zip(&ip.buffers) {
            bind.bind_input(name.as_str(), buf).map_err(backend_err)?;
        }
        for (name, buf) in self.present_names.iter().zip(ip.buffers.iter_mut()) {
            bind.bind_output(name.as_str(), buf).map_err(backend_err)?;
        }
        bind.bind_output_to_device("logits", &::ort::memory::MemoryInfo::default())
            .map_err(backend_err)?;
        let logits = {
            let mut out = session.run_binding(&bind).map_err(backend_err)?;
            let logits = out
                .remove("logits")
                .ok_or_else(|| backend_err("no `logits` output"))?;
            logits_of(&logits, 1, s, mode, keep.is_some())?
        };
        drop(bind);
        cache.past += s;
        Ok(logits)
    }
}

impl BatchDecoder for OrtGenerator {
    fn new_cache(&self, batch: usize) -> Result<BatchCache> {
        if self.in_place && batch == 1 {
            // Buffers are allocated by the first call, at the size it needs.
            return Ok(BatchCache {
                batch,
                past: 0,
                inner: Box::new(InPlaceCache {
                    buffers: Vec::new(),
                    capacity: 0,
                }),
            });
        }
        let values = (0..self.past_names.len())
            .map(|_| self.empty(batch))
            .collect::<Result<Vec<_>>>()?;
        Ok(BatchCache {
            batch,
            past: 0,
            inner: Box::new(OrtCache { values }),
        })
    }

    fn step(&self, cache: &mut BatchCache, input: &BatchInput, mode: LogitsMode) -> Result<Logits> {
        input.check(cache.past, cache.batch)?;
        if !self.attention.is_standard() && input.attention_mask.contains(&0) {
            return Err(Error::InvalidOption {
                option: "attention_mask".into(),
                expected: "no padding: this export uses GroupQueryAttention (steper-export --attention gqa), which assumes every row starts at position 0 — re-export with --attention standard for padded batches".into(),
                got: "a mask with padded (0) positions".into(),
            });
        }
        if cache.inner.is::<InPlaceCache>() {
            return self.step_in_place(cache, input, mode);
        }
        let (b, s) = (input.batch, input.seq);
        let oc = cache
            .inner
            .downcast_mut::<OrtCache>()
            .ok_or(Error::ForeignSequence)?;
        let mut feed: Vec<(Cow<'_, str>, SessionInputValue<'_>)> =
            Vec::with_capacity(3 + oc.values.len());
        let t = |v: Vec<i64>, cols: usize| -> Result<SessionInputValue<'static>> {
            Ok(Tensor::from_array(([b, cols], v))
                .map_err(backend_err)?
                .into())
        };
        feed.push(("input_ids".into(), t(input.input_ids.clone(), s)?));
        feed.push((
            "attention_mask".into(),
            t(input.attention_mask.clone(), cache.past + s)?,
        ));
        feed.push(("position_ids".into(), t(input.position_ids.clone(), s)?));
        for (name, v) in self.past_names.iter().zip(oc.values.iter()) {
            feed.push((Cow::Borrowed(name.as_str()), v.into()));
        }
        // Last position only: the graph slices before the vocabulary projection and returns
        // one row per batch row.
        let keep_last = match (&self.logits_to_keep, mode) {
            (Some(name), LogitsMode::Last) => {
                let one = Tensor::from_array(((), vec![1i64])).map_err(backend_err)?;
                feed.push((Cow::Borrowed(name.as_str()), one.into()));
                true
            }
            _ => false,
        };
        let mut session = self.sessions.checkout()?;
        let mut out = session.session()?.run(feed).map_err(backend_err)?;
        let logits = out
            .remove("logits")
            .ok_or_else(|| backend_err("no `logits` output"))?;
        let mut values = Vec::with_capacity(self.present_names.len());
        for name in &self.present_names {
            values.push(
                out.remove(name)
                    .ok_or_else(|| backend_err(format!("no `{name}` output")))?,
            );
        }
        drop(out);
        drop(session);
        let logits = logits_of(&logits, b, s, mode, keep_last)?;
        oc.values = values;
        cache.past += s;
        Ok(logits)
    }

    fn truncate_cache(&self, cache: &mut BatchCache, len: usize) -> Result<()> {
        if len >= cache.past {
            return Ok(());
        }
        if cache.inner.is::<InPlaceCache>() {
            // Positions from `len` on become stale; the next call overwrites them.
            cache.past = len;
            return Ok(());
        }
        // Keeping the first `len` positions is dropping the last ones: re-lay each row.
        let (b, past) = (cache.batch, cache.past);
        let oc = cache
            .inner
            .downcast_mut::<OrtCache>()
            .ok_or(Error::ForeignSequence)?;
        oc.values = self.kept_values(oc, b, past, len)?;
        cache.past = len;
        Ok(())
    }

    fn copy_cache(&self, cache: &BatchCache, len: usize) -> Result<BatchCache> {
        let (batch, len) = (cache.batch, len.min(cache.past));
        let inner: Box<dyn Any + Send> =
            if let Some(ip) = cache.inner.downcast_ref::<InPlaceCache>() {
                if ip.capacity == 0 {
                    Box::new(InPlaceCache {
                        buffers: Vec::new(),
                        capacity: 0,
                    })
                } else {
                    Box::new(self.copy_in_place(ip, len, ip.capacity)?)
                }
            } else {
                let oc = cache
                    .inner
                    .downcast_ref::<OrtCache>()
                    .ok_or(Error::ForeignSequence)?;
                Box::new(OrtCache {
                    values: self.kept_values(oc, batch, cache.past, len)?,
                })
            };
        Ok(BatchCache {
            batch,
            past: len,
            inner,
        })
    }

    fn pad_front(&self, cache: &mut BatchCache, n: usize) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        self.relayout(cache, 0, n)
    }

    fn trim_front(&self, cache: &mut BatchCache, n: usize) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        if n > cache.past {
            return Err(Error::Misuse {
                call: "BatchDecoder::trim_front",
                problem: format!("{n} positions asked, the cache holds {}", cache.past),
            });
        }
        self.relayout(cache, n, 0)
    }

    fn place_row(&self, dst: &mut BatchCache, row: usize, src: &BatchCache) -> Result<()> {
        crate::backend::check_place(dst, row, src)?;
        let (dp, sp) = (dst.past, src.past);
        let (heads, d) = (self.kv_heads, self.head_dim);
        let sc = src
            .inner
            .downcast_ref::<OrtCache>()
            .ok_or_else(not_a_concat_cache)?;
        let dc = dst
            .inner
            .downcast_mut::<OrtCache>()
            .ok_or_else(not_a_concat_cache)?;
        for (dv, sv) in dc.values.iter_mut().zip(&sc.values) {
            if self.cache_f16 {
                let (_, x) = sv.try_extract_tensor::<half::f16>().map_err(backend_err)?;
                let (_, y) = dv
                    .try_extract_tensor_mut::<half::f16>()
                    .map_err(backend_err)?;
                place_rows(y, x, row, heads, dp, sp, d);
            } else {
                let (_, x) = sv.try_extract_tensor::<f32>().map_err(backend_err)?;
                let (_, y) = dv.try_extract_tensor_mut::<f32>().map_err(backend_err)?;
                place_rows(y, x, row, heads, dp, sp, d);
            }
        }
        Ok(())
    }

    fn select_rows(&self, cache: &BatchCache, rows: &[Option<usize>]) -> Result<BatchCache> {
        crate::backend::check_select(cache, rows)?;
        let oc = cache
            .inner
            .downcast_ref::<OrtCache>()
            .ok_or_else(not_a_concat_cache)?;
        let (heads, d, past) = (self.kv_heads, self.head_dim, cache.past);
        let block = heads * past * d;
        let shape = [rows.len(), heads, past, d];
        let mut values = Vec::with_capacity(oc.values.len());
        for v in &oc.values {
            values.push(if self.cache_f16 {
                let (_, x) = v.try_extract_tensor::<half::f16>().map_err(backend_err)?;
                self.tensor(shape, crate::backend::select_blocks(x, block, rows))?
            } else {
                let (_, x) = v.try_extract_tensor::<f32>().map_err(backend_err)?;
                self.tensor(shape, crate::backend::select_blocks(x, block, rows))?
            });
        }
        Ok(BatchCache {
            batch: rows.len(),
            past,
            inner: Box::new(OrtCache { values }),
        })
    }
}
