//! The decoder of any family in `steper_models::arch` (Llama, Qwen2) as an ONNX graph of
//! standard operators, with Optimum's I/O names.
//!
//! Per layer the graph computes exactly what `steper_models::Llama::forward_cached` computes:
//! RMSNorm (`x / sqrt(mean(x²) + eps) * w`), q/k/v projections (each followed by an `Add` of
//! its bias where the family has one: Qwen2's q/k/v; biases stay float in every quantized form), RoPE in HF's rotate-half layout
//! (`x·cos + rotate_half(x)·sin`, tables gathered by `position_ids`), the new keys/values
//! concatenated after `past_key_values.{i}.*` into `present.{i}.*`, grouped-query attention with
//! the cache kept at `kv_heads` (the query heads of a group are folded into the row axis, so the
//! keys/values are never copied per head), `softmax(q·kᵀ·scale + mask)`, the output projection,
//! and a SwiGLU MLP; then the final norm and the (possibly tied) LM head.
//!
//! **Last-position logits.** The graph has one more input than Optimum's list:
//! [`LOGITS_TO_KEEP`], an int64 scalar that is also an initializer (default 0), so a caller that
//! does not feed it (onnxruntime-genai, tract, which folds it as a constant) gets every
//! position. Its meaning is HF's `logits_to_keep`: 0 = every position, N > 0 = the last N. The
//! final hidden states are sliced along the sequence axis (`Slice(starts = -N)`; `-0 = 0` keeps
//! all) before the final norm and the vocabulary projection, so a prefill that needs only the
//! next token's distribution projects one row instead of the whole prompt. The `logits`
//! output's sequence dimension is therefore [`dims::KEPT`], not [`dims::SEQ`].
//!
//! **Weight quantization** ([`GraphOptions::quant`], module [`crate::quant`]). Every linear
//! layer (and the vocabulary projection when asked) becomes either `com.microsoft.MatMulNBits`
//! (`ort-cpu`) or an int4/int8 initializer → `DequantizeLinear(axis 0, block_size)` → `MatMul`
//! (`portable`, opset 21). The embedding lookup always keeps float weights.
//!
//! The additive mask is built inside the graph from `attention_mask` (padding, 0 → −1e9) and the
//! causal relation `key index ≤ past + query index`.
//!
//! **fp16 export.** Weights, matmuls, RoPE and the KV cache are fp16. Kept in f32, with `Cast`
//! nodes around them: the residual stream (sums over 30+ layers overflow or lose the small
//! updates in fp16), every RMSNorm (the mean of squares overflows fp16 for activations above
//! ~256) including its weight, the attention scores from the scale on (scale, mask, softmax: the
//! −1e9 mask and the exponentials need f32 range), and the logits.

use steper_models::arch::Projection;
use steper_models::LlamaConfig;
use tract_onnx::pb::{GraphProto, ModelProto, OperatorSetIdProto, StringStringEntryProto};

use crate::error::{Error, Result};
use crate::onnx::{attr_f, attr_i, attr_ints, value_info, Dim, Elem, GraphBuilder};
use crate::quant::{self, QuantBits, QuantOptions, QuantTarget};
use steper_runtime::manifest::AttentionOp;

/// Name of the optional last-N-positions input (see the module doc).
pub const LOGITS_TO_KEEP: &str = "logits_to_keep";

/// ONNX Runtime's contrib operator domain (`MatMulNBits`).
pub const MS_DOMAIN: &str = "com.microsoft";

/// Opset of the default domain written by the `portable` quantization target
/// (`DequantizeLinear` with `block_size` and int4 types need 21).
pub const PORTABLE_OPSET: i64 = 21;

/// Additive mask value of the graph; the same finite value as the candle model, so a fully
/// masked (left-padding) row gives a uniform distribution instead of NaN.
pub const MASKED: f32 = -1e9;

/// Symbolic dimension names of the graph's inputs and outputs.
pub mod dims {
    /// Batch size.
    pub const BATCH: &str = "batch_size";
    /// New tokens in this call.
    pub const SEQ: &str = "sequence_length";
    /// Tokens already in the cache.
    pub const PAST: &str = "past_sequence_length";
    /// `past_sequence_length + sequence_length`.
    pub const TOTAL: &str = "total_sequence_length";
    /// Positions of `logits`: `sequence_length`, or `min(logits_to_keep, sequence_length)`.
    pub const KEPT: &str = "logits_sequence_length";
}

/// Source of a weight tensor: f32 values in row-major order and their shape.
pub trait WeightSource {
    /// The tensor `name` (HF naming) as f32 values and shape; `transpose` asks for a 2-D tensor
    /// transposed (`[out, in]` → `[in, out]`, MatMul's right-hand layout).
    fn tensor(&self, name: &str, transpose: bool) -> Result<(Vec<f32>, Vec<usize>)>;

    /// The weight `name` already quantized (e.g. by GPTQ, see
    /// [`crate::quant::PreQuantized`]); `None`: [`crate::quant::quantize_weight`] rounds it to
    /// nearest.
    fn prequantized(&self, _name: &str) -> Option<crate::quant::BlockQuantized> {
        None
    }
}

