//! Exact results end to end (docs/determinism.md): `run` on 4 tasks × 5 seeds with
//! `--concurrency 1`, with `--concurrency 3`, and as shards 0/2 + 1/2 concatenated, each
//! computing its own vector, writes identical outputs, actions, successes, prompt hashes and
//! vector hashes on every line. Before, cross-episode batching made a row's logits depend on
//! what else was in flight (7–10 of 24 outputs differed between two identical runs), and the
//! vector hash changed on every write.
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::sync::Mutex;

const BIN: &str = env!("CARGO_BIN_EXE_miniwob-steer");

/// One browser-and-model job at a time (2 cores in CI).
static SERIAL: Mutex<()> = Mutex::new(());

fn run(out: &Path, extra: &[&str]) {
    let o = Command::new(BIN)
        .args(["run", "--model", "smollm2-135m", "--tasks", "click-test,click-button,focus-text,click-link"])
        .args(["--eval-steps", "5", "--train-steps", "3", "--coeff", "4", "--max-new-tokens", "16", "--no-progress"])
        .args(["--name", "exact", "--out"])
        .arg(out)
        .args(extra)
        .env("RUST_LOG", "warn")
        .output()
        .expect("spawning miniwob-steer run");
    assert!(
        o.status.success(),
        "run {extra:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// key → the fields that must not move between runs.
fn outcomes(files: &[&Path]) -> BTreeMap<String, serde_json::Value> {
    let mut m = BTreeMap::new();
    for f in files {
        let text = std::fs::read_to_string(f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        for line in text.lines() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            let key = v["key"].as_str().unwrap().to_string();
            let kept = serde_json::json!({
                "output": v["output"], "actions": v["actions"], "success": v["success"],
                "raw_reward": v["raw_reward"], "prompt_hash": v["prompt_hash"], "vector_hash": v["vector_hash"],
                "tokens_out": v["tokens_out"],
            });
            assert!(m.insert(key.clone(), kept).is_none(), "{key} written twice");
        }
    }
    m
}

#[test]
fn concurrency_and_shards_do_not_change_a_single_output() {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name);
    run(&p("c1.jsonl"), &["--concurrency", "1"]);
    run(&p("c3.jsonl"), &["--concurrency", "3"]);
    run(&p("s0.jsonl"), &["--concurrency", "2", "--shard", "0/2"]);
    run(&p("s1.jsonl"), &["--concurrency", "2", "--shard", "1/2"]);
    let one = outcomes(&[&p("c1.jsonl")]);
    assert_eq!(one.len(), 4 * 5 * 2, "4 tasks × 5 seeds × baseline/steered");
    let vh: Vec<_> = one.values().map(|v| v["vector_hash"].clone()).collect();
    assert!(vh.iter().all(|h| h.is_string() && *h == vh[0]), "one vector per run: {vh:?}");
    for (name, other) in
        [("--concurrency 3", outcomes(&[&p("c3.jsonl")])), ("shards", outcomes(&[&p("s0.jsonl"), &p("s1.jsonl")]))]
    {
        assert_eq!(other.keys().collect::<Vec<_>>(), one.keys().collect::<Vec<_>>(), "{name}: the same episodes");
        let differ: Vec<String> = one
            .iter()
            .filter(|(k, v)| other[*k] != **v)
            .map(|(k, v)| format!("{k}:\n  concurrency 1: {v}\n  {name}: {}", other[k]))
            .collect();
        assert!(differ.is_empty(), "{name}: {} of {} lines differ:\n{}", differ.len(), one.len(), differ.join("\n"));
    }
}

/// `./run_exp12.sh --quick` twice from clean result directories: the same paired table and the
/// same lines (before: Δ +8.3, 0 and +16.7 pp on three runs of the same code).
#[test]
fn the_quick_job_twice_gives_identical_paired_tables() {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let quick = |name: &str| -> (String, BTreeMap<String, serde_json::Value>) {
        let results = dir.path().join(name);
        let o = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/run_exp12.sh"))
            .arg("--quick")
            .env("MINIWOB_STEER_BIN", BIN)
            .env("RESULTS_DIR", &results)
            .env("RUST_LOG", "warn")
            .output()
            .expect("running run_exp12.sh");
        let stdout = String::from_utf8_lossy(&o.stdout).to_string();
        assert!(o.status.success(), "run_exp12.sh --quick failed:\n{stdout}\n{}", String::from_utf8_lossy(&o.stderr));
        let table = stdout.split_once("== paired table").map(|(_, t)| t.to_string()).expect("a paired table");
        // The one results file of the run (named after the layer as the sweep writes it).
        let dir = results.join("quick/qwen-coder-0.5b");
        let files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "jsonl"))
            .collect();
        assert_eq!(files.len(), 1, "one results file in {}: {files:?}", dir.display());
        (table.replace(results.to_str().unwrap(), "RESULTS"), outcomes(&[&files[0]]))
    };
    let (t1, l1) = quick("a");
    let (t2, l2) = quick("b");
    assert_eq!(l1.len(), 4 * 3 * 2, "4 tasks × 3 seeds × baseline/steered");
    assert_eq!(l1, l2, "the two quick runs wrote different outcomes");
    assert_eq!(t1, t2, "the two quick runs printed different paired tables");
}
