//! Counters, gauges and histograms of the service, kept in a `prometheus-client` registry and
//! rendered in the OpenMetrics text format (which Prometheus scrapes natively). Every series is
//! created up front, so a scrape shows zeros instead of missing series before the first request.

use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// The `Content-Type` of [`Metrics::render`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Upper bounds (seconds) of the request-latency buckets.
pub const REQUEST_BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];
/// Upper bounds (seconds) of the per-step and queue-wait buckets.
pub const STEP_BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

/// The endpoints that are counted separately.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Endpoint {
    /// `POST /v1/reason`.
    Reason,
    /// `POST /v1/completions`.
    Completions,
    /// `POST /v1/chat/completions`.
    ChatCompletions,
    /// `GET /v1/models`.
    Models,
    /// `GET /healthz`.
    Health,
    /// `GET /metrics`.
    Metrics,
    /// Anything else (404s).
    Other,
}

impl Endpoint {
    const ALL: [Endpoint; 7] = [
        Endpoint::Reason,
        Endpoint::Completions,
        Endpoint::ChatCompletions,
        Endpoint::Models,
        Endpoint::Health,
        Endpoint::Metrics,
        Endpoint::Other,
    ];

    /// The label value.
    pub fn label(self) -> &'static str {
        match self {
            Endpoint::Reason => "reason",
            Endpoint::Completions => "completions",
            Endpoint::ChatCompletions => "chat_completions",
            Endpoint::Models => "models",
            Endpoint::Health => "healthz",
            Endpoint::Metrics => "metrics",
            Endpoint::Other => "other",
        }
    }
}

/// Why a request failed; each kind has its own error counter and HTTP status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// Malformed JSON, a wrong type or value (400).
    BadRequest,
    /// Unknown path (404).
    NotFound,
    /// Body over the size limit (413).
    PayloadTooLarge,
    /// The queue is full (503 with `Retry-After`).
    QueueFull,
    /// The model is still loading (503).
    NotReady,
    /// The server is shutting down (503).
    ShuttingDown,
    /// The request ran past its deadline (504).
    Timeout,
    /// The client did not send its body before the deadline (408).
    BodyTimeout,
    /// The model failed (500).
    Internal,
    /// A `/v1/*` request without the server's API key (401 with `WWW-Authenticate: Bearer`).
    Unauthorized,
}

impl ErrorKind {
    const ALL: [ErrorKind; 10] = [
        ErrorKind::BadRequest,
        ErrorKind::NotFound,
        ErrorKind::PayloadTooLarge,
        ErrorKind::QueueFull,
        ErrorKind::NotReady,
        ErrorKind::ShuttingDown,
        ErrorKind::Timeout,
        ErrorKind::BodyTimeout,
        ErrorKind::Internal,
        ErrorKind::Unauthorized,
    ];

    /// The label value (also the `type` of the JSON error body).
    pub fn label(self) -> &'static str {
        match self {
            ErrorKind::BadRequest => "invalid_request_error",
            ErrorKind::NotFound => "not_found",
            ErrorKind::PayloadTooLarge => "payload_too_large",
            ErrorKind::QueueFull => "queue_full",
            ErrorKind::NotReady => "not_ready",
            ErrorKind::ShuttingDown => "shutting_down",
            ErrorKind::Timeout => "timeout",
            ErrorKind::BodyTimeout => "request_timeout",
            ErrorKind::Internal => "internal_error",
            ErrorKind::Unauthorized => "authentication_error",
        }
    }

    /// The HTTP status code.
    pub fn status(self) -> u16 {
        match self {
            ErrorKind::BadRequest => 400,
            ErrorKind::NotFound => 404,
            ErrorKind::PayloadTooLarge => 413,
            ErrorKind::QueueFull | ErrorKind::NotReady | ErrorKind::ShuttingDown => 503,
            ErrorKind::Timeout => 504,
            ErrorKind::BodyTimeout => 408,
            ErrorKind::Internal => 500,
            ErrorKind::Unauthorized => 401,
        }
    }
}

/// HTTP status codes counted per endpoint; any other status is counted as `code="other"`.
const STATUSES: [u16; 10] = [200, 400, 401, 404, 405, 408, 413, 500, 503, 504];

