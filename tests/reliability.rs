//! Issue 18, end to end through the binary: results files are never reused across
//! configurations or shared by two runs, signals leave no browser behind and no torn line, bad
//! inputs fail early with the file named, and `print-table` says what it skipped.
mod common;

use common::{child_groups, group_alive};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_miniwob-steer");
const TASKS: &str = "click-test,click-button,click-link";

/// One browser-and-model run at a time (2 cores).
static SERIAL: Mutex<()> = Mutex::new(());

fn run_cmd_steps(out: &Path, eval_steps: &str, extra: &[&str]) -> Command {
    let mut c = Command::new(BIN);
    c.args(["run", "--model", "smollm2-135m", "--dtype", "f32", "--tasks", TASKS, "--eval-steps", eval_steps])
        .args(["--train-steps", "2", "--coeff", "3", "--max-new-tokens", "12", "--no-progress"])
        .args(["--name", "test", "--out"])
        .arg(out)
        .args(extra)
        .env("RAYON_NUM_THREADS", "2")
        .env("RUST_LOG", "warn");
    c
}

fn stderr_of(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A result line of another model for the episode `click-test` seed 0 baseline, in the key format
/// of the harness before issue 18 (so that harness found it "done" and ran nothing).
fn foreign_line() -> String {
    serde_json::json!({
        "experiment": "test", "model": "qwen-coder-0.5b", "checkpoint": "x.gguf", "weights_hash": "0123456789abcdef",
        "dtype": "gguf", "layer": null, "hook_point": null, "coeff": 0.0, "coeff_mode": "absolute",
        "vector_hash": null, "prompt_pair": null, "vector_method": null, "task": "click-test", "seed": 0,
        "condition": "baseline", "vlm": false, "prompt_hash": "p", "output": "click ref=4", "actions": ["click ref=4"],
        "parse_failure": false, "raw_reward": 1.0, "reward": 0.9, "success": true, "steps": 1, "wall_s": 1.0,
        "tokens_in": 100, "tokens_out": 5, "harness_version": "0.1.0", "key": "click-test/0/baseline/0.0/null/null/null"
    })
    .to_string()
}

/// Issue 18.1: an --out holding another model's lines is refused, saying what differs (before:
/// "0 episodes (0 new)", exit 0); with --keep-other-configs the lines stay untouched.
#[test]
fn reusing_out_with_another_model_is_refused() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("r.jsonl");
    std::fs::write(&out, foreign_line() + "\n").unwrap();
    let o = Command::new(BIN)
        .args(["run", "--model", "smollm2-135m", "--dtype", "f32", "--tasks", "click-test", "--eval-steps", "1"])
        .args(["--base-only", "--no-progress", "--name", "test", "--out"])
        .arg(&out)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let err = stderr_of(&o);
    assert!(!o.status.success(), "a foreign results file was accepted:\n{}", String::from_utf8_lossy(&o.stdout));
    assert!(err.contains("1 result lines of another configuration"), "{err}");
    assert!(err.contains(r#"model: "qwen-coder-0.5b" in the file, "smollm2-135m" in this run"#), "{err}");
    assert!(err.contains("--keep-other-configs"), "{err}");
    assert_eq!(std::fs::read_to_string(&out).unwrap(), foreign_line() + "\n", "the file is untouched");
}

/// Issue 18.2: a second run on a results file in use fails at once (before: both ran every
/// episode, 8 lines for 4 keys).
#[test]
fn a_second_run_on_a_locked_out_fails_at_once() {
    use std::os::unix::io::AsRawFd;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("r.jsonl");
    let held = std::fs::OpenOptions::new().create(true).append(true).open(&out).unwrap();
    // SAFETY: flock(2) on a descriptor this test owns, as a running `run` holds it.
    assert_eq!(unsafe { libc::flock(held.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) }, 0);
    let t0 = Instant::now();
    let o = Command::new(BIN)
        .args(["run", "--model", "smollm2-135m", "--dtype", "f32", "--tasks", "click-test", "--eval-steps", "1"])
        .args(["--base-only", "--no-progress", "--out"])
        .arg(&out)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let err = stderr_of(&o);
    assert!(!o.status.success() && err.contains("in use by another run"), "{err}");
    assert!(t0.elapsed() < Duration::from_secs(60), "no browser or episode before the refusal");
    assert_eq!(std::fs::metadata(&out).unwrap().len(), 0);
    drop(held);
}

/// Issue 18.10: a bad --vector is reported before the model loads (here the model does not even
/// exist: before, that was the error, after the vector only after minutes of setup).
#[test]
fn a_bad_vector_is_found_before_the_model_loads() {
    let dir = tempfile::tempdir().unwrap();
    let v = dir.path().join("v.safetensors");
    std::fs::write(&v, b"not a safetensors file").unwrap();
    let o = Command::new(BIN)
        .args(["run", "--model", "/nonexistent/model.gguf", "--tasks", "click-test", "--vector"])
        .arg(&v)
        .args(["--out"])
        .arg(dir.path().join("r.jsonl"))
        .output()
        .unwrap();
    let err = stderr_of(&o);
    assert!(!o.status.success() && err.contains(v.to_str().unwrap()), "{err}");
    assert!(!err.contains("/nonexistent/model.gguf"), "the model was looked at first: {err}");
}

/// Issue 18.4: `run --print-table` says how many lines it skipped and why.
#[test]
fn print_table_reports_skipped_lines() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("r.jsonl");
    std::fs::write(&f, format!("{}\nnot json\n{{\"model\": 3}}\n", foreign_line())).unwrap();
    let o = Command::new(BIN).args(["run", "--print-table"]).arg(&f).env("RUST_LOG", "warn").output().unwrap();
    let err = stderr_of(&o);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("2 lines skipped") && err.contains("line 2:") && err.contains("line 3:"), "{err}");
    assert!(String::from_utf8_lossy(&o.stdout).contains("qwen-coder-0.5b"));
}