impl WeightSource for steper_models::Weights {
    fn tensor(&self, name: &str, transpose: bool) -> Result<(Vec<f32>, Vec<usize>)> {
        let err = |e: candle_core::Error| Error::Tensor {
            name: name.to_string(),
            message: e.to_string(),
        };
        let t = self.tensors().get(name).ok_or_else(|| Error::Tensor {
            name: name.to_string(),
            message: "missing from the checkpoint".into(),
        })?;
        let t = t.to_dtype(candle_core::DType::F32).map_err(err)?;
        let t = if transpose {
            t.t().and_then(|t| t.contiguous()).map_err(err)?
        } else {
            t
        };
        let shape = t.dims().to_vec();
        let data = t
            .flatten_all()
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(err)?;
        Ok((data, shape))
    }
}

/// What the graph is built for.
#[derive(Debug, Clone, Copy)]
pub struct GraphOptions {
    /// Storage and compute type of weights, matmuls and the KV cache.
    pub dtype: Elem,
    /// Opset of the default domain (17 or 18; [`PORTABLE_OPSET`] with a `portable`
    /// quantization).
    pub opset: i64,
    /// Weight quantization of the linear layers (`None`: float weights of `dtype`).
    pub quant: Option<QuantOptions>,
    /// Standard-operator attention, or ONNX Runtime's `GroupQueryAttention` (see the module doc).
    pub attention: AttentionOp,
}

/// IR version written for `opset` (ONNX Runtime 1.31 reads up to 10 here; opset 21 and its
/// int4 types need IR 10).
pub fn ir_version(opset: i64) -> i64 {
    if opset >= PORTABLE_OPSET {
        10
    } else {
        IR_VERSION
    }
}

