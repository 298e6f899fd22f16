//! The `logits_to_keep` input: last-position prefill logits equal the full prefill's last row,
//! and the graph keeps exactly the last N positions (tiny random GQA model).

mod common;

use anyhow::{Context, Result};
use common::*;
use prost::Message;
use steper_export::graph::LOGITS_TO_KEEP;
use steper_export::ExportDtype;
use steper_runtime::backend::{
    load_model, BackendKind, BatchDecoder, BatchInput, OrtGenerator, OrtOptions,
};
use steper_runtime::{LogitsMode, Manifest};

/// Last-position logits against the matching row of an every-position call on the same
/// backend: the same graph, but ONNX Runtime picks other GEMM kernels for one row than for
/// twelve (summation order only).
const LAST_ROW_ABS: f32 = 1e-4;

fn backends() -> Vec<BackendKind> {
    vec![BackendKind::Ort(OrtOptions::default()), BackendKind::Tract]
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn last_position_prefill_logits_equal_the_full_prefills_last_row() -> Result<()> {
    let f = fixture(ExportDtype::Fp32)?;
    let p = prompt(12);
    for b in backends() {
        let g = load_model(&f.out, &b)?.generator;
        let all = g.append(&mut g.new_sequence()?, &p, LogitsMode::All)?;
        assert_eq!(all.rows, p.len());
        assert_eq!(all.data.len(), p.len() * VOCAB);
        let mut seq = g.new_sequence()?;
        let last = g.append(&mut seq, &p, LogitsMode::Last)?;
        assert_eq!((last.rows, last.data.len()), (1, VOCAB), "{}", b.name());
        let d = max_diff(&last.data, all.last());
        assert!(d <= LAST_ROW_ABS, "{}: last row differs by {d}", b.name());
        // A decode step after a last-only prefill sees the full cache.
        let t = 17u32;
        let next = g.append(&mut seq, &[t], LogitsMode::Last)?;
        let mut full = g.new_sequence()?;
        g.append(&mut full, &p, LogitsMode::All)?;
        let want = g.append(&mut full, &[t], LogitsMode::All)?;
        let d = max_diff(&next.data, &want.data);
        assert!(d <= LAST_ROW_ABS, "{}: next step differs by {d}", b.name());
    }
    Ok(())
}

#[test]
fn manifest_names_the_input_and_the_graph_declares_it_with_default_zero() -> Result<()> {
    let f = fixture(ExportDtype::Fp32)?;
    let m = Manifest::load(&f.out.join("steper.json"))?;
    assert_eq!(m.graph.logits_to_keep.as_deref(), Some(LOGITS_TO_KEEP));
    assert_eq!(m.graph.inputs, Manifest::input_names(m.graph.num_layers));
    let model = tract_onnx::pb::ModelProto::decode(&*std::fs::read(f.out.join("model.onnx"))?)?;
    let g = model.graph.context("no graph")?;
    assert!(g.input.iter().any(|i| i.name == LOGITS_TO_KEEP));
    let init = g
        .initializer
        .iter()
        .find(|t| t.name == LOGITS_TO_KEEP)
        .context("logits_to_keep is not an initializer")?;
    assert!(init.dims.is_empty(), "scalar expected, got {:?}", init.dims);
    assert_eq!(init.raw_data, 0i64.to_le_bytes());
    Ok(())
}

/// Rewrites the default of `logits_to_keep` in the export's graph.
fn set_default(dir: &std::path::Path, n: i64) -> Result<()> {
    let path = dir.join("model.onnx");
    let mut model = tract_onnx::pb::ModelProto::decode(&*std::fs::read(&path)?)?;
    let g = model.graph.as_mut().context("no graph")?;
    let init = g
        .initializer
        .iter_mut()
        .find(|t| t.name == LOGITS_TO_KEEP)
        .context("no logits_to_keep initializer")?;
    init.raw_data = n.to_le_bytes().to_vec();
    std::fs::write(&path, model.encode_to_vec())?;
    Ok(())
}

#[test]
fn the_graph_keeps_exactly_the_last_n_positions() -> Result<()> {
    let f = fixture(ExportDtype::Fp32)?;
    let p = prompt(10);
    let mut full = Vec::new();
    for b in backends() {
        let g = load_model(&f.out, &b)?.generator;
        full.push(g.append(&mut g.new_sequence()?, &p, LogitsMode::All)?.data);
    }
    // Same graph with the default set to 3: every backend (tract folds the initializer, ONNX
    // Runtime reads the default when nothing is fed) returns the last three rows.
    set_default(&f.out, 3)?;
    for (b, full) in backends().into_iter().zip(&full) {
        let g = load_model(&f.out, &b)?.generator;
        let got = g.append(&mut g.new_sequence()?, &p, LogitsMode::All)?;
        assert_eq!(got.data.len(), 3 * VOCAB, "{}: rows kept", b.name());
        let d = max_diff(&got.data, &full[(p.len() - 3) * VOCAB..]);
        assert!(d <= LAST_ROW_ABS, "{}: kept rows differ by {d}", b.name());
    }
    // N larger than the sequence keeps every position (Slice clamps).
    set_default(&f.out, 1000)?;
    for (b, full) in backends().into_iter().zip(&full) {
        let g = load_model(&f.out, &b)?.generator;
        let got = g.append(&mut g.new_sequence()?, &p, LogitsMode::All)?;
        assert_eq!(got.data.len(), full.len(), "{}", b.name());
    }
    Ok(())
}

#[test]
fn left_padded_batch_last_rows_equal_single_rows_on_ort() -> Result<()> {
    let f = fixture(ExportDtype::Fp32)?;
    let manifest = Manifest::load(&f.out.join("steper.json"))?;
    let dec = OrtGenerator::load(&f.out.join("model.onnx"), &manifest, &OrtOptions::default())?;
    let long = prompt(9);
    let short: Vec<u32> = prompt(14)[9..].to_vec();
    let pad = long.len() - short.len();
    let rows = vec![
        long.iter().map(|&t| Some(t)).collect::<Vec<_>>(),
        std::iter::repeat_n(None, pad)
            .chain(short.iter().map(|&t| Some(t)))
            .collect(),
    ];
    let mut c = dec.new_cache(2)?;
    let inp = BatchInput::left_padded(&rows, &[vec![], vec![]], &mut [0, 0])?;
    let last = dec.step(&mut c, &inp, LogitsMode::Last)?;
    assert_eq!((last.rows, last.data.len()), (2, 2 * VOCAB));
    for (r, p) in [&long, &short].into_iter().enumerate() {
        let mut c1 = dec.new_cache(1)?;
        let one = vec![p.iter().map(|&t| Some(t)).collect::<Vec<_>>()];
        let inp = BatchInput::left_padded(&one, &[vec![]], &mut [0])?;
        let all = dec.step(&mut c1, &inp, LogitsMode::All)?;
        let d = max_diff(last.row(r), all.last());
        assert!(d <= LAST_ROW_ABS, "row {r}: {d}");
    }
    Ok(())
}
