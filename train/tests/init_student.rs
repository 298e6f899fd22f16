//! Random students shaped like released models: an existing tokenizer, a padded vocabulary, the
//! Qwen2 family; bad input names what was wrong.

use anyhow::Result;
use steper_models::Checkpoint;
use steper_train::student::{init_student_with_tokenizer, StudentSpec};

/// SmolLM2's tokenizer: 49,152 tokens, `<|im_end|>` is id 2.
const SMOLLM2_VOCAB: usize = 49_152;

fn small(vocab_size: usize) -> StudentSpec {
    StudentSpec {
        vocab_size,
        layers: 2,
        hidden: 32,
        heads: 4,
        kv_heads: 2,
        intermediate: 64,
        context: 128,
        seed: 1,
    }
}

#[test]
fn qwen2_student_with_smollm2_tokenizer_and_padded_vocabulary() -> Result<()> {
    let tok = steper_test_support::smollm2_tokenizer()?;
    let dir = tempfile::tempdir()?;
    let out = dir.path().join("qwen");
    let padded = SMOLLM2_VOCAB + 64;
    let cfg = init_student_with_tokenizer(&tok, &small(padded), "qwen2", "<|im_end|>", &out)?;
    assert_eq!(cfg.model_type, "qwen2");
    assert_eq!(cfg.vocab_size, padded);
    assert_eq!(cfg.max_window_layers, Some(2));
    let ck = Checkpoint::load(&out, candle_core::DType::F32, &candle_core::Device::Cpu)?;
    assert_eq!(ck.config.model_type, "qwen2");
    assert_eq!(ck.eos_ids(), vec![2]);
    let t = ck.weights.tensors();
    assert_eq!(t["model.embed_tokens.weight"].dims(), &[padded, 32]);
    assert!(
        t.contains_key("model.layers.0.self_attn.q_proj.bias"),
        "a qwen2 student has q/k/v biases"
    );
    assert!(out.join("tokenizer.json").is_file());
    Ok(())
}

#[test]
fn default_vocabulary_is_the_tokenizers() -> Result<()> {
    let tok = steper_test_support::smollm2_tokenizer()?;
    let dir = tempfile::tempdir()?;
    let cfg = init_student_with_tokenizer(
        &tok,
        &small(0),
        "llama",
        "<|endoftext|>",
        &dir.path().join("llama"),
    )?;
    assert_eq!(cfg.model_type, "llama");
    assert_eq!(cfg.vocab_size, SMOLLM2_VOCAB);
    assert_eq!(cfg.eos_ids(), vec![0]);
    Ok(())
}

#[test]
fn bad_shapes_and_names_are_refused_naming_them() -> Result<()> {
    let tok = steper_test_support::smollm2_tokenizer()?;
    let dir = tempfile::tempdir()?;
    let too_small = init_student_with_tokenizer(
        &tok,
        &small(100),
        "llama",
        "<|im_end|>",
        &dir.path().join("a"),
    )
    .expect_err("a vocabulary smaller than the tokenizer's")
    .to_string();
    assert!(
        too_small.contains("100") && too_small.contains("49152"),
        "{too_small}"
    );
    let eos =
        init_student_with_tokenizer(&tok, &small(0), "llama", "<|nope|>", &dir.path().join("b"))
            .expect_err("an end token the tokenizer lacks")
            .to_string();
    assert!(eos.contains("<|nope|>"), "{eos}");
    let family = init_student_with_tokenizer(
        &tok,
        &small(0),
        "gemma",
        "<|im_end|>",
        &dir.path().join("c"),
    )
    .expect_err("a family students cannot be made of")
    .to_string();
    assert!(
        family.contains("gemma") && family.contains("qwen2"),
        "{family}"
    );
    let missing = init_student_with_tokenizer(
        &dir.path().join("absent.json"),
        &small(0),
        "llama",
        "<|im_end|>",
        &dir.path().join("d"),
    )
    .expect_err("a tokenizer file that does not exist")
    .to_string();
    assert!(missing.contains("absent.json"), "{missing}");
    for d in ["a", "b", "c", "d"] {
        assert!(
            !dir.path().join(d).exists(),
            "{d}: nothing written on refusal"
        );
    }
    Ok(())
}
