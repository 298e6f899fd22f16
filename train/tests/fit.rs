//! The trainer's public API on a tiny student made by the test.

use anyhow::Result;
use candle_core::{DType, Device};
use steper_models::{Checkpoint, LlamaConfig, Weights};
use steper_train::fit::{fit, Example, FitConfig, LossMode, Stage, Trainable};

/// Mean token loss each stage must fall below after overfitting 8 examples (a uniform guess over
/// the 48-token vocabulary is ln 48 ≈ 3.87).
const OVERFIT_MAX_LOSS: f64 = 0.3;

fn student(dir: &std::path::Path, seed: u64) -> Result<LlamaConfig> {
    let mut cfg = LlamaConfig::tiny(48);
    cfg.max_position_embeddings = 64;
    Checkpoint::save(dir, &cfg, &Weights::random(&cfg, seed, &Device::Cpu)?, None)?;
    Ok(cfg)
}

fn examples() -> Vec<Example> {
    let mut v = Vec::new();
    for q in 0..8u32 {
        let stage = [Stage::Init, Stage::Expand, Stage::Aggregate][(q % 3) as usize];
        let prompt: Vec<u32> = (0..6).map(|i| 3 + (q * 5 + i * 3) % 40).collect();
        let target: Vec<u32> = vec![3 + (q * 7) % 40, 3 + (q * 11 + 1) % 40, 2];
        v.push(Example {
            stage,
            prompt,
            target,
        });
    }
    v
}

fn params(dir: &std::path::Path) -> Result<Vec<(String, Vec<f32>)>> {
    let ck = Checkpoint::load(dir, DType::F32, &Device::Cpu)?;
    ck.weights
        .tensors()
        .iter()
        .map(|(k, t)| Ok((k.clone(), t.flatten_all()?.to_vec1()?)))
        .collect::<Result<_>>()
}

#[test]
fn overfits_eight_records_in_every_stage() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let s = tmp.path().join("student");
    student(&s, 1)?;
    let cfg = FitConfig {
        steps: 120,
        batch_size: 8,
        warmup: 5,
        adamw: steper_train::fit::optim::AdamWConfig {
            lr: 1e-2,
            weight_decay: 0.0,
            ..Default::default()
        },
        ..Default::default()
    };
    let ex = examples();
    let out = tmp.path().join("run");
    let summary = fit(&s, &ex, &ex, &cfg, &out, false)?;
    assert!(summary.finished);
    let eval = summary.eval.expect("final eval");
    for (name, l) in [
        ("init", eval.l_init),
        ("expand", eval.l_exp),
        ("aggregate", eval.l_agg),
    ] {
        let l = l.expect("stage present");
        assert!(l < OVERFIT_MAX_LOSS, "{name} loss {l}");
    }
    // The log has one line per step with the fields of docs/DESIGN.md.
    let log = std::fs::read_to_string(out.join("train_log.jsonl"))?;
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    assert_eq!(lines.len(), 120);
    for key in [
        "step",
        "lr",
        "L_init",
        "L_exp",
        "L_agg",
        "total",
        "sigma_init",
        "sigma_exp",
        "sigma_agg",
        "grad_norm",
        "tokens_per_sec",
    ] {
        assert!(lines[0].get(key).is_some(), "missing {key}");
    }
    // σ moved away from 1 for the stages (they are learned).
    assert!((lines[119]["sigma_init"].as_f64().unwrap() - 1.0).abs() > 1e-3);
    // The final checkpoint loads.
    Checkpoint::load(&out, DType::F32, &Device::Cpu)?.model()?;
    Ok(())
}