/// Builds the decoder `ModelProto` (all weights inline as `raw_data`; [`crate::write_model`]
/// moves them to an external file when needed).
pub fn build_decoder(
    cfg: &LlamaConfig,
    w: &dyn WeightSource,
    opts: GraphOptions,
) -> Result<ModelProto> {
    let portable = opts.quant.map(|q| q.target) == Some(QuantTarget::Portable);
    if portable && opts.opset != PORTABLE_OPSET {
        return Err(Error::Option {
            option: "--opset",
            expected: format!(
                "{PORTABLE_OPSET} with --target portable (DequantizeLinear block_size)"
            ),
            got: opts.opset.to_string(),
        });
    }
    if !portable && !(17..=18).contains(&opts.opset) {
        return Err(Error::Option {
            option: "--opset",
            expected: "17 or 18".into(),
            got: opts.opset.to_string(),
        });
    }
    if let Some(q) = &opts.quant {
        q.check()?;
    }
    let gqa = opts.attention == AttentionOp::GroupQueryAttention;
    if gqa && portable {
        return Err(Error::Option {
            option: "--attention",
            expected: "standard with --target portable (the TensorRT form has standard operators only; GroupQueryAttention is ONNX Runtime's contrib operator)".into(),
            got: "gqa".into(),
        });
    }
    if gqa && opts.dtype != Elem::F32 {
        return Err(Error::Option {
            option: "--attention",
            expected: "standard with --dtype fp16 (the GroupQueryAttention export is fp32 activations only)".into(),
            got: "gqa".into(),
        });
    }
    if !matches!(opts.dtype, Elem::F32 | Elem::F16) {
        return Err(Error::Option {
            option: "--dtype",
            expected: "fp32 or fp16".into(),
            got: format!("{:?}", opts.dtype),
        });
    }
    let ft = opts.dtype;
    let h = cfg.hidden_size as i64;
    let nh = cfg.num_attention_heads as i64;
    let kv = cfg.kv_heads() as i64;
    let d = cfg.head_size() as i64;
    let inter = cfg.intermediate_size as i64;
    let vocab = cfg.vocab_size as i64;
    if nh % kv != 0 || d % 2 != 0 {
        return Err(Error::Unsupported(format!(
            "num_attention_heads {nh} must be a multiple of num_key_value_heads {kv}, head_dim {d} even"
        )));
    }
    if gqa && d % 8 != 0 {
        return Err(Error::Unsupported(format!(
            "--attention gqa: head_dim {d} is not a multiple of 8, which ONNX Runtime's GroupQueryAttention needs"
        )));
    }
    let layers = cfg.num_hidden_layers;
    let mut g = GraphBuilder::new(opts.opset);

    // Constants.
    let c_one = g.const_i64("const/one", &[], &[1]);
    let c_zero = g.const_i64("const/zero", &[], &[0]);
    let c_eps = g.init_float("const/rms_eps", Elem::F32, &[], &[cfg.rms_norm_eps as f32]);
    let c_two = g.init_float("const/two", Elem::F32, &[], &[2.0]);
    let c_scale = g.init_float(
        "const/attn_scale",
        Elem::F32,
        &[],
        &[1.0 / (d as f32).sqrt()],
    );
    let c_mask_on = g.init_float("const/mask_zero", Elem::F32, &[], &[0.0]);
    let c_mask_off = g.init_float("const/mask_neg", Elem::F32, &[], &[MASKED]);
    let shape_heads_q = g.const_i64("const/shape_q", &[4], &[0, 0, nh, d]);
    let shape_heads_kv = g.const_i64("const/shape_kv", &[4], &[0, 0, kv, d]);
    let shape_group = g.const_i64("const/shape_group", &[5], &[0, kv, nh / kv, -1, d]);
    let shape_out_heads = g.const_i64("const/shape_out_heads", &[4], &[0, nh, -1, d]);
    let shape_merge = g.const_i64("const/shape_merge", &[3], &[0, 0, nh * d]);
    let shape_rows = g.const_i64("const/shape_rows", &[2], &[-1, h]);
    let c_vocab = g.const_i64("const/vocab", &[1], &[vocab]);
    let half = d / 2;
    let s_lo = g.const_i64("const/rope_lo_start", &[1], &[0]);
    let s_mid = g.const_i64("const/rope_mid", &[1], &[half]);
    let s_hi = g.const_i64("const/rope_hi_end", &[1], &[d]);
    let s_axis = g.const_i64("const/rope_axis", &[1], &[3]);

    // RoPE tables. Standard graph: [max_pos, head_dim], cos repeated over both halves, sin with
    // the sign of rotate_half folded in (−sin for the first half), so rope(x) = x·cos +
    // swap_halves(x)·sin'. GroupQueryAttention graph: the op rotates q and k itself
    // (`do_rotary`, rotate-half layout) from its `cos_cache` / `sin_cache` inputs, [max_pos,
    // head_dim / 2] — fourteen nodes a layer fewer on the decode path.
    let inv = cfg.inv_freq();
    let maxp = cfg.max_position_embeddings;
    let (cos_tab, sin_tab) = if gqa {
        let mut cos_t = Vec::with_capacity(maxp * inv.len());
        let mut sin_t = Vec::with_capacity(maxp * inv.len());
        for p in 0..maxp {
            for &f in &inv {
                let a = p as f32 * f;
                cos_t.push(a.cos());
                sin_t.push(a.sin());
            }
        }
        let dims = [maxp as i64, inv.len() as i64];
        (
            g.init_float("rope.cos_cache", ft, &dims, &cos_t),
            g.init_float("rope.sin_cache", ft, &dims, &sin_t),
        )
    } else {
        let mut cos_t = Vec::with_capacity(maxp * d as usize);
        let mut sin_t = Vec::with_capacity(maxp * d as usize);
        for p in 0..maxp {
            let ang: Vec<f32> = inv.iter().map(|&f| p as f32 * f).collect();
            for rep in 0..2 {
                for &a in &ang {
                    cos_t.push(a.cos());
                    sin_t.push(if rep == 0 { -a.sin() } else { a.sin() });
                }
            }
        }
        (
            g.init_float("rope.cos", ft, &[maxp as i64, d], &cos_t),
            g.init_float("rope.sin_signed", ft, &[maxp as i64, d], &sin_t),
        )
    };

    // Mask [B, 1, S, T] (f32, additive).
    let ids_shape = g.op("Shape", "mask", &["input_ids"], vec![]);
    let seq = g.op(
        "Gather",
        "mask",
        &[&ids_shape, &c_one],
        vec![attr_i("axis", 0)],
    );
    let am_shape = g.op("Shape", "mask", &["attention_mask"], vec![]);
    let total = g.op(
        "Gather",
        "mask",
        &[&am_shape, &c_one],
        vec![attr_i("axis", 0)],
    );
    // GroupQueryAttention masks by itself: each row attends to its first `seqlens_k + 1` keys
    // (right padding), causally for the new tokens.
    let (mask, gqa_lens) = if gqa {
        let c_axis1 = g.const_i64("const/axis_1", &[1], &[1]);
        let sum = g.op(
            "ReduceSum",
            "gqa",
            &["attention_mask", &c_axis1],
            vec![attr_i("keepdims", 0)],
        );
        let last = g.op("Sub", "gqa", &[&sum, &c_one], vec![]);
        let seqlens = g.cast("gqa", &last, Elem::I32);
        let total32 = g.cast("gqa", &total, Elem::I32);
        (String::new(), Some((seqlens, total32)))
    } else {
        let past = g.op("Sub", "mask", &[&total, &seq], vec![]);
        let q_idx = g.op("Range", "mask", &[&past, &total, &c_one], vec![]);
        let k_idx = g.op("Range", "mask", &[&c_zero, &total, &c_one], vec![]);
        let q_col = g.unsqueeze("mask", &q_idx, &[1]);
        let k_row = g.unsqueeze("mask", &k_idx, &[0]);
        let causal = g.op("LessOrEqual", "mask", &[&k_row, &q_col], vec![]);
        let pad = g.cast("mask", "attention_mask", Elem::Bool);
        let pad4 = g.unsqueeze("mask", &pad, &[1, 2]);
        let allowed = g.op("And", "mask", &[&causal, &pad4], vec![]);
        let mask = g.op(
            "Where",
            "mask",
            &[&allowed, &c_mask_on, &c_mask_off],
            vec![],
        );
        // [B, 1, 1, S, T] for the grouped scores [B, kv, rep, S, T].
        (g.unsqueeze("mask", &mask, &[1]), None)
    };

    // RoPE rows for this call, [B, 1, S, D] against heads-first q/k (the standard graph only).
    let (cos4, sin4) = if gqa {
        (String::new(), String::new())
    } else {
        let cos_g = g.op(
            "Gather",
            "rope",
            &[&cos_tab, "position_ids"],
            vec![attr_i("axis", 0)],
        );
        let sin_g = g.op(
            "Gather",
            "rope",
            &[&sin_tab, "position_ids"],
            vec![attr_i("axis", 0)],
        );
        (
            g.unsqueeze("rope", &cos_g, &[1]),
            g.unsqueeze("rope", &sin_g, &[1]),
        )
    };

    // Embeddings; the residual stream is f32.
    let embed = {
        let (data, shape) = w.tensor("model.embed_tokens.weight", false)?;
        let dims: Vec<i64> = shape.iter().map(|&x| x as i64).collect();
        g.init_float("model.embed_tokens.weight", ft, &dims, &data)
    };
    let mut x = g.op(
        "Gather",
        "embed",
        &[&embed, "input_ids"],
        vec![attr_i("axis", 0)],
    );
    if ft != Elem::F32 {
        x = g.cast("embed", &x, Elem::F32);
    }

    // x · Wᵀ for the HF weight `name` ([out, in]): a float MatMul, or the quantized form.
    let linear = |g: &mut GraphBuilder, hint: &str, x: &str, name: &str| -> Result<String> {
        match &opts.quant {
            Some(q) => quantized_linear(g, w, q, ft, hint, Act::hidden(x), name),
            None => {
                let (data, shape) = w.tensor(name, true)?;
                let dims: Vec<i64> = shape.iter().map(|&x| x as i64).collect();
                let wt = g.init_float(&format!("{name}.T"), ft, &dims, &data);
                Ok(g.op("MatMul", hint, &[x, &wt], vec![]))
            }
        }
    };
    // x · Wᵀ for several weights of one input: one fused `MatMulNBits` over the weights stacked
    // along the output axis, then `Split` (ort-cpu quantization: at one decode token each small
    // kernel costs a thread-pool dispatch, so q/k/v and gate/up are one kernel each); otherwise
    // one `linear` each. Blocks never cross rows, so stacking quantizes every weight exactly as
    // alone.
    let linears =
        |g: &mut GraphBuilder, hint: &str, x: &str, names: &[&str]| -> Result<Vec<String>> {
            match &opts.quant {
                Some(q) if q.target == QuantTarget::OrtCpu && names.len() > 1 => {
                    fused_matmulnbits(g, w, q, ft, hint, Act::hidden(x), names)
                }
                _ => names.iter().map(|n| linear(g, hint, x, n)).collect(),
            }
        };
    let norm_w = |g: &mut GraphBuilder, name: &str| -> Result<String> {
        let (data, shape) = w.tensor(name, false)?;
        let dims: Vec<i64> = shape.iter().map(|&x| x as i64).collect();
        Ok(g.init_float(name, Elem::F32, &dims, &data))
    };
    // RMSNorm in f32, result in the compute dtype. `Pow(x, 2)` rather than `Mul(x, x)`: it is
    // the form ONNX Runtime's optimizer fuses (Pow → ReduceMean → Add → Sqrt → Div → Mul into
    // one `SimplifiedLayerNormalization`: 61 nodes instead of 366 in SmolLM2's graph); other
    // runtimes compute the same square.
    let rms = |g: &mut GraphBuilder, hint: &str, x: &str, wname: &str| -> String {
        let sq = g.op("Pow", hint, &[x, &c_two], vec![]);
        let ms = g.reduce_mean_last(hint, &sq);
        let ve = g.op("Add", hint, &[&ms, &c_eps], vec![]);
        let den = g.op("Sqrt", hint, &[&ve], vec![]);
        let xn = g.op("Div", hint, &[x, &den], vec![]);
        let y = g.op("Mul", hint, &[&xn, wname], vec![]);
        if ft != Elem::F32 {
            g.cast(hint, &y, ft)
        } else {
            y
        }
    };
    let rope = |g: &mut GraphBuilder, hint: &str, t: &str| -> String {
        let lo = g.op("Slice", hint, &[t, &s_lo, &s_mid, &s_axis], vec![]);
        let hi = g.op("Slice", hint, &[t, &s_mid, &s_hi, &s_axis], vec![]);
        let sw = g.op("Concat", hint, &[&hi, &lo], vec![attr_i("axis", -1)]);
        let a = g.op("Mul", hint, &[t, &cos4], vec![]);
        let b = g.op("Mul", hint, &[&sw, &sin4], vec![]);
        g.op("Add", hint, &[&a, &b], vec![])
    };

    // `+ bias` after the projection `proj` of layer `l` where the family has one (the bias in
    // the compute dtype, broadcast over batch and sequence).
    let family = cfg.family();
    let add_bias = |g: &mut GraphBuilder, hint: &str, y: &str, l: usize, proj: Projection| {
        if !family.has_bias(cfg, proj) {
            return Ok(y.to_string());
        }
        let name = proj.bias_name(l);
        let (data, shape) = w.tensor(&name, false)?;
        let dims: Vec<i64> = shape.iter().map(|&x| x as i64).collect();
        let b = g.init_float(&name, ft, &dims, &data);
        Ok::<String, Error>(g.op("Add", hint, &[y, &b], vec![]))
    };

    for l in 0..layers {
        let p = format!("model.layers.{l}");
        let hint = format!("layers.{l}");
        let ln1 = norm_w(&mut g, &format!("{p}.input_layernorm.weight"))?;
        let ln2 = norm_w(&mut g, &format!("{p}.post_attention_layernorm.weight"))?;
        let [wq, wk, wv, wo, wg, wu, wd] = Projection::ALL.map(|proj| proj.weight_name(l));

        let ha = format!("{hint}/attn");
        let hn = rms(&mut g, &format!("{hint}/input_norm"), &x, &ln1);
        let pk = format!("present.{l}.key");
        let pv = format!("present.{l}.value");
        let qkv = linears(&mut g, &ha, &hn, &[&wq, &wk, &wv])?;
        let qkv = [Projection::Q, Projection::K, Projection::V]
            .into_iter()
            .zip(&qkv)
            .map(|(proj, y)| add_bias(&mut g, &ha, y, l, proj))
            .collect::<Result<Vec<_>>>()?;
        let y = if let Some((seqlens, total32)) = &gqa_lens {
            // q/k/v [B, S, heads·D] as projected; the op rotates q and k at `position_ids`,
            // appends k/v to the cache (present = past ++ new, heads-first) and attends
            // causally.
            let y = format!("{ha}/GroupQueryAttention_{l}");
            g.op_outputs(
                MS_DOMAIN,
                "GroupQueryAttention",
                &[&y, &pk, &pv],
                &[
                    &qkv[0],
                    &qkv[1],
                    &qkv[2],
                    &format!("past_key_values.{l}.key"),
                    &format!("past_key_values.{l}.value"),
                    seqlens,
                    total32,
                    &cos_tab,
                    &sin_tab,
                    "position_ids",
                ],
                vec![
                    attr_i("num_heads", nh),
                    attr_i("kv_num_heads", kv),
                    attr_f("scale", 1.0 / (d as f32).sqrt()),
                    attr_i("do_rotary", 1),
                    attr_i("rotary_interleaved", 0),
                ],
            );
            y
        } else {
            // [B, S, heads·D] → [B, heads, S, D].
            let heads_first = |g: &mut GraphBuilder, x: &str, shape: &str| -> String {
                let x = g.op("Reshape", &ha, &[x, shape], vec![]);
                g.op(
                    "Transpose",
                    &ha,
                    &[&x],
                    vec![attr_ints("perm", &[0, 2, 1, 3])],
                )
            };
            let q = heads_first(&mut g, &qkv[0], &shape_heads_q);
            let k = heads_first(&mut g, &qkv[1], &shape_heads_kv);
            let v = heads_first(&mut g, &qkv[2], &shape_heads_kv);
            let q = rope(&mut g, &ha, &q);
            let k = rope(&mut g, &ha, &k);
            g.op_to(
                "Concat",
                &pk,
                &[&format!("past_key_values.{l}.key"), &k],
                vec![attr_i("axis", 2)],
            );
            g.op_to(
                "Concat",
                &pv,
                &[&format!("past_key_values.{l}.value"), &v],
                vec![attr_i("axis", 2)],
            );
            // Grouped-query attention: queries [B, nh, S, D] → [B, kv, rep, S, D] (heads of one
            // group are consecutive, as in HF's repeat_kv) against keys/values [B, kv, 1, T, D]
            // broadcast over the group, so the cache is never copied per head. (Reshapes only divide
            // by constant sizes, which symbolic shape inference needs.)
            let qg = g.op("Reshape", &ha, &[&q, &shape_group], vec![]);
            let kt = g.op(
                "Transpose",
                &ha,
                &[&pk],
                vec![attr_ints("perm", &[0, 1, 3, 2])],
            );
            let kt = g.unsqueeze(&ha, &kt, &[2]);
            let mut sc = g.op("MatMul", &ha, &[&qg, &kt], vec![]);
            if ft != Elem::F32 {
                sc = g.cast(&ha, &sc, Elem::F32);
            }
            let sc = g.op("Mul", &ha, &[&sc, &c_scale], vec![]);
            let sc = g.op("Add", &ha, &[&sc, &mask], vec![]);
            let mut pr = g.op("Softmax", &ha, &[&sc], vec![attr_i("axis", -1)]);
            if ft != Elem::F32 {
                pr = g.cast(&ha, &pr, ft);
            }
            let v5 = g.unsqueeze(&ha, &pv, &[2]);
            let y = g.op("MatMul", &ha, &[&pr, &v5], vec![]);
            let y = g.op("Reshape", &ha, &[&y, &shape_out_heads], vec![]);
            let y = g.op(
                "Transpose",
                &ha,
                &[&y],
                vec![attr_ints("perm", &[0, 2, 1, 3])],
            );
            g.op("Reshape", &ha, &[&y, &shape_merge], vec![])
        };
        let o = linear(&mut g, &ha, &y, &wo)?;
        let mut o = add_bias(&mut g, &ha, &o, l, Projection::O)?;
        if ft != Elem::F32 {
            o = g.cast(&ha, &o, Elem::F32);
        }
        let x1 = g.op("Add", &hint, &[&x, &o], vec![]);

        let hm = format!("{hint}/mlp");
        let hn = rms(&mut g, &format!("{hint}/post_attention_norm"), &x1, &ln2);
        // The MLP has no bias in any family (`mlp_bias` is refused by the config check).
        let gate_up = linears(&mut g, &hm, &hn, &[&wg, &wu])?;
        let (gt, up) = (&gate_up[0], &gate_up[1]);
        let sg = g.op("Sigmoid", &hm, &[gt], vec![]);
        let act = g.op("Mul", &hm, &[gt, &sg], vec![]);
        let gu = g.op("Mul", &hm, &[&act, up], vec![]);
        let mut m = linear(&mut g, &hm, &gu, &wd)?;
        if ft != Elem::F32 {
            m = g.cast(&hm, &m, Elem::F32);
        }
        x = g.op("Add", &hint, &[&x1, &m], vec![]);
    }

    // Keep the last `logits_to_keep` positions (0 = all: Slice from -0 = 0) before the final
    // norm, so the vocabulary projection runs only where logits are wanted (HF's
    // `logits_to_keep`).
    let keep = g.const_i64(LOGITS_TO_KEEP, &[], &[0]);
    // min(N, S): ONNX Slice clamps a start below -S, tract 0.23 does not.
    let keep_s = g.op("Min", LOGITS_TO_KEEP, &[&keep, &seq], vec![]);
    let neg = g.op("Neg", LOGITS_TO_KEEP, &[&keep_s], vec![]);
    let starts = g.unsqueeze(LOGITS_TO_KEEP, &neg, &[0]);
    let c_end = g.const_i64("const/int64_max", &[1], &[i64::MAX]);
    let c_seq_axis = g.const_i64("const/seq_axis", &[1], &[1]);
    let x = g.op(
        "Slice",
        LOGITS_TO_KEEP,
        &[&x, &starts, &c_end, &c_seq_axis],
        vec![],
    );
    let kept_shape = g.op("Shape", LOGITS_TO_KEEP, &[&x], vec![attr_i("end", 2)]);

    let normf = norm_w(&mut g, "model.norm.weight")?;
    let xn = rms(&mut g, "final_norm", &x, &normf);
    let rows = g.op("Reshape", "lm_head", &[&xn, &shape_rows], vec![]);
    let mut lg = match &opts.quant {
        Some(q) if q.lm_head => {
            let rows = Act {
                name: &rows,
                rank: 2,
            };
            quantized_linear(&mut g, w, q, ft, "lm_head", rows, quant::head_weight(cfg))?
        }
        _ => {
            let head = if cfg.tie_word_embeddings {
                embed.clone()
            } else {
                let (data, shape) = w.tensor("lm_head.weight", false)?;
                let dims: Vec<i64> = shape.iter().map(|&x| x as i64).collect();
                g.init_float("lm_head.weight", ft, &dims, &data)
            };
            // Gemm with transB reads the [vocab, hidden] matrix as stored, so tied embeddings
            // share one initializer with the Gather above.
            g.op(
                "Gemm",
                "lm_head",
                &[&rows, &head],
                vec![attr_i("transB", 1), attr_f("alpha", 1.0)],
            )
        }
    };
    if ft != Elem::F32 {
        lg = g.cast("lm_head", &lg, Elem::F32);
    }
    let out_shape = g.op(
        "Concat",
        "lm_head",
        &[&kept_shape, &c_vocab],
        vec![attr_i("axis", 0)],
    );
    g.op_to("Reshape", "logits", &[&lg, &out_shape], vec![]);

    // Declared inputs and outputs.
    use dims::*;
    let mut inputs = vec![
        value_info("input_ids", Elem::I64, &[Dim::Sym(BATCH), Dim::Sym(SEQ)]),
        value_info(
            "attention_mask",
            Elem::I64,
            &[Dim::Sym(BATCH), Dim::Sym(TOTAL)],
        ),
        value_info("position_ids", Elem::I64, &[Dim::Sym(BATCH), Dim::Sym(SEQ)]),
    ];
    let cache_dims =
        |t: &'static str| [Dim::Sym(BATCH), Dim::Fixed(kv), Dim::Sym(t), Dim::Fixed(d)];
    let mut outputs = vec![value_info(
        "logits",
        Elem::F32,
        &[Dim::Sym(BATCH), Dim::Sym(KEPT), Dim::Fixed(vocab)],
    )];
    for l in 0..layers {
        for kind in ["key", "value"] {
            inputs.push(value_info(
                &format!("past_key_values.{l}.{kind}"),
                ft,
                &cache_dims(PAST),
            ));
            outputs.push(value_info(
                &format!("present.{l}.{kind}"),
                ft,
                &cache_dims(TOTAL),
            ));
        }
    }
    // After the Optimum list, so positional callers see the usual order.
    inputs.push(value_info(LOGITS_TO_KEEP, Elem::I64, &[]));
    let _ = inter;
    // Constants only one attention form uses (its mask, its reshapes) are dropped, so ONNX
    // Runtime has no unused initializer to warn about.
    let used: std::collections::HashSet<&str> = g
        .nodes
        .iter()
        .flat_map(|n| n.input.iter().map(String::as_str))
        .collect();
    let initializers: Vec<_> = std::mem::take(&mut g.initializers)
        .into_iter()
        .filter(|t| used.contains(t.name.as_str()))
        .collect();
    let graph = GraphProto {
        node: g.nodes,
        name: format!("steper_{}_decoder", family.model_type),
        initializer: initializers,
        input: inputs,
        output: outputs,
        ..Default::default()
    };
    let mut opset_import = vec![OperatorSetIdProto {
        domain: String::new(),
        version: opts.opset,
    }];
    let mut metadata_props = vec![StringStringEntryProto {
        key: "steper.dtype".into(),
        value: if ft == Elem::F16 { "fp16" } else { "fp32" }.into(),
    }];
    if gqa || opts.quant.map(|q| q.target) == Some(QuantTarget::OrtCpu) {
        opset_import.push(OperatorSetIdProto {
            domain: MS_DOMAIN.into(),
            version: 1,
        });
    }
    if gqa {
        metadata_props.push(StringStringEntryProto {
            key: "steper.attention".into(),
            value: AttentionOp::GroupQueryAttention.as_str().into(),
        });
    }
    if let Some(q) = &opts.quant {
        metadata_props.push(StringStringEntryProto {
            key: "steper.quantization".into(),
            value: describe(q),
        });
    }
    Ok(ModelProto {
        ir_version: ir_version(opts.opset),
        opset_import,
        producer_name: "steper-export".into(),
        producer_version: env!("CARGO_PKG_VERSION").into(),
        graph: Some(graph),
        metadata_props,
        ..Default::default()
    })
}

