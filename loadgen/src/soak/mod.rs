//! The soak test: N clients for a long time send a mix of valid and hostile requests, every
//! answer is checked against what its kind must get, and the server's resident memory, open
//! file descriptors and health are sampled, to show that nothing accumulates and that the
//! server never dies.
//!
//! | kind | what is sent | accepted answers |
//! |---|---|---|
//! | `reason` | `POST /v1/reason` (keep-alive) | 200, 503, 504 |
//! | `completion` | `POST /v1/completions`, greedy (keep-alive) | 200, 503, 504 |
//! | `stream_disconnect` | a streaming request; the client closes after the first event | 200, 503, 504 |
//! | `slow_sender` | a valid body dribbled in pieces over `slow_body` | 200, 503, 504 |
//! | `oversized` | a body over the limit (announced, or chunked without a length) | 4xx |
//! | `truncated` | `Content-Length` larger than the body, then the client half-closes | 4xx or closed without an answer |
//! | `non_utf8` | a body with bytes that are not UTF-8 | 4xx |
//! | `wrong_type` | JSON with a field of the wrong type (or not an object) | 4xx |
//!
//! Anything else — a 500, a 200 to a bad body, a reset or a timeout on a valid request — is a
//! violation.

use std::net::ToSocketAddrs;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::client::Client;
use crate::{Error, Result};

mod report;
mod requests;

use report::summarize;
pub use report::{Milestones, MinuteStats, ResourceSample, SoakReport, Verdict};
use requests::Requests;

/// Resident memory at the end, and its floor in the last window of load, may exceed the
/// baseline (its floor in the window after the warm-up) by this fraction and still count as
/// flat.
pub const RSS_GROWTH_TOLERANCE: f64 = 0.10;
/// Open descriptors at the end, and their floor in the last window, may exceed the baseline by
/// this many per client and still count as flat: how many connections are open at a sample
/// varies by up to one per client (both of its ends when the server runs in the load
/// generator's process).
pub const FD_SLACK_PER_CLIENT: usize = 2;
/// The default warm-up ([`SoakOptions::warmup`]): the baseline window starts this long after
/// the start. Each ONNX Runtime session's arena grows until it has seen the largest shapes the
/// load sends; with two workers and 16 clients that took two minutes on this project's
/// hour-long runs (the floor rose 732 → 1,051 → 1,179 MiB over minutes 1–3, then held).
pub const DEFAULT_WARMUP: Duration = Duration::from_secs(120);
/// The baseline window and the last window of load each last this long (a quarter of a
/// shorter run each); the last window ends with the load.
pub const WINDOW: Duration = Duration::from_secs(60);
/// How long a valid request waits after a 503 before its client goes on.
const BACKOFF_AFTER_503: Duration = Duration::from_millis(100);
/// Pause between the clients' end and the last sample (connections close).
const SETTLE: Duration = Duration::from_secs(2);
/// Client-side timeout of a request with a bad body, and of the health probe.
const BAD_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Pieces of a slow sender's body.
const SLOW_PIECES: u32 = 6;
/// Violations quoted in the report at most.
const MAX_EXAMPLES: usize = 20;
/// Lines of an event stream read at most while waiting for its first event.
const MAX_STREAM_LINES: usize = 10_000;

/// What one request of the soak is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum SoakKind {
    /// A valid `POST /v1/reason`.
    Reason,
    /// A valid `POST /v1/completions`.
    Completion,
    /// A valid streaming request that the client abandons after the first event.
    StreamDisconnect,
    /// A valid body sent in pieces over seconds.
    SlowSender,
    /// A body over the server's limit.
    Oversized,
    /// A body shorter than its `Content-Length`, then a half-close.
    Truncated,
    /// A body that is not UTF-8.
    NonUtf8,
    /// JSON with a wrong-typed field.
    WrongType,
}

impl SoakKind {
    /// Every kind.
    pub const ALL: [SoakKind; 8] = [
        SoakKind::Reason,
        SoakKind::Completion,
        SoakKind::StreamDisconnect,
        SoakKind::SlowSender,
        SoakKind::Oversized,
        SoakKind::Truncated,
        SoakKind::NonUtf8,
        SoakKind::WrongType,
    ];

