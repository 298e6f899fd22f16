//! Weight-quantized exports (`--quantize int4|int8`, `--target ort-cpu|portable`) of a tiny
//! random model against the candle model on the same dequantized weights, the graph's operators,
//! the records in the manifest and genai_config.json, and the errors.

mod common;

use std::path::Path;

use anyhow::{Context, Result};
use candle_core::{DType, Device};
use common::*;
use prost::Message;
use steper_export::quant::{dequantized_checkpoint, ORT_CPU_BITS};
use steper_export::verify::{check_backend, reference, Reference, Tolerance, INT_MATMULNBITS};
use steper_export::{Error, ExportOptions, QuantBits, QuantOptions, QuantTarget, ZeroPoints};
use steper_runtime::backend::{load_model, BackendKind, OrtOptions};
use tract_onnx::pb::{GraphProto, ModelProto, NodeProto};

fn opts(bits: QuantBits, target: QuantTarget, block_size: usize, lm_head: bool) -> ExportOptions {
    ExportOptions::quantized(QuantOptions {
        bits,
        block_size,
        target,
        lm_head,
        zero_points: ZeroPoints::None,
        off_grid_int8: false,
    })
}

/// [`opts`] with per-block zero points (asymmetric blocks).
fn zopts(bits: QuantBits, target: QuantTarget, block_size: usize, lm_head: bool) -> ExportOptions {
    let mut o = opts(bits, target, block_size, lm_head);
    if let Some(q) = o.quantize.as_mut() {
        q.zero_points = ZeroPoints::Int;
    }
    o
}

/// [`opts`] with float zero points (a float minimum per block, the block-sum correction).
fn fopts(bits: QuantBits, target: QuantTarget, block_size: usize, lm_head: bool) -> ExportOptions {
    let mut o = opts(bits, target, block_size, lm_head);
    if let Some(q) = o.quantize.as_mut() {
        q.zero_points = ZeroPoints::Float;
    }
    o
}

struct Quantized {
    _tmp: tempfile::TempDir,
    ckpt: std::path::PathBuf,
    out: std::path::PathBuf,
}

fn export_quantized(o: &ExportOptions) -> Result<Quantized> {
    ensure_ort()?;
    let tmp = tempfile::tempdir()?;
    let ckpt = tmp.path().join("ckpt");
    let out = tmp.path().join("export");
    tiny_checkpoint(&ckpt, &tiny_config(), 7)?;
    steper_export::export(&ckpt, &out, o)?;
    Ok(Quantized {
        _tmp: tmp,
        ckpt,
        out,
    })
}

/// The candle reference on the weights dequantized exactly as the export quantized them.
fn dequantized_reference(ckpt: &Path, q: &QuantOptions, steps: usize) -> Result<Reference> {
    let ck = steper_models::Checkpoint::load(ckpt, DType::F32, &Device::Cpu)?;
    let (cfg, w) = dequantized_checkpoint(&ck.config, &ck.weights, q)?;
    let model = steper_models::Llama::new(&cfg, &w)?;
    Ok(reference(&model, &prompt(12), steps)?)
}

fn check(o: &ExportOptions, backends: &[(BackendKind, Tolerance)]) -> Result<()> {
    let x = export_quantized(o)?;
    let q = o.quantize.context("quantized options")?;
    let r = dequantized_reference(&x.ckpt, &q, 8)?;
    for (b, tol) in backends {
        let rep = check_backend(&x.out, b, &r, *tol)?;
        eprintln!(
            "{:?} {} on {}: max_rel {:.2e}, max_abs {:.2e}, top-1 {:.3}",
            q.bits,
            q.target.as_str(),
            rep.backend,
            rep.max_rel,
            rep.max_abs,
            rep.top1_agreement
        );
        assert!(
            rep.pass,
            "{} fails {}: max_rel {} top-1 {} greedy identical {}",
            rep.backend, tol.name, rep.max_rel, rep.top1_agreement, rep.greedy_identical
        );
    }
    Ok(())
}

