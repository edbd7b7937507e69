//! The tiny Qwen2-VL through the VLM agent on real Chromium. The model is random, so it acts
//! randomly; these tests check the plumbing: the Set-of-Marks screenshot becomes image tokens in
//! the prompt, steering hooks sit on the LLM layers (baseline rows bit-identical to no hook), and
//! `run --vlm` computes a vector, runs paired episodes and writes result lines.
mod common;

use candle_core::Device;
use miniwob_steer::agent::{
    Agent, AgentModel, Arm, Condition, Generator, GeneratorConfig, PromptBuilder, Steering, View,
};
use miniwob_steer::env::{EnvConfig, Pool};
use miniwob_steer::experiment::vectors::{self, TrainingView};
use miniwob_steer::models::hooks::{Captures, HookPoint, HookSpec, Positions};
use miniwob_steer::models::qwen2_vl::Qwen2Vl;
use miniwob_steer::models::WeightDType;
use miniwob_steer::protocol::Protocol;
use miniwob_steer::steering::caa::{steering_spec, CaaOptions, CoeffMode, Method};
use miniwob_steer::steering::pairs;
use std::process::Command;
use std::sync::Arc;

const BIN: &str = env!("CARGO_BIN_EXE_miniwob-steer");

fn require_assets() {
    let out = Command::new(BIN).args(["tasks", "--exp12"]).output().expect("running miniwob-steer tasks");
    assert!(
        out.status.success(),
        "MiniWoB assets or browser missing: run ./scripts/setup.sh ({})",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn tiny() -> Qwen2Vl {
    let dir = common::fixture("tiny-qwen2-vl");
    Qwen2Vl::load_dir(&dir, "tiny-qwen2-vl", "tiny-qwen2-vl", &Device::Cpu, WeightDType::F32).unwrap()
}

#[test]
fn screenshot_prompt_has_image_tokens_and_steering_hooks_the_llm() {
    require_assets();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let model = Arc::new(tiny());
    rt.block_on(async {
        let pool = Pool::new(1, EnvConfig::default()).await.unwrap();
        let mut sess = pool.acquire().await.unwrap();
        let obs = sess.reset("click-button", 3).await.unwrap();
        let som = sess.som_image(&obs).await.unwrap();
        let prompts = PromptBuilder::default();
        let view = View { obs: &obs, screenshot: Some(&som), history: &[], step: 1 };
        let turn = model.turn(&prompts, &view, None).unwrap();
        let input = &turn.input;
        assert_eq!(input.images.len(), 1);
        let img = &input.images[0];
        let n_img = input.ids.iter().filter(|&&t| t == model.cfg.image_token_id).count();
        assert_eq!(n_img, img.llm_tokens(2), "image pads = t·h·w/4 of grid {:?}", img.grid_thw);
        assert!(n_img >= 100, "a Set-of-Marks screenshot should give many image tokens, got {n_img}");
        let start = input.ids.iter().position(|&t| t == model.cfg.vision_start_token_id).unwrap();
        assert_eq!(input.ids[start + 1], model.cfg.image_token_id);
        assert_eq!(input.ids[start + 1 + n_img], model.cfg.vision_end_token_id);
        let text = model.tokenizer.decode(&input.ids, false).unwrap();
        assert!(text.contains(obs.utterance.trim()), "the utterance is in the prompt");

        // A vector from two training screens with the project's prompt pair, at the LLM layer.
        let layer = model.cfg.text.num_layers / 2;
        let all = pairs::load(None).unwrap();
        let views: Vec<TrainingView> =
            (0..2).map(|_| TrainingView { obs: obs.clone(), screenshot: Some(som.clone()) }).collect();
        let opts = CaaOptions::of_protocol(&Protocol::default_protocol(), vec![layer], Method::Prompt, 1.0);
        let v = vectors::compute(&*model, &prompts, &views, &all, "accuracy", &opts).unwrap();
        assert_eq!(v.layers.keys().copied().collect::<Vec<_>>(), vec![layer]);
        assert_eq!(v.meta.hidden_size, model.cfg.text.hidden_size, "the vector lives in the LLM residual stream");

        let spec = steering_spec(&v, layer, &[0.0, 8.0], CoeffMode::Absolute, Positions::Last).unwrap();
        assert_eq!(spec.interventions.len(), 1);
        assert_eq!(spec.interventions[0].point, HookPoint::ResidPost(layer));
        assert!(layer < model.decoder.cfg.num_layers);
        // The baseline row of a steered batch is bit-identical to an unhooked run; the steered
        // row is not.
        let rows = vec![input.clone(), input.clone()];
        let plain = model.prefill(&rows, &HookSpec::none(), &mut Captures::default(), false).unwrap();
        let hooked = model.prefill(&rows, &spec, &mut Captures::default(), false).unwrap();
        let p: Vec<Vec<f32>> = plain.logits.squeeze(1).unwrap().to_vec2().unwrap();
        let h: Vec<Vec<f32>> = hooked.logits.squeeze(1).unwrap().to_vec2().unwrap();
        assert_eq!(p[0], h[0], "α = 0 row changed");
        assert_ne!(p[1], h[1], "the steered row did not change");

        // The paired episode loop: both arms act on the page and get a reward.
        drop(sess);
        let mut sess = pool.acquire().await.unwrap();
        let arms =
            [Arm { condition: Condition::Baseline, coeff: 0.0 }, Arm { condition: Condition::Steered, coeff: 8.0 }];
        let steering = Steering { vector: v, layer, mode: CoeffMode::Absolute, gate: None };
        let cfg = GeneratorConfig {
            max_new_tokens: 6,
            repetition_penalty: 1.0,
            max_batch_rows: 2,
            linger: std::time::Duration::ZERO,
            prefix_cache_mb: 0,
            capture: None,
        };
        let (generator, handle) = Generator::spawn(model.clone(), Some(steering), cfg);
        let agent = Agent { generator: &generator, model: &*model, prompts: &prompts, max_steps: 1, lens: None };
        let out = agent.run_pair(&mut sess, "click-button", 3, &arms).await.unwrap();
        drop(generator);
        handle.join().unwrap();
        assert_eq!(out.len(), 2);
        for ep in &out {
            assert_eq!(ep.steps, 1);
            assert!(ep.tokens_in > n_img && ep.tokens_out > 0, "{ep:?}");
            assert_eq!(ep.prompt_hash, turn.hash, "same seed, same screenshot");
        }
        drop(sess);
        pool.shutdown().await;
    });
}

#[test]
fn run_vlm_writes_paired_result_lines() {
    require_assets();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("vlm.jsonl");
    let summary = tmp.path().join("summary.json");
    let dir = common::fixture("tiny-qwen2-vl");
    let t0 = std::time::Instant::now();
    let o = Command::new(BIN)
        .args(["run", "--vlm", "--model"])
        .arg(&dir)
        .args(["--device", "cpu", "--dtype", "f32", "--tasks", "click-test,click-button", "--eval-steps", "2"])
        .args(["--train-steps", "2", "--coeff", "4", "--max-new-tokens", "8", "--concurrency", "1", "--no-progress"])
        .args(["--name", "vlm-test", "--out"])
        .arg(&out)
        .arg("--summary-json")
        .arg(&summary)
        .env("RAYON_NUM_THREADS", "2")
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let wall = t0.elapsed().as_secs_f64();
    assert!(
        o.status.success(),
        "run --vlm failed:\n{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    let text = std::fs::read_to_string(&out).unwrap();
    let lines: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 2 * 2 * 2, "2 tasks × 2 seeds × (baseline + steered)");
    for l in &lines {
        assert_eq!(l["vlm"], true);
        assert_eq!(l["experiment"], "vlm-test");
        assert_eq!(l["layer"], 1, "auto layer = 3 LLM layers / 2");
        assert_eq!(l["hook_point"], "blocks.1.hook_resid_post");
        assert!(l["vector_hash"].is_string() && l["weights_hash"].is_string());
        // The prompt holds the screenshot's image tokens: far more than the text alone.
        assert!(l["tokens_in"].as_u64().unwrap() > 300, "{l}");
        assert!(l["tokens_out"].as_u64().unwrap() > 0);
    }
    let conds: Vec<&str> = lines.iter().map(|l| l["condition"].as_str().unwrap()).collect();
    assert_eq!(conds.iter().filter(|&&c| c == "baseline").count(), 4);
    let s: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&summary).unwrap()).unwrap();
    assert_eq!(s["episodes"], 8);
    let vectors: Vec<_> = std::fs::read_dir(tmp.path().join("vectors")).unwrap().collect();
    assert_eq!(vectors.len(), 1, "one cached VLM vector");
    // Rerun: every key is present, nothing new.
    let o = Command::new(BIN)
        .args(["run", "--vlm", "--model"])
        .arg(&dir)
        .args(["--device", "cpu", "--dtype", "f32", "--tasks", "click-test,click-button", "--eval-steps", "2"])
        .args(["--train-steps", "2", "--coeff", "4", "--max-new-tokens", "8", "--concurrency", "1", "--no-progress"])
        .args(["--name", "vlm-test", "--out"])
        .arg(&out)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(o.status.success());
    assert_eq!(std::fs::read_to_string(&out).unwrap(), text, "a rerun must not add lines");
    eprintln!("run --vlm: 8 episodes + vector in {wall:.1}s");
}

