//! IRCoT through the loop: stopping, forced aggregation, observers, cancellation, fitting.

use std::collections::HashSet;

use super::super::{reason, reason_with, LoopOptions};
use super::{scripted, ListRetriever};
use crate::data::Stage;
use crate::error::{Error, Result};

#[test]
fn stops_on_the_answer() -> Result<()> {
    let r = ListRetriever::new(20);
    let mut m = scripted(vec![
        " Doc 3 is about text. Extra sentence.",
        " So the answer is: Title 3.",
        " never reached.",
    ]);
    let out = reason("Which doc?", &r, &mut m, &LoopOptions::default())?;
    assert_eq!(out.answer, "Title 3");
    assert!(!out.forced);
    assert_eq!(out.steps.len(), 2);
    assert_eq!(out.steps[0].stage, Stage::Init);
    assert_eq!(out.steps[0].sentence, "Doc 3 is about text.");
    assert_eq!(out.steps[1].stage, Stage::Aggregate);
    assert_eq!(out.steps[1].query, "Doc 3 is about text.");
    assert_eq!(out.sentences(), vec!["Doc 3 is about text.".to_string()]);
    // The second prompt appends passages and the first sentence.
    assert!(m.prompts[1]
        .2
        .ends_with("Q: Which doc?\nA: Doc 3 is about text."));
    assert_eq!(out.passages.len(), 8);
    Ok(())
}

#[test]
fn the_observer_sees_every_step_as_it_finishes_and_can_stop_the_run() -> Result<()> {
    use crate::control::{Cancel, LoopControl, StepObserver};
    use std::ops::ControlFlow;
    use std::sync::{Arc, Mutex};
    let r = ListRetriever::new(20);
    let lines = vec![
        " Doc 3 is about text.",
        " Doc 5 is too.",
        " So the answer is: Title 3.",
    ];
    let seen: Arc<Mutex<Vec<(usize, String, usize)>>> = Arc::default();
    let log = Arc::clone(&seen);
    let control = LoopControl {
        cancel: Some(Cancel::new()),
        observer: Some(StepObserver::new(move |t, held| {
            log.lock()
                .unwrap()
                .push((t.step, t.sentence.clone(), held.len()));
            ControlFlow::Continue(())
        })),
    };
    let mut m = scripted(lines.clone());
    let out = reason_with("Which doc?", &r, &mut m, &LoopOptions::default(), &control)?;
    let seen = seen.lock().unwrap().clone();
    let expected: Vec<(usize, String, usize)> = out
        .steps
        .iter()
        .map(|t| (t.step, t.sentence.clone(), t.held))
        .collect();
    assert_eq!(
        seen, expected,
        "one report per step, in order, with the held passages"
    );
    assert_eq!(out.answer, "Title 3");

    // Break after the first step: the run stops there with Cancelled.
    let stop = LoopControl {
        cancel: None,
        observer: Some(StepObserver::new(|_, _| ControlFlow::Break(()))),
    };
    let mut m = scripted(lines.clone());
    let err = reason_with("Which doc?", &r, &mut m, &LoopOptions::default(), &stop);
    assert!(matches!(err, Err(Error::Cancelled)), "{err:?}");
    assert_eq!(m.prompts.len(), 1);
    Ok(())
}

#[test]
fn a_cancelled_or_expired_token_stops_the_loop_before_the_next_model_call() -> Result<()> {
    use crate::control::{Cancel, LoopControl};
    let r = ListRetriever::new(20);
    let cancel = Cancel::new();
    cancel.cancel();
    let control = LoopControl {
        cancel: Some(cancel),
        observer: None,
    };
    let mut m = scripted(vec![" So the answer is: Title 3."]);
    let err = reason_with("Which doc?", &r, &mut m, &LoopOptions::default(), &control);
    assert!(matches!(err, Err(Error::Cancelled)), "{err:?}");
    assert!(m.prompts.is_empty(), "no model call after cancellation");

    let expired = LoopControl {
        cancel: Some(Cancel::with_deadline(std::time::Instant::now())),
        observer: None,
    };
    let err = reason_with("Which doc?", &r, &mut m, &LoopOptions::default(), &expired);
    assert!(
        matches!(err, Err(Error::DeadlineExceeded { .. })),
        "{err:?}"
    );
    assert!(m.prompts.is_empty());

    // the empty question is its own error, not a message to match
    let err = reason("  ", &r, &mut m, &LoopOptions::default());
    assert!(matches!(err, Err(Error::EmptyQuestion)), "{err:?}");
    Ok(())
}

