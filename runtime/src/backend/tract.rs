//! The tract backend (pure Rust, CPU, no shared library).
//!
//! The graph is loaded with its inputs typed by three symbols (`B` batch, `S` new tokens, `P`
//! cached positions; `attention_mask` is `[B, P+S]`), optimized once at load, and run with the
//! symbols resolved from each call's inputs. A run needs only `&self` (tract spawns a fresh
//! state per call), so the generator is `Send + Sync` without a lock. The cache holds the
//! `present.*` values of the last call (reference-counted tensors, fed back without a copy).

use std::path::Path;
use std::sync::Arc;

use tract_onnx::prelude::{
    tvec, DatumType, Framework, InferenceFact, InferenceModelExt, IntoRunnable, IntoTValue,
    IntoTensor, TDim, TValue, Tensor, TypedRunnableModel,
};

use super::{
    append_single, check_io, fork_single, truncate_single, BatchCache, BatchDecoder, BatchInput,
};
use crate::error::{Error, Result};
use crate::generator::{Generator, GeneratorInfo, Logits, LogitsMode, Sequence};
use crate::manifest::Manifest;

fn backend_err(message: impl std::fmt::Display) -> Error {
    Error::Backend {
        backend: "tract",
        message: message.to_string(),
    }
}

/// A model running on tract.
pub struct TractGenerator {
    plan: Arc<TypedRunnableModel>,
    info: GeneratorInfo,
    cache_dt: DatumType,
    kv_heads: usize,
    head_dim: usize,
    /// Position of `input_ids`, `attention_mask`, `position_ids`, then the past values, in the
    /// plan's inputs.
    input_order: Vec<usize>,
    /// Index in the plan's outputs of `logits`, then the present values (manifest order).
    output_order: Vec<usize>,
    n_inputs: usize,
}

struct TractCache {
    values: Vec<TValue>,
}

