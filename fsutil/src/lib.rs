//! Crash-safe output, the one way every STEPER crate writes a file or a directory.
//!
//! A result is built under a temporary name in the directory it will live in, synced, and then
//! renamed into place; the directory itself is synced after the rename so that the new name
//! survives a power loss. A reader (or a later run) therefore sees either the previous complete
//! file or the new complete file, never a torn one, and a process killed half-way leaves only a
//! hidden temporary (`.NAME.tmp-PID-N`) that the next write of the same name does not collide
//! with.
//!
//! - [`write_atomic`] / [`write_atomic_with`]: a whole file from bytes or from a writer callback;
//! - [`AtomicFile`]: a file written incrementally (e.g. JSONL rows) and committed at the end;
//!   dropped without [`AtomicFile::commit`], it is removed;
//! - [`StagingDir`]: a directory of files built beside its final place and swapped into it whole
//!   (an atomic exchange on Linux, so the destination is never mixed or missing).

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

mod staging;
pub use staging::{Existing, StagingDir};

/// A file-system operation that failed, with the path it was about.
#[derive(Debug, thiserror::Error)]
#[error("{}: {op}: {source}", path.display())]
pub struct FsError {
    /// The file or directory involved (the final path, not the temporary one, where the
    /// temporary is an implementation detail of the write).
    pub path: PathBuf,
    /// What was being done ("create", "write", "sync", "rename", …).
    pub op: &'static str,
    /// The underlying I/O error.
    #[source]
    pub source: std::io::Error,
}

impl FsError {
    pub(crate) fn new(path: &Path, op: &'static str, source: std::io::Error) -> Self {
        FsError {
            path: path.to_path_buf(),
            op,
            source,
        }
    }

    /// The I/O error with the operation folded into its message, for crates whose error enum
    /// carries `(path, std::io::Error)`.
    pub fn into_io(self) -> (PathBuf, std::io::Error) {
        let kind = self.source.kind();
        let msg = format!("{}: {}", self.op, self.source);
        (self.path, std::io::Error::new(kind, msg))
    }
}

/// Result of this crate.
pub type Result<T> = std::result::Result<T, FsError>;

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A fresh temporary sibling name for `path`: hidden, and unique within the process (the pid
/// and a counter), so two writers of one name — two threads, or a killed run's leftover and
/// its resume — never share a temporary.
pub fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "output".to_string());
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    path.with_file_name(format!(".{name}.tmp-{}-{n}", std::process::id()))
}

/// Removes the temporaries of `path` that a killed writer left (`.NAME.tmp-PID-N` whose process
/// no longer runs), so that kill-and-resume cycles do not pile them up. Best effort: a name
/// that cannot be removed stays. On other systems than Linux nothing is removed.
pub fn remove_stale_temporaries(path: &Path) {
    if let Some(name) = path.file_name() {
        sweep_temporaries(parent_of(path), Some(&name.to_string_lossy()));
    }
}

/// Removes every temporary in `dir` (any `.NAME.tmp-PID-N`) whose writer no longer runs: for
/// folders whose entries come and go under changing names (checkpoints), where
/// [`remove_stale_temporaries`] of one name would miss them. Best effort, as that function.
pub fn remove_stale_temporaries_in(dir: &Path) {
    sweep_temporaries(dir, None);
}

/// Removes `.BASE.tmp-PID-N` entries of `dir` whose process is gone (BASE = `name` when given).
fn sweep_temporaries(dir: &Path, name: Option<&str>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        let Some((base, tail)) = n.strip_prefix('.').and_then(|r| r.rsplit_once(".tmp-")) else {
            continue;
        };
        if name.is_some_and(|want| want != base) {
            continue;
        }
        let Some(pid) = tail.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if pid != std::process::id() && !process_alive(pid) {
            let p = e.path();
            let _ = std::fs::remove_dir_all(&p).or_else(|_| std::fs::remove_file(&p));
        }
    }
}

/// Removes the directory `path` so that it is never seen half-removed under its name: it is
/// renamed to a temporary sibling first (one atomic step), then deleted. A process killed
/// during the deletion leaves only the temporary, which [`remove_stale_temporaries_in`] of the
/// parent removes later.
pub fn remove_dir_atomically(path: &Path) -> Result<()> {
    let aside = temp_path(path);
    std::fs::rename(path, &aside).map_err(|e| FsError::new(path, "move aside to remove", e))?;
    sync_dir(parent_of(path))?;
    std::fs::remove_dir_all(&aside).map_err(|e| FsError::new(path, "remove", e))
}

/// Whether a process `pid` exists (a PID that cannot be checked counts as alive).
fn process_alive(pid: u32) -> bool {
    #[cfg(target_os = "linux")]
    {
        Path::new("/proc").join(pid.to_string()).exists() || !Path::new("/proc/self").exists()
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = pid;
        true
    }
}

/// The directory `path` lives in (`.` for a bare file name).
pub(crate) fn parent_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Syncs a directory, so that the names created or renamed in it are durable.
pub fn sync_dir(dir: &Path) -> Result<()> {
    let d = File::open(dir).map_err(|e| FsError::new(dir, "open directory", e))?;
    d.sync_all()
        .map_err(|e| FsError::new(dir, "sync directory", e))
}

pub(crate) fn create_parent(path: &Path) -> Result<()> {
    let parent = parent_of(path);
    std::fs::create_dir_all(parent).map_err(|e| FsError::new(parent, "create directory", e))
}

