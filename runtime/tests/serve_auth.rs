//! Bearer-token authentication of the HTTP service on a loopback port with the tiny export of
//! `steper-test-support`: `/v1/*` needs the key (401 with `WWW-Authenticate: Bearer` and
//! OpenAI's error body otherwise, counted in the metrics), `/healthz` and `/metrics` stay open,
//! a server without a key is unchanged, and `steper-run serve --api-key-env` reads the key
//! from the environment (an unset or empty variable is an error naming it).

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::json;
use steper_loadgen::client::{Client, Response};
use steper_runtime::serve::{sample, ApiKey, ErrorKind, ServeConfig, Server, ServerHandle};
use steper_runtime::{BackendKind, Engine, OrtOptions};

/// Client-side timeout of one request (a hung server fails the test instead of hanging it).
const CLIENT_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the model may take to load.
const LOAD_LIMIT: Duration = Duration::from_secs(60);
const KEY: &str = "sk-test-0123456789";

struct Fixture {
    model: PathBuf,
    index: PathBuf,
    question: String,
}

fn fixture() -> Result<Fixture> {
    let tiny = steper_test_support::tiny()?;
    let question = tiny
        .questions("dev")?
        .into_iter()
        .next()
        .context("a dev question")?
        .question;
    Ok(Fixture {
        model: tiny.export.clone(),
        index: tiny.index.clone(),
        question,
    })
}

fn start(f: &Fixture, key: Option<&str>) -> Result<ServerHandle> {
    let mut config = ServeConfig::default()
        .with_addr("127.0.0.1:0".parse()?)
        .with_workers(1)
        .with_max_body_bytes(4096);
    if let Some(k) = key {
        config = config.with_api_key(ApiKey::new(k)?);
    }
    let (model, index) = (f.model.clone(), f.index.clone());
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
    Ok(h)
}

/// A request with an optional `Authorization` header value.
fn send(
    addr: &str,
    method: &str,
    path: &str,
    auth: Option<&str>,
    body: Option<&[u8]>,
) -> Result<Response> {
    let mut raw = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if let Some(a) = auth {
        raw.push_str(&format!("Authorization: {a}\r\n"));
    }
    if let Some(b) = body {
        raw.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            b.len()
        ));
    }
    raw.push_str("\r\n");
    let mut raw = raw.into_bytes();
    if let Some(b) = body {
        raw.extend_from_slice(b);
    }
    let mut c = Client::new(addr, CLIENT_TIMEOUT)?;
    Ok(c.send_raw_keep(&raw)?)
}

fn assert_unauthorized(r: &Response, challenge: &str) -> Result<()> {
    assert_eq!(r.status, 401, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.header("www-authenticate"), Some(challenge));
    let v = r.json()?;
    assert_eq!(v["error"]["type"], "authentication_error", "{v}");
    assert_eq!(v["error"]["code"], 401, "{v}");
    assert!(v["error"]["message"].is_string(), "{v}");
    assert!(
        !v.to_string().contains(KEY),
        "the key must not be echoed: {v}"
    );
    Ok(())
}

#[test]
fn v1_needs_the_key_while_health_and_metrics_stay_open() -> Result<()> {
    let f = fixture()?;
    let h = start(&f, Some(KEY))?;
    let addr = h.addr().to_string();
    let reason = json!({"question": f.question}).to_string();
    let reason = reason.as_bytes();
    let bearer = format!("Bearer {KEY}");

    let mut refused = 0u64;
    // No header, another scheme, a wrong key, a prefix of the key, the key with a suffix.
    let attempts: [(Option<String>, &str); 5] = [
        (None, "Bearer"),
        (Some(format!("Basic {KEY}")), "Bearer"),
        (
            Some("Bearer sk-test-0123456788".into()),
            "Bearer error=\"invalid_token\"",
        ),
        (
            Some(format!("Bearer {}", &KEY[..KEY.len() - 1])),
            "Bearer error=\"invalid_token\"",
        ),
        (
            Some(format!("Bearer {KEY}x")),
            "Bearer error=\"invalid_token\"",
        ),
    ];
    for (auth, challenge) in &attempts {
        let r = send(&addr, "POST", "/v1/reason", auth.as_deref(), Some(reason))?;
        assert_unauthorized(&r, challenge)?;
        refused += 1;
    }
    for (method, path, body) in [
        ("GET", "/v1/models", None),
        ("POST", "/v1/completions", Some(&b"{\"prompt\":\"x\"}"[..])),
        ("POST", "/v1/chat/completions", Some(&b"{}"[..])),
        // Unknown /v1 paths and wrong methods are refused before routing.
        ("GET", "/v1/nothing-here", None),
        ("GET", "/v1/reason", None),
        // Refused before the body is read: no 413 for a stranger.
        ("POST", "/v1/reason", Some(&[b'x'; 8000][..])),
    ] {
        let r = send(&addr, method, path, None, body)?;
        assert_unauthorized(&r, "Bearer")?;
        refused += 1;
    }

    // Open probes.
    let health = send(&addr, "GET", "/healthz", None, None)?;
    assert_eq!(health.status, 200);
    assert_eq!(health.json()?["status"], "ready");
    let metrics = send(&addr, "GET", "/metrics", None, None)?;
    assert_eq!(metrics.status, 200);
    let text = String::from_utf8_lossy(&metrics.body).into_owned();
    assert_eq!(
        sample(&text, "steper_errors_total{kind=\"authentication_error\"}"),
        Some(refused as f64)
    );
    assert_eq!(
        sample(
            &text,
            "steper_requests_total{endpoint=\"reason\",code=\"401\"}"
        ),
        Some(7.0),
        "five attempts, GET and the oversized body on /v1/reason"
    );
    // Unknown paths outside /v1 answer 404 as before.
    assert_eq!(send(&addr, "GET", "/nothing", None, None)?.status, 404);

    // The key, also with the scheme in other cases and extra spaces.
    for auth in [
        bearer.clone(),
        format!("bearer  {KEY}"),
        format!("BEARER {KEY}"),
    ] {
        let r = send(&addr, "POST", "/v1/reason", Some(&auth), Some(reason))?;
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        assert!(r.json()?["answer"].is_string());
    }
    let models = send(&addr, "GET", "/v1/models", Some(&bearer), None)?;
    assert_eq!(models.status, 200);
    // A keep-alive client with the key; a bad body is still a 400 (auth does not hide it).
    let mut c = Client::new(&addr, CLIENT_TIMEOUT)?.with_bearer(KEY);
    let r = c.post_json(
        "/v1/completions",
        &json!({"prompt": "x", "max_tokens": "two"}),
    )?;
    assert_eq!(r.status, 400, "{}", String::from_utf8_lossy(&r.body));
    let r = c.post_json(
        "/v1/completions",
        &json!({"prompt": "Q: x\nA:", "max_tokens": 2, "temperature": 0}),
    )?;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(h.metrics().errors(ErrorKind::Unauthorized), refused);
    h.shutdown()?;
    Ok(())
}

