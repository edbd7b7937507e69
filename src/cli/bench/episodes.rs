//! `bench episodes`: paired exp12 episodes per minute (baseline + steered of one (task, seed) =
//! one pair) through `run`'s code path, beside `scripts/peer/exp12_loop.py` (transformers + a
//! forward hook + selenium, sequential baseline then steered) on the same tasks, seeds, vector,
//! prompt text and token budget, in the same invocation.
use anyhow::{bail, Context, Result};
use miniwob_steer::experiment::run::run_settings;
use miniwob_steer::experiment::settings::Settings;
use miniwob_steer::experiment::Shard;
use miniwob_steer::models::dtype::DTypeChoice;
use miniwob_steer::models::registry::{self, Location};
use miniwob_steer::steering::caa::{CoeffMode, Method};
use std::path::{Path, PathBuf};

/// The fixed task list (8 click/type tasks of issue 9).
pub const BENCH_TASKS: &str =
    "click-test,click-button,click-link,click-dialog,focus-text,click-tab,click-checkboxes,enter-text";

#[derive(clap::Args, Debug)]
pub struct BenchEpisodesArgs {
    #[arg(long, default_value = miniwob_steer::models::registry::DEFAULT_MODEL)]
    pub model: String,
    /// auto (bf16 on a GPU; on the CPU gguf for a GGUF checkpoint, else f32), f32, f16, bf16 or gguf.
    #[arg(long, default_value = "auto")]
    pub dtype: DTypeChoice,
    /// cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "auto")]
    pub device: String,
    #[arg(long, default_value = BENCH_TASKS)]
    pub tasks: String,
    /// Seeds per task.
    #[arg(long, default_value_t = 3)]
    pub seeds: usize,
    #[arg(long, default_value_t = 3.0)]
    pub coeff: f32,
    #[arg(long, default_value = "auto")]
    pub layer: String,
    /// Browser sessions on our side.
    #[arg(long, default_value_t = 2)]
    pub concurrency: usize,
    /// Training episodes for the (untimed) vector.
    #[arg(long, default_value_t = 8)]
    pub train_steps: usize,
    #[arg(long, default_value_t = 40)]
    pub max_new_tokens: usize,
    /// CPU threads for both implementations (RAYON_NUM_THREADS / torch threads).
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// Python with torch, transformers and selenium; default target/py/bin/python if present.
    #[arg(long)]
    pub python: Option<PathBuf>,
    #[arg(long)]
    pub no_peer: bool,
    /// Prefix-cache bounds (MiB) to time ours with, one run each (0 = no cache); the first is
    /// compared with the peer.
    #[arg(long, value_delimiter = ',', default_values_t = [miniwob_steer::models::prefix_cache::DEFAULT_MB, 0])]
    pub prefix_cache_mb: Vec<usize>,
}

fn settings(
    a: &BenchEpisodesArgs,
    dir: &Path,
    name: &str,
    eval_steps: usize,
    seed: u64,
    vector: Option<PathBuf>,
    prefix_cache_mb: usize,
) -> Result<Settings> {
    Ok(Settings {
        experiment: "bench".into(),
        model: a.model.clone(),
        dtype: a.dtype.resolve_for(&miniwob_steer::device::parse_device(&a.device)?, &a.model),
        device: a.device.clone(),
        layer: a.layer.clone(),
        coeffs: vec![a.coeff],
        coeff_mode: CoeffMode::Absolute,
        pair: "accuracy".into(),
        pairs: None,
        vector_method: Method::Prompt,
        train_steps: a.train_steps,
        eval_steps,
        seed,
        base_only: false,
        tasks: miniwob_steer::experiment::settings::parse_tasks(&a.tasks)?,
        vector,
        concurrency: a.concurrency,
        prefix_cache_mb,
        shard: Shard::ALL,
        max_steps: 1,
        max_new_tokens: a.max_new_tokens,
        out: dir.join(format!("{name}.jsonl")),
        keep_other_configs: false,
        allow_foreign_vector: false,
        protocol: miniwob_steer::protocol::Protocol::default_protocol(),
        plan: None,
        gate: None,
        adapter: None,
    })
}