fn ort() -> (BackendKind, Tolerance) {
    (BackendKind::Ort(OrtOptions::default()), INT_MATMULNBITS)
}

#[test]
fn int4_ort_cpu_matches_candle_on_dequantized_weights() -> Result<()> {
    check(
        &opts(QuantBits::Int4, QuantTarget::OrtCpu, 32, true),
        &[ort()],
    )
}

#[test]
fn int4_ort_cpu_with_float_lm_head_and_block_64_matches() -> Result<()> {
    check(
        &opts(QuantBits::Int4, QuantTarget::OrtCpu, 64, false),
        &[ort()],
    )
}

#[test]
fn int4_portable_matches_candle_on_dequantized_weights() -> Result<()> {
    check(
        &opts(QuantBits::Int4, QuantTarget::Portable, 32, true),
        &[ort()],
    )
}

#[test]
fn int4_with_zero_points_on_ort_cpu_matches_candle_on_dequantized_weights() -> Result<()> {
    check(
        &zopts(QuantBits::Int4, QuantTarget::OrtCpu, 32, true),
        &[ort()],
    )?;
    check(
        &zopts(QuantBits::Int4, QuantTarget::OrtCpu, 64, false),
        &[ort()],
    )
}

#[test]
fn int4_and_int8_with_zero_points_portable_match_candle_on_dequantized_weights() -> Result<()> {
    check(
        &zopts(QuantBits::Int4, QuantTarget::Portable, 32, true),
        &[ort()],
    )?;
    check(
        &zopts(QuantBits::Int8, QuantTarget::Portable, 16, true),
        &[ort()],
    )
}

#[test]
fn zero_points_are_in_the_graph_and_the_manifest() -> Result<()> {
    let x = export_quantized(&zopts(QuantBits::Int4, QuantTarget::OrtCpu, 32, true))?;
    let m = graph(&x.out)?;
    let g = m.graph.as_ref().context("graph")?;
    let nbits = nodes_of(g, "MatMulNBits");
    assert!(!nbits.is_empty());
    for n in &nbits {
        assert_eq!(n.input.len(), 4, "{}: zero_points input", n.name);
        assert!(n.input[3].ends_with(".zero_points"), "{}", n.input[3]);
    }
    let manifest = steper_runtime::Manifest::load(&x.out.join("steper.json"))?;
    let q = manifest.quantization.context("quantization record")?;
    assert!(q.zero_points);
    assert!(!q.float_zero_points);
    let back = QuantOptions::from_record(&q)?;
    assert_eq!(back.zero_points, ZeroPoints::Int);
    // Symmetric exports write no zero points and no field.
    let s = export_quantized(&opts(QuantBits::Int4, QuantTarget::OrtCpu, 32, true))?;
    let text = std::fs::read_to_string(s.out.join("steper.json"))?;
    assert!(!text.contains("zero_points"), "{text}");
    Ok(())
}

#[test]
fn int4_and_int8_with_float_zero_points_on_ort_cpu_match_candle_on_dequantized_weights(
) -> Result<()> {
    check(
        &fopts(QuantBits::Int4, QuantTarget::OrtCpu, 32, true),
        &[ort()],
    )?;
    check(
        &fopts(QuantBits::Int8, QuantTarget::OrtCpu, 16, false),
        &[ort()],
    )
}

