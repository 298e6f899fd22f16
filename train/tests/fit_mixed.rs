//! Mixed-precision training (`bf16`, `f16` with dynamic loss scaling) and the device a run
//! records, on a tiny student made by the test.

use anyhow::Result;
use candle_core::{DType, Device};
use steper_models::{Checkpoint, DTypeChoice, DeviceChoice, LlamaConfig, Weights};
use steper_train::fit::{fit, Example, FitConfig, LogLine, LossScaleConfig, Stage};

/// Steps of the compared trajectories.
const STEPS: u64 = 10;
/// bf16 against f32: per-step objective within this fraction of f32's (bf16 keeps 8
/// significant bits; the weights drift apart by their rounding over the steps).
const BF16_LOSS_RTOL: f64 = 0.03;
/// f16 (10 significant bits, loss-scaled) against f32.
const F16_LOSS_RTOL: f64 = 0.01;
/// Training must make progress: the last step's objective below this fraction of the first's.
const MIN_PROGRESS: f64 = 0.9;

fn student(dir: &std::path::Path, dtype: DType) -> Result<LlamaConfig> {
    let mut cfg = LlamaConfig::tiny(48);
    cfg.max_position_embeddings = 64;
    let w = Weights::random(&cfg, 4, &Device::Cpu)?.to_dtype(dtype)?;
    Checkpoint::save(dir, &cfg, &w, None)?;
    Ok(cfg)
}

fn examples() -> Vec<Example> {
    (0..8u32)
        .map(|q| Example {
            stage: [Stage::Init, Stage::Expand, Stage::Aggregate][(q % 3) as usize],
            prompt: (0..6).map(|i| 3 + (q * 5 + i * 3) % 40).collect(),
            target: vec![3 + (q * 7) % 40, 3 + (q * 11 + 1) % 40, 2],
        })
        .collect()
}

fn base() -> FitConfig {
    FitConfig {
        steps: STEPS,
        batch_size: 4,
        warmup: 2,
        ..Default::default()
    }
}

fn log(out: &std::path::Path) -> Result<Vec<LogLine>> {
    std::fs::read_to_string(out.join("train_log.jsonl"))?
        .lines()
        .map(|l| Ok(serde_json::from_str(l)?))
        .collect()
}

fn trajectory(
    student_dir: &std::path::Path,
    out: &std::path::Path,
    cfg: &FitConfig,
) -> Result<Vec<f64>> {
    let s = fit(student_dir, &examples(), &[], cfg, out, false)?;
    assert!(s.finished);
    Ok(log(out)?.iter().map(|l| l.total).collect())
}

fn assert_close(name: &str, got: &[f64], want: &[f64], rtol: f64) {
    assert_eq!(got.len(), want.len(), "{name}: step counts");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= rtol * w.abs(),
            "{name}: step {} objective {g} vs f32 {w} (tolerance {rtol})",
            i + 1
        );
    }
}

#[test]
fn bf16_and_f16_loss_trajectories_follow_f32() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let s = tmp.path().join("student");
    student(&s, DType::F32)?;
    let f32_run = trajectory(&s, &tmp.path().join("f32"), &base())?;
    assert!(
        f32_run[STEPS as usize - 1] < MIN_PROGRESS * f32_run[0],
        "{f32_run:?}"
    );
    let bf16 = FitConfig {
        dtype: DTypeChoice::BF16,
        ..base()
    };
    let bf16_run = trajectory(&s, &tmp.path().join("bf16"), &bf16)?;
    assert_close("bf16", &bf16_run, &f32_run, BF16_LOSS_RTOL);
    assert_ne!(bf16_run, f32_run, "bf16 computed exactly f32's values");
    let f16 = FitConfig {
        dtype: DTypeChoice::F16,
        loss_scale: LossScaleConfig {
            init: 1024.0,
            growth_interval: 4,
        },
        ..base()
    };
    let out = tmp.path().join("f16");
    let f16_run = trajectory(&s, &out, &f16)?;
    assert_close("f16", &f16_run, &f32_run, F16_LOSS_RTOL);
    // The scale is logged and doubles after every 4 finite steps.
    let scales: Vec<Option<f64>> = log(&out)?.iter().map(|l| l.loss_scale).collect();
    let want: Vec<Option<f64>> = (0..STEPS)
        .map(|i| Some(1024.0 * 2f64.powi((i / 4) as i32)))
        .collect();
    assert_eq!(scales, want);
    // An f32 run logs no scale.
    let f32_text = std::fs::read_to_string(tmp.path().join("f32").join("train_log.jsonl"))?;
    assert!(!f32_text.contains("loss_scale") && !f32_text.contains("skipped"));
    Ok(())
}

