//! The libFuzzer entry point: `STEPER_FUZZ_TARGET` names the target (see `steper_fuzz::Target`),
//! `STEPER_FUZZ_DIR` the scratch folder its inputs are written to.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use steper_fuzz::{Harness, Target};

fn setup() -> &'static (Target, Harness) {
    static SETUP: OnceLock<(Target, Harness)> = OnceLock::new();
    SETUP.get_or_init(|| {
        // libfuzzer-sys's panic hook aborts on every panic, also one a parser catches and turns
        // into its error (the tokenizer.json loaders do, for a panic of the tokenizers crate).
        // With the default hook back, a panic is a crash when it escapes the target: libfuzzer-sys
        // aborts on a panicking target.
        drop(std::panic::take_hook());
        let name = std::env::var("STEPER_FUZZ_TARGET").unwrap_or_default();
        let target = Target::from_name(&name).unwrap_or_else(|| {
            let names: Vec<&str> = Target::ALL.iter().map(|t| t.name()).collect();
            eprintln!("STEPER_FUZZ_TARGET={name:?}: expected one of {names:?}");
            std::process::exit(2)
        });
        let dir = std::env::var_os("STEPER_FUZZ_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                std::env::temp_dir().join(format!("steper-fuzz-{}", std::process::id()))
            });
        let harness = Harness::new(&dir).unwrap_or_else(|e| {
            eprintln!("{}: {e}", dir.display());
            std::process::exit(2)
        });
        (target, harness)
    })
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let (target, harness) = setup();
    if let Err(e) = harness.run(*target, data) {
        eprintln!("harness: {e}");
        std::process::exit(2)
    }
});
