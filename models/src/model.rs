//! The Llama-family decoder in candle: RMSNorm, RoPE (HF half-rotation layout), grouped-query
//! attention and a SwiGLU MLP, with HF tensor names.
//!
//! Every op used here has a backward pass in candle, so [`Llama::forward`] is differentiable with
//! respect to every weight (the fused `candle_nn::ops::rms_norm` / `rotary_emb::rope` kernels are
//! avoided on purpose: they have no backward).

use candle_core::{DType, Device, Tensor, D};

use crate::config::LlamaConfig;
use crate::error::{Error, Result};
use crate::weights::Weights;

/// Additive mask value for positions a query may not attend to. Finite so that a fully masked row
/// (a left-padding query) gives a uniform distribution instead of NaN.
const MASKED: f32 = -1e9;

struct Attention {
    q_proj: Tensor,
    k_proj: Tensor,
    v_proj: Tensor,
    o_proj: Tensor,
}

struct Mlp {
    gate_proj: Tensor,
    up_proj: Tensor,
    down_proj: Tensor,
}

struct Layer {
    input_layernorm: Tensor,
    attn: Attention,
    post_attention_layernorm: Tensor,
    mlp: Mlp,
}

/// Key/value cache for incremental decoding: per layer `[batch, kv_heads, past, head_dim]`, plus
/// the validity of every cached position per row (for left-padded batches).
#[derive(Clone)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    valid: Vec<Vec<bool>>,
    next_pos: Vec<u32>,
}

impl KvCache {
    /// Number of cached positions.
    pub fn len(&self) -> usize {
        self.valid.first().map(|v| v.len()).unwrap_or(0)
    }

    /// Whether nothing is cached yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Drops cached positions after the first `len` (keeps a shared prefix).
    pub fn truncate(&mut self, len: usize) -> Result<()> {
        if len >= self.len() {
            return Ok(());
        }
        for (k, v) in self.layers.iter_mut().flatten() {
            *k = k.narrow(2, 0, len)?;
            *v = v.narrow(2, 0, len)?;
        }
        for (row, pos) in self.valid.iter_mut().zip(self.next_pos.iter_mut()) {
            row.truncate(len);
            *pos = row.iter().filter(|&&b| b).count() as u32;
        }
        Ok(())
    }
}

/// A Llama-family causal language model.
pub struct Llama {
    cfg: LlamaConfig,
    embed_tokens: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: Tensor,
    cos: Tensor,
    sin: Tensor,
    device: Device,
    dtype: DType,
}

