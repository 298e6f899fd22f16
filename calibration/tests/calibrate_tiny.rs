//! Calibration of the tiny real export (`steper-test-support`): the QDQ
//! model loads and runs on ONNX Runtime CPU, agrees with fp32, validates; the tables read
//! back; bad input fails cleanly with nothing written. Without the tiny export every test fails
//! (it never passes without running).

use std::path::{Path, PathBuf};

use anyhow::Result;
use steper_calibration::graph::{self, validate_qdq};
use steper_calibration::pipeline::{files, Progress};
use steper_calibration::tables::{parse_trt_cache, read_ort_trt_table};
use steper_calibration::{calibrate, CalibrateOptions, DataSource, Error, Method};
use steper_runtime::backend::load_model;
use steper_runtime::data::StepwiseRecord;
use steper_runtime::{BackendKind, OrtOptions};

/// Least fraction of fp32-greedy tokens the int8 model must also pick.
const GREEDY_AGREEMENT_MIN: f64 = 0.8;
/// Least next-token top-1 agreement over every held-out prompt position.
const TOP1_AGREEMENT_MIN: f64 = 0.8;
/// Relative tolerance between a flatbuffers amax text and calibration.json's value.
const AMAX_REL_TOL: f32 = 1e-6;

fn write_records(dir: &Path, rows: &[StepwiseRecord]) -> Result<PathBuf> {
    let p = dir.join("stepwise.jsonl");
    let text: Vec<String> = rows
        .iter()
        .map(serde_json::to_string)
        .collect::<std::result::Result<_, _>>()?;
    std::fs::write(&p, text.join("\n") + "\n")?;
    Ok(p)
}

fn options(model: &Path, data: &Path, out: &Path) -> CalibrateOptions {
    let mut o = CalibrateOptions::new(
        model.to_path_buf(),
        DataSource::Stepwise(data.to_path_buf()),
        out.to_path_buf(),
    );
    o.samples = 12;
    o.holdout = 6;
    o.greedy_tokens = 8;
    o.bench_new_tokens = 0;
    o.max_tokens = 256;
    o.bins = 512;
    o.threads = Some(1);
    o
}

#[test]
fn qdq_model_loads_runs_agrees_and_validates() -> Result<()> {
    let (model, world) = tiny_required()?;
    let tmp = tempfile::tempdir()?;
    let data = write_records(
        tmp.path(),
        &steper_test_support::stepwise_records(&world, 12)?,
    )?;
    let out = tmp.path().join("int8");
    let mut phases = Vec::new();
    let report = calibrate(&options(&model, &data, &out), &mut |p| {
        if let Progress::Phase { name, .. } = p {
            phases.push(name)
        }
    })?;
    assert!(phases.contains(&"collecting ranges"));
    // Balanced across the stages: 12 prompts → 4 init, 4 expand, 4 aggregate.
    for s in ["init", "expand", "aggregate"] {
        assert_eq!(report.samples.get(s), Some(&4), "{:?}", report.samples);
    }
    // 2 layers × 7 linear layers quantized; lm_head kept in float.
    assert_eq!(report.qdq.quantized_linears, 14);
    assert_eq!(report.qdq.float_linears, 1);
    let a = report.agreement.clone().expect("held-out agreement");
    assert!(a.positions > 0);
    assert!(a.top1 >= TOP1_AGREEMENT_MIN, "top-1 agreement {}", a.top1);
    let g = report.greedy_agreement.expect("greedy agreement");
    assert!(
        g >= GREEDY_AGREEMENT_MIN,
        "greedy agreement {g} over {}",
        report.greedy_positions
    );

    // The QDQ graph as written validates; the export directory loads and runs.
    let q = graph::load_onnx(&out.join(files::INT8_MODEL))?;
    let s = validate_qdq(&q, &out.join(files::INT8_MODEL))?;
    assert_eq!(s.quantized_linears, 14);
    // One DQ per activation Q plus one per (distinct) weight.
    assert_eq!(s.dequantize_nodes, s.quantize_nodes + 14, "{s:?}");
    let m = load_model(&out, &BackendKind::Ort(OrtOptions::default()))?;
    assert_eq!(m.manifest.dtype, "int8");
    let mut seq = m.generator.new_sequence()?;
    let lg = m
        .generator
        .append(&mut seq, &[1, 2, 3], steper_runtime::LogitsMode::Last)?;
    assert!(lg.last().iter().all(|v| v.is_finite()));
    let genai: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("genai_config.json"))?)?;
    assert_eq!(genai["model"]["decoder"]["filename"], files::INT8_MODEL);

    // Tables: the same tensors and ranges as calibration.json.
    let cj: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join(files::CALIBRATION_JSON))?)?;
    let tensors = cj["tensors"].as_array().expect("tensors");
    assert_eq!(tensors.len(), report.tensors);
    let table = read_ort_trt_table(&std::fs::read(out.join(files::ORT_TABLE))?, "table")?;
    let cache = parse_trt_cache(
        &std::fs::read_to_string(out.join(files::TRT_CACHE))?,
        "cache",
    )?;
    assert_eq!(cache.calibrator, Method::Entropy.trt_calibrator());
    assert_eq!(table.len(), tensors.len());
    assert_eq!(cache.scales.len(), tensors.len());
    for t in tensors {
        let name = t["name"].as_str().expect("name");
        let amax = t["amax"].as_f64().expect("amax") as f32;
        let v: f32 = table
            .iter()
            .find(|(k, _)| k == name)
            .expect("in table")
            .1
            .parse()?;
        assert!(
            (v - amax).abs() <= AMAX_REL_TOL * amax.abs().max(1.0),
            "{name}: {v} vs {amax}"
        );
        let sc = cache
            .scales
            .iter()
            .find(|(k, _)| k == name)
            .expect("in cache")
            .1;
        assert_eq!(sc.to_bits(), (amax / 127.0).to_bits(), "{name}");
    }
    // No staging leftovers.
    let hidden: Vec<_> = std::fs::read_dir(&out)?
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
        .collect();
    assert!(hidden.is_empty());
    Ok(())
}

