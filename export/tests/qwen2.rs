//! A tiny random Qwen2 (q/k/v biases, GQA, tied and untied embeddings) through every export
//! form — fp32, fp16, int4/int8 `ort-cpu` and `portable`, `--attention gqa` float and int4 — each
//! verified against the candle model on ONNX Runtime (and tract where it runs the form) by the
//! export's own `verify`, plus `logits_to_keep`, the bias nodes and genai_config.json.

mod common;

use anyhow::{Context, Result};
use common::*;
use prost::Message;
use steper_export::verify::{verify, VerifyOptions};
use steper_export::{ExportDtype, ExportOptions, QuantBits, QuantOptions, QuantTarget};
use steper_models::{Checkpoint, LlamaConfig, Weights};
use steper_runtime::backend::{load_model, BackendKind, OrtOptions};
use steper_runtime::manifest::AttentionOp;
use steper_runtime::LogitsMode;
use tract_onnx::pb::ModelProto;

/// Decode steps verified after the prompt.
const STEPS: usize = 8;

/// Last-position logits of a `logits_to_keep` prefill vs the full prefill's last row (fp32,
/// same backend, same graph).
const LAST_ROW_ABS: f32 = 1e-4;

/// Scale of the q/k/v biases relative to `Weights::random`'s 0.02: the tiny model's q/k
/// activations are O(1) (weights ×12), so biases of O(1) move the logits visibly.
const BIAS_SCALE: f64 = 50.0;

fn qwen2_config(tied: bool) -> LlamaConfig {
    let mut cfg = LlamaConfig::tiny_qwen2(VOCAB);
    cfg.tie_word_embeddings = tied;
    cfg.max_position_embeddings = 256;
    cfg
}

/// The tiny checkpoint (weights as the Llama fixtures, biases scaled) with its tokenizer.
fn qwen2_checkpoint(dir: &std::path::Path, cfg: &LlamaConfig, seed: u64) -> Result<()> {
    let w = tiny_weights(cfg, seed)?;
    let mut out = Weights::default();
    for (name, t) in w.tensors() {
        let t = if name.ends_with(".bias") {
            (t * BIAS_SCALE)?
        } else {
            t.clone()
        };
        out.insert(name.clone(), t);
    }
    Checkpoint::save(dir, cfg, &out, None)?;
    write_tokenizer(&dir.join("tokenizer.json"), cfg.vocab_size)?;
    Ok(())
}

struct Exported {
    _tmp: tempfile::TempDir,
    ckpt: std::path::PathBuf,
    out: std::path::PathBuf,
}

fn export(cfg: &LlamaConfig, o: &ExportOptions) -> Result<Exported> {
    ensure_ort()?;
    let tmp = tempfile::tempdir()?;
    let ckpt = tmp.path().join("ckpt");
    let out = tmp.path().join("export");
    qwen2_checkpoint(&ckpt, cfg, 31)?;
    steper_export::export(&ckpt, &out, o)?;
    Ok(Exported {
        _tmp: tmp,
        ckpt,
        out,
    })
}

/// Exports with `o` and runs the export's verification with the form's own tolerance.
fn export_and_verify(cfg: &LlamaConfig, o: &ExportOptions) -> Result<Exported> {
    let x = export(cfg, o)?;
    let mut v = VerifyOptions::for_export(o.dtype, o.quantize.as_ref());
    v.steps = STEPS;
    let rep = verify(&x.ckpt, &x.out, &v)?;
    for b in &rep.backends {
        eprintln!(
            "{} {:?} {:?} on {}: max_rel {:.2e} max_abs {:.2e} top-1 {:.3} greedy {}",
            cfg.model_type,
            o.dtype,
            o.quantize
                .map(|q| format!("{:?} {}", q.bits, q.target.as_str())),
            b.backend,
            b.max_rel,
            b.max_abs,
            b.top1_agreement,
            b.greedy_identical
        );
        assert_eq!(b.steps.len(), STEPS + 1, "{}", b.backend);
    }
    assert!(
        rep.pass,
        "Qwen2 export ({:?}, quant {:?}, attention {:?}) fails {}",
        o.dtype, o.quantize, o.attention, v.tolerance.name
    );
    Ok(x)
}

fn quantized(bits: QuantBits, target: QuantTarget) -> ExportOptions {
    ExportOptions::quantized(QuantOptions {
        bits,
        block_size: 32,
        target,
        lm_head: true,
        zero_points: steper_export::ZeroPoints::None,
        off_grid_int8: false,
    })
}

