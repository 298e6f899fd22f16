//! GGUF import of a tiny Qwen2 written by the test the way llama.cpp's `Qwen2Model` converter
//! writes it (`general.architecture = qwen2`, `qwen2.*` keys, q/k/v biases as
//! `blk.N.attn_q.bias`, Q/K rows not permuted, `tokenizer.ggml.pre = qwen2`).

mod common;

use anyhow::Result;
use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, IndexOp, Tensor};
use common::{max_abs_diff, tiny_byte_vocab, write_family_gguf, F32_LOGIT_ATOL};
use steper_models::gguf::import_gguf;
use steper_models::{Checkpoint, LlamaConfig, Weights};

fn tiny_qwen2_gguf_config() -> LlamaConfig {
    let mut cfg = LlamaConfig::tiny_qwen2(tiny_byte_vocab().0.len());
    cfg.max_position_embeddings = 256;
    // What the GGUF metadata carries (the sliding-window fields have no GGUF key).
    cfg.use_sliding_window = None;
    cfg.sliding_window = None;
    cfg.max_window_layers = None;
    cfg.hidden_act = None;
    cfg
}

/// Random weights with biases large enough to matter (std 0.5).
fn weights(cfg: &LlamaConfig, seed: u64) -> Result<Weights> {
    let mut w = Weights::random(cfg, seed, &Device::Cpu)?;
    let names: Vec<String> = w.tensors().keys().cloned().collect();
    for k in names.iter().filter(|k| k.ends_with(".bias")) {
        let t = (w.tensors()[k].clone() * 25.0)?;
        w.insert(k.clone(), t);
    }
    Ok(w)
}

#[test]
fn f32_qwen2_gguf_imports_exactly_and_matches_quantized_qwen2() -> Result<()> {
    let cfg = tiny_qwen2_gguf_config();
    for tied in [true, false] {
        let mut cfg = cfg.clone();
        cfg.tie_word_embeddings = tied;
        let w = weights(&cfg, 41)?;
        let dir = tempfile::tempdir()?;
        let gguf = dir.path().join("tiny-qwen2.gguf");
        write_family_gguf(&gguf, &cfg, &w, GgmlDType::F32, "qwen2", "qwen2")?;
        let out = dir.path().join("ckpt");
        let report = import_gguf(&gguf, &out)?;
        assert_eq!(report.tensors, Weights::expected(&cfg).len());
        assert_eq!(report.pre_tokenizer, "qwen2");
        let ck = Checkpoint::load(&out, DType::F32, &Device::Cpu)?;
        assert_eq!(ck.config.model_type, "qwen2");
        assert_eq!(
            ck.config.architectures,
            vec!["Qwen2ForCausalLM".to_string()]
        );
        assert_eq!(ck.config.rope_theta, cfg.rope_theta);
        assert_eq!(ck.config.tie_word_embeddings, tied);
        // Every tensor, biases included, exactly as written: no Q/K permutation for Qwen2.
        for (k, t) in w.tensors() {
            let got = ck
                .weights
                .tensors()
                .get(k)
                .ok_or_else(|| anyhow::anyhow!("{k} not imported"))?;
            let d = max_abs_diff(&t.flatten_all()?.to_vec1()?, &got.flatten_all()?.to_vec1()?);
            assert_eq!(d, 0.0, "{k}");
        }
        // candle-transformers' quantized_qwen2 reads the GGUF as llama.cpp lays it out; the
        // imported HF-layout model must give its logits.
        let mut file = std::fs::File::open(&gguf)?;
        let content = candle_core::quantized::gguf_file::Content::read(&mut file)?;
        let mut reference = candle_transformers::models::quantized_qwen2::ModelWeights::from_gguf(
            content,
            &mut file,
            &Device::Cpu,
        )?;
        let ids: Vec<u32> = vec![5, 80, 33, 200, 7, 19, 120];
        let x = Tensor::new(ids.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
        let ours = ck.model()?.forward(&x, None)?;
        let theirs: Vec<f32> = reference.forward(&x, 0)?.flatten_all()?.to_vec1()?;
        let d = max_abs_diff(&ours.i((0, ids.len() - 1))?.to_vec1()?, &theirs);
        assert!(
            d <= F32_LOGIT_ATOL,
            "tied={tied}: logit diff vs quantized_qwen2: {d}"
        );
    }
    Ok(())
}

/// The `Split` + `ByteLevel` pre-tokenizer and NFC normalizer of Qwen2.5's `tokenizer.json`, as
/// transformers' `Qwen2Converter` writes them.
const QWEN2_TOKENIZER_PARTS: &str = r#"{
  "normalizer": {"type": "NFC"},
  "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
    {"type": "Split",
     "pattern": {"Regex": "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"},
     "behavior": "Isolated", "invert": false},
    {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false}
  ]}
}"#;

