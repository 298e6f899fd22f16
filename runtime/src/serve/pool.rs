//! The model worker pool: a fixed number of dedicated OS threads take jobs from one bounded
//! queue. Model math never runs on the async threads and a job stays on one thread from start
//! to end (no per-request thread hopping, which slows the math libraries' thread pools).
//!
//! Admission is non-blocking: [`Pool::submit`] fails at once when the queue is full, so memory
//! held by waiting requests is bounded by `workers + capacity` jobs.

use std::panic::AssertUnwindSafe;
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::mpsc::UnboundedSender;

use super::api::{ApiError, CompletionRequest, ReasonRequest};
use super::chat::ChatRequest;
use super::completion::{complete, Completion, PromptProblem};
use super::metrics::{ErrorKind, Metrics};
use crate::control::StepObserver;
use crate::engine::{Engine, ReasonOptions};
use crate::error::{Error, Result};
use crate::reasoning::{HeldPassage, Reasoning, StepTrace};

/// Cancellation of one job: set by the HTTP side on timeout or when the client goes away, and
/// implied once the deadline passes (the runtime's token; the loop and the completion checks
/// it before every model call).
pub use crate::control::Cancel;

/// What a job asks for.
#[derive(Debug)]
pub enum Work {
    /// The multi-step loop.
    Reason(ReasonRequest),
    /// A plain completion with its sampler seed.
    Complete(CompletionRequest, u64),
    /// A chat completion (messages rendered with the model's template) with its sampler seed.
    Chat(Box<ChatRequest>, u64),
}

/// A job in the queue.
pub struct Job {
    /// The request.
    pub work: Work,
    /// Stops the job.
    pub cancel: Cancel,
    /// When it was accepted.
    pub accepted: Instant,
    /// Where the worker reports (events arrive in order; the last is `Done` or `Failed`).
    pub events: UnboundedSender<WorkerEvent>,
}

/// A step of the loop as it finishes (one server-sent event).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StepEvent {
    /// 1-based step.
    pub step: usize,
    /// Whether this step was forced to answer.
    pub forced: bool,
    /// The sentence kept (for a forced step: the stop phrase and the answer).
    pub sentence: String,
    /// Titles of the passages held at this step, in prompt order.
    pub passages: Vec<String>,
    /// Tokens generated.
    pub new_tokens: usize,
    /// Mean token probability.
    pub mean_prob: Option<f64>,
    /// Mean entropy (nats).
    pub mean_entropy: Option<f64>,
    /// Prompt tokens run through the model.
    pub prefilled_tokens: usize,
    /// Prompt tokens reused from the previous step's cache.
    pub reused_tokens: usize,
    /// Prefill milliseconds.
    pub prefill_ms: f64,
    /// Decode milliseconds.
    pub decode_ms: f64,
}

/// Timings of one job, milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Timings {
    /// Waiting for a worker.
    pub queue_ms: f64,
    /// On the worker.
    pub run_ms: f64,
    /// Accepted to done.
    pub total_ms: f64,
}

/// Token counts of a reasoning job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ReasonUsage {
    /// Tokens generated over all steps.
    pub new_tokens: usize,
    /// Prompt tokens run through the model over all steps.
    pub prefilled_tokens: usize,
    /// Prompt tokens reused from earlier steps.
    pub reused_tokens: usize,
}

/// A passage the answer was based on.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PassageInfo {
    /// Document id.
    pub id: String,
    /// Title.
    pub title: String,
    /// BM25 score.
    pub score: f32,
    /// The step that retrieved it.
    pub step: usize,
}

impl From<&HeldPassage> for PassageInfo {
    fn from(p: &HeldPassage) -> Self {
        PassageInfo {
            id: p.id.clone(),
            title: p.title.clone(),
            score: p.score,
            step: p.step,
        }
    }
}

/// The answer of `POST /v1/reason`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReasonResponse {
    /// `rsn-…`.
    pub id: String,
    /// The question.
    pub question: String,
    /// The answer.
    pub answer: String,
    /// Whether the answer was forced at the last step.
    pub forced: bool,
    /// Steps run.
    pub num_steps: usize,
    /// The per-step trace (docs/DESIGN.md), unless `include_trace` was false.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub steps: Option<Vec<StepTrace>>,
    /// Passages held at the end.
    pub passages: Vec<PassageInfo>,
    /// Token counts.
    pub usage: ReasonUsage,
    /// Timings.
    pub timings: Timings,
}

