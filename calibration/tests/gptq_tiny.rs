//! GPTQ end to end on the tiny student (`steper-test-support`): `calibrate --hessians` on its
//! fp32 export, then `steper-export --quantize int4 --calibration DIR` on its checkpoint. The
//! export holds the GPTQ codes, matches the candle model on the same dequantized weights within
//! the quantized tolerance and records `gptq`; a calibration made from another model, or one
//! lacking a weight's Hessian, is refused naming the directory or the weight.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::{DType, Device};
use steper_calibration::pipeline::files;
use steper_calibration::{calibrate, CalibrateOptions, DataSource};
use steper_export::quant::gptq::GptqOptions;
use steper_export::quant::hessians::{checkpoint_identity, linear_weights, Hessians};
use steper_export::quant::{quantize_weight_with, quantized_weights, Quantizer};
use steper_export::verify::{verify, VerifyOptions, INT_MATMULNBITS};
use steper_export::{export_with_calibration, Error, ExportDtype, ExportOptions, QuantOptions};
use steper_runtime::data::StepwiseRecord;

/// Calibration prompts summed into the Hessians.
const SAMPLES: usize = 9;

fn write_records(dir: &Path, rows: &[StepwiseRecord]) -> Result<PathBuf> {
    let p = dir.join("stepwise.jsonl");
    let text: Vec<String> = rows
        .iter()
        .map(serde_json::to_string)
        .collect::<std::result::Result<_, _>>()?;
    std::fs::write(&p, text.join("\n") + "\n")?;
    Ok(p)
}

/// `steper-calibrate --hessians` of the fp32 export `model` into `out`, without the report.
fn calibrate_hessians(model: &Path, out: &Path, tmp: &Path) -> Result<()> {
    let world = &steper_test_support::tiny()?.world;
    let data = write_records(tmp, &steper_test_support::stepwise_records(world, 6)?)?;
    let mut o = CalibrateOptions::new(
        model.to_path_buf(),
        DataSource::Stepwise(data),
        out.to_path_buf(),
    );
    o.samples = SAMPLES;
    o.holdout = 0;
    o.greedy_tokens = 0;
    o.bench_new_tokens = 0;
    o.max_tokens = 256;
    o.bins = 128;
    o.threads = Some(1);
    o.hessians = true;
    calibrate(&o, &mut |_| {})?;
    Ok(())
}

fn int4() -> ExportOptions {
    ExportOptions::quantized(QuantOptions::int4())
}

