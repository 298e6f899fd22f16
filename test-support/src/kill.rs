//! Kill-anywhere runs: a tool run as a child process, SIGKILLed at seeded random instants and
//! started again (so that it resumes) until it completes, with a check of what it left after
//! every kill. The crash-safety tests of `steper-train fit`, `distill`, `steper-run index` and
//! `steper-export` are built on it: each runs a [`Campaign`] of such runs, one fresh output
//! folder each, and compares every completed output with an uninterrupted run's.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

/// How often a running attempt is polled for exit while its kill instant has not come.
const POLL: Duration = Duration::from_millis(2);
/// Kills that must land while the tool runs, per campaign.
pub const MIN_KILLS: usize = 20;
/// Kills per kill-and-resume run of a campaign (a fresh output folder each).
pub const KILLS_PER_RUN: usize = 5;
/// Runs before a campaign gives up on reaching [`MIN_KILLS`].
pub const MAX_RUNS: usize = 40;

/// A deterministic stream of kill delays (splitmix64 of the seed).
#[derive(Debug, Clone)]
pub struct KillDelays {
    state: u64,
    max: Duration,
}

impl KillDelays {
    /// Delays uniform in `[0, max)`, the same sequence for the same seed.
    pub fn new(seed: u64, max: Duration) -> Self {
        KillDelays { state: seed, max }
    }

    /// The next delay.
    pub fn next_delay(&mut self) -> Duration {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        let unit = (z >> 11) as f64 / (1u64 << 53) as f64;
        self.max.mul_f64(unit)
    }
}

/// What one kill-and-resume run did.
#[derive(Debug, Clone, Default)]
pub struct KillRun {
    /// Attempts started (killed ones and the last, completed one).
    pub attempts: usize,
    /// Delays (ms after spawn) at which an attempt was killed while running.
    pub killed_at_ms: Vec<u64>,
    /// Wall time of the completed attempt (the resume after the last kill), ms.
    pub last_attempt_ms: u64,
}

/// Runs `cmd()` until it exits successfully: while fewer than `max_kills` attempts have been
/// killed, each attempt gets a delay from `delays` and is SIGKILLed when it is still running
/// then; `after_kill` is called after every kill (to check the partial output). An attempt that
/// exits before its kill instant must succeed, and ends the run. A failed exit is an error
/// carrying the attempt's stderr.
pub fn kill_and_resume(
    mut cmd: impl FnMut() -> Command,
    delays: &mut KillDelays,
    max_kills: usize,
    mut after_kill: impl FnMut(usize) -> Result<()>,
) -> Result<KillRun> {
    let mut run = KillRun::default();
    loop {
        run.attempts += 1;
        let kill_at = (run.killed_at_ms.len() < max_kills).then(|| delays.next_delay());
        let mut command = cmd();
        command.stdout(Stdio::null()).stderr(Stdio::piped());
        let start = Instant::now();
        let mut child = command.spawn().context("spawning the tool")?;
        let status = loop {
            if let Some(s) = child.try_wait()? {
                break Some(s);
            }
            if let Some(d) = kill_at {
                if start.elapsed() >= d {
                    break None;
                }
            }
            std::thread::sleep(POLL);
        };
        // An attempt that exited between the last poll and the kill is a completed one.
        let status = match status {
            None => {
                child.kill().context("SIGKILL")?;
                Some(child.wait()?).filter(|s| s.success())
            }
            s => s,
        };
        match status {
            None => {
                run.killed_at_ms.push(start.elapsed().as_millis() as u64);
                after_kill(run.killed_at_ms.len())
                    .with_context(|| format!("after kill {}", run.killed_at_ms.len()))?;
            }
            Some(s) => {
                let out = child.wait_with_output()?;
                if !s.success() {
                    bail!(
                        "attempt {} exited with {s}: {}",
                        run.attempts,
                        String::from_utf8_lossy(&out.stderr)
                    );
                }
                run.last_attempt_ms = start.elapsed().as_millis() as u64;
                return Ok(run);
            }
        }
    }
}

/// A kill-anywhere campaign: kill-and-resume runs of one tool, each in a fresh output folder
/// `run-N` under a root, until at least [`MIN_KILLS`] kills have landed while it ran (at most
/// [`KILLS_PER_RUN`] per run, at most [`MAX_RUNS`] runs), the kill delays drawn from one
/// seeded stream.
#[derive(Debug, Clone)]
pub struct Campaign {
    delays: KillDelays,
}

