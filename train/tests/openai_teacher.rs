//! The OpenAI-compatible teacher against a loopback HTTP server started by each test: retries
//! (429 with Retry-After, 500s up to the limit, timeouts, refused connections), errors that are
//! not retried (401, malformed JSON), the request bodies of both endpoints, and a full,
//! resumable, concurrent distillation through a server whose answers follow the gold chain.

use std::collections::HashMap;
use std::io::Write;
use std::net::TcpListener;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::Result;
use serde_json::{json, Value};
use steper_runtime::data::{read_qa, PromptPassage, QaExample, ReadOptions};
use steper_runtime::retrieval::{build_index, Bm25Index, IndexOptions};
use steper_runtime::{LoopOptions, StepModel, StepRequest};
use steper_test_support::fake_http::{FakeServer, Reply};
use steper_train::distill::{distill, distill_pool, DistillOptions, Filter};
use steper_train::synth::{generate_world, write_world, SynthConfig};
use steper_train::teacher::{GoldTeacher, OpenAiConfig, OpenAiTeacher, TeacherPrompt};

fn completion(text: &str) -> String {
    json!({"choices": [{"text": text, "index": 0}], "usage": {"completion_tokens": 3}}).to_string()
}

/// A config for tests: tiny backoff so only Retry-After can make a retry wait long.
fn config(url: &str) -> OpenAiConfig {
    let mut c = OpenAiConfig::new(url, "tiny-teacher");
    c.backoff_base = Duration::from_millis(1);
    c.backoff_max = Duration::from_secs(5);
    c.timeout = Duration::from_secs(10);
    c.max_retries = 3;
    c
}

const PROMPT: &str = "Wikipedia Title: Bodris\nBodris is a city located in Soulos.\n\nQ: In which country is Bodris?\nA:";

fn ask(t: &mut OpenAiTeacher) -> steper_runtime::Result<steper_runtime::StepOutput> {
    let passages = [PromptPassage {
        title: "Bodris".into(),
        text: "Bodris is a city located in Soulos.".into(),
    }];
    t.generate(&StepRequest {
        question: "In which country is Bodris?",
        step: 1,
        forced: false,
        passages: &passages,
        reasoning: &[],
        prompt: PROMPT,
        max_new_tokens: 48,
        cancel: None,
    })
}

