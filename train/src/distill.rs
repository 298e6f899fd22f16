//! `steper-train distill`: runs a teacher through the runtime's reasoning loop on every question
//! and writes the full traces and the step-wise records (docs/DESIGN.md, "Files on disk").
//!
//! Output directory:
//! - `traces.jsonl` — one line per question: qid, question, golds, the teacher's answer, whether
//!   it passed the filter, and the full loop trace. A question's line is written after its
//!   records, so it marks the question as done.
//! - `stepwise.jsonl` — the step-wise records of the questions that passed.
//! - `vanilla.jsonl` — with `vanilla`: one Vanilla-KD record per passing question.
//! - `summary.json` — counts, speeds and the prompt format.
//!
//! Resumable: on restart the questions already in `traces.jsonl` are skipped and records of an
//! unfinished question (killed between its records and its trace line) are dropped first.

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use steper_runtime::data::{QaExample, Stage, StepwiseRecord};
use steper_runtime::metrics::{accuracy, exact_match};
use steper_runtime::retrieval::Retriever;
use steper_runtime::{reason, LoopOptions, Reasoning, StepModel};

use crate::error::{Error, Result};

/// Which correctness test a teacher answer must pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Filter {
    /// Normalized exact match with a gold answer.
    Em,
    /// A normalized gold answer is contained in the normalized prediction.
    Acc,
    /// Keep everything.
    None,
}

/// Settings of a distillation run.
#[derive(Debug, Clone)]
pub struct DistillOptions {
    /// The loop settings (top-k 4, max steps 5, ...).
    pub loop_opts: LoopOptions,
    /// Answer filter.
    pub filter: Filter,
    /// Also write Vanilla-KD records.
    pub vanilla: bool,
    /// Stop after this many questions in this process (for time-boxed runs; resumable).
    pub stop_after: Option<usize>,
}

/// One line of `traces.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TraceLine {
    /// Question id.
    pub qid: String,
    /// The question.
    pub question: String,
    /// Gold answers.
    pub answers: Vec<String>,
    /// The teacher's final answer.
    pub prediction: String,
    /// Whether it passed the filter.
    pub passed: bool,
    /// The loop trace.
    pub trace: Reasoning,
}

/// Counts of a run (all questions in the output, including earlier runs).
#[derive(Debug, Clone, Serialize, Default)]
pub struct DistillSummary {
    /// Questions with a trace.
    pub questions: usize,
    /// Questions that passed the filter.
    pub passed: usize,
    /// Share that passed.
    pub pass_rate: f64,
    /// Records per stage: init, expand, aggregate.
    pub records: [usize; 3],
    /// Vanilla records.
    pub vanilla_records: usize,
    /// Mean loop steps.
    pub mean_steps: f64,
    /// Teacher tokens generated per second in this process.
    pub teacher_tokens_per_sec: f64,
    /// Questions done in this process.
    pub new_questions: usize,
    /// Seconds of this process.
    pub seconds: f64,
    /// How the teacher was prompted (`plain` or `chat`): the loop's layout, or for a teacher
    /// that applies a chat template itself (an OpenAI-compatible server's
    /// `/v1/chat/completions`), the format its caller records.
    pub prompt_format: steper_runtime::prompt::PromptFormat,
    /// The framework the loop ran (left out for IRCoT).
    #[serde(skip_serializing_if = "steper_runtime::Framework::is_ircot")]
    pub framework: steper_runtime::Framework,
    /// Questions of the input not run: for the Self-Ask gold teacher, those without a usable
    /// decomposition (left out when none).
    #[serde(skip_serializing_if = "is_zero")]
    pub skipped_questions: usize,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

const TRACES: &str = "traces.jsonl";
const STEPWISE: &str = "stepwise.jsonl";
const VANILLA: &str = "vanilla.jsonl";

fn io(path: &Path, e: std::io::Error) -> Error {
    Error::Io {
        path: path.to_path_buf(),
        source: e,
    }
}

/// Keeps the complete lines of `path` for which `keep` holds (drops a torn last line).
fn rewrite_lines(path: &Path, keep: impl Fn(&str) -> bool) -> Result<Vec<String>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(io(path, e)),
    };
    let complete = if text.ends_with('\n') {
        &text[..]
    } else {
        &text[..text.rfind('\n').map(|i| i + 1).unwrap_or(0)]
    };
    let lines: Vec<String> = complete
        .lines()
        .filter(|l| !l.trim().is_empty() && keep(l))
        .map(|l| l.to_string())
        .collect();
    let mut out = lines.join("\n");
    if !out.is_empty() {
        out.push('\n');
    }
    steper_fsutil::write_atomic(path, out.as_bytes())?;
    Ok(lines)
}