fn graph(dir: &std::path::Path) -> Result<ModelProto> {
    Ok(ModelProto::decode(&*std::fs::read(
        dir.join("model.onnx"),
    )?)?)
}

#[test]
fn fp32_tied_and_untied_match_candle_on_ort_and_tract() -> Result<()> {
    for tied in [true, false] {
        let cfg = qwen2_config(tied);
        let x = export_and_verify(&cfg, &ExportOptions::default())?;
        // One bias Add after each of q, k, v per layer, reading a float bias initializer.
        let m = graph(&x.out)?;
        let g = m.graph.as_ref().context("graph")?;
        for l in 0..cfg.num_hidden_layers {
            for p in ["q_proj", "k_proj", "v_proj"] {
                let name = format!("model.layers.{l}.self_attn.{p}.bias");
                assert!(
                    g.node
                        .iter()
                        .any(|n| n.op_type == "Add" && n.input.contains(&name)),
                    "no Add reads {name}"
                );
            }
            assert!(!g.initializer.iter().any(|t| t.name.contains("o_proj.bias")
                || t.name.contains("mlp") && t.name.ends_with(".bias")));
        }
        assert_eq!(g.name, "steper_qwen2_decoder");
    }
    Ok(())
}

#[test]
fn fp16_matches_candle() -> Result<()> {
    export_and_verify(
        &qwen2_config(true),
        &ExportOptions {
            dtype: ExportDtype::Fp16,
            ..Default::default()
        },
    )
    .map(|_| ())
}

#[test]
fn int4_and_int8_ort_cpu_match_candle_on_dequantized_weights() -> Result<()> {
    for bits in [QuantBits::Int4, QuantBits::Int8] {
        export_and_verify(&qwen2_config(false), &quantized(bits, QuantTarget::OrtCpu))?;
    }
    Ok(())
}

#[test]
fn int4_and_int8_portable_match_candle_on_dequantized_weights() -> Result<()> {
    for bits in [QuantBits::Int4, QuantBits::Int8] {
        let x = export_and_verify(&qwen2_config(true), &quantized(bits, QuantTarget::Portable))?;
        // Biases stay float next to the quantized weights.
        let m = graph(&x.out)?;
        let g = m.graph.as_ref().context("graph")?;
        let b = g
            .initializer
            .iter()
            .find(|t| t.name == "model.layers.0.self_attn.q_proj.bias")
            .context("float q bias")?;
        assert_eq!(
            b.data_type,
            tract_onnx::pb::tensor_proto::DataType::Float as i32
        );
    }
    Ok(())
}

#[test]
fn gqa_float_and_int4_match_candle() -> Result<()> {
    let cfg = qwen2_config(true);
    export_and_verify(
        &cfg,
        &ExportOptions {
            attention: AttentionOp::GroupQueryAttention,
            ..Default::default()
        },
    )?;
    export_and_verify(
        &cfg,
        &ExportOptions {
            attention: AttentionOp::GroupQueryAttention,
            ..quantized(QuantBits::Int4, QuantTarget::OrtCpu)
        },
    )?;
    Ok(())
}

#[test]
fn logits_to_keep_last_row_equals_the_full_prefill_on_ort_and_tract() -> Result<()> {
    let x = export(&qwen2_config(true), &ExportOptions::default())?;
    let p = prompt(12);
    for b in [BackendKind::Ort(OrtOptions::default()), BackendKind::Tract] {
        let g = load_model(&x.out, &b)?.generator;
        let all = g.append(&mut g.new_sequence()?, &p, LogitsMode::All)?;
        assert_eq!(all.rows, p.len());
        let last = g.append(&mut g.new_sequence()?, &p, LogitsMode::Last)?;
        assert_eq!(last.rows, 1, "{}", b.name());
        let d = last
            .data
            .iter()
            .zip(all.last())
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(d <= LAST_ROW_ABS, "{}: last row differs by {d}", b.name());
    }
    Ok(())
}

#[test]
fn genai_config_names_the_qwen2_type() -> Result<()> {
    let x = export(&qwen2_config(true), &ExportOptions::default())?;
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(x.out.join("genai_config.json"))?)?;
    assert_eq!(v["model"]["type"], "qwen2");
    Ok(())
}
