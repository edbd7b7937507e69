//! Seeded synthetic result lines in the results format (for scale tests and demos).
//!
//! Units are (model, layer, task, seed); each unit writes one baseline line and one steered line per
//! coefficient, interleaved as a paired runner would. Success probabilities depend on the task, and
//! the steered effect on layer and coefficient; a baseline and its steered rows share one uniform
//! draw (common random numbers), so outcomes are positively correlated as in real paired runs.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use anyhow::{Context, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

/// Generator settings.
#[derive(Debug, Clone)]
pub struct SynthOpts {
    pub lines: u64,
    pub seed: u64,
    pub models: Vec<String>,
    pub layers: Vec<i64>,
    pub coeffs: Vec<f64>,
    pub tasks: usize,
    /// Bytes of fake model output per line (real lines carry the raw output).
    pub output_bytes: usize,
}

impl Default for SynthOpts {
    fn default() -> Self {
        SynthOpts {
            lines: 1000,
            seed: 1,
            models: vec!["qwen-coder-0.5b".into(), "smollm2-135m".into(), "llama-1b".into()],
            layers: vec![6, 12],
            coeffs: vec![2.0, 4.0],
            tasks: 20,
            output_bytes: 200,
        }
    }
}

#[derive(Serialize)]
struct Line<'a> {
    experiment: &'a str,
    model: &'a str,
    checkpoint: &'a str,
    weights_hash: &'a str,
    dtype: &'a str,
    layer: i64,
    hook_point: &'a str,
    coeff: f64,
    coeff_mode: &'a str,
    vector_hash: &'a str,
    prompt_pair: &'a str,
    vector_method: &'a str,
    task: &'a str,
    seed: u64,
    condition: &'a str,
    vlm: bool,
    prompt_hash: &'a str,
    output: &'a str,
    actions: [&'a str; 1],
    parse_failure: bool,
    raw_reward: f64,
    reward: f64,
    success: bool,
    steps: u32,
    wall_s: f64,
    tokens_in: u32,
    tokens_out: u32,
    harness_version: &'a str,
    key: String,
}

const TASK_NAMES: &[&str] = &[
    "click-button",
    "click-checkboxes",
    "click-link",
    "click-option",
    "click-tab",
    "enter-text",
    "focus-text",
    "identify-shape",
    "navigate-tree",
    "use-autocomplete",
    "click-dialog",
    "click-test",
    "grid-coordinate",
    "login-user",
    "choose-list",
    "enter-password",
    "click-widget",
    "email-inbox",
    "search-engine",
    "social-media",
];

/// Task names used by the generator.
pub fn task_names(n: usize) -> Vec<String> {
    (0..n).map(|i| TASK_NAMES.get(i).map_or_else(|| format!("task-{i:03}"), |s| s.to_string())).collect()
}

/// Baseline success probability of task i of n.
pub fn base_p(i: usize, n: usize) -> f64 {
    0.15 + 0.7 * i as f64 / n.max(2) as f64
}

/// Steered effect (probability points) of a model index, layer index and coefficient.
pub fn effect(model: usize, layer_idx: usize, coeff: f64) -> f64 {
    let sign = if layer_idx % 2 == 1 { 1.0 } else { -0.5 };
    sign * 0.03 * coeff * (1.0 + model as f64 * 0.25)
}

/// Writes `opts.lines` lines to `out`; returns the number written.
pub fn generate(opts: &SynthOpts, out: &Path) -> Result<u64> {
    let f = File::create(out).with_context(|| format!("creating {}", out.display()))?;
    let mut w = BufWriter::with_capacity(1 << 20, f);
    let mut rng = StdRng::seed_from_u64(opts.seed);
    let tasks = task_names(opts.tasks);
    let output: String = "click ref=4\n---\n".chars().cycle().take(opts.output_bytes).collect();
    let mut written = 0u64;
    let mut seed = 0u64;
    'outer: loop {
        for (mi, model) in opts.models.iter().enumerate() {
            for (li, &layer) in opts.layers.iter().enumerate() {
                let vhash = format!("{:016x}", crate::stats::fnv1a(format!("{model}/{layer}").as_bytes()));
                let hook = format!("blocks.{layer}.hook_resid_post");
                for (ti, task) in tasks.iter().enumerate() {
                    let u: f64 = rng.random();
                    let pf_u: f64 = rng.random();
                    let conds = std::iter::once(0.0).chain(opts.coeffs.iter().copied());
                    for coeff in conds {
                        if written == opts.lines {
                            break 'outer;
                        }
                        let steered = coeff != 0.0;
                        let p = (base_p(ti, opts.tasks) + if steered { effect(mi, li, coeff) } else { 0.0 })
                            .clamp(0.0, 1.0);
                        let success = u < p;
                        let parse_failure = pf_u < if steered { 0.02 * coeff } else { 0.03 };
                        let raw = if success { 1.0 } else { -1.0 };
                        let condition = if steered { "steered" } else { "baseline" };
                        let steps = 1 + (seed % 3) as u32;
                        let line = Line {
                            experiment: "synth",
                            model,
                            checkpoint: "synthetic",
                            weights_hash: "0000000000000000",
                            dtype: "f32",
                            layer,
                            hook_point: &hook,
                            coeff,
                            coeff_mode: "absolute",
                            vector_hash: &vhash,
                            prompt_pair: "accuracy",
                            vector_method: "prompt",
                            task,
                            seed,
                            condition,
                            vlm: false,
                            prompt_hash: "1111111111111111",
                            output: &output,
                            actions: ["click ref=4"],
                            parse_failure,
                            raw_reward: raw,
                            reward: raw * 0.9,
                            success,
                            steps,
                            wall_s: 1.5,
                            tokens_in: 270 * steps,
                            tokens_out: 25 * steps + (coeff as u32),
                            harness_version: "synth",
                            key: format!("{task}/{seed}/{condition}/{coeff}/{layer}/accuracy/prompt"),
                        };
                        serde_json::to_writer(&mut w, &line)?;
                        w.write_all(b"\n")?;
                        written += 1;
                    }
                }
            }
        }
        seed += 1;
    }
    w.flush()?;
    Ok(written)
}