#[test]
fn without_a_key_the_routes_are_open_and_the_default_address_is_loopback() -> Result<()> {
    assert!(ServeConfig::default().addr.ip().is_loopback());
    let f = fixture()?;
    let h = start(&f, None)?;
    let addr = h.addr().to_string();
    let body = json!({"question": f.question}).to_string();
    for auth in [None, Some("Bearer whatever")] {
        let r = send(&addr, "POST", "/v1/reason", auth, Some(body.as_bytes()))?;
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        assert!(r.header("www-authenticate").is_none());
    }
    assert_eq!(h.metrics().errors(ErrorKind::Unauthorized), 0);
    h.shutdown()?;
    Ok(())
}

fn steper_run() -> Command {
    Command::new(env!("CARGO_BIN_EXE_steper-run"))
}

/// Kills the child when dropped (a failed assertion leaves no server behind).
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn the_cli_reads_the_key_from_the_environment() -> Result<()> {
    const VAR: &str = "STEPER_TEST_SERVE_AUTH_KEY";
    let f = fixture()?;
    let (model, index) = (
        f.model.to_str().context("model path")?,
        f.index.to_str().context("index path")?,
    );
    let args = [
        "serve",
        "--model",
        model,
        "--index",
        index,
        "--addr",
        "127.0.0.1:0",
        "--api-key-env",
        VAR,
        "--json",
    ];
    // Unset, then empty: refused before anything is loaded, naming the variable.
    let unset = steper_run().args(args).env_remove(VAR).output()?;
    let empty = steper_run().args(args).env(VAR, "").output()?;
    for (o, why) in [(&unset, "is not set"), (&empty, "is empty")] {
        assert!(!o.status.success());
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(VAR) && err.contains(why), "{err}");
    }

    let mut child = Running(
        steper_run()
            .args(args)
            .env(VAR, KEY)
            .env_remove("MALLOC_ARENA_MAX")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?,
    );
    let stdout = child.0.stdout.take().context("stdout")?;
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    let ready: serde_json::Value = serde_json::from_str(&line).context("the ready line")?;
    assert_eq!(ready["event"], "ready", "{line}");
    assert_eq!(ready["api_key_env"], VAR);
    // The long-running defaults: no memory-pattern cache, two malloc arenas on glibc.
    assert_eq!(ready["memory_pattern"], false, "{line}");
    if cfg!(all(target_os = "linux", target_env = "gnu")) {
        assert_eq!(ready["malloc_arena_max"], 2, "{line}");
    }
    let addr = ready["addr"].as_str().context("addr")?.to_string();
    assert_eq!(send(&addr, "GET", "/healthz", None, None)?.status, 200);
    assert_unauthorized(&send(&addr, "GET", "/v1/models", None, None)?, "Bearer")?;
    let bearer = format!("Bearer {KEY}");
    assert_eq!(
        send(&addr, "GET", "/v1/models", Some(&bearer), None)?.status,
        200
    );
    drop(child);

    // --help says where it listens by default.
    let help = steper_run().args(["serve", "--help"]).output()?;
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(
        help.contains("loopback") && help.contains("127.0.0.1:8080"),
        "{help}"
    );
    assert!(help.contains("--api-key-env"), "{help}");
    Ok(())
}