fn profiles_in(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("miniwob-steer-chromium-"))
        .collect()
}

/// Runs `run` until it has browsers and at least `min_lines` lines, sends `sig`, and checks the
/// exit status, that no browser process or profile is left, and that every line is whole.
/// With `nohup`, SIGHUP is first sent and must be ignored (the parent's disposition is kept).
fn signal_midway(out: &Path, tmp: &Path, sig: i32, min_lines: usize, nohup: bool, eval_steps: &str) {
    let mut cmd = run_cmd_steps(out, eval_steps, &["--concurrency", "2"]);
    cmd.env("TMPDIR", tmp).stdout(Stdio::null()).stderr(Stdio::piped());
    {
        use std::os::unix::process::CommandExt;
        // Set either way, so the test does not depend on how it was itself started.
        let hup = if nohup { libc::SIG_IGN } else { libc::SIG_DFL };
        // SAFETY: signal(2) between fork and exec is async-signal-safe.
        unsafe {
            cmd.pre_exec(move || {
                libc::signal(libc::SIGHUP, hup);
                libc::signal(libc::SIGTERM, libc::SIG_DFL);
                Ok(())
            });
        }
    }
    let mut child = cmd.spawn().unwrap();
    let t0 = Instant::now();
    let mut groups = Vec::new();
    loop {
        groups.extend(child_groups(child.id()));
        let n = std::fs::read_to_string(out).map(|s| s.lines().count()).unwrap_or(0);
        if n >= min_lines && !groups.is_empty() {
            break;
        }
        if let Some(st) = child.try_wait().unwrap() {
            let mut err = String::new();
            std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
            panic!("the run ended before the signal: {st:?}\n{err}");
        }
        assert!(t0.elapsed() < Duration::from_secs(240), "no progress after 240 s");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!profiles_in(tmp).is_empty(), "the browsers' profiles are in TMPDIR");
    if nohup {
        // SAFETY: kill(2) on the child this test started.
        assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGHUP) }, 0);
        std::thread::sleep(Duration::from_secs(2));
        if let Some(st) = child.try_wait().unwrap() {
            let mut err = String::new();
            std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
            panic!("SIGHUP was ignored by the parent, yet the run stopped: {st:?}\n{err}");
        }
    }
    // SAFETY: kill(2) on the child this test started.
    assert_eq!(unsafe { libc::kill(child.id() as i32, sig) }, 0);
    let t1 = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(t1.elapsed() < Duration::from_secs(30), "signal {sig}: still running after 30 s");
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
    groups.sort();
    groups.dedup();
    let left: Vec<i32> = groups.iter().copied().filter(|&g| group_alive(g)).collect();
    for &g in &left {
        // SAFETY: cleaning up after a failed assertion: groups this test's child created.
        unsafe { libc::kill(-g, libc::SIGKILL) };
    }
    assert_eq!(status.code(), Some(128 + sig), "signal {sig}: {status:?}\n{err}");
    assert!(left.is_empty(), "signal {sig}: browser process groups left running: {left:?}");
    assert!(profiles_in(tmp).is_empty(), "signal {sig}: profiles left: {:?}", profiles_in(tmp));
    let text = std::fs::read_to_string(out).unwrap();
    assert!(text.is_empty() || text.ends_with('\n'), "signal {sig}: torn last line");
    for l in text.lines() {
        serde_json::from_str::<serde_json::Value>(l).unwrap_or_else(|e| panic!("signal {sig}: bad line {l:?}: {e}"));
    }
}

