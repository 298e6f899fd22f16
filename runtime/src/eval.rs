//! Evaluation over a QA file: the loop on every question, per-question records and a summary;
//! [`evaluate_batched`] runs several questions at once with batched decoding ([`batched`]),
//! [`evaluate_parallel`] several such streams on their own threads and model sessions;
//! [`compare`] sets the records of several runs on the same questions side by side (paired
//! differences with bootstrap intervals and sign tests).

pub mod batched;
pub mod compare;

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::data::{AtomicWriter, QaExample};
use crate::engine::{Engine, ReasonOptions};
use crate::error::{Error, Result};
use crate::metrics::Scores;
use crate::progress::Progress;
use crate::reasoning::{Reasoning, StepTrace};

/// One evaluated question (a line of `results.jsonl`).
///
/// Only the id and the scores are required when reading: a record whose question, golds, token
/// counts, time or trace were left out (the compact per-question summaries an experiment commits)
/// reads with those empty or zero, so `steper-run compare` works on it unchanged.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalRecord {
    /// Question id.
    pub id: String,
    /// The question.
    #[serde(default)]
    pub question: String,
    /// The predicted answer (empty on error).
    pub prediction: String,
    /// Gold answers.
    #[serde(default)]
    pub golds: Vec<String>,
    /// Exact match.
    pub em: f64,
    /// Token F1.
    pub f1: f64,
    /// Gold contained in the prediction.
    pub acc: f64,
    /// Steps run.
    pub steps: usize,
    /// Whether the answer came from forced aggregation.
    pub forced: bool,
    /// Tokens generated.
    #[serde(default)]
    pub new_tokens: usize,
    /// Prompt tokens prefilled.
    #[serde(default)]
    pub prefilled_tokens: usize,
    /// Prompt tokens reused from the previous step.
    #[serde(default)]
    pub reused_tokens: usize,
    /// Wall time of the question in seconds.
    #[serde(default)]
    pub seconds: f64,
    /// The error, when the loop failed on this question (scored 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Per-step trace.
    #[serde(default)]
    pub trace: Vec<StepTrace>,
}

/// Totals over an evaluation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalSummary {
    /// Questions evaluated.
    pub questions: usize,
    /// Questions whose loop failed (scored 0).
    pub errors: usize,
    /// Mean exact match.
    pub em: f64,
    /// Mean token F1.
    pub f1: f64,
    /// Mean Acc.
    pub acc: f64,
    /// Mean steps per question.
    pub mean_steps: f64,
    /// Share of questions answered only by forced aggregation.
    pub forced_share: f64,
    /// Questions per second.
    pub questions_per_sec: f64,
    /// Generated tokens per second (decode throughput over the whole run).
    pub tokens_per_sec: f64,
    /// Generated tokens.
    pub new_tokens: usize,
    /// Prompt tokens prefilled.
    pub prefilled_tokens: usize,
    /// Prompt tokens reused.
    pub reused_tokens: usize,
    /// reused / (reused + prefilled).
    pub reuse_ratio: f64,
    /// Wall time in seconds.
    pub seconds: f64,
}

/// Options of [`evaluate`].
#[derive(Debug, Clone, Copy, Default)]
pub struct EvalOptions {
    /// Evaluate only the first `limit` questions.
    pub limit: Option<usize>,
    /// Show a progress bar on stderr.
    pub progress: bool,
}

/// Scores one reasoning result (or error) against its question.
pub fn record(q: &QaExample, result: Result<Reasoning>, seconds: f64) -> EvalRecord {
    match result {
        Ok(r) => {
            let s = Scores::of(&r.answer, &q.answers);
            EvalRecord {
                id: q.id.clone(),
                question: q.question.clone(),
                prediction: r.answer.clone(),
                golds: q.answers.clone(),
                em: s.em,
                f1: s.f1,
                acc: s.acc,
                steps: r.steps.len(),
                forced: r.forced,
                new_tokens: r.new_tokens(),
                prefilled_tokens: r.prefilled_tokens(),
                reused_tokens: r.reused_tokens(),
                seconds,
                error: None,
                trace: r.steps,
            }
        }
        Err(e) => EvalRecord {
            id: q.id.clone(),
            question: q.question.clone(),
            prediction: String::new(),
            golds: q.answers.clone(),
            em: 0.0,
            f1: 0.0,
            acc: 0.0,
            steps: 0,
            forced: false,
            new_tokens: 0,
            prefilled_tokens: 0,
            reused_tokens: 0,
            seconds,
            error: Some(e.to_string()),
            trace: Vec::new(),
        },
    }
}