#[test]
fn a_429_is_retried_after_retry_after() -> Result<()> {
    let server = FakeServer::start(|n, _| match n {
        0 => Reply::Json(
            429,
            vec![("Retry-After", "1".into())],
            json!({"error": {"message": "slow down"}}).to_string(),
        ),
        _ => Reply::Json(200, Vec::new(), completion(" Bodris is in Soulos.")),
    })?;
    let mut t = OpenAiTeacher::new(config(&server.url), None)?;
    let out = ask(&mut t)?;
    assert_eq!(out.text, " Bodris is in Soulos.");
    assert_eq!(
        out.new_tokens, 3,
        "usage.completion_tokens is the token count"
    );
    let seen = server.seen();
    assert_eq!(seen.len(), 2);
    // The backoff alone would wait ≤ 1 ms; the second request must come after Retry-After.
    let gap = seen[1].at.duration_since(seen[0].at);
    assert!(
        gap >= Duration::from_millis(950),
        "retry came {gap:?} after a 429 with Retry-After: 1"
    );
    assert_eq!(
        t.stats().retries.load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    Ok(())
}

#[test]
fn persistent_500s_end_in_an_error_after_the_retry_limit() -> Result<()> {
    let server = FakeServer::start(|_, _| {
        Reply::Json(
            500,
            Vec::new(),
            json!({"error": {"message": "model crashed"}}).to_string(),
        )
    })?;
    let mut c = config(&server.url);
    c.max_retries = 2;
    let mut t = OpenAiTeacher::new(c, None)?;
    let e = ask(&mut t).unwrap_err().to_string();
    assert_eq!(server.seen().len(), 3, "one attempt and two retries");
    assert!(
        e.contains("gave up after 3 attempts")
            && e.contains("HTTP 500")
            && e.contains("model crashed")
            && e.contains("/v1/completions"),
        "{e}"
    );
    Ok(())
}

#[test]
fn a_401_is_not_retried() -> Result<()> {
    let server = FakeServer::start(|_, _| {
        Reply::Json(
            401,
            Vec::new(),
            json!({"error": {"message": "invalid api key"}}).to_string(),
        )
    })?;
    let mut t = OpenAiTeacher::new(config(&server.url), None)?;
    let e = ask(&mut t).unwrap_err().to_string();
    assert_eq!(server.seen().len(), 1);
    assert!(
        e.contains("HTTP 401") && e.contains("not retried") && e.contains("invalid api key"),
        "{e}"
    );
    Ok(())
}

#[test]
fn a_slow_server_times_out_with_a_clear_error() -> Result<()> {
    let server =
        FakeServer::start(|_, _| Reply::Slow(Duration::from_secs(3), completion(" too late.")))?;
    let mut c = config(&server.url);
    c.timeout = Duration::from_millis(300);
    c.max_retries = 1;
    let mut t = OpenAiTeacher::new(c, None)?;
    let e = ask(&mut t).unwrap_err().to_string();
    assert!(
        e.contains("timed out") && e.contains("gave up after 2 attempts"),
        "{e}"
    );
    assert_eq!(server.seen().len(), 2, "a timeout is retried");
    Ok(())
}

#[test]
fn a_refused_connection_is_retried_then_reported() -> Result<()> {
    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let mut c = config(&format!("http://127.0.0.1:{port}"));
    c.max_retries = 1;
    let mut t = OpenAiTeacher::new(c, None)?;
    let e = ask(&mut t).unwrap_err().to_string();
    assert!(
        e.contains("gave up after 2 attempts") && e.contains(&port.to_string()),
        "{e}"
    );
    Ok(())
}

#[test]
fn malformed_answers_name_the_field() -> Result<()> {
    let server = FakeServer::start(|n, _| match n {
        0 => Reply::Json(200, Vec::new(), r#"{"choices": [{"txt": "x"}]}"#.into()),
        1 => Reply::Json(200, Vec::new(), r#"{"object": "text_completion"}"#.into()),
        _ => Reply::Json(200, Vec::new(), "<html>oops</html>".into()),
    })?;
    let mut t = OpenAiTeacher::new(config(&server.url), None)?;
    let e = ask(&mut t).unwrap_err().to_string();
    assert!(e.contains("`choices[0].text` missing"), "{e}");
    let e = ask(&mut t).unwrap_err().to_string();
    assert!(e.contains("`choices` missing"), "{e}");
    let e = ask(&mut t).unwrap_err().to_string();
    assert!(e.contains("not JSON") && e.contains("<html>"), "{e}");
    assert_eq!(server.seen().len(), 3, "malformed answers are not retried");
    Ok(())
}

#[test]
fn completion_and_chat_request_bodies() -> Result<()> {
    let server = FakeServer::start(|_, req| {
        if req.path == "/v1/chat/completions" {
            Reply::Json(
                200,
                Vec::new(),
                json!({"choices": [{"message": {"role": "assistant", "content": "Bodris is in Soulos."}}]})
                    .to_string(),
            )
        } else {
            Reply::Json(200, Vec::new(), completion(" Bodris is in Soulos."))
        }
    })?;
    let header = TeacherPrompt::default_fewshot()?;
    let mut c = config(&format!("{}/v1", server.url));
    c.api_key = Some("sk-test".into());
    c.prompt = Some(header.clone());
    let mut t = OpenAiTeacher::new(c.clone(), None)?;
    ask(&mut t)?;
    c.chat = true;
    let mut chat = OpenAiTeacher::new(c, None)?;
    let out = ask(&mut chat)?;
    assert_eq!(out.text, "Bodris is in Soulos.");
    // No usage in the chat answer: tokens are estimated (⌈20 chars / 4⌉).
    assert_eq!(out.new_tokens, 5);

    let seen = server.seen();
    assert_eq!(seen.len(), 2);
    let (comp, chat) = (&seen[0], &seen[1]);
    assert_eq!(comp.path, "/v1/completions");
    assert_eq!(chat.path, "/v1/chat/completions");
    for r in [comp, chat] {
        assert_eq!(
            r.headers.get("authorization").map(String::as_str),
            Some("Bearer sk-test")
        );
        assert_eq!(r.body["model"], "tiny-teacher");
        assert_eq!(r.body["max_tokens"], 48);
        assert_eq!(r.body["stop"], json!(["\n"]));
        assert_eq!(r.body["temperature"], 0.0);
    }
    let prompt = comp.body["prompt"].as_str().unwrap_or_default();
    assert!(prompt.starts_with(&header.instruction), "{prompt}");
    assert!(prompt.ends_with(&format!("\n\n{PROMPT}")), "{prompt}");
    assert!(prompt.contains("So the answer is: Roanne."));
    let msgs = chat.body["messages"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(msgs.len(), 2);
    assert_eq!(msgs[0]["role"], "system");
    assert_eq!(msgs[0]["content"], header.instruction.as_str());
    assert_eq!(msgs[1]["role"], "user");
    let user = msgs[1]["content"].as_str().unwrap_or_default();
    assert!(user.ends_with(PROMPT) && user.contains("So the answer is: Illinois."));
    assert!(chat.body.get("prompt").is_none());

    // Without a key nothing is sent.
    let mut plain = OpenAiTeacher::new(config(&server.url), None)?;
    ask(&mut plain)?;
    let seen = server.seen();
    assert!(!seen[2].headers.contains_key("authorization"));
    assert_eq!(seen[2].body["prompt"], PROMPT);
    Ok(())
}

// ----- a full distillation through a server that answers like the gold teacher -----

/// Parses a student prompt back into passages, question, prior sentences and whether it is the
/// forced step.
fn parse_prompt(prompt: &str) -> Option<(Vec<PromptPassage>, String, Vec<String>, bool)> {
    let q_at = prompt.rfind("Q: ")?;
    let (head, tail) = prompt.split_at(q_at);
    let mut passages = Vec::new();
    for block in head.split("\n\n").filter(|b| !b.trim().is_empty()) {
        let (title, text) = block.strip_prefix("Wikipedia Title: ")?.split_once('\n')?;
        passages.push(PromptPassage {
            title: title.to_string(),
            text: text.to_string(),
        });
    }
    let (question, answer) = tail.strip_prefix("Q: ")?.split_once("\nA:")?;
    let stop = "So the answer is:";
    let forced = answer.ends_with(stop);
    let answer = answer.strip_suffix(stop).unwrap_or(answer);
    let reasoning = steper_train::teacher::sentences(answer);
    Some((passages, question.to_string(), reasoning, forced))
}

/// A fake server whose completions are the gold teacher's sentences for the question in the
/// prompt (a fresh gold teacher at each question's first step).
fn gold_server(questions: Vec<QaExample>) -> Result<FakeServer> {
    let by_q: HashMap<String, QaExample> = questions
        .into_iter()
        .map(|q| (q.question.clone(), q))
        .collect();
    let state: Mutex<HashMap<String, GoldTeacher>> = Mutex::new(HashMap::new());
    FakeServer::start(move |_, req| {
        let prompt = req.body["prompt"].as_str().unwrap_or_default();
        let Some((passages, question, reasoning, forced)) = parse_prompt(prompt) else {
            return Reply::Json(
                400,
                Vec::new(),
                json!({"error": {"message": "bad prompt"}}).to_string(),
            );
        };
        let Some(ex) = by_q.get(&question) else {
            return Reply::Json(
                404,
                Vec::new(),
                json!({"error": {"message": "unknown question"}}).to_string(),
            );
        };
        let mut state = state.lock().unwrap();
        if reasoning.is_empty() && !forced {
            let mut g = GoldTeacher::new();
            g.set_example(ex);
            state.insert(question.clone(), g);
        }
        let Some(g) = state.get_mut(&question) else {
            return Reply::Json(500, Vec::new(), "{}".into());
        };
        let out = g.generate(&StepRequest {
            question: &question,
            step: reasoning.len() + 1,
            forced,
            passages: &passages,
            reasoning: &reasoning,
            prompt,
            max_new_tokens: 48,
            cancel: None,
        });
        match out {
            Ok(o) => Reply::Json(
                200,
                Vec::new(),
                json!({"choices": [{"text": format!(" {}", o.text)}], "usage": {"completion_tokens": o.new_tokens}})
                    .to_string(),
            ),
            Err(e) => Reply::Json(500, Vec::new(), json!({"error": {"message": e.to_string()}}).to_string()),
        }
    })
}

fn synth(dir: &std::path::Path) -> Result<(Vec<QaExample>, Bm25Index)> {
    let w = generate_world(&SynthConfig {
        people: 30,
        companies: 8,
        cities: 8,
        countries: 4,
        questions_per_hop: 6,
        ..Default::default()
    });
    write_world(&w, &dir.join("world"))?;
    let corpus =
        steper_runtime::data::read_corpus(&dir.join("world/corpus.jsonl"), ReadOptions::default())?
            .rows;
    build_index(
        &corpus,
        &dir.join("index"),
        &dir.join("world/corpus.jsonl"),
        IndexOptions::default(),
    )?;
    let qs = read_qa(&dir.join("world/train.jsonl"), ReadOptions::default())?.rows;
    Ok((qs, Bm25Index::open(&dir.join("index"))?))
}

fn opts(stop_after: Option<usize>) -> DistillOptions {
    DistillOptions {
        loop_opts: LoopOptions::default(),
        filter: Filter::Em,
        vanilla: true,
        stop_after,
    }
}

/// The lines of an output file without timings (they differ between runs).
fn lines(dir: &std::path::Path, f: &str) -> Result<Vec<Value>> {
    let text = std::fs::read_to_string(dir.join(f))?;
    text.lines()
        .map(|l| {
            let mut v: Value = serde_json::from_str(l)?;
            if let Some(steps) = v.pointer_mut("/trace/steps").and_then(|s| s.as_array_mut()) {
                for s in steps {
                    if let Some(o) = s.as_object_mut() {
                        for k in ["retrieval_ms", "prefill_ms", "decode_ms"] {
                            o.remove(k);
                        }
                    }
                }
            }
            Ok(v)
        })
        .collect()
}

#[test]
fn distill_through_the_server_matches_the_gold_teacher_and_resumes() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let (qs, index) = synth(tmp.path())?;
    let qs: Vec<QaExample> = qs.into_iter().take(8).collect();
    assert_eq!(qs.len(), 8);
    let server = gold_server(qs.clone())?;
    let teacher = OpenAiTeacher::new(config(&server.url), None)?;

    // Reference: the gold teacher run in-process.
    let gold_dir = tmp.path().join("gold");
    let mut g = GoldTeacher::new();
    let s_gold = distill(
        &qs,
        &index,
        &mut g,
        |t, q| t.set_example(q),
        &opts(None),
        &gold_dir,
        false,
    )?;
    assert!(s_gold.passed > 0);

    // Through HTTP, one question at a time, uninterrupted.
    let full = tmp.path().join("full");
    let mut one = teacher.clone();
    let s_full = distill(&qs, &index, &mut one, |_, _| {}, &opts(None), &full, false)?;
    assert_eq!(s_full.questions, 8);
    assert_eq!(s_full.passed, s_gold.passed);
    assert_eq!(s_full.records, s_gold.records);
    let sentences = |dir: &std::path::Path| -> Result<Vec<Value>> {
        Ok(lines(dir, "traces.jsonl")?
            .into_iter()
            .map(|v| {
                let s: Vec<Value> = v["trace"]["steps"]
                    .as_array()
                    .map(|a| a.iter().map(|s| s["sentence"].clone()).collect())
                    .unwrap_or_default();
                json!([v["qid"], v["prediction"], v["passed"], s])
            })
            .collect())
    };
    assert_eq!(sentences(&full)?, sentences(&gold_dir)?);
    let recs = lines(&full, "stepwise.jsonl")?;
    assert!(recs.iter().all(|r| r["teacher"] == "openai:tiny-teacher"));
    assert!(recs
        .iter()
        .all(|r| !r["question"].as_str().unwrap_or("").is_empty()));

    // Killed after 3 questions (with a torn record line), then resumed with 3 in flight.
    let part = tmp.path().join("part");
    let s1 = distill(
        &qs,
        &index,
        &mut one,
        |_, _| {},
        &opts(Some(3)),
        &part,
        false,
    )?;
    assert_eq!(s1.questions, 3);
    {
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(part.join("stepwise.jsonl"))?;
        writeln!(f, "{{\"qid\": \"{}\", \"stage\": \"init\"", qs[3].id)?;
    }
    let mut pool = vec![teacher.clone(), teacher.clone(), teacher.clone()];
    let s2 = distill_pool(&qs, &index, &mut pool, |_, _| {}, &opts(None), &part, false)?;
    assert_eq!(s2.new_questions, 5);
    for f in ["traces.jsonl", "stepwise.jsonl", "vanilla.jsonl"] {
        assert_eq!(
            lines(&full, f)?,
            lines(&part, f)?,
            "{f} differs after resume"
        );
    }
    assert_eq!(s2.records, s_full.records);
    Ok(())
}

#[test]
fn a_failing_question_stops_a_concurrent_run_keeping_earlier_ones() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let (qs, index) = synth(tmp.path())?;
    let qs: Vec<QaExample> = qs.into_iter().take(6).collect();
    let bad = qs[3].question.clone();
    let inner = gold_server(qs.clone())?;
    let inner_url = inner.url.clone();
    // A proxy that refuses question 4 with a 400 and forwards the rest to the gold server.
    let server = FakeServer::start(move |_, req| {
        let prompt = req.body["prompt"].as_str().unwrap_or_default();
        if prompt.contains(&format!("Q: {bad}\n")) {
            return Reply::Json(
                400,
                Vec::new(),
                json!({"error": {"message": "context too long"}}).to_string(),
            );
        }
        let mut t = OpenAiTeacher::new(config(&inner_url), None).expect("teacher");
        let p = [PromptPassage {
            title: String::new(),
            text: String::new(),
        }];
        let body = t
            .generate(&StepRequest {
                question: "",
                step: 1,
                forced: false,
                passages: &p,
                reasoning: &[],
                prompt,
                max_new_tokens: 48,
                cancel: None,
            })
            .map(|o| {
                json!({"choices": [{"text": o.text}], "usage": {"completion_tokens": o.new_tokens}})
                    .to_string()
            });
        match body {
            Ok(b) => Reply::Json(200, Vec::new(), b),
            Err(e) => Reply::Json(
                500,
                Vec::new(),
                json!({"error": {"message": e.to_string()}}).to_string(),
            ),
        }
    })?;
    let teacher = OpenAiTeacher::new(config(&server.url), None)?;
    let mut pool = vec![teacher.clone(), teacher.clone()];
    let out = tmp.path().join("out");
    let e = distill_pool(&qs, &index, &mut pool, |_, _| {}, &opts(None), &out, false)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("HTTP 400") && e.contains("context too long"),
        "{e}"
    );
    let done: Vec<String> = lines(&out, "traces.jsonl")?
        .iter()
        .map(|v| v["qid"].as_str().unwrap_or_default().to_string())
        .collect();
    let want: Vec<String> = qs[..3].iter().map(|q| q.id.clone()).collect();
    assert_eq!(
        done, want,
        "questions before the failing one are written, in order"
    );
    Ok(())
}
