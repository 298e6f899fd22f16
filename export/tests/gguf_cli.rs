//! `steper-export --format gguf`: the options it refuses (naming them), and on the real
//! SmolLM2-135M GGUF the round trip a user makes — `steper-train import`, a change to one layer,
//! `steper-export --format gguf --gguf-base` — giving a file whose untouched tensors are the
//! GGUF's own blocks, byte for byte.

use anyhow::{ensure, Result};
use candle_core::{DType, Device, Tensor};
use steper_models::{copy_companion_files, Checkpoint, Weights};
use steper_test_support::cli::{output_text, path_str, run};
use steper_test_support::gguf::stored;

const BIN: &str = env!("CARGO_BIN_EXE_steper-export");

#[test]
fn options_that_do_not_apply_are_refused_by_name() -> Result<()> {
    let student = &steper_test_support::tiny()?.student;
    let dir = tempfile::tempdir()?;
    let out = dir.path().join("s.gguf");
    let base = dir.path().join("base.gguf");
    let ck = path_str(student);
    let cases: [(Vec<&str>, &str); 6] = [
        (vec!["--format", "gguf"], "--gguf-base FILE"),
        (
            vec![
                "--format",
                "gguf",
                "--gguf-base",
                path_str(&base),
                "--quantize",
                "int4",
            ],
            "option `--quantize` is for --format onnx",
        ),
        (
            vec![
                "--format",
                "gguf",
                "--gguf-base",
                path_str(&base),
                "--gguf-type",
                "q4_k",
            ],
            "expected q8_0, f16 or f32",
        ),
        (
            vec!["--gguf-type", "q8_0"],
            "option `--gguf-type` needs --format gguf",
        ),
        (
            vec![
                "--format",
                "gguf",
                "--gguf-base",
                path_str(&base),
                "--framework",
                "self-ask",
            ],
            "option `--framework` is for --format onnx",
        ),
        (
            vec!["--format", "ggml"],
            "expected onnx or gguf, got `ggml`",
        ),
    ];
    for (extra, needle) in cases {
        let mut args = vec!["--checkpoint", ck, "--out", path_str(&out)];
        args.extend(extra.iter().copied());
        let o = run(BIN, &args)?;
        let text = output_text(&o);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {text}");
        assert!(text.contains(needle), "{args:?}: {text}");
        assert!(!text.contains("panicked"), "{text}");
    }
    let o = run(
        BIN,
        &[
            "--checkpoint",
            ck,
            "--out",
            path_str(dir.path()),
            "--format",
            "gguf",
            "--gguf-base",
            path_str(&base),
        ],
    )?;
    assert!(
        output_text(&o).contains("ending in .gguf"),
        "{}",
        output_text(&o)
    );
    assert!(!out.exists());
    Ok(())
}

#[test]
#[ignore = "slow: the real SmolLM2-135M GGUF (import, dequantize and compare 135M weights twice)"]
fn smollm2_with_one_trained_projection_keeps_every_other_block_of_the_gguf() -> Result<()> {
    let gguf = steper_test_support::smollm2_gguf()?;
    let dir = tempfile::tempdir()?;
    let imported = dir.path().join("imported");
    steper_models::gguf::import_gguf(&gguf, &imported)?;

    // The top layer's q projection "trained"; everything else as imported.
    let ck = Checkpoint::load(&imported, DType::F32, &Device::Cpu)?;
    let top = ck.config.num_hidden_layers - 1;
    let name = format!("model.layers.{top}.self_attn.q_proj.weight");
    let mut tensors = ck.weights.tensors().clone();
    let t = &tensors[&name];
    let moved = (t + Tensor::randn(0f32, 0.005, t.dims(), &Device::Cpu)?)?;
    tensors.insert(name, moved);
    let trained = dir.path().join("trained");
    Checkpoint::save(&trained, &ck.config, &Weights::from_map(tensors), None)?;
    copy_companion_files(&imported, &trained)?;

    let out = dir.path().join("student.gguf");
    let o = run(
        BIN,
        &[
            "--checkpoint",
            path_str(&trained),
            "--format",
            "gguf",
            "--gguf-base",
            path_str(&gguf),
            "--out",
            path_str(&out),
            "--json",
        ],
    )?;
    ensure!(o.status.success(), "{}", output_text(&o));
    let report: serde_json::Value = serde_json::from_slice(&o.stdout)?;
    let rewritten = format!("blk.{top}.attn_q.weight");
    assert_eq!(
        report["rewritten"],
        serde_json::json!([rewritten]),
        "{report}"
    );
    assert_eq!(report["trained_type"], "q8_0");

    let base = stored(&gguf)?.tensors;
    let ours = stored(&out)?.tensors;
    assert_eq!(
        ours.keys().collect::<Vec<_>>(),
        base.keys().collect::<Vec<_>>()
    );
    for (name, blocks) in &base {
        if *name == rewritten {
            assert_eq!(ours[name].0, "Q8_0");
        } else {
            assert!(ours[name] == *blocks, "{name}: not the GGUF's own blocks");
        }
    }
    // The file reads back as a model (the same importer llama.cpp users' files go through).
    steper_models::gguf::import_gguf(&out, &dir.path().join("back"))?;
    Ok(())
}
