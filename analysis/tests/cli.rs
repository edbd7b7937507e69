//! End-to-end tests of the `analyze` binary on synthetic result files with hand-computed numbers.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_analyze"))
}

fn run(args: &[&str]) -> Output {
    bin().args(args).output().expect("run analyze")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// One result line (the contract's fields; `layer`/`prompt_pair`/... null when None).
#[allow(clippy::too_many_arguments)]
fn line(
    model: &str,
    layer: Option<i64>,
    coeff: f64,
    pp: Option<&str>,
    task: &str,
    seed: u64,
    steered: bool,
    success: bool,
    pf: bool,
    steps: u32,
    tok: u32,
    vh: Option<&str>,
) -> String {
    let js = |s: Option<&str>| s.map_or("null".to_string(), |s| format!("\"{s}\""));
    let cond = if steered { "steered" } else { "baseline" };
    let vm = if pp.is_some() { Some("prompt") } else { None };
    format!(
        concat!(
            "{{\"experiment\":\"t\",\"model\":\"{model}\",\"checkpoint\":\"c\",\"weights_hash\":\"w\",\"dtype\":\"f32\",",
            "\"layer\":{layer},\"hook_point\":null,\"coeff\":{coeff},\"coeff_mode\":\"absolute\",\"vector_hash\":{vh},",
            "\"prompt_pair\":{pp},\"vector_method\":{vm},\"task\":\"{task}\",\"seed\":{seed},\"condition\":\"{cond}\",",
            "\"vlm\":false,\"prompt_hash\":\"p\",\"output\":\"click ref=1\\n---\\n\\\"x\\\"\",\"actions\":[\"click ref=1\"],",
            "\"parse_failure\":{pf},\"raw_reward\":{rr},\"reward\":{rr},\"success\":{success},\"steps\":{steps},",
            "\"wall_s\":1.0,\"tokens_in\":100,\"tokens_out\":{tok},\"harness_version\":\"v\",\"key\":\"k\"}}\n"
        ),
        model = model,
        layer = layer.map_or("null".into(), |l| l.to_string()),
        coeff = coeff,
        vh = js(vh),
        pp = js(pp),
        vm = js(vm),
        task = task,
        seed = seed,
        cond = cond,
        pf = pf,
        rr = if success { 1.0 } else { -1.0 },
        success = success,
        steps = steps,
        tok = tok,
    )
}

/// Minimal CSV reader (quoted fields allowed): rows as header → value maps.
fn read_csv(path: &Path) -> Vec<HashMap<String, String>> {
    let text = fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let parse = |l: &str| -> Vec<String> {
        let mut out = vec![];
        let mut cur = String::new();
        let mut q = false;
        let mut chars = l.chars().peekable();
        while let Some(c) = chars.next() {
            match (c, q) {
                ('"', true) if chars.peek() == Some(&'"') => {
                    cur.push('"');
                    chars.next();
                }
                ('"', _) => q = !q,
                (',', false) => out.push(std::mem::take(&mut cur)),
                _ => cur.push(c),
            }
        }
        out.push(cur);
        out
    };
    let mut lines = text.lines();
    let header = parse(lines.next().expect("header"));
    lines.map(|l| header.iter().cloned().zip(parse(l)).collect()).collect()
}

fn f(row: &HashMap<String, String>, k: &str) -> f64 {
    row.get(k).unwrap_or_else(|| panic!("no column {k}")).parse().unwrap_or_else(|_| panic!("{k}={:?}", row[k]))
}

/// A fresh directory under the target dir's tmp (removed on drop).
struct TmpDir(PathBuf);

impl TmpDir {
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TmpDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn tmp() -> TmpDir {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let base = option_env!("CARGO_TARGET_TMPDIR").map(PathBuf::from).unwrap_or_else(std::env::temp_dir);
    let p = base.join(format!("analyze-test-{}-{}", std::process::id(), N.fetch_add(1, Ordering::SeqCst)));
    let _ = fs::remove_dir_all(&p);
    fs::create_dir_all(&p).unwrap();
    TmpDir(p)
}

/// 20 paired units (two tasks × 10 seeds) shared by coefficients 2 and 4, plus a base-only model.
fn known_counts_file(dir: &Path) -> PathBuf {
    let mut s = String::new();
    let m = "qwen-coder-0.5b";
    for u in 0..20u64 {
        let task = if u < 10 { "click-button" } else { "enter-text" };
        let seed = u % 10;
        let base = u < 10;
        // coeff 2: units 0..6 both succeed, 6..10 baseline only (b = 4), 10..18 steered only (c = 8), 18..20 neither
        let s2 = u < 6 || (10..18).contains(&u);
        // coeff 4: only units 10, 11 succeed: b = 10, c = 2
        let s4 = u == 10 || u == 11;
        s += &line(m, Some(12), 0.0, Some("accuracy"), task, seed, false, base, u < 3, 1, 10, Some("v1"));
        s += &line(
            m,
            Some(12),
            2.0,
            Some("accuracy"),
            task,
            seed,
            true,
            s2,
            u < 5,
            if u < 10 { 2 } else { 4 },
            30,
            Some("v1"),
        );
        s += &line(m, Some(12), 4.0, Some("accuracy"), task, seed, true, s4, false, 1, 40, Some("v1"));
    }
    // a --base-only run of another model: 5 episodes, 2 successes
    for seed in 0..5u64 {
        s += &line("smollm2-135m", None, 0.0, None, "click-button", seed, false, seed < 2, false, 1, 7, None);
    }
    // an unknown model (a path), base-only
    s += &line("/models/custom", None, 0.0, None, "click-button", 0, false, true, false, 1, 7, None);
    let p = dir.join("results").join("t");
    fs::create_dir_all(&p).unwrap();
    let file = p.join("run.jsonl");
    fs::write(&file, s).unwrap();
    dir.join("results")
}

fn find<'a>(rows: &'a [HashMap<String, String>], conds: &[(&str, &str)]) -> &'a HashMap<String, String> {
    let hits: Vec<_> =
        rows.iter().filter(|r| conds.iter().all(|(k, v)| r.get(*k).map(String::as_str) == Some(*v))).collect();
    assert_eq!(hits.len(), 1, "rows matching {conds:?}: {hits:?}");
    hits[0]
}

