//! The Self-Ask gold teacher on real MuSiQue and 2WikiMultihopQA questions from `data/`: its
//! traces and step-wise records are the annotated decomposition (follow-ups with `#k`
//! references resolved, intermediate answers, the final answer), each hop's supporting
//! paragraph is among the passages retrieved by then; HotpotQA is refused and decompositions
//! that reference a missing sub-answer are skipped and counted.

use std::path::{Path, PathBuf};
use std::process::Output;

use anyhow::{ensure, Context, Result};
use steper_runtime::data::StepwiseRecord;
use steper_runtime::data::{corpus_from_qa, read_qa, QaExample, ReadOptions, Stage};
use steper_runtime::retrieval::{build_index, IndexOptions};
use steper_runtime::{Bm25Index, Framework, LoopOptions};
use steper_test_support::cli::{self, output_text, path_str};
use steper_train::distill::{distill, DistillOptions, Filter, TraceLine};
use steper_train::teacher::{self_ask_hops, GoldSelfAskTeacher};

/// Questions taken from each data file.
const QUESTIONS: usize = 12;
/// Questions of each file whose every hop must be retrieved (BM25 over the questions' own
/// paragraphs finds nearly all; a test where none is would check nothing).
const MIN_COMPLETE: usize = 8;
/// Steps allowed: the longest decomposition of the sample (5 triples) and the final answer.
const MAX_STEPS: usize = 7;

fn questions(file: &str) -> Result<Vec<QaExample>> {
    let path = steper_test_support::data_file(file)?;
    let mut q = read_qa(&path, ReadOptions::default())?.rows;
    q.truncate(QUESTIONS);
    Ok(q)
}

/// A BM25 index of the questions' own paragraphs in `dir`.
fn index(qs: &[QaExample], dir: &Path) -> Result<PathBuf> {
    let out = dir.join("index");
    build_index(
        &corpus_from_qa(qs),
        &out,
        Path::new("questions"),
        IndexOptions::default(),
    )?;
    Ok(out)
}

fn read_lines<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Vec<T>> {
    std::fs::read_to_string(path)
        .with_context(|| format!("reading {}", path.display()))?
        .lines()
        .map(|l| Ok(serde_json::from_str(l)?))
        .collect()
}

/// Distills `qs` with the Self-Ask gold teacher into `dir/out`: the traces and the records.
fn run(qs: &[QaExample], dir: &Path) -> Result<(Vec<TraceLine>, Vec<StepwiseRecord>)> {
    let idx = Bm25Index::open(&index(qs, dir)?)?;
    let opts = DistillOptions {
        loop_opts: LoopOptions::default()
            .with_framework(Framework::SelfAsk)
            .with_max_steps(MAX_STEPS)
            .with_max_passages(40),
        filter: Filter::None,
        vanilla: false,
        stop_after: None,
    };
    let out = dir.join("out");
    let mut t = GoldSelfAskTeacher::new();
    distill(
        qs,
        &idx,
        &mut t,
        |t, q| {
            t.set_example(q).ok();
        },
        &opts,
        &out,
        false,
    )?;
    Ok((
        read_lines(&out.join("traces.jsonl"))?,
        read_lines(&out.join("stepwise.jsonl"))?,
    ))
}

/// The step sentences the annotation gives for `q`: one hop per sub-question, then the final
/// answer.
fn annotated(q: &QaExample) -> Result<Vec<String>> {
    let hops = self_ask_hops(q).map_err(|e| anyhow::anyhow!("{}: {e}", q.id))?;
    let mut out: Vec<String> = hops
        .iter()
        .map(|h| {
            format!(
                "Follow up: {}\nIntermediate answer: {}",
                h.question, h.answer
            )
        })
        .collect();
    out.push(format!("So the final answer is: {}", q.answers[0]));
    Ok(out)
}

