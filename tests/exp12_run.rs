//! End to end on real Chromium with smollm2-135m (f32): the `run` subcommand writes one line per
//! episode with every field of docs/results-format.md, a rerun is a no-op, a run killed with
//! SIGKILL midway resumes to exactly the full set, and shards 0/3, 1/3, 2/3 are the unsharded set.
mod common;

use common::child_groups;
use miniwob_steer::experiment::plan::{expand, shard, Shard};
use std::collections::{BTreeSet, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_miniwob-steer");
const TASKS: &str = "click-test,click-button,click-link";

/// One browser-and-model run at a time (2 cores in CI).
static SERIAL: Mutex<()> = Mutex::new(());

/// Every field of docs/results-format.md.
const FIELDS: [&str; 34] = [
    "experiment",
    "model",
    "checkpoint",
    "weights_hash",
    "dtype",
    "batch_invariant",
    "layer",
    "hook_point",
    "coeff",
    "coeff_mode",
    "vector_hash",
    "prompt_pair",
    "vector_method",
    "task",
    "seed",
    "condition",
    "vlm",
    "prompt_hash",
    "output",
    "actions",
    "parse_failure",
    "raw_reward",
    "reward",
    "success",
    "steps",
    "wall_s",
    "tokens_in",
    "tokens_out",
    "vector_source",
    "max_steps",
    "max_new_tokens",
    "protocol",
    "harness_version",
    "key",
];

fn require_assets() {
    let out = Command::new(BIN).args(["tasks", "--exp12"]).output().expect("running miniwob-steer tasks");
    assert!(
        out.status.success(),
        "MiniWoB assets or browser missing: run ./scripts/setup.sh ({})",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new(BIN).args(["models", "--json"]).output().expect("running miniwob-steer models");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("models --json");
    let installed = v
        .as_array()
        .unwrap()
        .iter()
        .any(|m| m["alias"] == "smollm2-135m" && m["installed"] == serde_json::Value::Bool(true));
    assert!(installed, "smollm2-135m is not installed: run ./scripts/setup.sh");
}

fn run_cmd(out: &Path, extra: &[&str]) -> Command {
    let mut c = Command::new(BIN);
    c.args(["run", "--model", "smollm2-135m", "--dtype", "f32", "--tasks", TASKS, "--eval-steps", "2"])
        .args(["--train-steps", "2", "--coeff", "3", "--max-new-tokens", "12", "--no-progress"])
        .args(["--name", "test", "--out"])
        .arg(out)
        .args(extra)
        .env("RAYON_NUM_THREADS", "2")
        .env("RUST_LOG", "warn");
    c
}

fn run_ok(out: &Path, extra: &[&str]) -> String {
    let o = run_cmd(out, extra).args(["--concurrency", "2"]).output().expect("spawning miniwob-steer run");
    let stdout = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(o.status.success(), "run failed:\n{stdout}\n{}", String::from_utf8_lossy(&o.stderr));
    stdout
}

fn lines(p: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(p)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad line {l:?}: {e}")))
        .collect()
}

fn keys(p: &Path) -> Vec<String> {
    lines(p).iter().map(|v| v["key"].as_str().unwrap().to_string()).collect()
}

fn pairs_of(p: &Path) -> BTreeSet<(String, u64, String)> {
    lines(p)
        .iter()
        .map(|v| {
            (v["task"].as_str().unwrap().into(), v["seed"].as_u64().unwrap(), v["condition"].as_str().unwrap().into())
        })
        .collect()
}

fn expected_set() -> BTreeSet<(String, u64, String)> {
    let mut s = BTreeSet::new();
    for t in TASKS.split(',') {
        for seed in 0..2 {
            for c in ["baseline", "steered"] {
                s.insert((t.to_string(), seed, c.to_string()));
            }
        }
    }
    s
}

#[test]
fn quick_run_writes_every_field_and_rerun_is_a_noop() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    require_assets();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("r.jsonl");
    let summary = dir.path().join("summary.json");
    let stdout = run_ok(&out, &["--summary-json", summary.to_str().unwrap()]);
    assert!(stdout.contains("summary:"), "{stdout}");
    let ls = lines(&out);
    assert_eq!(ls.len(), 12, "3 tasks × 2 seeds × 2 conditions");
    for l in &ls {
        let o = l.as_object().unwrap();
        for f in FIELDS {
            assert!(o.contains_key(f), "missing field {f} in {l}");
        }
        assert_eq!(l["model"], "smollm2-135m");
        assert_eq!(l["experiment"], "test");
        assert_eq!(l["dtype"], "f32");
        assert_eq!(l["batch_invariant"], true);
        assert_eq!(l["layer"], 15);
        assert_eq!(l["hook_point"], "blocks.15.hook_resid_post");
        assert_eq!(l["prompt_pair"], "accuracy");
        assert_eq!(l["vector_method"], "prompt");
        assert_eq!(l["weights_hash"].as_str().unwrap().len(), 16);
        assert_eq!(l["prompt_hash"].as_str().unwrap().len(), 16);
        assert!(l["vector_hash"].as_str().is_some_and(|h| !h.is_empty()));
        assert_eq!(l["vector_source"], "caa:n=2,seed=0");
        assert_eq!((l["max_steps"].as_u64(), l["max_new_tokens"].as_u64()), (Some(1), Some(12)));
        let steered = l["condition"] == "steered";
        assert_eq!(l["coeff"].as_f64().unwrap(), if steered { 3.0 } else { 0.0 });
        assert_eq!(l["success"].as_bool().unwrap(), l["raw_reward"].as_f64().unwrap() > 0.0);
        assert!(l["steps"].as_u64().unwrap() >= 1 && l["tokens_in"].as_u64().unwrap() > 50);
        assert!(l["tokens_out"].as_u64().unwrap() <= 12);
        // A parse failure has no actions; a parsed answer has at least one.
        assert_eq!(l["parse_failure"].as_bool().unwrap(), l["actions"].as_array().unwrap().is_empty());
    }
    assert_eq!(pairs_of(&out), expected_set());
    // Baseline and steered rows of one (task, seed) saw the same prompt.
    for t in TASKS.split(',') {
        let h: HashSet<&str> = ls
            .iter()
            .filter(|l| l["task"] == t && l["seed"] == 0)
            .map(|l| l["prompt_hash"].as_str().unwrap())
            .collect();
        assert_eq!(h.len(), 1, "{t}");
    }
    let s: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&summary).unwrap()).unwrap();
    assert_eq!(s["episodes"], 12);
    assert_eq!(s["new_episodes"], 12);
    assert_eq!(s["baseline"]["episodes"], 6);
    assert_eq!(s["steered"][0]["episodes"], 6);

    let before = std::fs::read(&out).unwrap();
    let t0 = Instant::now();
    let stdout = run_ok(&out, &["--summary-json", summary.to_str().unwrap()]);
    assert_eq!(std::fs::read(&out).unwrap(), before, "a rerun must not touch the file");
    let s: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&summary).unwrap()).unwrap();
    assert_eq!(s["new_episodes"], 0, "{stdout}");
    assert_eq!(s["episodes"], 12);
    assert!(t0.elapsed() < Duration::from_secs(60));
}

