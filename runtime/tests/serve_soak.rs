//! The soak of `steper-loadgen` for a few seconds against the HTTP service on a loopback port
//! with the tiny export of `steper-test-support` (behind an API key): every kind of request is
//! sent, valid ones are answered 200 / 503 / 504, bad ones 4xx, nothing is reset, and the server
//! still answers correctly afterwards. The same soak without the key must fail its verdict.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Result;
use serde_json::json;
use steper_loadgen::client::Client;
use steper_loadgen::soak::{run_soak, SoakKind, SoakOptions};
use steper_runtime::serve::{ApiKey, ErrorKind, ServeConfig, Server, ServerHandle};
use steper_runtime::{BackendKind, Engine, OrtOptions};

/// Client-side timeout of one valid request.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the model may take to load.
const LOAD_LIMIT: Duration = Duration::from_secs(60);
/// The server's body limit.
const BODY_LIMIT: usize = 4096;
const KEY: &str = "soak-key";
/// Requests of each kind the soak must have sent at least (so every path was exercised).
const MIN_PER_KIND: usize = 2;

fn start(key: &str) -> Result<(ServerHandle, Vec<String>)> {
    let tiny = steper_test_support::tiny()?;
    let questions: Vec<String> = tiny
        .questions("dev")?
        .into_iter()
        .map(|q| q.question)
        .take(20)
        .collect();
    let config = ServeConfig::default()
        .with_addr("127.0.0.1:0".parse()?)
        .with_workers(2)
        .with_max_queue(8)
        .with_timeout(Duration::from_secs(30))
        .with_max_body_bytes(BODY_LIMIT)
        .with_api_key(ApiKey::new(key)?);
    let (model, index) = (tiny.export.clone(), tiny.index.clone());
    let h = Server::start(config, move || {
        Engine::builder()
            .model_dir(model)
            .backend(BackendKind::Ort(
                OrtOptions::default().with_intra_threads(1),
            ))
            .index(index)
            .build()
    })?;
    h.wait_ready(LOAD_LIMIT)?;
    Ok((h, questions))
}

fn options(h: &ServerHandle, questions: &[String], seconds: u64, key: &str) -> SoakOptions {
    SoakOptions {
        addr: h.addr().to_string(),
        clients: 8,
        duration: Duration::from_secs(seconds),
        questions: questions.to_vec(),
        max_tokens: 4,
        max_steps: Some(2),
        body_limit: BODY_LIMIT,
        slow_body: Duration::from_millis(600),
        sample_every: Duration::from_millis(500),
        request_timeout: CLIENT_TIMEOUT,
        server_pid: None,
        api_key: Some(key.to_string()),
        warmup: steper_loadgen::soak::DEFAULT_WARMUP,
    }
}

fn answer(c: &mut Client, q: &str) -> Result<serde_json::Value> {
    let r = c.post_json("/v1/reason", &json!({"question": q}))?;
    anyhow::ensure!(
        r.status == 200,
        "status {}: {}",
        r.status,
        String::from_utf8_lossy(&r.body)
    );
    Ok(r.json()?["answer"].clone())
}

#[test]
fn a_short_soak_gets_the_answer_each_kind_must_get_and_the_server_survives() -> Result<()> {
    let (h, questions) = start(KEY)?;
    let mut c = Client::new(&h.addr().to_string(), CLIENT_TIMEOUT)?.with_bearer(KEY);
    let before: Vec<_> = questions[..3]
        .iter()
        .map(|q| answer(&mut c, q))
        .collect::<Result<_>>()?;

    let report = run_soak(&options(&h, &questions, 8, KEY))?;
    eprintln!(
        "soak: {} requests, by kind {:?}, violations {:?}, rss {:?}, fds {:?}",
        report.requests, report.by_kind, report.violation_examples, report.rss_bytes, report.fds
    );
    assert_eq!(
        report.violations, 0,
        "violations: {:?}",
        report.violation_examples
    );
    assert!(report.verdict.accounting_ok && report.verdict.server_alive);
    for kind in SoakKind::ALL {
        let outcomes: &BTreeMap<String, usize> = &report.by_kind[kind.label()];
        let sent: usize = outcomes.values().sum();
        assert!(sent >= MIN_PER_KIND, "{}: {outcomes:?}", kind.label());
        for (outcome, n) in outcomes {
            let ok = if kind.is_valid() {
                ["200", "503", "504"].contains(&outcome.as_str())
            } else {
                outcome.starts_with('4') || (kind == SoakKind::Truncated && outcome == "no_answer")
            };
            assert!(ok, "{}: {n} × {outcome}", kind.label());
        }
    }
    // The valid keep-alive requests of the tiny model are answered, not only refused.
    for kind in [SoakKind::Reason, SoakKind::Completion] {
        assert!(
            report.by_kind[kind.label()]
                .get("200")
                .copied()
                .unwrap_or(0)
                > 0,
            "{:?}",
            report.by_kind
        );
    }
    // Oversized bodies are 413s, and the server counted them.
    let oversized = &report.by_kind["oversized"];
    assert_eq!(
        oversized.keys().collect::<Vec<_>>(),
        ["413"],
        "{oversized:?}"
    );
    assert!(h.metrics().errors(ErrorKind::PayloadTooLarge) >= oversized["413"] as u64);
    assert_eq!(h.metrics().errors(ErrorKind::Internal), 0);
    assert_eq!(h.metrics().errors(ErrorKind::Unauthorized), 0);
    assert!(report.samples.len() >= 3, "{:?}", report.samples);
    assert!(report.samples.iter().all(|s| s.healthz == Some(200)));
    assert!(report.rss_bytes.end.is_some() && report.fds.end.is_some());
    assert!(!report.minutes.is_empty());
    for m in &report.minutes {
        assert!(m.p50_ms <= m.p99_ms, "{m:?}");
    }

    // Still correct, on a fresh connection.
    let mut c = Client::new(&h.addr().to_string(), CLIENT_TIMEOUT)?.with_bearer(KEY);
    for (q, expected) in questions[..3].iter().zip(&before) {
        assert_eq!(&answer(&mut c, q)?, expected, "{q}");
    }

    // Without the right key every valid request is a 401: the soak's verdict must fail.
    let report = run_soak(&options(&h, &questions, 2, "not-the-key"))?;
    assert!(report.violations > 0, "{:?}", report.by_kind);
    assert!(!report.verdict.accounting_ok && !report.verdict.pass);
    let reason = &report.by_kind["reason"];
    assert!(reason.contains_key("401"), "{reason:?}");
    h.shutdown()?;
    Ok(())
}
