//! The load test: N concurrent keep-alive clients send requests to a server for at most T
//! seconds or a request budget, and the latencies, status codes, throughput, latency drift
//! (first vs last quarter of the run) and the server's peak RSS are reported.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::client::Client;
use crate::{Error, Result};

/// Which route the load test calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LoadEndpoint {
    /// `POST /v1/reason` (non-streaming).
    Reason,
    /// `POST /v1/completions` (greedy, `max_tokens` tokens).
    Completions,
}

/// Settings of one load level.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// `host:port` of the server.
    pub addr: String,
    /// The route.
    pub endpoint: LoadEndpoint,
    /// Concurrent clients.
    pub concurrency: usize,
    /// Stop sending after this long.
    pub duration: Duration,
    /// Stop sending after this many requests (all clients together).
    pub max_requests: usize,
    /// Questions (reason) or prompts (completions), used round-robin.
    pub inputs: Vec<String>,
    /// `max_tokens` of completion requests.
    pub max_tokens: usize,
    /// Client-side timeout of one request.
    pub request_timeout: Duration,
    /// The server's process id for its peak RSS (`None`: this process, for an in-process server).
    pub server_pid: Option<u32>,
    /// Sent as `Authorization: Bearer <key>` when the server requires one.
    pub api_key: Option<String>,
}

/// What one load level measured.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LoadReport {
    /// The route.
    pub endpoint: LoadEndpoint,
    /// Concurrent clients.
    pub concurrency: usize,
    /// Requests sent (answered or not).
    pub requests: usize,
    /// Answered 200.
    pub ok: usize,
    /// Count per HTTP status.
    pub statuses: BTreeMap<u16, usize>,
    /// Requests that got no HTTP answer (connection errors, client timeouts).
    pub transport_errors: usize,
    /// 5xx other than 503 (the deliberate queue-full answer).
    pub unexpected_5xx: usize,
    /// Wall time of the level, seconds.
    pub seconds: f64,
    /// 200s per second.
    pub requests_per_sec: f64,
    /// Latency percentiles of the 200s, milliseconds.
    pub p50_ms: f64,
    /// 95th percentile.
    pub p95_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// Mean.
    pub mean_ms: f64,
    /// Mean latency of the first quarter of the 200s (by start time).
    pub first_quarter_ms: f64,
    /// Mean latency of the last quarter.
    pub last_quarter_ms: f64,
    /// `last_quarter_ms / first_quarter_ms` (1 = no drift; `null` with fewer than 8 answers).
    pub drift_ratio: Option<f64>,
    /// Tokens generated over the level (reason: `usage.new_tokens`; completions:
    /// `usage.completion_tokens`).
    pub tokens: usize,
    /// Tokens per second of wall time, per client.
    pub tokens_per_sec_per_client: f64,
    /// Peak RSS of the server process after the level, bytes (`VmHWM`).
    pub peak_rss_bytes: Option<u64>,
}

struct Sample {
    start: f64,
    latency_ms: f64,
    status: Option<u16>,
    tokens: usize,
}

/// Nearest-rank percentile of sorted values (`q` in 0..=1); 0 when empty.
pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
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