impl Llama {
    /// Builds the model from named weights (HF names). Missing or mis-shaped tensors are errors
    /// that name the tensor. `lm_head.weight` may be absent when embeddings are tied.
    pub fn new(cfg: &LlamaConfig, w: &Weights) -> Result<Self> {
        let h = cfg.hidden_size;
        let d = cfg.head_size();
        let nh = cfg.num_attention_heads;
        let kv = cfg.kv_heads();
        let i = cfg.intermediate_size;
        let embed_tokens = w.get("model.embed_tokens.weight", &[cfg.vocab_size, h])?;
        let device = embed_tokens.device().clone();
        let dtype = embed_tokens.dtype();
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for l in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{l}");
            layers.push(Layer {
                input_layernorm: w.get(&format!("{p}.input_layernorm.weight"), &[h])?,
                attn: Attention {
                    q_proj: w.get(&format!("{p}.self_attn.q_proj.weight"), &[nh * d, h])?,
                    k_proj: w.get(&format!("{p}.self_attn.k_proj.weight"), &[kv * d, h])?,
                    v_proj: w.get(&format!("{p}.self_attn.v_proj.weight"), &[kv * d, h])?,
                    o_proj: w.get(&format!("{p}.self_attn.o_proj.weight"), &[h, nh * d])?,
                },
                post_attention_layernorm: w
                    .get(&format!("{p}.post_attention_layernorm.weight"), &[h])?,
                mlp: Mlp {
                    gate_proj: w.get(&format!("{p}.mlp.gate_proj.weight"), &[i, h])?,
                    up_proj: w.get(&format!("{p}.mlp.up_proj.weight"), &[i, h])?,
                    down_proj: w.get(&format!("{p}.mlp.down_proj.weight"), &[h, i])?,
                },
            });
        }
        let norm = w.get("model.norm.weight", &[h])?;
        let lm_head = if cfg.tie_word_embeddings {
            embed_tokens.clone()
        } else {
            w.get("lm_head.weight", &[cfg.vocab_size, h])?
        };
        let (cos, sin) = rope_tables(cfg, &device, dtype)?;
        Ok(Llama {
            cfg: cfg.clone(),
            embed_tokens,
            layers,
            norm,
            lm_head,
            cos,
            sin,
            device,
            dtype,
        })
    }

    /// The config the model was built from.
    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    /// The device of the weights.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The dtype of the weights (activations use it too).
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// An empty cache for a batch of `batch` rows.
    pub fn new_cache(&self, batch: usize) -> KvCache {
        KvCache {
            layers: (0..self.cfg.num_hidden_layers).map(|_| None).collect(),
            valid: vec![Vec::new(); batch],
            next_pos: vec![0; batch],
        }
    }

    /// Full-sequence logits `[batch, seq, vocab]` (differentiable).
    ///
    /// `input_ids` is `[batch, seq]` (u32 or i64); `attention_mask` (same shape, 1 = token,
    /// 0 = padding) is optional. Positions count real tokens only (`cumsum(mask) - 1`), as HF
    /// does, so left padding does not shift the positions of a row.
    pub fn forward(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>) -> Result<Tensor> {
        let mut cache = self.new_cache(input_ids.dim(0)?);
        self.forward_impl(input_ids, attention_mask, &mut cache, false)
    }

    /// Logits `[batch, seq, vocab]` for new tokens appended after what `cache` holds; the cache
    /// is extended. `attention_mask` (optional, `[batch, seq]`) marks padding among the new
    /// tokens.
    pub fn forward_cached(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        self.forward_impl(input_ids, attention_mask, cache, true)
    }

    fn forward_impl(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        cache: &mut KvCache,
        keep: bool,
    ) -> Result<Tensor> {
        let (b, s) = input_ids.dims2().map_err(|_| {
            Error::Input(format!(
                "input_ids must be [batch, seq], got {:?}",
                input_ids.dims()
            ))
        })?;
        if cache.valid.len() != b {
            return Err(Error::Input(format!(
                "cache was made for batch {}, input has batch {b}",
                cache.valid.len()
            )));
        }
        let ids: Vec<u32> = input_ids.to_dtype(DType::U32)?.flatten_all()?.to_vec1()?;
        if let Some(&bad) = ids.iter().find(|&&t| t as usize >= self.cfg.vocab_size) {
            return Err(Error::Input(format!(
                "token id {bad} out of range for vocab size {}",
                self.cfg.vocab_size
            )));
        }
        let new_valid: Vec<Vec<bool>> = match attention_mask {
            Some(m) => {
                if m.dims() != [b, s] {
                    return Err(Error::Input(format!(
                        "attention_mask must be [{b}, {s}], got {:?}",
                        m.dims()
                    )));
                }
                m.to_dtype(DType::U32)?
                    .to_vec2::<u32>()?
                    .into_iter()
                    .map(|r| r.into_iter().map(|x| x != 0).collect())
                    .collect()
            }
            None => vec![vec![true; s]; b],
        };
        let past = cache.len();
        if past + s > self.cfg.max_position_embeddings {
            return Err(Error::Input(format!(
                "sequence of {} tokens exceeds max_position_embeddings {}",
                past + s,
                self.cfg.max_position_embeddings
            )));
        }
        // Positions (real tokens counted per row) and the additive mask, built on the host.
        let mut positions = Vec::with_capacity(b * s);
        let mut next_pos = cache.next_pos.clone();
        let mut valid = cache.valid.clone();
        for ((row, pos), held) in new_valid
            .iter()
            .zip(next_pos.iter_mut())
            .zip(valid.iter_mut())
        {
            for &v in row {
                positions.push(if v { *pos } else { 0 });
                if v {
                    *pos += 1;
                }
                held.push(v);
            }
        }
        if let Some(&p) = positions.iter().max() {
            if p as usize >= self.cfg.max_position_embeddings {
                return Err(Error::Input(format!(
                    "position {p} exceeds max_position_embeddings {}",
                    self.cfg.max_position_embeddings
                )));
            }
        }
        let total = past + s;
        let need_mask = s > 1 || valid.iter().any(|r| r.iter().any(|&v| !v));
        let mask = if need_mask {
            let mut m = vec![0f32; b * s * total];
            for r in 0..b {
                for i in 0..s {
                    for j in 0..total {
                        let causal = j <= past + i;
                        if !(causal && valid[r][j]) {
                            m[(r * s + i) * total + j] = MASKED;
                        }
                    }
                }
            }
            Some(Tensor::from_vec(m, (b, 1, s, total), &self.device)?.to_dtype(self.dtype)?)
        } else {
            None
        };
        let pos = Tensor::from_vec(positions, b * s, &self.device)?;
        let half = self.cfg.head_size() / 2;
        let cos = self.cos.index_select(&pos, 0)?.reshape((b, 1, s, half))?;
        let sin = self.sin.index_select(&pos, 0)?.reshape((b, 1, s, half))?;
        let cos = Tensor::cat(&[&cos, &cos], D::Minus1)?;
        let sin = Tensor::cat(&[&sin, &sin], D::Minus1)?;

        let ids_t = Tensor::from_vec(ids, b * s, &self.device)?;
        let mut x =
            self.embed_tokens
                .index_select(&ids_t, 0)?
                .reshape((b, s, self.cfg.hidden_size))?;
        for (l, layer) in self.layers.iter().enumerate() {
            let residual = &x;
            let hn = rms_norm(&x, &layer.input_layernorm, self.cfg.rms_norm_eps)?;
            let a = self.attention(
                &layer.attn,
                &hn,
                &cos,
                &sin,
                mask.as_ref(),
                &mut cache.layers[l],
                keep,
            )?;
            let x1 = (residual + a)?;
            let hn = rms_norm(&x1, &layer.post_attention_layernorm, self.cfg.rms_norm_eps)?;
            let m = mlp(&layer.mlp, &hn)?;
            x = (x1 + m)?;
        }
        let x = rms_norm(&x, &self.norm, self.cfg.rms_norm_eps)?;
        let logits = linear(&x, &self.lm_head)?;
        if keep {
            cache.valid = valid;
            cache.next_pos = next_pos;
        }
        Ok(logits)
    }

    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        a: &Attention,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: Option<&Tensor>,
        cache: &mut Option<(Tensor, Tensor)>,
        keep: bool,
    ) -> Result<Tensor> {
        let (b, s, _) = x.dims3()?;
        let nh = self.cfg.num_attention_heads;
        let kvh = self.cfg.kv_heads();
        let d = self.cfg.head_size();
        let q = linear(x, &a.q_proj)?
            .reshape((b, s, nh, d))?
            .transpose(1, 2)?
            .contiguous()?;
        let k = linear(x, &a.k_proj)?
            .reshape((b, s, kvh, d))?
            .transpose(1, 2)?
            .contiguous()?;
        let v = linear(x, &a.v_proj)?
            .reshape((b, s, kvh, d))?
            .transpose(1, 2)?
            .contiguous()?;
        let q = apply_rope(&q, cos, sin)?;
        let k = apply_rope(&k, cos, sin)?;
        let (k, v) = match cache.as_ref() {
            Some((pk, pv)) => (
                Tensor::cat(&[pk, &k], 2)?.contiguous()?,
                Tensor::cat(&[pv, &v], 2)?.contiguous()?,
            ),
            None => (k, v),
        };
        if keep {
            *cache = Some((k.clone(), v.clone()));
        }
        let k = repeat_kv(&k, nh / kvh)?;
        let v = repeat_kv(&v, nh / kvh)?;
        let scale = 1.0 / (d as f64).sqrt();
        let mut att = (q.matmul(&k.t()?.contiguous()?)? * scale)?;
        if let Some(m) = mask {
            att = att.broadcast_add(m)?;
        }
        let att = candle_nn::ops::softmax(&att, D::Minus1)?;
        let y = att.matmul(&v)?;
        let y = y.transpose(1, 2)?.reshape((b, s, nh * d))?;
        linear(&y, &a.o_proj)
    }
}