type Labels<const N: usize> = [(&'static str, &'static str); N];
type HistogramFamily = Family<Labels<1>, Histogram, fn() -> Histogram>;

fn status_label(status: u16) -> &'static str {
    match status {
        200 => "200",
        400 => "400",
        401 => "401",
        404 => "404",
        405 => "405",
        408 => "408",
        413 => "413",
        500 => "500",
        503 => "503",
        504 => "504",
        _ => "other",
    }
}

/// A duration in seconds as a histogram observes it: negative or NaN values count as 0.
fn seconds(s: f64) -> f64 {
    if s.is_finite() && s > 0.0 {
        s
    } else {
        0.0
    }
}

/// Every metric of one server.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<Labels<2>, Counter>,
    errors: Family<Labels<1>, Counter>,
    request_seconds: HistogramFamily,
    step_seconds: Histogram,
    queue_wait_seconds: Histogram,
    /// Unsigned so that a late decrement saturates at 0 instead of showing a negative depth.
    queue_depth: Gauge<u64, AtomicU64>,
    busy_workers: Gauge<u64, AtomicU64>,
    ready: Gauge,
    workers: Gauge,
    queue_capacity: Gauge,
    generated_tokens: Counter,
    generation_seconds: Counter<f64, AtomicU64>,
    tokens_per_second: Gauge<f64, AtomicU64>,
}

impl Default for Metrics {
    fn default() -> Self {
        let requests = Family::<Labels<2>, Counter>::default();
        let errors = Family::<Labels<1>, Counter>::default();
        let request_seconds: HistogramFamily =
            Family::new_with_constructor(|| Histogram::new(REQUEST_BUCKETS));
        for e in Endpoint::ALL {
            for code in STATUSES.iter().map(|&s| status_label(s)).chain(["other"]) {
                drop(requests.get_or_create(&[("endpoint", e.label()), ("code", code)]));
            }
            drop(request_seconds.get_or_create(&[("endpoint", e.label())]));
        }
        for k in ErrorKind::ALL {
            drop(errors.get_or_create(&[("kind", k.label())]));
        }
        let m = Metrics {
            registry: Registry::default(),
            requests,
            errors,
            request_seconds,
            step_seconds: Histogram::new(STEP_BUCKETS),
            queue_wait_seconds: Histogram::new(STEP_BUCKETS),
            queue_depth: Gauge::default(),
            busy_workers: Gauge::default(),
            ready: Gauge::default(),
            workers: Gauge::default(),
            queue_capacity: Gauge::default(),
            generated_tokens: Counter::default(),
            generation_seconds: Counter::default(),
            tokens_per_second: Gauge::default(),
        };
        m.registered()
    }
}

impl Metrics {
    /// Registers every metric (the registry holds clones that share the values).
    fn registered(mut self) -> Self {
        let r = &mut self.registry;
        r.register(
            "steper_requests",
            "HTTP requests by endpoint and status code",
            self.requests.clone(),
        );
        r.register(
            "steper_errors",
            "Failed requests by kind",
            self.errors.clone(),
        );
        r.register(
            "steper_request_duration_seconds",
            "Request latency (arrival to last byte queued)",
            self.request_seconds.clone(),
        );
        r.register(
            "steper_step_duration_seconds",
            "Model time of one reasoning step",
            self.step_seconds.clone(),
        );
        r.register(
            "steper_queue_wait_seconds",
            "Time a job waited for a worker",
            self.queue_wait_seconds.clone(),
        );
        r.register(
            "steper_queue_depth",
            "Jobs waiting for a worker",
            self.queue_depth.clone(),
        );
        r.register(
            "steper_queue_capacity",
            "Jobs the queue holds before 503",
            self.queue_capacity.clone(),
        );
        r.register(
            "steper_workers",
            "Model worker threads",
            self.workers.clone(),
        );
        r.register(
            "steper_workers_busy",
            "Workers running a job",
            self.busy_workers.clone(),
        );
        r.register(
            "steper_ready",
            "1 once the model and index are loaded",
            self.ready.clone(),
        );
        r.register(
            "steper_generated_tokens",
            "Tokens generated by the model",
            self.generated_tokens.clone(),
        );
        r.register(
            "steper_generation_seconds",
            "Model time spent generating (prefill + decode)",
            self.generation_seconds.clone(),
        );
        r.register(
            "steper_tokens_per_second",
            "Generated tokens per second of model time, last job",
            self.tokens_per_second.clone(),
        );
        self
    }

