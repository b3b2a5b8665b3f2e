//! Every test file of this package is a test target: cargo does not find them on its own
//! here (`autotests = false`, since this package is the `tests/` directory itself), so a
//! file not listed in `Cargo.toml` would silently never run.

use std::path::Path;

#[test]
fn every_test_file_is_a_test_target() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let manifest = std::fs::read_to_string(dir.join("Cargo.toml")).expect("read Cargo.toml");
    let mut missing = Vec::new();
    for entry in std::fs::read_dir(dir).expect("read the tests directory") {
        let name = entry.expect("directory entry").file_name();
        let name = name.to_string_lossy();
        if name.ends_with(".rs")
            && name != "lib.rs"
            && !manifest.contains(&format!("path = \"{name}\""))
        {
            missing.push(name.into_owned());
        }
    }
    assert!(
        missing.is_empty(),
        "add a [[test]] entry to tests/Cargo.toml for: {missing:?}"
    );
}