/// What a campaign did: the runs it took and the instants (ms after spawn) of every kill.
#[derive(Debug, Clone, Default)]
pub struct CampaignReport {
    /// Kill-and-resume runs made.
    pub runs: usize,
    /// Delays (ms after spawn) at which an attempt was killed while running, over all runs.
    pub killed_at_ms: Vec<u64>,
}

impl Campaign {
    /// Kill delays uniform in `[0, max_delay)`, seeded with `seed` (see [`KillDelays`]).
    pub fn new(seed: u64, max_delay: Duration) -> Self {
        Campaign {
            delays: KillDelays::new(seed, max_delay),
        }
    }

    /// Runs the campaign under `root`. For run N (from 1) in `out = root/run-N`: `prepare(N,
    /// out)` first (e.g. puts a previous output in place), then [`kill_and_resume`] of
    /// `cmd(out)` with `after_kill(N, out)` after every kill, then `check_done(N, out)` on the
    /// completed output (the comparison with the uninterrupted run); no temporary may be left.
    /// Any failure is an error naming the run.
    pub fn run(
        mut self,
        root: &Path,
        mut prepare: impl FnMut(usize, &Path) -> Result<()>,
        mut cmd: impl FnMut(&Path) -> Command,
        mut after_kill: impl FnMut(usize, &Path) -> Result<()>,
        mut check_done: impl FnMut(usize, &Path) -> Result<()>,
    ) -> Result<CampaignReport> {
        let mut report = CampaignReport::default();
        while report.killed_at_ms.len() < MIN_KILLS {
            ensure!(
                report.runs < MAX_RUNS,
                "only {} kills landed in {} runs",
                report.killed_at_ms.len(),
                report.runs
            );
            report.runs += 1;
            let n = report.runs;
            let out = root.join(format!("run-{n}"));
            let run = (|| -> Result<KillRun> {
                prepare(n, &out)?;
                let run = kill_and_resume(
                    || cmd(&out),
                    &mut self.delays,
                    KILLS_PER_RUN,
                    |_| after_kill(n, &out),
                )?;
                check_done(n, &out)?;
                let left = temporaries(&out)?;
                ensure!(left.is_empty(), "temporaries left: {left:?}");
                Ok(run)
            })()
            .with_context(|| format!("run {n}"))?;
            report.killed_at_ms.extend(run.killed_at_ms);
        }
        Ok(report)
    }
}

impl CampaignReport {
    /// The campaign's figures as one JSON object: `tool`, `reference_ms` (the uninterrupted
    /// run's wall time), `runs`, `kills`, `killed_at_ms`, and the fields of `extra` (an object).
    pub fn summary(
        &self,
        tool: &str,
        reference: Duration,
        extra: serde_json::Value,
    ) -> serde_json::Value {
        let mut v = serde_json::json!({
            "tool": tool, "reference_ms": reference.as_millis() as u64, "runs": self.runs,
            "kills": self.killed_at_ms.len(), "killed_at_ms": self.killed_at_ms,
        });
        if let (Some(m), serde_json::Value::Object(x)) = (v.as_object_mut(), extra) {
            m.extend(x);
        }
        v
    }
}

/// Copies the folder `from` to `to` (`cp -r`), e.g. to put a previous output in place.
pub fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    let s = Command::new("cp")
        .arg("-r")
        .arg(from)
        .arg(to)
        .status()
        .context("running cp")?;
    ensure!(
        s.success(),
        "copying {} to {}: {s}",
        from.display(),
        to.display()
    );
    Ok(())
}

/// Runs `cmd()` once to completion and returns its wall time (the reference run that the kill
/// delays are scaled to).
pub fn run_to_completion(mut cmd: Command) -> Result<Duration> {
    let start = Instant::now();
    let out = cmd.output().context("running the tool")?;
    if !out.status.success() {
        bail!(
            "reference run exited with {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(start.elapsed())
}

/// Whether `name` is a crash-safe writer's temporary (`.NAME.tmp-PID-N`).
pub fn is_temporary(name: &str) -> bool {
    name.starts_with('.') && name.contains(".tmp-")
}

/// Every file under `dir` (relative path → bytes), temporaries left out; an empty map when
/// `dir` does not exist.
pub fn tree(dir: &Path) -> Result<BTreeMap<PathBuf, Vec<u8>>> {
    let mut out = BTreeMap::new();
    if dir.exists() {
        walk(dir, dir, &mut out)?;
    }
    Ok(out)
}

fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, Vec<u8>>) -> Result<()> {
    for e in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        if is_temporary(&name) {
            continue;
        }
        let p = e.path();
        if e.file_type()?.is_dir() {
            walk(root, &p, out)?;
        } else {
            let rel = p.strip_prefix(root).unwrap_or(&p).to_path_buf();
            out.insert(
                rel,
                std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?,
            );
        }
    }
    Ok(())
}

