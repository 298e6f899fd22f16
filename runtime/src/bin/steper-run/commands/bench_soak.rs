//! `steper-run bench-serve --soak SECONDS`: the soak test of `steper_loadgen::soak` against
//! the server of `bench-serve`, its report printed, and an error when its verdict fails.

use std::time::Duration;

use steper_loadgen::soak::{run_soak, SoakOptions, SoakReport};

use super::bench_serve::Args;

const MIB: f64 = 1024.0 * 1024.0;

/// Runs the soak against `addr` and prints the report (JSON with `--json`).
pub fn run(
    a: &Args,
    seconds: f64,
    addr: &str,
    server_pid: Option<u32>,
    questions: Vec<String>,
    api_key: Option<String>,
) -> anyhow::Result<()> {
    anyhow::ensure!(
        seconds > 0.0 && seconds.is_finite(),
        "--soak: expected a positive number of seconds, got {seconds}"
    );
    anyhow::ensure!(
        a.sample_every > 0.0 && a.sample_every.is_finite(),
        "--sample-every: expected a positive number of seconds, got {}",
        a.sample_every
    );
    anyhow::ensure!(
        a.slow_body_seconds >= 0.0 && a.slow_body_seconds.is_finite(),
        "--slow-body-seconds: expected 0 or more seconds, got {}",
        a.slow_body_seconds
    );
    anyhow::ensure!(
        a.soak_warmup >= 0.0 && a.soak_warmup.is_finite(),
        "--soak-warmup: expected 0 or more seconds, got {}",
        a.soak_warmup
    );
    if a.url.is_some() && server_pid.is_none() {
        eprintln!("warning: no --server-pid: the server's RSS and descriptors are not sampled, so the verdict cannot pass");
    }
    let opts = SoakOptions {
        addr: addr.to_string(),
        clients: a.clients,
        duration: Duration::from_secs_f64(seconds),
        questions,
        max_tokens: a.max_tokens,
        max_steps: a.max_steps,
        body_limit: a.body_limit,
        slow_body: Duration::from_secs_f64(a.slow_body_seconds),
        sample_every: Duration::from_secs_f64(a.sample_every),
        request_timeout: Duration::from_secs_f64(a.request_timeout),
        server_pid,
        api_key,
        warmup: Duration::from_secs_f64(a.soak_warmup),
    };
    if !a.json {
        eprintln!(
            "soak: {} clients for {seconds} s against {addr}, samples every {} s",
            a.clients, a.sample_every
        );
    }
    let report = run_soak(&opts)?;
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "addr": addr,
                "in_process_server": a.url.is_none(),
                "server_pid": server_pid,
                "questions": a.questions,
                "max_tokens": a.max_tokens,
                "max_steps": a.max_steps,
                "body_limit": a.body_limit,
                "slow_body_seconds": a.slow_body_seconds,
                "soak": report,
            })
        );
    } else {
        print_text(&report);
    }
    anyhow::ensure!(
        report.verdict.pass,
        "soak verdict: fail ({:?}; {} violation(s){})",
        report.verdict,
        report.violations,
        report
            .violation_examples
            .first()
            .map(|e| format!(", first: {e}"))
            .unwrap_or_default()
    );
    Ok(())
}

fn print_text(r: &SoakReport) {
    println!(
        "{} requests from {} clients in {:.0} s; {} violation(s)",
        r.requests, r.clients, r.seconds, r.violations
    );
    for (kind, outcomes) in &r.by_kind {
        println!("  {kind:<18} {outcomes:?}");
    }
    for e in &r.violation_examples {
        println!("  violation: {e}");
    }
    for m in &r.minutes {
        println!(
            "  minute {:>3} {:<10} ok {:>5} 503 {:>4} 504 {:>4} p50 {:>9.1} ms p99 {:>9.1} ms",
            m.minute, m.kind, m.ok, m.refused_503, m.timed_out_504, m.p50_ms, m.p99_ms
        );
    }
    let mib = |v: Option<u64>| v.map_or("-".to_string(), |b| format!("{:.1}", b as f64 / MIB));
    let n = |v: Option<usize>| v.map_or("-".to_string(), |x| x.to_string());
    println!(
        "  RSS MiB: start {}, floor in {:?} s {}, floor in {:?} s {}, end {}, max {}",
        mib(r.rss_bytes.start),
        r.baseline_window_s,
        mib(r.rss_bytes.baseline),
        r.last_window_s,
        mib(r.rss_bytes.last_floor),
        mib(r.rss_bytes.end),
        mib(r.rss_bytes.max),
    );
    println!(
        "  open descriptors: start {}, baseline floor {}, last floor {}, end {}, max {}",
        n(r.fds.start),
        n(r.fds.baseline),
        n(r.fds.last_floor),
        n(r.fds.end),
        n(r.fds.max),
    );
    println!("  verdict: {:?}", r.verdict);
}
