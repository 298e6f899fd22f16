//! One module per subcommand.
pub mod ask;
pub mod bench;
pub mod eval;
pub mod index;
pub mod retrieval_eval;
pub mod version;
