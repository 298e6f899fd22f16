//! The soak's report: outcomes by kind, latency per minute, the resource series and the verdict.

use std::collections::BTreeMap;

use serde::Serialize;

use super::{
    acceptable, Outcome, Record, SoakKind, SoakOptions, FD_SLACK_PER_CLIENT, MAX_EXAMPLES,
    RSS_GROWTH_TOLERANCE, WINDOW,
};
use crate::load::percentile;

/// One sample of the server.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ResourceSample {
    /// Seconds since the start.
    pub t_s: f64,
    /// Resident memory (`VmRSS`), bytes.
    pub rss_bytes: Option<u64>,
    /// Entries of `/proc/PID/fd`.
    pub fds: Option<usize>,
    /// Status of `GET /healthz` (`None`: no answer).
    pub healthz: Option<u16>,
}

/// Latency of the 200s of one valid kind within one minute.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MinuteStats {
    /// Minute of the run (0-based, by request start).
    pub minute: usize,
    /// `reason` or `completion`.
    pub kind: &'static str,
    /// Requests answered 200.
    pub ok: usize,
    /// Refused 503.
    pub refused_503: usize,
    /// Past the deadline, 504.
    pub timed_out_504: usize,
    /// Median latency of the 200s, milliseconds.
    pub p50_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
}

/// A series' value at the start, its floors early and late in the load, at the end, and its
/// maximum. Floors (the smallest sample of a window) are compared because single samples under
/// load swing with whatever requests are running at that moment; a leak raises the floor.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Milestones<T> {
    /// First sample.
    pub start: Option<T>,
    /// The smallest sample of the baseline window (see [`SoakOptions::warmup`]).
    pub baseline: Option<T>,
    /// The smallest sample of the last window of load (as long as the baseline window).
    pub last_floor: Option<T>,
    /// Last sample (after the clients stopped and their connections closed).
    pub end: Option<T>,
    /// Largest sample.
    pub max: Option<T>,
}

/// The run's conclusion.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Verdict {
    /// No violation (every answer was one its kind may get).
    pub accounting_ok: bool,
    /// The last health probe answered 200 (and the process exists).
    pub server_alive: bool,
    /// RSS at the end and the last window's floor are both ≤ baseline × (1 +
    /// [`RSS_GROWTH_TOLERANCE`]) (`None`: not measured).
    pub rss_flat: Option<bool>,
    /// Descriptors at the end and the last window's floor are both ≤ baseline +
    /// [`FD_SLACK_PER_CLIENT`] × clients (`None`: not measured).
    pub fd_flat: Option<bool>,
    /// The tolerance used for RSS.
    pub rss_growth_tolerance: f64,
    /// The descriptor slack used.
    pub fd_slack: usize,
    /// All of the above hold.
    pub pass: bool,
}

/// What a soak run measured.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SoakReport {
    /// Concurrent clients.
    pub clients: usize,
    /// Seconds asked for.
    pub requested_seconds: f64,
    /// Seconds the run took (clients' last requests included).
    pub seconds: f64,
    /// Requests sent.
    pub requests: usize,
    /// Count per kind and outcome ([`Outcome::label`]).
    pub by_kind: BTreeMap<&'static str, BTreeMap<String, usize>>,
    /// Requests whose answer their kind may not get.
    pub violations: usize,
    /// The first violations: kind, start time, outcome.
    pub violation_examples: Vec<String>,
    /// Latency of valid requests per minute.
    pub minutes: Vec<MinuteStats>,
    /// The samples, in order.
    pub samples: Vec<ResourceSample>,
    /// The baseline window, seconds from the start: `[from, to)`.
    pub baseline_window_s: (f64, f64),
    /// The last window of load, seconds from the start: `[from, to)`.
    pub last_window_s: (f64, f64),
    /// Resident memory, bytes.
    pub rss_bytes: Milestones<u64>,
    /// Open descriptors.
    pub fds: Milestones<usize>,
    /// The conclusion.
    pub verdict: Verdict,
}