/// Checks the traces and records of `qs` against their decomposition; returns the questions
/// whose every hop was retrieved.
fn check(qs: &[QaExample], traces: &[TraceLine], records: &[StepwiseRecord]) -> Result<usize> {
    ensure!(traces.len() == qs.len(), "{} traces", traces.len());
    let mut complete = 0;
    for (q, t) in qs.iter().zip(traces) {
        assert_eq!(t.qid, q.id);
        let expected = annotated(q)?;
        let got: Vec<String> = t.trace.steps.iter().map(|s| s.sentence.clone()).collect();
        assert_eq!(t.trace.framework, Framework::SelfAsk);
        for s in &got {
            assert!(
                !s.contains('#') || q.question.contains('#'),
                "{}: unresolved reference in {s:?}",
                q.id
            );
        }
        let recs: Vec<&StepwiseRecord> = records.iter().filter(|r| r.qid == q.id).collect();
        assert_eq!(recs.len(), got.len(), "{}", q.id);
        for (i, r) in recs.iter().enumerate() {
            assert_eq!(r.framework, Framework::SelfAsk);
            assert_eq!(r.target, got[i], "{}", q.id);
            assert_eq!(r.reasoning, got[..i].to_vec(), "{}", q.id);
            let stage = if i + 1 == recs.len() {
                Stage::Aggregate
            } else if i == 0 {
                Stage::Init
            } else {
                Stage::Expand
            };
            assert_eq!(r.stage, stage, "{} step {}", q.id, i + 1);
        }
        if t.trace.answer == "unknown" {
            // A hop's paragraph was not retrieved: the hops before it are the annotation's,
            // then that hop is answered `unknown` and the run ends.
            let n = got.len() - 1;
            assert_eq!(got[..n - 1], expected[..n - 1], "{}", q.id);
            assert!(
                got[n - 1].ends_with("Intermediate answer: unknown"),
                "{got:?}"
            );
            continue;
        }
        assert_eq!(got, expected, "{}", q.id);
        assert_eq!(t.trace.answer, q.answers[0]);
        assert!(!t.trace.forced, "{}", q.id);
        // Each hop's supporting paragraph is among the passages its record shows.
        let hops = self_ask_hops(q).map_err(|e| anyhow::anyhow!("{e}"))?;
        for (h, r) in hops.iter().zip(&recs) {
            if let Some(title) = &h.paragraph {
                assert!(
                    r.passages.iter().any(|p| &p.title == title),
                    "{}: hop {:?} without {title:?}",
                    q.id,
                    h.question
                );
            }
        }
        complete += 1;
    }
    Ok(complete)
}

#[test]
fn musique_traces_and_records_are_the_annotated_decomposition() -> Result<()> {
    let qs = questions("musique_train100.jsonl.gz")?;
    let dir = tempfile::tempdir()?;
    let (traces, records) = run(&qs, dir.path())?;
    // The first question, written out: `#1` resolved to the first sub-answer.
    assert_eq!(qs[0].id, "2hop__150763_14904");
    let first: Vec<&str> = traces[0]
        .trace
        .steps
        .iter()
        .map(|s| s.sentence.as_str())
        .collect();
    assert_eq!(
        first,
        vec![
            "Follow up: What company published Journal of Psychotherapy Integration?\nIntermediate answer: American Psychological Association",
            "Follow up: Who was the first president of American Psychological Association?\nIntermediate answer: G. Stanley Hall",
            "So the final answer is: G. Stanley Hall",
        ]
    );
    let complete = check(&qs, &traces, &records)?;
    eprintln!(
        "musique: {complete} of {} questions with every hop retrieved",
        qs.len()
    );
    assert!(complete >= MIN_COMPLETE, "{complete}");
    Ok(())
}

#[test]
fn two_wiki_traces_and_records_are_the_evidence_triples() -> Result<()> {
    let qs = questions("2wikimultihopqa_trainpool960.jsonl.gz")?;
    let dir = tempfile::tempdir()?;
    let (traces, records) = run(&qs, dir.path())?;
    assert_eq!(
        qs[0].question,
        "Who was born later, Alison Winter or Harry J. Anslinger?"
    );
    let first: Vec<&str> = traces[0]
        .trace
        .steps
        .iter()
        .map(|s| s.sentence.as_str())
        .collect();
    assert_eq!(
        first,
        vec![
            "Follow up: What is the date of birth of Alison Winter?\nIntermediate answer: 19 November 1965",
            "Follow up: What is the date of birth of Harry J. Anslinger?\nIntermediate answer: May 20, 1892",
            "So the final answer is: Alison Winter",
        ]
    );
    let complete = check(&qs, &traces, &records)?;
    eprintln!(
        "2wiki: {complete} of {} questions with every hop retrieved",
        qs.len()
    );
    assert!(complete >= MIN_COMPLETE, "{complete}");
    Ok(())
}

