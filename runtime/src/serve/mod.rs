//! The HTTP service (`steper-run serve`): the multi-step loop and plain completions over
//! HTTP/1.1 for edge deployments.
//!
//! | route | |
//! |---|---|
//! | `POST /v1/reason` | `{question, max_steps?, top_k?, include_trace?, stream?}` → answer, trace, timings; `stream: true` → server-sent events `step` (one per step as it finishes), then `answer` (or `error`) |
//! | `POST /v1/completions` | OpenAI's completions request/response (`prompt`, `max_tokens`, `temperature`, `top_p`, `stop`, `stream`, `logprobs`, `seed`) |
//! | `POST /v1/chat/completions` | OpenAI's chat completions: `messages` rendered with the model's chat template (`tokenizer_config.json`), the same sampling fields (`max_tokens` / `max_completion_tokens`, `logprobs` + `top_logprobs`); `stream: true` → `chat.completion.chunk` events, then `data: [DONE]` |
//! | `GET /v1/models` | OpenAI's model list: the served model |
//! | `GET /healthz` | 503 `loading` until the model and index are loaded, then 200 `ready`; 503 while shutting down |
//! | `GET /metrics` | OpenMetrics text (prometheus-client): requests, errors by kind, queue depth, latency histograms per request and per step, tokens/s |
//!
//! With [`ServeConfig::api_key`] set, every `/v1/*` request must carry `Authorization: Bearer
//! <key>` (401 with `WWW-Authenticate: Bearer` otherwise, counted as
//! `steper_errors_total{kind="authentication_error"}`); `/healthz` and `/metrics` stay open.
//! The default address is loopback (`127.0.0.1:8080`).
//!
//! Requests run on a fixed pool of model worker threads behind one bounded queue:
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
//! let config = ServeConfig::default()
//!     .with_addr(([127, 0, 0, 1], 0).into())
//!     .with_workers(2);
//! let server = Server::start(config, || {
//!     Engine::builder().model_dir("exports/student").index("indexes/hotpotqa").build()
//! })?;
//! println!("listening on {}", server.addr());
//! server.wait_ready(Duration::from_secs(60))?;
//! server.shutdown()?;
//! # Ok(())
//! # }
//! ```

mod api;
mod auth;
mod batcher;
mod chat;
mod completion;
mod config;
mod http;
mod metrics;
mod pool;

pub use api::{
    CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse, CompletionUsage,
    ReasonRequest, DEFAULT_MAX_TOKENS, MAX_LOGPROBS, MAX_QUESTION_CHARS, MAX_STEPS_LIMIT,
    MAX_STOP_SEQUENCES, MAX_TOKENS_LIMIT, TOP_K_LIMIT,
};
pub use auth::ApiKey;
pub use chat::{
    ChatChoice, ChatDelta, ChatLogprobs, ChatRequest, ChatResponse, ChatTokenLogprob,
    ChatTopLogprob, MAX_MESSAGES, MAX_TOP_LOGPROBS,
};
pub use completion::{complete, sample_top_p, Completion, FinishReason, PromptProblem};
pub use config::ServeConfig;
pub use metrics::{sample, Endpoint, ErrorKind, Metrics, CONTENT_TYPE};
pub use pool::{PassageInfo, ReasonResponse, ReasonUsage, StepEvent, Timings};

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::sync::watch;

use crate::engine::Engine;
use crate::error::{Error, Result};
use http::AppState;
use pool::Pool;

/// The service without a listener or an async runtime: its routes, its model workers and its
/// state. An embedder nests [`Service::router`] in its own axum app (adding auth, TLS or its
/// own layers) and serves it on its own tokio runtime; [`Server::start`] does exactly this
/// with a listener and a runtime of its own.
///
/// ```no_run
/// use steper_runtime::serve::{ServeConfig, Service};
/// use steper_runtime::Engine;
///
/// # async fn serve() -> Result<(), Box<dyn std::error::Error>> {
/// let service = Service::new(ServeConfig::default())?;
/// let _loading = service.load(|| {
///     Engine::builder().model_dir("exports/student").index("indexes/hotpotqa").build()
/// })?;
/// let app = axum::Router::new().nest("/steper", service.router());
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
/// axum::serve(listener, app).await?;
/// service.begin_drain();
/// service.close();
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct Service {
    state: Arc<AppState>,
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service")
            .field("ready", &self.is_ready())
            .field("draining", &self.is_draining())
            .finish()
    }
}

