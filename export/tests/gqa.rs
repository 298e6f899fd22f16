//! `--attention gqa`: the `com.microsoft.GroupQueryAttention` graph of a tiny random GQA model
//! against the candle model and against the standard (concatenating) graph step for step —
//! prefill, 64 decode steps, a multi-token append onto a filled cache and a truncation — its
//! operators and manifest, and where it is refused.

mod common;

use anyhow::{Context, Result};
use candle_core::{DType, Device};
use common::*;
use prost::Message;
use steper_export::quant::dequantized_checkpoint;
use steper_export::verify::{check_backend, reference, FP32_CLOSE, INT_MATMULNBITS};
use steper_export::{AttentionOp, Error, ExportOptions, QuantBits, QuantOptions, QuantTarget};
use steper_runtime::backend::{
    load_model, BackendKind, BatchDecoder, BatchInput, KvCacheMode, OrtGenerator, OrtOptions,
};
use steper_runtime::{Generator, LogitsMode};
use tract_onnx::pb::ModelProto;

/// The GroupQueryAttention graph against the standard graph on the same weights, both on ONNX
/// Runtime: the same math in another summation order (its fused kernel vs `MatMul`/`Softmax`),
/// as a fraction of the step's largest |logit|.
const GQA_VS_CONCAT_REL: f32 = 1e-4;

/// Decode steps compared.
const DECODE_STEPS: usize = 64;

fn ort() -> BackendKind {
    BackendKind::Ort(OrtOptions::default())
}

struct Exported {
    _tmp: tempfile::TempDir,
    ckpt: std::path::PathBuf,
    gqa: std::path::PathBuf,
    standard: std::path::PathBuf,
}

/// One checkpoint exported with both attention forms under `base` options.
fn export_both(base: &ExportOptions) -> Result<Exported> {
    ensure_ort()?;
    let tmp = tempfile::tempdir()?;
    let ckpt = tmp.path().join("ckpt");
    tiny_checkpoint(&ckpt, &tiny_config(), 7)?;
    let gqa = tmp.path().join("gqa");
    let standard = tmp.path().join("standard");
    steper_export::export(
        &ckpt,
        &gqa,
        &ExportOptions {
            attention: AttentionOp::GroupQueryAttention,
            ..base.clone()
        },
    )?;
    steper_export::export(&ckpt, &standard, base)?;
    Ok(Exported {
        _tmp: tmp,
        ckpt,
        gqa,
        standard,
    })
}

fn rel_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0.0f32, |m, x| m.max(x.abs())).max(1e-6);
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
        / scale
}

#[test]
fn gqa_export_matches_candle_for_the_prefill_and_64_decode_steps() -> Result<()> {
    let x = export_both(&ExportOptions::default())?;
    let ck = steper_models::Checkpoint::load(&x.ckpt, DType::F32, &Device::Cpu)?;
    let r = reference(&ck.model()?, &prompt(12), DECODE_STEPS)?;
    let rep = check_backend(&x.gqa, &ort(), &r, FP32_CLOSE)?;
    assert_eq!(rep.steps.len(), DECODE_STEPS + 1);
    assert!(
        rep.pass,
        "GroupQueryAttention export fails {}: max_rel {} greedy identical {}",
        FP32_CLOSE.name, rep.max_rel, rep.greedy_identical
    );
    Ok(())
}