/// Issue 15: VLM rows of different episodes share generation batches (concurrency 2: more than
/// the 2 rows of one pair per batch), and every line equals the one-at-a-time run's.
#[test]
fn vlm_rows_of_different_episodes_batch_together_with_identical_outputs() {
    require_assets();
    let tmp = tempfile::tempdir().unwrap();
    let dir = common::fixture("tiny-qwen2-vl");
    let run = |conc: &str| -> (Vec<serde_json::Value>, serde_json::Value) {
        let out = tmp.path().join(format!("c{conc}/vlm.jsonl"));
        let summary = tmp.path().join(format!("c{conc}/summary.json"));
        std::fs::create_dir_all(out.parent().unwrap()).unwrap();
        let o = Command::new(BIN)
            .args(["run", "--vlm", "--model"])
            .arg(&dir)
            .args(["--device", "cpu", "--dtype", "f32", "--tasks", "click-test,click-button,focus-text"])
            .args(["--eval-steps", "2", "--train-steps", "2", "--coeff", "4", "--max-new-tokens", "8"])
            .args(["--concurrency", conc, "--no-progress", "--out"])
            .arg(&out)
            .arg("--summary-json")
            .arg(&summary)
            .env("RUST_LOG", "warn")
            .output()
            .unwrap();
        assert!(o.status.success(), "run --vlm --concurrency {conc}: {}", String::from_utf8_lossy(&o.stderr));
        let lines = std::fs::read_to_string(&out).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        (lines, serde_json::from_str(&std::fs::read_to_string(&summary).unwrap()).unwrap())
    };
    let (one, s1) = run("1");
    let (two, s2) = run("2");
    assert_eq!(s1["rows_per_batch"].as_f64().unwrap(), 2.0, "one pair at a time: baseline + steered");
    let rpb = s2["rows_per_batch"].as_f64().unwrap();
    assert!(rpb > 2.0, "concurrency 2 should batch rows of different episodes, got {rpb} rows/batch");
    assert_eq!(one.len(), 12);
    let by_key = |v: &[serde_json::Value]| -> std::collections::BTreeMap<String, serde_json::Value> {
        v.iter().map(|l| (l["key"].as_str().unwrap().to_string(), l.clone())).collect()
    };
    let (a, b) = (by_key(&one), by_key(&two));
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    for (k, x) in &a {
        let y = &b[k];
        for f in ["output", "actions", "success", "prompt_hash", "vector_hash", "tokens_in", "tokens_out"] {
            assert_eq!(x[f], y[f], "{k}: `{f}` differs between concurrency 1 and 2");
        }
    }
}

