//! Kill-anywhere crash safety of `steper-export`: an output folder holds a good fp32 export (and
//! a file of the user's); an int8 export with external data into the same folder is SIGKILLed
//! at seeded random instants (at least
//! [`MIN_KILLS`](steper_test_support::kill::MIN_KILLS) that land while it runs, in a
//! [`Campaign`]) and started
//! again until it completes. After every kill the folder must hold exactly the previous export
//! or exactly the new one, byte for byte — never a mix (a new graph beside old external data,
//! a manifest of one beside the weights of the other) — and the user's file is kept.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{ensure, Result};
use common::*;
use serde_json::json;
use steper_test_support::kill::{copy_dir, run_to_completion, tree, tree_diff, Campaign};

/// A file of the user's in the export folder, which every export keeps.
const USER_FILE: &str = "notes.txt";

/// A checkpoint big enough that writing its export takes a while (≈ 8M parameters).
fn checkpoint(dir: &Path) -> Result<PathBuf> {
    let mut cfg = tiny_config();
    cfg.vocab_size = 4096;
    cfg.hidden_size = 256;
    cfg.intermediate_size = 704;
    cfg.num_hidden_layers = 8;
    let ck = dir.join("ckpt");
    tiny_checkpoint(&ck, &cfg, 3)?;
    Ok(ck)
}

fn export_cmd(ck: &Path, out: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_steper-export"));
    c.arg("--checkpoint")
        .arg(ck)
        .arg("--out")
        .arg(out)
        .args(args);
    c
}

const OLD: &[&str] = &[];
const NEW: &[&str] = &["--quantize", "int8", "--external-data"];

#[test]
#[ignore = "slow: kills steper-export at 20+ instants (about a minute)"]
fn an_export_killed_anywhere_leaves_the_previous_or_the_new_export_whole() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let ck = checkpoint(tmp.path())?;
    let old_ref = tmp.path().join("old");
    run_to_completion(export_cmd(&ck, &old_ref, OLD))?;
    std::fs::write(old_ref.join(USER_FILE), "kept")?;
    let new_ref = tmp.path().join("new");
    let t_ref = run_to_completion(export_cmd(&ck, &new_ref, NEW))?;
    std::fs::write(new_ref.join(USER_FILE), "kept")?;
    let (old, new) = (tree(&old_ref)?, tree(&new_ref)?);
    ensure!(
        new.contains_key(&PathBuf::from("model.onnx.data")),
        "the new export should have external data"
    );

    // Up to 1.2× the reference time, so that some kills land after the new export is in place.
    let (mut saw_old, mut saw_new) = (0usize, 0usize);
    let report = Campaign::new(0x00E4_9047, t_ref.mul_f64(1.2)).run(
        tmp.path(),
        |_, out| copy_dir(&old_ref, out),
        |out| export_cmd(&ck, out, NEW),
        |_, out| {
            let now = tree(out)?;
            if now == old {
                saw_old += 1;
            } else {
                ensure!(
                    now == new,
                    "a mixed export is in place: {:?}",
                    tree_diff(&now, &new)
                );
                saw_new += 1;
            }
            Ok(())
        },
        |_, out| {
            let done = tree(out)?;
            ensure!(done == new, "{:?}", tree_diff(&done, &new));
            Ok(())
        },
    )?;
    println!(
        "{}",
        report.summary(
            "steper-export",
            t_ref,
            json!({"previous_in_place_after_kill": saw_old, "new_in_place_after_kill": saw_new})
        )
    );
    Ok(())
}