/// One-line description of a weight quantization (graph metadata, genai_config.json).
pub fn describe(q: &QuantOptions) -> String {
    let mut s = format!(
        "{} {} block {} ({}{}), lm_head {}",
        q.bits.as_str(),
        match q.zero_points {
            quant::ZeroPoints::None => "symmetric",
            quant::ZeroPoints::Int => "with zero points,",
            quant::ZeroPoints::Float => "with float zero points (block-sum correction),",
        },
        q.block_size,
        q.target.op(),
        if q.target == QuantTarget::OrtCpu {
            format!(" accuracy_level {}", quant::ACCURACY_LEVEL)
        } else {
            String::new()
        },
        if q.lm_head { "quantized" } else { "float" }
    );
    if q.off_grid_int8 {
        s.push_str(", layers off the int4 grid in int8");
    }
    s.push_str(", embedding lookup float");
    s
}

/// `x · Wᵀ` for the HF weight `name` (`[N, K]`) quantized by `q`, in the target's form; the
/// scales are stored in the activation dtype `ft`.
fn quantized_linear(
    g: &mut GraphBuilder,
    w: &dyn WeightSource,
    q: &QuantOptions,
    ft: Elem,
    hint: &str,
    x: Act<'_>,
    name: &str,
) -> Result<String> {
    let bq = quant::quantize_weight(w, name, q)?;
    let (n, k) = (bq.rows as i64, bq.cols as i64);
    let nb = bq.blocks_per_row() as i64;
    let bs = q.block_size as i64;
    Ok(match q.target {
        QuantTarget::OrtCpu => matmul_nbits(g, &bq, name, ft, hint, x),
        QuantTarget::Portable if bq.offsets.is_some() => {
            // QuantOptions::check refuses this combination before any weight is read.
            return Err(Error::Option {
                option: "--zero-points",
                expected: "none or int with --target portable".into(),
                got: "float".into(),
            });
        }
        QuantTarget::Portable => {
            let elem = match bq.bits {
                QuantBits::Int4 => Elem::I4,
                QuantBits::Int8 => Elem::I8,
            };
            let wq = g.init_raw(
                &format!("{name}.T.quantized"),
                elem,
                &[k, n],
                bq.transposed_raw(),
            );
            let s = g.init_float(
                &format!("{name}.T.scales"),
                ft,
                &[nb, n],
                &bq.transposed_scales(),
            );
            let zp = bq
                .transposed_zero_points()
                .map(|raw| g.init_raw(&format!("{name}.T.zero_points"), elem, &[nb, n], raw));
            let mut inputs: Vec<&str> = vec![&wq, &s];
            if let Some(z) = &zp {
                inputs.push(z);
            }
            let wd = g.op(
                "DequantizeLinear",
                hint,
                &inputs,
                vec![attr_i("axis", 0), attr_i("block_size", bs)],
            );
            g.op("MatMul", hint, &[x.name, &wd], vec![])
        }
    })
}

