//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// `../shared/data` beside the workspace (override with `STEPER_DATA`). Missing samples are an
/// error: the tests that need them fail and say where they looked.
pub fn data_dir() -> anyhow::Result<PathBuf> {
    let dir = std::env::var_os("STEPER_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/data"));
    anyhow::ensure!(
        dir.join("hotpotqa_dev500.jsonl").is_file(),
        "real QA samples not found in {} (set STEPER_DATA to the shared data directory)",
        dir.display()
    );
    Ok(dir)
}

/// The export directory of `STEPER_TEST_MODEL` (scripts/test.sh makes a tiny one). Unset or
/// without a `steper.json` is an error naming the variable.
pub fn test_model() -> anyhow::Result<PathBuf> {
    let dir = std::env::var_os("STEPER_TEST_MODEL").map(PathBuf::from).ok_or_else(|| {
        anyhow::anyhow!(
            "STEPER_TEST_MODEL is not set: these tests need an export directory (scripts/test.sh makes a tiny one)"
        )
    })?;
    anyhow::ensure!(
        Path::new(&dir).join("steper.json").is_file(),
        "STEPER_TEST_MODEL={} holds no steper.json",
        dir.display()
    );
    Ok(dir)
}
