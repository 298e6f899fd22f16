//! Qwen2 and Llama-3 on tiny random configs made here, against independent implementations
//! (`candle_transformers::models::{qwen2, llama}`): prefill logits and 8 cached decode steps;
//! every parameter (the q/k/v biases included) receives a gradient; LoRA on a Qwen2 model.

mod common;

use anyhow::Result;
use candle_core::{DType, Device, IndexOp, Module, Tensor};
use common::{max_abs_diff, F32_LOGIT_ATOL};
use steper_models::arch::Projection;
use steper_models::lora::{init_adapters, merge};
use steper_models::{Checkpoint, Llama, LlamaConfig, LoraConfig, LoraTarget, RopeScaling, Weights};

/// Decode steps compared after the prefill.
const DECODE_STEPS: usize = 8;

/// The prompt of every comparison.
const PROMPT: [u32; 9] = [3, 17, 42, 8, 91, 5, 60, 33, 12];

/// Standard deviation the tests give the q/k/v biases (`Weights::random` draws 0.02, too small
/// to move the logits much): large enough that a model ignoring them fails the comparison.
const BIAS_STD: f64 = 0.5;

/// A tiny Qwen2: GQA (4 query heads, 2 KV heads), biases on q/k/v, RoPE base 1e6.
fn tiny_qwen2(tied: bool) -> LlamaConfig {
    let mut cfg = LlamaConfig::tiny_qwen2(128);
    cfg.tie_word_embeddings = tied;
    cfg.intermediate_size = 96;
    cfg
}

/// A tiny Llama-3.2: tied embeddings, llama3 `rope_scaling`, RoPE base 5e5, GQA.
fn tiny_llama3() -> LlamaConfig {
    let mut cfg = LlamaConfig::tiny(128);
    cfg.tie_word_embeddings = true;
    cfg.rope_theta = 500000.0;
    cfg.rope_scaling = Some(RopeScaling {
        rope_type: "llama3".into(),
        factor: 32.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: 16,
    });
    cfg
}

/// Random weights with the biases scaled to [`BIAS_STD`].
fn weights(cfg: &LlamaConfig, seed: u64) -> Result<Weights> {
    let mut w = Weights::random(cfg, seed, &Device::Cpu)?;
    let biases: Vec<String> = w
        .tensors()
        .keys()
        .filter(|k| k.ends_with(".bias"))
        .cloned()
        .collect();
    for k in biases {
        let t = (w.tensors()[&k].clone() * (BIAS_STD / 0.02))?;
        w.insert(k, t);
    }
    Ok(w)
}

/// Our logits: the prefill (every position), then one token at a time with the KV cache.
/// Returns the prefill logits `[seq, vocab]` and each decode step's logits.
fn ours(model: &Llama, prompt: &[u32], steps: &[u32]) -> Result<(Tensor, Vec<Vec<f32>>)> {
    let mut cache = model.new_cache(1);
    let x = Tensor::new(prompt, &Device::Cpu)?.unsqueeze(0)?;
    let pre = model.forward_cached(&x, None, &mut cache)?.squeeze(0)?;
    let mut out = Vec::new();
    for &t in steps {
        let x = Tensor::new(&[[t]], &Device::Cpu)?;
        let lg = model.forward_cached(&x, None, &mut cache)?;
        out.push(lg.i((0, 0))?.to_vec1()?);
    }
    Ok((pre, out))
}

/// The decode inputs: our greedy tokens after the prompt (so both models see the same ids).
fn greedy_steps(model: &Llama, prompt: &[u32]) -> Result<Vec<u32>> {
    let mut ids = prompt.to_vec();
    let mut steps = Vec::new();
    let mut cache = model.new_cache(1);
    let mut next = Tensor::new(prompt, &Device::Cpu)?.unsqueeze(0)?;
    for _ in 0..DECODE_STEPS {
        let lg = model.forward_cached(&next, None, &mut cache)?;
        let last = lg.i((0, lg.dim(1)? - 1))?;
        let t = last.argmax(0)?.to_scalar::<u32>()?;
        steps.push(t);
        ids.push(t);
        next = Tensor::new(&[[t]], &Device::Cpu)?;
    }
    Ok(steps)
}

