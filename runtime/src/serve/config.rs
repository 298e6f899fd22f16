//! The service's settings ([`ServeConfig`]).

use std::net::SocketAddr;
use std::time::Duration;

use super::ApiKey;
use crate::error::{Error, Result};

/// Settings of the service, checked by [`Server::start`](super::Server::start).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct ServeConfig {
    /// Listening address (default `127.0.0.1:8080`, loopback only; `127.0.0.1:0` picks a free
    /// port).
    pub addr: SocketAddr,
    /// Model worker threads. For them to run model calls at the same time the engine's backend
    /// must allow as many ([`crate::BackendKind::with_concurrency`]: one ONNX Runtime session
    /// per worker); `steper-run serve --workers N` does that.
    pub workers: usize,
    /// Requests one worker runs at once (continuous batching): with 1 (the default) a worker
    /// runs one request at a time; with more, the decode tokens of up to `batch` requests —
    /// reasoning steps and completions — run as one batched model call, requests joining and
    /// leaving the batch as they arrive and end. Needs a model with a batched step (a
    /// standard-attention export on ONNX Runtime or tract).
    pub batch: usize,
    /// Jobs waiting for a worker before requests are refused with 503.
    pub max_queue: usize,
    /// Per-request deadline (body read, queue wait and model time together).
    pub timeout: Duration,
    /// Largest request body in bytes (413 above).
    pub max_body_bytes: usize,
    /// Threads of the async runtime that handles connections (not model work).
    pub io_threads: usize,
    /// Stop on SIGTERM / ctrl-c (the command line); tests stop through the handle.
    pub handle_signals: bool,
    /// Name reported as `model` (default: the model directory's name).
    pub model_name: Option<String>,
    /// When set, `/v1/*` requests need `Authorization: Bearer <key>` (401 otherwise);
    /// `/healthz` and `/metrics` stay open.
    pub api_key: Option<ApiKey>,
}

impl ServeConfig {
    /// Sets `addr`.
    #[must_use]
    pub fn with_addr(mut self, addr: SocketAddr) -> Self {
        self.addr = addr;
        self
    }

    /// Sets `workers`.
    #[must_use]
    pub fn with_workers(mut self, workers: usize) -> Self {
        self.workers = workers;
        self
    }

    /// Sets `batch`.
    #[must_use]
    pub fn with_batch(mut self, batch: usize) -> Self {
        self.batch = batch;
        self
    }

    /// Sets `max_queue`.
    #[must_use]
    pub fn with_max_queue(mut self, max_queue: usize) -> Self {
        self.max_queue = max_queue;
        self
    }

    /// Sets `timeout`.
    #[must_use]
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Sets `max_body_bytes`.
    #[must_use]
    pub fn with_max_body_bytes(mut self, max_body_bytes: usize) -> Self {
        self.max_body_bytes = max_body_bytes;
        self
    }

    /// Sets `io_threads`.
    #[must_use]
    pub fn with_io_threads(mut self, io_threads: usize) -> Self {
        self.io_threads = io_threads;
        self
    }

    /// Sets `handle_signals`.
    #[must_use]
    pub fn with_handle_signals(mut self, handle_signals: bool) -> Self {
        self.handle_signals = handle_signals;
        self
    }

    /// Sets `model_name`.
    #[must_use]
    pub fn with_model_name(mut self, model_name: impl Into<String>) -> Self {
        self.model_name = Some(model_name.into());
        self
    }

    /// Sets `api_key`.
    #[must_use]
    pub fn with_api_key(mut self, api_key: ApiKey) -> Self {
        self.api_key = Some(api_key);
        self
    }
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
            workers: 1,
            batch: 1,
            max_queue: 16,
            timeout: Duration::from_secs(60),
            max_body_bytes: 64 * 1024,
            io_threads: 2,
            handle_signals: false,
            model_name: None,
            api_key: None,
        }
    }
}

impl ServeConfig {
    /// Checks the settings.
    pub fn validate(&self) -> Result<()> {
        let bad = |option: &str, expected: &str, got: String| {
            Err(Error::InvalidOption {
                option: option.into(),
                expected: expected.into(),
                got,
            })
        };
        if self.workers == 0 {
            return bad("workers", "at least 1", "0".into());
        }
        if self.batch == 0 {
            return bad("batch", "at least 1", "0".into());
        }
        if self.timeout.is_zero() {
            return bad(
                "timeout",
                "a positive duration",
                format!("{:?}", self.timeout),
            );
        }
        if self.max_body_bytes == 0 {
            return bad("max_body_bytes", "at least 1", "0".into());
        }
        if self.io_threads == 0 {
            return bad("io_threads", "at least 1", "0".into());
        }
        Ok(())
    }
}