/// One `MatMulNBits` over the weights `names` (same input dimension) stacked along the output
/// axis, then a `Split` back into one output per weight (in order). Each weight is quantized on
/// its own (errors name it), so the stacked codes and scales are exactly the separate ones.
fn fused_matmulnbits(
    g: &mut GraphBuilder,
    w: &dyn WeightSource,
    q: &QuantOptions,
    ft: Elem,
    hint: &str,
    x: Act<'_>,
    names: &[&str],
) -> Result<Vec<String>> {
    let parts = names
        .iter()
        .map(|n| quant::quantize_weight(w, n, q))
        .collect::<Result<Vec<_>>>()?;
    let k = parts[0].cols;
    if let Some((n, p)) = names
        .iter()
        .zip(&parts)
        .find(|(_, p)| p.bits != parts[0].bits)
    {
        return Err(Error::Tensor {
            name: n.to_string(),
            message: format!(
                "quantized to {} while {} is {}, so the two cannot share one MatMulNBits",
                p.bits.as_str(),
                names[0],
                parts[0].bits.as_str()
            ),
        });
    }
    if let Some((n, p)) = names.iter().zip(&parts).find(|(_, p)| p.cols != k) {
        return Err(Error::Tensor {
            name: n.to_string(),
            message: format!(
                "input dimension {} differs from {}'s {k}, so the two cannot share one MatMulNBits",
                p.cols, names[0]
            ),
        });
    }
    let rows: Vec<i64> = parts.iter().map(|p| p.rows as i64).collect();
    let stacked = quant::BlockQuantized {
        rows: parts.iter().map(|p| p.rows).sum(),
        cols: k,
        block_size: q.block_size,
        bits: parts[0].bits,
        codes: parts.iter().flat_map(|p| p.codes.iter().copied()).collect(),
        scales: parts
            .iter()
            .flat_map(|p| p.scales.iter().copied())
            .collect(),
        zero_points: (q.zero_points == quant::ZeroPoints::Int).then(|| {
            parts
                .iter()
                .flat_map(|p| p.zero_points.iter().flatten().copied())
                .collect()
        }),
        offsets: (q.zero_points == quant::ZeroPoints::Float).then(|| {
            parts
                .iter()
                .flat_map(|p| p.offsets.iter().flatten().copied())
                .collect()
        }),
    };
    // Named after the first weight with the `+` of the others, e.g. `…q_proj+k_proj+v_proj`.
    let tail: Vec<&str> = names[1..]
        .iter()
        .map(|n| {
            n.trim_end_matches(".weight")
                .rsplit('.')
                .next()
                .unwrap_or(n)
        })
        .collect();
    let base = format!(
        "{}+{}",
        names[0].trim_end_matches(".weight"),
        tail.join("+")
    );
    let y = matmul_nbits(g, &stacked, &base, ft, hint, x);
    let sizes = g.const_i64(&format!("{base}.split"), &[rows.len() as i64], &rows);
    let outs: Vec<String> = (0..names.len()).map(|i| format!("{y}/split_{i}")).collect();
    let out_refs: Vec<&str> = outs.iter().map(String::as_str).collect();
    g.op_outputs(
        "",
        "Split",
        &out_refs,
        &[&y, &sizes],
        vec![attr_i("axis", -1)],
    );
    Ok(outs)
}