impl TractGenerator {
    /// Loads, types and optimizes `model`.
    pub fn load(model: &Path, manifest: &Manifest) -> Result<Self> {
        let bad = |e: tract_onnx::prelude::TractError| Error::Model {
            path: model.to_path_buf(),
            message: format!("tract cannot load the graph: {e:#}"),
        };
        // tract 0.23's `DequantizeLinear` rejects `block_size`; its `MatMulNBits` reads 4-bit
        // (and 2-bit) weights only, and on steper's 4-bit block-32 exports its result disagrees
        // with the dequantized weights (relative logit error ≈ 1.8 where ONNX Runtime is within
        // 10 %). Refuse rather than run a graph it cannot run, or runs wrongly.
        if !manifest.graph.attention.is_standard() {
            return Err(Error::Model {
                path: model.to_path_buf(),
                message: format!(
                    "tract cannot run this export: its attention is ONNX Runtime's `com.microsoft.GroupQueryAttention` contrib operator (steper.json graph.attention = {:?}), which tract does not implement — run it on the ort backend, or re-export with --attention standard for tract",
                    manifest.graph.attention.as_str()
                ),
            });
        }
        if let Some(q) = &manifest.quantization {
            return Err(Error::Model {
                path: model.to_path_buf(),
                message: format!(
                    "tract 0.23 cannot run this export: its linear layers (the first is `model.layers.0.self_attn.q_proj`) are {}-bit `{}` (--target {}), which tract rejects (DequantizeLinear block_size, 8-bit MatMulNBits) or computes wrongly (4-bit MatMulNBits) — run it on the ort backend, or use a float export on tract",
                    q.bits, q.op, q.target
                ),
            });
        }
        // `logits_to_keep` (manifest `graph.logits_to_keep`) is an initializer-backed input, which
        // tract folds as a constant (its default 0 = every position): `LogitsMode::Last` below
        // takes the last row itself.
        let mut m = tract_onnx::onnx().model_for_path(model).map_err(bad)?;
        let in_names: Vec<String> = m
            .input_outlets()
            .map_err(bad)?
            .iter()
            .map(|o| m.node(o.node).name.clone())
            .collect();
        let out_names: Vec<String> = m
            .output_outlets()
            .map_err(bad)?
            .iter()
            .map(|o| {
                m.outlet_label(*o)
                    .map(|s| s.to_string())
                    .unwrap_or_else(|| m.node(o.node).name.clone())
            })
            .collect();
        check_io(model, manifest, &in_names, &out_names)?;
        let g = &manifest.graph;
        let cache_dt = if manifest.dtype == "fp16" {
            DatumType::F16
        } else {
            DatumType::F32
        };
        let b = TDim::from(m.symbols.sym("B"));
        let s = TDim::from(m.symbols.sym("S"));
        let p = TDim::from(m.symbols.sym("P"));
        for (i, name) in in_names.iter().enumerate() {
            let fact = match name.as_str() {
                "input_ids" | "position_ids" => {
                    InferenceFact::dt_shape(DatumType::I64, tvec![b.clone(), s.clone()])
                }
                "attention_mask" => {
                    InferenceFact::dt_shape(DatumType::I64, tvec![b.clone(), p.clone() + s.clone()])
                }
                _ => InferenceFact::dt_shape(
                    cache_dt,
                    tvec![
                        b.clone(),
                        TDim::from(g.num_kv_heads as i64),
                        p.clone(),
                        TDim::from(g.head_dim as i64)
                    ],
                ),
            };
            m.set_input_fact(i, fact).map_err(bad)?;
        }
        for i in 0..out_names.len() {
            m.set_output_fact(i, InferenceFact::default())
                .map_err(bad)?;
        }
        let plan = m
            .into_optimized()
            .map_err(bad)?
            .into_runnable()
            .map_err(bad)?;
        let pos = |names: &[String], want: &str| -> Result<usize> {
            names
                .iter()
                .position(|n| n == want)
                .ok_or_else(|| Error::Model {
                    path: model.to_path_buf(),
                    message: format!("graph has no `{want}`"),
                })
        };
        let input_order = g
            .inputs
            .iter()
            .map(|n| pos(&in_names, n))
            .collect::<Result<Vec<_>>>()?;
        let output_order = g
            .outputs
            .iter()
            .map(|n| pos(&out_names, n))
            .collect::<Result<Vec<_>>>()?;
        Ok(TractGenerator {
            plan,
            info: GeneratorInfo::new("tract", g.vocab_size, manifest.context_length)
                .with_providers(["tract-cpu"]),
            cache_dt,
            kv_heads: g.num_kv_heads,
            head_dim: g.head_dim,
            n_inputs: in_names.len(),
            input_order,
            output_order,
        })
    }
}

impl TractGenerator {
    /// A cache value of no position.
    fn empty_value(&self, batch: usize) -> Result<TValue> {
        Ok(
            Tensor::zero_dt(self.cache_dt, &[batch, self.kv_heads, 0, self.head_dim])
                .map_err(backend_err)?
                .into_tvalue(),
        )
    }

    /// The first `len` positions of a cache value (tract refuses an empty slice range).
    fn kept(&self, v: &TValue, batch: usize, len: usize) -> Result<TValue> {
        if len == 0 {
            return self.empty_value(batch);
        }
        Ok(v.slice(2, 0, len).map_err(backend_err)?.into_tvalue())
    }
}

impl BatchDecoder for TractGenerator {
    fn new_cache(&self, batch: usize) -> Result<BatchCache> {
        let empty = self.empty_value(batch)?;
        Ok(BatchCache {
            batch,
            past: 0,
            inner: Box::new(TractCache {
                values: vec![empty; self.output_order.len() - 1],
            }),
        })
    }

