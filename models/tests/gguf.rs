//! GGUF import on tiny files written by the test the way llama.cpp's converter writes them.

mod common;

use anyhow::Result;
use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, IndexOp, Tensor};
use common::{max_abs_diff, tiny_gguf_config, write_tiny_gguf, F32_LOGIT_ATOL, Q8_0_WEIGHT_ATOL};
use steper_models::gguf::import_gguf;
use steper_models::{Checkpoint, Weights};

#[test]
fn f32_gguf_imports_exactly_and_unpermutes_qk() -> Result<()> {
    let cfg = tiny_gguf_config();
    let w = Weights::random(&cfg, 11, &Device::Cpu)?;
    let dir = tempfile::tempdir()?;
    let gguf = dir.path().join("tiny.gguf");
    write_tiny_gguf(&gguf, &cfg, &w, GgmlDType::F32, "llama")?;
    let out = dir.path().join("ckpt");
    let report = import_gguf(&gguf, &out)?;
    assert_eq!(report.tensors, Weights::expected(&cfg).len());
    let ck = Checkpoint::load(&out, DType::F32, &Device::Cpu)?;
    assert_eq!(ck.config.num_hidden_layers, cfg.num_hidden_layers);
    assert_eq!(ck.config.kv_heads(), cfg.kv_heads());
    for (k, t) in w.tensors() {
        let d = max_abs_diff(
            &t.flatten_all()?.to_vec1()?,
            &ck.weights.tensors()[k].flatten_all()?.to_vec1()?,
        );
        assert_eq!(d, 0.0, "{k}");
    }
    // The quantized_llama reference runs the *permuted* GGUF weights with interleaved RoPE; the
    // imported HF-layout model must give the same logits.
    let mut file = std::fs::File::open(&gguf)?;
    let content = candle_core::quantized::gguf_file::Content::read(&mut file)?;
    let mut reference = candle_transformers::models::quantized_llama::ModelWeights::from_gguf(
        content,
        &mut file,
        &Device::Cpu,
    )?;
    let model = ck.model()?;
    let ids: Vec<u32> = vec![5, 80, 33, 200, 7, 19, 120];
    let full = model.forward(
        &Tensor::new(ids.as_slice(), &Device::Cpu)?.unsqueeze(0)?,
        None,
    )?;
    let theirs: Vec<f32> = reference
        .forward(&Tensor::new(ids.as_slice(), &Device::Cpu)?.unsqueeze(0)?, 0)?
        .flatten_all()?
        .to_vec1()?;
    let d = max_abs_diff(&full.i((0, ids.len() - 1))?.to_vec1()?, &theirs);
    assert!(d <= F32_LOGIT_ATOL, "logit diff vs quantized_llama: {d}");
    // The rebuilt tokenizer uses the GGUF merges and specials.
    let tok = ck.tokenizer()?;
    let enc = tok
        .encode("the theme<|im_end|>", false)
        .map_err(anyhow::Error::msg)?;
    let toks: Vec<&str> = enc.get_tokens().iter().map(|s| s.as_str()).collect();
    assert_eq!(toks, vec!["the", "Ġthe", "m", "e", "<|im_end|>"]);
    Ok(())
}

#[test]
fn q8_0_gguf_dequantizes_within_tolerance() -> Result<()> {
    let cfg = tiny_gguf_config();
    let w = Weights::random(&cfg, 12, &Device::Cpu)?;
    let dir = tempfile::tempdir()?;
    let gguf = dir.path().join("tiny-q8.gguf");
    write_tiny_gguf(&gguf, &cfg, &w, GgmlDType::Q8_0, "llama")?;
    let out = dir.path().join("ckpt");
    let report = import_gguf(&gguf, &out)?;
    assert!(
        report.source_types.contains_key("Q8_0"),
        "{:?}",
        report.source_types
    );
    let ck = Checkpoint::load(&out, DType::F32, &Device::Cpu)?;
    for (k, t) in w.tensors() {
        let d = max_abs_diff(
            &t.flatten_all()?.to_vec1()?,
            &ck.weights.tensors()[k].flatten_all()?.to_vec1()?,
        );
        assert!(d <= Q8_0_WEIGHT_ATOL, "{k}: {d}");
    }
    Ok(())
}

fn assert_fails_and_writes_nothing(gguf: &std::path::Path, out: &std::path::Path, needle: &str) {
    let err = match import_gguf(gguf, out) {
        Ok(_) => panic!("import of {} should fail", gguf.display()),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains(needle),
        "error {err:?} should mention {needle:?}"
    );
    assert!(!out.exists(), "{} was created", out.display());
    let parent = out.parent().unwrap();
    let leftovers: Vec<_> = std::fs::read_dir(parent)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("tmp"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
}

#[test]
fn truncated_corrupted_and_foreign_files_fail_cleanly() -> Result<()> {
    let cfg = tiny_gguf_config();
    let w = Weights::random(&cfg, 13, &Device::Cpu)?;
    let dir = tempfile::tempdir()?;
    let good = dir.path().join("good.gguf");
    write_tiny_gguf(&good, &cfg, &w, GgmlDType::Q8_0, "llama")?;
    let bytes = std::fs::read(&good)?;
    let out = dir.path().join("out");

    // Truncated inside the tensor data.
    let cut = dir.path().join("cut.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() - 1000])?;
    assert_fails_and_writes_nothing(&cut, &out, "past the end of the file");
    // Truncated inside the metadata.
    let cut2 = dir.path().join("cut2.gguf");
    std::fs::write(&cut2, &bytes[..300])?;
    assert_fails_and_writes_nothing(&cut2, &out, "cut2.gguf");
    // Not a GGUF at all (bad magic).
    let junk = dir.path().join("junk.gguf");
    let mut b = bytes.clone();
    b[0..4].copy_from_slice(b"JUNK");
    std::fs::write(&junk, &b)?;
    assert_fails_and_writes_nothing(&junk, &out, "not a readable GGUF");
    // A huge declared string length in the metadata.
    let big = dir.path().join("big.gguf");
    let mut b = bytes.clone();
    b[24..32].copy_from_slice(&u64::MAX.to_le_bytes());
    std::fs::write(&big, &b)?;
    assert_fails_and_writes_nothing(&big, &out, "big.gguf");
    // Another architecture.
    let gpt2 = dir.path().join("gpt2.gguf");
    write_tiny_gguf(&gpt2, &cfg, &w, GgmlDType::F32, "gpt2")?;
    assert_fails_and_writes_nothing(&gpt2, &out, "architecture `gpt2`");
    // Missing file.
    assert_fails_and_writes_nothing(&dir.path().join("absent.gguf"), &out, "absent.gguf");
    // A non-empty output directory is refused and left alone.
    std::fs::create_dir_all(&out)?;
    std::fs::write(out.join("keep.txt"), b"x")?;
    let err = import_gguf(&good, &out)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(err.contains("not empty"), "{err}");
    assert!(out.join("keep.txt").exists());
    Ok(())
}
