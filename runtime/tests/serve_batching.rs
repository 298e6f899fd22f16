//! Continuous batching in the HTTP service (`ServeConfig::with_batch`), on a loopback port with
//! the tiny exported model and the index of its world (`steper-test-support`): many clients at
//! once, reasoning and greedy completions mixed, each get what the engine gives the same
//! request alone; a streaming client that disconnects mid-batch frees its row; a model without
//! a batched step is refused at start with the option named. Without the fixture the tests fail
//! and say so.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::json;
use steper_loadgen::client::Client;
use steper_runtime::serve::{complete, CompletionRequest, ServeConfig, Server, ServerHandle};
use steper_runtime::{BackendKind, Engine, OrtOptions};

/// Client-side timeout of one request (a hung server fails the test instead of hanging it).
const CLIENT_TIMEOUT: Duration = Duration::from_secs(120);
/// Rows of the batching worker: fewer than the clients, so rows are freed and reused.
const BATCH: usize = 3;
/// Concurrent clients.
const CLIENTS: usize = 6;
/// Requests per client (alternating reasoning and completion).
const PER_CLIENT: usize = 3;
/// max_tokens of the completions.
const MAX_TOKENS: usize = 12;

struct Fixture {
    model: PathBuf,
    index: PathBuf,
    questions: Vec<String>,
}

fn fixture() -> Result<Fixture> {
    let tiny = steper_test_support::tiny()?;
    let questions: Vec<String> = tiny
        .questions("dev")?
        .into_iter()
        .map(|q| q.question)
        .take(CLIENTS * PER_CLIENT)
        .collect();
    anyhow::ensure!(questions.len() >= CLIENTS, "too few dev questions");
    Ok(Fixture {
        model: tiny.export.clone(),
        index: tiny.index.clone(),
        questions,
    })
}

fn ort() -> BackendKind {
    BackendKind::Ort(OrtOptions::default().with_intra_threads(1))
}

fn engine(f: &Fixture, backend: BackendKind) -> Result<Engine> {
    Ok(Engine::builder()
        .model_dir(&f.model)
        .backend(backend)
        .index(&f.index)
        .build()?)
}

fn start(f: &Fixture, batch: usize, backend: BackendKind) -> Result<ServerHandle> {
    let (model, index) = (f.model.clone(), f.index.clone());
    let config = ServeConfig::default()
        .with_addr("127.0.0.1:0".parse().expect("address"))
        .with_workers(1)
        .with_batch(batch)
        .with_max_queue(64)
        .with_timeout(Duration::from_secs(120));
    let h = Server::start(config, move || {
        Engine::builder()
            .model_dir(model)
            .backend(backend)
            .index(index)
            .build()
    })?;
    Ok(h)
}

fn completion_body(question: &str) -> serde_json::Value {
    json!({"prompt": format!("Q: {question}\nA:"), "max_tokens": MAX_TOKENS, "temperature": 0})
}

/// What the engine gives request `i` alone: the answer and step sentences, or the completion
/// text and its token count.
fn alone(direct: &Engine, i: usize, q: &str) -> Result<String> {
    if i.is_multiple_of(2) {
        let r = direct.reason(q, &direct.default_options())?;
        let steps: Vec<&str> = r.steps.iter().map(|s| s.sentence.as_str()).collect();
        Ok(format!("{} | {steps:?}", r.answer))
    } else {
        let req = CompletionRequest::parse(completion_body(q).to_string().as_bytes())
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let c = complete(
            direct.generator(),
            &steper_runtime::Cancel::new(),
            direct.tokenizer(),
            direct.eos_token_ids(),
            &req,
            0,
            &mut |_| true,
        )?
        .map_err(|p| anyhow::anyhow!("{p:?}"))?;
        Ok(format!("{:?} {}", c.text, c.completion_tokens))
    }
}

/// What the server answered request `i`, in the same form.
fn served(c: &mut Client, i: usize, q: &str) -> Result<String> {
    if i.is_multiple_of(2) {
        let r = c.post_json("/v1/reason", &json!({ "question": q }))?;
        anyhow::ensure!(r.status == 200, "{}", String::from_utf8_lossy(&r.body));
        let v = r.json()?;
        let steps: Vec<String> = v["steps"]
            .as_array()
            .context("steps")?
            .iter()
            .map(|s| s["sentence"].as_str().unwrap_or_default().to_string())
            .collect();
        let steps: Vec<&str> = steps.iter().map(String::as_str).collect();
        Ok(format!(
            "{} | {steps:?}",
            v["answer"].as_str().context("answer")?
        ))
    } else {
        let r = c.post_json("/v1/completions", &completion_body(q))?;
        anyhow::ensure!(r.status == 200, "{}", String::from_utf8_lossy(&r.body));
        let v = r.json()?;
        Ok(format!(
            "{:?} {}",
            v["choices"][0]["text"].as_str().context("text")?,
            v["usage"]["completion_tokens"]
        ))
    }
}