    fn step(&self, cache: &mut BatchCache, input: &BatchInput, mode: LogitsMode) -> Result<Logits> {
        input.check(cache.past, cache.batch)?;
        let (b, s) = (input.batch, input.seq);
        let tc = cache
            .inner
            .downcast_mut::<TractCache>()
            .ok_or(Error::ForeignSequence)?;
        let t = |v: &[i64], cols: usize| -> Result<TValue> {
            Ok(Tensor::from_shape(&[b, cols], v)
                .map_err(backend_err)?
                .into_tvalue())
        };
        let mut ordered: Vec<Option<TValue>> = vec![None; self.n_inputs];
        ordered[self.input_order[0]] = Some(t(&input.input_ids, s)?);
        ordered[self.input_order[1]] = Some(t(&input.attention_mask, cache.past + s)?);
        ordered[self.input_order[2]] = Some(t(&input.position_ids, s)?);
        for (k, v) in tc.values.iter().enumerate() {
            ordered[self.input_order[3 + k]] = Some(v.clone());
        }
        let inputs = ordered
            .into_iter()
            .map(|v| v.ok_or_else(|| backend_err("graph input not fed")))
            .collect::<Result<_>>()?;
        let out = self
            .plan
            .run(inputs)
            .map_err(|e| backend_err(format!("{e:#}")))?;
        let logits = &out[self.output_order[0]];
        let view = logits.to_plain_array_view::<f32>().map_err(backend_err)?;
        let vocab = *view.shape().last().unwrap_or(&0);
        let all: Vec<f32> = view.iter().copied().collect();
        let logits = match mode {
            LogitsMode::All => Logits {
                rows: b * s,
                vocab,
                data: all,
            },
            LogitsMode::Last => {
                let mut v = Vec::with_capacity(b * vocab);
                for r in 0..b {
                    let off = (r * s + s - 1) * vocab;
                    v.extend_from_slice(&all[off..off + vocab]);
                }
                Logits {
                    rows: b,
                    vocab,
                    data: v,
                }
            }
        };
        tc.values = self.output_order[1..]
            .iter()
            .map(|&i| out[i].clone())
            .collect();
        cache.past += s;
        Ok(logits)
    }

    fn truncate_cache(&self, cache: &mut BatchCache, len: usize) -> Result<()> {
        if len >= cache.past {
            return Ok(());
        }
        let tc = cache
            .inner
            .downcast_mut::<TractCache>()
            .ok_or(Error::ForeignSequence)?;
        let batch = cache.batch;
        for v in tc.values.iter_mut() {
            *v = self.kept(v, batch, len)?;
        }
        cache.past = len;
        Ok(())
    }