    /// Counts a finished request and its latency.
    pub fn record_request(&self, endpoint: Endpoint, status: u16, seconds_taken: f64) {
        self.requests
            .get_or_create(&[
                ("endpoint", endpoint.label()),
                ("code", status_label(status)),
            ])
            .inc();
        self.request_seconds
            .get_or_create(&[("endpoint", endpoint.label())])
            .observe(seconds(seconds_taken));
    }

    /// Counts an error of `kind`.
    pub fn record_error(&self, kind: ErrorKind) {
        self.errors.get_or_create(&[("kind", kind.label())]).inc();
    }

    /// Counts tokens generated by one job in `seconds` of model time.
    pub fn record_tokens(&self, tokens: usize, model_seconds: f64) {
        self.generated_tokens.inc_by(tokens as u64);
        self.generation_seconds.inc_by(seconds(model_seconds));
        if model_seconds > 0.0 {
            self.tokens_per_second.set(tokens as f64 / model_seconds);
        }
    }

    /// Records the model time of one reasoning step.
    pub fn observe_step(&self, step_seconds: f64) {
        self.step_seconds.observe(seconds(step_seconds));
    }

    /// Records how long a job waited for a worker.
    pub fn observe_queue_wait(&self, wait_seconds: f64) {
        self.queue_wait_seconds.observe(seconds(wait_seconds));
    }

    /// Requests of `endpoint` answered with `status` so far (a status outside the counted set
    /// reads as 0).
    pub fn requests(&self, endpoint: Endpoint, status: u16) -> u64 {
        match status_label(status) {
            "other" => 0,
            code => self
                .requests
                .get(&[("endpoint", endpoint.label()), ("code", code)])
                .map_or(0, |c| c.get()),
        }
    }

    /// Errors of `kind` so far.
    pub fn errors(&self, kind: ErrorKind) -> u64 {
        self.errors
            .get(&[("kind", kind.label())])
            .map_or(0, |c| c.get())
    }

    /// Jobs waiting in the queue.
    pub fn queue_depth(&self) -> u64 {
        self.queue_depth.get()
    }

    /// Workers running a job.
    pub fn busy_workers(&self) -> u64 {
        self.busy_workers.get()
    }

    pub(crate) fn queue_add(&self, delta: i64) {
        add_signed(self.queue_depth.inner(), delta);
    }

    pub(crate) fn busy_add(&self, delta: i64) {
        add_signed(self.busy_workers.inner(), delta);
    }

    pub(crate) fn set_ready(&self, ready: bool) {
        self.ready.set(i64::from(ready));
    }

    pub(crate) fn set_pool(&self, workers: usize, queue_capacity: usize) {
        self.workers.set(workers as i64);
        self.queue_capacity.set(queue_capacity as i64);
    }

    /// The OpenMetrics text exposition of every metric (ends with `# EOF`); serve it with
    /// [`CONTENT_TYPE`].
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(16384);
        // Writing into a String cannot fail; an encoder error would be a bug in a label.
        if encode(&mut out, &self.registry).is_err() {
            out.push_str("# EOF\n");
        }
        out
    }
}

fn add_signed(a: &AtomicU64, delta: i64) {
    if delta >= 0 {
        a.fetch_add(delta as u64, Ordering::Relaxed);
    } else {
        // Saturating: a gauge never wraps below zero.
        let d = delta.unsigned_abs();
        let _ = a.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
            Some(v.saturating_sub(d))
        });
    }
}