fn var_builder(dir: &std::path::Path) -> Result<candle_nn::VarBuilder<'static>> {
    Ok(unsafe {
        candle_nn::VarBuilder::from_mmaped_safetensors(
            &[dir.join("model.safetensors")],
            DType::F32,
            &Device::Cpu,
        )?
    })
}

fn assert_close(what: &str, a: &[f32], b: &[f32]) {
    let d = max_abs_diff(a, b);
    assert!(d <= F32_LOGIT_ATOL, "{what}: max |Δlogit| {d:e}");
}

/// candle-transformers' Qwen2: full-sequence hidden states through its own LM head (its
/// `ModelForCausalLM` keeps the last position only), then cached steps.
fn check_qwen2(cfg: &LlamaConfig, seed: u64) -> Result<()> {
    use candle_transformers::models::qwen2 as reference;
    let dir = tempfile::tempdir()?;
    let w = weights(cfg, seed)?;
    Checkpoint::save(dir.path(), cfg, &w, None)?;
    let model = Checkpoint::load(dir.path(), DType::F32, &Device::Cpu)?.model()?;
    let steps = greedy_steps(&model, &PROMPT)?;
    let (pre, dec) = ours(&model, &PROMPT, &steps)?;

    let rc: reference::Config = serde_json::from_str(&cfg.to_json_string())?;
    let vb = var_builder(dir.path())?;
    let mut base = reference::Model::new(&rc, vb.clone())?;
    let head = if cfg.tie_word_embeddings {
        vb.get(
            (cfg.vocab_size, cfg.hidden_size),
            "model.embed_tokens.weight",
        )?
    } else {
        vb.get((cfg.vocab_size, cfg.hidden_size), "lm_head.weight")?
    };
    let head = candle_nn::Linear::new(head, None);
    let x = Tensor::new(&PROMPT, &Device::Cpu)?.unsqueeze(0)?;
    let theirs = head.forward(&base.forward(&x, 0, None)?)?.squeeze(0)?;
    for p in 0..PROMPT.len() {
        assert_close(
            &format!("qwen2 prefill position {p}"),
            &pre.i(p)?.to_vec1()?,
            &theirs.i(p)?.to_vec1()?,
        );
    }
    for (i, (&t, mine)) in steps.iter().zip(&dec).enumerate() {
        let x = Tensor::new(&[[t]], &Device::Cpu)?;
        let h = base.forward(&x, PROMPT.len() + i, None)?;
        let theirs: Vec<f32> = head.forward(&h)?.flatten_all()?.to_vec1()?;
        assert_close(&format!("qwen2 decode step {i}"), mine, &theirs);
    }

    // The biases matter: without them the logits move far beyond the tolerance.
    let mut unbiased = w.clone();
    for (k, t) in w.tensors() {
        if k.ends_with(".bias") {
            unbiased.insert(k.clone(), t.zeros_like()?);
        }
    }
    let plain = Llama::new(cfg, &unbiased)?.forward(&x, None)?.squeeze(0)?;
    let d = max_abs_diff(
        &plain.flatten_all()?.to_vec1()?,
        &pre.flatten_all()?.to_vec1()?,
    );
    assert!(
        d > 100.0 * F32_LOGIT_ATOL,
        "biases change the logits by only {d:e}"
    );
    Ok(())
}

#[test]
fn qwen2_tied_matches_candle_transformers_prefill_and_decode() -> Result<()> {
    check_qwen2(&tiny_qwen2(true), 21)
}

#[test]
fn qwen2_untied_matches_candle_transformers_prefill_and_decode() -> Result<()> {
    check_qwen2(&tiny_qwen2(false), 22)
}