/// `x @ w^T` for `x` of any rank and `w` `[out, in]`: the leading dimensions are flattened so
/// that forward and backward are each one large GEMM (a broadcast batched matmul would
/// materialize a per-batch weight gradient and sum it).
fn linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let dims = x.dims();
    let Some((&inner, lead)) = dims.split_last() else {
        return Ok(x.broadcast_matmul(&w.t()?)?);
    };
    if lead.len() <= 1 {
        return Ok(x.matmul(&w.t()?)?);
    }
    let rows: usize = lead.iter().product();
    let y = x.reshape((rows, inner))?.matmul(&w.t()?)?;
    let mut out = lead.to_vec();
    out.push(w.dim(0)?);
    Ok(y.reshape(out)?)
}

/// RMSNorm in f32 (statistics kept in f32 whatever the weight dtype), built from differentiable
/// ops: `x / sqrt(mean(x^2) + eps) * w`.
fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let xf = x.to_dtype(DType::F32)?;
    let var = xf.sqr()?.mean_keepdim(D::Minus1)?;
    let xn = xf.broadcast_div(&(var + eps)?.sqrt()?)?;
    Ok(xn.to_dtype(dtype)?.broadcast_mul(w)?)
}

fn mlp(m: &Mlp, x: &Tensor) -> Result<Tensor> {
    let g = linear(x, &m.gate_proj)?.silu()?;
    let u = linear(x, &m.up_proj)?;
    linear(&(g * u)?, &m.down_proj)
}

