//! The loop embedded with `steper-runtime = { default-features = false, features = ["ort"] }`:
//! ONNX Runtime runs the export, and the service brings its own retriever (here a small
//! in-memory term-overlap index over a JSONL corpus; no tantivy, no HTTP stack, no CLI crates).
//!
//! ```text
//! cargo run -p steper-embed-ort -- \
//!     MODEL_DIR CORPUS.jsonl QA.jsonl [LIMIT=3] [DEADLINE_MS=30000]
//! ```
//!
//! It answers the first LIMIT questions of QA.jsonl, printing each step as it finishes (a
//! `StepObserver`) and stopping a question at its deadline (a `Cancel` token), then the exact
//! match and F1 of the answers. The ONNX Runtime library is named by `ORT_DYLIB_PATH` or, as here when
//! given, `STEPER_ORT_LIBRARY` passed to `OrtOptions::with_library`.

use std::collections::{HashMap, HashSet};
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use steper_runtime::data::{read_corpus, read_qa, Document, ReadOptions};
use steper_runtime::metrics::{exact_match, f1};
use steper_runtime::retrieval::Hit;
use steper_runtime::{BackendKind, Cancel, Engine, OrtOptions, Retriever, StepObserver};

/// Documents scored by how many distinct query terms (lower-cased, 3+ letters) they contain.
struct OverlapIndex {
    docs: Vec<Document>,
    postings: HashMap<String, Vec<usize>>,
}

fn terms(text: &str) -> HashSet<String> {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| w.len() >= 3)
        .map(str::to_lowercase)
        .collect()
}

impl OverlapIndex {
    fn new(docs: Vec<Document>) -> Self {
        let mut postings: HashMap<String, Vec<usize>> = HashMap::new();
        for (i, d) in docs.iter().enumerate() {
            for t in terms(&format!("{} {}", d.title, d.text)) {
                postings.entry(t).or_default().push(i);
            }
        }
        OverlapIndex { docs, postings }
    }
}

impl Retriever for OverlapIndex {
    fn retrieve(
        &self,
        query: &str,
        k: usize,
        exclude: &HashSet<String>,
    ) -> steper_runtime::Result<Vec<Hit>> {
        let mut score: HashMap<usize, f32> = HashMap::new();
        for t in terms(query) {
            for &d in self.postings.get(&t).into_iter().flatten() {
                *score.entry(d).or_default() += 1.0;
            }
        }
        let mut ranked: Vec<(usize, f32)> = score
            .into_iter()
            .filter(|(d, _)| !exclude.contains(&self.docs[*d].id))
            .collect();
        // best first; ties by corpus order, so the result is deterministic
        ranked.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        Ok(ranked
            .into_iter()
            .take(k)
            .map(|(d, s)| Hit {
                id: self.docs[d].id.clone(),
                title: self.docs[d].title.clone(),
                text: self.docs[d].text.clone(),
                score: s,
            })
            .collect())
    }
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 3 {
        bail!(
            "usage: steper-embed-ort MODEL_DIR CORPUS.jsonl QA.jsonl [LIMIT=3] [DEADLINE_MS=30000]"
        );
    }
    let (model, corpus, qa) = (
        PathBuf::from(&args[0]),
        PathBuf::from(&args[1]),
        PathBuf::from(&args[2]),
    );
    let number = |i: usize, name: &str, default: u64| -> Result<u64> {
        match args.get(i) {
            Some(s) => s
                .parse()
                .with_context(|| format!("{name}: expected a whole number, got {s:?}")),
            None => Ok(default),
        }
    };
    let limit = number(3, "LIMIT", 3)? as usize;
    let deadline_ms = number(4, "DEADLINE_MS", 30_000)?;
    let questions = read_qa(&qa, ReadOptions::default())?.rows;

    let docs = read_corpus(&corpus, ReadOptions::default())?.rows;
    let mut ort = OrtOptions::default();
    if let Some(lib) = std::env::var_os("STEPER_ORT_LIBRARY") {
        ort = ort.with_library(lib);
    }
    let engine = Engine::builder()
        .model_dir(&model)
        .backend(BackendKind::Ort(ort))
        .retriever(Arc::new(OverlapIndex::new(docs)))
        .build()
        .with_context(|| format!("loading {}", model.display()))?;

    let mut options = engine.default_options();
    options.observer = Some(StepObserver::new(|step, held| {
        println!(
            "  step {} ({:?}, {} passages held): {}",
            step.step,
            step.stage,
            held.len(),
            step.sentence
        );
        ControlFlow::Continue(())
    }));
    let (mut em, mut token_f1, mut n) = (0.0, 0.0, 0usize);
    for q in questions.iter().take(limit) {
        println!("{}", q.question);
        options.cancel = Some(Cancel::with_deadline(
            Instant::now() + Duration::from_millis(deadline_ms),
        ));
        let reasoning = engine.reason(&q.question, &options)?;
        println!(
            "  answer: {:?} ({} steps{}); gold {:?}",
            reasoning.answer,
            reasoning.steps.len(),
            if reasoning.forced { ", forced" } else { "" },
            q.answers
        );
        em += exact_match(&reasoning.answer, &q.answers);
        token_f1 += f1(&reasoning.answer, &q.answers);
        n += 1;
    }
    if n == 0 {
        bail!("{}: no questions", qa.display());
    }
    println!(
        "{n} questions: EM {:.1} F1 {:.1}",
        100.0 * em / n as f64,
        100.0 * token_f1 / n as f64
    );
    Ok(())
}
