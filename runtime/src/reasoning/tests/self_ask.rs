//! Self-Ask through the loop: the sub-questions are the queries, the stages are IRCoT's, what is
//! not the format forces the aggregation, and the generator step model's KV reuse changes no
//! answer.

use std::ops::ControlFlow;
use std::sync::{Arc, Mutex};

use super::super::{
    reason, reason_with, Framework, GeneratorStepModel, LoopOptions, Reasoning, StepModel,
    StepOutput, StepRequest,
};
use super::{hash_lm, loop_tokenizer, ListRetriever};
use crate::control::{LoopControl, StepObserver};
use crate::data::Stage;
use crate::error::Result;

/// Answers from a script, one entry per generation (a Self-Ask step asks twice); records the
/// requests.
struct Generations {
    outputs: Vec<&'static str>,
    requests: Vec<(usize, bool, String)>,
}

impl StepModel for Generations {
    fn name(&self) -> &str {
        "generations"
    }
    fn prompt_budget(&self, _: usize) -> Option<usize> {
        None
    }
    fn count_tokens(&self, text: &str) -> Result<usize> {
        Ok(text.split_whitespace().count())
    }
    fn generate(&mut self, req: &StepRequest<'_>) -> Result<StepOutput> {
        let text = self
            .outputs
            .get(self.requests.len())
            .copied()
            .unwrap_or("x.");
        self.requests
            .push((req.step, req.forced, req.prompt.to_string()));
        Ok(StepOutput {
            text: text.to_string(),
            new_tokens: text.split_whitespace().count(),
            ..StepOutput::default()
        })
    }
}

fn generations(outputs: Vec<&'static str>) -> Generations {
    Generations {
        outputs,
        requests: Vec::new(),
    }
}

fn self_ask() -> LoopOptions {
    LoopOptions::default().with_framework(Framework::SelfAsk)
}

fn queries(r: &Reasoning) -> Vec<&str> {
    r.steps.iter().map(|s| s.query.as_str()).collect()
}

fn stages(r: &Reasoning) -> Vec<Stage> {
    r.steps.iter().map(|s| s.stage).collect()
}

