//! Checkpoints as users have them: bf16 / f16 safetensors, sharded with an index,
//! `generation_config.json` with several end ids, and the errors of a broken directory.

mod common;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use common::tiny_gqa;
use steper_models::{
    generate, Checkpoint, DTypeChoice, Error, GenerateOptions, Sampling, TokenIds, Weights,
};

/// Shard limit that splits the tiny model's bf16 weights (~45 kB) into several files.
const SMALL_SHARD_BYTES: usize = 12_000;

fn shard_files(dir: &std::path::Path) -> Result<Vec<String>> {
    let mut v: Vec<String> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("model-") && n.ends_with(".safetensors"))
        .collect();
    v.sort();
    Ok(v)
}

fn tensor_bytes(t: &Tensor) -> Result<Vec<u8>> {
    // bf16 / f16 as their raw 16-bit patterns, so "equal" means bit-exact.
    Ok(match t.dtype() {
        DType::BF16 => t
            .flatten_all()?
            .to_vec1::<half::bf16>()?
            .iter()
            .flat_map(|x| x.to_bits().to_le_bytes())
            .collect(),
        DType::F16 => t
            .flatten_all()?
            .to_vec1::<half::f16>()?
            .iter()
            .flat_map(|x| x.to_bits().to_le_bytes())
            .collect(),
        _ => t
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?
            .iter()
            .flat_map(|x| x.to_bits().to_le_bytes())
            .collect(),
    })
}

#[test]
fn bf16_sharded_checkpoint_round_trips_bit_exact() -> Result<()> {
    let cfg = tiny_gqa(64);
    let w = Weights::random(&cfg, 11, &Device::Cpu)?.to_dtype(DType::BF16)?;
    let tmp = tempfile::tempdir()?;
    let a = tmp.path().join("a");
    Checkpoint::save(&a, &cfg, &w, Some(SMALL_SHARD_BYTES))?;
    assert!(a.join("model.safetensors.index.json").is_file());
    assert!(!a.join("model.safetensors").exists());
    let shards = shard_files(&a)?;
    assert!(shards.len() >= 2, "{shards:?}");
    let cfg_text = std::fs::read_to_string(a.join("config.json"))?;
    assert!(cfg_text.contains("\"bfloat16\""), "{cfg_text}");

    let back = Checkpoint::load_with(&a, DTypeChoice::BF16, &Device::Cpu)?;
    assert_eq!(back.stored_dtype, DType::BF16);
    assert_eq!(back.weights.dtype(), DType::BF16);
    assert!(back.dtype_note().is_none());
    assert_eq!(back.weights.tensors().len(), w.tensors().len());
    for (k, t) in w.tensors() {
        let u = &back.weights.tensors()[k];
        assert_eq!(u.dtype(), DType::BF16, "{k}");
        assert_eq!(tensor_bytes(t)?, tensor_bytes(u)?, "{k}");
    }
    // Saving what was loaded gives the same files, byte for byte.
    let b = tmp.path().join("b");
    Checkpoint::save(&b, &back.config, &back.weights, Some(SMALL_SHARD_BYTES))?;
    assert_eq!(shard_files(&b)?, shards);
    for name in shards
        .iter()
        .map(String::as_str)
        .chain(["model.safetensors.index.json", "config.json"])
    {
        assert_eq!(
            std::fs::read(a.join(name))?,
            std::fs::read(b.join(name))?,
            "{name}"
        );
    }
    // Re-saving as fewer shards leaves no stale shard behind.
    Checkpoint::save(&b, &back.config, &back.weights, None)?;
    assert!(shard_files(&b)?.is_empty());
    assert!(!b.join("model.safetensors.index.json").exists());
    Ok(())
}

#[test]
fn f16_checkpoint_keeps_f16_where_asked_and_auto_computes_in_f32_on_the_cpu() -> Result<()> {
    let cfg = tiny_gqa(48);
    let w = Weights::random(&cfg, 12, &Device::Cpu)?.to_dtype(DType::F16)?;
    let tmp = tempfile::tempdir()?;
    Checkpoint::save(tmp.path(), &cfg, &w, None)?;

    let kept = Checkpoint::load_with(tmp.path(), DTypeChoice::F16, &Device::Cpu)?;
    assert_eq!(kept.stored_dtype, DType::F16);
    for (k, t) in kept.weights.tensors() {
        assert_eq!(t.dtype(), DType::F16, "{k}");
        assert_eq!(tensor_bytes(t)?, tensor_bytes(&w.tensors()[k])?, "{k}");
    }
    // The model computes in f16 on the CPU (composed kernels).
    let ids = Tensor::new(&[[1u32, 5, 7]], &Device::Cpu)?;
    let logits = kept.model()?.forward(&ids, None)?;
    assert_eq!(logits.dtype(), DType::F16);

    let auto = Checkpoint::load_with(tmp.path(), DTypeChoice::Auto, &Device::Cpu)?;
    assert_eq!(auto.stored_dtype, DType::F16);
    assert_eq!(auto.weights.dtype(), DType::F32);
    let note = auto.dtype_note().unwrap_or_default();
    assert!(note.contains("f16") && note.contains("f32"), "{note}");
    Ok(())
}