/// HF's `rotate_half` layout: `x * cos + cat(-x2, x1) * sin`.
fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, d / 2)?;
    let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
    let rot = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    Ok((x.broadcast_mul(cos)? + rot.broadcast_mul(sin)?)?)
}

fn repeat_kv(x: &Tensor, n_rep: usize) -> Result<Tensor> {
    if n_rep == 1 {
        return Ok(x.clone());
    }
    let (b, kv, t, d) = x.dims4()?;
    Ok(x.unsqueeze(2)?
        .expand((b, kv, n_rep, t, d))?
        .reshape((b, kv * n_rep, t, d))?)
}

/// cos / sin tables `[max_position_embeddings, head_dim / 2]`.
pub(crate) fn rope_tables(
    cfg: &LlamaConfig,
    device: &Device,
    dtype: DType,
) -> Result<(Tensor, Tensor)> {
    let inv = cfg.inv_freq();
    let n = cfg.max_position_embeddings;
    let half = inv.len();
    let mut cos = Vec::with_capacity(n * half);
    let mut sin = Vec::with_capacity(n * half);
    for p in 0..n {
        for &f in &inv {
            let a = p as f32 * f;
            cos.push(a.cos());
            sin.push(a.sin());
        }
    }
    let cos = Tensor::from_vec(cos, (n, half), device)?.to_dtype(dtype)?;
    let sin = Tensor::from_vec(sin, (n, half), device)?.to_dtype(dtype)?;
    Ok((cos, sin))
}
