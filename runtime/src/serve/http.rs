//! The axum router: handlers turn HTTP requests into pool jobs and worker events into JSON or
//! server-sent events.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, FromRequest, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use futures_util::stream::{self, Stream};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

use super::api::{
    ApiError, CompletionChoice, CompletionRequest, CompletionResponse, CompletionUsage,
    ReasonRequest,
};
use super::chat::{models_body, ChatChoice, ChatDelta, ChatLogprobs, ChatRequest, ChatResponse};
use super::metrics::{Endpoint, ErrorKind, Metrics};
use super::pool::{Cancel, Job, Pool, Work, WorkerEvent, RETRY_AFTER};
use super::ServeConfig;

/// Shared by every handler.
pub(crate) struct AppState {
    pub config: ServeConfig,
    pub metrics: Arc<Metrics>,
    pub pool: Arc<Pool>,
    pub ready: AtomicBool,
    pub shutting_down: AtomicBool,
    pub load_error: Mutex<Option<String>>,
    pub model_name: OnceLock<String>,
    counter: AtomicU64,
    /// Unix seconds when the service was made (`created` of `/v1/models`).
    started: u64,
}

impl AppState {
    pub fn new(config: ServeConfig, metrics: Arc<Metrics>, pool: Arc<Pool>) -> Self {
        AppState {
            config,
            metrics,
            pool,
            ready: AtomicBool::new(false),
            shutting_down: AtomicBool::new(false),
            load_error: Mutex::new(None),
            model_name: OnceLock::new(),
            counter: AtomicU64::new(0),
            started: unix_seconds(),
        }
    }

    fn next_id(&self, prefix: &str) -> String {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        format!("{prefix}-{:x}{n:06x}", unix_seconds())
    }

    fn model_name(&self) -> String {
        self.model_name
            .get()
            .cloned()
            .unwrap_or_else(|| "steper".into())
    }

    /// Refuses work while loading or draining.
    fn admit(&self) -> Result<(), ApiError> {
        if self.shutting_down.load(Ordering::Relaxed) {
            return Err(ApiError::new(
                ErrorKind::ShuttingDown,
                "the server is shutting down",
            ));
        }
        if !self.ready.load(Ordering::Relaxed) {
            return Err(ApiError::new(
                ErrorKind::NotReady,
                "the model and index are still loading",
            ));
        }
        Ok(())
    }
}

fn unix_seconds() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The router over `state`.
pub(crate) fn router(state: Arc<AppState>) -> Router {
    let limit = state.config.max_body_bytes;
    Router::new()
        .route("/v1/reason", post(reason))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(limit))
        .layer(axum::middleware::from_fn_with_state(
            Arc::clone(&state),
            super::auth::require_key,
        ))
        .with_state(state)
}

pub(crate) fn error_response(st: &AppState, e: &ApiError) -> Response {
    st.metrics.record_error(e.kind);
    let status = StatusCode::from_u16(e.kind.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut resp = json_response(status, &e.body());
    if status == StatusCode::SERVICE_UNAVAILABLE {
        resp.headers_mut().insert(
            header::RETRY_AFTER,
            HeaderValue::from(RETRY_AFTER.as_secs()),
        );
    }
    if e.kind == ErrorKind::ShuttingDown {
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}

fn json_response(status: StatusCode, value: &impl serde::Serialize) -> Response {
    match serde_json::to_vec(value) {
        Ok(bytes) => (
            status,
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            Body::from(bytes),
        )
            .into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot serialize the response: {e}"),
        )
            .into_response(),
    }
}

/// The deadline of a job's token (every job of the server has one; without, a year away).
fn deadline_of(cancel: &Cancel) -> tokio::time::Instant {
    let far = || std::time::Instant::now() + std::time::Duration::from_secs(365 * 24 * 3600);
    tokio::time::Instant::from_std(cancel.deadline().unwrap_or_else(far))
}

/// Reads the body within the request deadline; over the limit → 413.
fn too_large(limit: usize) -> ApiError {
    ApiError::new(
        ErrorKind::PayloadTooLarge,
        format!("the request body is larger than the server's limit of {limit} bytes"),
    )
}

async fn read_body(req: Request, limit: usize, cancel: &Cancel) -> Result<Bytes, ApiError> {
    // An announced length over the limit is refused before anything is read.
    let announced = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if announced.is_some_and(|n| n > limit as u64) {
        return Err(too_large(limit));
    }
    let deadline = deadline_of(cancel);
    match tokio::time::timeout_at(deadline, Bytes::from_request(req, &())).await {
        Err(_) => Err(ApiError::new(
            ErrorKind::BodyTimeout,
            "the request body did not arrive within the server's timeout",
        )),
        Ok(Err(rejection)) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            Err(too_large(limit))
        }
        Ok(Err(rejection)) => Err(ApiError::new(
            ErrorKind::BadRequest,
            format!(
                "the request body could not be read: {}",
                rejection.body_text()
            ),
        )),
        Ok(Ok(b)) => Ok(b),
    }
}

