//! The export against the candle model on ONNX Runtime and tract (tiny random GQA model).

mod common;

use anyhow::Result;
use candle_core::{DType, Device};
use common::*;
use steper_export::verify::{check_backend, reference, Tolerance};
use steper_export::ExportDtype;
use steper_models::generate::argmax;
use steper_runtime::backend::{
    load_model, BackendKind, BatchDecoder, BatchInput, OrtGenerator, OrtOptions, TractGenerator,
};
use steper_runtime::{Generator, LogitsMode, Manifest};

/// fp32 logits of the export vs candle, every step.
const FP32_ABS: f32 = 1e-4;
/// Batch-of-two vs batch-of-one logits on the same backend.
const BATCH_ABS: f32 = 1e-4;

fn backends() -> Vec<BackendKind> {
    vec![BackendKind::Ort(OrtOptions::default()), BackendKind::Tract]
}

const TOL: Tolerance = Tolerance {
    name: "test fp32 1e-4 abs",
    max_rel: 1.0,
    greedy_exact: true,
    min_top1: 1.0,
};

#[test]
fn ort_and_tract_match_candle_prefill_and_8_decode_steps() -> Result<()> {
    let f = fixture(ExportDtype::Fp32)?;
    let ck = steper_models::Checkpoint::load(&f.ckpt, DType::F32, &Device::Cpu)?;
    let model = ck.model()?;
    let r = reference(&model, &prompt(12), 8)?;
    for b in backends() {
        let rep = check_backend(&f.out, &b, &r, TOL)?;
        assert_eq!(rep.steps.len(), 9);
        for s in &rep.steps {
            assert!(
                s.max_abs <= FP32_ABS,
                "{} step {}: max abs diff {} > {FP32_ABS}",
                rep.backend,
                s.step,
                s.max_abs
            );
        }
        assert!(rep.greedy_identical, "{}: greedy disagrees", rep.backend);
    }
    Ok(())
}

#[test]
fn greedy_32_tokens_identical_across_candle_ort_tract() -> Result<()> {
    let f = fixture(ExportDtype::Fp32)?;
    let ck = steper_models::Checkpoint::load(&f.ckpt, DType::F32, &Device::Cpu)?;
    let model = ck.model()?;
    let p = prompt(10);
    let want = reference(&model, &p, 32)?.tokens;
    assert_eq!(want.len(), 32);
    for b in backends() {
        let m = load_model(&f.out, &b)?;
        let got = greedy(m.generator.as_ref(), &p, 32)?;
        assert_eq!(got, want, "{}: greedy tokens differ from candle", b.name());
    }
    Ok(())
}

