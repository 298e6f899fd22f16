//! `steper-run bench-serve`: the load test of the HTTP service, against a running server
//! (`--url`) or one started in this process (`--model` + `--index`); with `--soak SECONDS`
//! the soak test instead of the levels (see `bench_soak`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use steper_loadgen::client::host_port;
use steper_loadgen::load::{run_load, LoadEndpoint, LoadOptions, LoadReport};
use steper_runtime::data::{read_qa, ReadOptions};
use steper_runtime::serve::{ServeConfig, Server};
use steper_runtime::{BackendKind, Engine};

use super::ask::Backend;

/// Which route to load.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum Route {
    /// POST /v1/reason.
    Reason,
    /// POST /v1/completions.
    Completions,
}

/// Arguments of `bench-serve`.
#[derive(clap::Args)]
pub struct Args {
    /// A running server (http://host:port); otherwise one is started here from --model/--index.
    #[arg(long, conflicts_with_all = ["model", "index"])]
    pub url: Option<String>,
    /// Process id of the --url server, for its peak RSS (VmHWM).
    #[arg(long, requires = "url")]
    pub server_pid: Option<u32>,
    /// Export directory of an in-process server.
    #[arg(long, requires = "index")]
    pub model: Option<PathBuf>,
    /// Index directory of an in-process server.
    #[arg(long, requires = "model")]
    pub index: Option<PathBuf>,
    /// Backend of an in-process server.
    #[arg(long, value_enum, default_value = "ort")]
    pub backend: Backend,
    /// Workers of an in-process server.
    #[arg(long, default_value_t = 1)]
    pub workers: usize,
    /// Requests one worker of an in-process server batches (continuous batching, as `serve
    /// --batch`; 1: one request per worker).
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub batch: usize,
    /// Queue of an in-process server.
    #[arg(long, default_value_t = 64)]
    pub max_queue: usize,
    /// ONNX Runtime threads per worker of an in-process server (default: cores / workers).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Give each ONNX Runtime session of an in-process server its own prepacked weights instead
    /// of sharing them (to measure what sharing saves in peak RSS).
    #[arg(long)]
    pub no_shared_weights: bool,
    /// ONNX Runtime's memory-pattern optimization in an in-process server (off, as in `serve`).
    #[arg(long)]
    pub memory_pattern: bool,
    /// QA file whose questions are sent round-robin (any format `data convert` reads; plain,
    /// .gz or .zst).
    #[arg(long)]
    pub questions: PathBuf,
    /// Use at most this many questions.
    #[arg(long, default_value_t = 200)]
    pub limit: usize,
    /// Route under load.
    #[arg(long, value_enum, default_value = "reason")]
    pub endpoint: Route,
    /// Client counts, one level each.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16")]
    pub concurrency: Vec<usize>,
    /// Seconds per level (sending stops then; answers in flight are awaited).
    #[arg(long, default_value_t = 20.0)]
    pub seconds: f64,
    /// Requests per level at most.
    #[arg(long, default_value_t = 2000)]
    pub max_requests: usize,
    /// max_tokens of completion requests (prompt: "Q: {question}\nA:").
    #[arg(long, default_value_t = 32)]
    pub max_tokens: usize,
    /// Client-side timeout of one request, seconds.
    #[arg(long, default_value_t = 120.0)]
    pub request_timeout: f64,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// Soak instead of levels: --clients clients for this many seconds send a mix of valid,
    /// streaming-then-disconnecting, slow, oversized, truncated, non-UTF-8 and wrong-typed
    /// requests; every answer is checked, and the server's RSS and open descriptors are sampled
    /// (a --url server needs --server-pid for those). Fails unless the verdict passes.
    #[arg(long, value_name = "SECONDS")]
    pub soak: Option<f64>,
    /// Soak: concurrent clients.
    #[arg(long, default_value_t = 16)]
    pub clients: usize,
    /// Soak: seconds between samples of the server's RSS, descriptors and /healthz.
    #[arg(long, default_value_t = 10.0)]
    pub sample_every: f64,
    /// Soak: seconds of warm-up before the baseline window of RSS and descriptors (at most a
    /// quarter of the run): the sessions' arenas grow until they have seen the load's largest
    /// shapes.
    #[arg(long, value_name = "SECONDS", default_value_t = steper_loadgen::soak::DEFAULT_WARMUP.as_secs_f64())]
    pub soak_warmup: f64,
    /// Soak: seconds a slow sender takes to send its body.
    #[arg(long, default_value_t = 3.0)]
    pub slow_body_seconds: f64,
    /// Soak: the server's body limit (its --max-body-bytes; the in-process server gets it too);
    /// oversized bodies exceed it.
    #[arg(long, default_value_t = 64 * 1024)]
    pub body_limit: usize,
    /// Soak: max_steps of /v1/reason requests (default: the server's).
    #[arg(long)]
    pub max_steps: Option<usize>,
    /// Send `Authorization: Bearer <key>` with the key of this environment variable (the
    /// in-process server then requires it too).
    #[arg(long, value_name = "NAME")]
    pub api_key_env: Option<String>,
}

