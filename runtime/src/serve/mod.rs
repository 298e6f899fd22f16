//! The HTTP service (`steper-run serve`): the multi-step loop and plain completions over
//! HTTP/1.1 for edge deployments.
//!
//! | route | |
//! |---|---|
//! | `POST /v1/reason` | `{question, max_steps?, top_k?, include_trace?, stream?}` → answer, trace, timings; `stream: true` → server-sent events `step` (one per step as it finishes), then `answer` (or `error`) |
//! | `POST /v1/completions` | OpenAI's completions request/response (`prompt`, `max_tokens`, `temperature`, `stop`, `stream`, `logprobs`, `seed`) |
//! | `GET /healthz` | 503 `loading` until the model and index are loaded, then 200 `ready`; 503 while shutting down |
//! | `GET /metrics` | Prometheus text: requests, errors by kind, queue depth, latency histograms per request and per step, tokens/s |
//!
//! Requests run on a fixed pool of model worker threads ([`pool`]) behind one bounded queue:
//! a full queue answers 503 with `Retry-After` at once, a request past its deadline 504, a body
//! over the limit 413, malformed JSON or a wrong type 400 naming the field (the body is
//! OpenAI's error shape). On shutdown (SIGTERM, ctrl-c or [`ServerHandle::shutdown`]) the
//! listener closes, new requests on open connections get 503, and every accepted request is
//! finished before the workers stop.
//!
//! ```no_run
//! use std::time::Duration;
//! use steper_runtime::serve::{ServeConfig, Server};
//! use steper_runtime::Engine;
//!
//! # fn main() -> steper_runtime::Result<()> {
//! let config = ServeConfig { addr: "127.0.0.1:0".parse().unwrap(), ..ServeConfig::default() };
//! let server = Server::start(config, || {
//!     Engine::builder().model_dir("exports/student").index("indexes/hotpotqa").build()
//! })?;
//! println!("listening on {}", server.addr());
//! server.wait_ready(Duration::from_secs(60))?;
//! server.shutdown()?;
//! # Ok(())
//! # }
//! ```

pub mod api;
pub mod bench;
pub mod client;
pub mod completion;
mod http;
pub mod metrics;
pub mod pool;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::sync::watch;

use crate::engine::Engine;
use crate::error::{Error, Result};
use http::AppState;
use metrics::Metrics;
use pool::Pool;

/// Settings of the service, checked by [`Server::start`].
#[derive(Debug, Clone, PartialEq)]
pub struct ServeConfig {
    /// Listening address (`127.0.0.1:0` picks a free port).
    pub addr: SocketAddr,
    /// Model worker threads. For them to run model calls at the same time the engine's backend
    /// must allow as many ([`crate::BackendKind::with_concurrency`]: one ONNX Runtime session
    /// per worker); `steper-run serve --workers N` does that.
    pub workers: usize,
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
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
            workers: 1,
            max_queue: 16,
            timeout: Duration::from_secs(60),
            max_body_bytes: 64 * 1024,
            io_threads: 2,
            handle_signals: false,
            model_name: None,
        }
    }
}

impl ServeConfig {
    /// Checks the settings.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(Error::Input(format!("serve config: {m}")));
        if self.workers == 0 {
            return bad("workers must be at least 1");
        }
        if self.timeout.is_zero() {
            return bad("timeout must be positive");
        }
        if self.max_body_bytes == 0 {
            return bad("max_body_bytes must be positive");
        }
        if self.io_threads == 0 {
            return bad("io_threads must be at least 1");
        }
        Ok(())
    }
}

/// Starts servers.
pub struct Server;