/// Receives the outcome of [`Service::load`]: `Ok` once the workers run, or the loader's
/// error message.
pub type LoadOutcome = std::sync::mpsc::Receiver<std::result::Result<(), String>>;

impl Service {
    /// A service with `config` (checked); no model yet: `/healthz` and the model routes answer
    /// 503 until [`Service::load`] or [`Service::start_workers`] succeeds.
    pub fn new(config: ServeConfig) -> Result<Self> {
        config.validate()?;
        let metrics = Arc::new(Metrics::default());
        let pool = Arc::new(Pool::new(config.max_queue, Arc::clone(&metrics)));
        metrics.set_pool(0, config.max_queue);
        Ok(Service {
            state: Arc::new(AppState::new(config, metrics, pool)),
        })
    }

    /// The routes (`/v1/reason`, `/v1/completions`, `/v1/chat/completions`, `/v1/models`,
    /// `/healthz`, `/metrics`) over this service,
    /// with the body limit and request logging (tower-http's trace layer: a `tracing` span per
    /// request; nothing is printed unless a subscriber is installed).
    pub fn router(&self) -> axum::Router {
        http::router(Arc::clone(&self.state)).layer(tower_http::trace::TraceLayer::new_for_http())
    }

    /// Starts the model workers on `engine` (at once, on this thread); the service is ready
    /// when this returns `Ok`.
    pub fn start_workers(&self, engine: Engine) -> Result<()> {
        let st = &self.state;
        let name = st.config.model_name.clone().unwrap_or_else(|| {
            engine
                .model_dir()
                .and_then(|d| d.file_name())
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| engine.info().backend.clone())
        });
        let _ = st.model_name.set(name);
        st.pool
            .start_workers(Arc::new(engine), st.config.workers, st.config.batch)?;
        st.ready.store(true, Ordering::SeqCst);
        st.metrics.set_ready(true);
        Ok(())
    }

    /// Runs `loader` on its own thread, then [`Service::start_workers`] on what it returns; a
    /// failure is kept for `/healthz` and sent on the returned channel.
    pub fn load<F>(&self, loader: F) -> Result<LoadOutcome>
    where
        F: FnOnce() -> Result<Engine> + Send + 'static,
    {
        let (tx, rx) = std::sync::mpsc::channel();
        let service = self.clone();
        std::thread::Builder::new()
            .name("steper-loader".into())
            .spawn(move || {
                let outcome = loader().and_then(|engine| service.start_workers(engine));
                let sent = outcome.map_err(|e| {
                    let msg = e.to_string();
                    *service
                        .state
                        .load_error
                        .lock()
                        .unwrap_or_else(|p| p.into_inner()) = Some(msg.clone());
                    msg
                });
                let _ = tx.send(sent);
            })
            .map_err(|e| Error::Server {
                addr: "-".into(),
                message: format!("cannot start the loader thread: {e}"),
            })?;
        Ok(rx)
    }

    /// Whether the model is loaded and the workers run.
    pub fn is_ready(&self) -> bool {
        self.state.ready.load(Ordering::SeqCst)
    }

    /// Whether [`Service::begin_drain`] was called.
    pub fn is_draining(&self) -> bool {
        self.state.shutting_down.load(Ordering::SeqCst)
    }

    /// The loader's error, when loading failed.
    pub fn load_error(&self) -> Option<String> {
        self.state
            .load_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// From now on new requests get 503 (`shutting_down`) and `/healthz` reports it; requests
    /// already accepted finish.
    pub fn begin_drain(&self) {
        self.state.shutting_down.store(true, Ordering::SeqCst);
        self.state.metrics.set_ready(false);
    }

    /// Closes the queue, lets the workers finish what they hold, and joins them. Call it after
    /// the HTTP server stopped (every connection closed).
    pub fn close(&self) {
        self.state.pool.close_and_join();
    }

    /// The service's metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.state.metrics
    }
}

