//! Loading the ONNX Runtime shared library once per process, and finding it.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use ::ort::environment::Environment;

use crate::error::{Error, Result};

/// ONNX Runtime version whose library `scripts/install-ort.sh` installs (matches `api-31`).
pub const ORT_VERSION: &str = "1.31.1";

/// The loaded library and its environment (a failed load leaves it empty, so the next call
/// tries again).
static ENVIRONMENT: Mutex<Option<(PathBuf, Environment)>> = Mutex::new(None);

/// The environment variable naming the ONNX Runtime library when no path is given.
pub const ORT_DYLIB_ENV: &str = "ORT_DYLIB_PATH";

/// The library to load: `library` when given, else the path in [`ORT_DYLIB_ENV`]; neither is
/// an [`Error::OrtLibraryUnset`].
pub fn library_path(library: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = library {
        return Ok(p.to_path_buf());
    }
    std::env::var_os(ORT_DYLIB_ENV)
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .ok_or(Error::OrtLibraryUnset)
}

/// Loads ONNX Runtime from `library` (see [`library_path`]) and returns its environment.
///
/// The library is loaded once per process: once one has loaded, later calls return its
/// environment whatever path they name. A load that fails is not remembered.
pub fn environment(library: Option<&Path>) -> Result<Environment> {
    let mut slot = ENVIRONMENT.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, env)) = slot.as_ref() {
        return Ok(env.clone());
    }
    let path = library_path(library)?;
    let fail = |reason: String| Error::OrtLibrary {
        path: path.clone(),
        reason,
    };
    if !path.is_file() {
        return Err(fail("file not found".into()));
    }
    let env = ::ort::init_from(&path)
        .map_err(|e| fail(e.to_string()))?
        .with_name("steper")
        .build()
        .map_err(|e| fail(e.to_string()))?;
    *slot = Some((path, env.clone()));
    Ok(env)
}

/// The copy `scripts/install-ort.sh` makes, `.cache/onnxruntime/libonnxruntime.so.<ORT_VERSION>`,
/// looked up in the current directory, then two levels above the running executable (a
/// workspace's `target/<profile>/`). The library never uses this by itself: it is the default
/// of the project's binaries ([`set_library_env`]).
pub fn installed_library() -> Option<PathBuf> {
    let rel = PathBuf::from(".cache/onnxruntime").join(format!("libonnxruntime.so.{ORT_VERSION}"));
    let beside_exe = std::env::current_exe()
        .ok()
        .and_then(|e| Some(e.parent()?.parent()?.parent()?.join(&rel)));
    std::iter::once(rel.clone())
        .chain(beside_exe)
        .find(|p| p.is_file())
}

/// For a binary's `main`, before it starts threads: sets [`ORT_DYLIB_ENV`] to `explicit` (a
/// command-line flag) when given, else, when the variable is unset, to `installed_library`
/// if there is one. Changing the environment is only sound while the process has one thread.
pub fn set_library_env(explicit: Option<PathBuf>) {
    let unset = std::env::var_os(ORT_DYLIB_ENV).is_none_or(|v| v.is_empty());
    if let Some(lib) = explicit.or_else(|| unset.then(installed_library).flatten()) {
        std::env::set_var(ORT_DYLIB_ENV, lib);
    }
}

/// The library the process has loaded, if one has.
pub fn loaded_library() -> Option<PathBuf> {
    let slot = ENVIRONMENT.lock().unwrap_or_else(|e| e.into_inner());
    slot.as_ref().map(|(p, _)| p.clone())
}