impl Server {
    /// Binds `config.addr` and serves at once; `loader` runs on its own thread, and until it
    /// returns `/healthz` and the model routes answer 503. The model workers start when it
    /// succeeds; when it fails `/healthz` reports the error and [`ServerHandle::wait_ready`]
    /// returns it.
    pub fn start<F>(config: ServeConfig, loader: F) -> Result<ServerHandle>
    where
        F: FnOnce() -> Result<Engine> + Send + 'static,
    {
        config.validate()?;
        let addr_text = config.addr.to_string();
        let server_err = |message: String| Error::Server {
            addr: addr_text.clone(),
            message,
        };
        let listener = std::net::TcpListener::bind(config.addr)
            .map_err(|e| server_err(format!("cannot listen: {e}")))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| server_err(format!("cannot set non-blocking: {e}")))?;
        let addr = listener
            .local_addr()
            .map_err(|e| server_err(format!("no local address: {e}")))?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(config.io_threads)
            .thread_name("steper-http")
            .enable_all()
            .build()
            .map_err(|e| server_err(format!("cannot start the async runtime: {e}")))?;
        let metrics = Arc::new(Metrics::default());
        let pool = Arc::new(Pool::new(config.max_queue, Arc::clone(&metrics)));
        metrics.set_pool(0, config.max_queue);
        let workers = config.workers;
        let handle_signals = config.handle_signals;
        let model_name = config.model_name.clone();
        let state = Arc::new(AppState::new(
            config,
            Arc::clone(&metrics),
            Arc::clone(&pool),
        ));
        let (stop_tx, stop_rx) = watch::channel(false);

        // Loading.
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<std::result::Result<(), String>>();
        {
            let state = Arc::clone(&state);
            std::thread::Builder::new()
                .name("steper-loader".into())
                .spawn(move || {
                    let outcome = loader().and_then(|engine| {
                        let name = model_name.unwrap_or_else(|| {
                            engine
                                .model_dir()
                                .and_then(|d| d.file_name())
                                .map(|n| n.to_string_lossy().into_owned())
                                .unwrap_or_else(|| engine.info().backend.clone())
                        });
                        let _ = state.model_name.set(name);
                        state.pool.start_workers(Arc::new(engine), workers)
                    });
                    match outcome {
                        Ok(()) => {
                            state.ready.store(true, Ordering::SeqCst);
                            state.metrics.set_ready(true);
                            let _ = ready_tx.send(Ok(()));
                        }
                        Err(e) => {
                            let msg = e.to_string();
                            *state.load_error.lock().unwrap_or_else(|p| p.into_inner()) =
                                Some(msg.clone());
                            let _ = ready_tx.send(Err(msg));
                        }
                    }
                })
                .map_err(|e| server_err(format!("cannot start the loader thread: {e}")))?;
        }

        // Serving.
        let serve_state = Arc::clone(&state);
        let thread = std::thread::Builder::new()
            .name("steper-serve".into())
            .spawn(move || -> Result<()> {
                let st = Arc::clone(&serve_state);
                let result = rt.block_on(async move {
                    let listener = tokio::net::TcpListener::from_std(listener)
                        .map_err(|e| format!("cannot register the listener: {e}"))?;
                    let app = http::router(Arc::clone(&st));
                    let drain_state = Arc::clone(&st);
                    let signal = async move {
                        stop_signal(stop_rx, handle_signals).await;
                        drain_state.shutting_down.store(true, Ordering::SeqCst);
                        drain_state.metrics.set_ready(false);
                    };
                    axum::serve(listener, app)
                        .with_graceful_shutdown(signal)
                        .await
                        .map_err(|e| format!("serving failed: {e}"))
                });
                // Every connection is closed: no job is waiting for a client any more. Let the
                // workers finish what they hold and stop.
                serve_state.pool.close_and_join();
                rt.shutdown_timeout(Duration::from_secs(1));
                result.map_err(|message| Error::Server {
                    addr: addr.to_string(),
                    message,
                })
            })
            .map_err(|e| server_err(format!("cannot start the server thread: {e}")))?;
        Ok(ServerHandle {
            addr,
            state,
            stop: stop_tx,
            thread: Some(thread),
            ready: std::sync::Mutex::new(Some(ready_rx)),
        })
    }
}

async fn stop_signal(mut stop: watch::Receiver<bool>, handle_signals: bool) {
    let requested = async move {
        while !*stop.borrow() {
            if stop.changed().await.is_err() {
                // The handle is gone without asking: keep serving (the command line holds it).
                std::future::pending::<()>().await;
            }
        }
    };
    if !handle_signals {
        return requested.await;
    }
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    tokio::select! {
                        _ = requested => {}
                        _ = tokio::signal::ctrl_c() => {}
                    }
                    return;
                }
            };
        tokio::select! {
            _ = requested => {}
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        tokio::select! {
            _ = requested => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    }
}

/// A running server: its address, metrics, readiness, and the way to stop it. Dropping the
/// handle shuts the server down gracefully.
pub struct ServerHandle {
    addr: SocketAddr,
    state: Arc<AppState>,
    stop: watch::Sender<bool>,
    thread: Option<JoinHandle<Result<()>>>,
    ready: std::sync::Mutex<Option<std::sync::mpsc::Receiver<std::result::Result<(), String>>>>,
}

