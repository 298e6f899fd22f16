//! The two halves of the toolchain talking to each other: `steper-run serve`'s OpenAI-compatible
//! `/v1/completions`, started in-process on the tiny export (`steper-test-support`), is the teacher
//! of `steper-train distill --teacher openai:URL` on a few questions of the export's world. The
//! tiny student is no good teacher (its pass rate may be 0); the test checks that every question
//! gets a trace through HTTP and that the records match the traces, and that a resumed run
//! equals an uninterrupted one. The same through `/v1/chat/completions`
//! (`--teacher-chat` / `--prompt-format chat`) on a copy of the export given a chat template.
//!
//! These live here rather than in train/tests: this crate already builds the runtime with its
//! server and steper-train's library together; the teacher is configured as the binary's
//! `--teacher-chat` configures it (train/tests/distill_prompt_format.rs checks that mapping).

use std::path::Path;
use std::time::Duration;

use anyhow::Result;
use steper_runtime::data::StepwiseRecord;
use steper_runtime::retrieval::Bm25Index;
use steper_runtime::serve::{Endpoint, ServeConfig, Server, ServerHandle};
use steper_runtime::LoopOptions;
use steper_runtime::{BackendKind, Engine, OrtOptions};
use steper_train::distill::{distill, distill_pool, DistillOptions, Filter, TraceLine};
use steper_train::teacher::{OpenAiConfig, OpenAiTeacher};

/// Questions distilled through the server.
const QUESTIONS: usize = 6;
/// Tokens held back from the export's context: the server's tokenization of the prompt may
/// differ slightly from the teacher's count (special tokens).
const CONTEXT_MARGIN: usize = 16;

fn lines(path: &Path) -> Result<Vec<serde_json::Value>> {
    std::fs::read_to_string(path)?
        .lines()
        .map(|l| Ok(serde_json::from_str(l)?))
        .collect()
}

/// `steper-run serve` on `model` (ORT, one intra-op thread per worker) under `name`, and an
/// OpenAI teacher configuration for it whose prompts fit the export's context.
fn serve_and_teacher_config(
    model: &Path,
    index: &Path,
    name: &str,
    workers: usize,
    base_path: &str,
) -> Result<(ServerHandle, OpenAiConfig, tokenizers::Tokenizer)> {
    let (m, i) = (model.to_path_buf(), index.to_path_buf());
    let server = Server::start(
        ServeConfig::default()
            .with_addr("127.0.0.1:0".parse()?)
            .with_workers(workers)
            .with_max_body_bytes(1 << 20)
            .with_model_name(name),
        move || {
            Engine::builder()
                .model_dir(m)
                .backend(BackendKind::Ort(
                    OrtOptions::default().with_intra_threads(1),
                ))
                .index(i)
                .build()
        },
    )?;
    server.wait_ready(Duration::from_secs(120))?;
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(model.join("steper.json"))?)?;
    let context = manifest["context_length"]
        .as_u64()
        .or_else(|| manifest["context"].as_u64())
        .unwrap_or(1024) as usize;
    let tokenizer = tokenizers::Tokenizer::from_file(model.join("tokenizer.json"))
        .map_err(anyhow::Error::msg)?;
    let mut cfg = OpenAiConfig::new(format!("http://{}{base_path}", server.addr()), name);
    cfg.context = Some(context - CONTEXT_MARGIN);
    cfg.timeout = Duration::from_secs(120);
    cfg.max_retries = 2;
    Ok((server, cfg, tokenizer))
}

#[test]
fn distill_with_steper_run_serve_as_teacher() -> Result<()> {
    let tiny = steper_test_support::tiny()?;
    let model = tiny.export.clone();
    let index_dir = tiny.index.clone();
    let tmp = tempfile::tempdir()?;
    let qs: Vec<_> = tiny
        .questions("train")?
        .into_iter()
        .take(QUESTIONS)
        .collect();
    assert_eq!(qs.len(), QUESTIONS);

    let (server, cfg, tokenizer) =
        serve_and_teacher_config(&model, &index_dir, "tiny-student", 2, "")?;
    let teacher = OpenAiTeacher::new(cfg, Some(tokenizer))?;

    let index = Bm25Index::open(&index_dir)?;
    let opts = |stop_after| DistillOptions {
        loop_opts: LoopOptions::default().with_max_sentence_tokens(24),
        filter: Filter::Acc,
        vanilla: false,
        stop_after,
    };
    let full = tmp.path().join("full");
    let mut one = teacher.clone();
    let s = distill(&qs, &index, &mut one, |_, _| {}, &opts(None), &full, false)?;
    eprintln!(
        "tiny student as teacher through steper-run serve: {}",
        serde_json::to_string(&s)?
    );
    assert_eq!(s.questions, QUESTIONS);
    assert!(
        teacher
            .stats()
            .ok
            .load(std::sync::atomic::Ordering::Relaxed)
            >= QUESTIONS as u64
    );

    let traces: Vec<TraceLine> = lines(&full.join("traces.jsonl"))?
        .into_iter()
        .map(serde_json::from_value)
        .collect::<std::result::Result<_, _>>()?;
    let records: Vec<StepwiseRecord> = lines(&full.join("stepwise.jsonl"))?
        .into_iter()
        .map(serde_json::from_value)
        .collect::<std::result::Result<_, _>>()?;
    assert_eq!(
        traces.iter().map(|t| t.qid.as_str()).collect::<Vec<_>>(),
        qs.iter().map(|q| q.id.as_str()).collect::<Vec<_>>()
    );
    let mut expected_records = 0;
    for t in &traces {
        assert!(!t.trace.steps.is_empty());
        assert!(
            t.trace.steps.iter().any(|st| st.new_tokens > 0),
            "{}: nothing generated",
            t.qid
        );
        let recs: Vec<&StepwiseRecord> = records.iter().filter(|r| r.qid == t.qid).collect();
        if t.passed {
            expected_records += t.trace.steps.len();
            assert_eq!(recs.len(), t.trace.steps.len());
            for (r, st) in recs.iter().zip(&t.trace.steps) {
                assert_eq!((r.stage, &r.target), (st.stage, &st.sentence));
                assert_eq!(r.teacher, "openai:tiny-student");
            }
        } else {
            assert!(recs.is_empty());
        }
    }
    assert_eq!(records.len(), expected_records);
    assert_eq!(s.records.iter().sum::<usize>(), expected_records);

    // Greedy decoding on the server: a killed-and-resumed run (two in flight) equals the
    // uninterrupted one.
    let part = tmp.path().join("part");
    distill(
        &qs,
        &index,
        &mut one,
        |_, _| {},
        &opts(Some(2)),
        &part,
        false,
    )?;
    let mut pool = vec![teacher.clone(), teacher.clone()];
    distill_pool(&qs, &index, &mut pool, |_, _| {}, &opts(None), &part, false)?;
    let strip = |p: &Path| -> Result<Vec<serde_json::Value>> {
        let mut v = lines(&p.join("traces.jsonl"))?;
        for t in &mut v {
            for st in t["trace"]["steps"].as_array_mut().into_iter().flatten() {
                if let Some(o) = st.as_object_mut() {
                    for k in ["retrieval_ms", "prefill_ms", "decode_ms"] {
                        o.remove(k);
                    }
                }
            }
        }
        Ok(v)
    };
    assert_eq!(strip(&full)?, strip(&part)?, "resumed run differs");
    server.shutdown()?;
    Ok(())
}

