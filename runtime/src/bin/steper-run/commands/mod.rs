//! One module per subcommand.
pub mod ask;
pub mod bench;
pub mod bench_serve;
pub mod bench_soak;
pub mod compare;
pub mod data;
pub mod eval;
pub mod index;
pub mod retrieval_eval;
pub mod serve;
pub mod version;

/// Intra-op threads of each of `workers` sessions: `threads` when given, else the machine's
/// cores split evenly between the workers (at least one each).
pub fn threads_per_worker(threads: Option<usize>, workers: usize) -> usize {
    threads.unwrap_or_else(|| {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        (cores / workers.max(1)).max(1)
    })
}

/// Prints a warning for each execution provider the backend skipped (`--allow-fallback`).
pub fn warn_fallbacks(info: &steper_runtime::GeneratorInfo) {
    for f in &info.fallbacks {
        eprintln!(
            "warning: {} not registered ({}); falling back",
            f.provider, f.reason
        );
    }
}