#[test]
fn float_zero_points_add_one_block_sum_correction_per_matmulnbits_and_are_recorded() -> Result<()> {
    let x = export_quantized(&fopts(QuantBits::Int4, QuantTarget::OrtCpu, 32, true))?;
    let m = graph(&x.out)?;
    let g = m.graph.as_ref().context("graph")?;
    let nbits = nodes_of(g, "MatMulNBits");
    assert!(!nbits.is_empty());
    for n in &nbits {
        assert_eq!(n.input.len(), 3, "{}: no integer zero points", n.name);
        // Its output feeds an Add whose other input is MatMul(ReduceSum(Reshape(x)), offsets).
        let add = g
            .node
            .iter()
            .find(|a| a.op_type == "Add" && a.input.contains(&n.output[0]))
            .with_context(|| format!("{}: no Add of the correction", n.name))?;
        let other = add
            .input
            .iter()
            .find(|i| **i != n.output[0])
            .context("addend")?;
        let producer = |out: &String| {
            g.node
                .iter()
                .find(|c| c.output.contains(out))
                .with_context(|| format!("no node makes {out}"))
        };
        let corr = producer(other)?;
        assert_eq!(corr.op_type, "MatMul");
        assert!(
            corr.input[1].ends_with(".MatMulNBits.offsets"),
            "{:?}",
            corr.input
        );
        let sums = producer(&corr.input[0])?;
        assert_eq!(sums.op_type, "ReduceSum");
        let blocks = producer(&sums.input[0])?;
        assert_eq!(blocks.op_type, "Reshape");
        assert_eq!(
            blocks.input[0], n.input[0],
            "the block sums read the MatMulNBits input"
        );
        let k = n
            .attribute
            .iter()
            .find(|a| a.name == "K")
            .map(|a| a.i)
            .context("K")?;
        let shape = g
            .initializer
            .iter()
            .find(|t| t.name == blocks.input[1])
            .context("block shape")?;
        let dims: Vec<i64> = shape
            .raw_data
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes(b.try_into().expect("8 bytes")))
            .collect();
        // [0, 0, K/32, 32] for hidden states, [0, K/32, 32] for the vocabulary projection's rows.
        let (lead, tail) = dims.split_at(dims.len() - 2);
        assert!(lead.iter().all(|&d| d == 0) && !lead.is_empty(), "{dims:?}");
        assert_eq!(tail, &[k / 32, 32]);
    }
    let manifest = steper_runtime::Manifest::load(&x.out.join("steper.json"))?;
    let q = manifest.quantization.context("quantization record")?;
    assert!(q.zero_points && q.float_zero_points);
    assert_eq!(
        QuantOptions::from_record(&q)?.zero_points,
        ZeroPoints::Float
    );
    Ok(())
}

#[test]
fn float_zero_points_are_refused_for_the_portable_target() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let ckpt = tmp.path().join("ckpt");
    tiny_checkpoint(&ckpt, &tiny_config(), 7)?;
    let out = tmp.path().join("export");
    match steper_export::export(
        &ckpt,
        &out,
        &fopts(QuantBits::Int4, QuantTarget::Portable, 32, true),
    ) {
        Err(Error::Option {
            option, expected, ..
        }) => {
            assert_eq!(option, "--zero-points");
            assert!(expected.contains("ort-cpu"), "{expected}");
        }
        other => panic!("expected a --zero-points option error, got {other:?}"),
    }
    assert!(!out.join("model.onnx").exists());
    let e = "half".parse::<ZeroPoints>().err().context("must fail")?;
    assert!(e.to_string().contains("float"), "{e}");
    Ok(())
}

#[test]
fn int8_portable_matches_candle_on_dequantized_weights() -> Result<()> {
    check(
        &opts(QuantBits::Int8, QuantTarget::Portable, 32, true),
        &[ort()],
    )
}

#[test]
fn int8_ort_cpu_matches_or_is_refused_naming_the_option() -> Result<()> {
    let o = opts(QuantBits::Int8, QuantTarget::OrtCpu, 32, true);
    if ORT_CPU_BITS.contains(&QuantBits::Int8) {
        return check(&o, &[ort()]);
    }
    let e = export_quantized(&o)
        .err()
        .context("int8 ort-cpu must fail")?;
    let msg = format!("{e:#}");
    assert!(
        msg.contains("--quantize") && msg.contains("portable"),
        "{msg}"
    );
    Ok(())
}

fn graph(dir: &Path) -> Result<ModelProto> {
    Ok(ModelProto::decode(&*std::fs::read(
        dir.join("model.onnx"),
    )?)?)
}

/// The nodes of `g` with operator `op`.
fn nodes_of<'g>(g: &'g GraphProto, op: &str) -> Vec<&'g NodeProto> {
    g.node.iter().filter(|n| n.op_type == op).collect()
}