/// Reads one sample (`name{labels} value` or `name value`) from a Prometheus or OpenMetrics text
/// exposition.
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (key, value) = l.rsplit_once(' ')?;
        (key == series).then(|| value.parse().ok())?
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Histogram sums are f64 additions of the observations.
    const SUM_TOLERANCE: f64 = 1e-9;

    #[test]
    fn histogram_buckets_are_cumulative_and_end_at_the_count() {
        let m = Metrics::default();
        for s in [0.0005, 0.003, 0.003, 20.0, f64::NAN, -1.0] {
            m.observe_step(s);
        }
        let out = m.render();
        let get = |s: &str| sample(&out, s);
        assert_eq!(
            get("steper_step_duration_seconds_bucket{le=\"0.001\"}"),
            Some(3.0)
        );
        assert_eq!(
            get("steper_step_duration_seconds_bucket{le=\"0.005\"}"),
            Some(5.0)
        );
        assert_eq!(
            get("steper_step_duration_seconds_bucket{le=\"10.0\"}"),
            Some(5.0)
        );
        assert_eq!(
            get("steper_step_duration_seconds_bucket{le=\"+Inf\"}"),
            Some(6.0)
        );
        assert_eq!(get("steper_step_duration_seconds_count"), Some(6.0));
        let sum = get("steper_step_duration_seconds_sum").expect("a sum");
        assert!((sum - 20.0065).abs() < SUM_TOLERANCE, "{sum}");
    }

    #[test]
    fn render_has_every_family_and_counters_move() {
        let m = Metrics::default();
        m.record_request(Endpoint::Reason, 200, 0.2);
        m.record_request(Endpoint::Reason, 503, 0.0);
        m.record_request(Endpoint::Reason, 418, 0.0);
        m.record_error(ErrorKind::QueueFull);
        m.queue_add(3);
        m.queue_add(-5);
        m.record_tokens(10, 0.5);
        m.set_pool(2, 8);
        let text = m.render();
        for (family, kind) in [
            ("steper_requests", "counter"),
            ("steper_errors", "counter"),
            ("steper_request_duration_seconds", "histogram"),
            ("steper_step_duration_seconds", "histogram"),
            ("steper_queue_wait_seconds", "histogram"),
            ("steper_queue_depth", "gauge"),
            ("steper_workers", "gauge"),
            ("steper_generated_tokens", "counter"),
            ("steper_tokens_per_second", "gauge"),
        ] {
            assert!(
                text.contains(&format!("# TYPE {family} {kind}\n")),
                "{family}"
            );
        }
        assert!(text.ends_with("# EOF\n"), "OpenMetrics ends with # EOF");
        let get = |s: &str| sample(&text, s);
        assert_eq!(
            get("steper_requests_total{endpoint=\"reason\",code=\"200\"}"),
            Some(1.0)
        );
        assert_eq!(
            get("steper_requests_total{endpoint=\"reason\",code=\"other\"}"),
            Some(1.0)
        );
        assert_eq!(get("steper_errors_total{kind=\"queue_full\"}"), Some(1.0));
        assert_eq!(get("steper_queue_depth"), Some(0.0));
        assert_eq!(get("steper_workers"), Some(2.0));
        assert_eq!(get("steper_queue_capacity"), Some(8.0));
        assert_eq!(get("steper_generated_tokens_total"), Some(10.0));
        assert_eq!(get("steper_generation_seconds_total"), Some(0.5));
        // Series exist before their first request.
        assert_eq!(
            get("steper_requests_total{endpoint=\"completions\",code=\"504\"}"),
            Some(0.0)
        );
        assert_eq!(get("steper_errors_total{kind=\"timeout\"}"), Some(0.0));
        assert_eq!(m.requests(Endpoint::Reason, 200), 1);
        assert_eq!(m.requests(Endpoint::Reason, 418), 0);
        assert_eq!(m.errors(ErrorKind::QueueFull), 1);
        assert_eq!(get("steper_tokens_per_second"), Some(20.0));
        assert_eq!(
            get("steper_request_duration_seconds_count{endpoint=\"reason\"}"),
            Some(3.0)
        );
        // Every sample line is `name[{labels}] number`.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (_, v) = line.rsplit_once(' ').expect("a sample line");
            assert!(v.parse::<f64>().is_ok(), "{line}");
        }
    }
}
