//! [`StagingDir`]: a directory built beside its final place and swapped into it whole.
//!
//! Where the destination already exists, the swap is one `renameat2(RENAME_EXCHANGE)` on
//! Linux: at every instant the destination's name points at either the whole previous directory
//! or the whole new one, so a process killed at any point never leaves a half-written or a
//! missing destination. Where the exchange is not available (another OS, a file system without
//! it), the previous directory is moved aside and the new one renamed into place — two renames,
//! between which the destination is briefly absent (never mixed).

use std::path::{Path, PathBuf};

use crate::{
    create_parent, parent_of, remove_stale_temporaries, sync_dir, temp_path, FsError, Result,
};

/// A directory being built under a temporary name beside its final place.
/// [`StagingDir::commit`] (or [`StagingDir::merge`]) syncs it and swaps it into place; dropped
/// without either, it is removed. The files written into it should themselves be synced (they
/// are, when written with this crate's functions).
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
    /// A previous destination is replaced whole at commit (it stays whole until then).
    Replace,
    /// The destination may exist and hold other files: [`StagingDir::merge`] carries the
    /// entries the staging does not replace over into the new directory and swaps it in whole.
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
        remove_stale_temporaries(dest);
        let tmp = temp_path(dest);
        std::fs::create_dir(&tmp).map_err(|e| FsError::new(dest, "create staging directory", e))?;
        Ok(StagingDir {
            tmp,
            dest: dest.to_path_buf(),
            replace: existing != Existing::Refuse,
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

    /// Syncs the staged directory and swaps it into place (replacing a previous one when
    /// staged with [`Existing::Replace`] or [`Existing::Merge`]; the previous one is removed
    /// only after the new one is in place).
    pub fn commit(mut self) -> Result<PathBuf> {
        sync_dir(&self.tmp)?;
        if self.dest.exists() && !self.replace {
            // An empty directory (checked at the start); anything else is an error here.
            std::fs::remove_dir(&self.dest)
                .map_err(|e| FsError::new(&self.dest, "remove empty destination", e))?;
        }
        swap_into_place(&self.tmp, &self.dest)?;
        self.committed = true;
        Ok(self.dest.clone())
    }

    /// Completes the staged directory with the destination's entries it does not hold (hard
    /// links, or copies where the file system refuses links; entries named in `drop` are left
    /// out), then swaps it into place whole (see the module documentation). Returns the paths
    /// of the staged entries in the destination, sorted. For [`Existing::Merge`] stagings; the
    /// destination may be missing.
    pub fn merge(mut self, drop: &[&str]) -> Result<Vec<PathBuf>> {
        let mut staged: Vec<std::ffi::OsString> = read_names(&self.tmp, &self.dest)?;
        staged.sort();
        if self.dest.is_dir() {
            for name in read_names(&self.dest, &self.dest)? {
                if staged.contains(&name) || drop.iter().any(|d| name == *d) {
                    continue;
                }
                carry(&self.dest.join(&name), &self.tmp.join(&name))?;
            }
        }
        sync_dir(&self.tmp)?;
        swap_into_place(&self.tmp, &self.dest)?;
        self.committed = true;
        Ok(staged.iter().map(|n| self.dest.join(n)).collect())
    }
}

impl Drop for StagingDir {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.tmp);
        }
    }
}

fn read_names(dir: &Path, named: &Path) -> Result<Vec<std::ffi::OsString>> {
    std::fs::read_dir(dir)
        .map_err(|e| FsError::new(named, "read directory", e))?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<std::io::Result<_>>()
        .map_err(|e| FsError::new(named, "read directory", e))
}

/// Recreates `src` (a file, a symbolic link or a directory tree) at `dst`, files as hard links
/// where the file system allows them.
fn carry(src: &Path, dst: &Path) -> Result<()> {
    let meta = std::fs::symlink_metadata(src).map_err(|e| FsError::new(src, "stat", e))?;
    if meta.is_dir() {
        std::fs::create_dir(dst).map_err(|e| FsError::new(src, "carry over directory", e))?;
        for name in read_names(src, src)? {
            carry(&src.join(&name), &dst.join(&name))?;
        }
        return Ok(());
    }
    #[cfg(unix)]
    if meta.file_type().is_symlink() {
        let target = std::fs::read_link(src).map_err(|e| FsError::new(src, "read link", e))?;
        return std::os::unix::fs::symlink(target, dst)
            .map_err(|e| FsError::new(src, "carry over link", e));
    }
    if std::fs::hard_link(src, dst).is_err() {
        std::fs::copy(src, dst).map_err(|e| FsError::new(src, "carry over file", e))?;
        std::fs::File::open(dst)
            .and_then(|f| f.sync_all())
            .map_err(|e| FsError::new(src, "sync carried-over file", e))?;
    }
    Ok(())
}

/// Puts the directory `tmp` at `dest`: a plain rename when `dest` is absent, else an atomic
/// exchange (or, where there is none, a move aside and a rename), then removes the previous
/// directory and syncs the parent.
fn swap_into_place(tmp: &Path, dest: &Path) -> Result<()> {
    if !dest.exists() {
        std::fs::rename(tmp, dest).map_err(|e| FsError::new(dest, "rename into place", e))?;
        return sync_dir(parent_of(dest));
    }
    let old = if exchange(tmp, dest).map_err(|e| FsError::new(dest, "exchange with previous", e))? {
        // The previous directory now lives at the staging name.
        tmp.to_path_buf()
    } else {
        let aside = temp_path(dest);
        std::fs::rename(dest, &aside).map_err(|e| FsError::new(dest, "move previous aside", e))?;
        std::fs::rename(tmp, dest).map_err(|e| FsError::new(dest, "rename into place", e))?;
        aside
    };
    sync_dir(parent_of(dest))?;
    std::fs::remove_dir_all(&old)
        .or_else(|_| std::fs::remove_file(&old))
        .map_err(|e| FsError::new(&old, "remove previous", e))
}