/// Runs every level and prints the report.
pub fn run(a: Args) -> anyhow::Result<()> {
    let qa = read_qa(&a.questions, ReadOptions { skip_bad: true })?;
    super::ask::report_skipped(&a.questions, &qa.skipped);
    let questions: Vec<String> = qa
        .rows
        .iter()
        .take(a.limit)
        .map(|q| q.question.clone())
        .collect();
    anyhow::ensure!(
        !questions.is_empty(),
        "{}: no question",
        a.questions.display()
    );
    let endpoint = match a.endpoint {
        Route::Reason => LoadEndpoint::Reason,
        Route::Completions => LoadEndpoint::Completions,
    };
    let inputs = match endpoint {
        LoadEndpoint::Reason => questions.clone(),
        LoadEndpoint::Completions => questions.iter().map(|q| format!("Q: {q}\nA:")).collect(),
    };
    let api_key = a
        .api_key_env
        .as_deref()
        .map(super::serve::api_key_from_env)
        .transpose()?;
    let (addr, server, server_pid) = match (&a.url, &a.model, &a.index) {
        (Some(url), _, _) => (host_port(url)?, None, a.server_pid),
        (None, Some(model), Some(index)) => {
            let threads = super::threads_per_worker(a.threads, a.workers);
            let backend = match a
                .backend
                .kind(Some(threads))
                .with_concurrency(a.workers)
                .with_memory_pattern(a.memory_pattern)
            {
                BackendKind::Ort(o) if a.no_shared_weights => {
                    BackendKind::Ort(o.with_shared_prepacked_weights(false))
                }
                other => other,
            };
            let (model, index) = (model.clone(), index.clone());
            let mut config = ServeConfig::default()
                .with_addr(SocketAddr::from(([127, 0, 0, 1], 0)))
                .with_workers(a.workers)
                .with_batch(a.batch)
                .with_max_queue(a.max_queue)
                .with_max_body_bytes(a.body_limit)
                .with_timeout(Duration::from_secs_f64(a.request_timeout));
            config.api_key.clone_from(&api_key);
            let server = Server::start(config, move || {
                Engine::builder()
                    .model_dir(model)
                    .backend(backend)
                    .index(index)
                    .build()
            })?;
            server
                .wait_ready(Duration::from_secs(600))
                .context("starting the in-process server")?;
            (server.addr().to_string(), Some(server), None)
        }
        _ => anyhow::bail!("give --url, or --model and --index"),
    };
    let key_text = match &a.api_key_env {
        Some(name) => Some(std::env::var(name).with_context(|| format!("--api-key-env {name}"))?),
        None => None,
    };
    if let Some(seconds) = a.soak {
        let outcome = super::bench_soak::run(&a, seconds, &addr, server_pid, questions, key_text);
        if let Some(s) = server {
            s.shutdown()?;
        }
        return outcome;
    }
    let mut reports: Vec<LoadReport> = Vec::new();
    for &c in &a.concurrency {
        let pb = indicatif::ProgressBar::new_spinner();
        pb.set_message(format!("{c} client(s) for up to {} s", a.seconds));
        pb.enable_steady_tick(Duration::from_millis(200));
        let r = run_load(&LoadOptions {
            addr: addr.clone(),
            endpoint,
            concurrency: c,
            duration: Duration::from_secs_f64(a.seconds),
            max_requests: a.max_requests,
            inputs: inputs.clone(),
            max_tokens: a.max_tokens,
            request_timeout: Duration::from_secs_f64(a.request_timeout),
            server_pid,
            api_key: key_text.clone(),
        })?;
        pb.finish_and_clear();
        if !a.json {
            eprintln!(
                "{c:>3} clients: {} ok / {} sent, {:.2} req/s, p50 {:.1} ms, p95 {:.1} ms, p99 {:.1} ms, drift ×{:.2}, {:.1} tok/s/client, statuses {:?}",
                r.ok,
                r.requests,
                r.requests_per_sec,
                r.p50_ms,
                r.p95_ms,
                r.p99_ms,
                r.drift_ratio.unwrap_or(f64::NAN),
                r.tokens_per_sec_per_client,
                r.statuses
            );
        }
        reports.push(r);
    }
    let in_process = server.is_some();
    if let Some(s) = server {
        s.shutdown()?;
    }
    let peak = reports.iter().filter_map(|r| r.peak_rss_bytes).max();
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "addr": addr,
                "in_process_server": in_process,
                "endpoint": endpoint,
                "workers": a.workers,
                "batch": a.batch,
                "shared_weights": !a.no_shared_weights,
                "questions": a.questions,
                "levels": reports,
                "peak_rss_bytes": peak,
            })
        );
    } else if let Some(p) = peak {
        println!(
            "peak RSS of the {}: {:.1} MiB",
            if in_process {
                "process (server + clients)"
            } else {
                "server"
            },
            p as f64 / (1024.0 * 1024.0)
        );
    }
    Ok(())
}