#[test]
fn qwen2_tokenizer_metadata_rebuilds_qwens_pre_tokenizer_and_specials() -> Result<()> {
    use tokenizers::{NormalizedString, Normalizer, PreTokenizedString, PreTokenizer};
    let cfg = tiny_qwen2_gguf_config();
    let w = weights(&cfg, 42)?;
    let dir = tempfile::tempdir()?;
    let gguf = dir.path().join("tok.gguf");
    write_family_gguf(&gguf, &cfg, &w, GgmlDType::F32, "qwen2", "qwen2")?;
    let out = dir.path().join("ckpt");
    import_gguf(&gguf, &out)?;
    let tok = Checkpoint::load(&out, DType::F32, &Device::Cpu)?.tokenizer()?;

    let parts: serde_json::Value = serde_json::from_str(QWEN2_TOKENIZER_PARTS)?;
    let hf_pre: tokenizers::PreTokenizerWrapper =
        serde_json::from_value(parts["pre_tokenizer"].clone())?;
    let hf_norm: tokenizers::NormalizerWrapper =
        serde_json::from_value(parts["normalizer"].clone())?;
    let ours_pre = tok
        .get_pre_tokenizer()
        .ok_or_else(|| anyhow::anyhow!("no pre-tokenizer"))?;
    let ours_norm = tok
        .get_normalizer()
        .ok_or_else(|| anyhow::anyhow!("no normalizer (Qwen2 normalizes to NFC)"))?;
    let split = |n: &dyn Normalizer, p: &dyn PreTokenizer, text: &str| -> Result<Vec<String>> {
        let mut ns = NormalizedString::from(text);
        n.normalize(&mut ns).map_err(anyhow::Error::msg)?;
        let mut pts = PreTokenizedString::from(ns);
        p.pre_tokenize(&mut pts).map_err(anyhow::Error::msg)?;
        Ok(pts
            .get_splits(
                tokenizers::OffsetReferential::Original,
                tokenizers::OffsetType::Byte,
            )
            .into_iter()
            .map(|(s, _, _)| s.to_string())
            .collect())
    };
    for text in [
        "Paris is the capital of France; it's 2,148,271 people.",
        "Q: Who WON'T   go?\n\nA: 1999\r\n  x",
        "cafe\u{301} naïve — 東京タワー 333m",
    ] {
        let want = split(&hf_norm, &hf_pre, text)?;
        let got = split(ours_norm, ours_pre, text)?;
        assert_eq!(got, want, "{text:?}");
    }
    // One digit per piece (Llama-3 groups three; GPT-2 keeps runs).
    let digits = split(ours_norm, ours_pre, "12345")?;
    assert_eq!(digits.len(), 5, "{digits:?}");
    // The control tokens stay whole, with their ids.
    let enc = tok
        .encode("<|im_start|>the theme<|im_end|>", false)
        .map_err(anyhow::Error::msg)?;
    assert_eq!(enc.get_ids()[0], 1);
    assert_eq!(*enc.get_ids().last().unwrap_or(&0), 2);
    let toks: Vec<&str> = enc.get_tokens().iter().map(|s| s.as_str()).collect();
    assert_eq!(
        toks,
        vec!["<|im_start|>", "the", "Ġthe", "m", "e", "<|im_end|>"]
    );
    Ok(())
}

#[test]
fn a_qwen2_gguf_missing_a_bias_is_refused_naming_the_tensor() -> Result<()> {
    let cfg = tiny_qwen2_gguf_config();
    let w = weights(&cfg, 43)?;
    let mut map = w.tensors().clone();
    map.remove("model.layers.1.self_attn.k_proj.bias");
    let dir = tempfile::tempdir()?;
    let gguf = dir.path().join("nobias.gguf");
    write_family_gguf(
        &gguf,
        &cfg,
        &Weights::from_map(map),
        GgmlDType::F32,
        "qwen2",
        "qwen2",
    )?;
    let out = dir.path().join("out");
    let err = import_gguf(&gguf, &out)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        err.contains("blk.1.attn_k.bias") && err.contains("nobias.gguf"),
        "{err}"
    );
    assert!(!out.exists());
    Ok(())
}