/// The summary of `records` run in `seconds`.
pub fn summarize(records: &[EvalRecord], seconds: f64) -> EvalSummary {
    let n = records.len();
    let mean = |f: &dyn Fn(&EvalRecord) -> f64| {
        if n == 0 {
            0.0
        } else {
            records.iter().map(f).sum::<f64>() / n as f64
        }
    };
    let new_tokens: usize = records.iter().map(|r| r.new_tokens).sum();
    let prefilled: usize = records.iter().map(|r| r.prefilled_tokens).sum();
    let reused: usize = records.iter().map(|r| r.reused_tokens).sum();
    let secs = seconds.max(f64::EPSILON);
    EvalSummary {
        questions: n,
        errors: records.iter().filter(|r| r.error.is_some()).count(),
        em: mean(&|r| r.em),
        f1: mean(&|r| r.f1),
        acc: mean(&|r| r.acc),
        mean_steps: mean(&|r| r.steps as f64),
        forced_share: mean(&|r| if r.forced { 1.0 } else { 0.0 }),
        questions_per_sec: n as f64 / secs,
        tokens_per_sec: new_tokens as f64 / secs,
        new_tokens,
        prefilled_tokens: prefilled,
        reused_tokens: reused,
        reuse_ratio: if prefilled + reused == 0 {
            0.0
        } else {
            reused as f64 / (prefilled + reused) as f64
        },
        seconds,
    }
}

/// Runs `answer` on each question (up to `opts.limit`), writing one [`EvalRecord`] per line to
/// `out` (atomically: a temporary file renamed into place at the end) when given. A question
/// whose loop fails is recorded with its error and scored 0; I/O errors stop the run.
pub fn evaluate_with(
    examples: &[QaExample],
    opts: &EvalOptions,
    out: Option<&Path>,
    mut answer: impl FnMut(&QaExample) -> Result<Reasoning>,
) -> Result<(EvalSummary, Vec<EvalRecord>)> {
    let n = opts.limit.unwrap_or(examples.len()).min(examples.len());
    let mut writer = out.map(AtomicWriter::create).transpose()?;
    let bar = Progress::new(opts.progress, n as u64, "evaluating");
    let start = Instant::now();
    let mut records = Vec::with_capacity(n);
    for q in &examples[..n] {
        let t = Instant::now();
        let result = answer(q);
        let rec = record(q, result, t.elapsed().as_secs_f64());
        if let Some(w) = writer.as_mut() {
            w.write_row(&rec)?;
        }
        records.push(rec);
        bar.inc(1);
    }
    let seconds = start.elapsed().as_secs_f64();
    bar.finish_and_clear();
    if let Some(w) = writer {
        w.commit()?;
    }
    Ok((summarize(&records, seconds), records))
}

/// [`evaluate_with`] on an [`Engine`].
pub fn evaluate(
    engine: &Engine,
    examples: &[QaExample],
    options: &ReasonOptions,
    opts: &EvalOptions,
    out: Option<&Path>,
) -> Result<(EvalSummary, Vec<EvalRecord>)> {
    evaluate_with(examples, opts, out, |q| engine.reason(&q.question, options))
}

/// [`evaluate`] with up to `batch` questions in flight at once: their decode steps run as one
/// batched model call (see [`batched`]); prefill and KV reuse stay per question. Records come in
/// question order; each record's `seconds` is its question's wall time from when a slot took
/// it (questions overlap, so these add up to more than the run). `batch` 1 is [`evaluate`].
/// Greedy answers equal [`evaluate`]'s up to floating-point differences of the batched kernels.
pub fn evaluate_batched(
    engine: &Engine,
    examples: &[QaExample],
    options: &ReasonOptions,
    opts: &EvalOptions,
    out: Option<&Path>,
    batch: usize,
) -> Result<(EvalSummary, Vec<EvalRecord>)> {
    if batch == 1 {
        return evaluate(engine, examples, options, opts, out);
    }
    gather_in_order(examples, opts, out, |ex, sink| {
        batched::answer_batched(engine, ex, options, batch, |q, result, seconds| {
            sink(q, result, seconds);
            Ok(())
        })
    })
}

/// [`evaluate_batched`] on `workers` threads at once, each running its own stream of questions
/// (batch 1: the next unanswered question; batch N: every `workers`-th question, N in flight).
/// The engine needs one model session per worker to run them at the same time
/// ([`crate::BackendKind::with_concurrency`]); with fewer, workers wait for a free one. Records
/// come in question order and equal [`evaluate_batched`]'s (the same calls, on other threads).
pub fn evaluate_parallel(
    engine: &Engine,
    examples: &[QaExample],
    options: &ReasonOptions,
    opts: &EvalOptions,
    out: Option<&Path>,
    batch: usize,
    workers: usize,
) -> Result<(EvalSummary, Vec<EvalRecord>)> {
    at_least_one("workers", workers)?;
    if workers == 1 {
        return evaluate_batched(engine, examples, options, opts, out, batch);
    }
    at_least_one("batch", batch)?;
    gather_in_order(examples, opts, out, |ex, sink| {
        let next = AtomicUsize::new(0);
        std::thread::scope(|scope| {
            let handles: Vec<_> = (0..workers)
                .map(|w| {
                    let next = &next;
                    scope.spawn(move || -> Result<()> {
                        if batch == 1 {
                            loop {
                                let q = next.fetch_add(1, Ordering::Relaxed);
                                if q >= ex.len() {
                                    return Ok(());
                                }
                                let t = Instant::now();
                                let result = engine.reason(&ex[q].question, options);
                                sink(q, result, t.elapsed().as_secs_f64());
                            }
                        }
                        let mine: Vec<usize> = (w..ex.len()).step_by(workers).collect();
                        let rows: Vec<QaExample> = mine.iter().map(|&q| ex[q].clone()).collect();
                        batched::answer_batched(engine, &rows, options, batch, |i, result, s| {
                            sink(mine[i], result, s);
                            Ok(())
                        })
                    })
                })
                .collect();
            for h in handles {
                h.join().map_err(|_| Error::WorkerPanicked {
                    what: "an evaluation worker",
                })??;
            }
            Ok(())
        })
    })
}