/// Atomically exchanges the names `a` and `b` (both existing). `Ok(false)` where the OS or the
/// file system has no such operation.
#[cfg(target_os = "linux")]
fn exchange(a: &Path, b: &Path) -> std::io::Result<bool> {
    use std::os::unix::ffi::OsStrExt;
    let ca = std::ffi::CString::new(a.as_os_str().as_bytes())?;
    let cb = std::ffi::CString::new(b.as_os_str().as_bytes())?;
    // SAFETY: both arguments are valid NUL-terminated paths that outlive the call;
    // renameat2 reads them and touches no other memory.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            ca.as_ptr(),
            libc::AT_FDCWD,
            cb.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if r == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EINVAL) | Some(libc::ENOSYS) | Some(libc::EOPNOTSUPP) => Ok(false),
        _ => Err(e),
    }
}

#[cfg(not(target_os = "linux"))]
fn exchange(_a: &Path, _b: &Path) -> std::io::Result<bool> {
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::write_atomic;

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn a_staged_directory_refuses_a_non_empty_destination_or_replaces_it_whole() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("export");
        let s = StagingDir::new(&dest, Existing::Refuse).unwrap();
        write_atomic(&s.path().join("a"), b"1").unwrap();
        assert!(!dest.exists(), "nothing at the destination before commit");
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
    fn a_merge_keeps_other_files_replaces_same_names_and_drops_the_named_ones() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("out");
        std::fs::create_dir_all(dest.join("sub")).unwrap();
        write_atomic(&dest.join("keep.txt"), b"k").unwrap();
        write_atomic(&dest.join("sub/deep.txt"), b"d").unwrap();
        write_atomic(&dest.join("model.onnx"), b"old").unwrap();
        write_atomic(&dest.join("model.onnx.data"), b"stale").unwrap();
        let s = StagingDir::new(&dest, Existing::Merge).unwrap();
        for n in ["steper.json", "model.onnx", "a.cache"] {
            write_atomic(&s.path().join(n), n.as_bytes()).unwrap();
        }
        assert_eq!(
            std::fs::read(dest.join("model.onnx")).unwrap(),
            b"old",
            "the destination is untouched until the merge"
        );
        let written = s.merge(&["model.onnx.data"]).unwrap();
        let order: Vec<_> = written
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(order, vec!["a.cache", "model.onnx", "steper.json"]);
        assert_eq!(
            names(&dest),
            vec!["a.cache", "keep.txt", "model.onnx", "steper.json", "sub"]
        );
        assert_eq!(
            std::fs::read(dest.join("model.onnx")).unwrap(),
            b"model.onnx"
        );
        assert_eq!(std::fs::read(dest.join("keep.txt")).unwrap(), b"k");
        assert_eq!(std::fs::read(dest.join("sub/deep.txt")).unwrap(), b"d");
        assert_eq!(
            names(dir.path()),
            vec!["out"],
            "no staging or previous left"
        );
    }

    #[test]
    fn a_merge_into_a_missing_destination_creates_it() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("new/out");
        let s = StagingDir::new(&dest, Existing::Merge).unwrap();
        write_atomic(&s.path().join("x"), b"x").unwrap();
        s.merge(&[]).unwrap();
        assert_eq!(names(&dest), vec!["x"]);
    }

    #[test]
    fn a_dead_writers_staging_is_removed_by_the_next_one() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("index");
        // PID 0 is never a user process; `u32::MAX` is above any pid_max.
        let stale = dir.path().join(format!(".index.tmp-{}-0", u32::MAX));
        std::fs::create_dir(&stale).unwrap();
        write_atomic(&stale.join("half"), b"").unwrap();
        let live = dir
            .path()
            .join(format!(".index.tmp-{}-99", std::process::id()));
        std::fs::create_dir(&live).unwrap();
        let s = StagingDir::new(&dest, Existing::Replace).unwrap();
        assert!(!stale.exists(), "a dead writer's staging is removed");
        assert!(live.exists(), "a live process's staging is kept");
        drop(s);
    }

    #[test]
    fn an_empty_destination_directory_is_taken_over() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("out");
        std::fs::create_dir(&dest).unwrap();
        let s = StagingDir::new(&dest, Existing::Refuse).unwrap();
        write_atomic(&s.path().join("f"), b"1").unwrap();
        s.commit().unwrap();
        assert_eq!(names(&dest), vec!["f"]);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn the_exchange_swaps_two_directories_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::create_dir(&a).unwrap();
        std::fs::create_dir(&b).unwrap();
        write_atomic(&a.join("from_a"), b"").unwrap();
        write_atomic(&b.join("from_b"), b"").unwrap();
        // ext4, xfs, btrfs and tmpfs all have it; the test machine's temporary directory too.
        assert!(exchange(&a, &b).unwrap());
        assert_eq!(names(&a), vec!["from_b"]);
        assert_eq!(names(&b), vec!["from_a"]);
    }
}