#[test]
fn a_self_ask_run_retrieves_for_each_sub_question() -> Result<()> {
    let r = ListRetriever::new(20);
    let mut m = generations(vec![
        "Follow up: Which doc is 3?",
        " Title 3.",
        "Follow up: Which doc is 5?",
        " Title 5.",
        "So the final answer is: Title 5.",
    ]);
    let seen: Arc<Mutex<Vec<(usize, Stage)>>> = Arc::default();
    let log = Arc::clone(&seen);
    let control = LoopControl {
        cancel: None,
        observer: Some(StepObserver::new(move |t, _| {
            if let Ok(mut l) = log.lock() {
                l.push((t.step, t.stage));
            }
            ControlFlow::Continue(())
        })),
    };
    let out = reason_with("Which doc?", &r, &mut m, &self_ask(), &control)?;
    assert_eq!(out.answer, "Title 5");
    assert!(!out.forced);
    assert_eq!(queries(&out), ["Which doc is 3?", "Which doc is 5?", ""]);
    assert_eq!(stages(&out), [Stage::Init, Stage::Expand, Stage::Aggregate]);
    let hop1 = "Follow up: Which doc is 3?\nIntermediate answer: Title 3.";
    let hop2 = "Follow up: Which doc is 5?\nIntermediate answer: Title 5.";
    assert_eq!(out.sentences(), [hop1, hop2]);
    assert_eq!(out.steps[2].sentence, "So the final answer is: Title 5.");
    // The retriever saw the sub-questions only, excluding what was held.
    let calls = r.calls.lock().map(|c| c.clone()).unwrap_or_default();
    let asked: Vec<(&str, usize)> = calls.iter().map(|c| (c.0.as_str(), c.2.len())).collect();
    assert_eq!(asked, [("Which doc is 3?", 0), ("Which doc is 5?", 4)]);
    let held: Vec<usize> = out.steps.iter().map(|s| s.held).collect();
    assert_eq!(held, [4, 8, 8]);
    assert!(out.steps[0].retrieved.iter().any(|p| p.id == "d3"));
    // Two generations per hop, one for the final answer, numbered by step.
    let steps: Vec<(usize, bool)> = m.requests.iter().map(|r| (r.0, r.1)).collect();
    assert_eq!(
        steps,
        [(1, false), (1, false), (2, false), (2, false), (3, false)]
    );
    let prompts: Vec<&str> = m.requests.iter().map(|r| r.2.as_str()).collect();
    assert!(
        prompts[0].ends_with("Question: Which doc?\nAre follow up questions needed here: Yes.\n")
    );
    assert!(!prompts[0].contains("Wikipedia Title"), "{}", prompts[0]);
    assert!(prompts[1].ends_with("Yes.\nFollow up: Which doc is 3?\nIntermediate answer:"));
    assert!(prompts[1].contains("Wikipedia Title: Title 3\n"));
    assert!(prompts[2].ends_with(&format!("Yes.\n{hop1}\n")));
    assert!(prompts[4].ends_with(&format!("Yes.\n{hop1}\n{hop2}\n")));
    // One report per step, not per generation.
    let seen = seen.lock().map(|s| s.clone()).unwrap_or_default();
    assert_eq!(
        seen,
        [(1, Stage::Init), (2, Stage::Expand), (3, Stage::Aggregate)]
    );
    // Records: P_≤s, R_<s and the step's sentence, stages as IRCoT's.
    let recs = out.stepwise_records("q", &["Title 5".into()], "generations");
    assert_eq!(recs.len(), 3);
    assert_eq!(recs[1].passages.len(), 8);
    assert_eq!(recs[1].reasoning, [hop1]);
    assert_eq!(recs[1].target, hop2);
    assert_eq!(recs[2].reasoning, [hop1, hop2]);
    // The record's prompt and target give back the text the model saw and wrote.
    let layout = crate::prompt::PromptLayout::Plain;
    let rendered = layout.render_for(
        Framework::SelfAsk,
        &recs[2].question,
        &recs[2].passages,
        &recs[2].reasoning,
        100,
        None,
    )?;
    assert_eq!(rendered, prompts[4]);
    Ok(())
}

#[test]
fn output_that_is_not_the_format_forces_the_answer() -> Result<()> {
    // Garbage where a follow-up is asked for: the same step is forced.
    let r = ListRetriever::new(20);
    let mut m = generations(vec![
        "Follow up: Which doc is 3?",
        " Title 3.",
        "Hmm, let me think.",
        " Title 3.",
    ]);
    let out = reason("Which doc?", &r, &mut m, &self_ask())?;
    assert!(out.forced);
    assert_eq!(out.answer, "Title 3");
    assert_eq!(stages(&out), [Stage::Init, Stage::Aggregate]);
    assert_eq!(out.steps[1].sentence, "So the final answer is: Title 3.");
    assert_eq!(out.steps[1].step, 2);
    assert!(m.requests[3].1, "the fourth generation is forced");
    assert!(m.requests[3]
        .2
        .ends_with("Intermediate answer: Title 3.\nSo the final answer is:"));
    assert_eq!(out.steps[1].new_tokens, 4 + 2, "both generations of step 2");

    // No answer where one is expected: forced at that step, its retrieval kept.
    let r = ListRetriever::new(20);
    let mut m = generations(vec!["Follow up: Which doc is 4?", "  ", " Title 4."]);
    let out = reason("Which doc?", &r, &mut m, &self_ask())?;
    assert!(out.forced);
    assert_eq!((out.steps.len(), out.answer.as_str()), (1, "Title 4"));
    assert_eq!(out.steps[0].stage, Stage::Aggregate);
    assert_eq!(out.steps[0].query, "Which doc is 4?");
    assert_eq!(out.steps[0].retrieved.len(), 4);

    // An empty final answer is not the format either.
    let mut m = generations(vec!["So the final answer is:", " Title 1."]);
    let out = reason("Which doc?", &ListRetriever::new(20), &mut m, &self_ask())?;
    assert!(out.forced);
    assert_eq!(out.answer, "Title 1");
    // The forced step held nothing yet: it retrieved with the question.
    assert_eq!(out.steps[0].query, "Which doc?");
    Ok(())
}