/// An option that counts things in flight must be positive.
fn at_least_one(option: &str, n: usize) -> Result<()> {
    if n == 0 {
        return Err(Error::InvalidOption {
            option: option.into(),
            expected: "at least 1".into(),
            got: "0".into(),
        });
    }
    Ok(())
}

/// A sink that records one answered question by its index; callable from any thread.
type Sink<'a> = dyn Fn(usize, Result<Reasoning>, f64) + Sync + 'a;

/// Runs `run` over the first `opts.limit` questions, handing it a sink for their results in any
/// order; returns the records in question order (every question must be answered) and writes
/// them to `out` atomically.
fn gather_in_order(
    examples: &[QaExample],
    opts: &EvalOptions,
    out: Option<&Path>,
    run: impl FnOnce(&[QaExample], &Sink<'_>) -> Result<()>,
) -> Result<(EvalSummary, Vec<EvalRecord>)> {
    let n = opts.limit.unwrap_or(examples.len()).min(examples.len());
    let examples = &examples[..n];
    let writer = out.map(AtomicWriter::create).transpose()?;
    let bar = Progress::new(opts.progress, n as u64, "evaluating");
    let start = Instant::now();
    let slots: Mutex<Vec<Option<EvalRecord>>> = Mutex::new(vec![None; n]);
    let sink = |q: usize, result: Result<Reasoning>, seconds: f64| {
        let rec = record(&examples[q], result, seconds);
        slots.lock().unwrap_or_else(|p| p.into_inner())[q] = Some(rec);
        bar.inc(1);
    };
    run(examples, &sink)?;
    let seconds = start.elapsed().as_secs_f64();
    bar.finish_and_clear();
    let records = slots
        .into_inner()
        .unwrap_or_else(|p| p.into_inner())
        .into_iter()
        .enumerate()
        .map(|(q, r)| {
            r.ok_or_else(|| Error::Internal(format!("evaluation left question {q} unanswered")))
        })
        .collect::<Result<Vec<_>>>()?;
    if let Some(mut w) = writer {
        for r in &records {
            w.write_row(r)?;
        }
        w.commit()?;
    }
    Ok((summarize(&records, seconds), records))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(id: &str, answers: &[&str]) -> QaExample {
        QaExample {
            id: id.into(),
            dataset: "t".into(),
            question: format!("question {id}?"),
            answers: answers.iter().map(|s| s.to_string()).collect(),
            kind: None,
            paragraphs: Vec::new(),
            supporting_titles: None,
            extra: Default::default(),
        }
    }

    fn reasoning(answer: &str) -> Reasoning {
        Reasoning {
            question: "q".into(),
            answer: answer.into(),
            forced: false,
            steps: Vec::new(),
            passages: Vec::new(),
            framework: Default::default(),
        }
    }

    #[test]
    fn records_and_summary() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::io("tmp", e))?;
        let out = dir.path().join("results.jsonl");
        let qs = [q("a", &["Paris"]), q("b", &["New York"]), q("c", &["x"])];
        let (s, recs) = evaluate_with(&qs, &EvalOptions::default(), Some(&out), |q| {
            match q.id.as_str() {
                "a" => Ok(reasoning("paris.")),
                "b" => Ok(reasoning("New York City")),
                _ => Err(Error::ContextOverflow {
                    tokens: 9,
                    budget: 3,
                }),
            }
        })?;
        assert_eq!(s.questions, 3);
        assert_eq!(s.errors, 1);
        assert!((s.em - 1.0 / 3.0).abs() < 1e-12);
        assert!((s.acc - 2.0 / 3.0).abs() < 1e-12);
        assert!((s.f1 - (1.0 + 0.8) / 3.0).abs() < 1e-12);
        assert!(recs[2]
            .error
            .as_deref()
            .is_some_and(|e| e.contains("too long")));
        let back = crate::data::read_jsonl::<EvalRecord>(&out, Default::default())?;
        assert_eq!(back.rows, recs);
        let (s, _) = evaluate_with(
            &qs,
            &EvalOptions {
                limit: Some(1),
                progress: false,
            },
            None,
            |_| Ok(reasoning("Paris")),
        )?;
        assert_eq!((s.questions, s.em), (1, 1.0));
        Ok(())
    }
}