/// Starts servers.
pub struct Server;

impl Server {
    /// Binds `config.addr` and serves at once on a tokio runtime of its own; `loader` runs on
    /// its own thread, and until it returns `/healthz` and the model routes answer 503. The
    /// model workers start when it succeeds; when it fails `/healthz` reports the error and
    /// [`ServerHandle::wait_ready`] returns it.
    pub fn start<F>(config: ServeConfig, loader: F) -> Result<ServerHandle>
    where
        F: FnOnce() -> Result<Engine> + Send + 'static,
    {
        let addr_text = config.addr.to_string();
        let server_err = |message: String| Error::Server {
            addr: addr_text.clone(),
            message,
        };
        let (bind, io_threads, handle_signals) =
            (config.addr, config.io_threads, config.handle_signals);
        let service = Service::new(config)?;
        let listener = std::net::TcpListener::bind(bind)
            .map_err(|e| server_err(format!("cannot listen: {e}")))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| server_err(format!("cannot set non-blocking: {e}")))?;
        let addr = listener
            .local_addr()
            .map_err(|e| server_err(format!("no local address: {e}")))?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(io_threads)
            .thread_name("steper-http")
            .enable_all()
            .build()
            .map_err(|e| server_err(format!("cannot start the async runtime: {e}")))?;
        let (stop_tx, stop_rx) = watch::channel(false);
        let ready_rx = service.load(loader)?;

        let serving = service.clone();
        let thread = std::thread::Builder::new()
            .name("steper-serve".into())
            .spawn(move || -> Result<()> {
                let app = serving.router();
                let draining = serving.clone();
                let result = rt.block_on(async move {
                    let listener = tokio::net::TcpListener::from_std(listener)
                        .map_err(|e| format!("cannot register the listener: {e}"))?;
                    let signal = async move {
                        stop_signal(stop_rx, handle_signals).await;
                        draining.begin_drain();
                    };
                    axum::serve(listener, app)
                        .with_graceful_shutdown(signal)
                        .await
                        .map_err(|e| format!("serving failed: {e}"))
                });
                // Every connection is closed: no job is waiting for a client any more. Let the
                // workers finish what they hold and stop.
                serving.close();
                rt.shutdown_timeout(Duration::from_secs(1));
                result.map_err(|message| Error::Server {
                    addr: addr.to_string(),
                    message,
                })
            })
            .map_err(|e| server_err(format!("cannot start the server thread: {e}")))?;
        Ok(ServerHandle {
            addr,
            service,
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
    service: Service,
    stop: watch::Sender<bool>,
    thread: Option<JoinHandle<Result<()>>>,
    ready: std::sync::Mutex<Option<LoadOutcome>>,
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
        self.service.metrics()
    }

    /// The service behind the server.
    pub fn service(&self) -> &Service {
        &self.service
    }

    /// Whether the model is loaded and the workers run.
    pub fn is_ready(&self) -> bool {
        self.service.is_ready()
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
                    .service
                    .load_error()
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
        self.service.is_draining()
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
                batch: 0,
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
            assert!(
                matches!(c.validate(), Err(Error::InvalidOption { .. })),
                "{c:?}"
            );
        }
    }

    #[test]
    fn a_failing_loader_is_reported_by_wait_ready() {
        let config = ServeConfig {
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            ..ServeConfig::default()
        };
        let h = Server::start(config, || Err(Error::Internal("no model here".into()))).unwrap();
        let e = h.wait_ready(Duration::from_secs(10)).unwrap_err();
        assert!(e.to_string().contains("no model here"), "{e}");
        assert!(!h.is_ready());
        h.shutdown().unwrap();
    }
}