/// Queues `work`; the receiver yields the worker's events.
fn submit(
    st: &AppState,
    work: Work,
    cancel: &Cancel,
    accepted: Instant,
) -> Result<UnboundedReceiver<WorkerEvent>, ApiError> {
    st.admit()?;
    let (tx, rx) = unbounded_channel();
    st.pool.submit(Job {
        work,
        cancel: cancel.clone(),
        accepted,
        events: tx,
    })?;
    Ok(rx)
}

/// Waits for the job's last event (`Done` or `Failed`) until the deadline; on timeout the job
/// is cancelled.
async fn finish(rx: &mut UnboundedReceiver<WorkerEvent>, cancel: &Cancel) -> WorkerEvent {
    let deadline = deadline_of(cancel);
    let wait = async {
        loop {
            match rx.recv().await {
                Some(WorkerEvent::Started | WorkerEvent::Step(_) | WorkerEvent::Piece(_)) => {}
                Some(last) => return last,
                None => {
                    return WorkerEvent::Failed(ApiError::new(
                        ErrorKind::Internal,
                        "the worker dropped the request",
                    ))
                }
            }
        }
    };
    match tokio::time::timeout_at(deadline, wait).await {
        Ok(ev) => ev,
        Err(_) => {
            cancel.cancel();
            WorkerEvent::Failed(ApiError::new(
                ErrorKind::Timeout,
                "the request did not finish within the server's timeout",
            ))
        }
    }
}

async fn reason(State(st): State<Arc<AppState>>, req: Request) -> Response {
    let t0 = Instant::now();
    let cancel = Cancel::with_deadline(t0 + st.config.timeout);
    let result = reason_inner(&st, req, &cancel, t0).await;
    respond(&st, Endpoint::Reason, t0, result)
}

/// Turns a handler's result into the response and counts it (streams are counted when they
/// end, by the stream itself).
fn respond(
    st: &AppState,
    endpoint: Endpoint,
    t0: Instant,
    result: Result<Response, ApiError>,
) -> Response {
    let resp = match result {
        Ok(r) => r,
        Err(e) => error_response(st, &e),
    };
    if resp.headers().get(header::CONTENT_TYPE) != Some(&HeaderValue::from_static(SSE_TYPE)) {
        st.metrics
            .record_request(endpoint, resp.status().as_u16(), t0.elapsed().as_secs_f64());
    }
    resp
}

const SSE_TYPE: &str = "text/event-stream";

async fn reason_inner(
    st: &Arc<AppState>,
    req: Request,
    cancel: &Cancel,
    t0: Instant,
) -> Result<Response, ApiError> {
    let body = read_body(req, st.config.max_body_bytes, cancel).await?;
    let request = ReasonRequest::parse(&body)?;
    let stream = request.stream;
    let mut rx = submit(st, Work::Reason(request), cancel, t0)?;
    let id = st.next_id("rsn");
    if stream {
        return Ok(sse_response(reason_events(
            Arc::clone(st),
            rx,
            cancel.clone(),
            id,
            t0,
        )));
    }
    match finish(&mut rx, cancel).await {
        WorkerEvent::ReasonDone(mut r) => {
            r.id = id;
            Ok(json_response(StatusCode::OK, &*r))
        }
        WorkerEvent::Failed(e) => Err(e),
        other => Err(unexpected(&other)),
    }
}

fn unexpected(ev: &WorkerEvent) -> ApiError {
    ApiError::new(
        ErrorKind::Internal,
        format!("unexpected worker event {ev:?}"),
    )
}