fn count(m: &ModelProto, op: &str) -> usize {
    m.graph.as_ref().map(|g| nodes_of(g, op).len()).unwrap_or(0)
}

#[test]
fn ort_cpu_graph_uses_matmulnbits_for_every_linear_layer_with_qkv_and_gate_up_fused() -> Result<()>
{
    let x = export_quantized(&opts(QuantBits::Int4, QuantTarget::OrtCpu, 32, true))?;
    let m = graph(&x.out)?;
    let layers = tiny_config().num_hidden_layers;
    // Per layer: q/k/v fused into one, o, gate/up fused into one, down; then the lm_head.
    assert_eq!(count(&m, "MatMulNBits"), 4 * layers + 1);
    assert_eq!(count(&m, "Split"), 2 * layers);
    assert_eq!(count(&m, "Gemm"), 0, "the lm_head must be quantized too");
    assert!(m
        .opset_import
        .iter()
        .any(|o| o.domain == "com.microsoft" && o.version == 1));
    let g = m.graph.as_ref().context("graph")?;
    for n in nodes_of(g, "MatMulNBits") {
        assert_eq!(n.domain, "com.microsoft");
        let attr = |k: &str| n.attribute.iter().find(|a| a.name == k).map(|a| a.i);
        assert_eq!(attr("bits"), Some(4));
        assert_eq!(attr("block_size"), Some(32));
        assert_eq!(attr("accuracy_level"), Some(4));
    }
    // Remaining MatMuls are the two attention products per layer (activations × activations).
    let inits: std::collections::HashSet<&str> =
        g.initializer.iter().map(|t| t.name.as_str()).collect();
    for n in g.node.iter().filter(|n| n.op_type == "MatMul") {
        assert!(
            !inits.contains(n.input[1].as_str()),
            "float weight left: {}",
            n.input[1]
        );
    }
    assert_eq!(count(&m, "MatMul"), 2 * layers);
    // The embedding lookup keeps the float table.
    let embed = g
        .initializer
        .iter()
        .find(|t| t.name == "model.embed_tokens.weight")
        .context("float embedding")?;
    assert_eq!(
        embed.data_type,
        tract_onnx::pb::tensor_proto::DataType::Float as i32
    );
    Ok(())
}

#[test]
fn portable_graph_is_standard_onnx_opset_21_with_int4_weights() -> Result<()> {
    let x = export_quantized(&opts(QuantBits::Int4, QuantTarget::Portable, 32, true))?;
    let m = graph(&x.out)?;
    let layers = tiny_config().num_hidden_layers;
    assert!(m.ir_version <= 10, "ONNX Runtime 1.31 needs IR ≤ 10");
    assert_eq!(m.opset_import.len(), 1);
    assert_eq!(
        (m.opset_import[0].domain.as_str(), m.opset_import[0].version),
        ("", 21)
    );
    let g = m.graph.as_ref().context("graph")?;
    assert!(g.node.iter().all(|n| n.domain.is_empty()));
    assert_eq!(count(&m, "DequantizeLinear"), 7 * layers + 1);
    assert_eq!(count(&m, "MatMul"), 2 * layers + 7 * layers + 1);
    let int4 = tract_onnx::pb::tensor_proto::DataType::Int4 as i32;
    for n in g.node.iter().filter(|n| n.op_type == "DequantizeLinear") {
        let w = g
            .initializer
            .iter()
            .find(|t| t.name == n.input[0])
            .context("DequantizeLinear weight is an initializer")?;
        assert_eq!(w.data_type, int4, "{}", w.name);
        let attr = |k: &str| n.attribute.iter().find(|a| a.name == k).map(|a| a.i);
        assert_eq!((attr("axis"), attr("block_size")), (Some(0), Some(32)));
    }
    Ok(())
}

