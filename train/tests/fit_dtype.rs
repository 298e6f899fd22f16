//! Checkpoints written by `fit` keep the student's dtype, layout and companion files.

use anyhow::Result;
use candle_core::{DType, Device};
use steper_models::{Checkpoint, DTypeChoice, LlamaConfig, TokenIds, Weights};
use steper_train::fit::{fit, Example, FitConfig, Stage};

/// Shard limit that splits the tiny bf16 student into several files.
const SMALL_SHARD_BYTES: usize = 12_000;

fn examples() -> Vec<Example> {
    (0..4u32)
        .map(|q| Example {
            stage: [Stage::Init, Stage::Expand, Stage::Aggregate][(q % 3) as usize],
            prompt: (0..6).map(|i| 3 + (q * 5 + i * 3) % 40).collect(),
            target: vec![3 + (q * 7) % 40, 2],
        })
        .collect()
}

fn bf16_student(dir: &std::path::Path) -> Result<LlamaConfig> {
    let mut cfg = LlamaConfig::tiny(48);
    cfg.max_position_embeddings = 64;
    cfg.eos_token_id = Some(TokenIds::Many(vec![2, 5]));
    let w = Weights::random(&cfg, 3, &Device::Cpu)?.to_dtype(DType::BF16)?;
    Checkpoint::save(dir, &cfg, &w, None)?;
    std::fs::write(
        dir.join("generation_config.json"),
        "{\"eos_token_id\": [2, 5, 7]}\n",
    )?;
    std::fs::write(
        dir.join("tokenizer_config.json"),
        "{\"chat_template\": \"{{ messages }}\"}",
    )?;
    Ok(cfg)
}

#[test]
fn fit_writes_the_students_dtype_sharded_with_its_companion_files() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let s = tmp.path().join("student");
    bf16_student(&s)?;
    let out = tmp.path().join("run");
    let cfg = FitConfig {
        steps: 2,
        batch_size: 2,
        warmup: 0,
        save_every: 1,
        max_shard_bytes: SMALL_SHARD_BYTES,
        ..Default::default()
    };
    let summary = fit(&s, &examples(), &[], &cfg, &out, false)?;
    assert!(summary.finished);
    assert!(out.join("model.safetensors.index.json").is_file());
    assert!(!out.join("model.safetensors").exists());
    let ck = Checkpoint::load_with(&out, DTypeChoice::BF16, &Device::Cpu)?;
    assert_eq!(ck.stored_dtype, DType::BF16);
    for (k, t) in ck.weights.tensors() {
        assert_eq!(t.dtype(), DType::BF16, "{k}");
    }
    let cfg_text = std::fs::read_to_string(out.join("config.json"))?;
    assert!(cfg_text.contains("\"bfloat16\""), "{cfg_text}");
    assert_eq!(ck.eos_ids(), vec![2, 5, 7]);
    for name in ["generation_config.json", "tokenizer_config.json"] {
        assert_eq!(
            std::fs::read(s.join(name))?,
            std::fs::read(out.join(name))?,
            "{name}"
        );
    }
    // The intermediate checkpoints are written the same way.
    let step1 = out.join("checkpoints").join("step-00000001");
    assert!(
        step1.join("model.safetensors.index.json").is_file(),
        "{}",
        step1.display()
    );
    assert!(step1.join("generation_config.json").is_file());
    // Training changed the weights (the bf16 rounding did not swallow the update).
    let before = Checkpoint::load(&s, DType::F32, &Device::Cpu)?;
    let after = Checkpoint::load(&out, DType::F32, &Device::Cpu)?;
    let name = "model.layers.1.mlp.down_proj.weight";
    let a: Vec<f32> = before.weights.tensors()[name].flatten_all()?.to_vec1()?;
    let b: Vec<f32> = after.weights.tensors()[name].flatten_all()?.to_vec1()?;
    assert!(a.iter().zip(&b).any(|(x, y)| x != y), "{name} unchanged");
    Ok(())
}