fn sse_response<S>(s: S) -> Response
where
    S: Stream<Item = Result<Event, Infallible>> + Send + 'static,
{
    let mut resp = Sse::new(s).keep_alive(KeepAlive::default()).into_response();
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(SSE_TYPE));
    resp
}

fn json_event(name: Option<&str>, value: &impl serde::Serialize) -> Event {
    let data = serde_json::to_string(value).unwrap_or_else(|e| {
        serde_json::json!({"error": {"message": format!("cannot serialize event: {e}")}})
            .to_string()
    });
    let ev = Event::default().data(data);
    match name {
        Some(n) => ev.event(n),
        None => ev,
    }
}

struct StreamState {
    st: Arc<AppState>,
    rx: UnboundedReceiver<WorkerEvent>,
    cancel: Cancel,
    id: String,
    t0: Instant,
    done: bool,
}

impl StreamState {
    /// The next worker event before the deadline (a timeout cancels the job).
    async fn next_event(&mut self) -> WorkerEvent {
        let deadline = deadline_of(&self.cancel);
        match tokio::time::timeout_at(deadline, self.rx.recv()).await {
            Ok(Some(ev)) => ev,
            Ok(None) => WorkerEvent::Failed(ApiError::new(
                ErrorKind::Internal,
                "the worker dropped the request",
            )),
            Err(_) => {
                self.cancel.cancel();
                WorkerEvent::Failed(ApiError::new(
                    ErrorKind::Timeout,
                    "the request did not finish within the server's timeout",
                ))
            }
        }
    }

    fn end(&mut self, endpoint: Endpoint, status: u16, error: Option<ErrorKind>) {
        self.done = true;
        if let Some(kind) = error {
            self.st.metrics.record_error(kind);
        }
        self.st
            .metrics
            .record_request(endpoint, status, self.t0.elapsed().as_secs_f64());
    }
}

impl Drop for StreamState {
    fn drop(&mut self) {
        // The client closed the stream early: stop the worker.
        if !self.done {
            self.cancel.cancel();
        }
    }
}

/// `event: step` per finished step, then `event: answer` (or `event: error`).
fn reason_events(
    st: Arc<AppState>,
    rx: UnboundedReceiver<WorkerEvent>,
    cancel: Cancel,
    id: String,
    t0: Instant,
) -> impl Stream<Item = Result<Event, Infallible>> + Send + 'static {
    let state = StreamState {
        st,
        rx,
        cancel,
        id,
        t0,
        done: false,
    };
    stream::unfold(state, |mut s| async move {
        loop {
            if s.done {
                return None;
            }
            let ev = match s.next_event().await {
                WorkerEvent::Started | WorkerEvent::Piece(_) => continue,
                WorkerEvent::Step(step) => json_event(Some("step"), &step),
                WorkerEvent::ReasonDone(mut r) => {
                    r.id = s.id.clone();
                    s.end(Endpoint::Reason, 200, None);
                    json_event(Some("answer"), &*r)
                }
                WorkerEvent::Failed(e) => {
                    s.end(Endpoint::Reason, e.kind.status(), Some(e.kind));
                    json_event(Some("error"), &e.body())
                }
                other @ WorkerEvent::CompletionDone(..) => {
                    let e = unexpected(&other);
                    s.end(Endpoint::Reason, 500, Some(e.kind));
                    json_event(Some("error"), &e.body())
                }
            };
            return Some((Ok(ev), s));
        }
    })
}

async fn completions(State(st): State<Arc<AppState>>, req: Request) -> Response {
    let t0 = Instant::now();
    let cancel = Cancel::with_deadline(t0 + st.config.timeout);
    let result = completions_inner(&st, req, &cancel, t0).await;
    respond(&st, Endpoint::Completions, t0, result)
}

fn chunk(
    id: &str,
    created: u64,
    model: &str,
    choice: Option<CompletionChoice>,
    usage: Option<CompletionUsage>,
) -> CompletionResponse {
    CompletionResponse {
        id: id.to_string(),
        object: "text_completion",
        created,
        model: model.to_string(),
        choices: choice.into_iter().collect(),
        usage,
    }
}

