//! Every saved fuzz input (`corpus/<target>/`: the seeds and what the campaigns found, crashes
//! included once fixed) fed to its target on the normal build: none may panic.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use steper_fuzz::{Harness, Target};

fn corpus_dir(target: Target) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target.name())
}

fn inputs(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| anyhow::anyhow!("{}: {e}", dir.display()))?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<_>>()?;
    files.retain(|p| p.is_file());
    files.sort();
    Ok(files)
}

#[test]
fn every_saved_input_is_answered_without_a_panic() -> anyhow::Result<()> {
    let scratch = tempfile::tempdir()?;
    let harness = Harness::new(scratch.path())?;
    let mut failures = Vec::new();
    let mut total = 0;
    for target in Target::ALL {
        let files = inputs(&corpus_dir(target))?;
        assert!(
            !files.is_empty(),
            "{}: no saved inputs",
            corpus_dir(target).display()
        );
        for file in files {
            let data = std::fs::read(&file)?;
            total += 1;
            match catch_unwind(AssertUnwindSafe(|| harness.run(target, &data))) {
                Ok(Ok(())) => {}
                Ok(Err(e)) => anyhow::bail!("{}: the harness failed: {e}", file.display()),
                Err(panic) => {
                    let message = panic
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_default();
                    failures.push(format!("{} ({}): {message}", file.display(), target.name()));
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {total} saved inputs panicked:\n{}",
        failures.len(),
        failures.join("\n")
    );
    Ok(())
}

#[test]
fn every_target_has_its_own_name() {
    for t in Target::ALL {
        assert_eq!(Target::from_name(t.name()), Some(t));
    }
    assert_eq!(Target::from_name("no-such-target"), None);
}