    /// The name in the report.
    pub fn label(self) -> &'static str {
        match self {
            SoakKind::Reason => "reason",
            SoakKind::Completion => "completion",
            SoakKind::StreamDisconnect => "stream_disconnect",
            SoakKind::SlowSender => "slow_sender",
            SoakKind::Oversized => "oversized",
            SoakKind::Truncated => "truncated",
            SoakKind::NonUtf8 => "non_utf8",
            SoakKind::WrongType => "wrong_type",
        }
    }

    /// Whether the request is valid (must be answered 200, or refused 503 / 504).
    pub fn is_valid(self) -> bool {
        matches!(
            self,
            SoakKind::Reason
                | SoakKind::Completion
                | SoakKind::StreamDisconnect
                | SoakKind::SlowSender
        )
    }
}

/// The order in which each client cycles through the kinds (each client starts elsewhere).
const SCHEDULE: [SoakKind; 14] = [
    SoakKind::Reason,
    SoakKind::Completion,
    SoakKind::Oversized,
    SoakKind::StreamDisconnect,
    SoakKind::Reason,
    SoakKind::WrongType,
    SoakKind::SlowSender,
    SoakKind::Completion,
    SoakKind::Truncated,
    SoakKind::StreamDisconnect,
    SoakKind::Reason,
    SoakKind::NonUtf8,
    SoakKind::Completion,
    SoakKind::SlowSender,
];

/// How a request ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// An HTTP answer with this status.
    Status(u16),
    /// The server closed the connection without an answer.
    NoAnswer,
    /// The connection was reset (or the write side broke) without an answer.
    Reset,
    /// No answer within the client's timeout.
    Timeout,
    /// Another transport error (its message).
    Io(String),
}

impl Outcome {
    /// The key in the report: the status code, `no_answer`, `reset`, `timeout` or `io_error`.
    pub fn label(&self) -> String {
        match self {
            Outcome::Status(s) => s.to_string(),
            Outcome::NoAnswer => "no_answer".into(),
            Outcome::Reset => "reset".into(),
            Outcome::Timeout => "timeout".into(),
            Outcome::Io(_) => "io_error".into(),
        }
    }

    fn of_error(e: &Error) -> Outcome {
        use std::io::ErrorKind as K;
        match e {
            Error::Io { source, .. } => match source.kind() {
                K::ConnectionReset | K::ConnectionAborted | K::BrokenPipe => Outcome::Reset,
                K::UnexpectedEof => Outcome::NoAnswer,
                K::TimedOut | K::WouldBlock => Outcome::Timeout,
                _ => Outcome::Io(e.to_string()),
            },
            other => Outcome::Io(other.to_string()),
        }
    }
}

/// Whether `outcome` is an answer a request of `kind` may get (see the module's table).
pub fn acceptable(kind: SoakKind, outcome: &Outcome) -> bool {
    match outcome {
        Outcome::Status(s) if kind.is_valid() => matches!(s, 200 | 503 | 504),
        Outcome::Status(s) => (400..500).contains(s),
        Outcome::NoAnswer => kind == SoakKind::Truncated,
        Outcome::Reset | Outcome::Timeout | Outcome::Io(_) => false,
    }
}

/// Settings of a soak run.
#[derive(Debug, Clone)]
pub struct SoakOptions {
    /// `host:port` of the server.
    pub addr: String,
    /// Concurrent clients.
    pub clients: usize,
    /// Clients start no request after this long (requests in flight are awaited).
    pub duration: Duration,
    /// Questions, used round-robin (completions send `Q: {question}\nA:`).
    pub questions: Vec<String>,
    /// `max_tokens` of completion requests.
    pub max_tokens: usize,
    /// `max_steps` of reason requests (`None`: the server's default).
    pub max_steps: Option<usize>,
    /// The server's body limit in bytes: oversized bodies exceed it.
    pub body_limit: usize,
    /// How long a slow sender takes to send its body.
    pub slow_body: Duration,
    /// Interval between samples of the server's memory, descriptors and health.
    pub sample_every: Duration,
    /// Client-side timeout of one valid request.
    pub request_timeout: Duration,
    /// The server's process (`None`: this process, for an in-process server).
    pub server_pid: Option<u32>,
    /// Sent as `Authorization: Bearer <key>` with every request when set.
    pub api_key: Option<String>,
    /// Samples before this are the warm-up: the baseline window starts here (at most a
    /// quarter of the run). Default [`DEFAULT_WARMUP`].
    pub warmup: Duration,
}

