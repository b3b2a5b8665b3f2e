//! Benchmarks of genesys-auth-layer (see BENCHMARKS.md): the bench targets of this package
//! (`hot_path.rs`, `load.rs`), no library code.