/// Temporaries (see [`is_temporary`]) anywhere under `dir` and beside it (siblings named after
/// it), as paths.
pub fn temporaries(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut found = Vec::new();
    if let (Some(parent), Some(name)) = (dir.parent(), dir.file_name()) {
        let prefix = format!(".{}.tmp-", name.to_string_lossy());
        if parent.exists() {
            for e in std::fs::read_dir(parent)? {
                let e = e?;
                if e.file_name().to_string_lossy().starts_with(&prefix) {
                    found.push(e.path());
                }
            }
        }
    }
    if dir.is_dir() {
        find_temporaries(dir, &mut found)?;
    }
    Ok(found)
}

fn find_temporaries(dir: &Path, found: &mut Vec<PathBuf>) -> Result<()> {
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let p = e.path();
        if is_temporary(&e.file_name().to_string_lossy()) {
            found.push(p);
        } else if e.file_type()?.is_dir() {
            find_temporaries(&p, found)?;
        }
    }
    Ok(())
}

/// The differences between two trees, for an assertion message (first few only).
pub fn tree_diff(a: &BTreeMap<PathBuf, Vec<u8>>, b: &BTreeMap<PathBuf, Vec<u8>>) -> Vec<String> {
    let mut d = Vec::new();
    for (k, v) in a {
        match b.get(k) {
            None => d.push(format!("{} only in the first", k.display())),
            Some(w) if w != v => d.push(format!(
                "{} differs ({} vs {} bytes)",
                k.display(),
                v.len(),
                w.len()
            )),
            _ => {}
        }
    }
    for k in b.keys() {
        if !a.contains_key(k) {
            d.push(format!("{} only in the second", k.display()));
        }
    }
    d.truncate(8);
    d
}

/// `v` without its measured timings (keys ending in `_ms` or `_per_sec`, and `seconds`), at
/// any depth: what two runs of the same work must agree on.
pub fn without_timings(v: &serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(k, _)| {
                    !(k.ends_with("_ms") || k.ends_with("_per_sec") || *k == "seconds")
                })
                .map(|(k, x)| (k.clone(), without_timings(x)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(without_timings).collect()),
        x => x.clone(),
    }
}

/// The complete lines of a JSONL file that a killed appender may have left with a torn last
/// line: each newline-terminated line must be JSON (an error naming the line otherwise); the
/// unterminated tail, if any, is returned apart. A missing file has no lines.
pub fn jsonl_lines(path: &Path) -> Result<(Vec<serde_json::Value>, Option<String>)> {
    if !path.exists() {
        return Ok((Vec::new(), None));
    }
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut lines: Vec<&str> = text.split('\n').collect();
    let tail = lines.pop().filter(|t| !t.is_empty()).map(str::to_string);
    let mut out = Vec::with_capacity(lines.len());
    for (i, l) in lines.iter().enumerate() {
        out.push(
            serde_json::from_str(l)
                .with_context(|| format!("{} line {}: not JSON: {l}", path.display(), i + 1))?,
        );
    }
    Ok((out, tail))
}

/// A tmpfs of a given size mounted for a disk-full test, unmounted when dropped. Mounting needs
/// root (CAP_SYS_ADMIN); without it, [`SmallTmpfs::mount`] is an error saying so.
pub struct SmallTmpfs {
    dir: PathBuf,
}