/// candle-transformers' Llama returns the last position's logits only: compared at the end of
/// the prefill, then at each cached step.
#[test]
fn llama3_tied_scaled_rope_gqa_matches_candle_transformers_prefill_and_decode() -> Result<()> {
    use candle_transformers::models::llama as reference;
    let cfg = tiny_llama3();
    let dir = tempfile::tempdir()?;
    Checkpoint::save(dir.path(), &cfg, &weights(&cfg, 23)?, None)?;
    let model = Checkpoint::load(dir.path(), DType::F32, &Device::Cpu)?.model()?;
    let steps = greedy_steps(&model, &PROMPT)?;
    let (pre, dec) = ours(&model, &PROMPT, &steps)?;

    let rc: reference::LlamaConfig = serde_json::from_str(&cfg.to_json_string())?;
    let rc = rc.into_config(false);
    let reference = reference::Llama::load(var_builder(dir.path())?, &rc)?;
    let mut cache = reference::Cache::new(true, DType::F32, &rc, &Device::Cpu)?;
    let x = Tensor::new(&PROMPT, &Device::Cpu)?.unsqueeze(0)?;
    let theirs: Vec<f32> = reference
        .forward(&x, 0, &mut cache)?
        .flatten_all()?
        .to_vec1()?;
    assert_close(
        "llama3 prefill last position",
        &pre.i(PROMPT.len() - 1)?.to_vec1()?,
        &theirs,
    );
    for (i, (&t, mine)) in steps.iter().zip(&dec).enumerate() {
        let x = Tensor::new(&[[t]], &Device::Cpu)?;
        let theirs: Vec<f32> = reference
            .forward(&x, PROMPT.len() + i, &mut cache)?
            .flatten_all()?
            .to_vec1()?;
        assert_close(&format!("llama3 decode step {i}"), mine, &theirs);
    }
    Ok(())
}

#[test]
fn every_qwen2_parameter_and_bias_receives_a_gradient() -> Result<()> {
    for tied in [true, false] {
        let cfg = tiny_qwen2(tied);
        let (w, vars) = weights(&cfg, 24)?.into_vars()?;
        assert_eq!(vars.len(), Weights::expected(&cfg).len());
        let biases = vars.iter().filter(|(n, _)| n.ends_with(".bias")).count();
        assert_eq!(biases, 3 * cfg.num_hidden_layers, "q/k/v biases per layer");
        let model = Llama::new(&cfg, &w)?;
        let ids = Tensor::new(&[[1u32, 4, 9, 16, 25, 36, 49]], &Device::Cpu)?;
        let logits = model.forward(&ids.narrow(1, 0, 6)?, None)?;
        let targets = ids.narrow(1, 1, 6)?.squeeze(0)?;
        let loss = candle_nn::loss::cross_entropy(&logits.squeeze(0)?, &targets)?;
        let grads = loss.backward()?;
        for (name, v) in &vars {
            let g = grads
                .get(v.as_tensor())
                .ok_or_else(|| anyhow::anyhow!("no gradient for {name} (tied={tied})"))?;
            let norm: f32 = g.sqr()?.sum_all()?.to_scalar()?;
            assert!(
                norm > 0.0 && norm.is_finite(),
                "{name}: gradient norm {norm}"
            );
        }
    }
    Ok(())
}

/// The bias gradient is the sum over positions of the projection's output gradient: checked
/// against a central finite difference of the loss for a few bias entries.
#[test]
fn qwen2_bias_gradient_matches_finite_differences() -> Result<()> {
    /// f32 central differences of a loss near 4.8 with step 1e-2: truncation O(h²) plus
    /// rounding ~1e-7 / h; relative to the largest checked gradient.
    const FD_RTOL: f32 = 2e-2;
    const STEP: f32 = 1e-2;
    let cfg = tiny_qwen2(true);
    let base = weights(&cfg, 25)?;
    let ids = Tensor::new(&[[1u32, 4, 9, 16, 25, 36, 49]], &Device::Cpu)?;
    let targets = ids.narrow(1, 1, 6)?.squeeze(0)?;
    let loss_of = |w: &Weights| -> Result<Tensor> {
        let logits = Llama::new(&cfg, w)?.forward(&ids.narrow(1, 0, 6)?, None)?;
        Ok(candle_nn::loss::cross_entropy(
            &logits.squeeze(0)?,
            &targets,
        )?)
    };
    let (wv, vars) = base.clone().into_vars()?;
    let grads = loss_of(&wv)?.backward()?;
    let mut checked = Vec::new();
    for p in [Projection::Q, Projection::K, Projection::V] {
        let name = p.bias_name(1);
        let (_, var) = vars
            .iter()
            .find(|(n, _)| *n == name)
            .ok_or_else(|| anyhow::anyhow!("no var {name}"))?;
        let g: Vec<f32> = grads
            .get(var.as_tensor())
            .ok_or_else(|| anyhow::anyhow!("no gradient for {name}"))?
            .to_vec1()?;
        for idx in [0usize, 5, 17] {
            let b: Vec<f32> = base.tensors()[&name].to_vec1()?;
            let mut num = [0f32; 2];
            for (s, sign) in [1f32, -1.0].iter().enumerate() {
                let mut bb = b.clone();
                bb[idx] += sign * STEP;
                let mut w = base.clone();
                w.insert(name.clone(), Tensor::new(bb.as_slice(), &Device::Cpu)?);
                num[s] = loss_of(&w)?.to_scalar()?;
            }
            checked.push((name.clone(), idx, g[idx], (num[0] - num[1]) / (2.0 * STEP)));
        }
    }
    let scale = checked.iter().map(|c| c.2.abs()).fold(0f32, f32::max);
    assert!(scale > 0.0, "all checked bias gradients are zero");
    for (name, idx, analytic, numeric) in checked {
        assert!(
            (analytic - numeric).abs() <= FD_RTOL * scale,
            "{name}[{idx}]: backward {analytic:e} vs finite difference {numeric:e}"
        );
    }
    Ok(())
}

