//! Fingerprints the sources that produce the tiny fixture (the synthetic world, the student and
//! its export), so a fixture made by older code is never reused: `FIXTURE_SOURCES_HASH`.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};

/// Crate source folders whose code shapes the fixture, relative to the workspace root.
const SOURCES: &[&str] = &[
    "fsutil/src",
    "models/src",
    "train/src",
    "export/src",
    "runtime/src",
    "test-support/src",
];

fn files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

fn main() {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("set by cargo")).join("..");
    let mut all = Vec::new();
    for s in SOURCES {
        let dir = root.join(s);
        println!("cargo:rerun-if-changed={}", dir.display());
        files(&dir, &mut all);
    }
    all.sort();
    let mut h = DefaultHasher::new();
    for f in &all {
        f.strip_prefix(&root).unwrap_or(f).hash(&mut h);
        std::fs::read(f).unwrap_or_default().hash(&mut h);
    }
    println!("cargo:rustc-env=FIXTURE_SOURCES_HASH={:016x}", h.finish());
}
