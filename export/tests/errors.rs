//! Bad export directories give clear errors at load, never a panic.

mod common;

use anyhow::Result;
use common::*;
use steper_export::ExportDtype;
use steper_runtime::backend::{load_model, BackendKind, ExecutionProvider, OrtOptions};
use steper_runtime::Error;

fn kinds() -> Vec<BackendKind> {
    vec![BackendKind::Ort(OrtOptions::default()), BackendKind::Tract]
}

#[test]
fn missing_model_file_is_named() -> Result<()> {
    let f = fixture(ExportDtype::Fp32)?;
    std::fs::remove_file(f.out.join("model.onnx"))?;
    for k in kinds() {
        let e = load_model(&f.out, &k).err().expect("load must fail");
        assert!(matches!(e, Error::Model { .. }), "{e}");
        assert!(e.to_string().contains("model.onnx"), "{e}");
    }
    Ok(())
}

#[test]
fn corrupt_model_file_is_an_error() -> Result<()> {
    let f = fixture(ExportDtype::Fp32)?;
    let p = f.out.join("model.onnx");
    let bytes = std::fs::read(&p)?;
    std::fs::write(&p, &bytes[..bytes.len() / 3])?;
    for k in kinds() {
        let e = load_model(&f.out, &k).err().expect("load must fail");
        assert!(matches!(e, Error::Model { .. }), "{}: {e}", k.name());
        assert!(e.to_string().contains("model.onnx"), "{e}");
    }
    std::fs::write(&p, b"not an onnx file at all")?;
    for k in kinds() {
        assert!(load_model(&f.out, &k).is_err());
    }
    Ok(())
}

#[test]
fn wrong_manifest_version_is_rejected() -> Result<()> {
    let f = fixture(ExportDtype::Fp32)?;
    let p = f.out.join("steper.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p)?)?;
    v["version"] = serde_json::json!(99);
    std::fs::write(&p, serde_json::to_string(&v)?)?;
    let e = load_model(&f.out, &BackendKind::Tract)
        .err()
        .expect("load must fail");
    assert!(e.to_string().contains("version"), "{e}");
    std::fs::remove_file(&p)?;
    let e = load_model(&f.out, &BackendKind::Tract)
        .err()
        .expect("load must fail");
    assert!(e.to_string().contains("steper.json"), "{e}");
    Ok(())
}

#[test]
fn tokenizer_larger_than_vocab_is_rejected() -> Result<()> {
    let f = fixture(ExportDtype::Fp32)?;
    write_tokenizer(&f.out.join("tokenizer.json"), VOCAB + 10)?;
    let e = load_model(&f.out, &BackendKind::Tract)
        .err()
        .expect("load must fail");
    assert!(e.to_string().contains("vocab_size"), "{e}");
    Ok(())
}

#[test]
fn unavailable_gpu_provider_is_an_error_unless_fallback() -> Result<()> {
    let f = fixture(ExportDtype::Fp32)?;
    let opts = OrtOptions::default().with_providers(vec![ExecutionProvider::Cuda { device_id: 0 }]);
    match load_model(&f.out, &BackendKind::Ort(opts.clone())) {
        // A machine with a GPU build of ONNX Runtime and CUDA.
        Ok(m) => assert!(m
            .generator
            .info()
            .providers
            .contains(&"CUDAExecutionProvider".to_string())),
        Err(e) => {
            assert!(matches!(e, Error::ProviderUnavailable { .. }), "{e}");
            assert!(e.to_string().contains("CUDAExecutionProvider"), "{e}");
            let m = load_model(&f.out, &BackendKind::Ort(opts.with_allow_fallback(true)))?;
            assert_eq!(
                m.generator.info().providers,
                vec!["CPUExecutionProvider".to_string()]
            );
        }
    }
    Ok(())
}

#[test]
fn export_writes_the_manifest_files() -> Result<()> {
    let f = fixture(ExportDtype::Fp32)?;
    let m = steper_runtime::Manifest::load(&f.out.join("steper.json"))?;
    assert_eq!(m.graph.num_kv_heads, 2);
    assert_eq!(m.graph.vocab_size, VOCAB);
    let g: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(f.out.join("genai_config.json"))?)?;
    assert_eq!(
        g["model"]["decoder"]["inputs"]["past_key_names"],
        "past_key_values.%d.key"
    );
    assert_eq!(g["model"]["decoder"]["num_key_value_heads"], 2);
    assert!(f.out.join("tokenizer.json").is_file());
    // IR version and opset as promised.
    use prost::Message;
    let model =
        tract_onnx::pb::ModelProto::decode(std::fs::read(f.out.join("model.onnx"))?.as_slice())?;
    assert!(model.ir_version <= 10);
    assert_eq!(model.opset_import[0].version, 17);
    assert!(model
        .graph
        .as_ref()
        .is_some_and(|g| g.node.iter().all(|n| n.domain.is_empty())));
    Ok(())
}