#[test]
fn table_numbers_match_hand_computed_values() {
    let d = tmp();
    let results = known_counts_file(d.path());
    let out = d.path().join("out");
    let o = run(&[results.to_str().unwrap(), "--out", out.to_str().unwrap(), "--no-plots"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let rows = read_csv(&out.join("comparison.csv"));
    assert_eq!(rows.len(), 4, "{rows:?}"); // coeff 2, coeff 4, two base-only models

    let c2 = find(&rows, &[("model", "qwen-coder-0.5b"), ("coeff", "2.0")]);
    assert_eq!(c2["layer"], "12");
    assert_eq!(c2["prompt_pair"], "accuracy");
    assert_eq!(f(c2, "episodes"), 20.0);
    assert_eq!(f(c2, "baseline_success"), 0.5);
    assert_eq!(f(c2, "steered_success"), 0.7);
    assert!((f(c2, "delta") - 0.2).abs() < 1e-12);
    assert_eq!(f(c2, "mcnemar_p"), 0.3876953125);
    assert_eq!(f(c2, "baseline_only_success"), 4.0);
    assert_eq!(f(c2, "steered_only_success"), 8.0);
    assert_eq!(f(c2, "baseline_parse_fail"), 0.15);
    assert_eq!(f(c2, "steered_parse_fail"), 0.25);
    assert_eq!(f(c2, "baseline_mean_steps"), 1.0);
    assert_eq!(f(c2, "steered_mean_steps"), 3.0);
    assert_eq!(f(c2, "baseline_mean_tokens_out"), 10.0);
    assert_eq!(f(c2, "steered_mean_tokens_out"), 30.0);
    assert!(f(c2, "ci_low") < 0.2 && 0.2 < f(c2, "ci_high"), "{c2:?}");

    // the same baselines pair with coeff 4
    let c4 = find(&rows, &[("model", "qwen-coder-0.5b"), ("coeff", "4.0")]);
    assert_eq!(f(c4, "episodes"), 20.0);
    assert_eq!(f(c4, "baseline_success"), 0.5);
    assert_eq!(f(c4, "steered_success"), 0.1);
    assert!((f(c4, "delta") + 0.4).abs() < 1e-12);
    assert_eq!(f(c4, "mcnemar_p"), 0.03857421875);
    assert!(f(c4, "ci_high") < 0.0, "{c4:?}");

    // base-only: baseline success, steered and Δ empty
    let b = find(&rows, &[("model", "smollm2-135m")]);
    assert_eq!(f(b, "episodes"), 5.0);
    assert_eq!(f(b, "baseline_success"), 0.4);
    for k in ["steered_success", "delta", "ci_low", "ci_high", "mcnemar_p", "steered_parse_fail"] {
        assert_eq!(b[k], "", "{k}");
    }
    assert_eq!(b["layer"], "");

    // sorted: model names, then coefficient
    let order: Vec<(&str, &str)> = rows.iter().map(|r| (r["model"].as_str(), r["coeff"].as_str())).collect();
    assert_eq!(
        order,
        vec![
            ("/models/custom", "0.0"),
            ("qwen-coder-0.5b", "2.0"),
            ("qwen-coder-0.5b", "4.0"),
            ("smollm2-135m", "0.0")
        ]
    );

    // per task: click-button b = 4, c = 0; enter-text b = 0, c = 8 (coeff 2)
    let tasks = read_csv(&out.join("per_task.csv"));
    let cb = find(&tasks, &[("coeff", "2.0"), ("task", "click-button")]);
    assert_eq!((f(cb, "episodes"), f(cb, "baseline_success"), f(cb, "steered_success")), (10.0, 1.0, 0.6));
    assert_eq!(f(cb, "mcnemar_p"), 0.125);
    let et = find(&tasks, &[("coeff", "2.0"), ("task", "enter-text")]);
    assert_eq!((f(et, "baseline_success"), f(et, "steered_success")), (0.0, 0.8));
    assert_eq!(f(et, "mcnemar_p"), 0.0078125);

    // model table: registry family and size, "?" for unknown models
    let models = read_csv(&out.join("models.csv"));
    let q = find(&models, &[("model", "qwen-coder-0.5b")]);
    assert_eq!((q["family"].as_str(), q["params"].as_str(), q["layers"].as_str()), ("Qwen2.5-Coder", "0.5B", "24"));
    assert_eq!(f(q, "baseline_episodes"), 20.0);
    assert_eq!(f(q, "baseline_success"), 0.5);
    assert_eq!(f(q, "steered_episodes"), 40.0);
    assert_eq!(f(q, "steered_success"), 0.4);
    assert!((f(q, "best_delta") - 0.2).abs() < 1e-12);
    assert!(q["best_config"].contains("coeff=2"), "{q:?}");
    let u = find(&models, &[("model", "/models/custom")]);
    assert_eq!((u["family"].as_str(), u["params"].as_str()), ("?", "?"));

    // markdown on stdout and in files
    let md = stdout(&o);
    assert!(md.contains("| qwen-coder-0.5b | 12 | 2 | accuracy | 20 | 50.0% | 70.0% | +20.0 |"), "{md}");
    assert!(md.contains("| smollm2-135m | — | 0 | — | 5 | 40.0% |  |  |"), "{md}");
    assert!(fs::read_to_string(out.join("comparison.md")).unwrap().contains("McNemar p"));
    assert!(out.join("report.md").exists() && out.join("per_task.md").exists() && out.join("models.md").exists());
}

#[test]
fn bootstrap_is_seeded_and_resamples_flag_changes_it() {
    let d = tmp();
    let results = known_counts_file(d.path());
    let ci = |extra: &[&str], name: &str| {
        let out = d.path().join(name);
        let mut args = vec![results.to_str().unwrap(), "--out", out.to_str().unwrap(), "--no-plots", "-q"];
        args.extend_from_slice(extra);
        assert!(run(&args).status.success());
        let rows = read_csv(&out.join("comparison.csv"));
        let r = find(&rows, &[("coeff", "2.0")]);
        (r["ci_low"].clone(), r["ci_high"].clone())
    };
    assert_eq!(ci(&[], "a"), ci(&[], "b"));
    assert_ne!(ci(&[], "a"), ci(&["--seed", "99"], "c"));
}

#[test]
fn malformed_lines_are_counted_with_line_numbers() {
    let d = tmp();
    let good_b = line("m", Some(3), 0.0, Some("accuracy"), "click-button", 1, false, true, false, 1, 5, Some("h"));
    let good_s = line("m", Some(3), 1.0, Some("accuracy"), "click-button", 1, true, false, false, 1, 5, Some("h"));
    let good_b2 = line("m", Some(3), 0.0, Some("accuracy"), "click-button", 2, false, false, false, 1, 5, Some("h"));
    let mut s = String::new();
    s += &good_b; // 1
    s += &good_s; // 2
    s += "{\"experiment\": \"t\", \"model\n"; // 3 malformed
    s += &good_b2; // 4
    s += &good_s.replace("\"success\":false,", ""); // 5 missing field
    s += "\n"; // 6 blank: ignored
    s += &good_s.replace("\"seed\":1", "\"seed\":\"x\""); // 7 wrong type
    s += &good_s.replace("\"condition\":\"steered\"", "\"condition\":\"both\""); // 8 bad value
    s += "{\"experiment\":\"t\",\"mod"; // 9 torn last line, no newline
    let file = d.path().join("bad.jsonl");
    fs::write(&file, s).unwrap();
    let out = d.path().join("out");
    let o = run(&[file.to_str().unwrap(), "--out", out.to_str().unwrap(), "--no-plots", "-q"]);
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("5 input lines skipped"), "{err}");
    for want in [
        "bad.jsonl:3: malformed JSON",
        "bad.jsonl:5: missing field: missing field `success`",
        "bad.jsonl:7: wrong type",
        "bad.jsonl:8: bad value",
        "bad.jsonl:9: torn last line",
    ] {
        assert!(err.contains(want), "missing {want:?} in\n{err}");
    }
    let probs = read_csv(&out.join("problems.csv"));
    let got: Vec<(String, String)> = probs.iter().map(|r| (r["line"].clone(), r["kind"].clone())).collect();
    let want: Vec<(String, String)> = [
        ("3", "malformed JSON"),
        ("5", "missing field"),
        ("7", "wrong type"),
        ("8", "bad value"),
        ("9", "torn last line"),
    ]
    .iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect();
    assert_eq!(got, want);
    // the good lines were kept: 1 paired unit (seed 1) and 1 baseline-only (seed 2)
    let rows = read_csv(&out.join("comparison.csv"));
    let paired = find(&rows, &[("coeff", "1.0")]);
    assert_eq!((f(paired, "episodes"), f(paired, "baseline_success"), f(paired, "steered_success")), (1.0, 1.0, 0.0));
    // --strict turns rejected lines into a failure exit
    let o = run(&[file.to_str().unwrap(), "--out", out.to_str().unwrap(), "--no-plots", "-q", "--strict"]);
    assert_eq!(o.status.code(), Some(3));
}

#[test]
fn incompatible_vector_hashes_are_reported_and_kept_apart() {
    let d = tmp();
    let mut a = String::new();
    let mut b = String::new();
    for seed in 0..4u64 {
        // run a: baselines succeed, steered fail; run b: the reverse. Pairing across runs would give Δ = 0.
        a += &line("m", Some(5), 0.0, Some("accuracy"), "click-button", seed, false, true, false, 1, 5, Some("aaaa"));
        a += &line("m", Some(5), 2.0, Some("accuracy"), "click-button", seed, true, false, false, 1, 5, Some("aaaa"));
        b += &line("m", Some(5), 0.0, Some("accuracy"), "click-button", seed, false, false, false, 1, 5, Some("bbbb"));
        b += &line("m", Some(5), 2.0, Some("accuracy"), "click-button", seed, true, true, false, 1, 5, Some("bbbb"));
    }
    fs::write(d.path().join("a.jsonl"), a).unwrap();
    fs::write(d.path().join("b.jsonl"), b).unwrap();
    let out = d.path().join("out");
    let o = run(&[d.path().to_str().unwrap(), "--out", out.to_str().unwrap(), "--no-plots", "-q"]);
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("8 incompatible runs"), "{err}"); // 4 baseline + 4 steered keys
    assert!(err.contains("a.jsonl:2 (aaaa) vs") && err.contains("b.jsonl:2 (bbbb)"), "{err}");
    let rows = read_csv(&out.join("comparison.csv"));
    assert_eq!(rows.len(), 2, "not averaged: one row per vector hash: {rows:?}");
    let ra = find(&rows, &[("mixed_vector_hash", "aaaa")]);
    let rb = find(&rows, &[("mixed_vector_hash", "bbbb")]);
    let nums = |r: &HashMap<String, String>| {
        (f(r, "episodes"), f(r, "baseline_success"), f(r, "steered_success"), f(r, "delta"))
    };
    assert_eq!(nums(ra), (4.0, 1.0, 0.0, -1.0));
    assert_eq!(nums(rb), (4.0, 0.0, 1.0, 1.0));
    assert_eq!(read_csv(&out.join("conflicts.csv")).len(), 8);
    let models = read_csv(&out.join("models.csv"));
    assert_eq!(f(find(&models, &[("model", "m")]), "incompatible_runs"), 8.0);
    assert!(fs::read_to_string(out.join("comparison.md")).unwrap().contains("⚠ aaaa"));
    assert_eq!(
        run(&[d.path().to_str().unwrap(), "--out", out.to_str().unwrap(), "--no-plots", "-q", "--strict"])
            .status
            .code(),
        Some(3)
    );
}

