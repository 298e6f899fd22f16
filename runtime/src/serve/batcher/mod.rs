//! Continuous batching in the server: a batching worker holds up to `rows` jobs at once —
//! reasoning loops and completions alike — and runs the next decode token of every job that
//! is generating as one batched model call. A job joins as soon as a row is free (its prompt
//! prefilled alone, then placed in its row of the batch cache) and leaves as soon as it ends,
//! is cancelled (deadline, client gone) or fails; the other rows go on. Streaming, deadlines,
//! cancellation and the responses are those of the one-job-at-a-time worker, and greedy jobs
//! get the same tokens as alone (the batch cache masks every other row).
//!
//! The batch cache and the loop's slot are the batched evaluation's
//! ([`crate::batching`]); prefill is not batched (a prompt joining waits for nothing, and the
//! generating rows wait for its prefill).

use std::panic::AssertUnwindSafe;
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::api::ApiError;
use super::completion::CompletionRun;
use super::metrics::{ErrorKind, Metrics};
use super::pool::{
    completion_event, job_error, lock, reason_options, reason_response, render_chat, timeout_error,
    timings, Job, Work, WorkerEvent,
};
use crate::backend::BatchDecoder;
use crate::batching::{Advance, Batch, LoopSlot};
use crate::engine::Engine;
use crate::error::Result;
use crate::generator::LogitsMode;

/// What a row runs.
enum Kind<'e> {
    /// The multi-step loop.
    Reason {
        run: Box<LoopSlot<'e>>,
        include_trace: bool,
    },
    /// A completion (plain or chat) and the token its row runs next.
    Complete {
        run: Box<CompletionRun>,
        field: &'static str,
        next: u32,
    },
}

/// How a job's start went.
enum Begun<'e> {
    /// It generates in its row.
    Going(Kind<'e>),
    /// It ended with this event.
    Ended(WorkerEvent),
}

/// What a job does after a batched call.
enum Next {
    /// It generates on.
    Going,
    /// It ended with this event.
    End(WorkerEvent),
    /// Its completion ended: finish it.
    FinishCompletion,
}

/// A job in a row.
struct Slot<'e> {
    job: Job,
    started: Instant,
    kind: Kind<'e>,
}

/// One batching worker's rows and batch cache.
pub(super) struct Batcher<'e> {
    engine: &'e Engine,
    metrics: &'e Arc<Metrics>,
    dec: &'e dyn BatchDecoder,
    batch: Batch<'e>,
    slots: Vec<Option<Slot<'e>>>,
}

impl<'e> Batcher<'e> {
    /// A worker of `rows` rows on `engine`'s batched step.
    pub(super) fn new(
        engine: &'e Engine,
        metrics: &'e Arc<Metrics>,
        dec: &'e dyn BatchDecoder,
        rows: usize,
    ) -> Result<Self> {
        Ok(Batcher {
            engine,
            metrics,
            dec,
            batch: Batch::new(dec, rows)?,
            slots: (0..rows).map(|_| None).collect(),
        })
    }

    /// Jobs in rows.
    pub(super) fn active(&self) -> usize {
        self.slots.iter().filter(|s| s.is_some()).count()
    }

    /// Whether a row is free.
    pub(super) fn has_room(&self) -> bool {
        self.slots.iter().any(Option::is_none)
    }