/// What a worker reports about a job.
#[derive(Debug)]
pub enum WorkerEvent {
    /// A worker took the job (its queue wait goes to the metrics).
    Started,
    /// A reasoning step finished.
    Step(StepEvent),
    /// Completion text that became final.
    Piece(String),
    /// The reasoning job finished (the `id` is filled in by the HTTP side).
    ReasonDone(Box<ReasonResponse>),
    /// The completion job finished.
    CompletionDone(Box<Completion>),
    /// The job failed.
    Failed(ApiError),
}

/// The queue and the worker threads.
pub struct Pool {
    tx: Mutex<Option<SyncSender<Job>>>,
    rx: Arc<Mutex<Receiver<Job>>>,
    handles: Mutex<Vec<JoinHandle<()>>>,
    metrics: Arc<Metrics>,
    capacity: usize,
}

impl Pool {
    /// A pool whose queue holds `capacity` waiting jobs; no worker runs until
    /// [`Pool::start_workers`].
    pub fn new(capacity: usize, metrics: Arc<Metrics>) -> Self {
        let (tx, rx) = mpsc::sync_channel(capacity);
        Pool {
            tx: Mutex::new(Some(tx)),
            rx: Arc::new(Mutex::new(rx)),
            handles: Mutex::new(Vec::new()),
            metrics,
            capacity,
        }
    }

    /// Jobs the queue holds before refusing.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Starts `n` workers over `engine`. With `batch` 1 a worker runs one job at a time; with
    /// more it is a batching worker that runs up to `batch` jobs' decode tokens as one batched
    /// model call (continuous batching: see [`super::batcher`]), which needs a generator with a
    /// batched step.
    pub fn start_workers(&self, engine: Arc<Engine>, n: usize, batch: usize) -> Result<()> {
        if batch > 1 && engine.generator().batch_decoder().is_none() {
            return Err(Error::InvalidOption {
                option: "batch".into(),
                expected: "1 for a model without a batched step (a GroupQueryAttention export cannot mask left-padded rows: re-export with --attention standard)".into(),
                got: batch.to_string(),
            });
        }
        let mut handles = lock(&self.handles);
        for i in 0..n {
            let rx = Arc::clone(&self.rx);
            let engine = Arc::clone(&engine);
            let metrics = Arc::clone(&self.metrics);
            let h = std::thread::Builder::new()
                .name(format!("steper-worker-{i}"))
                .spawn(move || {
                    if batch > 1 {
                        super::batcher::batch_loop(&rx, &engine, &metrics, batch)
                    } else {
                        worker_loop(&rx, &engine, &metrics)
                    }
                })
                .map_err(|e| Error::Server {
                    addr: String::new(),
                    message: format!("cannot start worker thread {i}: {e}"),
                })?;
            handles.push(h);
        }
        self.metrics.set_pool(handles.len(), self.capacity);
        Ok(())
    }

    /// Queues a job, or refuses at once: queue full (503 + Retry-After) or closed (shutting
    /// down).
    pub fn submit(&self, job: Job) -> std::result::Result<(), ApiError> {
        let guard = lock(&self.tx);
        let Some(tx) = guard.as_ref() else {
            return Err(ApiError::new(
                ErrorKind::ShuttingDown,
                "the server is shutting down",
            ));
        };
        // Count before sending: a worker may take the job (and decrement) at once.
        self.metrics.queue_add(1);
        match tx.try_send(job) {
            Ok(()) => Ok(()),
            Err(e) => {
                self.metrics.queue_add(-1);
                Err(match e {
                    TrySendError::Full(_) => ApiError::new(
                        ErrorKind::QueueFull,
                        format!("the queue is full ({} waiting); retry later", self.capacity),
                    ),
                    TrySendError::Disconnected(_) => {
                        ApiError::new(ErrorKind::ShuttingDown, "the server is shutting down")
                    }
                })
            }
        }
    }

    /// Closes the queue: the workers finish every queued job, then exit; waits for them.
    pub fn close_and_join(&self) {
        lock(&self.tx).take();
        let handles: Vec<_> = lock(&self.handles).drain(..).collect();
        for h in handles {
            // A worker that panicked outside a job has nothing left to report.
            let _ = h.join();
        }
    }
}