#[test]
fn duplicate_lines_are_counted_once() {
    let d = tmp();
    let b = line("m", Some(5), 0.0, Some("accuracy"), "click-button", 0, false, true, false, 1, 5, Some("h"));
    let s = line("m", Some(5), 2.0, Some("accuracy"), "click-button", 0, true, true, false, 1, 5, Some("h"));
    let file = d.path().join("dup.jsonl");
    fs::write(&file, format!("{b}{s}{b}{s}")).unwrap();
    let out = d.path().join("out");
    let o = run(&[file.to_str().unwrap(), "--out", out.to_str().unwrap(), "--no-plots", "-q"]);
    assert!(o.status.success());
    assert!(stderr(&o).contains("2 duplicate episode lines ignored"), "{}", stderr(&o));
    let rows = read_csv(&out.join("comparison.csv"));
    assert_eq!(rows.len(), 1);
    assert_eq!(f(&rows[0], "episodes"), 1.0);
}

#[test]
fn empty_input_exits_non_zero() {
    let d = tmp();
    let empty = d.path().join("empty.jsonl");
    fs::write(&empty, "").unwrap();
    let o = run(&[empty.to_str().unwrap(), "--out", d.path().join("o").to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("no episodes found"), "{}", stderr(&o));

    let dir = d.path().join("nothing");
    fs::create_dir_all(&dir).unwrap();
    let o = run(&[dir.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("no episodes found"), "{}", stderr(&o));

    // only bad lines: still no episodes
    let bad = d.path().join("bad.jsonl");
    fs::write(&bad, "{oops\n").unwrap();
    let o = run(&[bad.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("malformed JSON"));

    let o = run(&[d.path().join("missing.jsonl").to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("does not exist"), "{}", stderr(&o));
}

/// Width and height from a PNG's IHDR chunk, after checking the signature.
fn png_size(path: &Path) -> (u32, u32) {
    let b = fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(b.len() > 33, "too short");
    assert_eq!(&b[..8], b"\x89PNG\r\n\x1a\n", "PNG signature");
    assert_eq!(&b[12..16], b"IHDR");
    let be = |i: usize| u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    assert_eq!(&b[b.len() - 8..b.len() - 4], b"IEND", "PNG end chunk");
    (be(16), be(20))
}

#[test]
fn plots_are_800x500_pngs() {
    let d = tmp();
    let file = d.path().join("synth.jsonl");
    let o = run(&["synth", "--lines", "3000", "--out", file.to_str().unwrap(), "--tasks", "8"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = d.path().join("out");
    let o = run(&[file.to_str().unwrap(), "--out", out.to_str().unwrap(), "-q"]);
    assert!(o.status.success(), "{}", stderr(&o));
    // scripts/setup.sh installs fonts-dejavu-core; only a machine without any font may skip the plots
    // (the binary then says so and still writes the tables).
    let dejavu = Path::new("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf").exists();
    if !dejavu && stderr(&o).contains("plots skipped: no usable TrueType font") {
        assert!(out.join("comparison.csv").exists());
        eprintln!("no TrueType font on this machine: PNG checks skipped");
        return;
    }
    for name in ["delta_vs_layer.png", "delta_vs_coeff.png", "task_success.png"] {
        assert_eq!(png_size(&out.join(name)), (800, 500), "{name}");
        assert!(fs::metadata(out.join(name)).unwrap().len() > 5_000, "{name} looks blank");
    }
}

#[test]
fn synth_then_analyze_counts_every_line() {
    let d = tmp();
    let file = d.path().join("synth.jsonl");
    assert!(run(&["synth", "--lines", "3000", "--out", file.to_str().unwrap(), "--seed", "4"]).status.success());
    assert_eq!(fs::read_to_string(&file).unwrap().lines().count(), 3000);
    let out = d.path().join("out");
    let o = run(&[file.to_str().unwrap(), "--out", out.to_str().unwrap(), "-q", "--no-plots"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let rows = read_csv(&out.join("comparison.csv"));
    // 3 models × 2 layers × 2 coefficients; 1000 baselines each shared by 2 coefficients
    assert_eq!(rows.len(), 12, "{rows:?}");
    let total: f64 = rows.iter().map(|r| f(r, "episodes")).sum();
    assert_eq!(total, 2000.0);
}

#[test]
fn parquet_round_trip_gives_the_same_tables() {
    let d = tmp();
    let results = known_counts_file(d.path());
    let pq = d.path().join("all.parquet");
    let o = run(&["convert", results.to_str().unwrap(), "--out", pq.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let (o1, o2) = (d.path().join("o1"), d.path().join("o2"));
    assert!(run(&[results.to_str().unwrap(), "--out", o1.to_str().unwrap(), "-q", "--no-plots"]).status.success());
    let o = run(&[pq.to_str().unwrap(), "--out", o2.to_str().unwrap(), "-q", "--no-plots"]);
    assert!(o.status.success(), "{}", stderr(&o));
    for t in ["comparison.csv", "per_task.csv", "models.csv"] {
        assert_eq!(fs::read_to_string(o1.join(t)).unwrap(), fs::read_to_string(o2.join(t)).unwrap(), "{t}");
    }
}

#[test]
fn by_accepts_prompt_type_alias_and_rejects_unknown_columns() {
    let d = tmp();
    let results = known_counts_file(d.path());
    let out = d.path().join("out");
    let o = run(&[
        results.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "-q",
        "--no-plots",
        "--by",
        "model,prompt_type",
        "--format",
        "csv",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let rows = read_csv(&out.join("comparison.csv"));
    // coefficients pooled: 40 paired units for qwen-coder-0.5b
    let q = find(&rows, &[("model", "qwen-coder-0.5b"), ("prompt_pair", "accuracy")]);
    assert_eq!(f(q, "episodes"), 40.0);
    assert!(!out.join("comparison.md").exists(), "--format csv writes no markdown files");
    let o = run(&[results.to_str().unwrap(), "--out", out.to_str().unwrap(), "--by", "model,colour"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("unknown --by column"));
}

#[test]
fn line_numbers_survive_parser_blocks_and_files() {
    // > 4 MiB so the parallel reader splits it into several blocks; bad lines far apart.
    let d = tmp();
    let mut big = String::new();
    let mut n = 0u64;
    while big.len() < 9 << 20 {
        n += 1;
        if n == 7_777 || n == 15_000 {
            big += "{\"broken\": \n";
        } else {
            big += &line(
                "m",
                Some(1),
                0.0,
                Some("accuracy"),
                "click-button",
                n,
                false,
                n.is_multiple_of(2),
                false,
                1,
                5,
                Some("h"),
            );
        }
    }
    big += "{\"torn"; // unterminated last line
    fs::write(d.path().join("a.jsonl"), &big).unwrap();
    let second = format!(
        "{}{}",
        line("m", Some(1), 2.0, Some("accuracy"), "click-button", 2, true, true, false, 1, 5, Some("h")),
        "not json\n"
    );
    fs::write(d.path().join("b.jsonl"), second).unwrap();
    for threads in ["1", "3"] {
        let out = d.path().join(format!("out{threads}"));
        let o = bin()
            .env("ANALYZE_THREADS", threads)
            .args([d.path().to_str().unwrap(), "--out", out.to_str().unwrap(), "-q", "--no-plots"])
            .output()
            .unwrap();
        let err = stderr(&o);
        assert!(o.status.success(), "{err}");
        for want in [
            "a.jsonl:7777: malformed JSON".to_string(),
            "a.jsonl:15000: malformed JSON".to_string(),
            format!("a.jsonl:{}: torn last line", n + 1),
            "b.jsonl:2: malformed JSON".to_string(),
        ] {
            assert!(err.contains(&want), "threads {threads}: missing {want:?} in\n{err}");
        }
        assert!(err.contains("4 input lines skipped"), "{err}");
        let rows = read_csv(&out.join("comparison.csv"));
        let paired = find(&rows, &[("coeff", "2.0")]);
        assert_eq!((f(paired, "episodes"), f(paired, "baseline_success")), (1.0, 1.0));
        let base = find(&rows, &[("coeff", "0.0")]);
        assert_eq!(f(base, "episodes"), (n - 2 - 1) as f64); // all baselines but the 2 broken and the paired one
    }
}

/// `analyze lens-summary`: extract's summary.jsonl rows as parquet, values and nulls kept.
#[test]
fn lens_summary_writes_the_extraction_statistics_as_parquet() {
    use polars_io::prelude::*;
    let dir = tmp();
    let ext = dir.path().join("ext");
    fs::create_dir_all(&ext).unwrap();
    fs::write(
        ext.join("summary.jsonl"),
        concat!(
            r#"{"item":"item-00000","hook_point":"hook_embed","tokens":8,"norm_mean":1.5,"norm_std":0.25,"norm_min":1.0,"norm_max":2.0,"mean_cos_to_mean":0.75}"#,
            "\n",
            r#"{"item":"item-00000","hook_point":"blocks.2.hook_resid_post","tokens":0,"norm_mean":null,"norm_std":null,"norm_min":null,"norm_max":null,"mean_cos_to_mean":null}"#,
            "\n"
        ),
    )
    .unwrap();
    let o = run(&["lens-summary", ext.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let df = ParquetReader::new(fs::File::open(ext.join("summary.parquet")).unwrap()).finish().unwrap();
    assert_eq!(df.height(), 2);
    let hp = df.column("hook_point").unwrap().str().unwrap();
    assert_eq!(hp.get(1), Some("blocks.2.hook_resid_post"));
    assert_eq!(df.column("tokens").unwrap().i64().unwrap().get(0), Some(8));
    let mean = df.column("norm_mean").unwrap().f64().unwrap();
    assert_eq!((mean.get(0), mean.get(1)), (Some(1.5), None));
    assert_eq!(df.column("mean_cos_to_mean").unwrap().f64().unwrap().get(0), Some(0.75));

    // A directory without a summary, and a malformed row, are named.
    let o = run(&["lens-summary", dir.path().to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("summary.jsonl"), "{}", stderr(&o));
    fs::write(ext.join("summary.jsonl"), "{\"item\":\"x\"}\n").unwrap();
    let o = run(&["lens-summary", ext.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("line 1"), "{}", stderr(&o));
    // Two directories need --out.
    let o = run(&["lens-summary", ext.to_str().unwrap(), ext.to_str().unwrap()]);
    assert!(stderr(&o).contains("--out"), "{}", stderr(&o));
}