async fn completions_inner(
    st: &Arc<AppState>,
    req: Request,
    cancel: &Cancel,
    t0: Instant,
) -> Result<Response, ApiError> {
    let body = read_body(req, st.config.max_body_bytes, cancel).await?;
    let request = CompletionRequest::parse(&body)?;
    let id = st.next_id("cmpl");
    let created = unix_seconds();
    let model = request.model.clone().unwrap_or_else(|| st.model_name());
    let stream = request.stream;
    let include_usage = request.include_usage;
    let seed = request
        .seed
        .unwrap_or_else(|| st.counter.load(Ordering::Relaxed) ^ t0.elapsed().as_nanos() as u64);
    let mut rx = submit(st, Work::Complete(request, seed), cancel, t0)?;
    if !stream {
        return match finish(&mut rx, cancel).await {
            WorkerEvent::CompletionDone(c) => {
                let usage = CompletionUsage {
                    prompt_tokens: c.prompt_tokens,
                    completion_tokens: c.completion_tokens,
                    total_tokens: c.prompt_tokens + c.completion_tokens,
                };
                let choice = CompletionChoice {
                    text: c.text,
                    index: 0,
                    logprobs: c.logprobs,
                    finish_reason: Some(c.finish_reason.as_str()),
                };
                Ok(json_response(
                    StatusCode::OK,
                    &chunk(&id, created, &model, Some(choice), Some(usage)),
                ))
            }
            WorkerEvent::Failed(e) => Err(e),
            other => Err(unexpected(&other)),
        };
    }
    let state = StreamState {
        st: Arc::clone(st),
        rx,
        cancel: cancel.clone(),
        id,
        t0,
        done: false,
    };
    // OpenAI's stream: `data: {chunk}` per piece, a last chunk with the finish reason (and, when
    // `stream_options.include_usage`, a chunk with `usage` and no choice), then `data: [DONE]`.
    let pending: Vec<Event> = Vec::new();
    let s = stream::unfold(
        (state, pending, false),
        move |(mut s, mut pending, mut finished)| {
            let model = model.clone();
            async move {
                loop {
                    if let Some(ev) = pending.pop() {
                        return Some((Ok(ev), (s, pending, finished)));
                    }
                    if finished {
                        return None;
                    }
                    match s.next_event().await {
                        WorkerEvent::Started | WorkerEvent::Step(_) => continue,
                        WorkerEvent::Piece(text) => {
                            let choice = CompletionChoice {
                                text,
                                index: 0,
                                logprobs: None,
                                finish_reason: None,
                            };
                            let c = chunk(&s.id, created, &model, Some(choice), None);
                            return Some((Ok(json_event(None, &c)), (s, pending, finished)));
                        }
                        WorkerEvent::CompletionDone(c) => {
                            s.end(Endpoint::Completions, 200, None);
                            finished = true;
                            // Popped from the back: push in reverse order.
                            pending.push(Event::default().data("[DONE]"));
                            if include_usage {
                                let usage = CompletionUsage {
                                    prompt_tokens: c.prompt_tokens,
                                    completion_tokens: c.completion_tokens,
                                    total_tokens: c.prompt_tokens + c.completion_tokens,
                                };
                                pending.push(json_event(
                                    None,
                                    &chunk(&s.id, created, &model, None, Some(usage)),
                                ));
                            }
                            let choice = CompletionChoice {
                                text: String::new(),
                                index: 0,
                                logprobs: c.logprobs,
                                finish_reason: Some(c.finish_reason.as_str()),
                            };
                            pending.push(json_event(
                                None,
                                &chunk(&s.id, created, &model, Some(choice), None),
                            ));
                        }
                        WorkerEvent::Failed(e) => {
                            s.end(Endpoint::Completions, e.kind.status(), Some(e.kind));
                            finished = true;
                            pending.push(Event::default().data("[DONE]"));
                            pending.push(json_event(None, &e.body()));
                        }
                        other => {
                            let e = unexpected(&other);
                            s.end(Endpoint::Completions, 500, Some(e.kind));
                            finished = true;
                            pending.push(Event::default().data("[DONE]"));
                            pending.push(json_event(None, &e.body()));
                        }
                    }
                }
            }
        },
    );
    Ok(sse_response(s))
}

