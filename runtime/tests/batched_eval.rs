//! Batched evaluation on the tiny export of `steper-test-support` (with its world and index):
//! `evaluate_batched` with batch 3 gives the same answers and the same trace sentences as the
//! one-question-at-a-time `evaluate`, on ONNX Runtime and tract;
//! and the batched decode step itself (rows of different lengths, left padding, rows placed,
//! padded and trimmed) gives the tokens and logits of each sequence decoded alone. Without the
//! fixture the tests fail and say so.

use anyhow::{Context, Result};
use steper_runtime::backend::{BatchCache, BatchInput};
use steper_runtime::data::ReadOptions;
use steper_runtime::eval::{evaluate, evaluate_batched, evaluate_parallel, EvalOptions};
use steper_runtime::{load_model, BackendKind, Engine, Error, Generator, LogitsMode, OrtOptions};
use steper_test_support::argmax;

/// Questions compared (at least 8).
const QUESTIONS: usize = 12;
/// Questions in flight in the batched run.
const BATCH: usize = 3;
/// Largest difference between a row's logits in the batched step and the same sequence decoded
/// alone: float sums over padded (masked) positions and batched matmuls reassociate.
const LOGIT_TOLERANCE: f32 = 1e-3;
/// Decode steps of the direct batched-step check.
const DECODE_STEPS: usize = 16;

/// The tiny export on `backend` over the index of its world, and the world's dev + test
/// questions.
fn engine_on_world(backend: BackendKind) -> Result<(Engine, Vec<steper_runtime::data::QaExample>)> {
    let tiny = steper_test_support::tiny()?;
    let (model, index) = (&tiny.export, &tiny.index);
    let mut qa = tiny.questions("dev")?;
    qa.extend(tiny.questions("test")?);
    anyhow::ensure!(qa.len() >= QUESTIONS, "too few dev + test questions");
    let engine = Engine::builder()
        .model_dir(model)
        .backend(backend)
        .index(index)
        .build()?;
    Ok((engine, qa))
}

fn compare_batched_with_sequential(backend: BackendKind) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (engine, qa) = engine_on_world(backend)?;
    let options = engine.default_options();
    let opts = EvalOptions {
        limit: Some(QUESTIONS),
        progress: false,
    };
    let (s1, r1) = evaluate(&engine, &qa, &options, &opts, None)?;
    let out = dir.path().join("batched.jsonl");
    let (s3, r3) = evaluate_batched(&engine, &qa, &options, &opts, Some(&out), BATCH)?;
    assert_eq!((s1.questions, s3.questions), (QUESTIONS, QUESTIONS));
    assert_eq!(s1.errors, 0, "sequential run had errors: {r1:?}");
    assert_eq!(s3.errors, 0, "batched run had errors: {r3:?}");
    let mut multi_step = 0;
    for (a, b) in r1.iter().zip(&r3) {
        assert_eq!(a.id, b.id, "records out of question order");
        assert_eq!(a.prediction, b.prediction, "answer of {}", a.id);
        let sa: Vec<&str> = a.trace.iter().map(|s| s.sentence.as_str()).collect();
        let sb: Vec<&str> = b.trace.iter().map(|s| s.sentence.as_str()).collect();
        assert_eq!(sa, sb, "trace sentences of {}", a.id);
        let ta: Vec<usize> = a.trace.iter().map(|s| s.new_tokens).collect();
        let tb: Vec<usize> = b.trace.iter().map(|s| s.new_tokens).collect();
        assert_eq!(ta, tb, "generated tokens per step of {}", a.id);
        multi_step += usize::from(a.steps > 1);
    }
    assert!(
        multi_step > 0,
        "no question took more than one step: the slot reuse across steps went untested"
    );
    let back = steper_runtime::data::read_jsonl::<steper_runtime::eval::EvalRecord>(
        &out,
        ReadOptions::default(),
    )?;
    // (compared by id and answer: the float fields do not round-trip JSON bit for bit)
    let key = |r: &[steper_runtime::eval::EvalRecord]| -> Vec<(String, String)> {
        r.iter()
            .map(|r| (r.id.clone(), r.prediction.clone()))
            .collect()
    };
    assert_eq!(
        key(&back.rows),
        key(&r3),
        "records file differs from the returned records"
    );
    Ok(())
}

