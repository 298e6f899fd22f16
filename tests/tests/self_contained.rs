//! The repository stands on its own: no file of the project refers to a folder outside it (the
//! data the demo, the tests and the experiments need lives in `data/`).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// Folders that are not the project's own files (build outputs, caches, run outputs, git).
const SKIPPED_DIRS: &[&str] = &[
    "target",
    ".cache",
    "out",
    ".git",
    "node_modules",
    "__pycache__",
];

/// Text files of the tree under `dir` (binary files and gzip data are skipped by extension).
fn files(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for e in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let e = e?;
        let p = e.path();
        let name = e.file_name().to_string_lossy().into_owned();
        if e.file_type()?.is_dir() {
            if !SKIPPED_DIRS.contains(&name.as_str()) && !name.starts_with(".venv") {
                files(&p, out)?;
            }
        } else if !matches!(
            p.extension().and_then(|x| x.to_str()),
            Some("gz" | "zst" | "png" | "onnx" | "safetensors" | "gguf" | "lock")
        ) {
            out.push(p);
        }
    }
    Ok(())
}

#[test]
fn no_file_refers_to_a_folder_beside_the_repository() -> Result<()> {
    let root = steper_test_support::repo_root();
    let needle = concat!("..", "/shared");
    let mut all = Vec::new();
    files(root, &mut all)?;
    assert!(
        all.len() > 50,
        "only {} files found under {}",
        all.len(),
        root.display()
    );
    let offenders: Vec<String> = all
        .iter()
        .filter_map(|p| {
            let text = std::fs::read(p).ok()?;
            let text = String::from_utf8_lossy(&text);
            text.lines()
                .position(|l| l.contains(needle))
                .map(|i| format!("{}:{}", p.strip_prefix(root).unwrap_or(p).display(), i + 1))
        })
        .collect();
    assert!(
        offenders.is_empty(),
        "files that refer to {needle}: {offenders:?}"
    );
    Ok(())
}