    /// Takes a job from the queue into a free row (the caller checked [`Batcher::has_room`]):
    /// it is prefilled and its first token chosen; a job that ends there (or is already
    /// cancelled) is answered at once.
    pub(super) fn admit(&mut self, job: Job) {
        self.metrics.queue_add(-1);
        self.metrics
            .observe_queue_wait(job.accepted.elapsed().as_secs_f64());
        if job.cancel.is_cancelled() || job.events.is_closed() {
            let _ = job.events.send(WorkerEvent::Failed(timeout_error()));
            return;
        }
        let Some(row) = self.slots.iter().position(Option::is_none) else {
            // Not reached (the caller checks for room): refuse rather than lose the job.
            let _ = job.events.send(WorkerEvent::Failed(ApiError::new(
                ErrorKind::QueueFull,
                "no free row in the batching worker",
            )));
            return;
        };
        let _ = job.events.send(WorkerEvent::Started);
        self.metrics.busy_add(1);
        let started = Instant::now();
        let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| self.start(&job, row)));
        match outcome {
            Ok(Begun::Going(kind)) => {
                self.slots[row] = Some(Slot { job, started, kind });
            }
            Ok(Begun::Ended(event)) => self.end(&job, started, event),
            Err(_) => self.end(&job, started, panicked()),
        }
    }

    /// Starts `job` in `row`: it generates, or it ended with an event.
    fn start(&mut self, job: &Job, row: usize) -> Begun<'e> {
        let engine = self.engine;
        match &job.work {
            Work::Reason(req) => {
                let opts = reason_options(engine, req, &job.events, &job.cancel, self.metrics);
                let started = LoopSlot::new(engine, &req.question, &opts).and_then(|mut run| {
                    let a = run.start(engine, &mut self.batch, row)?;
                    Ok((run, a))
                });
                match started {
                    Ok((run, Advance::Decoding)) => Begun::Going(Kind::Reason {
                        run: Box::new(run),
                        include_trace: req.include_trace,
                    }),
                    Ok((_, Advance::Done(r))) => {
                        Begun::Ended(self.reason_done(&r, req.include_trace))
                    }
                    Err(e) => Begun::Ended(WorkerEvent::Failed(job_error(e))),
                }
            }
            Work::Complete(req, seed) => self.start_completion(job, req, *seed, "prompt", row),
            Work::Chat(chat, seed) => match render_chat(engine, chat) {
                Ok(req) => self.start_completion(job, &req, *seed, "messages", row),
                Err(e) => Begun::Ended(WorkerEvent::Failed(e)),
            },
        }
    }

    fn start_completion(
        &mut self,
        job: &Job,
        req: &super::api::CompletionRequest,
        seed: u64,
        field: &'static str,
        row: usize,
    ) -> Begun<'e> {
        let engine = self.engine;
        let end = |result| completion_event(result, &job.cancel, self.metrics, field);
        let context = engine.generator().info().context_length;
        let mut run = match CompletionRun::new(engine.tokenizer(), context, req, seed) {
            Ok(Ok(run)) => run,
            Ok(Err(problem)) => return Begun::Ended(end(Ok(Err(problem)))),
            Err(e) => return Begun::Ended(end(Err(e))),
        };
        let mut on_piece = piece_sender(job);
        if run.ended() {
            return Begun::Ended(end(Ok(Ok(run.finish(&mut on_piece)))));
        }
        run.start_clock();
        let first = (|| -> Result<Option<u32>> {
            job.cancel.check()?;
            let g = engine.generator();
            let mut seq = g.new_sequence()?;
            let logits = g.append(&mut seq, run.prompt(), LogitsMode::Last)?;
            let next = run.accept(
                engine.tokenizer(),
                engine.eos_token_ids(),
                logits.last(),
                &mut on_piece,
            )?;
            if next.is_some() {
                self.batch.place(row, &seq)?;
            }
            Ok(next)
        })();
        match first {
            Ok(Some(next)) => Begun::Going(Kind::Complete {
                run: Box::new(run),
                field,
                next,
            }),
            Ok(None) => Begun::Ended(end(Ok(Ok(run.finish(&mut on_piece))))),
            Err(e) => Begun::Ended(end(Err(e))),
        }
    }

    fn reason_done(&self, r: &crate::Reasoning, include_trace: bool) -> WorkerEvent {
        WorkerEvent::ReasonDone(Box::new(reason_response(r, include_trace, self.metrics)))
    }

    /// Reports the last event of a job and frees its worker share.
    fn end(&self, job: &Job, started: Instant, mut event: WorkerEvent) {
        if let WorkerEvent::ReasonDone(r) = &mut event {
            r.timings = timings(job.accepted, started);
        }
        self.metrics.busy_add(-1);
        let _ = job.events.send(event);
    }

    /// Frees `row` with `event` as its job's last word.
    fn free(&mut self, row: usize, event: WorkerEvent) {
        if let Some(slot) = self.slots[row].take() {
            self.end(&slot.job, slot.started, event);
        }
    }

    /// One batched decode call over the generating rows, after dropping the jobs cancelled
    /// since the last one; returns false when no row generates.
    pub(super) fn tick(&mut self) -> bool {
        for row in 0..self.slots.len() {
            let Some(slot) = &self.slots[row] else {
                continue;
            };
            if let Err(e) = slot.job.cancel.check() {
                self.free(row, WorkerEvent::Failed(job_error(e)));
            } else if slot.job.events.is_closed() {
                // The client went away: stop spending the model on it.
                slot.job.cancel.cancel();
                self.free(row, WorkerEvent::Failed(timeout_error()));
            }
        }
        let tokens: Vec<Option<u32>> = self
            .slots
            .iter()
            .map(|s| {
                s.as_ref().and_then(|s| match &s.kind {
                    Kind::Reason { run, .. } => run.next_token(),
                    Kind::Complete { next, .. } => Some(*next),
                })
            })
            .collect();
        if tokens.iter().all(Option::is_none) {
            return false;
        }
        let stepped = std::panic::catch_unwind(AssertUnwindSafe(|| self.batch.step(&tokens)));
        let logits = match stepped {
            Ok(Ok(l)) => l,
            Ok(Err(e)) => {
                let error = job_error(e);
                self.fail_all(|| WorkerEvent::Failed(error.clone()));
                return true;
            }
            Err(_) => {
                self.fail_all(panicked);
                return true;
            }
        };
        for row in 0..self.slots.len() {
            if self.slots[row].is_none() {
                continue;
            }
            let outcome =
                std::panic::catch_unwind(AssertUnwindSafe(|| self.advance(row, logits.row(row))));
            match outcome {
                Ok(Next::Going) => {}
                Ok(Next::End(event)) => self.free(row, event),
                Ok(Next::FinishCompletion) => self.finish_completion(row),
                Err(_) => self.free(row, panicked()),
            }
        }
        true
    }

    /// Hands `row`'s logits to its job.
    fn advance(&mut self, row: usize, logits: &[f32]) -> Next {
        let engine = self.engine;
        let Some(slot) = self.slots[row].as_mut() else {
            return Next::Going;
        };
        match &mut slot.kind {
            Kind::Reason { run, include_trace } => {
                match run.accept(engine, &mut self.batch, row, logits) {
                    Ok(Advance::Decoding) => Next::Going,
                    Ok(Advance::Done(r)) => Next::End(WorkerEvent::ReasonDone(Box::new(
                        reason_response(&r, *include_trace, self.metrics),
                    ))),
                    Err(e) => Next::End(WorkerEvent::Failed(job_error(e))),
                }
            }
            Kind::Complete { run, field, next } => {
                let job = &slot.job;
                let mut on_piece = piece_sender(job);
                match run.accept(
                    engine.tokenizer(),
                    engine.eos_token_ids(),
                    logits,
                    &mut on_piece,
                ) {
                    Ok(Some(id)) => {
                        *next = id;
                        Next::Going
                    }
                    Ok(None) => Next::FinishCompletion,
                    Err(e) => Next::End(completion_event(Err(e), &job.cancel, self.metrics, field)),
                }
            }
        }
    }

    /// Ends the completion in `row`, whose last token was chosen.
    fn finish_completion(&mut self, row: usize) {
        let Some(slot) = self.slots[row].take() else {
            return;
        };
        let Slot { job, started, kind } = slot;
        let event = match kind {
            Kind::Complete { run, field, .. } => {
                let c = run.finish(&mut piece_sender(&job));
                completion_event(Ok(Ok(c)), &job.cancel, self.metrics, field)
            }
            Kind::Reason { .. } => panicked(),
        };
        self.end(&job, started, event);
    }

    /// Ends every job in a row with `event` and starts over on an empty batch cache (after a
    /// failed batched call the cache's state is unknown).
    fn fail_all(&mut self, event: impl Fn() -> WorkerEvent) {
        for row in 0..self.slots.len() {
            self.free(row, event());
        }
        if let Ok(b) = Batch::new(self.dec, self.slots.len()) {
            self.batch = b;
        }
    }
}