/// Resident memory (`VmRSS`, bytes) of `pid` (`None`: this process).
pub fn rss_bytes(pid: Option<u32>) -> Option<u64> {
    let text = std::fs::read_to_string(proc_path(pid, "status")).ok()?;
    let line = text.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Open file descriptors of `pid` (`None`: this process), counted in `/proc/PID/fd`.
pub fn open_fds(pid: Option<u32>) -> Option<usize> {
    Some(std::fs::read_dir(proc_path(pid, "fd")).ok()?.count())
}

fn proc_path(pid: Option<u32>, what: &str) -> String {
    match pid {
        Some(p) => format!("/proc/{p}/{what}"),
        None => format!("/proc/self/{what}"),
    }
}

pub(crate) struct Record {
    pub(crate) kind: SoakKind,
    pub(crate) start: f64,
    pub(crate) latency_ms: f64,
    pub(crate) outcome: Outcome,
}

fn check(opts: &SoakOptions) -> Result<()> {
    let bad = |option: &'static str, got: String| {
        Err(Error::InvalidOption {
            option,
            expected: "at least 1",
            got,
        })
    };
    if opts.clients == 0 {
        return bad("clients", "0".into());
    }
    if opts.questions.is_empty() {
        return bad("questions", "none".into());
    }
    if opts.body_limit == 0 {
        return bad("body_limit", "0".into());
    }
    if opts.duration.is_zero() || opts.sample_every.is_zero() {
        return Err(Error::InvalidOption {
            option: if opts.duration.is_zero() {
                "duration"
            } else {
                "sample_every"
            },
            expected: "a positive duration",
            got: "0 s".into(),
        });
    }
    Ok(())
}

fn probe(addr: &str, api_key: Option<&str>) -> Option<u16> {
    let mut c = Client::new(addr, BAD_REQUEST_TIMEOUT).ok()?;
    if let Some(k) = api_key {
        c = c.with_bearer(k);
    }
    c.get("/healthz").ok().map(|r| r.status)
}

fn take_sample(opts: &SoakOptions, t0: Instant) -> ResourceSample {
    ResourceSample {
        t_s: t0.elapsed().as_secs_f64(),
        rss_bytes: rss_bytes(opts.server_pid),
        fds: open_fds(opts.server_pid),
        healthz: probe(&opts.addr, opts.api_key.as_deref()),
    }
}