pub(super) fn summarize(
    opts: &SoakOptions,
    seconds: f64,
    records: &[Record],
    samples: Vec<ResourceSample>,
) -> SoakReport {
    let mut by_kind: BTreeMap<&'static str, BTreeMap<String, usize>> = BTreeMap::new();
    for k in SoakKind::ALL {
        by_kind.insert(k.label(), BTreeMap::new());
    }
    let mut violations = 0;
    let mut violation_examples = Vec::new();
    for r in records {
        *by_kind
            .entry(r.kind.label())
            .or_default()
            .entry(r.outcome.label())
            .or_insert(0) += 1;
        if !acceptable(r.kind, &r.outcome) {
            violations += 1;
            if violation_examples.len() < MAX_EXAMPLES {
                violation_examples.push(format!(
                    "{} at {:.1} s: {:?}",
                    r.kind.label(),
                    r.start,
                    r.outcome
                ));
            }
        }
    }
    let minutes = per_minute(records);

    // The baseline window [warm-up, warm-up + w) and the last w of the load; on a short run
    // the warm-up and w are a quarter of it each.
    let duration = opts.duration.as_secs_f64();
    let warm = opts.warmup.as_secs_f64().min(duration / 4.0);
    let w = WINDOW.as_secs_f64().min(duration / 4.0);
    let baseline_window = (warm, warm + w);
    let last_window = ((duration - w).max(warm + w), duration);
    let within = |(from, to): (f64, f64)| {
        let v: Vec<&ResourceSample> = samples
            .iter()
            .filter(|s| s.t_s >= from && s.t_s < to)
            .collect();
        v
    };
    let (base, late) = (within(baseline_window), within(last_window));
    let floor_rss = |v: &[&ResourceSample]| v.iter().filter_map(|s| s.rss_bytes).min();
    let floor_fds = |v: &[&ResourceSample]| v.iter().filter_map(|s| s.fds).min();
    let first = samples.first();
    let last = samples.last();
    let rss = Milestones {
        start: first.and_then(|s| s.rss_bytes),
        baseline: floor_rss(&base),
        last_floor: floor_rss(&late),
        end: last.and_then(|s| s.rss_bytes),
        max: samples.iter().filter_map(|s| s.rss_bytes).max(),
    };
    let fds = Milestones {
        start: first.and_then(|s| s.fds),
        baseline: floor_fds(&base),
        last_floor: floor_fds(&late),
        end: last.and_then(|s| s.fds),
        max: samples.iter().filter_map(|s| s.fds).max(),
    };
    let fd_slack = FD_SLACK_PER_CLIENT * opts.clients;
    let rss_ok = |b: u64, v: Option<u64>| {
        v.is_none_or(|v| v as f64 <= b as f64 * (1.0 + RSS_GROWTH_TOLERANCE))
    };
    let rss_flat = match (rss.baseline, rss.end) {
        (Some(b), Some(e)) => Some(rss_ok(b, Some(e)) && rss_ok(b, rss.last_floor)),
        _ => None,
    };
    let fd_ok = |b: usize, v: Option<usize>| v.is_none_or(|v| v <= b + fd_slack);
    let fd_flat = match (fds.baseline, fds.end) {
        (Some(b), Some(e)) => Some(fd_ok(b, Some(e)) && fd_ok(b, fds.last_floor)),
        _ => None,
    };
    let process_exists = opts
        .server_pid
        .is_none_or(|p| std::path::Path::new(&format!("/proc/{p}")).exists());
    let server_alive = process_exists && last.is_some_and(|s| s.healthz == Some(200));
    let accounting_ok = violations == 0;
    let verdict = Verdict {
        accounting_ok,
        server_alive,
        rss_flat,
        fd_flat,
        rss_growth_tolerance: RSS_GROWTH_TOLERANCE,
        fd_slack,
        pass: accounting_ok && server_alive && rss_flat == Some(true) && fd_flat == Some(true),
    };
    SoakReport {
        clients: opts.clients,
        requested_seconds: opts.duration.as_secs_f64(),
        seconds,
        requests: records.len(),
        by_kind,
        violations,
        violation_examples,
        minutes,
        baseline_window_s: baseline_window,
        last_window_s: last_window,
        samples,
        rss_bytes: rss,
        fds,
        verdict,
    }
}

