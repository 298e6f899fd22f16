//! The Llama-shaped decoder in candle: RMSNorm, RoPE (HF half-rotation layout), grouped-query
//! attention and a SwiGLU MLP, with HF tensor names; the projections that carry a bias (Qwen2's
//! q/k/v) are those of the config's family ([`crate::arch`]).
//!
//! Every op used here has a backward pass, so [`Llama::forward`] is differentiable with respect
//! to every weight: RMSNorm, softmax and RoPE are the fused kernels of [`crate::ops`], which carry
//! their own backward (candle-nn's fused `ops::rms_norm` / `softmax_last_dim` /
//! `rotary_emb::rope` have none and are not used). On the CPU in f32, attention is the fused,
//! causally tiled kernel of [`crate::attention`]; elsewhere the composed form (`repeat_kv`,
//! matmul, masked softmax, matmul) runs.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use crate::arch::Projection;
use crate::attention::KeyMask;

use crate::config::LlamaConfig;
use crate::error::{Error, Result};
use crate::ops::Kernels;
use crate::weights::Weights;

/// Additive mask value for positions a query may not attend to. Finite so that a fully masked row
/// (a left-padding query) gives a uniform distribution instead of NaN.
const MASKED: f32 = -1e9;

/// A projection `x @ w^T (+ bias)`, optionally with a LoRA adapter: `+ scale · (x @ a^T) @ b^T`.
struct Proj {
    w: Tensor,
    bias: Option<Tensor>,
    lora: Option<(Tensor, Tensor, f64)>,
}

impl Proj {
    /// The weight of `p` in layer `l` (and its bias where the family has one), shape-checked.
    fn load(cfg: &LlamaConfig, w: &Weights, l: usize, p: Projection) -> Result<Self> {
        let (out, inp) = p.shape(cfg);
        let bias = if cfg.family().has_bias(cfg, p) {
            Some(w.get(&p.bias_name(l), &[out])?)
        } else {
            None
        };
        Ok(Proj {
            w: w.get(&p.weight_name(l), &[out, inp])?,
            bias,
            lora: None,
        })
    }

    fn forward(&self, x: &Tensor, k: Kernels) -> Result<Tensor> {
        let y = linear(x, &self.w, k)?;
        let y = match &self.bias {
            None => y,
            Some(b) => y.broadcast_add(b)?,
        };
        match &self.lora {
            None => Ok(y),
            // The scale on the `[.., r]` intermediate: r columns instead of `out`.
            Some((a, b, scale)) => Ok((y + linear(&(linear(x, a, k)? * *scale)?, b, k)?)?),
        }
    }
}

struct Attention {
    q_proj: Proj,
    k_proj: Proj,
    v_proj: Proj,
    o_proj: Proj,
}

struct Mlp {
    gate_proj: Proj,
    up_proj: Proj,
    down_proj: Proj,
}

struct Layer {
    input_layernorm: Tensor,
    attn: Attention,
    post_attention_layernorm: Tensor,
    mlp: Mlp,
}

impl Layer {
    /// Every projection with its [`Projection`] (the order of [`Projection::ALL`]).
    fn projections_mut(&mut self) -> [(Projection, &mut Proj); 7] {
        [
            (Projection::Q, &mut self.attn.q_proj),
            (Projection::K, &mut self.attn.k_proj),
            (Projection::V, &mut self.attn.v_proj),
            (Projection::O, &mut self.attn.o_proj),
            (Projection::Gate, &mut self.mlp.gate_proj),
            (Projection::Up, &mut self.mlp.up_proj),
            (Projection::Down, &mut self.mlp.down_proj),
        ]
    }
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

/// What every layer needs for one batch: the additive mask and the RoPE tables per position.
struct AttnInputs {
    mask: Option<Tensor>,
    /// The same mask for the fused CPU attention ([`crate::attention`]); `None` off the CPU
    /// or for non-f32 weights, where the composed form runs.
    keys: Option<Arc<KeyMask>>,
    cos: Tensor,
    sin: Tensor,
}

/// A validated training batch ([`Llama::prepare`]): token ids, mask and RoPE tables, shared by
/// [`Llama::embed`] and [`Llama::forward_layers`].
pub struct SeqInputs {
    ids: Tensor,
    batch: usize,
    seq: usize,
    ctx: AttnInputs,
}

impl SeqInputs {
    /// `(batch, seq)`.
    pub fn dims(&self) -> (usize, usize) {
        (self.batch, self.seq)
    }
}

/// A causal language model of any family in [`crate::arch`] (Llama, Qwen2).
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
    kernels: Kernels,
}

