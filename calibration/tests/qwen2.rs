//! Calibration of a Qwen2 export: the tiny student (`steper-test-support`) declared as Qwen2
//! with random q/k/v biases added to its safetensors, exported, then calibrated with smoothing.
//! The linear-layer discovery must see the biased projections (the bias `Add` follows the
//! `MatMul`), and input-channel smoothing must keep the fp32 function: a q/k/v bias is added to
//! the output channels, which smoothing never rescales.

use std::path::Path;

use anyhow::{Context, Result};
use steper_calibration::pipeline::files;
use steper_calibration::{calibrate, CalibrateOptions, DataSource};
use steper_runtime::backend::load_model;
use steper_runtime::{BackendKind, LogitsMode, OrtOptions};

/// Largest |smoothed − original| fp32 logit over the largest |original logit| (the same
/// function in another rounding order).
const SMOOTHED_LOGITS_REL: f32 = 1e-4;
/// Least next-token top-1 agreement of the int8 model with fp32 on held-out prompts.
const TOP1_AGREEMENT_MIN: f64 = 0.8;

/// Copies the checkpoint `src` to `dst` as a Qwen2: `model_type` `qwen2` in config.json and an
/// F32 bias per q/k/v projection appended to model.safetensors (values from a fixed ramp in
/// ±0.5), written with the format's own layout (u64 header length, JSON header, data).
fn qwen2_copy(src: &Path, dst: &Path) -> Result<()> {
    std::fs::create_dir_all(dst)?;
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        if src.join(f).is_file() {
            std::fs::copy(src.join(f), dst.join(f))?;
        }
    }
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json"))?)?;
    cfg["model_type"] = "qwen2".into();
    cfg["architectures"] = serde_json::json!(["Qwen2ForCausalLM"]);
    std::fs::write(dst.join("config.json"), serde_json::to_string_pretty(&cfg)?)?;
    let layers = cfg["num_hidden_layers"]
        .as_u64()
        .context("num_hidden_layers")?;

    let bytes = std::fs::read(src.join("model.safetensors"))?;
    let n = u64::from_le_bytes(bytes[..8].try_into()?) as usize;
    let mut header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&bytes[8..8 + n])?;
    let mut data = bytes[8 + n..].to_vec();
    let mut k = 0usize;
    for l in 0..layers {
        for p in ["q_proj", "k_proj", "v_proj"] {
            let w = header
                .get(&format!("model.layers.{l}.self_attn.{p}.weight"))
                .context("projection weight")?
                .clone();
            let rows = w["shape"][0].as_u64().context("shape")? as usize;
            anyhow::ensure!(w["dtype"] == "F32", "the tiny student is f32");
            let start = data.len();
            for _ in 0..rows {
                k += 1;
                let v = ((k * 7919 % 101) as f32 - 50.0) / 100.0;
                data.extend_from_slice(&v.to_le_bytes());
            }
            header.insert(
                format!("model.layers.{l}.self_attn.{p}.bias"),
                serde_json::json!({"dtype": "F32", "shape": [rows], "data_offsets": [start, data.len()]}),
            );
        }
    }
    let mut h = serde_json::to_vec(&header)?;
    while h.len() % 8 != 0 {
        h.push(b' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    out.extend_from_slice(&data);
    std::fs::write(dst.join("model.safetensors"), out)?;
    Ok(())
}

#[test]
fn a_qwen2_export_calibrates_with_smoothing_and_keeps_its_fp32_function() -> Result<()> {
    let t = steper_test_support::tiny()?;
    let tmp = tempfile::tempdir()?;
    let ckpt = tmp.path().join("qwen2");
    qwen2_copy(&t.student, &ckpt)?;
    let model = tmp.path().join("qwen2-onnx");
    steper_export::export(&ckpt, &model, &steper_export::ExportOptions::default())?;

    let rows = steper_test_support::stepwise_records(&t.world, 8)?;
    let text: Vec<String> = rows
        .iter()
        .map(serde_json::to_string)
        .collect::<std::result::Result<_, _>>()?;
    let data = tmp.path().join("stepwise.jsonl");
    std::fs::write(&data, text.join("\n") + "\n")?;
    let out = tmp.path().join("int8");
    let mut o = CalibrateOptions::new(model.clone(), DataSource::Stepwise(data), out.clone());
    o.samples = 12;
    o.holdout = 6;
    o.greedy_tokens = 0;
    o.bench_new_tokens = 0;
    o.max_tokens = 256;
    o.bins = 512;
    o.threads = Some(1);
    o.smooth_alpha = Some(0.8);
    let r = calibrate(&o, &mut |_| {})?;
    // 2 layers × 7 projections, the biased q/k/v among them.
    assert_eq!(r.qdq.quantized_linears, 14);
    let sm = r.smoothing.clone().context("smoothing summary")?;
    assert!(sm.skipped.is_empty(), "{:?}", sm.skipped);
    // Per layer: the q/k/v and gate/up inputs, down_proj's and o_proj's.
    assert_eq!(sm.tensors.len(), 8, "{sm:?}");
    let a = r.agreement.clone().context("held-out agreement")?;
    assert!(a.top1 >= TOP1_AGREEMENT_MIN, "top-1 agreement {}", a.top1);

    // The int8 graph keeps every bias (float) after its quantized projection.
    let q = steper_calibration::graph::load_onnx(&out.join(files::INT8_MODEL))?;
    let g = q.graph.as_ref().context("graph")?;
    for l in 0..2 {
        for p in ["q_proj", "k_proj", "v_proj"] {
            let name = format!("model.layers.{l}.self_attn.{p}.bias");
            assert!(
                g.node
                    .iter()
                    .any(|n| n.op_type == "Add" && n.input.contains(&name)),
                "no Add reads {name} in the int8 graph"
            );
        }
    }

    let ort = BackendKind::Ort(OrtOptions::default());
    let fp32 = load_model(&model, &ort)?;
    let smoothed = load_model(&out.join(files::SMOOTHED_DIR), &ort)?;
    for prompt in [vec![1u32, 5, 9, 2, 7, 3], (10..60).collect::<Vec<u32>>()] {
        let la = fp32.generator.append(
            &mut fp32.generator.new_sequence()?,
            &prompt,
            LogitsMode::Last,
        )?;
        let lb = smoothed.generator.append(
            &mut smoothed.generator.new_sequence()?,
            &prompt,
            LogitsMode::Last,
        )?;
        let scale = la.last().iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
        let diff = la
            .last()
            .iter()
            .zip(lb.last())
            .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(diff <= SMOOTHED_LOGITS_REL * scale, "{diff} vs {scale}");
    }
    Ok(())
}