/// Renames `tmp` to `path`, then syncs the directory (the rename is what makes it visible).
fn rename_into_place(tmp: &Path, path: &Path) -> Result<()> {
    std::fs::rename(tmp, path).map_err(|e| FsError::new(path, "rename into place", e))?;
    sync_dir(parent_of(path))
}

/// Writes `bytes` to `path` atomically (parent directories are created).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |w| w.write_all(bytes))
}

/// Calls `fill` on a buffered temporary file, syncs it and renames it to `path`. On any error
/// the temporary is removed and `path` is untouched.
pub fn write_atomic_with(
    path: &Path,
    fill: impl FnOnce(&mut BufWriter<File>) -> std::io::Result<()>,
) -> Result<()> {
    let mut f = AtomicFile::create(path)?;
    fill(&mut f.out).map_err(|e| FsError::new(path, "write", e))?;
    f.commit()
}

/// A file being written under a temporary name; [`AtomicFile::commit`] flushes, syncs and
/// renames it into place. Dropped without commit (an error, a panic), it is removed.
pub struct AtomicFile {
    path: PathBuf,
    tmp: PathBuf,
    out: BufWriter<File>,
    committed: bool,
}

impl AtomicFile {
    /// Starts writing `path` (parent directories are created).
    pub fn create(path: &Path) -> Result<Self> {
        create_parent(path)?;
        remove_stale_temporaries(path);
        let tmp = temp_path(path);
        let file = File::create(&tmp).map_err(|e| FsError::new(path, "create", e))?;
        Ok(AtomicFile {
            path: path.to_path_buf(),
            tmp,
            out: BufWriter::new(file),
            committed: false,
        })
    }

    /// The final path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Flushes, syncs and renames the file into place.
    pub fn commit(mut self) -> Result<()> {
        self.out
            .flush()
            .map_err(|e| FsError::new(&self.path, "write", e))?;
        self.out
            .get_ref()
            .sync_all()
            .map_err(|e| FsError::new(&self.path, "sync", e))?;
        rename_into_place(&self.tmp, &self.path)?;
        self.committed = true;
        Ok(())
    }
}

impl Write for AtomicFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.out.write(buf)
    }

    fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        self.out.write_all(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn temporary_names_are_hidden_siblings_and_never_repeat() {
        let a = temp_path(Path::new("/x/model.onnx"));
        let b = temp_path(Path::new("/x/model.onnx"));
        assert_ne!(a, b);
        assert_eq!(a.parent(), Some(Path::new("/x")));
        let name = a.file_name().unwrap().to_string_lossy().into_owned();
        assert!(name.starts_with(".model.onnx.tmp-"), "{name}");
    }

    #[test]
    fn a_write_replaces_the_file_whole_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sub/out.json");
        write_atomic(&p, b"first").unwrap();
        write_atomic(&p, b"second").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"second");
        assert_eq!(names(&dir.path().join("sub")), vec!["out.json"]);
    }

    #[test]
    fn a_failed_fill_keeps_the_previous_file_and_removes_the_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("out.json");
        write_atomic(&p, b"good").unwrap();
        let err = write_atomic_with(&p, |w| {
            w.write_all(b"half")?;
            Err(std::io::Error::other("disk full"))
        })
        .unwrap_err();
        assert_eq!(err.path, p);
        assert_eq!(err.op, "write");
        assert!(err.to_string().contains("disk full"), "{err}");
        assert_eq!(std::fs::read(&p).unwrap(), b"good");
        assert_eq!(names(dir.path()), vec!["out.json"]);
    }

    #[test]
    fn an_atomic_file_appears_only_on_commit() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("rows.jsonl");
        let mut f = AtomicFile::create(&p).unwrap();
        f.write_all(b"{\"a\":1}\n").unwrap();
        assert!(!p.exists());
        f.commit().unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "{\"a\":1}\n");
        let mut g = AtomicFile::create(&p).unwrap();
        g.write_all(b"lost").unwrap();
        drop(g);
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "{\"a\":1}\n");
        assert_eq!(names(dir.path()), vec!["rows.jsonl"]);
    }

    #[test]
    fn a_directory_removed_atomically_is_gone_or_whole_and_dead_leftovers_are_swept() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("step-00000012");
        std::fs::create_dir(&d).unwrap();
        write_atomic(&d.join("model.safetensors"), b"w").unwrap();
        remove_dir_atomically(&d).unwrap();
        assert!(names(dir.path()).is_empty());
        // what a writer killed while removing leaves, and one of a live process
        let dead = dir
            .path()
            .join(format!(".step-00000009.tmp-{}-3", u32::MAX));
        let live = dir
            .path()
            .join(format!(".step-00000010.tmp-{}-0", std::process::id()));
        std::fs::create_dir(&dead).unwrap();
        std::fs::create_dir(&live).unwrap();
        write_atomic(&dir.path().join("keep.json"), b"{}").unwrap();
        remove_stale_temporaries_in(dir.path());
        assert!(!dead.exists());
        assert!(live.exists());
        assert!(dir.path().join("keep.json").exists());
    }

    #[test]
    fn into_io_keeps_the_kind_and_names_the_operation() {
        let e = FsError::new(
            Path::new("/a/b"),
            "rename into place",
            std::io::Error::new(std::io::ErrorKind::PermissionDenied, "nope"),
        );
        let (p, io) = e.into_io();
        assert_eq!(p, Path::new("/a/b"));
        assert_eq!(io.kind(), std::io::ErrorKind::PermissionDenied);
        assert_eq!(io.to_string(), "rename into place: nope");
    }
}
