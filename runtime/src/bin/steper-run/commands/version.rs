//! `steper-run version`.

/// Arguments of `version`.
#[derive(clap::Args)]
pub struct Args {
    /// Print as JSON.
    #[arg(long)]
    json: bool,
}

/// Prints the version and `ORT_DYLIB_PATH`.
pub fn run(a: Args) -> anyhow::Result<()> {
    let ort = std::env::var(steper_runtime::backend::ORT_DYLIB_ENV).ok();
    if a.json {
        println!(
            "{}",
            serde_json::json!({"steper_run": env!("CARGO_PKG_VERSION"), "ort_dylib_path": ort})
        );
    } else {
        println!("steper-run {}", env!("CARGO_PKG_VERSION"));
        println!("ORT_DYLIB_PATH: {}", ort.as_deref().unwrap_or("(unset)"));
    }
    Ok(())
}