impl std::fmt::Debug for ServerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerHandle")
            .field("addr", &self.addr)
            .field("ready", &self.is_ready())
            .finish()
    }
}

impl ServerHandle {
    /// The bound address (the real port when `:0` was asked for).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The server's metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.state.metrics
    }

    /// Whether the model is loaded and the workers run.
    pub fn is_ready(&self) -> bool {
        self.state.ready.load(Ordering::SeqCst)
    }

    /// Waits until the model is loaded (Ok) or failed to load (the loader's error).
    pub fn wait_ready(&self, timeout: Duration) -> Result<()> {
        let err = |message: String| Error::Server {
            addr: self.addr.to_string(),
            message,
        };
        let mut guard = self.ready.lock().unwrap_or_else(|p| p.into_inner());
        let Some(rx) = guard.as_ref() else {
            return if self.is_ready() {
                Ok(())
            } else {
                Err(err(self
                    .state
                    .load_error
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone()
                    .unwrap_or_else(|| "the model failed to load".into())))
            };
        };
        let outcome = match rx.recv_timeout(timeout) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(m)) => Err(err(format!("loading the model failed: {m}"))),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                return Err(err(format!("the model did not load within {timeout:?}")))
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                Err(err("the loader thread ended without a result".into()))
            }
        };
        *guard = None;
        outcome
    }

    /// Starts a graceful shutdown without waiting for it.
    pub fn begin_shutdown(&self) {
        let _ = self.stop.send(true);
    }

    /// Whether a shutdown has begun (by the handle or a signal).
    pub fn is_shutting_down(&self) -> bool {
        self.state.shutting_down.load(Ordering::SeqCst)
    }

    /// Stops accepting, finishes every accepted request, stops the workers; returns when done.
    pub fn shutdown(mut self) -> Result<()> {
        self.begin_shutdown();
        self.join()
    }

    /// Serves until a signal (with `handle_signals`) or [`ServerHandle::begin_shutdown`] ends
    /// the server.
    pub fn wait(mut self) -> Result<()> {
        self.join()
    }

    fn join(&mut self) -> Result<()> {
        match self.thread.take() {
            Some(t) => t.join().map_err(|_| Error::Server {
                addr: self.addr.to_string(),
                message: "the server thread panicked".into(),
            })?,
            None => Ok(()),
        }
    }

    /// How long a client is asked to wait after a 503.
    pub fn retry_after(&self) -> Duration {
        pool::RETRY_AFTER
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.begin_shutdown();
            let _ = self.join();
        }
    }
}

/// Peak resident memory (`VmHWM`, bytes) of process `pid` (`None`: this process), from
/// `/proc/<pid>/status`; `None` where that file does not exist (not Linux).
pub fn peak_rss_bytes(pid: Option<u32>) -> Option<u64> {
    let path = match pid {
        Some(p) => format!("/proc/{p}/status"),
        None => "/proc/self/status".to_string(),
    };
    let text = std::fs::read_to_string(path).ok()?;
    let line = text.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_is_checked() {
        assert!(ServeConfig::default().validate().is_ok());
        for c in [
            ServeConfig {
                workers: 0,
                ..ServeConfig::default()
            },
            ServeConfig {
                timeout: Duration::ZERO,
                ..ServeConfig::default()
            },
            ServeConfig {
                max_body_bytes: 0,
                ..ServeConfig::default()
            },
        ] {
            assert!(matches!(c.validate(), Err(Error::Input(_))), "{c:?}");
        }
    }

    #[test]
    fn peak_rss_of_this_process_is_read() {
        if std::path::Path::new("/proc/self/status").exists() {
            let rss = peak_rss_bytes(None).expect("VmHWM");
            assert!(rss > 0);
        }
        assert_eq!(peak_rss_bytes(Some(u32::MAX)), None);
    }

    #[test]
    fn a_failing_loader_is_reported_by_wait_ready() {
        let config = ServeConfig {
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            ..ServeConfig::default()
        };
        let h = Server::start(config, || Err(Error::Input("no model here".into()))).unwrap();
        let e = h.wait_ready(Duration::from_secs(10)).unwrap_err();
        assert!(e.to_string().contains("no model here"), "{e}");
        assert!(!h.is_ready());
        h.shutdown().unwrap();
    }
}