#[test]
fn gptq_int4_export_from_calibration_hessians_matches_its_reference_and_refuses_others(
) -> Result<()> {
    let t = steper_test_support::tiny()?;
    let tmp = tempfile::tempdir()?;
    let cal = tmp.path().join("calibration");
    calibrate_hessians(&t.export, &cal, tmp.path())?;

    // The file: one Hessian per linear weight of the checkpoint, for this checkpoint.
    let ck = steper_models::Checkpoint::load(&t.student, DType::F32, &Device::Cpu)?;
    let h = Hessians::load(&cal)?;
    assert!(cal.join(files::HESSIANS).is_file());
    let mut want = linear_weights(&ck.config);
    want.sort();
    assert_eq!(h.weights().collect::<Vec<_>>(), want);
    assert_eq!(h.model, checkpoint_identity(&ck.config, &ck.weights)?);
    assert!(h.tokens > 0);
    let (k, m) = h
        .get("model.layers.0.mlp.down_proj.weight")
        .context("down_proj Hessian")?;
    assert_eq!(k, ck.config.intermediate_size);
    assert!(m[0] > 0.0, "a diagonal entry of Σ x xᵀ is positive");

    // Export with GPTQ, verified against the candle model on the same GPTQ codes.
    let o = int4();
    let q = o.quantize.context("quantized")?;
    let out = tmp.path().join("gptq");
    let rep = export_with_calibration(&t.student, &out, &o, Some(&cal))?;
    let rec = rep.quantization.clone().context("quantization record")?;
    assert_eq!(rec.method.as_deref(), Some("gptq"));
    assert_eq!(rec.damp, Some(GptqOptions::default().damp));
    let manifest = steper_runtime::Manifest::load(&out.join("steper.json"))?;
    assert_eq!(manifest.quantization, Some(rec));

    // The graph holds GPTQ's codes (an unfused layer's MatMulNBits weight), not round-to-nearest's.
    let name = "model.layers.1.mlp.down_proj.weight";
    let gptq = Quantizer::Gptq {
        hessians: &h,
        opts: GptqOptions::default(),
    };
    let g = quantize_weight_with(&ck.weights, name, &q, &gptq)?;
    let r = quantize_weight_with(&ck.weights, name, &q, &Quantizer::RoundToNearest)?;
    assert_ne!(
        g.codes, r.codes,
        "GPTQ moves some codes off round-to-nearest"
    );
    let model = steper_calibration::graph::load_onnx(&out.join("model.onnx"))?;
    let init = model
        .graph
        .as_ref()
        .and_then(|gr| {
            gr.initializer
                .iter()
                .find(|i| i.name == format!("{name}.MatMulNBits.B"))
        })
        .context("down_proj's MatMulNBits weight")?;
    assert_eq!(init.raw_data, g.matmul_nbits_b());

    let vo = VerifyOptions {
        steps: 8,
        calibration: Some(cal.clone()),
        ..VerifyOptions::for_export(ExportDtype::Fp32, Some(&q))
    };
    assert_eq!(vo.tolerance.name, INT_MATMULNBITS.name);
    let v = verify(&t.student, &out, &vo)?;
    for b in &v.backends {
        eprintln!(
            "GPTQ int4 on {}: max rel {:.4}, top-1 {:.3} against the dequantized reference",
            b.backend, b.max_rel, b.top1_agreement
        );
        assert!(
            b.pass,
            "{}: rel {} top-1 {} ({})",
            b.backend, b.max_rel, b.top1_agreement, v.tolerance.name
        );
    }
    assert!(!v.backends.is_empty());
    // Verifying a GPTQ export without its calibration is refused naming the option.
    match verify(
        &t.student,
        &out,
        &VerifyOptions {
            calibration: None,
            ..vo.clone()
        },
    ) {
        Err(Error::Option { option, .. }) => assert_eq!(option, "--calibration"),
        other => panic!("expected a refusal naming --calibration, got {other:?}"),
    }

    // A calibration made from another tiny model (the student with one weight changed).
    let other_ckpt = tmp.path().join("other-ckpt");
    let mut w = ck.weights.clone();
    let t0 = w
        .tensors()
        .get("model.layers.0.mlp.up_proj.weight")
        .context("up_proj")?
        .clone();
    w.insert("model.layers.0.mlp.up_proj.weight", (t0 * 1.5)?);
    steper_models::Checkpoint::save(&other_ckpt, &ck.config, &w, None)?;
    steper_models::checkpoint::copy_companion_files(&t.student, &other_ckpt)?;
    let other_fp32 = tmp.path().join("other-fp32");
    steper_export::export(&other_ckpt, &other_fp32, &ExportOptions::default())?;
    let other_cal = tmp.path().join("other-calibration");
    calibrate_hessians(&other_fp32, &other_cal, tmp.path())?;
    let refused = tmp.path().join("refused");
    match export_with_calibration(&t.student, &refused, &o, Some(&other_cal)) {
        Err(e @ Error::Calibration { .. }) => {
            let s = e.to_string();
            assert!(
                s.contains(&other_cal.display().to_string()) && s.contains("another model"),
                "{s}"
            );
        }
        other => panic!("expected a refusal of another model's calibration, got {other:?}"),
    }
    assert!(!refused.join("model.onnx").exists(), "nothing written");
    // …while the other model exports with it.
    export_with_calibration(&other_ckpt, &refused, &o, Some(&other_cal))?;

    // A calibration lacking one quantized weight's Hessian.
    let missing = "model.layers.1.self_attn.o_proj.weight";
    let mut partial = Hessians::new(h.model.clone(), h.tokens);
    for wname in h.weights().filter(|w| *w != missing) {
        let (k, m) = h.get(wname).context("listed weight")?;
        partial.insert(&[wname.to_string()], k, m.to_vec())?;
    }
    let partial_dir = tmp.path().join("partial");
    std::fs::create_dir_all(&partial_dir)?;
    partial.save(&partial_dir)?;
    assert!(quantized_weights(&ck.config, &q)
        .iter()
        .any(|n| n == missing));
    match export_with_calibration(&t.student, &tmp.path().join("p"), &o, Some(&partial_dir)) {
        Err(e @ Error::MissingHessian { .. }) => {
            let s = e.to_string();
            assert!(
                s.contains(missing) && s.contains(&partial_dir.display().to_string()),
                "{s}"
            );
        }
        other => panic!("expected a refusal naming {missing}, got {other:?}"),
    }

    // A calibration without --quantize is refused naming the option.
    match export_with_calibration(
        &t.student,
        &tmp.path().join("f"),
        &ExportOptions::default(),
        Some(&cal),
    ) {
        Err(Error::Option { option, .. }) => assert_eq!(option, "--calibration"),
        other => panic!("expected a refusal naming --calibration, got {other:?}"),
    }
    Ok(())
}

#[test]
fn hessians_need_the_collection_pass() -> Result<()> {
    let t = steper_test_support::tiny()?;
    let tmp = tempfile::tempdir()?;
    let data = write_records(
        tmp.path(),
        &steper_test_support::stepwise_records(&t.world, 2)?,
    )?;
    let mut o = CalibrateOptions::new(
        t.export.clone(),
        DataSource::Stepwise(data),
        tmp.path().join("out"),
    );
    o.hessians = true;
    o.ranges = Some(tmp.path().join("calibration.json"));
    let e = calibrate(&o, &mut |_| {}).unwrap_err().to_string();
    assert!(e.contains("--hessians") && e.contains("--ranges"), "{e}");
    Ok(())
}