fn steper_train(args: &[&str]) -> Result<Output> {
    cli::run(env!("CARGO_BIN_EXE_steper-train"), args)
}

#[test]
fn hotpotqa_is_refused_and_missing_sub_answers_are_skipped_and_counted() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let hotpot = steper_test_support::data_file("hotpotqa_train100.jsonl.gz")?;
    let hq = read_qa(&hotpot, ReadOptions::default())?.rows;
    let hidx = index(&hq[..3], &dir.path().join("h"))?;
    let o = steper_train(&[
        "distill",
        "--teacher",
        "gold",
        "--framework",
        "self-ask",
        "--data",
        path_str(&hotpot),
        "--index",
        path_str(&hidx),
        "--out",
        path_str(&dir.path().join("h-out")),
        "--limit",
        "3",
    ])?;
    assert!(!o.status.success());
    let msg = output_text(&o);
    assert!(
        msg.contains("HotpotQA")
            && msg.contains("decomposition")
            && msg.contains("hotpotqa_train100"),
        "{msg}"
    );

    // Three MuSiQue questions, the second referencing a sub-answer its decomposition lacks.
    let mut qs = questions("musique_train100.jsonl.gz")?;
    qs.truncate(3);
    let steps = qs[1]
        .extra
        .get_mut("question_decomposition")
        .and_then(|v| v.as_array_mut())
        .context("no decomposition")?;
    steps[1]["question"] = serde_json::json!("Who was the first president of #7 ?");
    let data = dir.path().join("musique3.jsonl");
    let mut lines = String::new();
    for q in &qs {
        lines.push_str(&serde_json::to_string(q)?);
        lines.push('\n');
    }
    std::fs::write(&data, lines)?;
    let idx = index(&qs, &dir.path().join("m"))?;
    let out = dir.path().join("m-out");
    let o = steper_train(&[
        "distill",
        "--teacher",
        "gold",
        "--framework",
        "self-ask",
        "--data",
        path_str(&data),
        "--index",
        path_str(&idx),
        "--out",
        path_str(&out),
        "--filter",
        "none",
        "--json",
    ])?;
    ensure!(o.status.success(), "{}", output_text(&o));
    let summary: serde_json::Value = serde_json::from_slice(&o.stdout)?;
    assert_eq!(summary["questions"], 2, "{summary}");
    assert_eq!(summary["skipped_questions"], 1, "{summary}");
    assert_eq!(summary["framework"], "self-ask", "{summary}");
    let stats: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("gold_stats.json"))?)?;
    assert_eq!(stats["skipped_missing_reference"], 1, "{stats}");
    let traces: Vec<TraceLine> = read_lines(&out.join("traces.jsonl"))?;
    let ids: Vec<&str> = traces.iter().map(|t| t.qid.as_str()).collect();
    assert_eq!(ids, vec![qs[0].id.as_str(), qs[2].id.as_str()]);
    Ok(())
}

/// At the last allowed step the answer is forced: the gold answer once every hop is answered
/// (the sentence as an unforced final step would say it), `unknown` before.
#[test]
fn a_forced_final_answer_is_the_gold_one_only_after_every_hop() -> Result<()> {
    let qs = questions("musique_train100.jsonl.gz")?;
    let q = &qs[0];
    let dir = tempfile::tempdir()?;
    let idx = Bm25Index::open(&index(&qs, dir.path())?)?;
    let hops = self_ask_hops(q).map_err(|e| anyhow::anyhow!("{e}"))?.len();
    for (max_steps, answer) in [(hops + 1, q.answers[0].as_str()), (hops, "unknown")] {
        let mut t = GoldSelfAskTeacher::new();
        t.set_example(q).map_err(|e| anyhow::anyhow!("{e}"))?;
        let opts = LoopOptions::default()
            .with_framework(Framework::SelfAsk)
            .with_max_steps(max_steps);
        let r = steper_runtime::reason(&q.question, &idx, &mut t, &opts)?;
        assert!(r.forced, "{r:?}");
        assert_eq!(r.answer, answer);
        assert_eq!(r.steps.len(), max_steps);
        let last = r.steps.last().context("no steps")?;
        assert_eq!(last.sentence, format!("So the final answer is: {answer}"));
    }
    Ok(())
}