#[test]
fn minmax_with_quantized_lm_head() -> Result<()> {
    let (model, world) = tiny_required()?;
    let tmp = tempfile::tempdir()?;
    let data = write_records(
        tmp.path(),
        &steper_test_support::stepwise_records(&world, 6)?,
    )?;
    let out = tmp.path().join("int8");
    let mut o = options(&model, &data, &out);
    o.method = Method::MinMax;
    o.quantize_lm_head = true;
    o.samples = 6;
    o.holdout = 2;
    o.greedy_tokens = 0;
    let r = calibrate(&o, &mut |_| {})?;
    assert_eq!(r.qdq.quantized_linears, 15);
    assert_eq!(r.qdq.float_linears, 0);
    let cache = parse_trt_cache(
        &std::fs::read_to_string(out.join(files::TRT_CACHE))?,
        "cache",
    )?;
    assert_eq!(cache.calibrator, "MinMaxCalibration");
    // min/max ranges cover every value seen.
    let cj: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join(files::CALIBRATION_JSON))?)?;
    for t in cj["tensors"].as_array().expect("tensors") {
        let (amax, lo, hi) = (
            t["amax"].as_f64().unwrap_or(-1.0),
            t["min"].as_f64().unwrap_or(0.0),
            t["max"].as_f64().unwrap_or(0.0),
        );
        assert!(amax >= lo.abs().max(hi.abs()) - 1e-6, "{t}");
    }
    Ok(())
}

fn dir_is_empty(p: &Path) -> bool {
    !p.exists()
        || std::fs::read_dir(p)
            .map(|mut d| d.next().is_none())
            .unwrap_or(false)
}

#[test]
fn bad_input_fails_clearly_and_writes_nothing() -> Result<()> {
    let (model, world) = tiny_required()?;
    let tmp = tempfile::tempdir()?;
    let data = write_records(
        tmp.path(),
        &steper_test_support::stepwise_records(&world, 3)?,
    )?;

    // Empty calibration set.
    let empty = tmp.path().join("empty.jsonl");
    std::fs::write(&empty, "")?;
    assert!(matches!(
        DataSource::detect(&empty, None),
        Err(Error::EmptyCalibration { .. })
    ));
    let out = tmp.path().join("out-empty");
    let e = calibrate(&options(&model, &empty, &out), &mut |_| {}).unwrap_err();
    assert!(matches!(e, Error::EmptyCalibration { .. }), "{e}");
    assert!(e.to_string().contains("empty.jsonl"), "{e}");
    assert!(
        dir_is_empty(&out),
        "a failed run left files in {}",
        out.display()
    );

    // QA data without an index.
    let qa = world.join("train.jsonl");
    assert!(matches!(
        DataSource::detect(&qa, None),
        Err(Error::Option {
            option: "--index",
            ..
        })
    ));

    // Unwritable output directory (below a regular file).
    let file = tmp.path().join("a-file");
    std::fs::write(&file, "x")?;
    let e = calibrate(&options(&model, &data, &file.join("out")), &mut |_| {}).unwrap_err();
    assert!(matches!(e, Error::Io { .. }), "{e}");
    assert!(e.to_string().contains("a-file"), "{e}");

    // The output directory is the model's own.
    let e = calibrate(&options(&model, &data, &model), &mut |_| {}).unwrap_err();
    assert!(
        matches!(
            e,
            Error::Option {
                option: "--out",
                ..
            }
        ),
        "{e}"
    );

    // A model without MatMuls: an export directory whose graph is one Identity.
    let bad = tmp.path().join("no-matmul");
    std::fs::create_dir_all(&bad)?;
    for f in ["steper.json", "tokenizer.json"] {
        std::fs::copy(model.join(f), bad.join(f))?;
    }
    let mut m = graph::load_onnx(&model.join("model.onnx"))?;
    if let Some(g) = m.graph.as_mut() {
        g.node
            .retain(|n| n.op_type != "MatMul" && n.op_type != "Gemm");
    }
    std::fs::write(bad.join("model.onnx"), prost::Message::encode_to_vec(&m))?;
    let out = tmp.path().join("out-bad");
    let e = calibrate(&options(&bad, &data, &out), &mut |_| {}).unwrap_err();
    assert!(matches!(e, Error::NoQuantizable { .. }), "{e}");
    assert!(dir_is_empty(&out));
    Ok(())
}

