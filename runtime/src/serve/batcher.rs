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
mod tests {
    use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

    use super::*;
    use crate::batching::fake::engine;
    use crate::serve::api::{CompletionRequest, ReasonRequest};
    use crate::Cancel;

    /// Rows of the batching worker in the tests (fewer than the jobs, so rows are reused).
    const ROWS: usize = 3;

    fn reason(i: usize) -> Work {
        let body = format!(
            r#"{{"question": "Which doc {} of {} ?", "include_trace": true}}"#,
            i % 7,
            (i * 3) % 11
        );
        Work::Reason(ReasonRequest::parse(body.as_bytes()).expect("a valid body"))
    }

    fn completion(i: usize) -> Work {
        let body = format!(
            r#"{{"prompt": "Title : doc {} text of {}", "max_tokens": 24, "temperature": 0}}"#,
            i % 5,
            i % 9
        );
        Work::Complete(
            CompletionRequest::parse(body.as_bytes()).expect("a valid body"),
            i as u64,
        )
    }

    fn job(work: Work) -> (Job, UnboundedReceiver<WorkerEvent>, Cancel) {
        let (tx, rx) = unbounded_channel();
        let cancel = Cancel::new();
        let job = Job {
            work,
            cancel: cancel.clone(),
            accepted: Instant::now(),
            events: tx,
        };
        (job, rx, cancel)
    }

    /// What a job's client saw, without timings: the streamed steps or text, then the answer
    /// or the error.
    fn seen(rx: &mut UnboundedReceiver<WorkerEvent>) -> Vec<String> {
        let mut out = Vec::new();
        while let Ok(e) = rx.try_recv() {
            out.push(match e {
                WorkerEvent::Started => "started".into(),
                WorkerEvent::Step(s) => {
                    format!("step {} {:?} {}", s.step, s.sentence, s.new_tokens)
                }
                WorkerEvent::Piece(p) => format!("piece {p:?}"),
                WorkerEvent::ReasonDone(r) => format!(
                    "answer {:?} forced {} steps {} tokens {}",
                    r.answer, r.forced, r.num_steps, r.usage.new_tokens
                ),
                WorkerEvent::CompletionDone(c) => format!(
                    "text {:?} {:?} tokens {}",
                    c.text, c.finish_reason, c.completion_tokens
                ),
                WorkerEvent::Failed(e) => format!("failed {:?}", e.kind),
            });
        }
        out
    }

    /// Each job alone, on the one-job-at-a-time worker.
    fn alone(engine: &Engine, metrics: &Arc<Metrics>, work: Work) -> Vec<String> {
        let (job, mut rx, _) = job(work);
        metrics.queue_add(1);
        let (tx, queue) = std::sync::mpsc::sync_channel(1);
        tx.send(job).expect("queue open");
        drop(tx);
        super::super::pool::worker_loop(&Mutex::new(queue), engine, metrics);
        seen(&mut rx)
    }

    /// Runs the batching worker until every admitted job ended.
    fn drain(b: &mut Batcher<'_>) {
        let mut calls = 0;
        while b.tick() {
            calls += 1;
            assert!(calls < 10_000, "the batching worker does not finish");
        }
        assert_eq!(b.active(), 0);
    }

    #[test]
    fn batched_jobs_see_what_they_see_alone() -> Result<()> {
        let engine = engine()?;
        let metrics = Arc::new(Metrics::default());
        let works = || (0..12).map(|i| if i % 3 == 2 { completion(i) } else { reason(i) });
        let expected: Vec<Vec<String>> = works().map(|w| alone(&engine, &metrics, w)).collect();
        assert!(
            expected
                .iter()
                .all(|e| e.last().is_some_and(|l| !l.starts_with("failed"))),
            "{expected:?}"
        );
        let dec = engine
            .generator()
            .batch_decoder()
            .expect("the fake batches");
        let mut b = Batcher::new(&engine, &metrics, dec, ROWS)?;
        let mut receivers = Vec::new();
        // Jobs join whenever a row is free, while the others generate.
        let mut pending: Vec<Work> = works().collect();
        pending.reverse();
        loop {
            while b.has_room() {
                let Some(w) = pending.pop() else { break };
                let (job, rx, _) = job(w);
                metrics.queue_add(1);
                b.admit(job);
                receivers.push(rx);
            }
            if !b.tick() && pending.is_empty() {
                break;
            }
        }
        assert_eq!(b.active(), 0);
        for (i, (want, rx)) in expected.iter().zip(receivers.iter_mut()).enumerate() {
            assert_eq!(&seen(rx), want, "job {i}");
        }
        Ok(())
    }

