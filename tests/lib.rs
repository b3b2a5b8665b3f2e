//! Cross-crate integration tests of genesys-auth-layer against genesys-fake: the test
//! targets of this package (one per file beside this one), no library code.