fn vm_hwm_mb() -> f64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|k| k.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Real-size figures without downloads: a Qwen2-VL checkpoint directory in
/// `MINIWOB_STEER_QWEN2VL_DIR` (the real one, or random weights at the real shapes from
/// scripts/goldens/random_checkpoints.py --models qwen2-vl-2b) and `MINIWOB_STEER_QWEN2VL_DTYPE`
/// (default bf16). One 320×420 Set-of-Marks-sized screenshot plus the agent's text, a baseline
/// and a steered row in one batch, 16 decode steps. Prints load/prefill/decode times and peak RSS.
#[test]
#[ignore = "needs a real-size Qwen2-VL checkpoint (MINIWOB_STEER_QWEN2VL_DIR)"]
fn real_size_figures() {
    let Some(dir) = std::env::var_os("MINIWOB_STEER_QWEN2VL_DIR") else {
        panic!("set MINIWOB_STEER_QWEN2VL_DIR to a Qwen2-VL checkpoint directory");
    };
    let dtype: WeightDType =
        std::env::var("MINIWOB_STEER_QWEN2VL_DTYPE").unwrap_or_else(|_| "bf16".into()).parse().unwrap();
    let t0 = std::time::Instant::now();
    let model = Qwen2Vl::load_dir(std::path::Path::new(&dir), "qwen-vl-2b", "real-size", &Device::Cpu, dtype).unwrap();
    let load_s = t0.elapsed().as_secs_f64();
    let rss_load = vm_hwm_mb();
    let img = image::RgbImage::from_fn(320, 420, |x, y| image::Rgb([(x % 256) as u8, (y % 256) as u8, 200]));
    let obs = miniwob_steer::env::Observation {
        task: "click-button".into(),
        seed: 0,
        utterance: "Click on the \"submit\" button.".into(),
        fields: vec![],
        elements: vec![],
        episode_time_ms: 0.0,
        done: false,
    };
    let text = miniwob_steer::agent::PromptBuilder::default().user_text(&obs, &[], 1, true, None).unwrap();
    let input = model.user_prompt(&[img], &text).unwrap();
    let n_img = input.ids.iter().filter(|&&t| t == model.cfg.image_token_id).count();
    let rows = vec![input.clone(), input.clone()];
    let layer = model.cfg.text.num_layers / 2;
    let v = candle_core::Tensor::ones(model.cfg.text.hidden_size, candle_core::DType::F32, &Device::Cpu).unwrap();
    let spec =
        HookSpec::none().add(HookPoint::ResidPost(layer), v, vec![0.0, 4.0], miniwob_steer::models::Positions::Last);
    let t1 = std::time::Instant::now();
    let feats = model.image_features(&rows[..1]).unwrap().unwrap();
    let vision_s = t1.elapsed().as_secs_f64();
    let feats2 = candle_core::Tensor::cat(&[&feats, &feats], 0).unwrap();
    let t2 = std::time::Instant::now();
    let mut caps = Captures::default();
    let mut pre = model.prefill_with_features(&rows, Some(feats2), &spec, &mut caps, false).unwrap();
    let prefill_s = t2.elapsed().as_secs_f64();
    let t3 = std::time::Instant::now();
    let steps = 16;
    for _ in 0..steps {
        let next: Vec<u32> = pre.logits.squeeze(1).unwrap().argmax(1).unwrap().to_vec1().unwrap();
        pre.logits = model.decode_step(&next, &mut pre.state, &pre.deltas, &spec, &mut caps).unwrap();
    }
    let decode_s = t3.elapsed().as_secs_f64() / steps as f64;
    drop(pre);
    // A whole paired turn as the runner does it: forked (one prefill, vision included) + 8 tokens.
    let cfg =
        miniwob_steer::models::generate::GenerateConfig { max_new_tokens: 8, stop_ids: vec![], ..Default::default() };
    let t4 = std::time::Instant::now();
    model.generate_forked(&input, 2, &cfg, &spec).unwrap();
    let forked_s = t4.elapsed().as_secs_f64();
    eprintln!("real-size forked paired turn (vision + 1 prefill + 8 tokens × 2 rows): {forked_s:.1}s");
    eprintln!(
        "real-size Qwen2-VL ({}, {} threads): load {load_s:.1}s (peak RSS {rss_load:.0} MB), prompt {} tokens ({n_img} image), \
         vision tower {vision_s:.2}s (1 image), LLM prefill 2 rows {prefill_s:.2}s, decode {:.3}s/step (2 rows), peak RSS {:.0} MB",
        dtype.name(),
        std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "default".into()),
        input.ids.len(),
        decode_s,
        vm_hwm_mb()
    );
}

