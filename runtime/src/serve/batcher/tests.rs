//! Tests of the batching worker on the fake LM with a real batched step.

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
    crate::serve::pool::worker_loop(&Mutex::new(queue), engine, metrics);
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
    let pool = crate::serve::pool::Pool::new(4, Arc::new(Metrics::default()));
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
