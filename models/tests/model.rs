//! Public-API tests of the candle model: parity with an independent implementation
//! (`candle_transformers::models::llama`), KV cache, padding, gradients and checkpoints.

mod common;

use anyhow::Result;
use candle_core::{DType, Device, IndexOp, Tensor};
use common::{max_abs_diff, tiny_gqa, F32_LOGIT_ATOL};
use steper_models::{Checkpoint, Llama, LlamaConfig, RopeScaling, Weights};

fn reference_last_logits(
    dir: &std::path::Path,
    cfg: &LlamaConfig,
    ids: &[u32],
) -> Result<Vec<f32>> {
    use candle_transformers::models::llama as reference;
    let rc: reference::LlamaConfig = serde_json::from_str(&cfg.to_json_string())?;
    let rc = rc.into_config(false);
    let vb = unsafe {
        candle_nn::VarBuilder::from_mmaped_safetensors(
            &[dir.join("model.safetensors")],
            DType::F32,
            &Device::Cpu,
        )?
    };
    let model = reference::Llama::load(vb, &rc)?;
    let mut cache = reference::Cache::new(false, DType::F32, &rc, &Device::Cpu)?;
    let x = Tensor::new(ids, &Device::Cpu)?.unsqueeze(0)?;
    let logits = model.forward(&x, 0, &mut cache)?;
    Ok(logits.flatten_all()?.to_vec1()?)
}

fn check_against_reference(cfg: &LlamaConfig, seed: u64) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let w = Weights::random(cfg, seed, &Device::Cpu)?;
    Checkpoint::save(dir.path(), cfg, &w, None)?;
    let ck = Checkpoint::load(dir.path(), DType::F32, &Device::Cpu)?;
    let model = ck.model()?;
    let ids: Vec<u32> = (0..11)
        .map(|i| (i * 7 + 3) % cfg.vocab_size as u32)
        .collect();
    for len in [1usize, 5, 11] {
        let x = Tensor::new(&ids[..len], &Device::Cpu)?.unsqueeze(0)?;
        let ours = model.forward(&x, None)?;
        let last: Vec<f32> = ours.i((0, len - 1))?.to_vec1()?;
        let theirs = reference_last_logits(dir.path(), cfg, &ids[..len])?;
        let d = max_abs_diff(&last, &theirs);
        assert!(d <= F32_LOGIT_ATOL, "len {len}: max abs diff {d}");
    }
    Ok(())
}

#[test]
fn matches_candle_transformers_llama_gqa() -> Result<()> {
    check_against_reference(&tiny_gqa(97), 1)
}

#[test]
fn matches_candle_transformers_llama_tied_and_llama3_rope() -> Result<()> {
    let mut cfg = tiny_gqa(61);
    cfg.tie_word_embeddings = true;
    cfg.rope_theta = 500000.0;
    cfg.rope_scaling = Some(RopeScaling {
        rope_type: "llama3".into(),
        factor: 8.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: 64,
    });
    check_against_reference(&cfg, 2)
}

#[test]
fn kv_cache_matches_full_sequence_token_by_token() -> Result<()> {
    let cfg = tiny_gqa(50);
    let model = Llama::new(&cfg, &Weights::random(&cfg, 3, &Device::Cpu)?)?;
    let ids: Vec<u32> = vec![1, 9, 4, 33, 2, 17, 8, 40, 11, 5];
    let full = model.forward(
        &Tensor::new(ids.as_slice(), &Device::Cpu)?.unsqueeze(0)?,
        None,
    )?;
    let mut cache = model.new_cache(1);
    // A 3-token prefill, then one token at a time.
    let pre = model.forward_cached(
        &Tensor::new(&ids[..3], &Device::Cpu)?.unsqueeze(0)?,
        None,
        &mut cache,
    )?;
    for p in 0..3 {
        let d = max_abs_diff(&pre.i((0, p))?.to_vec1()?, &full.i((0, p))?.to_vec1()?);
        assert!(d <= F32_LOGIT_ATOL, "prefill pos {p}: {d}");
    }
    for (p, &t) in ids.iter().enumerate().skip(3) {
        let step = model.forward_cached(
            &Tensor::new(&[t], &Device::Cpu)?.unsqueeze(0)?,
            None,
            &mut cache,
        )?;
        let d = max_abs_diff(&step.i((0, 0))?.to_vec1()?, &full.i((0, p))?.to_vec1()?);
        assert!(d <= F32_LOGIT_ATOL, "decode pos {p}: {d}");
    }
    assert_eq!(cache.len(), ids.len());
    // Truncating the cache to a prefix and re-extending gives the same logits again.
    cache.truncate(6)?;
    let again = model.forward_cached(
        &Tensor::new(&ids[6..], &Device::Cpu)?.unsqueeze(0)?,
        None,
        &mut cache,
    )?;
    let d = max_abs_diff(&again.i((0, 3))?.to_vec1()?, &full.i((0, 9))?.to_vec1()?);
    assert!(d <= F32_LOGIT_ATOL, "after truncate: {d}");
    Ok(())
}