#[test]
fn vlm_flag_with_a_text_model_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let o = Command::new(BIN)
        .args(["run", "--vlm", "--model", "qwen-coder-0.5b", "--device", "cpu", "--tasks", "click-test", "--out"])
        .arg(tmp.path().join("x.jsonl"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("--vlm needs a vision-language model"), "{err}");
}

/// Issue 21 on the tiny Qwen2-VL with screenshots: `run --vlm --gate` with a head that pools the
/// image tokens (always on: the ungated steered outputs; always off: the baseline's), and
/// `run --vlm --adapter` (a LoRA on the LLM layers: other outputs, the adapter in every line).
#[test]
fn run_vlm_with_a_gate_and_an_adapter() {
    require_assets();
    let tmp = tempfile::tempdir().unwrap();
    let dir = common::fixture("tiny-qwen2-vl");
    let (on, off, lora) = (tmp.path().join("on.st"), tmp.path().join("off.st"), tmp.path().join("lora"));
    common::constant_head(&on, 64, 1, true, miniwob_steer::probe::Pool::ImageMean);
    common::constant_head(&off, 64, 1, false, miniwob_steer::probe::Pool::ImageMean);
    common::random_adapter(&lora, 3, 64, 64, 32, 3);
    let go = |name: &str, extra: &[&str]| -> Vec<serde_json::Value> {
        let out = tmp.path().join(format!("{name}.jsonl"));
        let o = Command::new(BIN)
            .args(["run", "--vlm", "--model"])
            .arg(&dir)
            .args(["--device", "cpu", "--dtype", "f32", "--tasks", "click-test,click-button", "--eval-steps", "2"])
            .args(["--train-steps", "2", "--coeff", "8", "--max-new-tokens", "8", "--no-progress", "--out"])
            .arg(&out)
            .args(extra)
            .env("RUST_LOG", "warn")
            .output()
            .unwrap();
        assert!(o.status.success(), "run --vlm {extra:?}: {}", String::from_utf8_lossy(&o.stderr));
        std::fs::read_to_string(&out).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    };
    let outputs = |ls: &[serde_json::Value], cond: &str| -> Vec<(String, u64, String)> {
        let mut v: Vec<_> = ls
            .iter()
            .filter(|l| l["condition"] == cond)
            .map(|l| {
                (l["task"].as_str().unwrap().into(), l["seed"].as_u64().unwrap(), l["output"].as_str().unwrap().into())
            })
            .collect();
        v.sort();
        v
    };
    let plain = go("plain", &[]);
    assert_ne!(outputs(&plain, "steered"), outputs(&plain, "baseline"), "α = 8 changes some output");
    let s = |p: &std::path::Path| p.to_str().unwrap().to_string();
    let gated_on = go("on", &["--gate", &s(&on), "--gate-class", "on"]);
    assert_eq!(outputs(&gated_on, "steered"), outputs(&plain, "steered"));
    let gated_off = go("off", &["--gate", &s(&off), "--gate-class", "on"]);
    assert_eq!(outputs(&gated_off, "steered"), outputs(&plain, "baseline"));
    for l in gated_on.iter().chain(&gated_off).filter(|l| l["condition"] == "steered") {
        assert_eq!(l["gate"].as_array().unwrap().len(), l["steps"].as_u64().unwrap() as usize, "{l}");
    }
    let adapted = go("lora", &["--adapter", &format!("tiny={}", s(&lora))]);
    assert!(adapted.iter().all(|l| l["adapter"].as_str().unwrap().starts_with("tiny@")));
    assert_ne!(outputs(&adapted, "baseline"), outputs(&plain, "baseline"), "the adapter changed no output");
}
