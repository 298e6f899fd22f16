//! Batched evaluation: up to `batch` questions run through the loop at once. Each question has
//! its own loop, step model and KV cache (prefill and cross-step reuse stay per sequence, as in
//! [`crate::Engine::reason`]); the decode steps of every question that is generating run as one
//! batched model call on a persistent batch cache (continuous batching, shared with the
//! server's batching workers: see the crate's `batching` module). A question that finishes
//! frees its slot for the next one.

use std::time::Instant;

use crate::batching::{Advance, Batch, LoopSlot};
pub use crate::batching::{GROW_HEADROOM, TRIM_SLACK};
use crate::data::QaExample;
use crate::engine::{Engine, ReasonOptions};
use crate::error::{Error, Result};
use crate::reasoning::Reasoning;

/// A question in a slot.
struct Slot<'e> {
    /// Index of the question.
    q: usize,
    started: Instant,
    run: LoopSlot<'e>,
}

/// Answers `examples` with up to `batch` questions at once; the results are in question order,
/// each with its wall time (from when its slot took it to its answer). A question whose loop
/// fails gets its error; errors of the batched calls themselves stop the run.
pub(crate) fn answer_batched(
    engine: &Engine,
    examples: &[QaExample],
    options: &ReasonOptions,
    batch: usize,
    mut done: impl FnMut(usize, Result<Reasoning>, f64) -> Result<()>,
) -> Result<()> {
    if batch == 0 {
        return Err(Error::InvalidOption {
            option: "batch".into(),
            expected: "at least 1".into(),
            got: "0".into(),
        });
    }
    if batch > 1 && options.prompt_lookup.is_some() {
        return Err(Error::InvalidOption {
            option: "batch".into(),
            expected: "1 with prompt-lookup decoding (the batched step decodes one token per question and call)".into(),
            got: batch.to_string(),
        });
    }
    let dec = engine
        .generator()
        .batch_decoder()
        .ok_or_else(|| Error::InvalidOption {
            option: "batch".into(),
            expected: "1 for a generator without a batched step (only the ONNX backends have one, and not for a GroupQueryAttention export, which cannot mask left-padded rows)"
                .into(),
            got: batch.to_string(),
        })?;
    let b = batch.min(examples.len()).max(1);
    let mut state = Batch::new(dec, b)?;
    let mut slots: Vec<Option<Slot<'_>>> = (0..b).map(|_| None).collect();
    let mut next = 0;
    loop {
        // Every slot either generates or is empty (no question left).
        for (r, entry) in slots.iter_mut().enumerate() {
            while entry.is_none() && next < examples.len() {
                let q = next;
                next += 1;
                let started = Instant::now();
                let outcome =
                    LoopSlot::new(engine, &examples[q].question, options).and_then(|mut run| {
                        let a = run.start(engine, &mut state, r)?;
                        Ok((run, a))
                    });
                match outcome {
                    Ok((run, Advance::Decoding)) => *entry = Some(Slot { q, started, run }),
                    Ok((_, Advance::Done(reasoning))) => {
                        done(q, Ok(*reasoning), started.elapsed().as_secs_f64())?
                    }
                    Err(e) => done(q, Err(e), started.elapsed().as_secs_f64())?,
                }
            }
        }
        let tokens: Vec<Option<u32>> = slots
            .iter()
            .map(|s| s.as_ref().and_then(|s| s.run.next_token()))
            .collect();
        if tokens.iter().all(Option::is_none) {
            return Ok(());
        }
        let logits = state.step(&tokens)?;
        for (r, entry) in slots.iter_mut().enumerate() {
            let Some(slot) = entry.as_mut() else { continue };
            let outcome = slot.run.accept(engine, &mut state, r, logits.row(r));
            let result = match outcome {
                Ok(Advance::Decoding) => continue,
                Ok(Advance::Done(reasoning)) => Ok(*reasoning),
                Err(e) => Err(e),
            };
            let (q, t) = (slot.q, slot.started.elapsed().as_secs_f64());
            *entry = None;
            done(q, result, t)?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batching::fake::engine;
    use crate::eval::{evaluate, evaluate_batched, EvalOptions};

    fn question(i: usize) -> QaExample {
        QaExample {
            id: format!("q{i}"),
            dataset: "t".into(),
            question: format!("Which doc {} of {} ?", i % 7, (i * 3) % 11),
            answers: vec![format!("{i}")],
            kind: None,
            paragraphs: Vec::new(),
            supporting_titles: None,
            extra: Default::default(),
        }
    }

    #[test]
    fn batched_answers_and_traces_equal_one_at_a_time() -> Result<()> {
        let engine = engine()?;
        let qs: Vec<QaExample> = (0..10).map(question).collect();
        let options = engine.default_options();
        let opts = EvalOptions::default();
        let (_, seq) = evaluate(&engine, &qs, &options, &opts, None)?;
        assert!(seq.iter().all(|r| r.error.is_none()), "{seq:?}");
        let lengths: std::collections::HashSet<Vec<usize>> = seq
            .iter()
            .map(|r| r.trace.iter().map(|s| s.new_tokens).collect())
            .collect();
        assert!(
            lengths.len() > 3,
            "the fake's sentences should differ in length between questions: {lengths:?}"
        );
        for batch in [2, 3, 4, 16] {
            let (s, bat) = evaluate_batched(&engine, &qs, &options, &opts, None, batch)?;
            assert_eq!(s.questions, qs.len());
            for (a, b) in seq.iter().zip(&bat) {
                assert_eq!(b.error, None, "batch {batch}, {}", a.id);
                assert_eq!(a.id, b.id);
                assert_eq!(a.prediction, b.prediction, "batch {batch}, {}", a.id);
                let sa: Vec<_> = a
                    .trace
                    .iter()
                    .map(|s| (&s.sentence, s.new_tokens, s.prompt_tokens))
                    .collect();
                let sb: Vec<_> = b
                    .trace
                    .iter()
                    .map(|s| (&s.sentence, s.new_tokens, s.prompt_tokens))
                    .collect();
                assert_eq!(sa, sb, "batch {batch}, {}", a.id);
            }
        }
        Ok(())
    }

    /// Few-shot demonstrations before every prompt: the batched rows start from copies of the
    /// prefix's cache and answer as one question at a time does, on one thread or two.
    #[test]
    fn batched_answers_with_a_prompt_prefix_equal_one_at_a_time() -> Result<()> {
        let engine = engine()?;
        let qs: Vec<QaExample> = (0..8).map(question).collect();
        let mut options = engine.default_options();
        options.prompt_prefix =
            Some("Wikipedia Title : doc 7\ntext of doc 7 .\n\nQ : Which doc ?\nA : So the answer is 7 .\n\n".into());
        let opts = EvalOptions::default();
        let (_, one) = evaluate(&engine, &qs, &options, &opts, None)?;
        assert!(one.iter().all(|r| r.error.is_none()), "{one:?}");
        let mut plain = engine.default_options();
        plain.kv_reuse = false;
        plain.prompt_prefix = options.prompt_prefix.clone();
        let (_, recomputed) = evaluate(&engine, &qs, &plain, &opts, None)?;
        let runs = [
            ("reuse off", recomputed),
            (
                "batch 3",
                evaluate_batched(&engine, &qs, &options, &opts, None, 3)?.1,
            ),
            (
                "batch 2, 2 workers",
                crate::eval::evaluate_parallel(&engine, &qs, &options, &opts, None, 2, 2)?.1,
            ),
        ];
        for (what, run) in runs {
            for (a, b) in one.iter().zip(&run) {
                assert_eq!(b.error, None, "{what}, {}", a.id);
                assert_eq!(a.prediction, b.prediction, "{what}, {}", a.id);
                let sa: Vec<_> = a
                    .trace
                    .iter()
                    .map(|s| (&s.sentence, s.prompt_tokens))
                    .collect();
                let sb: Vec<_> = b
                    .trace
                    .iter()
                    .map(|s| (&s.sentence, s.prompt_tokens))
                    .collect();
                assert_eq!(sa, sb, "{what}, {}", a.id);
            }
        }
        Ok(())
    }
}