/// Largest |smoothed − original| fp32 logit over the largest |original logit|.
const SMOOTHED_LOGITS_REL: f32 = 1e-4;

/// The tiny export and its world (`steper-test-support`); an error (not a pass) when they
/// cannot be made.
fn tiny_required() -> Result<(PathBuf, PathBuf)> {
    let t = steper_test_support::tiny()?;
    Ok((t.export.clone(), t.world.clone()))
}

fn calibration_json(out: &Path) -> Result<serde_json::Value> {
    Ok(serde_json::from_str(&std::fs::read_to_string(
        out.join(files::CALIBRATION_JSON),
    )?)?)
}

#[test]
fn smoothing_keeps_the_fp32_function_and_flattens_the_channels() -> Result<()> {
    let (model, world) = tiny_required()?;
    let tmp = tempfile::tempdir()?;
    let data = write_records(
        tmp.path(),
        &steper_test_support::stepwise_records(&world, 8)?,
    )?;
    let out = tmp.path().join("int8-smooth");
    let mut o = options(&model, &data, &out);
    o.samples = 8;
    o.holdout = 4;
    o.greedy_tokens = 0;
    // α = 1 moves the whole range into the weights: every smoothed channel max becomes 1.
    o.smooth_alpha = Some(1.0);
    let r = calibrate(&o, &mut |_| {})?;
    let sm = r.smoothing.clone().expect("smoothing summary");
    // Per layer: q/k/v and gate/up inputs into γ, down_proj's into up_proj, o_proj's through a Mul.
    let by = |w: &str| {
        sm.tensors
            .iter()
            .filter(|t| t.folded_into.starts_with(w))
            .count()
    };
    assert_eq!((by("norm"), by("linear"), by("mul")), (4, 2, 2), "{sm:?}");
    assert_eq!(sm.inserted_muls, 2);
    assert!(sm.skipped.is_empty(), "{:?}", sm.skipped);
    for t in &sm.tensors {
        assert!(
            (t.amax - 1.0).abs() <= 1e-5 && (t.spread_after - 1.0).abs() <= 1e-5,
            "{t:?}"
        );
        if t.folded_into.starts_with("linear:") {
            assert!(t.folded_into.contains("up_proj"), "{t:?}");
        }
    }
    assert_eq!(r.qdq.quantized_linears, 14);

    // The smoothed fp32 export computes what the original does.
    let ort = BackendKind::Ort(OrtOptions::default());
    let a = load_model(&model, &ort)?;
    let b = load_model(&out.join(files::SMOOTHED_DIR), &ort)?;
    for prompt in [vec![1u32, 5, 9, 2, 7, 3], (10..60).collect::<Vec<u32>>()] {
        let mut sa = a.generator.new_sequence()?;
        let mut sb = b.generator.new_sequence()?;
        let la = a
            .generator
            .append(&mut sa, &prompt, steper_runtime::LogitsMode::Last)?;
        let lb = b
            .generator
            .append(&mut sb, &prompt, steper_runtime::LogitsMode::Last)?;
        let (la, lb) = (la.last(), lb.last());
        let scale = la.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
        let diff = la
            .iter()
            .zip(lb)
            .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(diff <= SMOOTHED_LOGITS_REL * scale, "{diff} vs {scale}");
    }

    // The tables carry the smoothed ranges, under the names the smoothed graph uses.
    let table = read_ort_trt_table(&std::fs::read(out.join(files::ORT_TABLE))?, "table")?;
    for t in &sm.tensors {
        let v: f32 = table
            .iter()
            .find(|(k, _)| k == &t.reads)
            .unwrap_or_else(|| panic!("{} not in the table", t.reads))
            .1
            .parse()?;
        assert!(
            (v - t.amax).abs() <= AMAX_REL_TOL * t.amax.max(1.0),
            "{t:?}: {v}"
        );
    }
    let cj = calibration_json(&out)?;
    assert_eq!(cj["smoothing"]["alpha"], 1.0);
    // The per-channel maxima are stored, so --ranges can smooth again without collecting.
    let with_channels = cj["tensors"]
        .as_array()
        .expect("tensors")
        .iter()
        .filter(|t| t["channel_amax"].is_array())
        .count();
    assert_eq!(
        with_channels,
        2 * 4 + 1,
        "8 linear inputs + the final norm's output"
    );
    let again = tmp.path().join("again");
    let mut o2 = options(&model, &data, &again);
    o2.samples = 8;
    o2.holdout = 0;
    o2.smooth_alpha = Some(0.5);
    o2.ranges = Some(out.join(files::CALIBRATION_JSON));
    let r2 = calibrate(&o2, &mut |_| {})?;
    assert_eq!(r2.smoothing.expect("smoothing").tensors.len(), 8);

    // Ranges without per-channel maxima cannot be smoothed: a clear error.
    let mut stripped = cj.clone();
    for t in stripped["tensors"].as_array_mut().expect("tensors") {
        t.as_object_mut().expect("object").remove("channel_amax");
    }
    let old = tmp.path().join("old-calibration.json");
    std::fs::write(&old, serde_json::to_string(&stripped)?)?;
    let mut o3 = options(&model, &data, &tmp.path().join("old"));
    o3.holdout = 0;
    o3.smooth_alpha = Some(0.5);
    o3.ranges = Some(old);
    let e = calibrate(&o3, &mut |_| {}).unwrap_err().to_string();
    assert!(e.contains("per-channel maxima"), "{e}");
    Ok(())
}

