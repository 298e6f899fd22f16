//! `steper-export --framework` records the student's framework in `steper.json`'s `loop`, and
//! an IRCoT export's manifest has no `framework` (as before the choice existed).

use std::path::Path;
use std::process::{Command, Output};

use anyhow::{ensure, Result};
use steper_runtime::manifest::{Manifest, MANIFEST_FILE};
use steper_runtime::{Framework, LoopOptions};

fn export(out: &Path, extra: &[&str]) -> Result<Output> {
    let student = &steper_test_support::tiny()?.student;
    Ok(Command::new(env!("CARGO_BIN_EXE_steper-export"))
        .arg("--checkpoint")
        .arg(student)
        .arg("--out")
        .arg(out)
        .args(extra)
        .output()?)
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn the_framework_flag_is_written_to_the_manifest() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let sa = dir.path().join("sa");
    let o = export(&sa, &["--framework", "self-ask"])?;
    ensure!(o.status.success(), "{}", text(&o));
    let m = Manifest::load(&sa.join(MANIFEST_FILE))?;
    assert_eq!(m.loop_defaults.framework, Framework::SelfAsk);
    assert_eq!(
        LoopOptions::from(&m.loop_defaults).framework,
        Framework::SelfAsk
    );

    let plain = dir.path().join("ircot");
    let o = export(&plain, &[])?;
    ensure!(o.status.success(), "{}", text(&o));
    let raw = std::fs::read_to_string(plain.join(MANIFEST_FILE))?;
    assert!(!raw.contains("framework"), "{raw}");
    assert_eq!(
        Manifest::load(&plain.join(MANIFEST_FILE))?
            .loop_defaults
            .framework,
        Framework::Ircot
    );

    let o = export(&dir.path().join("bad"), &["--framework", "selfask"])?;
    assert!(!o.status.success());
    let msg = text(&o);
    assert!(
        msg.contains("selfask") && msg.contains("ircot or self-ask"),
        "{msg}"
    );
    assert!(!dir.path().join("bad").join(MANIFEST_FILE).exists());
    Ok(())
}
