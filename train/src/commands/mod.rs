//! One module per subcommand.
pub mod bench_fit;
pub mod distill;
pub mod fit;
pub mod generate;
pub mod import;
pub mod init_student;
pub mod plot;
pub mod synth;