async fn chat_completions(State(st): State<Arc<AppState>>, req: Request) -> Response {
    let t0 = Instant::now();
    let cancel = Cancel::with_deadline(t0 + st.config.timeout);
    let result = chat_inner(&st, req, &cancel, t0).await;
    respond(&st, Endpoint::ChatCompletions, t0, result)
}

fn chat_chunk(
    id: &str,
    created: u64,
    model: &str,
    choice: Option<ChatChoice>,
    usage: Option<CompletionUsage>,
) -> ChatResponse {
    ChatResponse {
        id: id.to_string(),
        object: "chat.completion.chunk",
        created,
        model: model.to_string(),
        choices: choice.into_iter().collect(),
        usage,
    }
}

fn delta_choice(
    delta: ChatDelta,
    logprobs: Option<ChatLogprobs>,
    finish: Option<&'static str>,
) -> ChatChoice {
    ChatChoice {
        index: 0,
        message: None,
        delta: Some(delta),
        logprobs,
        finish_reason: finish,
    }
}

async fn chat_inner(
    st: &Arc<AppState>,
    req: Request,
    cancel: &Cancel,
    t0: Instant,
) -> Result<Response, ApiError> {
    let body = read_body(req, st.config.max_body_bytes, cancel).await?;
    let request = ChatRequest::parse(&body)?;
    let id = st.next_id("chatcmpl");
    let created = unix_seconds();
    let model = request
        .completion
        .model
        .clone()
        .unwrap_or_else(|| st.model_name());
    let stream = request.completion.stream;
    let include_usage = request.completion.include_usage;
    let want_logprobs = request.logprobs;
    let seed = request
        .completion
        .seed
        .unwrap_or_else(|| st.counter.load(Ordering::Relaxed) ^ t0.elapsed().as_nanos() as u64);
    let mut rx = submit(st, Work::Chat(Box::new(request), seed), cancel, t0)?;
    let usage_of = |c: &super::completion::Completion| CompletionUsage {
        prompt_tokens: c.prompt_tokens,
        completion_tokens: c.completion_tokens,
        total_tokens: c.prompt_tokens + c.completion_tokens,
    };
    if !stream {
        return match finish(&mut rx, cancel).await {
            WorkerEvent::CompletionDone(c) => {
                let usage = usage_of(&c);
                let c = *c;
                let choice = ChatChoice {
                    index: 0,
                    message: Some(ChatDelta {
                        role: Some("assistant"),
                        content: Some(c.text),
                    }),
                    delta: None,
                    logprobs: c.logprobs.filter(|_| want_logprobs).map(ChatLogprobs::from),
                    finish_reason: Some(c.finish_reason.as_str()),
                };
                let resp = ChatResponse {
                    id,
                    object: "chat.completion",
                    created,
                    model,
                    choices: vec![choice],
                    usage: Some(usage),
                };
                Ok(json_response(StatusCode::OK, &resp))
            }
            WorkerEvent::Failed(e) => Err(e),
            other => Err(unexpected(&other)),
        };
    }
    let state = StreamState {
        st: Arc::clone(st),
        rx,
        cancel: cancel.clone(),
        id,
        t0,
        done: false,
    };
    // OpenAI's chat stream: a first chunk with `delta.role`, `delta.content` per piece, a last
    // chunk with an empty delta and the finish reason (then, with
    // `stream_options.include_usage`, a chunk with `usage` and no choice), then `data: [DONE]`.
    let first = json_event(
        None,
        &chat_chunk(
            &state.id,
            created,
            &model,
            Some(delta_choice(
                ChatDelta {
                    role: Some("assistant"),
                    content: Some(String::new()),
                },
                None,
                None,
            )),
            None,
        ),
    );
    let pending: Vec<Event> = vec![first];
    let s = stream::unfold(
        (state, pending, false),
        move |(mut s, mut pending, mut finished)| {
            let model = model.clone();
            async move {
                loop {
                    if let Some(ev) = pending.pop() {
                        return Some((Ok(ev), (s, pending, finished)));
                    }
                    if finished {
                        return None;
                    }
                    match s.next_event().await {
                        WorkerEvent::Started | WorkerEvent::Step(_) => continue,
                        WorkerEvent::Piece(text) => {
                            let choice = delta_choice(
                                ChatDelta {
                                    role: None,
                                    content: Some(text),
                                },
                                None,
                                None,
                            );
                            let c = chat_chunk(&s.id, created, &model, Some(choice), None);
                            return Some((Ok(json_event(None, &c)), (s, pending, finished)));
                        }
                        WorkerEvent::CompletionDone(c) => {
                            s.end(Endpoint::ChatCompletions, 200, None);
                            finished = true;
                            // Popped from the back: push in reverse order.
                            pending.push(Event::default().data("[DONE]"));
                            if include_usage {
                                pending.push(json_event(
                                    None,
                                    &chat_chunk(&s.id, created, &model, None, Some(usage_of(&c))),
                                ));
                            }
                            let c = *c;
                            let choice = delta_choice(
                                ChatDelta {
                                    role: None,
                                    content: None,
                                },
                                c.logprobs.filter(|_| want_logprobs).map(ChatLogprobs::from),
                                Some(c.finish_reason.as_str()),
                            );
                            pending.push(json_event(
                                None,
                                &chat_chunk(&s.id, created, &model, Some(choice), None),
                            ));
                        }
                        WorkerEvent::Failed(e) => {
                            s.end(Endpoint::ChatCompletions, e.kind.status(), Some(e.kind));
                            finished = true;
                            pending.push(Event::default().data("[DONE]"));
                            pending.push(json_event(None, &e.body()));
                        }
                        other => {
                            let e = unexpected(&other);
                            s.end(Endpoint::ChatCompletions, 500, Some(e.kind));
                            finished = true;
                            pending.push(Event::default().data("[DONE]"));
                            pending.push(json_event(None, &e.body()));
                        }
                    }
                }
            }
        },
    );
    Ok(sse_response(s))
}