impl Llama {
    /// Builds the model from named weights (HF names). Missing or mis-shaped tensors are errors
    /// that name the tensor. `lm_head.weight` may be absent when embeddings are tied.
    pub fn new(cfg: &LlamaConfig, w: &Weights) -> Result<Self> {
        let h = cfg.hidden_size;
        let embed_tokens = w.get("model.embed_tokens.weight", &[cfg.vocab_size, h])?;
        let device = embed_tokens.device().clone();
        let dtype = embed_tokens.dtype();
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for l in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{l}");
            layers.push(Layer {
                input_layernorm: w.get(&format!("{p}.input_layernorm.weight"), &[h])?,
                attn: Attention {
                    q_proj: Proj::load(cfg, w, l, Projection::Q)?,
                    k_proj: Proj::load(cfg, w, l, Projection::K)?,
                    v_proj: Proj::load(cfg, w, l, Projection::V)?,
                    o_proj: Proj::load(cfg, w, l, Projection::O)?,
                },
                post_attention_layernorm: w
                    .get(&format!("{p}.post_attention_layernorm.weight"), &[h])?,
                mlp: Mlp {
                    gate_proj: Proj::load(cfg, w, l, Projection::Gate)?,
                    up_proj: Proj::load(cfg, w, l, Projection::Up)?,
                    down_proj: Proj::load(cfg, w, l, Projection::Down)?,
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
            kernels: Kernels::Auto,
        })
    }

    /// The model with its element-wise chains and attention run by `kernels`:
    /// [`Kernels::Auto`] (the default) runs the fused CPU kernels in f32 on the CPU and candle's
    /// composed ops elsewhere (CUDA, half types); [`Kernels::Composed`] runs the composed ops
    /// everywhere, which on the CPU reproduces what a GPU computes.
    pub fn with_kernels(mut self, kernels: Kernels) -> Self {
        self.kernels = kernels;
        self
    }

    /// The kernels the model runs (see [`Llama::with_kernels`]).
    pub fn kernels(&self) -> Kernels {
        self.kernels
    }

    /// Attaches LoRA adapters (see [`crate::lora`]): every `{proj}.lora_a` `[rank, in]` /
    /// `{proj}.lora_b` `[out, rank]` pair in `adapters` adds `scale · x·aᵀ·bᵀ` to the
    /// projection `{proj}.weight`. An adapter name that matches no projection of the model, or a
    /// pair with one half missing or mis-shaped, is an error naming it.
    pub fn with_lora(mut self, adapters: &Weights, scale: f64) -> Result<Self> {
        let mut used = std::collections::HashSet::new();
        for (l, layer) in self.layers.iter_mut().enumerate() {
            let p = format!("model.layers.{l}");
            for (kind, proj) in layer.projections_mut() {
                let name = kind.module();
                let an = format!("{p}.{name}.lora_a");
                let bn = format!("{p}.{name}.lora_b");
                let a = adapters.tensors().get(&an);
                let b = adapters.tensors().get(&bn);
                match (a, b) {
                    (None, None) => {}
                    (Some(a), Some(b)) => {
                        let (out, inp) = proj.w.dims2()?;
                        let r = a.dim(0)?;
                        if a.dims() != [r, inp] || b.dims() != [out, r] {
                            return Err(Error::Input(format!(
                                "LoRA adapter {p}.{name}: lora_a {:?} / lora_b {:?} do not fit the weight [{out}, {inp}]",
                                a.dims(),
                                b.dims()
                            )));
                        }
                        proj.lora = Some((a.clone(), b.clone(), scale));
                        used.insert(an);
                        used.insert(bn);
                    }
                    _ => {
                        return Err(Error::Input(format!(
                            "LoRA adapter {p}.{name}: lora_a and lora_b must both be present"
                        )))
                    }
                }
            }
        }
        if let Some(stray) = adapters
            .tensors()
            .keys()
            .find(|k| !used.contains(k.as_str()))
        {
            return Err(Error::Input(format!(
                "LoRA adapter `{stray}` matches no projection of the model"
            )));
        }
        Ok(self)
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
        let past = cache.len();
        let mut scratch = KvCache {
            layers: Vec::new(),
            valid: cache.valid.clone(),
            next_pos: cache.next_pos.clone(),
        };
        let (ids, positions, valid) =
            self.check_batch(input_ids, attention_mask, &mut scratch, b, s)?;
        let ctx = self.attention_inputs(&positions, &valid, b, s, past)?;
        let ids_t = Tensor::from_vec(ids, b * s, &self.device)?;
        let mut x =
            self.embed_tokens
                .index_select(&ids_t, 0)?
                .reshape((b, s, self.cfg.hidden_size))?;
        for (l, layer) in self.layers.iter().enumerate() {
            x = self.layer_forward(layer, &x, &ctx, &mut cache.layers[l], keep)?;
        }
        let logits = self.head(&x)?;
        if keep {
            cache.valid = valid;
            cache.next_pos = scratch.next_pos;
        }
        Ok(logits)
    }

    /// Validates a training batch and builds what every layer needs for it: the additive
    /// causal + padding mask and the RoPE tables of each position. No KV cache is involved.
    ///
    /// `input_ids` is `[batch, seq]`; `attention_mask` as in [`Llama::forward`].
    pub fn prepare(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
    ) -> Result<SeqInputs> {
        let mut cache = self.new_cache(input_ids.dim(0)?);
        let (b, s) = input_ids.dims2().map_err(|_| {
            Error::Input(format!(
                "input_ids must be [batch, seq], got {:?}",
                input_ids.dims()
            ))
        })?;
        let (ids, positions, valid) =
            self.check_batch(input_ids, attention_mask, &mut cache, b, s)?;
        let ctx = self.attention_inputs(&positions, &valid, b, s, 0)?;
        Ok(SeqInputs {
            ids: Tensor::from_vec(ids, b * s, &self.device)?,
            batch: b,
            seq: s,
            ctx,
        })
    }

    /// Token embeddings `[batch, seq, hidden]` of a prepared batch.
    pub fn embed(&self, seq: &SeqInputs) -> Result<Tensor> {
        Ok(self.embed_tokens.index_select(&seq.ids, 0)?.reshape((
            seq.batch,
            seq.seq,
            self.cfg.hidden_size,
        ))?)
    }

    /// Runs decoder layers `layers` (a sub-range of `0..num_hidden_layers`) on the hidden states
    /// `x` `[batch, seq, hidden]` of a prepared batch; returns the hidden states after the last
    /// of them (before the final norm).
    pub fn forward_layers(
        &self,
        x: &Tensor,
        seq: &SeqInputs,
        layers: std::ops::Range<usize>,
    ) -> Result<Tensor> {
        if layers.start > layers.end || layers.end > self.layers.len() {
            return Err(Error::Input(format!(
                "layer range {layers:?} outside the model's {} layers",
                self.layers.len()
            )));
        }
        let mut x = x.clone();
        for layer in &self.layers[layers] {
            x = self.layer_forward(layer, &x, &seq.ctx, &mut None, false)?;
        }
        Ok(x)
    }

    /// The final norm and the vocabulary projection: logits `[.., vocab]` of hidden states
    /// `[.., hidden]` of any leading shape (e.g. only the rows of target positions).
    pub fn head(&self, hidden: &Tensor) -> Result<Tensor> {
        let x = rms_norm(hidden, &self.norm, self.cfg.rms_norm_eps, self.kernels)?;
        linear(&x, &self.lm_head, self.kernels)
    }

    /// Checks ids, mask and length against the model and the cache; returns the ids, the
    /// position of each new token and the validity of every position (cached and new).
    #[allow(clippy::type_complexity)]
    fn check_batch(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        cache: &mut KvCache,
        b: usize,
        s: usize,
    ) -> Result<(Vec<u32>, Vec<u32>, Vec<Vec<bool>>)> {
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
        // Positions count real tokens per row.
        let mut positions = Vec::with_capacity(b * s);
        for ((row, pos), held) in new_valid
            .iter()
            .zip(cache.next_pos.iter_mut())
            .zip(cache.valid.iter_mut())
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
        Ok((ids, positions, cache.valid.clone()))
    }

    /// The additive mask `[batch, 1, seq, past + seq]` (absent when nothing is masked) and the
    /// RoPE cos / sin `[batch, seq, head_dim / 2]` of each new position.
    fn attention_inputs(
        &self,
        positions: &[u32],
        valid: &[Vec<bool>],
        b: usize,
        s: usize,
        past: usize,
    ) -> Result<AttnInputs> {
        let total = past + s;
        let need_mask = s > 1 || valid.iter().any(|r| r.iter().any(|&v| !v));
        let keys =
            if self.kernels == Kernels::Auto && self.device.is_cpu() && self.dtype == DType::F32 {
                Some(Arc::new(KeyMask::causal(valid, s)?))
            } else {
                None
            };
        let mask = if keys.is_some() {
            None
        } else if need_mask {
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
        let pos = Tensor::from_vec(positions.to_vec(), b * s, &self.device)?;
        let half = self.cfg.head_size() / 2;
        let cos = self.cos.index_select(&pos, 0)?.reshape((b, s, half))?;
        let sin = self.sin.index_select(&pos, 0)?.reshape((b, s, half))?;
        Ok(AttnInputs {
            mask,
            keys,
            cos,
            sin,
        })
    }

    fn layer_forward(
        &self,
        layer: &Layer,
        x: &Tensor,
        ctx: &AttnInputs,
        cache: &mut Option<(Tensor, Tensor)>,
        keep: bool,
    ) -> Result<Tensor> {
        let k = self.kernels;
        let hn = rms_norm(x, &layer.input_layernorm, self.cfg.rms_norm_eps, k)?;
        let a = self.attention(&layer.attn, &hn, ctx, cache, keep)?;
        let x1 = (x + a)?;
        let hn = rms_norm(
            &x1,
            &layer.post_attention_layernorm,
            self.cfg.rms_norm_eps,
            k,
        )?;
        let m = mlp(&layer.mlp, &hn, k)?;
        Ok((x1 + m)?)
    }

    fn attention(
        &self,
        a: &Attention,
        x: &Tensor,
        ctx: &AttnInputs,
        cache: &mut Option<(Tensor, Tensor)>,
        keep: bool,
    ) -> Result<Tensor> {
        let kern = self.kernels;
        let (b, s, _) = x.dims3()?;
        let nh = self.cfg.num_attention_heads;
        let kvh = self.cfg.kv_heads();
        let d = self.cfg.head_size();
        let q = a
            .q_proj
            .forward(x, kern)?
            .reshape((b, s, nh, d))?
            .transpose(1, 2)?
            .contiguous()?;
        let k = a
            .k_proj
            .forward(x, kern)?
            .reshape((b, s, kvh, d))?
            .transpose(1, 2)?
            .contiguous()?;
        let v = a
            .v_proj
            .forward(x, kern)?
            .reshape((b, s, kvh, d))?
            .transpose(1, 2)?
            .contiguous()?;
        let q = apply_rope(&q, &ctx.cos, &ctx.sin, kern)?;
        let k = apply_rope(&k, &ctx.cos, &ctx.sin, kern)?;
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
        let scale = 1.0 / (d as f64).sqrt();
        if let Some(keys) = &ctx.keys {
            let y = crate::attention::attention(&q, &k, &v, keys.clone(), scale)?;
            return a.o_proj.forward(&y.reshape((b, s, nh * d))?, kern);
        }
        let k = repeat_kv(&k, nh / kvh)?;
        let v = repeat_kv(&v, nh / kvh)?;
        let att = q.matmul(&k.t()?.contiguous()?)?;
        let att = crate::ops::attention_softmax_with(&att, ctx.mask.as_ref(), scale, kern)?;
        let y = att.matmul(&v)?;
        let y = y.transpose(1, 2)?.reshape((b, s, nh * d))?;
        a.o_proj.forward(&y, kern)
    }
}

/// `x @ w^T` for `x` of any rank and `w` `[out, in]`: the leading dimensions are flattened so
/// that forward and backward are each one large GEMM (a broadcast batched matmul would
/// materialize a per-batch weight gradient and sum it).
fn linear(x: &Tensor, w: &Tensor, k: Kernels) -> Result<Tensor> {
    let dims = x.dims();
    let Some((&inner, lead)) = dims.split_last() else {
        return Ok(x.broadcast_matmul(&w.t()?)?);
    };
    if lead.is_empty() {
        return Ok(x.matmul(&w.t()?)?);
    }
    if lead.len() == 1 {
        return Ok(crate::ops::linear_2d_with(x, w, k)?);
    }
    let rows: usize = lead.iter().product();
    let y = crate::ops::linear_2d_with(&x.reshape((rows, inner))?, w, k)?;
    let mut out = lead.to_vec();
    out.push(w.dim(0)?);
    Ok(y.reshape(out)?)
}

/// RMSNorm in f32 (the fused kernel with its own backward, [`crate::ops::rms_norm`]).
fn rms_norm(x: &Tensor, w: &Tensor, eps: f64, k: Kernels) -> Result<Tensor> {
    Ok(crate::ops::rms_norm_with(x, w, eps, k)?)
}

fn mlp(m: &Mlp, x: &Tensor, k: Kernels) -> Result<Tensor> {
    let g = m.gate_proj.forward(x, k)?;
    let u = m.up_proj.forward(x, k)?;
    m.down_proj.forward(&crate::ops::swiglu_with(&g, &u, k)?, k)
}

/// HF's `rotate_half` layout (the fused kernel with its own backward, [`crate::ops::rope`]).
fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor, k: Kernels) -> Result<Tensor> {
    Ok(crate::ops::rope_with(x, cos, sin, k)?)
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
