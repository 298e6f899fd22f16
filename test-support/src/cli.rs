//! Running one of the workspace's binaries from an integration test and reading what it said.
//! The binary's path comes from the test (`env!("CARGO_BIN_EXE_<name>")`, which Cargo sets only
//! for the test targets of the binary's own crate).

use std::path::Path;
use std::process::{Command, Output};

use anyhow::{Context, Result};

/// Runs the binary at `bin` with `args` to completion, its output captured; an error only where
/// it could not be started (a failed exit is in the returned status).
pub fn run(bin: &str, args: &[&str]) -> Result<Output> {
    Command::new(bin)
        .args(args)
        .output()
        .with_context(|| format!("running {bin}"))
}

/// Everything a run printed: its stdout, then its stderr.
pub fn output_text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// `p` as an argument string (empty where it is not UTF-8, which a test's temporary paths are).
pub fn path_str(p: &Path) -> &str {
    p.to_str().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_captures_stdout_then_stderr_and_its_status() -> Result<()> {
        let o = run("sh", &["-c", "echo out; echo err >&2; exit 3"])?;
        assert_eq!(o.status.code(), Some(3));
        assert_eq!(output_text(&o), "out\nerr\n");
        Ok(())
    }

    #[test]
    fn a_binary_that_cannot_start_is_an_error_naming_it() {
        let err = run("/nonexistent/steper-tool", &[]).unwrap_err();
        assert!(
            format!("{err:#}").contains("/nonexistent/steper-tool"),
            "{err:#}"
        );
    }

    #[test]
    fn paths_are_their_utf8_text() {
        assert_eq!(path_str(Path::new("/tmp/a b")), "/tmp/a b");
    }
}