#[test]
fn resume_after_a_stop_equals_an_uninterrupted_run() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let s = tmp.path().join("student");
    student(&s, 2)?;
    let ex = examples();
    let base = FitConfig {
        steps: 8,
        batch_size: 3,
        grad_accum: 2,
        warmup: 2,
        save_every: 3,
        trainable: Trainable {
            freeze_embeddings: true,
            top_layers: Some(1),
            lora: None,
        },
        ..Default::default()
    };
    let full = tmp.path().join("full");
    fit(&s, &ex, &[], &base, &full, false)?;
    let parts = tmp.path().join("parts");
    let first = fit(
        &s,
        &ex,
        &[],
        &FitConfig {
            stop_after: Some(5),
            ..base.clone()
        },
        &parts,
        false,
    )?;
    assert!(!first.finished);
    assert_eq!(first.step, 5);
    let second = fit(&s, &ex, &[], &base, &parts, false)?;
    assert_eq!(second.resumed_from, 5);
    assert!(second.finished);
    let a = params(&full)?;
    let b = params(&parts)?;
    assert_eq!(a.len(), b.len());
    for ((ka, va), (kb, vb)) in a.iter().zip(&b) {
        assert_eq!(ka, kb);
        // Same ops, same order, same thread count on CPU: bit-exact.
        assert_eq!(va, vb, "{ka} differs after resume");
    }
    let la = std::fs::read_to_string(full.join("train_log.jsonl"))?;
    let lb = std::fs::read_to_string(parts.join("train_log.jsonl"))?;
    let strip = |s: &str| -> Vec<serde_json::Value> {
        s.lines()
            .map(|l| {
                let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
                v.as_object_mut().unwrap().remove("tokens_per_sec");
                v
            })
            .collect()
    };
    assert_eq!(strip(&la), strip(&lb));
    // Frozen weights did not move.
    let orig = params(&s)?;
    let emb = |p: &Vec<(String, Vec<f32>)>| {
        p.iter()
            .find(|(k, _)| k == "model.embed_tokens.weight")
            .map(|x| x.1.clone())
    };
    assert_eq!(emb(&orig), emb(&a));
    let l0 = |p: &Vec<(String, Vec<f32>)>| {
        p.iter()
            .find(|(k, _)| k == "model.layers.0.mlp.up_proj.weight")
            .map(|x| x.1.clone())
    };
    assert_eq!(l0(&orig), l0(&a));
    let l1 = |p: &Vec<(String, Vec<f32>)>| {
        p.iter()
            .find(|(k, _)| k == "model.layers.1.mlp.up_proj.weight")
            .map(|x| x.1.clone())
    };
    assert_ne!(l1(&orig), l1(&a));
    Ok(())
}

#[test]
fn bad_inputs_are_clear_errors() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let s = tmp.path().join("student");
    student(&s, 3)?;
    let cfg = FitConfig {
        steps: 1,
        ..Default::default()
    };
    let err = fit(&s, &[], &[], &cfg, &tmp.path().join("o1"), false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("no training examples"), "{err}");
    let long = Example {
        stage: Stage::Init,
        prompt: vec![5; 80],
        target: vec![6, 2],
    };
    let err = fit(&s, &[long], &[], &cfg, &tmp.path().join("o2"), false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("exceed") && err.contains("64"), "{err}");
    let oov = Example {
        stage: Stage::Init,
        prompt: vec![5, 99],
        target: vec![6, 2],
    };
    let err = fit(&s, &[oov], &[], &cfg, &tmp.path().join("o3"), false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("99"), "{err}");
    let err = fit(
        &tmp.path().join("nowhere"),
        &examples(),
        &[],
        &cfg,
        &tmp.path().join("o4"),
        false,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("nowhere"), "{err}");
    assert_eq!(Stage::parse("middle"), None);
    let _ = LossMode::Vanilla;
    Ok(())
}

#[test]
fn bad_record_files_are_clear_errors() -> Result<()> {
    use steper_train::fit::records::read_records;
    let tmp = tempfile::tempdir()?;
    let good = r#"{"qid":"q1","stage":"init","step":1,"question":"Where?","passages":[{"title":"A","text":"B."}],"reasoning":[],"target":"A is in B.","teacher":"gold","answers":["B"]}"#;
    // An unknown stage: the error names the file, the line and the field's allowed values.
    let bad_stage = good.replace("\"init\"", "\"middle\"");
    let f = tmp.path().join("bad-stage.jsonl");
    std::fs::write(&f, format!("{good}\n{bad_stage}\n"))?;
    let err = read_records(&f, false).unwrap_err().to_string();
    assert!(
        err.contains("bad-stage.jsonl") && err.contains(":2"),
        "{err}"
    );
    assert!(err.contains("middle") || err.contains("variant"), "{err}");
    // With skip_bad the bad line is skipped and counted.
    let (rows, skipped) = read_records(&f, true)?;
    assert_eq!((rows.len(), skipped), (1, 1));
    // An empty data file.
    let f = tmp.path().join("empty.jsonl");
    std::fs::write(&f, "")?;
    let err = read_records(&f, false).unwrap_err().to_string();
    assert!(
        err.contains("empty.jsonl") && err.contains("no step-wise records"),
        "{err}"
    );
    // A student directory without config.json.
    let s = tmp.path().join("student-without-config");
    std::fs::create_dir_all(&s)?;
    let err = fit(
        &s,
        &examples(),
        &[],
        &FitConfig {
            steps: 1,
            ..Default::default()
        },
        &tmp.path().join("o"),
        false,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("config.json"), "{err}");
    Ok(())
}