#[test]
fn forces_aggregation_at_max_steps_and_never_re_retrieves() -> Result<()> {
    let r = ListRetriever::new(40);
    let mut m = scripted(vec![
        " What is doc 1?",
        " Therefore doc 2 matters.",
        " Doc 4.",
        " Doc 5.",
        " Title 9. trailing",
    ]);
    let opts = LoopOptions::default();
    let out = reason("Which doc?", &r, &mut m, &opts)?;
    assert_eq!(out.steps.len(), 5);
    assert!(out.forced);
    assert_eq!(out.answer, "Title 9");
    assert_eq!(out.steps[4].sentence, "So the answer is: Title 9.");
    assert_eq!(out.steps[4].stage, Stage::Aggregate);
    assert!(m.prompts[4].1);
    assert!(m.prompts[4]
        .2
        .ends_with("A: What is doc 1? Therefore doc 2 matters. Doc 4. Doc 5. So the answer is:"));
    assert!(m.prompts[..4].iter().all(|p| !p.1));
    // Cleaned queries.
    assert_eq!(out.steps[1].query, "is doc 1?");
    assert_eq!(out.steps[2].query, "doc 2 matters.");
    // 4 + 4 + 4 + 3 = 15 (the cap), nothing at step 5.
    let per_step: Vec<usize> = out.steps.iter().map(|s| s.retrieved.len()).collect();
    assert_eq!(per_step, vec![4, 4, 4, 3, 0]);
    let ids: Vec<&str> = out.passages.iter().map(|p| p.id.as_str()).collect();
    let unique: HashSet<&str> = ids.iter().copied().collect();
    assert_eq!(unique.len(), ids.len());
    // Each call excluded everything held before it.
    let calls = r
        .calls
        .lock()
        .map_err(|_| Error::Internal("poisoned".into()))?;
    assert_eq!(calls.len(), 4);
    for (i, (_, k, excl)) in calls.iter().enumerate() {
        assert_eq!(excl.len(), 4 * i);
        assert_eq!(*k, if i == 3 { 3 } else { 4 });
    }
    // Step-wise records: stages and P_≤s / R_<s.
    let recs = out.stepwise_records("q1", &["Title 9".into()], "scripted");
    let stages: Vec<Stage> = recs.iter().map(|r| r.stage).collect();
    assert_eq!(
        stages,
        vec![
            Stage::Init,
            Stage::Expand,
            Stage::Expand,
            Stage::Expand,
            Stage::Aggregate
        ]
    );
    assert_eq!(recs[2].passages.len(), 12);
    assert_eq!(recs[2].reasoning.len(), 2);
    assert_eq!(recs[4].target, "So the answer is: Title 9.");
    Ok(())
}

#[test]
fn prompts_are_fitted_and_too_long_questions_fail() -> Result<()> {
    let r = ListRetriever::new(8);
    let mut m = scripted(vec![" So the answer is: x."]);
    m.budget = Some(20);
    let out = reason("Which doc?", &r, &mut m, &LoopOptions::default())?;
    assert!(out.steps[0].truncated);
    assert!(out.steps[0].prompt_tokens <= 20);
    let mut m = scripted(vec![" So the answer is: x."]);
    m.budget = Some(3);
    let long = "word ".repeat(50);
    assert!(matches!(
        reason(&long, &r, &mut m, &LoopOptions::default()),
        Err(Error::ContextOverflow { .. })
    ));
    Ok(())
}
