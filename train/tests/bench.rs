//! `steper_train::bench::bench_fit` on a tiny student made by the test (what it reports, not
//! how fast: speed is the benchmark's business).

use anyhow::Result;
use candle_core::Device;
use steper_models::{Checkpoint, LlamaConfig, Weights};
use steper_train::bench::{bench_fit, BenchFitConfig};

#[test]
fn reports_the_measured_steps_and_trainable_parameters() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("student");
    let mut cfg = LlamaConfig::tiny(48);
    cfg.max_position_embeddings = 64;
    Checkpoint::save(&dir, &cfg, &Weights::random(&cfg, 1, &Device::Cpu)?, None)?;
    let bc = BenchFitConfig {
        batch_size: 2,
        seq_len: 24,
        target_len: 4,
        steps: 2,
        warmup_steps: 1,
        ..Default::default()
    };
    let all = bench_fit(&dir, &bc)?;
    assert_eq!(all.tokens_per_step, 2 * 23);
    assert!(all.tokens_per_sec.is_finite() && all.tokens_per_sec > 0.0);
    assert!(all.median_step_seconds > 0.0);
    assert_eq!(all.trainable_parameters, all.total_parameters);
    let top = bench_fit(
        &dir,
        &BenchFitConfig {
            top_layers: Some(1),
            freeze_embeddings: true,
            ..bc.clone()
        },
    )?;
    assert!(top.trainable_parameters < all.trainable_parameters);
    assert_eq!(top.total_parameters, all.total_parameters);
    // Shapes the student cannot take are errors, not panics.
    let err = bench_fit(
        &dir,
        &BenchFitConfig {
            seq_len: 65,
            ..bc.clone()
        },
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("context"), "{err}");
    let err = bench_fit(
        &dir,
        &BenchFitConfig {
            target_len: 24,
            ..bc
        },
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("target_len"), "{err}");
    Ok(())
}
