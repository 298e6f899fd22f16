//! What ONNX Runtime's optimizer makes of an export: every RMSNorm (two per layer and the final
//! one) must be fused into one `SimplifiedLayerNormalization`, in the standard and in the
//! GroupQueryAttention graph, fp32 and int4 — the node count is what decode pays per token on the
//! CPU. Read from the optimized graph ONNX Runtime writes (`OrtOptions::optimized_model`).

mod common;

use anyhow::{Context, Result};
use common::*;
use prost::Message;
use steper_export::{AttentionOp, ExportOptions, QuantOptions};
use steper_runtime::backend::{load_model, BackendKind, OrtOptions};
use tract_onnx::pb::ModelProto;

fn count(m: &ModelProto, op: &str) -> usize {
    m.graph
        .as_ref()
        .map(|g| g.node.iter().filter(|n| n.op_type == op).count())
        .unwrap_or(0)
}

/// Exports the tiny checkpoint with `opts`, loads it on ONNX Runtime (optimization level all)
/// and returns the exported graph and the optimized one.
fn exported_and_optimized(opts: &ExportOptions) -> Result<(ModelProto, ModelProto)> {
    ensure_ort()?;
    let tmp = tempfile::tempdir()?;
    let ckpt = tmp.path().join("ckpt");
    tiny_checkpoint(&ckpt, &tiny_config(), 7)?;
    let out = tmp.path().join("export");
    steper_export::export(&ckpt, &out, opts)?;
    let optimized = tmp.path().join("optimized.onnx");
    let kind = BackendKind::Ort(OrtOptions::default().with_optimized_model(&optimized));
    load_model(&out, &kind).context("loading the export on ONNX Runtime")?;
    let read = |p: &std::path::Path| -> Result<ModelProto> {
        let bytes = std::fs::read(p).with_context(|| p.display().to_string())?;
        Ok(ModelProto::decode(bytes.as_slice())?)
    };
    Ok((read(&out.join("model.onnx"))?, read(&optimized)?))
}

fn assert_rms_norms_fused(opts: ExportOptions, what: &str) -> Result<()> {
    let (exported, optimized) = exported_and_optimized(&opts)?;
    let norms = 2 * tiny_config().num_hidden_layers + 1;
    // The export writes the pattern ONNX Runtime recognizes: Pow(x, 2) → ReduceMean → Add(ε) →
    // Sqrt → Div → Mul(weight) …
    assert_eq!(count(&exported, "Pow"), norms, "{what}: exported Pow");
    assert_eq!(count(&exported, "ReduceMean"), norms, "{what}");
    // … and every one of them becomes one fused node.
    assert_eq!(
        count(&optimized, "SimplifiedLayerNormalization"),
        norms,
        "{what}: fused RMSNorms"
    );
    for op in ["Pow", "ReduceMean", "Sqrt", "Div"] {
        assert_eq!(count(&optimized, op), 0, "{what}: {op} left after fusion");
    }
    let (before, after) = (
        exported.graph.as_ref().map_or(0, |g| g.node.len()),
        optimized.graph.as_ref().map_or(0, |g| g.node.len()),
    );
    assert!(
        after + 5 * norms <= before,
        "{what}: {before} nodes exported, {after} after optimization"
    );
    Ok(())
}

#[test]
fn every_rms_norm_of_the_standard_fp32_graph_is_fused_by_onnx_runtime() -> Result<()> {
    assert_rms_norms_fused(ExportOptions::default(), "standard fp32")
}

#[test]
fn every_rms_norm_of_the_int4_gqa_graph_is_fused_by_onnx_runtime() -> Result<()> {
    let opts = ExportOptions {
        attention: AttentionOp::GroupQueryAttention,
        quantize: Some(QuantOptions::int4()),
        ..Default::default()
    };
    assert_rms_norms_fused(opts, "int4 gqa")
}
