//! `steper-run serve`: the HTTP service (see `steper_runtime::serve`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use steper_runtime::serve::{ApiKey, ServeConfig, Server};
use steper_runtime::Engine;

use super::ask::Backend;

/// Arguments of `serve`.
#[derive(clap::Args)]
pub struct Args {
    /// Export directory (steper.json, model.onnx, tokenizer.json).
    #[arg(long)]
    pub model: PathBuf,
    /// Index directory written by `steper-run index`.
    #[arg(long)]
    pub index: PathBuf,
    /// Listening address. The default listens on loopback (127.0.0.1) only; to serve other
    /// machines give e.g. 0.0.0.0:8080, and then also --api-key-env.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub addr: SocketAddr,
    /// Require `Authorization: Bearer <key>` on /v1/* (401 otherwise), the key read from this
    /// environment variable (never from the command line, where `ps` shows it). /healthz and
    /// /metrics stay open.
    #[arg(long, value_name = "NAME")]
    pub api_key_env: Option<String>,
    /// Model worker threads (each runs one request at a time on its own OS thread, with its own
    /// ONNX Runtime session: N workers run N model calls at once).
    #[arg(long, default_value_t = 1)]
    pub workers: usize,
    /// Continuous batching: each worker runs up to N requests at once, their decode tokens as
    /// one batched model call (requests join and leave the batch as they arrive and end;
    /// streaming, deadlines and cancellation unchanged). 1: one request per worker. Needs a
    /// standard-attention export (not --attention gqa); give the worker all the cores
    /// (--workers 1).
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub batch: usize,
    /// Prompt-lookup decoding for reasoning requests (as `eval --prompt-lookup`): after each
    /// picked token, up to N tokens copied from the prompt run in the same model call and are
    /// kept while greedy decoding would have picked them. Needs --batch 1.
    #[arg(long, value_name = "N")]
    pub prompt_lookup: Option<usize>,
    /// Requests waiting for a worker before new ones get 503 + Retry-After.
    #[arg(long, default_value_t = 16)]
    pub max_queue: usize,
    /// Per-request deadline in milliseconds (504 past it).
    #[arg(long, default_value_t = 60_000)]
    pub timeout_ms: u64,
    /// Largest request body in bytes (413 above).
    #[arg(long, default_value_t = 64 * 1024)]
    pub max_body_bytes: usize,
    /// Backend.
    #[arg(long, value_enum, default_value = "ort")]
    pub backend: Backend,
    /// ONNX Runtime intra-op threads per session (default: cores / workers, at least 1).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Threads of the async runtime that handle connections.
    #[arg(long, default_value_t = 2)]
    pub io_threads: usize,
    /// Model name reported by /v1/completions (default: the model directory's name).
    #[arg(long)]
    pub model_name: Option<String>,
    /// Print the start-up and shutdown report as JSON lines.
    #[arg(long)]
    pub json: bool,
    /// Log every request (method, path, status, latency) to stderr.
    #[arg(long)]
    pub log_requests: bool,
    /// How the loop reasons: `ircot` or `self-ask` (default: the model's manifest, else ircot).
    #[arg(long, value_name = "ircot|self-ask")]
    pub framework: Option<steper_runtime::Framework>,
    /// ONNX Runtime: turn on the memory-pattern optimization (off in the server). It keeps one
    /// allocation plan per set of input shapes for the server's lifetime, and a server sees a
    /// new set with nearly every prompt length: in an hour-long soak the resident memory of two
    /// workers rose 1,081 → 1,461 MiB with it, and held 1,179 MiB without it.
    #[arg(long)]
    pub memory_pattern: bool,
    /// glibc malloc arenas at most (0: glibc's default of 8 per core; an explicit
    /// MALLOC_ARENA_MAX in the environment wins). Each thread that allocates may get an arena
    /// of its own that keeps freed memory: with the default, two workers held 1.8–1.9 GiB where
    /// two arenas held 1.1 GiB.
    #[arg(long, value_name = "N", default_value_t = 2)]
    pub malloc_arenas: usize,
}