fn per_minute(records: &[Record]) -> Vec<MinuteStats> {
    let mut groups: BTreeMap<(usize, SoakKind), Vec<&Record>> = BTreeMap::new();
    for r in records
        .iter()
        .filter(|r| matches!(r.kind, SoakKind::Reason | SoakKind::Completion))
    {
        groups
            .entry(((r.start / 60.0) as usize, r.kind))
            .or_default()
            .push(r);
    }
    groups
        .into_iter()
        .map(|((minute, kind), rs)| {
            let mut lat: Vec<f64> = rs
                .iter()
                .filter(|r| r.outcome == Outcome::Status(200))
                .map(|r| r.latency_ms)
                .collect();
            lat.sort_by(f64::total_cmp);
            let count = |s: u16| {
                rs.iter()
                    .filter(|r| r.outcome == Outcome::Status(s))
                    .count()
            };
            MinuteStats {
                minute,
                kind: kind.label(),
                ok: lat.len(),
                refused_503: count(503),
                timed_out_504: count(504),
                p50_ms: percentile(&lat, 0.50),
                p99_ms: percentile(&lat, 0.99),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::super::tests::opts;
    use super::*;
    use std::time::Duration;

    fn sample(t_s: f64, rss: u64, fds: usize) -> ResourceSample {
        ResourceSample {
            t_s,
            rss_bytes: Some(rss),
            fds: Some(fds),
            healthz: Some(200),
        }
    }

    #[test]
    fn growth_past_the_tolerance_fails_the_verdict() {
        let o = opts();
        let rec = |kind, outcome| Record {
            kind,
            start: 1.0,
            latency_ms: 5.0,
            outcome,
        };
        let records = vec![
            rec(SoakKind::Reason, Outcome::Status(200)),
            rec(SoakKind::Oversized, Outcome::Status(413)),
        ];
        // 100 s: the baseline window is [25, 50), the last one [75, 100); floors are compared.
        let series = |late: (u64, usize), end: (u64, usize)| {
            vec![
                sample(0.0, 100, 10),
                sample(25.0, 1500, 30),
                sample(40.0, 1000, 20),
                sample(80.0, 1900, 40),
                sample(90.0, late.0, late.1),
                sample(102.0, end.0, end.1),
            ]
        };
        let r = summarize(&o, 100.0, &records, series((1050, 22), (1090, 24)));
        assert_eq!(r.baseline_window_s, (25.0, 50.0));
        assert_eq!(r.last_window_s, (75.0, 100.0));
        assert_eq!(r.rss_bytes.baseline, Some(1000));
        assert_eq!(r.rss_bytes.last_floor, Some(1050));
        assert_eq!(r.rss_bytes.max, Some(1900));
        assert_eq!(r.fds.baseline, Some(20));
        assert!(r.verdict.pass, "{:?}", r.verdict);
        assert_eq!(r.by_kind["reason"]["200"], 1);
        assert_eq!(r.minutes.len(), 1);

        // A raised floor under load fails even when the end is back down, and a higher end
        // fails even with a flat floor.
        for (late, end) in [((1200, 20), (1000, 20)), ((1000, 20), (1200, 20))] {
            let r = summarize(&o, 100.0, &records, series(late, end));
            assert_eq!(r.verdict.rss_flat, Some(false), "{late:?} {end:?}");
            assert!(!r.verdict.pass);
        }
        // Slack 4 (2 clients): 25 descriptors over a floor of 20 is a leak.
        for (late, end) in [((1000, 25), (1000, 20)), ((1000, 20), (1000, 25))] {
            let r = summarize(&o, 100.0, &records, series(late, end));
            assert_eq!(r.verdict.fd_flat, Some(false), "{late:?} {end:?}");
        }

        // The warm-up keeps the arena's growth out of the baseline: 10 minutes, floor 500 in
        // the second minute, 1000 from the third on.
        let long = |warmup: u64| SoakOptions {
            duration: Duration::from_secs(600),
            warmup: Duration::from_secs(warmup),
            ..o.clone()
        };
        let series = vec![
            sample(70.0, 500, 20),
            sample(130.0, 1000, 20),
            sample(580.0, 1050, 20),
            sample(602.0, 1050, 20),
        ];
        let r = summarize(&long(120), 600.0, &records, series.clone());
        assert_eq!(r.baseline_window_s, (120.0, 180.0));
        assert_eq!(r.rss_bytes.baseline, Some(1000));
        assert!(r.verdict.pass, "{:?}", r.verdict);
        let r = summarize(&long(60), 600.0, &records, series);
        assert_eq!(r.rss_bytes.baseline, Some(500));
        assert_eq!(r.verdict.rss_flat, Some(false));

        let bad = vec![rec(SoakKind::WrongType, Outcome::Status(500))];
        let r = summarize(&o, 100.0, &bad, vec![sample(0.0, 1, 1), sample(30.0, 1, 1)]);
        assert_eq!(r.violations, 1);
        assert!(!r.verdict.accounting_ok && !r.verdict.pass);
    }
}