#[test]
fn gqa_graph_equals_the_concatenating_graph_step_for_step() -> Result<()> {
    let x = export_both(&ExportOptions::default())?;
    let g = load_model(&x.gqa, &ort())?.generator;
    let s = load_model(&x.standard, &ort())?.generator;
    let (mut sg, mut ss) = (g.new_sequence()?, s.new_sequence()?);
    let mut worst = 0.0f32;
    let mut step = |tokens: &[u32], mode: LogitsMode, what: &str| -> Result<()> {
        let a = g.append(&mut sg, tokens, mode)?;
        let b = s.append(&mut ss, tokens, mode)?;
        assert_eq!((a.rows, a.vocab), (b.rows, b.vocab), "{what}");
        let d = rel_diff(&a.data, &b.data);
        assert!(
            d <= GQA_VS_CONCAT_REL,
            "{what}: GroupQueryAttention differs from the standard graph by rel {d}"
        );
        worst = worst.max(d);
        Ok(())
    };
    // Prefill with every position's logits, then 64 one-token steps.
    step(&prompt(12), LogitsMode::All, "prefill")?;
    for i in 0..DECODE_STEPS {
        let t = ((i * 29 + 3) % VOCAB) as u32;
        step(&[t], LogitsMode::Last, &format!("decode step {i}"))?;
    }
    // Several tokens onto a filled cache (the loop's new passages after a reused prefix).
    step(&prompt(5), LogitsMode::All, "5-token append onto the cache")?;
    // Truncation (KV-prefix reuse) and an append after it.
    g.truncate(&mut sg, 40)?;
    s.truncate(&mut ss, 40)?;
    assert_eq!((sg.len(), ss.len()), (40, 40));
    let a = g.append(&mut sg, &prompt(3), LogitsMode::All)?;
    let b = s.append(&mut ss, &prompt(3), LogitsMode::All)?;
    let d = rel_diff(&a.data, &b.data);
    assert!(d <= GQA_VS_CONCAT_REL, "append after truncate: rel {d}");
    eprintln!(
        "GroupQueryAttention vs concat: worst rel {:.2e}",
        worst.max(d)
    );
    Ok(())
}

/// The in-place cache against the concatenating one on the same GroupQueryAttention graph: the
/// same kernel over the same keys and values, only where the past is read from differs, so
/// the logits must be identical.
const IN_PLACE_VS_CONCAT_ABS: f32 = 0.0;

#[test]
fn in_place_kv_cache_equals_the_concatenating_cache_step_for_step() -> Result<()> {
    ensure_ort()?;
    let tmp = tempfile::tempdir()?;
    let ckpt = tmp.path().join("ckpt");
    // Room for the cache to grow past its first allocation (IN_PLACE_GROWTH positions).
    let mut cfg = tiny_config();
    cfg.max_position_embeddings = 1024;
    tiny_checkpoint(&ckpt, &cfg, 11)?;
    let dir = tmp.path().join("gqa");
    steper_export::export(
        &ckpt,
        &dir,
        &ExportOptions {
            attention: AttentionOp::GroupQueryAttention,
            ..ExportOptions::default()
        },
    )?;
    let open = |mode: KvCacheMode| -> Result<OrtGenerator> {
        let manifest = steper_runtime::Manifest::load(&dir.join("steper.json"))?;
        Ok(OrtGenerator::load(
            &dir.join("model.onnx"),
            &manifest,
            &OrtOptions::default().with_kv_cache(mode),
        )?)
    };
    let (ip, cc) = (open(KvCacheMode::InPlace)?, open(KvCacheMode::Concat)?);
    assert!(ip.kv_in_place() && !cc.kv_in_place());
    assert!(
        open(KvCacheMode::Auto)?.kv_in_place(),
        "auto keeps a GroupQueryAttention export's cache in place on the CPU provider"
    );
    let (mut si, mut sc) = (ip.new_sequence()?, cc.new_sequence()?);
    let mut steps = 0;
    let mut step = |si: &mut steper_runtime::Sequence,
                    sc: &mut steper_runtime::Sequence,
                    tokens: &[u32],
                    mode: LogitsMode,
                    what: &str|
     -> Result<()> {
        let a = ip.append(si, tokens, mode)?;
        let b = cc.append(sc, tokens, mode)?;
        assert_eq!((a.rows, a.vocab), (b.rows, b.vocab), "{what}");
        let d = a
            .data
            .iter()
            .zip(&b.data)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0f32, f32::max);
        assert!(
            d <= IN_PLACE_VS_CONCAT_ABS,
            "{what}: in-place cache differs from the concatenating one by {d}"
        );
        steps += 1;
        Ok(())
    };
    step(&mut si, &mut sc, &prompt(12), LogitsMode::All, "prefill")?;
    for i in 0..DECODE_STEPS {
        let t = ((i * 29 + 3) % VOCAB) as u32;
        step(
            &mut si,
            &mut sc,
            &[t],
            LogitsMode::Last,
            &format!("decode {i}"),
        )?;
    }
    step(
        &mut si,
        &mut sc,
        &prompt(5),
        LogitsMode::All,
        "5-token append",
    )?;
    // KV-prefix reuse: truncate, then append onto the shorter cache.
    ip.truncate(&mut si, 40)?;
    cc.truncate(&mut sc, 40)?;
    assert_eq!((si.len(), sc.len()), (40, 40));
    step(
        &mut si,
        &mut sc,
        &prompt(3),
        LogitsMode::All,
        "append after truncate",
    )?;
    // Past the first allocation: the buffers grow (copying the valid positions) twice.
    for c in 0..5 {
        step(
            &mut si,
            &mut sc,
            &prompt(100),
            LogitsMode::Last,
            &format!("chunk {c}"),
        )?;
    }
    assert_eq!(si.len(), 543);
    for i in 0..8 {
        let t = ((i * 13 + 1) % VOCAB) as u32;
        step(
            &mut si,
            &mut sc,
            &[t],
            LogitsMode::Last,
            &format!("late decode {i}"),
        )?;
    }
    assert_eq!(steps, 1 + DECODE_STEPS + 1 + 1 + 5 + 8);
    Ok(())
}