fn greedy(g: &dyn Generator, prompt: &[u32], n: usize) -> Result<Vec<u32>> {
    let mut seq = g.new_sequence()?;
    let mut lg = g.append(&mut seq, prompt, LogitsMode::Last)?;
    let mut out = Vec::new();
    for _ in 0..n {
        let t = argmax(lg.last());
        out.push(t);
        lg = g.append(&mut seq, &[t], LogitsMode::Last)?;
    }
    Ok(out)
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn batch_of_two_left_padded_matches_batch_of_one() -> Result<()> {
    let f = fixture(ExportDtype::Fp32)?;
    let manifest = Manifest::load(&f.out.join("steper.json"))?;
    let model = f.out.join("model.onnx");
    let decoders: Vec<Box<dyn BatchDecoder>> = vec![
        Box::new(OrtGenerator::load(
            &model,
            &manifest,
            &OrtOptions::default(),
        )?),
        Box::new(TractGenerator::load(&model, &manifest)?),
    ];
    let long = prompt(9);
    let short: Vec<u32> = prompt(14)[9..].to_vec();
    let steps: [[u32; 2]; 3] = [[3, 4], [50, 60], [7, 90]];
    for dec in decoders {
        // Reference: each row alone.
        let mut singles = Vec::new();
        for (row, p) in [&long, &short].into_iter().enumerate() {
            let mut c = dec.new_cache(1)?;
            let mut pos = [0i64];
            let rows = vec![p.iter().map(|&t| Some(t)).collect::<Vec<_>>()];
            let inp = BatchInput::left_padded(&rows, &[vec![]], &mut pos)?;
            let mut mask = inp.attention_mask.clone();
            let mut lg = vec![dec.step(&mut c, &inp, LogitsMode::Last)?.data];
            for s in steps {
                let inp =
                    BatchInput::left_padded(&[vec![Some(s[row])]], &[mask.clone()], &mut pos)?;
                mask = inp.attention_mask.clone();
                lg.push(dec.step(&mut c, &inp, LogitsMode::Last)?.data);
            }
            singles.push(lg);
        }
        // Batch of two, the short row left-padded.
        let pad = long.len() - short.len();
        let rows = vec![
            long.iter().map(|&t| Some(t)).collect::<Vec<_>>(),
            std::iter::repeat_n(None, pad)
                .chain(short.iter().map(|&t| Some(t)))
                .collect(),
        ];
        let mut c = dec.new_cache(2)?;
        let mut pos = [0i64, 0];
        let inp = BatchInput::left_padded(&rows, &[vec![], vec![]], &mut pos)?;
        let total = long.len();
        let mut masks = vec![
            inp.attention_mask[..total].to_vec(),
            inp.attention_mask[total..].to_vec(),
        ];
        let mut lg = vec![dec.step(&mut c, &inp, LogitsMode::Last)?];
        for s in steps {
            let inp =
                BatchInput::left_padded(&[vec![Some(s[0])], vec![Some(s[1])]], &masks, &mut pos)?;
            let t = masks[0].len() + 1;
            masks = vec![
                inp.attention_mask[..t].to_vec(),
                inp.attention_mask[t..].to_vec(),
            ];
            lg.push(dec.step(&mut c, &inp, LogitsMode::Last)?);
        }
        for (i, l) in lg.iter().enumerate() {
            for (row, single) in singles.iter().enumerate().take(2) {
                let d = max_diff(l.row(row), &single[i]);
                assert!(
                    d <= BATCH_ABS,
                    "step {i} row {row}: batch vs single diff {d}"
                );
            }
        }
    }
    Ok(())
}

#[test]
fn fp16_export_greedy_matches_fp32_on_ort() -> Result<()> {
    let f32x = fixture(ExportDtype::Fp32)?;
    let tmp = tempfile::tempdir()?;
    let out16 = tmp.path().join("fp16");
    steper_export::export(
        &f32x.ckpt,
        &out16,
        &steper_export::ExportOptions {
            dtype: ExportDtype::Fp16,
            ..Default::default()
        },
    )?;
    let ort = BackendKind::Ort(OrtOptions::default());
    let a = load_model(&f32x.out, &ort)?;
    let b = load_model(&out16, &ort)?;
    assert_eq!(b.manifest.dtype, "fp16");
    let p = prompt(10);
    let ta = greedy(a.generator.as_ref(), &p, 32)?;
    let tb = greedy(b.generator.as_ref(), &p, 32)?;
    // Max logit difference along the fp32 greedy path.
    let (mut sa, mut sb) = (a.generator.new_sequence()?, b.generator.new_sequence()?);
    let la = a.generator.append(&mut sa, &p, LogitsMode::All)?;
    let lb = b.generator.append(&mut sb, &p, LogitsMode::All)?;
    let mut worst = max_diff(&la.data, &lb.data);
    for &t in &ta {
        let la = a.generator.append(&mut sa, &[t], LogitsMode::Last)?;
        let lb = b.generator.append(&mut sb, &[t], LogitsMode::Last)?;
        worst = worst.max(max_diff(&la.data, &lb.data));
    }
    eprintln!("fp16 vs fp32 on ort: max logit difference {worst}");
    assert_eq!(
        ta, tb,
        "fp16 greedy differs from fp32 (max logit diff {worst})"
    );
    Ok(())
}

#[test]
fn tract_greedy_on_fp16_export_matches_fp32() -> Result<()> {
    let f = fixture(ExportDtype::Fp16)?;
    let ck = steper_models::Checkpoint::load(&f.ckpt, DType::F32, &Device::Cpu)?;
    let want = reference(&ck.model()?, &prompt(10), 16)?.tokens;
    let m = load_model(&f.out, &BackendKind::Tract)?;
    assert_eq!(greedy(m.generator.as_ref(), &prompt(10), 16)?, want);
    Ok(())
}

#[test]
fn truncate_reuses_a_prefix() -> Result<()> {
    let f = fixture(ExportDtype::Fp32)?;
    for b in backends() {
        let m = load_model(&f.out, &b)?;
        let g = m.generator;
        let p = prompt(12);
        let mut s = g.new_sequence()?;
        let full = g.append(&mut s, &p, LogitsMode::Last)?;
        g.truncate(&mut s, 6)?;
        assert_eq!(s.len(), 6);
        let again = g.append(&mut s, &p[6..], LogitsMode::Last)?;
        let d = max_diff(&full.data, &again.data);
        assert!(
            d <= FP32_ABS,
            "{}: truncate then re-append differs by {d}",
            b.name()
        );
    }
    Ok(())
}

#[test]
fn external_data_export_runs() -> Result<()> {
    let f = fixture(ExportDtype::Fp32)?;
    let tmp = tempfile::tempdir()?;
    let out = tmp.path().join("ext");
    let rep = steper_export::export(
        &f.ckpt,
        &out,
        &steper_export::ExportOptions {
            external_data: steper_export::ExternalData::Always,
            ..Default::default()
        },
    )?;
    assert!(rep.external_data.is_some() && out.join("model.onnx.data").is_file());
    let p = prompt(8);
    for b in backends() {
        let a = load_model(&f.out, &b)?.generator;
        let e = load_model(&out, &b)?.generator;
        let la = a.append(&mut a.new_sequence()?, &p, LogitsMode::All)?;
        let le = e.append(&mut e.new_sequence()?, &p, LogitsMode::All)?;
        assert_eq!(
            la.data,
            le.data,
            "{}: external data changes the logits",
            b.name()
        );
    }
    Ok(())
}
