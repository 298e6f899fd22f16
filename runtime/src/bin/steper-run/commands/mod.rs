//! One module per subcommand.
pub mod ask;
pub mod bench;
pub mod bench_serve;
pub mod eval;
pub mod index;
pub mod retrieval_eval;
pub mod serve;
pub mod version;