#[test]
fn the_last_step_is_forced_and_a_final_answer_may_share_the_answer_line() -> Result<()> {
    let r = ListRetriever::new(20);
    let opts = self_ask().with_max_steps(2);
    let mut m = generations(vec!["Follow up: Which doc is 3?", " Title 3.", " Title 3."]);
    let out = reason("Which doc?", &r, &mut m, &opts)?;
    assert!(out.forced);
    assert_eq!(stages(&out), [Stage::Init, Stage::Aggregate]);
    assert_eq!(
        out.steps[1].query, "",
        "nothing to retrieve at the forced step"
    );
    assert_eq!(m.requests.len(), 3);

    let mut m = generations(vec![
        "follow-up Which doc is 3?",
        " Intermediate answer: Title 3. So the final answer is: Title 3.",
    ]);
    let out = reason("Which doc?", &r, &mut m, &self_ask())?;
    assert!(!out.forced);
    assert_eq!(out.answer, "Title 3");
    assert_eq!(out.steps.len(), 1);
    assert_eq!(out.steps[0].stage, Stage::Aggregate);
    assert_eq!(
        out.steps[0].sentence,
        "Follow up: Which doc is 3?\nIntermediate answer: Title 3.\nSo the final answer is: Title 3."
    );
    Ok(())
}

/// Asks scripted follow-ups and lets the wrapped model answer them (and the forced final
/// answer), so that a fake LM runs Self-Ask's hops.
struct ScriptedAsks<M> {
    inner: M,
    asks: Vec<&'static str>,
    asked: usize,
}

impl<M: StepModel> StepModel for ScriptedAsks<M> {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn prompt_budget(&self, n: usize) -> Option<usize> {
        self.inner.prompt_budget(n)
    }
    fn count_tokens(&self, text: &str) -> Result<usize> {
        self.inner.count_tokens(text)
    }
    fn begin_question(&mut self, question: &str) -> Result<()> {
        self.asked = 0;
        self.inner.begin_question(question)
    }
    fn generate(&mut self, req: &StepRequest<'_>) -> Result<StepOutput> {
        // The model runs every generation (its cache is what the next one reuses); an asking
        // generation's text is replaced by the script's follow-up.
        let mut out = self.inner.generate(req)?;
        if !req.forced && req.prompt.ends_with('\n') {
            out.text = self.asks.get(self.asked).copied().unwrap_or("").to_string();
            self.asked += 1;
        }
        Ok(out)
    }
}

#[test]
fn generator_step_model_reuse_gives_the_answers_of_re_prefilling() -> Result<()> {
    let tok = loop_tokenizer()?;
    let lm = hash_lm(&tok)?;
    let r = ListRetriever::new(20);
    let asks = vec![
        "Follow up: Which doc of 3 ?",
        "Follow up: Which text of 5 ?",
    ];
    let mut runs = Vec::new();
    for reuse in [true, false] {
        let mut m = ScriptedAsks {
            inner: GeneratorStepModel::new(&lm, &tok, &[lm.eos]).with_kv_reuse(reuse),
            asks: asks.clone(),
            asked: 0,
        };
        runs.push(reason("Which doc ?", &r, &mut m, &self_ask())?);
    }
    let (a, b) = (&runs[0], &runs[1]);
    assert_eq!(a.answer, b.answer);
    assert_eq!(a.sentences(), b.sentences());
    assert_eq!(queries(a), ["Which doc of 3 ?", "Which text of 5 ?", ""]);
    assert_eq!(stages(a), [Stage::Init, Stage::Expand, Stage::Aggregate]);
    assert!(
        a.forced,
        "the script asks no more: the third step is forced"
    );
    assert_eq!(b.reused_tokens(), 0);
    assert!(a.reused_tokens() > 0);
    assert_eq!(
        a.prefilled_tokens() + a.reused_tokens(),
        b.prefilled_tokens(),
        "same prompts either way"
    );
    Ok(())
}
