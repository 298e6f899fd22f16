//! Helpers shared by the integration tests: the workspace fixtures of `steper-test-support`.
#![allow(dead_code)]

use std::path::PathBuf;

/// A file of the repository's `data/` folder (an error naming it when missing).
pub fn data_file(name: &str) -> anyhow::Result<PathBuf> {
    steper_test_support::data_file(name)
}

/// The tiny student's export folder (made once per test run by `steper-test-support`).
pub fn test_model() -> anyhow::Result<PathBuf> {
    steper_test_support::tiny_export()
}