/// Issue 18.5: SIGTERM and SIGHUP, like Ctrl-C, stop the run with 143 / 129, kill every browser,
/// remove the profiles and leave only whole lines (before: 10 processes left after SIGTERM).
#[test]
fn sigterm_and_sighup_leave_no_browser_and_no_torn_line() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let tmp = dir.path().join("tmp");
    std::fs::create_dir_all(&tmp).unwrap();
    let out = dir.path().join("r.jsonl");
    // While the vector is being computed (browsers up, no line yet).
    signal_midway(&out, &tmp, libc::SIGTERM, 0, false, "2");
    // Mid-evaluation, resuming the same file.
    signal_midway(&out, &tmp, libc::SIGHUP, 1, false, "2");
    assert_no_key_doubled(&out);
    // Under nohup: SIGHUP stays ignored, SIGTERM still cleans up. A run of its own with 60
    // episodes, so that what is left after its first line cannot finish within the 2 s the test
    // waits (the resumed 12-episode run above sometimes did, on 2 cores).
    let out = dir.path().join("nohup.jsonl");
    signal_midway(&out, &tmp, libc::SIGTERM, 1, true, "10");
    assert_no_key_doubled(&out);
}

fn assert_no_key_doubled(out: &Path) {
    let keys: Vec<String> = std::fs::read_to_string(out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["key"].as_str().unwrap().to_string())
        .collect();
    let unique: std::collections::HashSet<_> = keys.iter().collect();
    assert_eq!(unique.len(), keys.len(), "no episode doubled");
}

/// A unit vector file for smollm2-135m's shape (576 wide, 30 layers) at layer 15, with the
/// given weights hash and one value replaced.
fn vector_file(path: &Path, weights_hash: &str, poison: Option<(usize, f32)>) {
    use miniwob_steer::steering::vector::{now, SteeringVector, VectorMeta};
    let mut v = vec![0f32; 576];
    v[0] = 1.0;
    if let Some((i, x)) = poison {
        v[i] = x;
    }
    let sv = SteeringVector {
        layers: [(15, candle_core::Tensor::from_vec(v, 576, &candle_core::Device::Cpu).unwrap())].into_iter().collect(),
        meta: VectorMeta {
            model: "smollm2-135m".into(),
            checkpoint: "x".into(),
            weights_hash: weights_hash.into(),
            hidden_size: 576,
            num_layers: 30,
            method: "prompt".into(),
            pair: "accuracy".into(),
            samples: 1,
            pre_norm: Default::default(),
            mean_resid_norm: Default::default(),
            created: now(),
            read: None,
            protocol: None,
            adapter: None,
        },
    };
    sv.save(path).unwrap();
}

/// Issue 18.7: a NaN or infinite vector is refused at load, naming file, tensor and index.
#[test]
fn non_finite_vectors_are_refused_at_load() {
    use miniwob_steer::steering::vector::SteeringVector;
    let dir = tempfile::tempdir().unwrap();
    for (i, x) in [(7, f32::NAN), (300, f32::INFINITY), (575, f32::NEG_INFINITY)] {
        let p = dir.path().join(format!("v{i}.safetensors"));
        vector_file(&p, "w", Some((i, x)));
        let e = format!("{:#}", SteeringVector::load(&p).unwrap_err());
        assert!(
            e.contains(p.to_str().unwrap()) && e.contains("`layer.15`") && e.contains(&format!("at index {i}")),
            "{e}"
        );
    }
    let ok = dir.path().join("ok.safetensors");
    vector_file(&ok, "w", None);
    SteeringVector::load(&ok).unwrap();
}