/// Runs one load level.
pub fn run_load(opts: &LoadOptions) -> Result<LoadReport> {
    if opts.concurrency == 0 || opts.inputs.is_empty() || opts.max_requests == 0 {
        let (option, got) = if opts.concurrency == 0 {
            ("concurrency", "0".to_string())
        } else if opts.inputs.is_empty() {
            ("inputs", "none".to_string())
        } else {
            ("max_requests", "0".to_string())
        };
        return Err(Error::InvalidOption {
            option,
            expected: "at least 1",
            got,
        });
    }
    let next = Arc::new(AtomicUsize::new(0));
    let samples = Arc::new(Mutex::new(Vec::<Sample>::new()));
    let t0 = Instant::now();
    let stop_at = t0 + opts.duration;
    let mut threads = Vec::new();
    for _ in 0..opts.concurrency {
        let next = Arc::clone(&next);
        let samples = Arc::clone(&samples);
        let opts = opts.clone();
        threads.push(std::thread::spawn(move || -> Result<()> {
            let mut client = Client::new(&opts.addr, opts.request_timeout)?;
            if let Some(key) = &opts.api_key {
                client = client.with_bearer(key.clone());
            }
            let mut local = Vec::new();
            loop {
                if Instant::now() >= stop_at {
                    break;
                }
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= opts.max_requests {
                    break;
                }
                let input = &opts.inputs[i % opts.inputs.len()];
                let (path, body) = match opts.endpoint {
                    LoadEndpoint::Reason => (
                        "/v1/reason",
                        serde_json::json!({"question": input, "include_trace": false}),
                    ),
                    LoadEndpoint::Completions => (
                        "/v1/completions",
                        serde_json::json!({"prompt": input, "max_tokens": opts.max_tokens, "temperature": 0}),
                    ),
                };
                let start = Instant::now();
                let resp = client.post_json(path, &body);
                let latency_ms = start.elapsed().as_secs_f64() * 1e3;
                let (status, tokens) = match &resp {
                    Ok(r) => {
                        let tokens = if r.status == 200 {
                            let v = r.json().unwrap_or(serde_json::Value::Null);
                            let t = match opts.endpoint {
                                LoadEndpoint::Reason => &v["usage"]["new_tokens"],
                                LoadEndpoint::Completions => &v["usage"]["completion_tokens"],
                            };
                            t.as_u64().unwrap_or(0) as usize
                        } else {
                            0
                        };
                        (Some(r.status), tokens)
                    }
                    Err(_) => (None, 0),
                };
                if status == Some(503) {
                    // Honour Retry-After lightly: the test measures admission, not a busy loop.
                    std::thread::sleep(Duration::from_millis(20));
                }
                local.push(Sample {
                    start: (start - t0).as_secs_f64(),
                    latency_ms,
                    status,
                    tokens,
                });
            }
            samples
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .extend(local);
            Ok(())
        }));
    }
    for t in threads {
        t.join().map_err(|_| Error::ClientPanicked)??;
    }
    let seconds = t0.elapsed().as_secs_f64();
    let samples = std::mem::take(&mut *samples.lock().unwrap_or_else(|p| p.into_inner()));
    let mut statuses = BTreeMap::new();
    let mut transport_errors = 0;
    for s in &samples {
        match s.status {
            Some(c) => *statuses.entry(c).or_insert(0) += 1,
            None => transport_errors += 1,
        }
    }
    let unexpected_5xx = samples
        .iter()
        .filter(|s| matches!(s.status, Some(c) if c >= 500 && c != 503))
        .count();
    let mut ok: Vec<&Sample> = samples.iter().filter(|s| s.status == Some(200)).collect();
    ok.sort_by(|a, b| a.start.total_cmp(&b.start));
    let mut lat: Vec<f64> = ok.iter().map(|s| s.latency_ms).collect();
    let mean = |v: &[f64]| {
        if v.is_empty() {
            0.0
        } else {
            v.iter().sum::<f64>() / v.len() as f64
        }
    };
    let q = ok.len() / 4;
    let first = mean(&lat[..q]);
    let last = mean(&lat[lat.len() - q..]);
    let drift_ratio = (ok.len() >= 8 && first > 0.0).then(|| last / first);
    let mean_ms = mean(&lat);
    lat.sort_by(f64::total_cmp);
    let tokens: usize = ok.iter().map(|s| s.tokens).sum();
    Ok(LoadReport {
        endpoint: opts.endpoint,
        concurrency: opts.concurrency,
        requests: samples.len(),
        ok: ok.len(),
        statuses,
        transport_errors,
        unexpected_5xx,
        seconds,
        requests_per_sec: ok.len() as f64 / seconds,
        p50_ms: percentile(&lat, 0.50),
        p95_ms: percentile(&lat, 0.95),
        p99_ms: percentile(&lat, 0.99),
        mean_ms,
        first_quarter_ms: first,
        last_quarter_ms: last,
        drift_ratio,
        tokens,
        tokens_per_sec_per_client: tokens as f64 / seconds / opts.concurrency as f64,
        peak_rss_bytes: peak_rss_bytes(opts.server_pid),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.50), 50.0);
        assert_eq!(percentile(&v, 0.95), 95.0);
        assert_eq!(percentile(&v, 0.99), 99.0);
        assert_eq!(percentile(&v, 0.0), 1.0);
        assert_eq!(percentile(&[7.0], 0.99), 7.0);
        assert_eq!(percentile(&[], 0.5), 0.0);
    }

    #[test]
    fn peak_rss_of_this_process_is_read() {
        if std::path::Path::new("/proc/self/status").exists() {
            assert!(peak_rss_bytes(None).is_some_and(|rss| rss > 0));
        }
        assert_eq!(peak_rss_bytes(Some(u32::MAX)), None);
    }

    #[test]
    fn empty_levels_name_the_option() {
        let opts = LoadOptions {
            addr: "127.0.0.1:1".into(),
            endpoint: LoadEndpoint::Reason,
            concurrency: 0,
            duration: Duration::from_secs(1),
            max_requests: 1,
            inputs: vec!["q".into()],
            max_tokens: 1,
            request_timeout: Duration::from_secs(1),
            server_pid: None,
            api_key: None,
        };
        assert!(matches!(
            run_load(&opts),
            Err(Error::InvalidOption {
                option: "concurrency",
                ..
            })
        ));
    }
}
