//! Prompt-lookup decoding on the tiny export of `steper-test-support`: evaluation with drafts
//! copied from the prompt gives the answers, sentences and token counts of one-token-per-call
//! decoding on ONNX Runtime (the standard and the GroupQueryAttention export with its in-place
//! cache) and tract; batched evaluation refuses it. Without the fixture the tests fail and say so.

use std::sync::Arc;

use anyhow::Result;
use steper_runtime::eval::{evaluate, evaluate_batched, EvalOptions};
use steper_runtime::{load_model, BackendKind, Engine, Error, Generator, OrtOptions, PromptLookup};
use steper_test_support::hooked::{CallCounter, Hooked};

/// Questions compared.
const QUESTIONS: usize = 12;

fn same_answers_with_and_without_lookup(backend: BackendKind, gqa: bool) -> Result<()> {
    let tiny = steper_test_support::tiny()?;
    let model = load_model(if gqa { &tiny.export_gqa } else { &tiny.export }, &backend)?;
    let counting = Arc::new(Hooked::new(model.generator, CallCounter::default()));
    let engine = Engine::builder()
        .generator(
            Arc::clone(&counting) as Arc<dyn Generator>,
            model.tokenizer,
            &model.manifest.eos_token_ids,
        )
        .loop_options(steper_runtime::LoopOptions::from(
            &model.manifest.loop_defaults,
        ))
        .index(&tiny.index)
        .build()?;
    let mut qa = tiny.questions("dev")?;
    qa.extend(tiny.questions("test")?);
    anyhow::ensure!(qa.len() >= QUESTIONS, "too few dev + test questions");
    let opts = EvalOptions {
        limit: Some(QUESTIONS),
        progress: false,
    };
    let plain = engine.default_options();
    let (s0, r0) = evaluate(&engine, &qa, &plain, &opts, None)?;
    let (calls0, cuts0) = counting.hook.take();
    assert_eq!(s0.errors, 0, "{r0:?}");
    let generated: usize = r0.iter().flat_map(|r| &r.trace).map(|s| s.new_tokens).sum();
    assert!(generated > 3 * QUESTIONS, "{generated} tokens generated");
    for pl in [PromptLookup::default(), PromptLookup::with_max_draft(2)] {
        let looked = plain.clone().with_prompt_lookup(Some(pl));
        let (s1, r1) = evaluate(&engine, &qa, &looked, &opts, None)?;
        let (calls, cuts) = counting.hook.take();
        assert_eq!(s1.errors, 0, "{r1:?}");
        for (a, b) in r0.iter().zip(&r1) {
            assert_eq!(a.prediction, b.prediction, "answer of {} ({pl:?})", a.id);
            let view = |r: &steper_runtime::eval::EvalRecord| -> Vec<(String, usize, usize)> {
                r.trace
                    .iter()
                    .map(|s| (s.sentence.clone(), s.new_tokens, s.prefilled_tokens))
                    .collect()
            };
            assert_eq!(view(a), view(b), "steps of {} ({pl:?})", a.id);
        }
        // Drafts were taken (fewer calls) and some were cut back (more cache cuts than the
        // steps' own prefix reuse makes): both paths of the verification ran.
        assert!(calls < calls0, "{pl:?}: {calls} calls vs {calls0}");
        assert!(cuts > cuts0, "{pl:?}: {cuts} cache cuts vs {cuts0}");
    }
    Ok(())
}

#[test]
fn ort_prompt_lookup_answers_like_one_token_per_call() -> Result<()> {
    same_answers_with_and_without_lookup(BackendKind::Ort(OrtOptions::default()), false)
}

#[test]
fn ort_gqa_prompt_lookup_answers_like_one_token_per_call() -> Result<()> {
    same_answers_with_and_without_lookup(BackendKind::Ort(OrtOptions::default()), true)
}

#[test]
fn tract_prompt_lookup_answers_like_one_token_per_call() -> Result<()> {
    same_answers_with_and_without_lookup(BackendKind::Tract, false)
}

#[test]
fn batched_evaluation_refuses_prompt_lookup_naming_the_batch() -> Result<()> {
    let tiny = steper_test_support::tiny()?;
    let qa = tiny.questions("dev")?;
    let engine = Engine::builder()
        .model_dir(&tiny.export)
        .backend(BackendKind::Ort(OrtOptions::default()))
        .index(&tiny.index)
        .build()?;
    let looked = engine
        .default_options()
        .with_prompt_lookup(Some(PromptLookup::default()));
    let e = evaluate_batched(&engine, &qa, &looked, &EvalOptions::default(), None, 2);
    assert!(
        matches!(&e, Err(Error::InvalidOption { option, .. }) if option == "batch"),
        "{:?}",
        e.map(|(s, _)| s.questions)
    );
    Ok(())
}

#[test]
fn an_engine_built_with_prompt_lookup_uses_it_by_default_and_refuses_a_bad_setting() -> Result<()> {
    let tiny = steper_test_support::tiny()?;
    let build = |pl: Option<PromptLookup>| {
        let b = Engine::builder()
            .model_dir(&tiny.export)
            .backend(BackendKind::Ort(OrtOptions::default()))
            .index(&tiny.index);
        match pl {
            Some(pl) => b.prompt_lookup(pl),
            None => b,
        }
        .build()
    };
    let plain = build(None)?;
    let looked = build(Some(PromptLookup::default()))?;
    assert_eq!(plain.default_options().prompt_lookup, None);
    assert_eq!(
        looked.default_options().prompt_lookup,
        Some(PromptLookup::default())
    );
    for q in tiny.questions("dev")?.iter().take(3) {
        let a = plain.reason(&q.question, &plain.default_options())?;
        let b = looked.reason(&q.question, &looked.default_options())?;
        assert_eq!(a.answer, b.answer, "{}", q.id);
        assert_eq!(a.sentences(), b.sentences(), "{}", q.id);
    }
    let e = build(Some(PromptLookup::with_max_draft(0)));
    assert!(
        matches!(&e, Err(Error::InvalidOption { option, .. }) if option == "prompt_lookup.max_draft"),
        "{:?}",
        e.map(|_| ())
    );
    Ok(())
}
