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
//! - [`StagingDir`]: a directory of files built beside its final place and renamed into it.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

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
    fn new(path: &Path, op: &'static str, source: std::io::Error) -> Self {
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

/// The directory `path` lives in (`.` for a bare file name).
fn parent_of(path: &Path) -> &Path {
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

fn create_parent(path: &Path) -> Result<()> {
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

/// A directory being built under a temporary name beside its final place.
/// [`StagingDir::commit`] syncs it and renames it into place; dropped without commit, it is
/// removed. The files written into it should themselves be synced (they are, when written with
/// this crate's functions).
pub struct StagingDir {
    tmp: PathBuf,
    dest: PathBuf,
    replace: bool,
    committed: bool,
}

/// What [`StagingDir`] may do with an existing destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Existing {
    /// The destination must not exist or be an empty directory ([`FsError`] with
    /// `std::io::ErrorKind::AlreadyExists` otherwise, checked when staging starts).
    Refuse,
    /// A previous destination is replaced at commit (it stays whole until then).
    Replace,
    /// The destination may exist and hold other files: [`StagingDir::merge`] moves the staged
    /// entries into it one by one, replacing same-named ones, and keeps the rest.
    Merge,
}

impl StagingDir {
    /// Starts building `dest`.
    pub fn new(dest: &Path, existing: Existing) -> Result<Self> {
        if existing == Existing::Refuse && dest.exists() {
            let empty = std::fs::read_dir(dest)
                .map_err(|e| FsError::new(dest, "read directory", e))?
                .next()
                .is_none();
            if !empty {
                return Err(FsError::new(
                    dest,
                    "stage directory",
                    std::io::Error::new(
                        std::io::ErrorKind::AlreadyExists,
                        "the output directory exists and is not empty",
                    ),
                ));
            }
        }
        create_parent(dest)?;
        let tmp = temp_path(dest);
        std::fs::create_dir(&tmp).map_err(|e| FsError::new(dest, "create staging directory", e))?;
        Ok(StagingDir {
            tmp,
            dest: dest.to_path_buf(),
            replace: existing == Existing::Replace,
            committed: false,
        })
    }

    /// Where files go while building.
    pub fn path(&self) -> &Path {
        &self.tmp
    }

    /// The final path.
    pub fn dest(&self) -> &Path {
        &self.dest
    }

    /// Syncs the staged directory and moves it into place (replacing a previous one when
    /// staged with [`Existing::Replace`]; the previous one is moved aside first and removed
    /// only after the new one is in place).
    pub fn commit(mut self) -> Result<PathBuf> {
        sync_dir(&self.tmp)?;
        let mut old = None;
        if self.dest.exists() {
            if self.replace {
                let aside = temp_path(&self.dest);
                std::fs::rename(&self.dest, &aside)
                    .map_err(|e| FsError::new(&self.dest, "move previous aside", e))?;
                old = Some(aside);
            } else {
                // An empty directory (checked at the start); anything else is an error here.
                std::fs::remove_dir(&self.dest)
                    .map_err(|e| FsError::new(&self.dest, "remove empty destination", e))?;
            }
        }
        rename_into_place(&self.tmp, &self.dest)?;
        self.committed = true;
        if let Some(old) = old {
            std::fs::remove_dir_all(&old)
                .or_else(|_| std::fs::remove_file(&old))
                .map_err(|e| FsError::new(&old, "remove previous", e))?;
        }
        Ok(self.dest.clone())
    }
}

impl StagingDir {
    /// Moves every staged entry into the destination (created if missing), replacing entries
    /// of the same name, entries named in `last` after all others and in that order (a
    /// manifest that names the other files goes last, so it never points at a missing one).
    /// Syncs the destination and returns the paths written. For [`Existing::Merge`] stagings.
    pub fn merge(mut self, last: &[&str]) -> Result<Vec<PathBuf>> {
        sync_dir(&self.tmp)?;
        std::fs::create_dir_all(&self.dest)
            .map_err(|e| FsError::new(&self.dest, "create directory", e))?;
        let mut names: Vec<std::ffi::OsString> = std::fs::read_dir(&self.tmp)
            .map_err(|e| FsError::new(&self.dest, "read staging directory", e))?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<std::io::Result<_>>()
            .map_err(|e| FsError::new(&self.dest, "read staging directory", e))?;
        let rank = |n: &std::ffi::OsString| last.iter().position(|l| n == l);
        names.sort_by(|a, b| rank(a).cmp(&rank(b)).then_with(|| a.cmp(b)));
        let mut written = Vec::with_capacity(names.len());
        for name in names {
            let src = self.tmp.join(&name);
            let dst = self.dest.join(&name);
            if src.is_dir() && dst.is_dir() {
                std::fs::remove_dir_all(&dst)
                    .map_err(|e| FsError::new(&dst, "remove previous", e))?;
            }
            std::fs::rename(&src, &dst).map_err(|e| FsError::new(&dst, "rename into place", e))?;
            written.push(dst);
        }
        sync_dir(&self.dest)?;
        self.committed = true;
        let _ = std::fs::remove_dir(&self.tmp);
        Ok(written)
    }
}

impl Drop for StagingDir {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.tmp);
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
    fn a_staged_directory_refuses_a_non_empty_destination_or_replaces_it_whole() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("export");
        let s = StagingDir::new(&dest, Existing::Refuse).unwrap();
        write_atomic(&s.path().join("a"), b"1").unwrap();
        assert!(!dest.exists());
        s.commit().unwrap();
        assert_eq!(names(&dest), vec!["a"]);

        let err = StagingDir::new(&dest, Existing::Refuse).err().unwrap();
        assert_eq!(err.source.kind(), std::io::ErrorKind::AlreadyExists);

        let s = StagingDir::new(&dest, Existing::Replace).unwrap();
        write_atomic(&s.path().join("b"), b"2").unwrap();
        assert_eq!(
            names(&dest),
            vec!["a"],
            "the previous stays whole until commit"
        );
        s.commit().unwrap();
        assert_eq!(names(&dest), vec!["b"]);
        assert_eq!(names(dir.path()), vec!["export"]);

        // dropped without commit: nothing is left behind and the destination is untouched
        let s = StagingDir::new(&dest, Existing::Replace).unwrap();
        write_atomic(&s.path().join("c"), b"3").unwrap();
        drop(s);
        assert_eq!(names(&dest), vec!["b"]);
        assert_eq!(names(dir.path()), vec!["export"]);
    }

    #[test]
    fn a_merge_keeps_other_files_replaces_same_names_and_moves_the_manifest_last() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("out");
        std::fs::create_dir(&dest).unwrap();
        write_atomic(&dest.join("keep.txt"), b"k").unwrap();
        write_atomic(&dest.join("model.onnx"), b"old").unwrap();
        let s = StagingDir::new(&dest, Existing::Merge).unwrap();
        for n in ["steper.json", "model.onnx", "a.cache"] {
            write_atomic(&s.path().join(n), n.as_bytes()).unwrap();
        }
        let written = s.merge(&["steper.json"]).unwrap();
        let order: Vec<_> = written
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(order, vec!["a.cache", "model.onnx", "steper.json"]);
        assert_eq!(
            names(&dest),
            vec!["a.cache", "keep.txt", "model.onnx", "steper.json"]
        );
        assert_eq!(
            std::fs::read(dest.join("model.onnx")).unwrap(),
            b"model.onnx"
        );
        assert_eq!(names(dir.path()), vec!["out"]);
    }

    #[test]
    fn an_empty_destination_directory_is_taken_over() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("out");
        std::fs::create_dir(&dest).unwrap();
        let s = StagingDir::new(&dest, Existing::Refuse).unwrap();
        write_atomic(&s.path().join("x"), b"1").unwrap();
        s.commit().unwrap();
        assert_eq!(names(&dest), vec!["x"]);
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