#[test]
fn concurrent_greedy_requests_get_what_they_get_alone() -> Result<()> {
    let f = fixture()?;
    let direct = engine(&f, ort())?;
    let h = start(&f, BATCH, ort())?;
    h.wait_ready(CLIENT_TIMEOUT)?;
    let addr = h.addr().to_string();
    let answers: Vec<Vec<(usize, String)>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..CLIENTS)
            .map(|k| {
                let (addr, qs) = (addr.clone(), &f.questions);
                s.spawn(move || -> Result<Vec<(usize, String)>> {
                    let mut c = Client::new(&addr, CLIENT_TIMEOUT)?;
                    (0..PER_CLIENT)
                        .map(|j| {
                            let i = k * PER_CLIENT + j;
                            let q = &qs[i % qs.len()];
                            Ok((i, served(&mut c, i, q)?))
                        })
                        .collect()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().map_err(|_| anyhow::anyhow!("client panicked"))?)
            .collect::<Result<Vec<_>>>()
    })?;
    let metrics = Client::new(&addr, CLIENT_TIMEOUT)?.get("/metrics")?;
    h.shutdown()?;
    let mut checked = 0;
    for (i, got) in answers.into_iter().flatten() {
        let q = &f.questions[i % f.questions.len()];
        assert_eq!(got, alone(&direct, i, q)?, "request {i}: {q}");
        checked += 1;
    }
    assert_eq!(checked, CLIENTS * PER_CLIENT);
    assert_eq!(metrics.status, 200);
    Ok(())
}

/// Sends a streaming request, reads the status line and the first event, and closes the
/// connection in the middle of the stream; returns the status line.
fn first_event_then_drop(addr: &str, path: &str, body: &serde_json::Value) -> Result<String> {
    use std::io::{BufRead, BufReader, Write};
    let body = body.to_string();
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut r = BufReader::new(s);
    let mut status = String::new();
    r.read_line(&mut status)?;
    let mut line = String::new();
    loop {
        line.clear();
        anyhow::ensure!(
            r.read_line(&mut line)? > 0,
            "the stream ended before an event"
        );
        if line.starts_with("data:") {
            break;
        }
    }
    Ok(status)
}

#[test]
fn a_streaming_client_gone_mid_batch_frees_its_row() -> Result<()> {
    let f = fixture()?;
    let direct = engine(&f, ort())?;
    // Two rows, three abandoned streams: the later requests can only run once the abandoned
    // ones left their rows.
    let h = start(&f, 2, ort())?;
    h.wait_ready(CLIENT_TIMEOUT)?;
    let addr = h.addr().to_string();
    for round in 0..3 {
        let body = json!({"prompt": format!("Q: {}\nA:", f.questions[round]), "max_tokens": 200, "temperature": 0, "stream": true});
        let status = first_event_then_drop(&addr, "/v1/completions", &body)?;
        assert!(status.contains(" 200 "), "round {round}: {status}");
    }
    // Both rows must be free again: two requests at once are answered as alone.
    let answers: Vec<Result<(usize, String)>> = std::thread::scope(|s| {
        let handles: Vec<_> = [1usize, 2]
            .into_iter()
            .map(|i| {
                let (addr, q) = (addr.clone(), f.questions[i].clone());
                s.spawn(move || -> Result<(usize, String)> {
                    let mut c = Client::new(&addr, CLIENT_TIMEOUT)?;
                    Ok((i, served(&mut c, i, &q)?))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("client panicked")))
            })
            .collect()
    });
    h.shutdown()?;
    for a in answers {
        let (i, got) = a?;
        assert_eq!(got, alone(&direct, i, &f.questions[i])?, "request {i}");
    }
    Ok(())
}

#[test]
fn a_batch_of_zero_is_refused_naming_the_option() -> Result<()> {
    let f = fixture()?;
    let err = start(&f, 0, ort())
        .err()
        .context("batch 0 must be refused")?;
    assert!(format!("{err:#}").contains("batch"), "{err:#}");
    Ok(())
}
