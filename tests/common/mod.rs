//! Helpers shared by the integration tests.
#![allow(dead_code)]
use std::path::PathBuf;

pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

pub fn fixture_json(dir: &str, file: &str) -> serde_json::Value {
    let p = fixture(dir).join(file);
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// The GGUF of a locally installed registry model. The test suite runs scripts/setup.sh first,
/// so a missing file is a broken setup, not a reason to skip.
pub fn gguf_path(alias: &str) -> PathBuf {
    match miniwob_steer::models::registry::resolve(alias) {
        Ok(r) => match r.location {
            miniwob_steer::models::registry::Location::Gguf(p) => p,
            other => panic!("{alias}: expected a GGUF, found {other:?}"),
        },
        Err(e) => panic!("{alias}: {e:#} (the tests need ./scripts/setup.sh to have run)"),
    }
}