/// A forked sequence holds a copy of the cache: what it computes equals the original
/// truncated to the same length (bit for bit: the same cached values, the same kernels), and
/// appending to either leaves the other as it was. For the in-place and concatenating caches of
/// a GroupQueryAttention export and the standard export's cache, on ort and tract.
#[test]
fn a_forked_sequence_equals_the_truncated_original_and_is_independent_of_it() -> Result<()> {
    let ex = export_both(&ExportOptions::default())?;
    let cases = [
        (&ex.gqa, Some(KvCacheMode::InPlace)),
        (&ex.gqa, Some(KvCacheMode::Concat)),
        (&ex.standard, Some(KvCacheMode::Auto)),
        (&ex.standard, None), // tract
    ];
    for (dir, mode) in cases {
        let manifest = steper_runtime::Manifest::load(&dir.join("steper.json"))?;
        let model = dir.join("model.onnx");
        let g: Box<dyn Generator> = match mode {
            Some(mode) => Box::new(OrtGenerator::load(
                &model,
                &manifest,
                &OrtOptions::default().with_kv_cache(mode),
            )?),
            None => Box::new(steper_runtime::backend::TractGenerator::load(
                &model, &manifest,
            )?),
        };
        let what = format!("{} {mode:?}", dir.display());
        let filled = |n: usize| -> Result<steper_runtime::Sequence> {
            let mut s = g.new_sequence()?;
            g.append(&mut s, &prompt(30), LogitsMode::Last)?;
            if n < 30 {
                g.truncate(&mut s, n)?;
            }
            Ok(s)
        };
        let mut original = filled(30)?;
        for len in [0usize, 1, 20, 30, 99] {
            let mut fork = g.fork(&original, len)?;
            let kept = len.min(30);
            assert_eq!(fork.tokens(), &prompt(30)[..kept], "{what}: fork {len}");
            let mut reference = filled(kept)?;
            let a = g.append(&mut fork, &prompt(5), LogitsMode::All)?;
            let b = g.append(&mut reference, &prompt(5), LogitsMode::All)?;
            assert_eq!(
                a.data, b.data,
                "{what}: fork at {len} vs truncated original"
            );
            // The original is untouched by the fork and by what was appended to it.
            let mut again = filled(30)?;
            let c = g.append(&mut original, &[7], LogitsMode::Last)?;
            let d = g.append(&mut again, &[7], LogitsMode::Last)?;
            assert_eq!(c.data, d.data, "{what}: original after fork at {len}");
            g.truncate(&mut original, 30)?;
            // And the fork goes on independently.
            let e = g.append(&mut fork, &[9], LogitsMode::Last)?;
            let f = g.append(&mut reference, &[9], LogitsMode::Last)?;
            assert_eq!(e.data, f.data, "{what}: fork decode after fork at {len}");
        }
    }
    Ok(())
}

