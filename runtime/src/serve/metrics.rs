//! Counters, gauges and histograms of the service, rendered in the Prometheus text exposition
//! format (version 0.0.4). Lock-free: every value is an atomic, so recording never blocks a
//! request.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

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
pub enum Endpoint {
    /// `POST /v1/reason`.
    Reason,
    /// `POST /v1/completions`.
    Completions,
    /// `GET /healthz`.
    Health,
    /// `GET /metrics`.
    Metrics,
    /// Anything else (404s).
    Other,
}

impl Endpoint {
    const ALL: [Endpoint; 5] = [
        Endpoint::Reason,
        Endpoint::Completions,
        Endpoint::Health,
        Endpoint::Metrics,
        Endpoint::Other,
    ];

    /// The label value.
    pub fn label(self) -> &'static str {
        match self {
            Endpoint::Reason => "reason",
            Endpoint::Completions => "completions",
            Endpoint::Health => "healthz",
            Endpoint::Metrics => "metrics",
            Endpoint::Other => "other",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Why a request failed; each kind has its own error counter and HTTP status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
}

impl ErrorKind {
    const ALL: [ErrorKind; 9] = [
        ErrorKind::BadRequest,
        ErrorKind::NotFound,
        ErrorKind::PayloadTooLarge,
        ErrorKind::QueueFull,
        ErrorKind::NotReady,
        ErrorKind::ShuttingDown,
        ErrorKind::Timeout,
        ErrorKind::BodyTimeout,
        ErrorKind::Internal,
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
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// A cumulative histogram with fixed bucket bounds.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    /// Per bucket (not cumulative), plus one for +Inf.
    counts: Vec<AtomicU64>,
    /// Sum in nanoseconds (values are durations).
    sum_nanos: AtomicU64,
}

impl Histogram {
    /// An empty histogram over `bounds` (ascending, seconds).
    pub fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_nanos: AtomicU64::new(0),
        }
    }

    /// Records one observation in seconds (negative or NaN values count as 0).
    pub fn observe(&self, seconds: f64) {
        let s = if seconds.is_finite() && seconds > 0.0 {
            seconds
        } else {
            0.0
        };
        let i = self
            .bounds
            .iter()
            .position(|&b| s <= b)
            .unwrap_or(self.bounds.len());
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum_nanos
            .fetch_add((s * 1e9).round() as u64, Ordering::Relaxed);
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.counts.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let mut cumulative = 0u64;
        let sep = if labels.is_empty() { "" } else { "," };
        for (i, b) in self.bounds.iter().enumerate() {
            cumulative += self.counts[i].load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{b}\"}} {cumulative}");
        }
        cumulative += self.counts[self.bounds.len()].load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {cumulative}"
        );
        let sum = self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(out, "{name}_sum{braces} {sum}");
        let _ = writeln!(out, "{name}_count{braces} {cumulative}");
    }
}

/// HTTP status classes counted per endpoint.
const STATUSES: [u16; 10] = [200, 400, 404, 405, 408, 413, 500, 503, 504, 0];

/// Every metric of one server.
#[derive(Debug)]
pub struct Metrics {
    /// `[endpoint][status slot]` request counts (the last slot: any other status).
    requests: Vec<[AtomicU64; STATUSES.len()]>,
    errors: [AtomicU64; ErrorKind::ALL.len()],
    request_seconds: Vec<Histogram>,
    /// Time of one reasoning step (prefill + decode).
    pub step_seconds: Histogram,
    /// Time a job waited in the queue.
    pub queue_wait_seconds: Histogram,
    queue_depth: AtomicU64,
    busy_workers: AtomicU64,
    generated_tokens: AtomicU64,
    generation_nanos: AtomicU64,
    /// Tokens per second of the last finished job, as f64 bits.
    last_tokens_per_second: AtomicU64,
    ready: AtomicU64,
    workers: AtomicU64,
    queue_capacity: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            requests: Endpoint::ALL
                .iter()
                .map(|_| std::array::from_fn(|_| AtomicU64::new(0)))
                .collect(),
            errors: std::array::from_fn(|_| AtomicU64::new(0)),
            request_seconds: Endpoint::ALL
                .iter()
                .map(|_| Histogram::new(&REQUEST_BUCKETS))
                .collect(),
            step_seconds: Histogram::new(&STEP_BUCKETS),
            queue_wait_seconds: Histogram::new(&STEP_BUCKETS),
            queue_depth: AtomicU64::new(0),
            busy_workers: AtomicU64::new(0),
            generated_tokens: AtomicU64::new(0),
            generation_nanos: AtomicU64::new(0),
            last_tokens_per_second: AtomicU64::new(0f64.to_bits()),
            ready: AtomicU64::new(0),
            workers: AtomicU64::new(0),
            queue_capacity: AtomicU64::new(0),
        }
    }
}