/// Issue 18.10: `generate --vector` checks which model the vector was made for, as `run` does,
/// and `--allow-foreign-vector` (named in the message) exists.
#[test]
fn generate_checks_the_vectors_model() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let v = dir.path().join("v.safetensors");
    vector_file(&v, "0000000000000000", None);
    let gen = |extra: &[&str]| {
        Command::new(BIN)
            .args(["generate", "--model", "smollm2-135m", "--dtype", "f32", "--prompt", "Hi", "--max-new-tokens", "2"])
            .args(["--layer", "15", "--coeff", "2", "--vector"])
            .arg(&v)
            .args(extra)
            .env("RUST_LOG", "warn")
            .output()
            .unwrap()
    };
    let o = gen(&[]);
    let err = stderr_of(&o);
    assert!(!o.status.success(), "a vector of other weights was used silently");
    assert!(err.contains("0000000000000000") && err.contains("--allow-foreign-vector"), "{err}");
    let o = gen(&["--allow-foreign-vector"]);
    assert!(o.status.success(), "{}", stderr_of(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("coeff 2"));
}

/// Issue 18.9: a truncated GGUF's error names the file and the tensor.
#[test]
fn a_truncated_gguf_names_file_and_tensor() {
    use std::io::{Read, Write};
    let src = common::gguf_path("smollm2-135m");
    let dir = tempfile::tempdir().unwrap();
    let cut = dir.path().join("cut.gguf");
    let mut head = vec![0u8; 20 << 20];
    std::fs::File::open(&src).unwrap().read_exact(&mut head).unwrap();
    std::fs::File::create(&cut).unwrap().write_all(&head).unwrap();
    let e = match miniwob_steer::models::load::LoadedModel::load(
        cut.to_str().unwrap(),
        &candle_core::Device::Cpu,
        miniwob_steer::models::WeightDType::Gguf,
    ) {
        Ok(_) => panic!("a truncated GGUF loaded"),
        Err(e) => format!("{e:#}"),
    };
    assert!(e.contains(cut.to_str().unwrap()) && e.contains("reading tensor `"), "{e}");
}

/// Issue 15: `run --pairs FILE` reads the file (it used to be parsed and ignored): a pair defined
/// only there is found, and a broken file is an error naming it, before the model loads.
#[test]
fn run_reads_the_pairs_file() {
    let tmp = tempfile::tempdir().unwrap();
    let good = tmp.path().join("mine.toml");
    std::fs::write(
        &good,
        "[[pair]]\nname = \"mine\"\ndescription = \"d\"\npositive = \"Be exact.\"\nnegative = \"Be vague.\"\n",
    )
    .unwrap();
    let bad = tmp.path().join("broken.toml");
    std::fs::write(&bad, "[[pair]]\nname = 3\n").unwrap();
    let run = |pairs: &std::path::Path, pair: &str| {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_miniwob-steer"))
            .args(["run", "--model", "/nonexistent/model.gguf", "--device", "cpu", "--tasks", "click-test"])
            .args(["--pair", pair, "--pairs"])
            .arg(pairs)
            .arg("--out")
            .arg(tmp.path().join("r.jsonl"))
            .output()
            .unwrap();
        assert!(!o.status.success());
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    // Found in the file: the run goes on to load the (missing) model.
    let e = run(&good, "mine");
    assert!(e.contains("/nonexistent/model.gguf"), "the pair should have been found in {}: {e}", good.display());
    let e = run(&bad, "mine");
    assert!(e.contains("broken.toml"), "the broken pairs file should be named: {e}");
    // The built-in pairs without the file do not know it.
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_miniwob-steer"))
        .args(["run", "--model", "/nonexistent/model.gguf", "--device", "cpu", "--tasks", "click-test"])
        .args(["--prompt-type", "mine", "--out"])
        .arg(tmp.path().join("r.jsonl"))
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("mine") && !e.contains("/nonexistent"), "{e}");
}