/// `x · Wᵀ` as `com.microsoft.MatMulNBits` over the block-quantized `bq`, its initializers named
/// after `name` (`{name}.MatMulNBits.B`, `.scales`, and `.zero_points` for asymmetric blocks).
/// Float zero points (`bq.offsets`) are added as the block-sum correction of the module doc of
/// [`quant`]: `+ MatMul(block_sums(x), O)`.
fn matmul_nbits(
    g: &mut GraphBuilder,
    bq: &quant::BlockQuantized,
    name: &str,
    ft: Elem,
    hint: &str,
    x: Act<'_>,
) -> String {
    let (n, k) = (bq.rows as i64, bq.cols as i64);
    let nb = bq.blocks_per_row() as i64;
    let bits = bq.bits.bits() as i64;
    let bs = bq.block_size as i64;
    let b = g.init_raw(
        &format!("{name}.MatMulNBits.B"),
        Elem::U8,
        &[n, nb, bs * bits / 8],
        bq.matmul_nbits_b(),
    );
    let s = g.init_float(
        &format!("{name}.MatMulNBits.scales"),
        ft,
        &[n * nb],
        &bq.scales,
    );
    let zp = bq.matmul_nbits_zero_points().map(|raw| {
        let len = raw.len() as i64;
        g.init_raw(
            &format!("{name}.MatMulNBits.zero_points"),
            Elem::U8,
            &[len],
            raw,
        )
    });
    let mut inputs: Vec<&str> = vec![x.name, &b, &s];
    if let Some(z) = &zp {
        inputs.push(z);
    }
    let y = g.op_in(
        MS_DOMAIN,
        "MatMulNBits",
        hint,
        &inputs,
        vec![
            attr_i("K", k),
            attr_i("N", n),
            attr_i("bits", bits),
            attr_i("block_size", bs),
            attr_i("accuracy_level", quant::ACCURACY_LEVEL),
        ],
    );
    let Some(offsets) = bq.transposed_offsets() else {
        return y;
    };
    let sums = block_sums(g, hint, x, nb, bs);
    let o = g.init_float(
        &format!("{name}.MatMulNBits.offsets"),
        ft,
        &[nb, n],
        &offsets,
    );
    let correction = g.op("MatMul", hint, &[&sums, &o], vec![]);
    g.op("Add", hint, &[&y, &correction], vec![])
}