fn qid_of(line: &str) -> Option<String> {
    serde_json::from_str::<serde_json::Value>(line)
        .ok()?
        .get("qid")?
        .as_str()
        .map(|s| s.to_string())
}

/// The Vanilla-KD record of a trace: Q + P_≤S → the whole reasoning and the answer sentence.
pub fn vanilla_record(
    qid: &str,
    answers: &[String],
    teacher: &str,
    r: &Reasoning,
) -> Option<StepwiseRecord> {
    let last = r.steps.last()?;
    let target = r
        .steps
        .iter()
        .map(|s| s.sentence.trim().to_string())
        .collect::<Vec<_>>()
        // IRCoT's sentences run on as one paragraph; Self-Ask's hops are lines.
        .join(match r.framework {
            steper_runtime::Framework::Ircot => " ",
            steper_runtime::Framework::SelfAsk => "\n",
        });
    Some(StepwiseRecord {
        qid: qid.to_string(),
        stage: Stage::Aggregate,
        step: last.step,
        question: r.question.clone(),
        passages: r
            .passages
            .iter()
            .map(|p| steper_runtime::data::PromptPassage {
                title: p.title.clone(),
                text: p.text.clone(),
            })
            .collect(),
        reasoning: Vec::new(),
        target,
        teacher: teacher.to_string(),
        answers: answers.to_vec(),
        framework: r.framework,
    })
}

/// Whether `prediction` passes `filter` for `golds`.
pub fn passes(filter: Filter, prediction: &str, golds: &[String]) -> bool {
    match filter {
        Filter::Em => exact_match(prediction, golds) > 0.0,
        Filter::Acc => accuracy(prediction, golds) > 0.0,
        Filter::None => true,
    }
}

/// Runs the distillation of `questions` into `out`. `prepare` is called with each question
/// before the loop runs (the gold teacher reads its annotations there).
pub fn distill<M: StepModel + Send>(
    questions: &[QaExample],
    retriever: &dyn Retriever,
    teacher: &mut M,
    prepare: impl Fn(&mut M, &QaExample) + Sync,
    opts: &DistillOptions,
    out: &Path,
    progress: bool,
) -> Result<DistillSummary> {
    distill_pool(
        questions,
        retriever,
        std::slice::from_mut(teacher),
        prepare,
        opts,
        out,
        progress,
    )
}