impl Metrics {
    /// Counts a finished request and its latency.
    pub fn record_request(&self, endpoint: Endpoint, status: u16, seconds: f64) {
        let slot = STATUSES
            .iter()
            .position(|&s| s == status)
            .unwrap_or(STATUSES.len() - 1);
        self.requests[endpoint.index()][slot].fetch_add(1, Ordering::Relaxed);
        self.request_seconds[endpoint.index()].observe(seconds);
    }

    /// Counts an error of `kind`.
    pub fn record_error(&self, kind: ErrorKind) {
        self.errors[kind.index()].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts tokens generated by one job in `seconds` of model time.
    pub fn record_tokens(&self, tokens: usize, seconds: f64) {
        self.generated_tokens
            .fetch_add(tokens as u64, Ordering::Relaxed);
        self.generation_nanos
            .fetch_add((seconds.max(0.0) * 1e9) as u64, Ordering::Relaxed);
        if seconds > 0.0 {
            self.last_tokens_per_second
                .store((tokens as f64 / seconds).to_bits(), Ordering::Relaxed);
        }
    }

    /// Requests of `endpoint` answered with `status` so far.
    pub fn requests(&self, endpoint: Endpoint, status: u16) -> u64 {
        STATUSES
            .iter()
            .position(|&s| s == status)
            .map(|slot| self.requests[endpoint.index()][slot].load(Ordering::Relaxed))
            .unwrap_or(0)
    }

    /// Errors of `kind` so far.
    pub fn errors(&self, kind: ErrorKind) -> u64 {
        self.errors[kind.index()].load(Ordering::Relaxed)
    }

    /// Jobs waiting in the queue.
    pub fn queue_depth(&self) -> u64 {
        self.queue_depth.load(Ordering::Relaxed)
    }

    /// Workers running a job.
    pub fn busy_workers(&self) -> u64 {
        self.busy_workers.load(Ordering::Relaxed)
    }

    pub(crate) fn queue_add(&self, delta: i64) {
        add_signed(&self.queue_depth, delta);
    }

    pub(crate) fn busy_add(&self, delta: i64) {
        add_signed(&self.busy_workers, delta);
    }

    pub(crate) fn set_ready(&self, ready: bool) {
        self.ready.store(u64::from(ready), Ordering::Relaxed);
    }

    pub(crate) fn set_pool(&self, workers: usize, queue_capacity: usize) {
        self.workers.store(workers as u64, Ordering::Relaxed);
        self.queue_capacity
            .store(queue_capacity as u64, Ordering::Relaxed);
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(8192);
        out.push_str("# HELP steper_requests_total HTTP requests by endpoint and status code.\n");
        out.push_str("# TYPE steper_requests_total counter\n");
        for e in Endpoint::ALL {
            for (slot, status) in STATUSES.iter().enumerate() {
                let n = self.requests[e.index()][slot].load(Ordering::Relaxed);
                let code = if *status == 0 {
                    "other".to_string()
                } else {
                    status.to_string()
                };
                let _ = writeln!(
                    out,
                    "steper_requests_total{{endpoint=\"{}\",code=\"{code}\"}} {n}",
                    e.label()
                );
            }
        }
        out.push_str("# HELP steper_errors_total Failed requests by kind.\n");
        out.push_str("# TYPE steper_errors_total counter\n");
        for k in ErrorKind::ALL {
            let _ = writeln!(
                out,
                "steper_errors_total{{kind=\"{}\"}} {}",
                k.label(),
                self.errors[k.index()].load(Ordering::Relaxed)
            );
        }
        out.push_str(
            "# HELP steper_request_duration_seconds Request latency (arrival to last byte queued).\n",
        );
        out.push_str("# TYPE steper_request_duration_seconds histogram\n");
        for e in Endpoint::ALL {
            self.request_seconds[e.index()].render(
                &mut out,
                "steper_request_duration_seconds",
                &format!("endpoint=\"{}\"", e.label()),
            );
        }
        out.push_str("# HELP steper_step_duration_seconds Model time of one reasoning step.\n");
        out.push_str("# TYPE steper_step_duration_seconds histogram\n");
        self.step_seconds
            .render(&mut out, "steper_step_duration_seconds", "");
        out.push_str("# HELP steper_queue_wait_seconds Time a job waited for a worker.\n");
        out.push_str("# TYPE steper_queue_wait_seconds histogram\n");
        self.queue_wait_seconds
            .render(&mut out, "steper_queue_wait_seconds", "");
        let gauges: [(&str, &str, f64); 5] = [
            (
                "steper_queue_depth",
                "Jobs waiting for a worker.",
                self.queue_depth() as f64,
            ),
            (
                "steper_queue_capacity",
                "Jobs the queue holds before 503.",
                self.queue_capacity.load(Ordering::Relaxed) as f64,
            ),
            (
                "steper_workers",
                "Model worker threads.",
                self.workers.load(Ordering::Relaxed) as f64,
            ),
            (
                "steper_workers_busy",
                "Workers running a job.",
                self.busy_workers() as f64,
            ),
            (
                "steper_ready",
                "1 once the model and index are loaded.",
                self.ready.load(Ordering::Relaxed) as f64,
            ),
        ];
        for (name, help, v) in gauges {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        }
        let tokens = self.generated_tokens.load(Ordering::Relaxed);
        let secs = self.generation_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        let _ = writeln!(
            out,
            "# HELP steper_generated_tokens_total Tokens generated by the model.\n\
             # TYPE steper_generated_tokens_total counter\nsteper_generated_tokens_total {tokens}"
        );
        let _ = writeln!(
            out,
            "# HELP steper_generation_seconds_total Model time spent generating (prefill + decode).\n\
             # TYPE steper_generation_seconds_total counter\nsteper_generation_seconds_total {secs}"
        );
        let last = f64::from_bits(self.last_tokens_per_second.load(Ordering::Relaxed));
        let _ = writeln!(
            out,
            "# HELP steper_tokens_per_second Generated tokens per second of model time, last job.\n\
             # TYPE steper_tokens_per_second gauge\nsteper_tokens_per_second {last}"
        );
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

/// Reads one sample (`name{labels} value` or `name value`) from a Prometheus text exposition.
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (key, value) = l.rsplit_once(' ')?;
        (key == series).then(|| value.parse().ok())?
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_and_end_at_the_count() {
        let h = Histogram::new(&STEP_BUCKETS);
        for s in [0.0005, 0.003, 0.003, 20.0, f64::NAN] {
            h.observe(s);
        }
        let mut out = String::new();
        h.render(&mut out, "x", "");
        assert_eq!(sample(&out, "x_bucket{le=\"0.001\"}"), Some(2.0));
        assert_eq!(sample(&out, "x_bucket{le=\"0.005\"}"), Some(4.0));
        assert_eq!(sample(&out, "x_bucket{le=\"10\"}"), Some(4.0));
        assert_eq!(sample(&out, "x_bucket{le=\"+Inf\"}"), Some(5.0));
        assert_eq!(sample(&out, "x_count"), Some(5.0));
        assert_eq!(h.count(), 5);
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
        let text = m.render();
        for family in [
            "steper_requests_total",
            "steper_errors_total",
            "steper_request_duration_seconds",
            "steper_step_duration_seconds",
            "steper_queue_depth",
            "steper_tokens_per_second",
        ] {
            assert!(text.contains(&format!("# TYPE {family} ")), "{family}");
        }
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
