//! A minimal service that embeds the runtime crate directly (no HTTP): one `Engine` shared by
//! several threads, each answering questions from a shared queue.
//!
//! ```text
//! cargo run --release -p steper-runtime --example embed_service -- \
//!     MODEL_DIR INDEX_DIR QA.jsonl [THREADS=4] [LIMIT=20]
//! ```
//!
//! `Engine` is `Send + Sync`: the model session and the index reader are shared, each call
//! keeps its own KV cache, so the threads need no lock around `reason`. Set `ORT_DYLIB_PATH`
//! to the ONNX Runtime library.

use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use steper_runtime::data::{read_qa, ReadOptions};
use steper_runtime::metrics::{exact_match, f1 as token_f1};
use steper_runtime::{BackendKind, Engine, OrtOptions};

/// One answered question, sent back to the main thread.
struct Answered {
    worker: usize,
    question: String,
    answer: String,
    gold: Vec<String>,
    steps: usize,
    millis: f64,
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 3 {
        bail!("usage: embed_service MODEL_DIR INDEX_DIR QA.jsonl [THREADS=4] [LIMIT=20]");
    }
    let (model, index, qa_path) = (
        PathBuf::from(&args[0]),
        PathBuf::from(&args[1]),
        PathBuf::from(&args[2]),
    );
    let threads: usize = args.get(3).map(|s| s.parse()).transpose()?.unwrap_or(4);
    let limit: usize = args.get(4).map(|s| s.parse()).transpose()?.unwrap_or(20);
    anyhow::ensure!(threads > 0, "THREADS must be at least 1");

    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let engine = Arc::new(
        Engine::builder()
            .model_dir(&model)
            // Split the cores between the threads instead of oversubscribing them.
            .backend(BackendKind::Ort(
                OrtOptions::default().with_intra_threads((cores / threads).max(1)),
            ))
            .index(&index)
            .build()
            .with_context(|| format!("loading {}", model.display()))?,
    );
    let qa = read_qa(&qa_path, ReadOptions::default())?.rows;

    // The work queue: questions in, answers out.
    let (job_tx, job_rx) = mpsc::channel::<(String, Vec<String>)>();
    let job_rx = Arc::new(Mutex::new(job_rx));
    let (done_tx, done_rx) = mpsc::channel::<Result<Answered>>();
    let t0 = Instant::now();
    let workers: Vec<_> = (0..threads)
        .map(|worker| {
            let engine = Arc::clone(&engine);
            let job_rx = Arc::clone(&job_rx);
            let done_tx = done_tx.clone();
            std::thread::spawn(move || {
                let options = engine.default_options();
                loop {
                    let next = job_rx.lock().map(|rx| rx.recv());
                    let Ok(Ok((question, gold))) = next else {
                        break;
                    };
                    let t = Instant::now();
                    let result = engine
                        .reason(&question, &options)
                        .map(|r| Answered {
                            worker,
                            steps: r.steps.len(),
                            answer: r.answer,
                            question,
                            gold,
                            millis: t.elapsed().as_secs_f64() * 1e3,
                        })
                        .map_err(anyhow::Error::from);
                    if done_tx.send(result).is_err() {
                        break;
                    }
                }
            })
        })
        .collect();
    drop(done_tx);
    let n = qa.len().min(limit);
    for q in qa.into_iter().take(n) {
        job_tx.send((q.question, q.answers))?;
    }
    drop(job_tx);

    let (mut em, mut f1, mut answered) = (0.0, 0.0, 0usize);
    for result in done_rx {
        let a = result?;
        em += exact_match(&a.answer, &a.gold);
        f1 += token_f1(&a.answer, &a.gold);
        answered += 1;
        println!(
            "[thread {}] {:.0} ms, {} steps: {} → {}",
            a.worker, a.millis, a.steps, a.question, a.answer
        );
    }
    for w in workers {
        w.join().map_err(|_| anyhow::anyhow!("a worker panicked"))?;
    }
    let secs = t0.elapsed().as_secs_f64();
    println!(
        "{answered} questions on {threads} threads in {secs:.1} s ({:.2} questions/s), EM {:.3}, F1 {:.3}",
        answered as f64 / secs,
        em / answered.max(1) as f64,
        f1 / answered.max(1) as f64
    );
    Ok(())
}