#[test]
fn f16_steps_with_overflowing_gradients_are_skipped_and_halve_the_scale() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let s = tmp.path().join("student");
    student(&s, DType::F32)?;
    // 2⁴⁰ times the loss overflows f16's gradients (largest finite 65504) at every layer.
    let huge = 2f64.powi(40);
    let cfg = FitConfig {
        steps: 3,
        dtype: DTypeChoice::F16,
        loss_scale: LossScaleConfig {
            init: huge,
            growth_interval: 100,
        },
        ..base()
    };
    let out = tmp.path().join("run");
    let summary = fit(&s, &examples(), &[], &cfg, &out, false)?;
    assert_eq!(summary.skipped_steps, 3);
    let lines = log(&out)?;
    for (i, l) in lines.iter().enumerate() {
        assert!(l.skipped, "step {}", l.step);
        assert_eq!(l.loss_scale, Some(huge / 2f64.powi(i as i32)));
        assert!(!l.grad_norm.is_finite());
    }
    // No update was applied: the saved weights are the student's.
    let before = Checkpoint::load(&s, DType::F32, &Device::Cpu)?;
    let after = Checkpoint::load(&out, DType::F32, &Device::Cpu)?;
    for (k, t) in before.weights.tensors() {
        let a: Vec<f32> = t.flatten_all()?.to_vec1()?;
        let b: Vec<f32> = after.weights.tensors()[k].flatten_all()?.to_vec1()?;
        assert_eq!(a, b, "{k} moved in a skipped step");
    }
    // The scaler's state travels with the checkpoint.
    let state: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(
        out.join("checkpoints/step-00000003/trainer_state.json"),
    )?)?;
    assert_eq!(state["loss_scaler"]["scale"], serde_json::json!(huge / 8.0));
    Ok(())
}

#[test]
fn bf16_training_of_a_bf16_student_saves_bf16_that_loads() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let s = tmp.path().join("student");
    student(&s, DType::BF16)?;
    let out = tmp.path().join("run");
    let cfg = FitConfig {
        steps: 3,
        dtype: DTypeChoice::BF16,
        ..base()
    };
    let summary = fit(&s, &examples(), &[], &cfg, &out, false)?;
    assert_eq!(summary.compute_dtype, "bf16");
    let ck = Checkpoint::load_with(&out, DTypeChoice::Auto, &Device::Cpu)?;
    assert_eq!(ck.stored_dtype, DType::BF16);
    let stored = Checkpoint::load_with(&out, DTypeChoice::BF16, &Device::Cpu)?;
    for (k, t) in stored.weights.tensors() {
        assert_eq!(t.dtype(), DType::BF16, "{k}");
    }
    let before = Checkpoint::load(&s, DType::F32, &Device::Cpu)?;
    let name = "model.layers.1.mlp.down_proj.weight";
    let a: Vec<f32> = before.weights.tensors()[name].flatten_all()?.to_vec1()?;
    let b: Vec<f32> = ck.weights.tensors()[name].flatten_all()?.to_vec1()?;
    assert!(a.iter().zip(&b).any(|(x, y)| x != y), "{name} unchanged");
    // The saved model runs.
    let model = ck.model()?;
    let ids = candle_core::Tensor::new(&[[3u32, 7, 9]], &Device::Cpu)?;
    assert_eq!(model.forward(&ids, None)?.dims(), &[1, 3, 48]);
    Ok(())
}

#[test]
fn trainer_state_records_the_device_and_dtype_and_a_resume_may_change_the_dtype() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let s = tmp.path().join("student");
    student(&s, DType::F32)?;
    let out = tmp.path().join("run");
    let cfg = FitConfig {
        steps: 4,
        save_every: 2,
        device: DeviceChoice::Cpu,
        ..base()
    };
    let first = fit(
        &s,
        &examples(),
        &[],
        &FitConfig {
            stop_after: Some(2),
            ..cfg.clone()
        },
        &out,
        false,
    )?;
    assert_eq!(first.device, "cpu");
    let read_state = |step: u32| -> Result<serde_json::Value> {
        Ok(serde_json::from_str(&std::fs::read_to_string(out.join(
            format!("checkpoints/step-{step:08}/trainer_state.json"),
        ))?)?)
    };
    let st = read_state(2)?;
    assert_eq!(st["device"], "cpu");
    assert_eq!(st["compute_dtype"], "f32");
    assert_eq!(st["config"]["device"], "cpu");
    // The run resumes in bf16 from the f32 run's checkpoint.
    let second = fit(
        &s,
        &examples(),
        &[],
        &FitConfig {
            dtype: DTypeChoice::BF16,
            ..cfg
        },
        &out,
        false,
    )?;
    assert_eq!(second.resumed_from, 2);
    assert!(second.finished);
    let st = read_state(4)?;
    assert_eq!(st["device"], "cpu");
    assert_eq!(st["compute_dtype"], "bf16");
    assert_eq!(log(&out)?.len(), 4);
    Ok(())
}

#[cfg(not(feature = "cuda"))]
#[test]
fn cuda_in_a_build_without_the_feature_is_a_clear_error() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let s = tmp.path().join("student");
    student(&s, DType::F32)?;
    let cfg = FitConfig {
        device: DeviceChoice::Cuda(0),
        ..base()
    };
    let err = fit(&s, &examples(), &[], &cfg, &tmp.path().join("run"), false)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        err.contains("cuda:0") && err.contains("`cuda` feature") && err.contains("--features cuda"),
        "{err}"
    );
    Ok(())
}
