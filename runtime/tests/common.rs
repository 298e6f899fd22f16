//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

/// `../shared/data` beside the workspace (override with `STEPER_DATA`); `None` with a notice
/// when absent, so the suite still runs where the real samples are not installed.
pub fn data_dir() -> Option<PathBuf> {
    let dir = std::env::var_os("STEPER_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/data"));
    if dir.join("hotpotqa_dev500.jsonl").is_file() {
        Some(dir)
    } else {
        eprintln!(
            "SKIPPED: real QA samples not found in {} (set STEPER_DATA)",
            dir.display()
        );
        None
    }
}