#[test]
fn missing_shard_names_the_index_and_the_shard() -> Result<()> {
    let cfg = tiny_gqa(64);
    let w = Weights::random(&cfg, 13, &Device::Cpu)?.to_dtype(DType::BF16)?;
    let tmp = tempfile::tempdir()?;
    Checkpoint::save(tmp.path(), &cfg, &w, Some(SMALL_SHARD_BYTES))?;
    let shards = shard_files(tmp.path())?;
    let gone = shards.last().cloned().unwrap_or_default();
    std::fs::remove_file(tmp.path().join(&gone))?;
    let err = Checkpoint::load_with(tmp.path(), DTypeChoice::Auto, &Device::Cpu)
        .err()
        .ok_or_else(|| anyhow::anyhow!("loading without a shard succeeded"))?;
    match &err {
        Error::MissingShard { index, shard } => {
            assert!(index.ends_with("model.safetensors.index.json"), "{err}");
            assert!(shard.ends_with(&gone), "{err}");
        }
        other => anyhow::bail!("expected MissingShard, got {other}"),
    }
    let msg = err.to_string();
    assert!(
        msg.contains("model.safetensors.index.json") && msg.contains(&gone),
        "{msg}"
    );
    Ok(())
}

#[test]
fn unknown_dtype_names_the_choices() -> Result<()> {
    let msg = "int4"
        .parse::<DTypeChoice>()
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(msg.contains("int4") && msg.contains("bf16"), "{msg}");
    Ok(())
}

/// The greedy continuation of `prompt` with no stop id.
fn free_run(ck: &Checkpoint, prompt: &[u32], n: usize) -> Result<Vec<u32>> {
    let g = generate(
        &ck.model()?,
        prompt,
        &GenerateOptions {
            max_new_tokens: n,
            stop_ids: vec![],
            sampling: Sampling::Greedy,
        },
    )?;
    Ok(g.tokens)
}

#[test]
fn generation_stops_at_the_second_eos_id_of_generation_config() -> Result<()> {
    let cfg = tiny_gqa(64);
    let w = Weights::random(&cfg, 14, &Device::Cpu)?;
    let tmp = tempfile::tempdir()?;
    Checkpoint::save(tmp.path(), &cfg, &w, None)?;
    let prompt = [1u32, 9, 17, 4];
    let free = free_run(
        &Checkpoint::load(tmp.path(), DType::F32, &Device::Cpu)?,
        &prompt,
        8,
    )?;
    // The end id is a token the model produces at step 3 (and not before); the config's own
    // id is one it never produces.
    let stop_at = (2..free.len())
        .find(|&i| !free[..i].contains(&free[i]))
        .ok_or_else(|| anyhow::anyhow!("no fresh token in {free:?}"))?;
    let second = free[stop_at];
    let first = (0..64u32)
        .find(|t| !free.contains(t))
        .ok_or_else(|| anyhow::anyhow!("every id generated"))?;
    let mut with_list = cfg.clone();
    with_list.eos_token_id = Some(TokenIds::One(first));
    with_list.save(&tmp.path().join("config.json"))?;
    std::fs::write(
        tmp.path().join("generation_config.json"),
        format!(
            "{{\"bos_token_id\": 1, \"eos_token_id\": [{first}, {second}], \"do_sample\": false}}"
        ),
    )?;
    let ck = Checkpoint::load(tmp.path(), DType::F32, &Device::Cpu)?;
    assert_eq!(ck.eos_ids(), vec![first, second]);
    let model = ck.model()?;
    assert_eq!(model.config().eos_ids(), vec![first, second]);
    let g = generate(
        &model,
        &prompt,
        &GenerateOptions {
            max_new_tokens: 8,
            stop_ids: model.config().eos_ids(),
            sampling: Sampling::Greedy,
        },
    )?;
    assert!(g.stopped);
    assert_eq!(g.tokens, free[..stop_at].to_vec());

    // config.json's eos_token_id as a list is honoured the same way (no generation config).
    std::fs::remove_file(tmp.path().join("generation_config.json"))?;
    with_list.eos_token_id = Some(TokenIds::Many(vec![first, second]));
    with_list.save(&tmp.path().join("config.json"))?;
    let ck = Checkpoint::load(tmp.path(), DType::F32, &Device::Cpu)?;
    assert_eq!(ck.eos_ids(), vec![first, second]);
    let model = ck.model()?;
    let g = generate(
        &model,
        &prompt,
        &GenerateOptions {
            max_new_tokens: 8,
            stop_ids: model.config().eos_ids(),
            sampling: Sampling::Greedy,
        },
    )?;
    assert!(g.stopped);
    assert_eq!(g.tokens, free[..stop_at].to_vec());
    Ok(())
}

#[test]
fn companion_files_travel_byte_for_byte() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let (from, to) = (tmp.path().join("from"), tmp.path().join("to"));
    std::fs::create_dir_all(&from)?;
    std::fs::create_dir_all(&to)?;
    let gen = b"{\n  \"eos_token_id\": [128001, 128008, 128009]\n}\n";
    let tok_cfg = b"{\"chat_template\": \"{{ bos_token }}\"}";
    std::fs::write(from.join("generation_config.json"), gen)?;
    std::fs::write(from.join("tokenizer_config.json"), tok_cfg)?;
    let copied = steper_models::copy_companion_files(&from, &to)?;
    assert_eq!(
        copied,
        vec!["tokenizer_config.json", "generation_config.json"]
    );
    assert_eq!(std::fs::read(to.join("generation_config.json"))?, gen);
    assert_eq!(std::fs::read(to.join("tokenizer_config.json"))?, tok_cfg);
    assert!(!to.join("tokenizer.json").exists());
    Ok(())
}