fn panicked() -> WorkerEvent {
    WorkerEvent::Failed(ApiError::new(
        ErrorKind::Internal,
        "the model worker panicked on this request",
    ))
}

/// Streams a completion's final text to the job's client; false once nobody listens.
fn piece_sender(job: &Job) -> impl FnMut(&str) -> bool + '_ {
    |s: &str| job.events.send(WorkerEvent::Piece(s.to_string())).is_ok()
}

/// A batching worker: takes jobs from the queue whenever a row is free (waiting for one only
/// when it holds none), runs batched decode calls while any row generates, and returns once
/// the queue is closed and drained and its rows are empty.
pub(super) fn batch_loop(
    rx: &Mutex<Receiver<Job>>,
    engine: &Engine,
    metrics: &Arc<Metrics>,
    rows: usize,
) {
    let Some(dec) = engine.generator().batch_decoder() else {
        return; // checked when the workers start
    };
    let mut b = match Batcher::new(engine, metrics, dec, rows) {
        Ok(b) => b,
        Err(_) => {
            // No batch cache: answer every job one at a time instead.
            return super::pool::worker_loop(rx, engine, metrics);
        }
    };
    let mut open = true;
    loop {
        while open && b.has_room() {
            let next = if b.active() == 0 {
                lock(rx).recv().map_err(|_| TryRecvError::Disconnected)
            } else {
                lock(rx).try_recv()
            };
            match next {
                Ok(job) => b.admit(job),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => open = false,
            }
        }
        if !b.tick() && !open && b.active() == 0 {
            return;
        }
    }
}

#[cfg(test)]
mod tests;