#[test]
fn lora_on_qwen2_trains_and_merges() -> Result<()> {
    /// Merged vs unmerged logits: the same sums in another order (f32).
    const MERGE_ATOL: f32 = 1e-4;
    let cfg = tiny_qwen2(true);
    let dev = Device::Cpu;
    let base = weights(&cfg, 26)?;
    let lora = LoraConfig {
        rank: 4,
        alpha: 8.0,
        targets: LoraTarget::ALL.to_vec(),
    };
    let mut adapters = init_adapters(&cfg, &base, &lora, 0..cfg.num_hidden_layers, 3, &dev)?;
    let names: Vec<String> = adapters.tensors().keys().cloned().collect();
    for k in &names {
        if k.ends_with(".lora_b") {
            let t = Tensor::rand(-0.3f32, 0.3, adapters.tensors()[k].dims(), &dev)?;
            adapters.insert(k.clone(), t);
        }
    }
    let (av, vars) = adapters.clone().into_vars()?;
    let ids = Tensor::new(&[[2u32, 7, 19, 40, 3, 77]], &dev)?;
    let model = Llama::new(&cfg, &base)?.with_lora(&av, lora.scale())?;
    let logits = model.forward(&ids, None)?;
    let loss = candle_nn::loss::cross_entropy(
        &logits.squeeze(0)?.narrow(0, 0, 5)?,
        &ids.squeeze(0)?.narrow(0, 1, 5)?,
    )?;
    let grads = loss.backward()?;
    for (name, v) in &vars {
        let g = grads
            .get(v.as_tensor())
            .ok_or_else(|| anyhow::anyhow!("no gradient for adapter {name}"))?;
        let norm: f32 = g.sqr()?.sum_all()?.to_scalar()?;
        assert!(norm > 0.0, "{name}: zero gradient");
    }
    let merged = Llama::new(&cfg, &merge(&base, &adapters, lora.scale())?)?.forward(&ids, None)?;
    let d = max_abs_diff(
        &merged.flatten_all()?.to_vec1()?,
        &logits.flatten_all()?.to_vec1()?,
    );
    assert!(d <= MERGE_ATOL, "merged vs unmerged LoRA on Qwen2: {d:e}");
    Ok(())
}

#[test]
fn a_qwen2_checkpoint_missing_a_bias_names_it() -> Result<()> {
    let cfg = tiny_qwen2(true);
    let mut w = weights(&cfg, 27)?;
    let mut map = w.tensors().clone();
    map.remove("model.layers.1.self_attn.k_proj.bias");
    w = Weights::from_map(map);
    let e = Llama::new(&cfg, &w)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(e.contains("model.layers.1.self_attn.k_proj.bias"), "{e}");
    let dir = tempfile::tempdir()?;
    let mut path = dir.path().to_path_buf();
    path.push("config.json");
    let mut v: serde_json::Value = serde_json::from_str(&cfg.to_json_string())?;
    v["model_type"] = serde_json::json!("gemma");
    std::fs::write(&path, v.to_string())?;
    let e = LlamaConfig::from_file(&path).unwrap_err().to_string();
    assert!(
        e.contains("gemma") && e.contains("qwen2") && e.contains("llama"),
        "{e}"
    );
    Ok(())
}