pub(super) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A poisoned lock only means another thread panicked while holding it; the data (a sender,
    // a receiver, join handles) is still consistent.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

pub(super) fn worker_loop(rx: &Mutex<Receiver<Job>>, engine: &Engine, metrics: &Arc<Metrics>) {
    loop {
        let job = match lock(rx).recv() {
            Ok(job) => job,
            Err(_) => return, // closed and drained
        };
        metrics.queue_add(-1);
        let queue_s = job.accepted.elapsed().as_secs_f64();
        metrics.observe_queue_wait(queue_s);
        if job.cancel.is_cancelled() || job.events.is_closed() {
            let _ = job.events.send(WorkerEvent::Failed(timeout_error()));
            continue;
        }
        let _ = job.events.send(WorkerEvent::Started);
        metrics.busy_add(1);
        let events = job.events.clone();
        let result = std::panic::catch_unwind(AssertUnwindSafe(|| run_job(engine, metrics, job)));
        metrics.busy_add(-1);
        if result.is_err() {
            let _ = events.send(WorkerEvent::Failed(ApiError::new(
                ErrorKind::Internal,
                "the model worker panicked on this request",
            )));
        }
    }
}

pub(super) fn timeout_error() -> ApiError {
    ApiError::new(
        ErrorKind::Timeout,
        "the request did not finish within the server's timeout",
    )
}

/// Maps a runtime error of a job to the client's error.
pub(super) fn job_error(e: Error) -> ApiError {
    match e {
        Error::Cancelled | Error::DeadlineExceeded { .. } => timeout_error(),
        Error::ContextOverflow { .. } => ApiError {
            kind: ErrorKind::BadRequest,
            message: e.to_string(),
            param: Some("question".into()),
        },
        Error::EmptyQuestion => ApiError::field("question", e.to_string()),
        other => ApiError::new(ErrorKind::Internal, other.to_string()),
    }
}

/// The timings of a job accepted at `accepted`, started at `started`, done now.
pub(super) fn timings(accepted: Instant, started: Instant) -> Timings {
    let done = Instant::now();
    Timings {
        queue_ms: (started - accepted).as_secs_f64() * 1e3,
        run_ms: (done - started).as_secs_f64() * 1e3,
        total_ms: (done - accepted).as_secs_f64() * 1e3,
    }
}

fn run_job(engine: &Engine, metrics: &Arc<Metrics>, job: Job) {
    let started = Instant::now();
    let event = match &job.work {
        Work::Reason(req) => {
            let opts = reason_options(engine, req, &job.events, &job.cancel, metrics);
            match engine.reason(&req.question, &opts) {
                Ok(r) => {
                    let mut r = reason_response(&r, req.include_trace, metrics);
                    r.timings = timings(job.accepted, started);
                    WorkerEvent::ReasonDone(Box::new(r))
                }
                Err(e) => WorkerEvent::Failed(job_error(e)),
            }
        }
        Work::Complete(req, seed) => run_completion(engine, metrics, &job, req, *seed, "prompt"),
        Work::Chat(chat, seed) => match render_chat(engine, chat) {
            Ok(req) => run_completion(engine, metrics, &job, &req, *seed, "messages"),
            Err(e) => WorkerEvent::Failed(e),
        },
    };
    let _ = job.events.send(event);
}

/// The completion request of a chat request: its messages rendered with the model's template
/// and the opening of the assistant turn.
pub(super) fn render_chat(
    engine: &Engine,
    chat: &ChatRequest,
) -> std::result::Result<CompletionRequest, ApiError> {
    let template = engine.chat_template().ok_or_else(|| {
        ApiError::field(
            "messages",
            "the served model has no chat template (tokenizer_config.json `chat_template` or chat_template.jinja in its directory); use /v1/completions",
        )
    })?;
    let prompt = template
        .render(&chat.messages, true)
        .map_err(|e| ApiError::field("messages", e.to_string()))?;
    let mut req = chat.completion.clone();
    req.prompt = prompt;
    Ok(req)
}

/// Runs a completion job; a prompt the model cannot take is a 400 about `field`.
fn run_completion(
    engine: &Engine,
    metrics: &Arc<Metrics>,
    job: &Job,
    req: &CompletionRequest,
    seed: u64,
    field: &str,
) -> WorkerEvent {
    let events = &job.events;
    let mut on_piece = |s: &str| events.send(WorkerEvent::Piece(s.to_string())).is_ok();
    let result = complete(
        engine.generator(),
        &job.cancel,
        engine.tokenizer(),
        engine.eos_token_ids(),
        req,
        seed,
        &mut on_piece,
    );
    completion_event(result, &job.cancel, metrics, field)
}

/// What a completion job reports: its result, or a 400 about `field` for a prompt the model
/// cannot take, or the job's error (a cancelled job's result is a timeout).
pub(super) fn completion_event(
    result: Result<std::result::Result<Completion, PromptProblem>>,
    cancel: &Cancel,
    metrics: &Metrics,
    field: &str,
) -> WorkerEvent {
    match result {
        Ok(Ok(_)) if cancel.is_cancelled() => WorkerEvent::Failed(timeout_error()),
        Ok(Ok(c)) => {
            metrics.record_tokens(c.completion_tokens, c.model_seconds);
            WorkerEvent::CompletionDone(Box::new(c))
        }
        Ok(Err(PromptProblem::Empty)) => {
            WorkerEvent::Failed(ApiError::field(field, "encodes to no token"))
        }
        Ok(Err(PromptProblem::TooLong { tokens, context })) => WorkerEvent::Failed(ApiError::field(
            field,
            format!(
                "{tokens} tokens; the model's context holds {context} (prompt and completion together)"
            ),
        )),
        Err(e) => WorkerEvent::Failed(job_error(e)),
    }
}

/// The loop options of a reasoning job: the engine's defaults with the request's settings, its
/// cancel token, and an observer that streams each step to `events` (and cancels the job when
/// nobody listens any more).
pub(super) fn reason_options(
    engine: &Engine,
    req: &ReasonRequest,
    events: &UnboundedSender<WorkerEvent>,
    cancel: &Cancel,
    metrics: &Arc<Metrics>,
) -> ReasonOptions {
    let mut opts = engine.default_options();
    if let Some(n) = req.max_steps {
        opts.loop_options.max_steps = n;
    }
    if let Some(k) = req.top_k {
        opts.loop_options.top_k = k;
    }
    opts.cancel = Some(cancel.clone());
    let (events, cancel_on_gone, metrics_of_steps) =
        (events.clone(), cancel.clone(), Arc::clone(metrics));
    opts.observer = Some(StepObserver::new(move |t, held| {
        metrics_of_steps.observe_step((t.prefill_ms + t.decode_ms) / 1e3);
        let event = StepEvent {
            step: t.step,
            forced: t.forced,
            sentence: t.sentence.clone(),
            passages: held[..t.held.min(held.len())]
                .iter()
                .map(|p| p.title.clone())
                .collect(),
            new_tokens: t.new_tokens,
            mean_prob: t.mean_prob,
            mean_entropy: t.mean_entropy,
            prefilled_tokens: t.prefilled_tokens,
            reused_tokens: t.reused_tokens,
            prefill_ms: t.prefill_ms,
            decode_ms: t.decode_ms,
        };
        if events.send(WorkerEvent::Step(event)).is_err() {
            // Nobody listens any more: stop spending the worker on this request.
            cancel_on_gone.cancel();
            return std::ops::ControlFlow::Break(());
        }
        std::ops::ControlFlow::Continue(())
    }));
    opts
}

/// The answer of a reasoning job (timings left at zero for the caller), its tokens recorded.
pub(super) fn reason_response(
    r: &Reasoning,
    include_trace: bool,
    metrics: &Metrics,
) -> ReasonResponse {
    let usage = ReasonUsage {
        new_tokens: r.new_tokens(),
        prefilled_tokens: r.prefilled_tokens(),
        reused_tokens: r.reused_tokens(),
    };
    let model_s: f64 = r
        .steps
        .iter()
        .map(|s| (s.prefill_ms + s.decode_ms) / 1e3)
        .sum();
    metrics.record_tokens(usage.new_tokens, model_s);
    ReasonResponse {
        id: String::new(),
        question: r.question.clone(),
        answer: r.answer.clone(),
        forced: r.forced,
        num_steps: r.steps.len(),
        passages: r.passages.iter().map(PassageInfo::from).collect(),
        steps: include_trace.then(|| r.steps.clone()),
        usage,
        timings: Timings {
            queue_ms: 0.0,
            run_ms: 0.0,
            total_ms: 0.0,
        },
    }
}

/// Seconds a client is told to wait (`Retry-After`) after a 503.
pub const RETRY_AFTER: Duration = Duration::from_secs(1);