/// Runs `base` uninterrupted and as a stopped-then-resumed run; asserts both end with the same
/// weights (bit for bit) and the same log; returns the final weights and the runs' directory.
fn resumed_equals_uninterrupted(
    s: &std::path::Path,
    ex: &[Example],
    base: &FitConfig,
    root: &std::path::Path,
) -> Result<Vec<(String, Vec<f32>)>> {
    let full = root.join("full");
    fit(s, ex, &[], base, &full, false)?;
    let parts = root.join("parts");
    let first = fit(
        s,
        ex,
        &[],
        &FitConfig {
            stop_after: Some(3),
            ..base.clone()
        },
        &parts,
        false,
    )?;
    assert!(!first.finished);
    let second = fit(s, ex, &[], base, &parts, false)?;
    assert_eq!(second.resumed_from, 3);
    assert!(second.finished);
    let a = params(&full)?;
    let b = params(&parts)?;
    assert_eq!(a.len(), b.len());
    for ((ka, va), (kb, vb)) in a.iter().zip(&b) {
        assert_eq!(ka, kb);
        assert_eq!(va, vb, "{ka} differs after resume");
    }
    Ok(a)
}

#[test]
fn resume_with_a_prefix_cache_is_bit_exact_and_reuses_the_cache() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let s = tmp.path().join("student");
    student(&s, 4)?;
    let ex = examples();
    let cache = tmp.path().join("prefix-cache");
    let base = FitConfig {
        steps: 6,
        batch_size: 3,
        warmup: 1,
        save_every: 2,
        trainable: Trainable {
            freeze_embeddings: true,
            top_layers: Some(1),
            lora: None,
        },
        prefix_cache: Some(cache.clone()),
        prefix_cache_dtype: steper_train::fit::CacheDtype::F16,
        ..Default::default()
    };
    let w = resumed_equals_uninterrupted(&s, &ex, &base, tmp.path())?;
    // A third run on the same records and student reads every example from the cache.
    let again = fit(&s, &ex, &[], &base, &tmp.path().join("again"), false)?;
    let stats = again.prefix_cache.expect("cache used");
    assert_eq!(stats.misses, 0, "{stats:?}");
    assert!(stats.hits > 0);
    assert!(!stats.rebuilt);
    assert_eq!(params(&tmp.path().join("again"))?, w);
    assert_eq!(again.frozen_layers, 1);
    Ok(())
}

#[test]
fn lora_trains_only_adapters_resumes_bit_exactly_and_saves_merged_weights() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let s = tmp.path().join("student");
    let cfg = student(&s, 5)?;
    let ex = examples();
    let lora = steper_models::LoraConfig {
        rank: 2,
        alpha: 4.0,
        targets: steper_models::LoraTarget::parse_list("q,v,down")?,
    };
    let base = FitConfig {
        steps: 6,
        batch_size: 3,
        warmup: 1,
        save_every: 2,
        adamw: steper_train::fit::optim::AdamWConfig {
            lr: 1e-2,
            ..Default::default()
        },
        trainable: Trainable {
            freeze_embeddings: false,
            top_layers: None,
            lora: Some(lora),
        },
        ..Default::default()
    };
    let trained = resumed_equals_uninterrupted(&s, &ex, &base, tmp.path())?;
    let orig = params(&s)?;
    // The exported checkpoint is HF-style (same tensor names, no adapters) …
    let names = |p: &Vec<(String, Vec<f32>)>| p.iter().map(|x| x.0.clone()).collect::<Vec<_>>();
    assert_eq!(names(&trained), names(&orig));
    // … where exactly the adapted projections of every layer moved.
    for ((k, a), (_, b)) in trained.iter().zip(&orig) {
        let adapted = (0..cfg.num_hidden_layers).any(|l| {
            ["self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"]
                .iter()
                .any(|m| k == &format!("model.layers.{l}.{m}.weight"))
        });
        if adapted {
            assert_ne!(a, b, "{k}: adapter had no effect");
        } else {
            assert_eq!(a, b, "{k}: a base weight moved");
        }
    }
    // The checkpoints keep the adapters for resuming.
    let ck = std::fs::read_dir(tmp.path().join("full").join("checkpoints"))?
        .flatten()
        .next()
        .expect("a checkpoint");
    assert!(ck.path().join("lora.safetensors").is_file());
    Ok(())
}

