//! The ONNX Runtime library is a value: a bad path is an error naming it, a failed load is not
//! remembered, and once a library has loaded it is the process's. One test in its own binary:
//! the load is process-wide.

use std::path::PathBuf;

use steper_runtime::backend::{environment, library_path, loaded_library, ORT_DYLIB_ENV};
use steper_runtime::Error;

#[test]
fn library_is_a_value_and_a_failed_load_is_retried() -> anyhow::Result<()> {
    let real = PathBuf::from(std::env::var_os(ORT_DYLIB_ENV).ok_or_else(|| {
        anyhow::anyhow!(
            "needs {ORT_DYLIB_ENV} (scripts/test.sh sets it from scripts/install-ort.sh)"
        )
    })?);
    let bogus = std::env::temp_dir().join("steper-no-such-dir/libonnxruntime.so");
    assert_eq!(
        library_path(Some(&bogus))?,
        bogus,
        "an explicit path wins over the variable"
    );
    assert_eq!(library_path(None)?, real);

    match environment(Some(&bogus)) {
        Err(Error::OrtLibrary { path, reason }) => {
            assert_eq!(path, bogus);
            assert!(reason.contains("not found"), "{reason}");
        }
        Err(e) => anyhow::bail!("expected OrtLibrary, got {e}"),
        Ok(_) => anyhow::bail!("a missing library loaded"),
    }
    assert_eq!(loaded_library(), None, "a failed load is not kept");

    environment(Some(&real))?;
    assert_eq!(loaded_library().as_deref(), Some(real.as_path()));
    // Loaded once per process: a later call gets that library, whatever it names.
    environment(Some(&bogus))?;
    assert_eq!(loaded_library().as_deref(), Some(real.as_path()));
    Ok(())
}