/// Questions distilled through `/v1/chat/completions`.
const CHAT_QUESTIONS: usize = 3;

/// Qwen2.5's ChatML layout without its tool branch.
const CHATML: &str = "{%- for message in messages %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}";

#[test]
fn distill_with_teacher_chat_against_serve_chat_completions() -> Result<()> {
    let tiny = steper_test_support::tiny()?;
    let tmp = tempfile::tempdir()?;
    // A copy of the tiny export whose tokenizer_config.json carries the template.
    let model = steper_test_support::copy_with_chat_template(
        &tiny.export,
        &tmp.path().join("tiny-chat"),
        Some(CHATML),
    )?;
    let qs: Vec<_> = tiny
        .questions("train")?
        .into_iter()
        .take(CHAT_QUESTIONS)
        .collect();
    assert_eq!(qs.len(), CHAT_QUESTIONS);

    // `--teacher openai:http://ADDR/v1 --teacher-model tiny-chat --teacher-chat`.
    let (server, mut cfg, tokenizer) =
        serve_and_teacher_config(&model, &tiny.index, "tiny-chat", 1, "/v1")?;
    cfg.chat = true;
    let teacher = OpenAiTeacher::new(cfg, Some(tokenizer))?;
    assert!(teacher.endpoint().ends_with("/v1/chat/completions"));

    let index = Bm25Index::open(&tiny.index)?;
    let opts = DistillOptions {
        loop_opts: LoopOptions::default()
            .with_max_steps(3)
            .with_max_sentence_tokens(16),
        filter: Filter::None,
        vanilla: false,
        stop_after: None,
    };
    let out = tmp.path().join("chat");
    let mut t = teacher.clone();
    let s = distill(&qs, &index, &mut t, |_, _| {}, &opts, &out, false)?;
    eprintln!(
        "tiny student as chat teacher through steper-run serve: {}",
        serde_json::to_string(&s)?
    );
    assert_eq!((s.questions, s.passed), (CHAT_QUESTIONS, CHAT_QUESTIONS));

    let traces: Vec<TraceLine> = lines(&out.join("traces.jsonl"))?
        .into_iter()
        .map(serde_json::from_value)
        .collect::<std::result::Result<_, _>>()?;
    let records: Vec<StepwiseRecord> = lines(&out.join("stepwise.jsonl"))?
        .into_iter()
        .map(serde_json::from_value)
        .collect::<std::result::Result<_, _>>()?;
    let mut steps = 0;
    for tr in &traces {
        let recs: Vec<&StepwiseRecord> = records.iter().filter(|r| r.qid == tr.qid).collect();
        assert_eq!(recs.len(), tr.trace.steps.len(), "{}", tr.qid);
        assert_eq!(
            recs.first().map(|r| r.stage),
            Some(steper_runtime::data::Stage::Init)
        );
        for (r, st) in recs.iter().zip(&tr.trace.steps) {
            assert_eq!((r.stage, &r.target), (st.stage, &st.sentence), "{}", tr.qid);
            assert_eq!(r.teacher, "openai:tiny-chat");
            assert!(!r.target.contains("<|im_"), "{}: {:?}", tr.qid, r.target);
        }
        steps += tr.trace.steps.len();
    }
    assert_eq!(records.len(), steps);
    // One chat request per step, and none on the completions endpoint.
    let metrics = server.metrics();
    assert_eq!(
        metrics.requests(Endpoint::ChatCompletions, 200),
        steps as u64
    );
    assert_eq!(metrics.requests(Endpoint::Completions, 200), 0);
    assert_eq!(
        teacher
            .stats()
            .ok
            .load(std::sync::atomic::Ordering::Relaxed),
        steps as u64
    );
    server.shutdown()?;
    Ok(())
}