    fn copy_cache(&self, cache: &BatchCache, len: usize) -> Result<BatchCache> {
        let len = len.min(cache.past);
        let tc = cache
            .inner
            .downcast_ref::<TractCache>()
            .ok_or(Error::ForeignSequence)?;
        // Values are immutable once made (a call replaces them), so the full-length ones can
        // be shared.
        let values = tc
            .values
            .iter()
            .map(|v| {
                if len == cache.past {
                    Ok(v.clone())
                } else {
                    self.kept(v, cache.batch, len)
                }
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(BatchCache {
            batch: cache.batch,
            past: len,
            inner: Box::new(TractCache { values }),
        })
    }

    fn pad_front(&self, cache: &mut BatchCache, n: usize) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        let b = cache.batch;
        let tc = cache
            .inner
            .downcast_mut::<TractCache>()
            .ok_or(Error::ForeignSequence)?;
        let zeros = Tensor::zero_dt(self.cache_dt, &[b, self.kv_heads, n, self.head_dim])
            .map_err(backend_err)?;
        for v in tc.values.iter_mut() {
            let t = Tensor::stack_tensors(2, &[zeros.clone(), v.clone().into_tensor()])
                .map_err(backend_err)?;
            *v = t.into_tvalue();
        }
        cache.past += n;
        Ok(())
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
        let past = cache.past;
        let tc = cache
            .inner
            .downcast_mut::<TractCache>()
            .ok_or(Error::ForeignSequence)?;
        for v in tc.values.iter_mut() {
            *v = v.slice(2, n, past).map_err(backend_err)?.into_tvalue();
        }
        cache.past = past - n;
        Ok(())
    }

    fn place_row(&self, dst: &mut BatchCache, row: usize, src: &BatchCache) -> Result<()> {
        super::check_place(dst, row, src)?;
        let (dp, sp) = (dst.past, src.past);
        let sc = src
            .inner
            .downcast_ref::<TractCache>()
            .ok_or(Error::ForeignSequence)?;
        let dc = dst
            .inner
            .downcast_mut::<TractCache>()
            .ok_or(Error::ForeignSequence)?;
        for (dv, sv) in dc.values.iter_mut().zip(&sc.values) {
            let mut t = dv.clone().into_tensor();
            let shape = RowShape {
                row,
                heads: self.kv_heads,
                dp,
                sp,
                dim: self.head_dim,
            };
            if self.cache_dt == DatumType::F16 {
                place::<tract_onnx::prelude::f16>(&mut t, sv, &shape)?;
            } else {
                place::<f32>(&mut t, sv, &shape)?;
            }
            *dv = t.into_tvalue();
        }
        Ok(())
    }

    fn select_rows(&self, cache: &BatchCache, rows: &[Option<usize>]) -> Result<BatchCache> {
        super::check_select(cache, rows)?;
        let tc = cache
            .inner
            .downcast_ref::<TractCache>()
            .ok_or(Error::ForeignSequence)?;
        let zero = Tensor::zero_dt(
            self.cache_dt,
            &[1, self.kv_heads, cache.past, self.head_dim],
        )
        .map_err(backend_err)?;
        let mut values = Vec::with_capacity(tc.values.len());
        for v in &tc.values {
            let parts = rows
                .iter()
                .map(|r| match r {
                    Some(r) => Ok(v.slice(0, *r, r + 1).map_err(backend_err)?),
                    None => Ok(zero.clone()),
                })
                .collect::<Result<Vec<Tensor>>>()?;
            values.push(
                Tensor::stack_tensors(0, &parts)
                    .map_err(backend_err)?
                    .into_tvalue(),
            );
        }
        Ok(BatchCache {
            batch: rows.len(),
            past: cache.past,
            inner: Box::new(TractCache { values }),
        })
    }
}

/// Where [`place`] copies a batch-1 cache.
struct RowShape {
    row: usize,
    heads: usize,
    dp: usize,
    sp: usize,
    dim: usize,
}

/// Copies `src` (`[1, heads, sp, dim]`) into row `row` of `dst` (`[batch, heads, dp, dim]`),
/// ending at its last position.
fn place<T: tract_onnx::prelude::Datum + Copy>(
    dst: &mut Tensor,
    src: &Tensor,
    at: &RowShape,
) -> Result<()> {
    let not_plain = || backend_err("cache tensor is not contiguous");
    let s = src.to_plain_array_view::<T>().map_err(backend_err)?;
    let s = s.as_slice().ok_or_else(not_plain)?;
    let mut dv = dst.to_plain_array_view_mut::<T>().map_err(backend_err)?;
    let d = dv.as_slice_mut().ok_or_else(not_plain)?;
    let (sp, dim) = (at.sp, at.dim);
    for h in 0..at.heads {
        let o = ((at.row * at.heads + h) * at.dp + at.dp - sp) * dim;
        d[o..o + sp * dim].copy_from_slice(&s[h * sp * dim..(h + 1) * sp * dim]);
    }
    Ok(())
}

impl Generator for TractGenerator {
    fn info(&self) -> &GeneratorInfo {
        &self.info
    }

    fn new_sequence(&self) -> Result<Sequence> {
        Ok(Sequence::new(Box::new(self.new_cache(1)?)))
    }

    fn append(&self, seq: &mut Sequence, tokens: &[u32], mode: LogitsMode) -> Result<Logits> {
        append_single(self, self.info.context_length, seq, tokens, mode)
    }

    fn truncate(&self, seq: &mut Sequence, len: usize) -> Result<()> {
        truncate_single(self, seq, len)
    }

    fn fork(&self, seq: &Sequence, len: usize) -> Result<Sequence> {
        fork_single(self, seq, len)
    }

    fn batch_decoder(&self) -> Option<&dyn BatchDecoder> {
        Some(self)
    }
}
