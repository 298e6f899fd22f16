//! GGUF export of a trained checkpoint (`steper_models::gguf::export_gguf`) onto a tiny Q4_1 base
//! written the way llama.cpp's converter writes one: the tensors training left alone are the
//! base's blocks byte for byte, the changed ones are rewritten (Q8_0, norms F32), the metadata is
//! the base's, importing the written file gives the checkpoint back, and a base made for another
//! model is refused naming the field with nothing written.

mod common;

use std::collections::BTreeSet;
use std::path::Path;

use anyhow::Result;
use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};
use common::{max_abs_diff, tiny_gguf_config, write_tiny_gguf, Q8_0_WEIGHT_ATOL};
use steper_models::gguf::{export_gguf, import_gguf, GgufTensorType};
use steper_models::{copy_companion_files, Checkpoint, Weights};
use steper_test_support::gguf::stored;

/// The tensors "trained": one projection (quantized blocks in the base) and one norm (F32).
const TRAINED: [(&str, &str); 2] = [
    (
        "model.layers.1.self_attn.q_proj.weight",
        "blk.1.attn_q.weight",
    ),
    (
        "model.layers.1.post_attention_layernorm.weight",
        "blk.1.ffn_norm.weight",
    ),
];

/// A Q4_1 base, its import, and a copy of the import with the [`TRAINED`] tensors changed.
fn base_and_trained(dir: &Path) -> Result<(std::path::PathBuf, std::path::PathBuf)> {
    let cfg = tiny_gguf_config();
    let base = dir.join("base.gguf");
    write_tiny_gguf(
        &base,
        &cfg,
        &Weights::random(&cfg, 3, &Device::Cpu)?,
        GgmlDType::Q4_1,
        "llama",
    )?;
    let imported = dir.join("imported");
    import_gguf(&base, &imported)?;
    let ck = Checkpoint::load(&imported, DType::F32, &Device::Cpu)?;
    let mut tensors = ck.weights.tensors().clone();
    for (hf, _) in TRAINED {
        let t = &tensors[hf];
        let delta = Tensor::randn(0f32, 0.01, t.dims(), &Device::Cpu)?;
        tensors.insert(hf.to_string(), (t + delta)?);
    }
    let trained = dir.join("trained");
    Checkpoint::save(&trained, &ck.config, &Weights::from_map(tensors), None)?;
    copy_companion_files(&imported, &trained)?;
    Ok((base, trained))
}

#[test]
fn frozen_tensors_keep_the_base_blocks_and_trained_ones_come_back_within_q8_0() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (base, trained) = base_and_trained(dir.path())?;
    let out = dir.path().join("student.gguf");
    let report = export_gguf(&trained, &base, &out, GgufTensorType::Q8_0)?;

    let want: BTreeSet<&str> = TRAINED.iter().map(|(_, g)| *g).collect();
    let got: BTreeSet<&str> = report.rewritten.iter().map(String::as_str).collect();
    assert_eq!(got, want, "{report:?}");
    assert_eq!(report.copied + report.rewritten.len(), report.tensors);

    let base = stored(&base)?;
    let (base_t, base_meta) = (base.tensors, base.metadata);
    let out_file = stored(&out)?;
    let (out_t, out_meta) = (out_file.tensors, out_file.metadata);
    assert_eq!(out_meta, base_meta, "the metadata is the base's");
    assert_eq!(
        out_t.keys().collect::<Vec<_>>(),
        base_t.keys().collect::<Vec<_>>()
    );
    for (name, (ty, bytes)) in &base_t {
        let (out_ty, out_bytes) = &out_t[name];
        if want.contains(name.as_str()) {
            let expected = if name.ends_with("norm.weight") {
                "F32"
            } else {
                "Q8_0"
            };
            assert_eq!(*out_ty, expected, "{name}");
        } else {
            assert_eq!(
                (out_ty, out_bytes),
                (ty, bytes),
                "{name}: not the base's blocks"
            );
        }
    }

    // The written file imports as the trained checkpoint: frozen tensors exactly (the same
    // blocks), the norm exactly (F32), the projection within Q8_0's rounding.
    let back = dir.path().join("back");
    import_gguf(&out, &back)?;
    let back = Checkpoint::load(&back, DType::F32, &Device::Cpu)?;
    let ours = Checkpoint::load(&trained, DType::F32, &Device::Cpu)?;
    for (name, t) in ours.weights.tensors() {
        let a: Vec<f32> = t.flatten_all()?.to_vec1()?;
        let b: Vec<f32> = back.weights.tensors()[name].flatten_all()?.to_vec1()?;
        let tol = if name == TRAINED[0].0 {
            Q8_0_WEIGHT_ATOL
        } else {
            0.0
        };
        let d = max_abs_diff(&a, &b);
        assert!(d <= tol, "{name}: max |Δ| {d:e} > {tol:e}");
    }
    Ok(())
}

#[test]
fn a_base_of_another_model_is_refused_naming_the_field_and_nothing_is_written() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (_, trained) = base_and_trained(dir.path())?;
    let mut cfg = tiny_gguf_config();
    cfg.num_hidden_layers = 3;
    let other = dir.path().join("other.gguf");
    write_tiny_gguf(
        &other,
        &cfg,
        &Weights::random(&cfg, 4, &Device::Cpu)?,
        GgmlDType::Q4_1,
        "llama",
    )?;
    let out = dir.path().join("student.gguf");
    let err = export_gguf(&trained, &other, &out, GgufTensorType::Q8_0)
        .expect_err("a 3-layer base for a 2-layer checkpoint");
    let msg = err.to_string();
    assert!(
        msg.contains("num_hidden_layers") && msg.contains("expected 3") && msg.contains("got 2"),
        "{msg}"
    );
    assert!(!out.exists(), "nothing is written");
    assert!(
        std::fs::read_dir(dir.path())?
            .flatten()
            .all(|e| !e.file_name().to_string_lossy().contains("student")),
        "no temporary is left"
    );

    let err = "q4_k"
        .parse::<GgufTensorType>()
        .expect_err("not a writable type");
    assert!(err.to_string().contains("q8_0, f16 or f32"), "{err}");
    Ok(())
}