#[test]
fn keep_float_leaves_the_named_layers_in_float_and_rejects_unknown_names() -> Result<()> {
    let (model, world) = tiny_required()?;
    let tmp = tempfile::tempdir()?;
    let data = write_records(
        tmp.path(),
        &steper_test_support::stepwise_records(&world, 6)?,
    )?;
    let out = tmp.path().join("int8");
    let mut o = options(&model, &data, &out);
    o.samples = 6;
    o.holdout = 0;
    o.keep_float = vec!["down_proj".into()];
    let r = calibrate(&o, &mut |_| {})?;
    // 2 layers × 6 quantized; 2 down_proj + lm_head in float.
    assert_eq!((r.qdq.quantized_linears, r.qdq.float_linears), (12, 3));
    let q = graph::load_onnx(&out.join(files::INT8_MODEL))?;
    assert_eq!(
        validate_qdq(&q, &out.join(files::INT8_MODEL))?.quantized_linears,
        12
    );
    // The TensorRT tables leave the float layers' inputs and outputs out (TensorRT keeps a
    // tensor without a range in float); everything else is there.
    let fp = graph::load_onnx(&model.join("model.onnx"))?;
    let downs: Vec<_> = graph::targets(&fp, 600, &model)?
        .into_iter()
        .filter(|t| t.weight.contains("down_proj"))
        .collect();
    assert_eq!(downs.len(), 2);
    let table = read_ort_trt_table(&std::fs::read(out.join(files::ORT_TABLE))?, "table")?;
    let cache = parse_trt_cache(
        &std::fs::read_to_string(out.join(files::TRT_CACHE))?,
        "cache",
    )?;
    for t in &downs {
        for name in [&t.activation, &t.output] {
            assert!(!table.iter().any(|(k, _)| k == name), "{name} in the table");
            assert!(
                !cache.scales.iter().any(|(k, _)| k == name),
                "{name} in the cache"
            );
        }
    }
    let collected = calibration_json(&out)?["tensors"]
        .as_array()
        .expect("tensors")
        .len();
    assert_eq!(table.len(), collected - 2 * downs.len());
    assert_eq!(cache.scales.len(), table.len());

    let bad = tmp.path().join("bad");
    let mut o = options(&model, &data, &bad);
    o.keep_float = vec!["down_prj".into()];
    let e = calibrate(&o, &mut |_| {}).unwrap_err();
    assert!(
        matches!(&e, Error::Option { option: "--keep-float", got, .. } if got == "down_prj"),
        "{e}"
    );
    assert!(dir_is_empty(&bad));
    let mut o = options(&model, &data, &tmp.path().join("bad-alpha"));
    o.smooth_alpha = Some(1.5);
    let e = calibrate(&o, &mut |_| {}).unwrap_err();
    assert!(
        matches!(
            &e,
            Error::Option {
                option: "--smooth-alpha",
                ..
            }
        ),
        "{e}"
    );
    Ok(())
}