impl SmallTmpfs {
    /// Mounts a tmpfs of `bytes` at `dir` (created).
    pub fn mount(dir: &Path, bytes: u64) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
            .arg(dir)
            .output()
            .context("running mount")?;
        if !out.status.success() {
            bail!(
                "cannot mount a {bytes}-byte tmpfs at {} (the disk-full test needs root): {}",
                dir.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(SmallTmpfs {
            dir: dir.to_path_buf(),
        })
    }

    /// The mount point.
    pub fn path(&self) -> &Path {
        &self.dir
    }
}

impl Drop for SmallTmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.dir).status();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_are_seeded_and_in_range() {
        let max = Duration::from_millis(500);
        let a: Vec<_> = (0..50)
            .scan(KillDelays::new(7, max), |d, _| Some(d.next_delay()))
            .collect();
        let b: Vec<_> = (0..50)
            .scan(KillDelays::new(7, max), |d, _| Some(d.next_delay()))
            .collect();
        assert_eq!(a, b);
        assert!(a.iter().all(|d| *d < max));
        let spread = a.iter().max().unwrap().as_millis() - a.iter().min().unwrap().as_millis();
        assert!(spread > 250, "50 uniform draws cover most of the range");
    }

    #[test]
    fn a_sleeping_child_is_killed_then_completes() {
        let mut delays = KillDelays::new(1, Duration::from_millis(50));
        let mut n = 0;
        let mut kills_seen = 0;
        let run = kill_and_resume(
            || {
                n += 1;
                let mut c = Command::new("sh");
                // The first three attempts sleep past any kill instant; the fourth exits at once.
                c.args(["-c", if n <= 3 { "sleep 5" } else { "exit 0" }]);
                c
            },
            &mut delays,
            3,
            |k| {
                kills_seen = k;
                Ok(())
            },
        )
        .unwrap();
        assert_eq!(run.attempts, 4);
        assert_eq!(run.killed_at_ms.len(), 3);
        assert_eq!(kills_seen, 3);
    }

    /// A shell command that sleeps (1 s) past any kill instant until it has been started `n`
    /// times in `out` (counted in a file there), then exits at once.
    fn completes_on_attempt(out: &Path, n: usize) -> Command {
        let mut c = Command::new("sh");
        c.arg("-c")
            .arg(format!(
                "mkdir -p \"$0\" && echo x >> \"$0/attempts\" && \
                 [ $(wc -l < \"$0/attempts\") -ge {n} ] || exec sleep 1"
            ))
            .arg(out);
        c
    }

    #[test]
    fn a_campaign_runs_until_enough_kills_landed() {
        let tmp = tempfile::tempdir().unwrap();
        let (mut prepared, mut checked, mut after) = (Vec::new(), Vec::new(), 0);
        let report = Campaign::new(3, Duration::from_millis(50))
            .run(
                tmp.path(),
                |n, out| {
                    prepared.push(n);
                    ensure!(!out.exists(), "a fresh folder per run");
                    Ok(())
                },
                |out| completes_on_attempt(out, KILLS_PER_RUN + 1),
                |_, _| {
                    after += 1;
                    Ok(())
                },
                |n, out| {
                    checked.push(n);
                    ensure!(out.ends_with(format!("run-{n}")));
                    Ok(())
                },
            )
            .unwrap();
        let runs = MIN_KILLS.div_ceil(KILLS_PER_RUN);
        assert_eq!(report.runs, runs);
        assert_eq!(report.killed_at_ms.len(), runs * KILLS_PER_RUN);
        assert_eq!(after, runs * KILLS_PER_RUN);
        assert_eq!(prepared, (1..=runs).collect::<Vec<_>>());
        assert_eq!(checked, prepared);
        let s = report.summary("sh", Duration::from_millis(7), serde_json::json!({"x": 1}));
        assert_eq!(s["tool"], "sh");
        assert_eq!(s["reference_ms"], 7);
        assert_eq!(s["kills"], runs * KILLS_PER_RUN);
        assert_eq!(s["x"], 1);
    }

    /// The error of a campaign whose attempts complete from the `n`th on, every completed
    /// output checked by `check_done`.
    fn failed_campaign(n: usize, check_done: impl FnMut(usize, &Path) -> Result<()>) -> String {
        let tmp = tempfile::tempdir().unwrap();
        let err = Campaign::new(3, Duration::from_millis(50))
            .run(
                tmp.path(),
                |_, _| Ok(()),
                |out| completes_on_attempt(out, n),
                |_, _| Ok(()),
                check_done,
            )
            .unwrap_err();
        format!("{err:#}")
    }

    #[test]
    fn a_failed_check_is_an_error_naming_the_run() {
        let msg = failed_campaign(2, |n, _| {
            ensure!(n < 2, "differs from the uninterrupted run");
            Ok(())
        });
        assert!(msg.contains("run 2") && msg.contains("differs"), "{msg}");
    }

    #[test]
    fn a_campaign_that_lands_too_few_kills_fails() {
        let msg = failed_campaign(1, |_, _| Ok(()));
        assert!(msg.contains("kills landed in 40 runs"), "{msg}");
    }

    #[test]
    fn a_failing_attempt_is_an_error() {
        let mut delays = KillDelays::new(1, Duration::from_secs(5));
        let err = kill_and_resume(
            || {
                let mut c = Command::new("sh");
                c.args(["-c", "echo broken >&2; exit 3"]);
                c
            },
            &mut delays,
            1,
            |_| Ok(()),
        )
        .unwrap_err();
        assert!(format!("{err:#}").contains("broken"), "{err:#}");
    }
}
