//! Runnable examples for genesys-auth-layer (`examples/`): `cargo run --release --example quickstart`.