#[test]
fn manifest_and_genai_config_say_what_was_quantized() -> Result<()> {
    let x = export_quantized(&opts(QuantBits::Int4, QuantTarget::OrtCpu, 32, true))?;
    let m = steper_runtime::Manifest::load(&x.out.join("steper.json"))?;
    assert_eq!(m.dtype, "fp32");
    let q = m.quantization.context("quantization record")?;
    assert_eq!((q.bits, q.block_size, q.lm_head), (4, 32, true));
    assert_eq!(
        (q.target.as_str(), q.op.as_str()),
        ("ort-cpu", "MatMulNBits")
    );
    assert_eq!(q.accuracy_level, Some(4));
    assert_eq!(q.layers, 7 * tiny_config().num_hidden_layers + 1);
    let genai: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(x.out.join("genai_config.json"))?)?;
    let s = genai["model"]["decoder"]["session_options"]["steper.weight_quantization"]
        .as_str()
        .context("genai_config records the quantization")?;
    assert!(s.contains("int4") && s.contains("MatMulNBits"), "{s}");
    Ok(())
}

#[test]
fn a_block_size_that_does_not_divide_a_layer_names_the_layer_and_option() -> Result<()> {
    ensure_ort()?;
    let tmp = tempfile::tempdir()?;
    let ckpt = tmp.path().join("ckpt");
    tiny_checkpoint(&ckpt, &tiny_config(), 7)?;
    // hidden 64: block 128 (a valid MatMulNBits size) does not divide q_proj's input.
    let e = steper_export::export(
        &ckpt,
        &tmp.path().join("a"),
        &opts(QuantBits::Int4, QuantTarget::OrtCpu, 128, true),
    )
    .err()
    .context("must fail")?;
    assert!(
        matches!(
            e,
            Error::BlockSize {
                input_dim: 64,
                block_size: 128,
                ..
            }
        ),
        "{e}"
    );
    let msg = e.to_string();
    assert!(
        msg.contains("--block-size") && msg.contains("q_proj"),
        "{msg}"
    );
    // Portable accepts any size, still only divisors: 48 does not divide 64.
    let e = steper_export::export(
        &ckpt,
        &tmp.path().join("b"),
        &opts(QuantBits::Int8, QuantTarget::Portable, 48, true),
    )
    .err()
    .context("must fail")?;
    assert!(
        e.to_string()
            .contains("model.layers.0.self_attn.q_proj.weight"),
        "{e}"
    );
    // MatMulNBits needs a power of two ≥ 16.
    let e = steper_export::export(
        &ckpt,
        &tmp.path().join("c"),
        &opts(QuantBits::Int4, QuantTarget::OrtCpu, 24, true),
    )
    .err()
    .context("must fail")?;
    assert!(e.to_string().contains("--block-size"), "{e}");
    // Nothing was written for a refused export.
    assert!(!tmp.path().join("a").join("model.onnx").exists());
    Ok(())
}

#[test]
fn tract_refuses_quantized_exports_with_an_error_naming_layer_and_op() -> Result<()> {
    for (bits, target, op) in [
        (QuantBits::Int8, QuantTarget::Portable, "DequantizeLinear"),
        (QuantBits::Int4, QuantTarget::OrtCpu, "MatMulNBits"),
    ] {
        let x = export_quantized(&opts(bits, target, 32, true))?;
        let e = load_model(&x.out, &BackendKind::Tract)
            .err()
            .context("tract must refuse a quantized export")?;
        let msg = e.to_string();
        assert!(
            msg.contains(op) && msg.contains("q_proj") && msg.contains("tract"),
            "{msg}"
        );
        // ONNX Runtime runs the same export.
        load_model(&x.out, &BackendKind::Ort(OrtOptions::default()))?;
    }
    Ok(())
}

#[test]
fn verify_reports_agreement_for_a_quantized_export() -> Result<()> {
    let o = opts(QuantBits::Int4, QuantTarget::OrtCpu, 32, true);
    let x = export_quantized(&o)?;
    let vo = steper_export::verify::VerifyOptions {
        steps: 8,
        ..steper_export::verify::VerifyOptions::for_export(
            steper_export::ExportDtype::Fp32,
            o.quantize.as_ref(),
        )
    };
    assert!(!vo.tract, "the runtime refuses quantized exports on tract");
    let rep = steper_export::verify::verify(&x.ckpt, &x.out, &vo)?;
    assert_eq!(rep.quantization, o.quantize);
    assert_eq!(rep.backends.len(), 1);
    for b in &rep.backends {
        let f = b.fp32.as_ref().context("fp32 agreement reported")?;
        assert_eq!(f.steps, 8);
        assert!((0.0..=1.0).contains(&f.top1_prompt) && (0.0..=1.0).contains(&f.greedy));
        assert!(b.pass, "{}: {}", b.backend, rep.tolerance.name);
    }
    Ok(())
}