/// An activation a linear layer reads, with its rank (3: `[batch, seq, K]` hidden states; 2: the
/// `[rows, K]` rows of the vocabulary projection).
#[derive(Clone, Copy)]
struct Act<'a> {
    name: &'a str,
    rank: usize,
}

impl<'a> Act<'a> {
    /// `[batch, seq, K]` hidden states.
    fn hidden(name: &'a str) -> Self {
        Act { name, rank: 3 }
    }
}

/// The sums of each block of `block` consecutive inputs of the activation `x` (`[…, blocks ·
/// block]`): `ReduceSum(Reshape(x, […, blocks, block]), axes = [-1])`, shaped `[…, blocks]`.
fn block_sums(g: &mut GraphBuilder, hint: &str, x: Act<'_>, blocks: i64, block: i64) -> String {
    let shape = format!("const/block_shape_r{}_{blocks}x{block}", x.rank);
    if !g.initializers.iter().any(|t| t.name == shape) {
        // 0 keeps the input's dimension (Reshape's allowzero = 0).
        let mut dims = vec![0; x.rank - 1];
        dims.extend([blocks, block]);
        g.const_i64(&shape, &[dims.len() as i64], &dims);
    }
    let r = g.op("Reshape", hint, &[x.name, &shape], vec![]);
    let axes = "const/axes_-1".to_string();
    if !g.initializers.iter().any(|t| t.name == axes) {
        g.const_i64(&axes, &[1], &[-1]);
    }
    g.op("ReduceSum", hint, &[&r, &axes], vec![attr_i("keepdims", 0)])
}

/// IR version written (ONNX Runtime 1.31 reads up to 13; 8 is the IR of opsets 17/18's era).
pub const IR_VERSION: i64 = 8;