#[test]
fn ort_batched_eval_answers_like_one_at_a_time() -> Result<()> {
    compare_batched_with_sequential(BackendKind::Ort(
        OrtOptions::default().with_intra_threads(1),
    ))
}

#[test]
fn tract_batched_eval_answers_like_one_at_a_time() -> Result<()> {
    compare_batched_with_sequential(BackendKind::Tract)
}

/// Workers of the parallel evaluation.
const WORKERS: usize = 2;

/// `evaluate_parallel` on two sessions: one question at a time per worker, and three in flight
/// per worker, answer exactly as one worker does, records in question order.
#[test]
fn ort_parallel_eval_answers_like_one_worker() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let backend = BackendKind::Ort(OrtOptions::default().with_intra_threads(1));
    let (engine, qa) = engine_on_world(backend.with_concurrency(WORKERS))?;
    let options = engine.default_options();
    let opts = EvalOptions {
        limit: Some(QUESTIONS),
        progress: false,
    };
    let (_, r1) = evaluate(&engine, &qa, &options, &opts, None)?;
    let key = |r: &[steper_runtime::eval::EvalRecord]| -> Vec<(String, String, Vec<String>)> {
        r.iter()
            .map(|r| {
                let trace = r.trace.iter().map(|s| s.sentence.clone()).collect();
                (r.id.clone(), r.prediction.clone(), trace)
            })
            .collect()
    };
    for batch in [1, BATCH] {
        let out = dir.path().join(format!("parallel-{batch}.jsonl"));
        let (s, r) = evaluate_parallel(&engine, &qa, &options, &opts, Some(&out), batch, WORKERS)?;
        assert_eq!(s.questions, QUESTIONS);
        assert_eq!(
            s.errors, 0,
            "parallel run (batch {batch}) had errors: {r:?}"
        );
        assert_eq!(key(&r), key(&r1), "parallel run with batch {batch}");
        let back = steper_runtime::data::read_jsonl::<steper_runtime::eval::EvalRecord>(
            &out,
            ReadOptions::default(),
        )?;
        assert_eq!(key(&back.rows), key(&r1), "records file of batch {batch}");
    }
    let err = evaluate_parallel(&engine, &qa, &options, &opts, None, 1, 0).unwrap_err();
    assert!(
        matches!(&err, Error::InvalidOption { option, .. } if option == "workers"),
        "{err}"
    );
    Ok(())
}

fn prompt(len: usize, seed: u64, vocab: usize) -> Vec<u32> {
    let mut x = seed;
    (0..len)
        .map(|_| {
            x = x
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            ((x >> 33) % vocab as u64) as u32
        })
        .collect()
}