/// [`distill`] with one question in flight per teacher of `teachers` (each question's loop runs
/// on one teacher, step after step). Results are written in question order, so the files equal
/// those of a one-teacher run and a killed run resumes the same way: a question's lines are
/// written only after every earlier question's.
pub fn distill_pool<M: StepModel + Send>(
    questions: &[QaExample],
    retriever: &dyn Retriever,
    teachers: &mut [M],
    prepare: impl Fn(&mut M, &QaExample) + Sync,
    opts: &DistillOptions,
    out: &Path,
    progress: bool,
) -> Result<DistillSummary> {
    if teachers.is_empty() {
        return Err(Error::Input(
            "distill needs at least one teacher (concurrency ≥ 1)".into(),
        ));
    }
    std::fs::create_dir_all(out).map_err(|e| io(out, e))?;
    let traces_path = out.join(TRACES);
    let done_lines = rewrite_lines(&traces_path, |l| {
        serde_json::from_str::<TraceLine>(l).is_ok()
    })?;
    let done: HashSet<String> = done_lines.iter().filter_map(|l| qid_of(l)).collect();
    let step_path = out.join(STEPWISE);
    rewrite_lines(&step_path, |l| {
        qid_of(l).map(|q| done.contains(&q)).unwrap_or(false)
    })?;
    let van_path = out.join(VANILLA);
    if opts.vanilla {
        rewrite_lines(&van_path, |l| {
            qid_of(l).map(|q| done.contains(&q)).unwrap_or(false)
        })?;
    }
    let open = |p: &PathBuf| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
            .map_err(|e| io(p, e))
    };
    let mut writer = Writer {
        traces: open(&traces_path)?,
        traces_path,
        steps: open(&step_path)?,
        steps_path: step_path,
        vanilla: if opts.vanilla {
            Some(open(&van_path)?)
        } else {
            None
        },
        vanilla_path: van_path,
        filter: opts.filter,
    };

    let mut todo: Vec<&QaExample> = questions.iter().filter(|q| !done.contains(&q.id)).collect();
    if let Some(n) = opts.stop_after {
        todo.truncate(n);
    }
    let bar = if progress {
        let b = indicatif::ProgressBar::new(questions.len() as u64);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{elapsed_precise} [{bar:30}] {pos}/{len} {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b.set_position(done.len() as u64);
        b
    } else {
        indicatif::ProgressBar::hidden()
    };
    let t0 = std::time::Instant::now();
    let mut new_tokens = 0usize;
    let mut new_questions = 0usize;
    let mut passed_now = 0usize;
    let mut record = |q: &QaExample, r: Reasoning, name: &str| -> Result<()> {
        new_tokens += r.new_tokens();
        passed_now += writer.write(q, r, name)? as usize;
        new_questions += 1;
        bar.inc(1);
        bar.set_message(format!(
            "pass rate {:.1}%",
            100.0 * passed_now as f64 / new_questions as f64
        ));
        Ok(())
    };
    if teachers.len() == 1 {
        let teacher = &mut teachers[0];
        for q in todo {
            prepare(teacher, q);
            let r = reason(&q.question, retriever, teacher, &opts.loop_opts)?;
            record(q, r, teacher.name())?;
        }
    } else {
        run_pool(&todo, retriever, teachers, &prepare, opts, &mut record)?;
    }
    bar.finish_and_clear();
    let seconds = t0.elapsed().as_secs_f64();
    let mut s = summarize(out, opts.vanilla)?;
    s.new_questions = new_questions;
    s.seconds = seconds;
    s.teacher_tokens_per_sec = new_tokens as f64 / seconds.max(1e-9);
    s.prompt_format = opts.loop_opts.prompt.format();
    write_summary(out, &s)?;
    Ok(s)
}

/// Writes `summary.json` into the output directory `out`.
pub fn write_summary(out: &Path, s: &DistillSummary) -> Result<()> {
    let text = serde_json::to_string_pretty(s).map_err(|e| Error::Input(e.to_string()))?;
    steper_fsutil::write_atomic(&out.join("summary.json"), text.as_bytes())?;
    Ok(())
}

/// Workers take the next question index; the calling thread hands results to `record` in
/// question order. The first error stops the workers (questions already recorded stay written).
fn run_pool<M: StepModel + Send>(
    todo: &[&QaExample],
    retriever: &dyn Retriever,
    teachers: &mut [M],
    prepare: &(impl Fn(&mut M, &QaExample) + Sync),
    opts: &DistillOptions,
    record: &mut impl FnMut(&QaExample, Reasoning, &str) -> Result<()>,
) -> Result<()> {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let next = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let name = teachers[0].name().to_string();
    std::thread::scope(|scope| -> Result<()> {
        let (tx, rx) = std::sync::mpsc::channel::<(usize, steper_runtime::Result<Reasoning>)>();
        for teacher in teachers.iter_mut() {
            let tx = tx.clone();
            let (next, stop) = (&next, &stop);
            scope.spawn(move || loop {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(q) = todo.get(i) else { break };
                prepare(teacher, q);
                let r = reason(&q.question, retriever, teacher, &opts.loop_opts);
                let failed = r.is_err();
                if tx.send((i, r)).is_err() || failed {
                    break;
                }
            });
        }
        drop(tx);
        let mut pending = std::collections::BTreeMap::new();
        let mut want = 0usize;
        for (i, r) in rx {
            pending.insert(i, r);
            while let Some(r) = pending.remove(&want) {
                let res = r
                    .map_err(Error::from)
                    .and_then(|r| record(todo[want], r, &name));
                if let Err(e) = res {
                    stop.store(true, Ordering::Relaxed);
                    return Err(e);
                }
                want += 1;
            }
        }
        Ok(())
    })
}

