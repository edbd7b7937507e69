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

/// Process-group ids of the chromedriver children of `pid`: children that lead their own group
/// (other children, such as `git describe`, share the caller's group and are not counted).
pub fn child_groups(pid: u32) -> Vec<i32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(own) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else { continue };
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else { continue };
        // pid (comm) state ppid pgrp ...
        let Some(rest) = stat.rsplit_once(')').map(|r| r.1) else { continue };
        let f: Vec<&str> = rest.split_whitespace().collect();
        if f.len() > 2 && f[1] == pid.to_string() && f[2].parse::<i32>() == Ok(own) && own > 1 {
            out.push(own);
        }
    }
    out
}

/// Does any live (not zombie) process of group `pgid` exist? Waits up to 5 s for a group that
/// was just SIGKILLed to die.
pub fn group_alive(pgid: i32) -> bool {
    let t0 = std::time::Instant::now();
    loop {
        let alive = std::fs::read_dir("/proc").unwrap().flatten().any(|e| {
            let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else { return false };
            let Some(rest) = stat.rsplit_once(')').map(|r| r.1) else { return false };
            let f: Vec<&str> = rest.split_whitespace().collect();
            f.len() > 2 && f[0] != "Z" && f[2].parse::<i32>() == Ok(pgid)
        });
        if !alive || t0.elapsed() > std::time::Duration::from_secs(5) {
            return alive;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}