    #[test]
    fn a_job_cancelled_mid_batch_frees_its_row_for_the_next() -> Result<()> {
        let engine = engine()?;
        let metrics = Arc::new(Metrics::default());
        let dec = engine
            .generator()
            .batch_decoder()
            .expect("the fake batches");
        let mut b = Batcher::new(&engine, &metrics, dec, 2)?;
        let (a, mut a_rx, a_cancel) = job(completion(1));
        let (bj, mut b_rx, _) = job(reason(2));
        metrics.queue_add(2);
        b.admit(a);
        b.admit(bj);
        assert_eq!(b.active(), 2, "both jobs generate in the batch");
        assert!(!b.has_room());
        a_cancel.cancel();
        assert!(b.tick());
        assert!(b.has_room(), "the cancelled job's row is free");
        let a_seen = seen(&mut a_rx);
        assert_eq!(
            a_seen.last().map(String::as_str),
            Some("failed Timeout"),
            "{a_seen:?}"
        );
        // The next job takes the freed row (its stale positions hidden) and, like the job that
        // went on beside it, sees what it sees alone.
        let (c, mut c_rx, _) = job(completion(4));
        metrics.queue_add(1);
        b.admit(c);
        assert_eq!(b.active(), 2);
        drain(&mut b);
        let b_alone = alone(&engine, &metrics, reason(2));
        let c_alone = alone(&engine, &metrics, completion(4));
        let mut b_seen = seen(&mut b_rx);
        // The job's events before the cancellation were read with the tick; compare the rest.
        assert_eq!(b_alone.last(), b_seen.last());
        b_seen.retain(|e| !e.starts_with("started"));
        assert!(b_alone.ends_with(&b_seen), "{b_alone:?} / {b_seen:?}");
        assert_eq!(seen(&mut c_rx), c_alone);
        Ok(())
    }

    #[test]
    fn a_client_gone_mid_batch_stops_its_job() -> Result<()> {
        let engine = engine()?;
        let metrics = Arc::new(Metrics::default());
        let dec = engine
            .generator()
            .batch_decoder()
            .expect("the fake batches");
        let mut b = Batcher::new(&engine, &metrics, dec, 2)?;
        let (a, a_rx, a_cancel) = job(completion(3));
        metrics.queue_add(1);
        b.admit(a);
        assert_eq!(b.active(), 1);
        drop(a_rx);
        b.tick();
        assert_eq!(b.active(), 0);
        assert!(a_cancel.is_cancelled());
        Ok(())
    }

    #[test]
    fn batching_a_model_without_a_batched_step_is_refused_naming_the_option() -> Result<()> {
        use crate::reasoning::tests::{hash_lm, loop_tokenizer, ListRetriever};
        let tok = loop_tokenizer()?;
        let lm = hash_lm(&tok)?;
        let eos = lm.eos;
        let engine = Engine::builder()
            .generator(Arc::new(lm), tok, &[eos])
            .retriever(Arc::new(ListRetriever::new(10)))
            .build()?;
        assert!(engine.generator().batch_decoder().is_none());
        let pool = super::super::pool::Pool::new(4, Arc::new(Metrics::default()));
        let engine = Arc::new(engine);
        let err = pool
            .start_workers(Arc::clone(&engine), 1, 4)
            .expect_err("no batched step");
        assert!(
            matches!(&err, crate::Error::InvalidOption { option, .. } if option == "batch"),
            "{err}"
        );
        // One request per worker needs no batched step.
        pool.start_workers(engine, 1, 1)?;
        pool.close_and_join();
        Ok(())
    }
}