/// The output files of a run.
struct Writer {
    traces: std::fs::File,
    traces_path: PathBuf,
    steps: std::fs::File,
    steps_path: PathBuf,
    vanilla: Option<std::fs::File>,
    vanilla_path: PathBuf,
    filter: Filter,
}

impl Writer {
    /// Writes one question: its records (when it passed), then its trace line, which marks it
    /// done. Returns whether it passed.
    fn write(&mut self, q: &QaExample, r: Reasoning, teacher: &str) -> Result<bool> {
        let ok = passes(self.filter, &r.answer, &q.answers);
        if ok {
            let mut buf = String::new();
            for rec in r.stepwise_records(&q.id, &q.answers, teacher) {
                buf.push_str(
                    &serde_json::to_string(&rec).map_err(|e| Error::Input(e.to_string()))?,
                );
                buf.push('\n');
            }
            self.steps
                .write_all(buf.as_bytes())
                .map_err(|e| io(&self.steps_path, e))?;
            self.steps.flush().map_err(|e| io(&self.steps_path, e))?;
            if let (Some(f), Some(rec)) = (
                self.vanilla.as_mut(),
                vanilla_record(&q.id, &q.answers, teacher, &r),
            ) {
                let mut line =
                    serde_json::to_string(&rec).map_err(|e| Error::Input(e.to_string()))?;
                line.push('\n');
                f.write_all(line.as_bytes())
                    .map_err(|e| io(&self.vanilla_path, e))?;
                f.flush().map_err(|e| io(&self.vanilla_path, e))?;
            }
        }
        let line = TraceLine {
            qid: q.id.clone(),
            question: q.question.clone(),
            answers: q.answers.clone(),
            prediction: r.answer.clone(),
            passed: ok,
            trace: r,
        };
        let mut text = serde_json::to_string(&line).map_err(|e| Error::Input(e.to_string()))?;
        text.push('\n');
        self.traces
            .write_all(text.as_bytes())
            .map_err(|e| io(&self.traces_path, e))?;
        self.traces.flush().map_err(|e| io(&self.traces_path, e))?;
        Ok(ok)
    }
}

/// Counts over the whole output directory.
pub fn summarize(out: &Path, vanilla: bool) -> Result<DistillSummary> {
    let mut s = DistillSummary::default();
    let text = std::fs::read_to_string(out.join(TRACES)).unwrap_or_default();
    let mut steps = 0usize;
    for l in text.lines().filter(|l| !l.trim().is_empty()) {
        let t: TraceLine =
            serde_json::from_str(l).map_err(|e| Error::Input(format!("{TRACES}: {e}")))?;
        s.questions += 1;
        s.passed += t.passed as usize;
        steps += t.trace.steps.len();
    }
    let recs = std::fs::read_to_string(out.join(STEPWISE)).unwrap_or_default();
    for l in recs.lines().filter(|l| !l.trim().is_empty()) {
        let r: StepwiseRecord =
            serde_json::from_str(l).map_err(|e| Error::Input(format!("{STEPWISE}: {e}")))?;
        s.records[match r.stage {
            Stage::Init => 0,
            Stage::Expand => 1,
            Stage::Aggregate => 2,
        }] += 1;
    }
    if vanilla {
        s.vanilla_records = std::fs::read_to_string(out.join(VANILLA))
            .unwrap_or_default()
            .lines()
            .filter(|l| !l.trim().is_empty())
            .count();
    }
    s.pass_rate = if s.questions > 0 {
        s.passed as f64 / s.questions as f64
    } else {
        0.0
    };
    s.mean_steps = if s.questions > 0 {
        steps as f64 / s.questions as f64
    } else {
        0.0
    };
    Ok(s)
}