#[test]
fn off_grid_int8_keeps_layers_on_a_q4_1_grid_in_int4_and_quantizes_the_others_to_int8() -> Result<()>
{
    ensure_ort()?;
    let tmp = tempfile::tempdir()?;
    let ckpt = tmp.path().join("ckpt");
    let cfg = tiny_config();
    // Layer 0 snapped onto a Q4_1 grid (as if imported from a GGUF and left frozen by
    // training); the other layers and the vocabulary projection stay random.
    let w = tiny_weights(&cfg, 7)?;
    let mut map = w.tensors().clone();
    for p in steper_models::arch::Projection::ALL {
        let name = p.weight_name(0);
        let t = map[&name].to_dtype(DType::F32)?;
        let (rows, cols) = t.dims2()?;
        let data: Vec<f32> = t.flatten_all()?.to_vec1()?;
        let bq = steper_export::quant::quantize(
            &name,
            &data,
            rows,
            cols,
            QuantBits::Int4,
            32,
            ZeroPoints::Float,
        )?;
        let snapped = candle_core::Tensor::from_vec(bq.dequantize(), (rows, cols), &Device::Cpu)?;
        map.insert(name, snapped.to_dtype(w.dtype())?);
    }
    steper_models::Checkpoint::save(&ckpt, &cfg, &steper_models::Weights::from_map(map), None)?;
    write_tokenizer(&ckpt.join("tokenizer.json"), cfg.vocab_size)?;
    let mut o = fopts(QuantBits::Int4, QuantTarget::OrtCpu, 32, true);
    if let Some(q) = o.quantize.as_mut() {
        q.off_grid_int8 = true;
    }
    let out = tmp.path().join("export");
    steper_export::export(&ckpt, &out, &o)?;
    let m = graph(&out)?;
    let g = m.graph.as_ref().context("graph")?;
    let mut seen = 0;
    for n in nodes_of(g, "MatMulNBits") {
        let bits = n
            .attribute
            .iter()
            .find(|a| a.name == "bits")
            .map(|a| a.i)
            .context("bits")?;
        let want = if n.input[1].starts_with("model.layers.0.") {
            4
        } else {
            8
        };
        assert_eq!(bits, want, "{}", n.input[1]);
        seen += 1;
    }
    assert!(seen > 2, "{seen} MatMulNBits");
    let q = o.quantize.context("quantized options")?;
    let manifest = steper_runtime::Manifest::load(&out.join("steper.json"))?;
    let rec = manifest.quantization.context("quantization record")?;
    assert!(rec.off_grid_int8);
    assert_eq!(QuantOptions::from_record(&rec)?, q);
    // The graph computes the mixed weights the reference dequantizes.
    let r = dequantized_reference(&ckpt, &q, 8)?;
    let (b, tol) = ort();
    let rep = check_backend(&out, &b, &r, tol)?;
    assert!(
        rep.pass,
        "max_rel {} top-1 {}",
        rep.max_rel, rep.top1_agreement
    );
    // Only float zero points can tell a layer on the grid from one off it.
    let mut bad = opts(QuantBits::Int4, QuantTarget::OrtCpu, 32, true);
    if let Some(q) = bad.quantize.as_mut() {
        q.off_grid_int8 = true;
    }
    match steper_export::export(&ckpt, &tmp.path().join("bad"), &bad) {
        Err(Error::Option { option, .. }) => assert_eq!(option, "--off-grid-int8"),
        other => panic!("expected an --off-grid-int8 option error, got {other:?}"),
    }
    Ok(())
}
