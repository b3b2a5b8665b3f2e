//! Examples, integration tests and benchmarks for genesys-auth-layer.