#[test]
fn sigma_lr_sets_how_fast_the_difficulties_move() -> Result<()> {
    /// The σ rate below is 50× the weight rate; Adam's steps on the scalar s_j are then ~50×
    /// larger, so |log σ| after the run must be well over this multiple of the default run's.
    const MIN_RATIO: f64 = 10.0;
    let tmp = tempfile::tempdir()?;
    let s = tmp.path().join("student");
    student(&s, 3)?;
    let ex = examples();
    let run = |sigma_lr: Option<f64>, name: &str| -> Result<f64> {
        let cfg = FitConfig {
            steps: 10,
            batch_size: 8,
            warmup: 1,
            adamw: steper_train::fit::optim::AdamWConfig {
                lr: 1e-3,
                sigma_lr,
                ..Default::default()
            },
            ..Default::default()
        };
        let out = tmp.path().join(name);
        fit(&s, &ex, &ex, &cfg, &out, false)?;
        let log = std::fs::read_to_string(out.join("train_log.jsonl"))?;
        let last: serde_json::Value = serde_json::from_str(log.lines().last().expect("a line"))?;
        Ok(["sigma_init", "sigma_exp", "sigma_agg"]
            .iter()
            .map(|k| last[*k].as_f64().expect("σ logged").ln().abs())
            .sum())
    };
    let default = run(None, "default")?;
    let fast = run(Some(5e-2), "fast")?;
    assert!(default > 0.0, "σ did not move at all: {default}");
    assert!(
        fast > MIN_RATIO * default,
        "Σ|log σ| with --sigma-lr 5e-2: {fast}, with the weight rate: {default}"
    );
    // A negative rate is refused, naming it.
    let cfg = FitConfig {
        steps: 1,
        adamw: steper_train::fit::optim::AdamWConfig {
            sigma_lr: Some(-1.0),
            ..Default::default()
        },
        ..Default::default()
    };
    let err = fit(&s, &ex, &ex, &cfg, &tmp.path().join("bad"), false).unwrap_err();
    assert!(err.to_string().contains("σ learning rate -1"), "{err}");
    Ok(())
}

#[test]
fn a_run_resumed_from_a_checkpoint_without_tokenizer_still_ends_with_the_students() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let s = tmp.path().join("student");
    student(&s, 4)?;
    // The tokenizer is opaque to the trainer: any bytes must be carried over unchanged.
    let tok = br#"{"version":"1.0","note":"the student's own tokenizer"}"#;
    std::fs::write(s.join("tokenizer.json"), tok)?;
    let base = FitConfig {
        steps: 4,
        batch_size: 2,
        save_every: 2,
        ..Default::default()
    };
    let out = tmp.path().join("run");
    let first = fit(
        &s,
        &examples(),
        &[],
        &FitConfig {
            stop_after: Some(2),
            ..base.clone()
        },
        &out,
        false,
    )?;
    assert!(!first.finished);
    let ckpt = out.join("checkpoints").join("step-00000002");
    assert_eq!(std::fs::read(ckpt.join("tokenizer.json"))?, tok);
    // As a checkpoint written by a build that did not copy the tokenizer.
    std::fs::remove_file(ckpt.join("tokenizer.json"))?;
    let second = fit(&s, &examples(), &[], &base, &out, false)?;
    assert_eq!(second.resumed_from, 2);
    assert!(second.finished);
    assert_eq!(std::fs::read(out.join("tokenizer.json"))?, tok);
    let last = out.join("checkpoints").join("step-00000004");
    assert_eq!(std::fs::read(last.join("tokenizer.json"))?, tok);
    Ok(())
}