#[test]
fn left_padding_gives_the_same_rows() -> Result<()> {
    let cfg = tiny_gqa(40);
    let model = Llama::new(&cfg, &Weights::random(&cfg, 4, &Device::Cpu)?)?;
    let a: Vec<u32> = vec![3, 8, 12, 5, 7];
    let b: Vec<u32> = vec![9, 1, 30];
    let batch = Tensor::new(&[[3u32, 8, 12, 5, 7], [0, 0, 9, 1, 30]], &Device::Cpu)?;
    let mask = Tensor::new(&[[1u32, 1, 1, 1, 1], [0, 0, 1, 1, 1]], &Device::Cpu)?;
    let out = model.forward(&batch, Some(&mask))?;
    let la = model.forward(
        &Tensor::new(a.as_slice(), &Device::Cpu)?.unsqueeze(0)?,
        None,
    )?;
    let lb = model.forward(
        &Tensor::new(b.as_slice(), &Device::Cpu)?.unsqueeze(0)?,
        None,
    )?;
    for p in 0..5 {
        let d = max_abs_diff(&out.i((0, p))?.to_vec1()?, &la.i((0, p))?.to_vec1()?);
        assert!(d <= F32_LOGIT_ATOL, "row 0 pos {p}: {d}");
    }
    for p in 0..3 {
        let d = max_abs_diff(&out.i((1, p + 2))?.to_vec1()?, &lb.i((0, p))?.to_vec1()?);
        assert!(d <= F32_LOGIT_ATOL, "row 1 pos {p}: {d}");
    }
    // Cached decoding of the padded batch continues both rows correctly.
    let mut cache = model.new_cache(2);
    model.forward_cached(&batch, Some(&mask), &mut cache)?;
    let next = model.forward_cached(
        &Tensor::new(&[[4u32], [6]], &Device::Cpu)?,
        None,
        &mut cache,
    )?;
    let mut a2 = a.clone();
    a2.push(4);
    let mut b2 = b.clone();
    b2.push(6);
    let ra = model.forward(
        &Tensor::new(a2.as_slice(), &Device::Cpu)?.unsqueeze(0)?,
        None,
    )?;
    let rb = model.forward(
        &Tensor::new(b2.as_slice(), &Device::Cpu)?.unsqueeze(0)?,
        None,
    )?;
    let d0 = max_abs_diff(&next.i((0, 0))?.to_vec1()?, &ra.i((0, 5))?.to_vec1()?);
    let d1 = max_abs_diff(&next.i((1, 0))?.to_vec1()?, &rb.i((0, 3))?.to_vec1()?);
    assert!(d0 <= F32_LOGIT_ATOL && d1 <= F32_LOGIT_ATOL, "{d0} {d1}");
    Ok(())
}

#[test]
fn backward_reaches_every_parameter() -> Result<()> {
    for tied in [false, true] {
        let mut cfg = tiny_gqa(30);
        cfg.tie_word_embeddings = tied;
        let (w, vars) = Weights::random(&cfg, 5, &Device::Cpu)?.into_vars()?;
        let model = Llama::new(&cfg, &w)?;
        let ids = Tensor::new(&[[1u32, 4, 9, 16, 25, 6]], &Device::Cpu)?;
        let logits = model.forward(&ids, None)?;
        let targets = Tensor::new(&[4u32, 9, 16, 25, 6, 2], &Device::Cpu)?;
        let loss = candle_nn::loss::cross_entropy(&logits.squeeze(0)?, &targets)?;
        let grads = loss.backward()?;
        assert_eq!(vars.len(), Weights::expected(&cfg).len());
        for (name, v) in &vars {
            let g = grads
                .get(v.as_tensor())
                .unwrap_or_else(|| panic!("no gradient for {name} (tied={tied})"));
            let norm: f32 = g.sqr()?.sum_all()?.to_scalar()?;
            assert!(
                norm > 0.0 && norm.is_finite(),
                "{name}: gradient norm {norm}"
            );
        }
    }
    Ok(())
}