pub fn run(a: BenchEpisodesArgs) -> Result<()> {
    std::env::set_var("RAYON_NUM_THREADS", a.threads.to_string());
    let dir = tempfile::tempdir()?;
    let vector = dir.path().join("vector.safetensors");
    // Warm-up (untimed): compute the vector, one seed per task on other seeds.
    let first_mb = *a.prefix_cache_mb.first().context("--prefix-cache-mb: give at least one bound")?;
    let warm = settings(&a, dir.path(), "warm", 1, 50_000, None, first_mb)?;
    run_settings(&warm, false, Some(&vector), false, None).context("warm-up run")?;
    let mut runs = Vec::new();
    for (i, &mb) in a.prefix_cache_mb.iter().enumerate() {
        let timed = settings(&a, dir.path(), &format!("bench-{i}"), a.seeds, 0, Some(vector.clone()), mb)?;
        let ours = run_settings(&timed, false, None, false, None)?;
        runs.push((mb, timed, ours));
    }
    let (_, timed, ours) = &runs[0];
    let pairs = timed.tasks.len() * a.seeds;
    let ours_ppm = pairs as f64 / ours.eval_s * 60.0;
    println!(
        "bench episodes: model {} ({}), {} tasks × {} seeds = {pairs} pairs, α = {}, layer {}, {} new tokens max, threads {}, cores {}",
        a.model,
        timed.dtype.name(),
        timed.tasks.len(),
        a.seeds,
        a.coeff,
        ours.layer.map_or("-".into(), |l| l.to_string()),
        a.max_new_tokens,
        a.threads,
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)
    );
    println!("| implementation | sessions | pairs | eval s | paired episodes/min | baseline success | steered success | baseline parse fail | steered parse fail | rows/batch | prefix tokens computed / from cache |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for (mb, _, r) in &runs {
        let steered = r.steered.first();
        println!(
            "| miniwob-steer (batched, {} sessions, prefix cache {mb} MiB) | {} | {pairs} | {:.1} | {:.2} | {:.0}% | {:.0}% | {:.0}% | {:.0}% | {:.2} | {} / {} |",
            a.concurrency,
            a.concurrency,
            r.eval_s,
            pairs as f64 / r.eval_s * 60.0,
            100.0 * r.baseline_success_rate,
            100.0 * steered.map_or(0.0, |s| s.success_rate),
            100.0 * r.baseline_parse_failure_rate,
            100.0 * steered.map_or(0.0, |s| s.parse_failure_rate),
            r.rows_per_batch,
            r.prefix_cache.computed_tokens,
            r.prefix_cache.hit_tokens,
        );
    }
    let python = a.python.clone().or_else(|| {
        let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/py/bin/python");
        p.is_file().then_some(p)
    });
    match (python, a.no_peer) {
        (_, true) => println!("(peer skipped: --no-peer)"),
        (None, false) => {
            println!("(peer not run: no target/py venv; create it with scripts/goldens/venv.sh, plus selenium)")
        }
        (Some(py), false) => match peer(&a, &py, timed, &vector, ours.layer.unwrap_or(0)) {
            Ok(v) => {
                let ppm = v["pairs_per_min"].as_f64().unwrap_or(0.0);
                println!(
                    "| python peer (transformers + hook + selenium, sequential) | 1 | {} | {:.1} | {:.2} | {:.0}% | {:.0}% | {:.0}% | {:.0}% |",
                    v["pairs"],
                    v["eval_s"].as_f64().unwrap_or(0.0),
                    ppm,
                    100.0 * v["baseline_success"].as_f64().unwrap_or(0.0),
                    100.0 * v["steered_success"].as_f64().unwrap_or(0.0),
                    100.0 * v["baseline_parse_failure"].as_f64().unwrap_or(0.0),
                    100.0 * v["steered_parse_failure"].as_f64().unwrap_or(0.0),
                );
                if ppm > 0.0 {
                    println!("ratio (ours / python): {:.2}×", ours_ppm / ppm);
                }
            }
            Err(e) => println!("(peer failed: {e:#})"),
        },
    }
    Ok(())
}

fn peer(a: &BenchEpisodesArgs, python: &Path, s: &Settings, vector: &Path, layer: usize) -> Result<serde_json::Value> {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/peer/exp12_loop.py");
    let resolved = registry::resolve(&a.model)?;
    let mut cmd = std::process::Command::new(python);
    cmd.arg(&script);
    match &resolved.location {
        Location::Gguf(p) => cmd.arg("--gguf").arg(p),
        Location::Dir(d) => cmd.arg("--model-dir").arg(d),
    };
    cmd.arg("--vector")
        .arg(vector)
        .args(["--layer", &layer.to_string(), "--coeff", &a.coeff.to_string()])
        .args(["--tasks", &s.tasks.join(","), "--seeds", &a.seeds.to_string()])
        .args(["--max-new-tokens", &a.max_new_tokens.to_string(), "--threads", &a.threads.to_string()])
        .arg("--html-root")
        .arg(miniwob_steer::env::html_root()?)
        .env("OMP_NUM_THREADS", a.threads.to_string())
        .stderr(std::process::Stdio::inherit());
    let out = cmd.output().with_context(|| format!("running {} {}", python.display(), script.display()))?;
    if !out.status.success() {
        bail!("the peer exited with {}", out.status);
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line =
        stdout.lines().rev().find(|l| l.trim_start().starts_with('{')).context("the peer printed no JSON line")?;
    Ok(serde_json::from_str(line)?)
}