/// Three sequences of different lengths prefilled alone, placed in a padded batch cache
/// (grown with `pad_front` first, trimmed with `trim_front`, its rows reordered with an empty
/// row added and then dropped by `select_rows`), decoded together: every row follows its
/// sequence decoded alone.
fn batched_step_matches_single(backend: BackendKind) -> Result<()> {
    let m = load_model(&steper_test_support::tiny_export()?, &backend)?;
    let g: &dyn Generator = m.generator.as_ref();
    let dec = g
        .batch_decoder()
        .context("backend without a batched step")?;
    let vocab = g.info().vocab_size;
    let prompts = [
        prompt(5, 1, vocab),
        prompt(19, 2, vocab),
        prompt(11, 3, vocab),
    ];
    // Reference: each alone, greedy; logits of every decode step.
    let mut reference = Vec::new();
    for p in &prompts {
        let mut seq = g.new_sequence()?;
        let mut l = g.append(&mut seq, p, LogitsMode::Last)?;
        let mut rows = vec![l.last().to_vec()];
        for _ in 0..DECODE_STEPS {
            let t = argmax(l.last());
            l = g.append(&mut seq, &[t], LogitsMode::Last)?;
            rows.push(l.last().to_vec());
        }
        reference.push(rows);
    }
    // Batched: prefill alone, place, decode together.
    let mut cache = dec.new_cache(prompts.len())?;
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    dec.pad_front(&mut cache, longest + 3)?;
    let mut lens = vec![0usize; prompts.len()];
    let mut next = vec![0u32; prompts.len()];
    for (r, p) in prompts.iter().enumerate() {
        let mut seq = g.new_sequence()?;
        let l = g.append(&mut seq, p, LogitsMode::Last)?;
        next[r] = argmax(l.last());
        let src = single_cache(&mut seq)?;
        dec.place_row(&mut cache, r, src)?;
        lens[r] = p.len();
    }
    // A row's cache cannot be longer than the batch's.
    let mut long = g.new_sequence()?;
    g.append(
        &mut long,
        &prompt(cache.past() + 1, 9, vocab),
        LogitsMode::Last,
    )?;
    assert!(matches!(
        dec.place_row(&mut cache, 0, single_cache(&mut long)?),
        Err(Error::Misuse {
            call: "BatchDecoder::place_row",
            ..
        })
    ));
    // The sequence in each row.
    let mut seq_of_row: Vec<usize> = (0..prompts.len()).collect();
    for step in 0..DECODE_STEPS {
        if step == DECODE_STEPS * 3 / 4 {
            // Reverse the rows and add an empty one; then drop it again.
            let n = prompts.len();
            let mut rows: Vec<Option<usize>> = (0..n).rev().map(Some).collect();
            rows.push(None);
            let wide = dec.select_rows(&cache, &rows)?;
            assert_eq!((wide.batch(), wide.past()), (n + 1, cache.past()));
            cache = dec.select_rows(&wide, &(0..n).map(Some).collect::<Vec<_>>())?;
            seq_of_row.reverse();
            lens.reverse();
            next.reverse();
            assert!(matches!(
                dec.select_rows(&cache, &[Some(n)]),
                Err(Error::Misuse {
                    call: "BatchDecoder::select_rows",
                    ..
                })
            ));
        }
        if step == DECODE_STEPS / 2 {
            // Every row has at least `past - longest_len` padding columns in front: drop them.
            let common = lens.iter().map(|&l| cache.past() - l).min().unwrap_or(0);
            assert!(common > 0, "the test expects common padding to trim");
            dec.trim_front(&mut cache, common)?;
        }
        let past = cache.past();
        let mut mask = Vec::new();
        for &l in &lens {
            mask.extend((0..past).map(|c| i64::from(c >= past - l)));
            mask.push(1);
        }
        let input = BatchInput {
            batch: prompts.len(),
            seq: 1,
            input_ids: next.iter().map(|&t| i64::from(t)).collect(),
            attention_mask: mask,
            position_ids: lens.iter().map(|&l| l as i64).collect(),
        };
        let l = dec.step(&mut cache, &input, LogitsMode::Last)?;
        for r in 0..prompts.len() {
            lens[r] += 1;
            let want = &reference[seq_of_row[r]][step + 1];
            let got = l.row(r);
            let worst = want
                .iter()
                .zip(got)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            assert!(
                worst <= LOGIT_TOLERANCE,
                "row {r}, step {step}: logits differ by {worst} from the sequence alone"
            );
            next[r] = argmax(got);
            assert_eq!(next[r], argmax(want), "row {r}, step {step}: other token");
        }
    }
    Ok(())
}

fn single_cache(seq: &mut steper_runtime::Sequence) -> Result<&BatchCache> {
    seq.cache_mut()
        .downcast_ref::<BatchCache>()
        .context("sequence without a batch cache")
}

#[test]
fn ort_batched_step_matches_each_sequence_alone() -> Result<()> {
    batched_step_matches_single(BackendKind::Ort(
        OrtOptions::default().with_intra_threads(1),
    ))
}

#[test]
fn tract_batched_step_matches_each_sequence_alone() -> Result<()> {
    batched_step_matches_single(BackendKind::Tract)
}

#[test]
fn batch_zero_is_an_error_naming_the_option() -> Result<()> {
    let (engine, qa) = engine_on_world(BackendKind::Tract)?;
    let res = evaluate_batched(
        &engine,
        &qa,
        &engine.default_options(),
        &EvalOptions::default(),
        None,
        0,
    );
    assert!(
        matches!(&res, Err(Error::InvalidOption { option, .. }) if option == "batch"),
        "{:?}",
        res.map(|r| r.0)
    );
    Ok(())
}