#[test]
fn sharded_checkpoint_round_trip() -> Result<()> {
    let cfg = tiny_gqa(64);
    let w = Weights::random(&cfg, 6, &Device::Cpu)?;
    let dir = tempfile::tempdir()?;
    Checkpoint::save(dir.path(), &cfg, &w, Some(40_000))?;
    assert!(dir.path().join("model.safetensors.index.json").is_file());
    assert!(!dir.path().join("model.safetensors").exists());
    let shards = std::fs::read_dir(dir.path())?
        .filter(|e| {
            e.as_ref()
                .map(|e| e.file_name().to_string_lossy().starts_with("model-"))
                .unwrap_or(false)
        })
        .count();
    assert!(shards >= 2, "{shards} shards");
    let back = Checkpoint::load(dir.path(), DType::F32, &Device::Cpu)?;
    assert_eq!(back.config, cfg);
    for (k, t) in w.tensors() {
        let u = &back.weights.tensors()[k];
        let d = max_abs_diff(&t.flatten_all()?.to_vec1()?, &u.flatten_all()?.to_vec1()?);
        assert_eq!(d, 0.0, "{k}");
    }
    // Saving again as one file removes the index.
    Checkpoint::save(dir.path(), &cfg, &w, None)?;
    assert!(!dir.path().join("model.safetensors.index.json").exists());
    Checkpoint::load(dir.path(), DType::F32, &Device::Cpu)?;
    Ok(())
}

#[test]
fn bad_checkpoints_are_clear_errors() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let err = Checkpoint::load(dir.path(), DType::F32, &Device::Cpu)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(err.contains("config.json"), "{err}");
    let cfg = tiny_gqa(20);
    let mut w = Weights::random(&cfg, 7, &Device::Cpu)?;
    Checkpoint::save(dir.path(), &cfg, &w, None)?;
    // A config whose layer count does not match the weights names the missing tensor.
    let mut bigger = cfg.clone();
    bigger.num_hidden_layers = 3;
    bigger.save(&dir.path().join("config.json"))?;
    let err = Checkpoint::load(dir.path(), DType::F32, &Device::Cpu)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(err.contains("model.layers.2"), "{err}");
    // A wrong shape is named with both shapes.
    w.insert(
        "model.norm.weight",
        Tensor::zeros(3, DType::F32, &Device::Cpu)?,
    );
    assert!(Checkpoint::save(dir.path(), &cfg, &w, None).is_err());
    // Garbage safetensors.
    cfg.save(&dir.path().join("config.json"))?;
    std::fs::write(dir.path().join("model.safetensors"), b"not safetensors")?;
    let err = Checkpoint::load(dir.path(), DType::F32, &Device::Cpu)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(err.contains("model.safetensors"), "{err}");
    Ok(())
}

#[test]
fn greedy_generation_is_deterministic_and_matches_argmax() -> Result<()> {
    use steper_models::{generate, GenerateOptions, Sampling};
    let cfg = tiny_gqa(40);
    let model = Llama::new(&cfg, &Weights::random(&cfg, 8, &Device::Cpu)?)?;
    let opts = GenerateOptions {
        max_new_tokens: 12,
        stop_ids: vec![],
        sampling: Sampling::Greedy,
    };
    let g = generate(&model, &[1, 2, 3], &opts)?;
    assert_eq!(g.tokens.len(), 12);
    // Each greedy token is the argmax of the full-sequence pass over the text so far.
    let mut seq = vec![1u32, 2, 3];
    for &t in &g.tokens {
        let l = model.forward(
            &Tensor::new(seq.as_slice(), &Device::Cpu)?.unsqueeze(0)?,
            None,
        )?;
        let last: Vec<f32> = l.i((0, seq.len() - 1))?.to_vec1()?;
        assert_eq!(steper_models::generate::argmax(&last), t);
        seq.push(t);
    }
    let s1 = generate(
        &model,
        &[1, 2, 3],
        &GenerateOptions {
            sampling: Sampling::Sample {
                temperature: 0.8,
                top_p: 0.9,
                seed: 1,
            },
            ..opts.clone()
        },
    )?;
    let s2 = generate(
        &model,
        &[1, 2, 3],
        &GenerateOptions {
            sampling: Sampling::Sample {
                temperature: 0.8,
                top_p: 0.9,
                seed: 1,
            },
            ..opts.clone()
        },
    )?;
    assert_eq!(s1.tokens, s2.tokens);
    Ok(())
}