async fn models(State(st): State<Arc<AppState>>) -> Response {
    let t0 = Instant::now();
    let result = st
        .admit()
        .map(|()| json_response(StatusCode::OK, &models_body(&st.model_name(), st.started)));
    respond(&st, Endpoint::Models, t0, result)
}

async fn healthz(State(st): State<Arc<AppState>>) -> Response {
    let t0 = Instant::now();
    let (status, body) = if st.shutting_down.load(Ordering::Relaxed) {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            serde_json::json!({"status": "shutting_down"}),
        )
    } else if st.ready.load(Ordering::Relaxed) {
        (
            StatusCode::OK,
            serde_json::json!({
                "status": "ready",
                "model": st.model_name(),
                "workers": st.config.workers,
                "queue_capacity": st.pool.capacity(),
                "queue_depth": st.metrics.queue_depth(),
                "busy_workers": st.metrics.busy_workers(),
            }),
        )
    } else {
        let err = st
            .load_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        match err {
            Some(e) => (
                StatusCode::SERVICE_UNAVAILABLE,
                serde_json::json!({"status": "failed", "error": e}),
            ),
            None => (
                StatusCode::SERVICE_UNAVAILABLE,
                serde_json::json!({"status": "loading"}),
            ),
        }
    };
    let mut resp = json_response(status, &body);
    if status == StatusCode::SERVICE_UNAVAILABLE {
        resp.headers_mut().insert(
            header::RETRY_AFTER,
            HeaderValue::from(RETRY_AFTER.as_secs()),
        );
    }
    st.metrics.record_request(
        Endpoint::Health,
        status.as_u16(),
        t0.elapsed().as_secs_f64(),
    );
    resp
}

async fn metrics(State(st): State<Arc<AppState>>) -> Response {
    let t0 = Instant::now();
    let text = st.metrics.render();
    st.metrics
        .record_request(Endpoint::Metrics, 200, t0.elapsed().as_secs_f64());
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static(super::metrics::CONTENT_TYPE),
        )],
        Body::from(text),
    )
        .into_response()
}

async fn not_found(State(st): State<Arc<AppState>>, req: Request) -> Response {
    let e = ApiError::new(
        ErrorKind::NotFound,
        format!(
            "no route {} {}; routes: POST /v1/reason, POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /healthz, GET /metrics",
            req.method(),
            req.uri().path()
        ),
    );
    let resp = error_response(&st, &e);
    st.metrics.record_request(Endpoint::Other, 404, 0.0);
    resp
}