#[test]
fn an_in_place_cache_is_refused_for_a_standard_export_naming_the_option() -> Result<()> {
    let x = export_both(&ExportOptions::default())?;
    let manifest = steper_runtime::Manifest::load(&x.standard.join("steper.json"))?;
    let opts = OrtOptions::default().with_kv_cache(KvCacheMode::InPlace);
    match OrtGenerator::load(&x.standard.join("model.onnx"), &manifest, &opts) {
        Err(steper_runtime::Error::InvalidOption {
            option, expected, ..
        }) => {
            assert_eq!(option, "kv_cache");
            assert!(expected.contains("--attention gqa"), "{expected}");
        }
        Err(e) => panic!("expected InvalidOption kv_cache, got {e}"),
        Ok(_) => panic!("in-place must be refused for a standard-attention export"),
    }
    // auto on a standard export: concatenated, no error.
    let g = OrtGenerator::load(
        &x.standard.join("model.onnx"),
        &manifest,
        &OrtOptions::default(),
    )?;
    assert!(!g.kv_in_place());
    Ok(())
}

#[test]
fn int4_gqa_export_matches_candle_on_dequantized_weights() -> Result<()> {
    // Float zero points go through the stacked q/k/v MatMulNBits with one block-sum correction.
    for zero_points in [
        steper_export::ZeroPoints::None,
        steper_export::ZeroPoints::Float,
    ] {
        let q = QuantOptions {
            bits: QuantBits::Int4,
            block_size: 32,
            target: QuantTarget::OrtCpu,
            lm_head: true,
            zero_points,
            off_grid_int8: false,
        };
        let x = export_both(&ExportOptions::quantized(q))?;
        let ck = steper_models::Checkpoint::load(&x.ckpt, DType::F32, &Device::Cpu)?;
        let (cfg, w) = dequantized_checkpoint(&ck.config, &ck.weights, &q)?;
        let r = reference(&steper_models::Llama::new(&cfg, &w)?, &prompt(12), 16)?;
        let rep = check_backend(&x.gqa, &ort(), &r, INT_MATMULNBITS)?;
        assert!(
            rep.pass,
            "int4 GroupQueryAttention export ({zero_points:?} zero points) fails {}: max_rel {} \
             top-1 {}",
            INT_MATMULNBITS.name, rep.max_rel, rep.top1_agreement
        );
    }
    Ok(())
}

fn graph(dir: &std::path::Path) -> Result<ModelProto> {
    let bytes = std::fs::read(dir.join("model.onnx"))?;
    Ok(ModelProto::decode(bytes.as_slice())?)
}

#[test]
fn gqa_graph_has_one_fused_op_per_layer_and_no_cache_concat_and_says_so() -> Result<()> {
    let x = export_both(&ExportOptions::default())?;
    let layers = tiny_config().num_hidden_layers;
    let m = graph(&x.gqa)?;
    let g = m.graph.as_ref().context("graph")?;
    let gqa: Vec<_> = g
        .node
        .iter()
        .filter(|n| n.op_type == "GroupQueryAttention")
        .collect();
    assert_eq!(gqa.len(), layers);
    for (l, n) in gqa.iter().enumerate() {
        assert_eq!(n.domain, "com.microsoft");
        assert_eq!(
            n.output[1..],
            [format!("present.{l}.key"), format!("present.{l}.value")]
        );
    }
    // Nothing else writes the cache, and no Softmax is left.
    for n in &g.node {
        if n.op_type != "GroupQueryAttention" {
            assert!(
                n.output.iter().all(|o| !o.starts_with("present.")),
                "{} writes the cache",
                n.op_type
            );
            assert_ne!(n.op_type, "Softmax");
        }
    }
    // No initializer is left unused (the standard graph's mask constants are dropped).
    let used: std::collections::HashSet<&str> = g
        .node
        .iter()
        .flat_map(|n| n.input.iter().map(String::as_str))
        .collect();
    for t in &g.initializer {
        assert!(
            used.contains(t.name.as_str()),
            "unused initializer {}",
            t.name
        );
    }
    assert!(m.opset_import.iter().any(|o| o.domain == "com.microsoft"));
    // The standard graph has none of it.
    let s = graph(&x.standard)?;
    let sg = s.graph.as_ref().context("graph")?;
    assert!(sg.node.iter().all(|n| n.op_type != "GroupQueryAttention"));
    // The manifest records the form; a standard manifest leaves the field out.
    let mg = steper_runtime::Manifest::load(&x.gqa.join("steper.json"))?;
    assert_eq!(mg.graph.attention, AttentionOp::GroupQueryAttention);
    let text = std::fs::read_to_string(x.standard.join("steper.json"))?;
    assert!(!text.contains("\"attention\""), "{text}");
    // onnxruntime-genai shares past and present for the GQA graph (in place), not for the
    // standard one (its Concat writes a new present).
    for (dir, share) in [(&x.gqa, true), (&x.standard, false)] {
        let genai: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("genai_config.json"))?)?;
        assert_eq!(
            genai["search"]["past_present_share_buffer"],
            serde_json::json!(share),
            "{}",
            dir.display()
        );
    }
    // RoPE is the op's own (do_rotary from half-width cos/sin caches at position_ids): no
    // Slice/Concat rotation is left in the graph.
    for n in &gqa {
        let attr = |name: &str| n.attribute.iter().find(|a| a.name == name).map(|a| a.i);
        assert_eq!(attr("do_rotary"), Some(1));
        assert_eq!(attr("rotary_interleaved"), Some(0));
        assert_eq!(n.input.len(), 10, "{:?}", n.input);
        assert_eq!(n.input[9], "position_ids");
    }
    // (One Slice and one Concat remain: `logits_to_keep`'s slice and the logits' shape.)
    for op in ["Slice", "Concat"] {
        let n = g.node.iter().filter(|n| n.op_type == op).count();
        assert_eq!(n, 1, "{op} nodes in the GQA graph");
    }
    Ok(())
}