/// Caps glibc's malloc arenas at `n` (see [`Args::malloc_arenas`]); returns whether it did.
fn cap_malloc_arenas(n: usize) -> bool {
    if n == 0 || std::env::var_os("MALLOC_ARENA_MAX").is_some() {
        return false;
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let n = libc::c_int::try_from(n).unwrap_or(libc::c_int::MAX);
        // SAFETY: mallopt only sets an allocator parameter; it is called before the server
        // starts its threads.
        unsafe { libc::mallopt(libc::M_ARENA_MAX, n) == 1 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

/// Serves until SIGTERM or ctrl-c, then finishes the accepted requests and exits.
pub fn run(a: Args) -> anyhow::Result<()> {
    if a.log_requests {
        use tracing_subscriber::layer::SubscriberExt;
        use tracing_subscriber::util::SubscriberInitExt;
        // The router's trace layer emits one INFO span and response event per request; only
        // those are shown (ONNX Runtime's own events stay quiet).
        tracing_subscriber::registry()
            .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
            .with(
                tracing_subscriber::filter::Targets::new()
                    .with_target("tower_http", tracing::Level::INFO),
            )
            .try_init()
            .map_err(|e| anyhow::anyhow!("--log-requests: {e}"))?;
    }
    let lookup = a
        .prompt_lookup
        .map(|n| -> anyhow::Result<steper_runtime::PromptLookup> {
            let pl = steper_runtime::PromptLookup::with_max_draft(n);
            pl.validate()
                .with_context(|| format!("--prompt-lookup {n}"))?;
            anyhow::ensure!(
                a.batch == 1,
                "--prompt-lookup {n} needs --batch 1, got --batch {}: a batching worker decodes one token per request and model call",
                a.batch
            );
            Ok(pl)
        })
        .transpose()?;
    let arenas_capped = cap_malloc_arenas(a.malloc_arenas);
    let api_key = a.api_key_env.as_deref().map(api_key_from_env).transpose()?;
    let threads = super::threads_per_worker(a.threads, a.workers);
    let mut config = ServeConfig::default()
        .with_addr(a.addr)
        .with_workers(a.workers)
        .with_batch(a.batch)
        .with_max_queue(a.max_queue)
        .with_timeout(Duration::from_millis(a.timeout_ms))
        .with_max_body_bytes(a.max_body_bytes)
        .with_io_threads(a.io_threads)
        .with_handle_signals(true);
    config.model_name.clone_from(&a.model_name);
    config.api_key = api_key;
    let (model, index, backend) = (
        a.model.clone(),
        a.index.clone(),
        a.backend
            .kind(Some(threads))
            .with_concurrency(a.workers)
            .with_memory_pattern(a.memory_pattern),
    );
    // The manifest's loop settings with the framework the flag asks for.
    let loop_options = a
        .framework
        .map(|fw| {
            let path = a.model.join(steper_runtime::manifest::MANIFEST_FILE);
            steper_runtime::Manifest::load(&path)
                .map(|m| steper_runtime::LoopOptions::from(&m.loop_defaults).with_framework(fw))
                .with_context(|| format!("--framework {fw}: reading {}", path.display()))
        })
        .transpose()?;
    let t = Instant::now();
    let server = Server::start(config, move || {
        let builder = Engine::builder()
            .model_dir(model)
            .backend(backend)
            .index(index);
        let builder = match lookup {
            Some(pl) => builder.prompt_lookup(pl),
            None => builder,
        };
        match loop_options {
            Some(o) => builder.loop_options(o),
            None => builder,
        }
        .build()
    })?;
    let addr = server.addr();
    if !a.json {
        eprintln!("listening on http://{addr} (loading {})", a.model.display());
    }
    if let Err(e) = server.wait_ready(Duration::from_secs(3600)) {
        server.shutdown()?;
        return Err(e.into());
    }
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "event": "ready", "addr": addr.to_string(), "load_seconds": t.elapsed().as_secs_f64(),
                "workers": a.workers, "batch": a.batch, "max_queue": a.max_queue, "threads_per_worker": threads,
                "pid": std::process::id(), "api_key_env": a.api_key_env,
                "memory_pattern": a.memory_pattern, "prompt_lookup": a.prompt_lookup,
                "malloc_arena_max": arenas_capped.then_some(a.malloc_arenas),
            })
        );
    } else {
        eprintln!(
            "ready in {:.1} s: {} worker(s) × {threads} thread(s), batch {}, queue {}, timeout {} ms, body ≤ {} bytes, {}, memory pattern {}, malloc arenas {}, pid {}",
            t.elapsed().as_secs_f64(),
            a.workers,
            a.batch,
            a.max_queue,
            a.timeout_ms,
            a.max_body_bytes,
            match &a.api_key_env {
                Some(name) => format!("/v1/* needs the bearer key of ${name}"),
                None => "no API key".to_string(),
            },
            if a.memory_pattern { "on" } else { "off" },
            if arenas_capped {
                format!("≤ {}", a.malloc_arenas)
            } else {
                "glibc's setting".to_string()
            },
            std::process::id()
        );
    }
    server.wait()?;
    if a.json {
        println!("{}", serde_json::json!({"event": "stopped"}));
    } else {
        eprintln!("stopped: every accepted request was answered");
    }
    Ok(())
}

/// The API key of `--api-key-env NAME`: the variable must be set, Unicode and non-empty.
pub fn api_key_from_env(name: &str) -> anyhow::Result<ApiKey> {
    let value = match std::env::var(name) {
        Ok(v) => v,
        Err(std::env::VarError::NotPresent) => {
            anyhow::bail!("--api-key-env {name}: the environment variable {name} is not set")
        }
        Err(std::env::VarError::NotUnicode(_)) => {
            anyhow::bail!("--api-key-env {name}: the environment variable {name} is not Unicode")
        }
    };
    anyhow::ensure!(
        !value.is_empty(),
        "--api-key-env {name}: the environment variable {name} is empty"
    );
    ApiKey::new(value).with_context(|| format!("--api-key-env {name}"))
}
