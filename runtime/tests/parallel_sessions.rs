//! Parallel model calls on one loaded model: N threads decoding at once (ONNX Runtime with a pool
//! of N sessions, tract with its one plan) produce exactly the tokens one thread produces, and a
//! bad session count is an error naming the option; ONNX Runtime without its memory-pattern
//! optimization computes the same. Runs on the tiny export of
//! `steper-test-support`.

use std::sync::{Arc, Barrier};

use anyhow::Result;
use steper_runtime::{load_model, BackendKind, Error, Generator, LogitsMode, OrtOptions};
use steper_test_support::argmax;

/// Threads decoding at once (and ONNX Runtime sessions).
const THREADS: usize = 3;
/// Prompts decoded; more than THREADS so that sessions are checked out and returned many times.
const PROMPTS: usize = 6;
/// Greedy tokens per prompt.
const NEW_TOKENS: usize = 24;

/// Deterministic prompts of different lengths (token ids below `vocab`).
fn prompts(vocab: usize) -> Vec<Vec<u32>> {
    (0..PROMPTS)
        .map(|p| {
            let mut x = 0x9e37_79b9_u64.wrapping_mul(p as u64 + 1);
            (0..5 + 7 * p)
                .map(|_| {
                    x = x
                        .wrapping_mul(6_364_136_223_846_793_005)
                        .wrapping_add(1_442_695_040_888_963_407);
                    ((x >> 33) % vocab as u64) as u32
                })
                .collect()
        })
        .collect()
}

/// Greedy decoding of `prompt`: prefill, then one model call per token.
fn greedy(g: &dyn Generator, prompt: &[u32]) -> Result<Vec<u32>> {
    let mut seq = g.new_sequence()?;
    let mut logits = g.append(&mut seq, prompt, LogitsMode::Last)?;
    let mut out = Vec::with_capacity(NEW_TOKENS);
    for _ in 0..NEW_TOKENS {
        let t = argmax(logits.last());
        out.push(t);
        logits = g.append(&mut seq, &[t], LogitsMode::Last)?;
    }
    Ok(out)
}

/// Every prompt decoded on one thread, then all prompts spread over THREADS threads that start
/// together; the tokens must be the same.
fn check_concurrent(backend: BackendKind) -> Result<()> {
    let m = load_model(&steper_test_support::tiny_export()?, &backend)?;
    let g = m.generator;
    let prompts = prompts(g.info().vocab_size);
    let serial = prompts
        .iter()
        .map(|p| greedy(g.as_ref(), p))
        .collect::<Result<Vec<_>>>()?;
    let start = Arc::new(Barrier::new(THREADS));
    let prompts = Arc::new(prompts);
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let (g, start, prompts) = (Arc::clone(&g), Arc::clone(&start), Arc::clone(&prompts));
            std::thread::spawn(move || -> Result<Vec<(usize, Vec<u32>)>> {
                start.wait();
                (t..PROMPTS)
                    .step_by(THREADS)
                    .map(|i| Ok((i, greedy(g.as_ref(), &prompts[i])?)))
                    .collect()
            })
        })
        .collect();
    let mut parallel: Vec<Option<Vec<u32>>> = vec![None; PROMPTS];
    for h in handles {
        let done = h
            .join()
            .map_err(|_| anyhow::anyhow!("decoding thread panicked"))??;
        for (i, tokens) in done {
            parallel[i] = Some(tokens);
        }
    }
    for (i, (s, p)) in serial.iter().zip(&parallel).enumerate() {
        assert_eq!(
            Some(s),
            p.as_ref(),
            "prompt {i}: tokens decoded concurrently differ from one thread's"
        );
    }
    Ok(())
}

#[test]
fn ort_session_pool_decodes_like_one_thread() -> Result<()> {
    check_concurrent(BackendKind::Ort(
        OrtOptions::default()
            .with_sessions(THREADS)
            .with_intra_threads(1),
    ))
}

#[test]
fn ort_sessions_without_shared_weights_decode_alike() -> Result<()> {
    check_concurrent(BackendKind::Ort(
        OrtOptions::default()
            .with_sessions(2)
            .with_intra_threads(1)
            .with_shared_prepacked_weights(false),
    ))
}

#[test]
fn ort_without_memory_pattern_decodes_the_same_tokens_and_logits() -> Result<()> {
    // The memory-pattern optimization only plans allocations: switching it off changes where
    // tensors live, not what is computed.
    let export = steper_test_support::tiny_export()?;
    let on = load_model(&export, &BackendKind::Ort(OrtOptions::default()))?.generator;
    let off = load_model(
        &export,
        &BackendKind::Ort(OrtOptions::default().with_memory_pattern(false)),
    )?
    .generator;
    for p in prompts(on.info().vocab_size) {
        assert_eq!(greedy(on.as_ref(), &p)?, greedy(off.as_ref(), &p)?);
        let (mut a, mut b) = (on.new_sequence()?, off.new_sequence()?);
        let la = on.append(&mut a, &p, LogitsMode::Last)?;
        let lb = off.append(&mut b, &p, LogitsMode::Last)?;
        assert_eq!(
            la.last(),
            lb.last(),
            "logits differ with the memory pattern off"
        );
    }
    check_concurrent(BackendKind::Ort(
        OrtOptions::default()
            .with_sessions(2)
            .with_intra_threads(1)
            .with_memory_pattern(false),
    ))
}

#[test]
fn tract_plan_decodes_like_one_thread_from_many_threads() -> Result<()> {
    check_concurrent(BackendKind::Tract.with_concurrency(THREADS))
}

#[test]
fn zero_sessions_is_an_error_naming_the_option() -> Result<()> {
    let res = load_model(
        &steper_test_support::tiny_export()?,
        &BackendKind::Ort(OrtOptions::default().with_sessions(0)),
    );
    match res {
        Err(Error::InvalidOption { option, .. }) => assert_eq!(option, "sessions"),
        Err(e) => panic!("expected InvalidOption for sessions, got {e}"),
        Ok(_) => panic!("0 sessions was accepted"),
    }
    Ok(())
}