#[test]
fn gqa_is_refused_where_it_cannot_run_with_errors_naming_the_option() -> Result<()> {
    let x = export_both(&ExportOptions::default())?;
    // tract has no GroupQueryAttention.
    let e = load_model(&x.gqa, &BackendKind::Tract)
        .err()
        .context("tract must refuse a GroupQueryAttention export")?;
    let msg = e.to_string();
    assert!(
        msg.contains("GroupQueryAttention") && msg.contains("--attention standard"),
        "{msg}"
    );
    // Left-padded batched decoding: no batched step on this export.
    let g = load_model(&x.gqa, &ort())?.generator;
    assert!(g.batch_decoder().is_none());
    let s = load_model(&x.standard, &ort())?.generator;
    assert!(s.batch_decoder().is_some());
    // A padded row fed to its step directly is refused, not computed wrongly.
    let manifest = steper_runtime::Manifest::load(&x.gqa.join("steper.json"))?;
    let dec = OrtGenerator::load(&x.gqa.join("model.onnx"), &manifest, &OrtOptions::default())?;
    let rows = vec![
        prompt(4).into_iter().map(Some).collect::<Vec<_>>(),
        [None, None]
            .into_iter()
            .chain(prompt(2).into_iter().map(Some))
            .collect(),
    ];
    let mut c = dec.new_cache(2)?;
    let inp = BatchInput::left_padded(&rows, &[vec![], vec![]], &mut [0, 0])?;
    match dec.step(&mut c, &inp, LogitsMode::Last) {
        Err(steper_runtime::Error::InvalidOption {
            option, expected, ..
        }) => {
            assert_eq!(option, "attention_mask");
            assert!(expected.contains("--attention standard"), "{expected}");
        }
        other => panic!(
            "a padded mask must be refused, got {:?}",
            other.map(|l| l.rows)
        ),
    }
    // Export options it cannot be combined with.
    let tmp = tempfile::tempdir()?;
    let portable = ExportOptions {
        attention: AttentionOp::GroupQueryAttention,
        ..ExportOptions::quantized(QuantOptions {
            bits: QuantBits::Int4,
            block_size: 32,
            target: QuantTarget::Portable,
            lm_head: true,
            zero_points: steper_export::ZeroPoints::None,
            off_grid_int8: false,
        })
    };
    let fp16 = ExportOptions {
        attention: AttentionOp::GroupQueryAttention,
        dtype: steper_export::ExportDtype::Fp16,
        ..Default::default()
    };
    for (o, what) in [(portable, "portable"), (fp16, "fp16")] {
        match steper_export::export(&x.ckpt, &tmp.path().join(what), &o) {
            Err(Error::Option { option, .. }) => assert_eq!(option, "--attention", "{what}"),
            other => panic!("{what}: expected an --attention option error, got {other:?}"),
        }
        assert!(!tmp.path().join(what).join("model.onnx").exists());
    }
    // An unknown form is an error naming the accepted ones.
    let e = "flash".parse::<AttentionOp>().err().context("must fail")?;
    assert!(e.to_string().contains("gqa"), "{e}");
    Ok(())
}