#[test]
fn sigkill_midway_then_restart_gives_exactly_the_full_set() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    require_assets();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("k.jsonl");
    let mut child = run_cmd(&out, &["--concurrency", "1"]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let t0 = Instant::now();
    let mut groups = Vec::new();
    loop {
        groups.extend(child_groups(child.id()));
        let n = std::fs::read_to_string(&out).map(|s| s.lines().count()).unwrap_or(0);
        if n >= 3 {
            break;
        }
        assert!(child.try_wait().unwrap().is_none(), "the run ended before it could be killed");
        assert!(t0.elapsed() < Duration::from_secs(240), "no result lines after 240 s");
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    groups.sort();
    groups.dedup();
    for g in groups {
        let _ = Command::new("kill").args(["-9", "--", &format!("-{g}")]).stderr(Stdio::null()).status();
    }
    let at_kill = keys(&out).len();
    assert!((3..12).contains(&at_kill), "killed with {at_kill} lines: not midway");
    // Simulate a write torn by the kill as well.
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new().append(true).open(&out).unwrap();
        f.write_all(br#"{"experiment":"test","model":"smollm2-135m","task":"click-li"#).unwrap();
    }
    run_ok(&out, &[]);
    let ks = keys(&out);
    assert_eq!(ks.len(), 12, "exactly the full set");
    assert_eq!(ks.iter().collect::<HashSet<_>>().len(), 12, "no duplicates");
    assert_eq!(pairs_of(&out), expected_set());
    assert!(std::fs::read_to_string(&out).unwrap().ends_with('\n'));
}

#[test]
fn shards_concatenate_to_the_unsharded_set() {
    // Plan level, many shapes.
    let tasks: Vec<String> = TASKS.split(',').map(String::from).collect();
    let plan = expand(&tasks, 2, 0).unwrap();
    let mut all: Vec<_> = (0..3).flat_map(|i| shard(&plan, Shard { index: i, count: 3 })).collect();
    all.sort_by_key(|it| it.index);
    assert_eq!(all, plan);

    // End to end: three shard runs (one via the Slurm variables) against the expected set.
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    require_assets();
    let dir = tempfile::tempdir().unwrap();
    let vcache = dir.path().join("v.safetensors");
    let mut union = BTreeSet::new();
    let mut total = 0;
    for i in 0..3 {
        let out = dir.path().join(format!("s{i}.jsonl"));
        let mut c = run_cmd(&out, &["--vector-cache", vcache.to_str().unwrap(), "--concurrency", "2"]);
        if i == 2 {
            c.env("SLURM_ARRAY_TASK_ID", "2").env("SLURM_ARRAY_TASK_COUNT", "3");
        } else {
            c.args(["--shard", &format!("{i}/3")]);
        }
        let o = c.output().unwrap();
        assert!(o.status.success(), "shard {i}: {}", String::from_utf8_lossy(&o.stderr));
        let p = pairs_of(&out);
        total += keys(&out).len();
        assert!(p.is_disjoint(&union), "shard {i} overlaps");
        union.extend(p);
    }
    assert_eq!(total, 12);
    assert_eq!(union, expected_set());
    let _ = PathBuf::new();
}