/// Runs the soak and reports it; `Err` only for options it cannot run with or a client
/// thread that panicked (a misbehaving server is in the report's verdict).
pub fn run_soak(opts: &SoakOptions) -> Result<SoakReport> {
    check(opts)?;
    let addr = opts
        .addr
        .to_socket_addrs()
        .map_err(|e| Error::Address {
            addr: opts.addr.clone(),
            message: e.to_string(),
        })?
        .next()
        .ok_or_else(|| Error::Address {
            addr: opts.addr.clone(),
            message: "resolves to nothing".into(),
        })?;
    let requests = Arc::new(Requests {
        addr,
        opts: opts.clone(),
    });
    let t0 = Instant::now();
    let stop_at = t0 + opts.duration;
    let records = Arc::new(Mutex::new(Vec::<Record>::new()));
    let samples = Arc::new(Mutex::new(vec![take_sample(opts, t0)]));
    let stop = Arc::new(AtomicBool::new(false));

    let sampler = {
        let (samples, stop, opts) = (Arc::clone(&samples), Arc::clone(&stop), opts.clone());
        std::thread::spawn(move || {
            let mut next = t0 + opts.sample_every;
            while !stop.load(Ordering::Relaxed) {
                if Instant::now() >= next {
                    let s = take_sample(&opts, t0);
                    samples.lock().unwrap_or_else(|p| p.into_inner()).push(s);
                    next += opts.sample_every;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };

    let mut threads = Vec::new();
    for c in 0..opts.clients {
        let (requests, records) = (Arc::clone(&requests), Arc::clone(&records));
        threads.push(std::thread::spawn(move || -> Result<()> {
            let r = &*requests;
            let mut client = Client::new(&r.opts.addr, r.opts.request_timeout)?;
            if let Some(k) = &r.opts.api_key {
                client = client.with_bearer(k.clone());
            }
            let mut local = Vec::new();
            let mut i = 0usize;
            while Instant::now() < stop_at {
                let kind = SCHEDULE[(c * 5 + i) % SCHEDULE.len()];
                let n = c * 100_003 + i;
                i += 1;
                let start = Instant::now();
                let outcome = match kind {
                    SoakKind::Reason | SoakKind::Completion => r.keep_alive(&mut client, kind, n),
                    SoakKind::StreamDisconnect => r.stream_then_drop(n),
                    SoakKind::SlowSender => r.slow_sender(n),
                    SoakKind::Oversized => r.oversized(n),
                    SoakKind::Truncated => r.truncated(n),
                    SoakKind::NonUtf8 => r.non_utf8(n),
                    SoakKind::WrongType => r.wrong_type(n),
                };
                let refused = outcome == Outcome::Status(503);
                local.push(Record {
                    kind,
                    start: (start - t0).as_secs_f64(),
                    latency_ms: start.elapsed().as_secs_f64() * 1e3,
                    outcome,
                });
                if refused {
                    std::thread::sleep(BACKOFF_AFTER_503);
                }
            }
            records
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .extend(local);
            Ok(())
        }));
    }
    let mut joined = Ok(());
    for t in threads {
        let r = t.join().map_err(|_| Error::ClientPanicked).and_then(|r| r);
        if joined.is_ok() {
            joined = r;
        }
    }
    let seconds = t0.elapsed().as_secs_f64();
    std::thread::sleep(SETTLE);
    stop.store(true, Ordering::Relaxed);
    sampler.join().map_err(|_| Error::ClientPanicked)?;
    joined?;
    let mut samples = std::mem::take(&mut *samples.lock().unwrap_or_else(|p| p.into_inner()));
    samples.push(take_sample(opts, t0));
    let records = std::mem::take(&mut *records.lock().unwrap_or_else(|p| p.into_inner()));
    Ok(summarize(opts, seconds, &records, samples))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_kinds_accept_200_503_504_only() {
        for k in SoakKind::ALL.into_iter().filter(|k| k.is_valid()) {
            for s in [200, 503, 504] {
                assert!(acceptable(k, &Outcome::Status(s)), "{k:?} {s}");
            }
            for o in [
                Outcome::Status(400),
                Outcome::Status(401),
                Outcome::Status(500),
                Outcome::Status(408),
                Outcome::NoAnswer,
                Outcome::Reset,
                Outcome::Timeout,
                Outcome::Io("x".into()),
            ] {
                assert!(!acceptable(k, &o), "{k:?} {o:?}");
            }
        }
    }

    #[test]
    fn bad_kinds_accept_4xx_only_and_truncated_also_a_close() {
        for k in SoakKind::ALL.into_iter().filter(|k| !k.is_valid()) {
            for s in [400, 408, 413, 422] {
                assert!(acceptable(k, &Outcome::Status(s)), "{k:?} {s}");
            }
            for s in [200, 500, 503, 504] {
                assert!(!acceptable(k, &Outcome::Status(s)), "{k:?} {s}");
            }
            assert!(!acceptable(k, &Outcome::Reset), "{k:?}");
            assert_eq!(
                acceptable(k, &Outcome::NoAnswer),
                k == SoakKind::Truncated,
                "{k:?}"
            );
        }
    }

    #[test]
    fn the_schedule_has_every_kind() {
        for k in SoakKind::ALL {
            assert!(SCHEDULE.contains(&k), "{k:?}");
        }
    }

    pub(super) fn opts() -> SoakOptions {
        SoakOptions {
            addr: "127.0.0.1:1".into(),
            clients: 2,
            duration: Duration::from_secs(100),
            questions: vec!["q".into()],
            max_tokens: 4,
            max_steps: None,
            body_limit: 1024,
            slow_body: Duration::from_secs(1),
            sample_every: Duration::from_secs(1),
            request_timeout: Duration::from_secs(1),
            server_pid: None,
            api_key: None,
            warmup: DEFAULT_WARMUP,
        }
    }

    #[test]
    fn options_that_cannot_run_name_the_field() {
        let mut o = opts();
        o.clients = 0;
        assert!(matches!(
            run_soak(&o),
            Err(Error::InvalidOption {
                option: "clients",
                ..
            })
        ));
        let mut o = opts();
        o.sample_every = Duration::ZERO;
        assert!(matches!(
            run_soak(&o),
            Err(Error::InvalidOption {
                option: "sample_every",
                ..
            })
        ));
    }
}
