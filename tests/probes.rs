//! Probes (issue 21): heads on synthetic features (a separable set reaches 100%, a 90%-majority
//! set without signal is reported as a collapse at the baseline's accuracy, seeds and save/load
//! are bit-identical), then `probe features → train → eval/sweep`, `vector from-probe` and the gate
//! end to end through the binary on smollm2-135m (text) and the tiny Qwen2-VL (images), checked
//! against `interp::extract`'s states.
mod common;

use candle_core::{DType, Device, Tensor};
use miniwob_steer::models::hooks::HookPoint;
use miniwob_steer::models::load::Loaded;
use miniwob_steer::probe::eval;
use miniwob_steer::probe::features::FeatureSet;
use miniwob_steer::probe::gate::Gate;
use miniwob_steer::probe::head::Head;
use miniwob_steer::probe::train::{self, ClassWeights, TrainConfig};
use miniwob_steer::probe::{HeadKind, Pool};
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use std::path::Path;
use std::process::Command;

fn run(args: &[&str]) -> String {
    let o = Command::new(env!("CARGO_BIN_EXE_miniwob-steer")).args(args).output().expect("run miniwob-steer");
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "miniwob-steer {}: {err}", args.join(" "));
    String::from_utf8_lossy(&o.stdout).into_owned() + &err
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

use common::head_meta as meta;

fn gauss(rng: &mut rand::rngs::StdRng) -> f32 {
    let (u, v): (f32, f32) = (rng.random::<f32>().max(1e-12), rng.random());
    (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos()
}

/// `n` rows of `h` noise values (scaled per dimension, offset, like residual streams with outlier
/// dimensions); with `signal`, class c moves dimension c by +4 (linearly separable by a margin).
fn synthetic(n: usize, h: usize, labels: &[u32], signal: bool, seed: u64) -> Tensor {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut v = Vec::with_capacity(n * h);
    for &label in labels.iter().take(n) {
        for j in 0..h {
            let scale = if j == h - 1 { 50.0 } else { 1.0 + j as f32 * 0.1 };
            let mut x = gauss(&mut rng) * 0.3 * scale + 7.0;
            if signal && j == label as usize {
                x += 4.0 * scale;
            }
            v.push(x);
        }
    }
    Tensor::from_vec(v, (n, h), &Device::Cpu).unwrap()
}

fn rows(x: &Tensor, idx: &[u32]) -> Tensor {
    x.index_select(&Tensor::from_vec(idx.to_vec(), idx.len(), &Device::Cpu).unwrap(), 0).unwrap()
}

fn test_metrics(head: &Head, x: &Tensor, labels: &[u32]) -> eval::Metrics {
    let pred = head.predict_tensor(&rows(x, &head.split.test)).unwrap();
    let truth: Vec<u32> = head.split.test.iter().map(|&i| labels[i as usize]).collect();
    eval::metrics(&truth, &pred, &head.meta.classes, eval::majority(labels, &head.split.train, head.num_classes()))
        .unwrap()
}

#[test]
fn separable_set_reaches_100_percent_linear_and_mlp() {
    let labels: Vec<u32> = (0..300).map(|i| (i % 3) as u32).collect();
    let x = synthetic(300, 12, &labels, true, 1);
    for kind in [HeadKind::Linear, HeadKind::Mlp { width: 16 }] {
        let cfg = TrainConfig { head: kind, epochs: 60, lr: 1e-2, ..Default::default() };
        let (head, rep) = train::train(&x, &labels, &cfg, meta(12, 3)).unwrap();
        let m = test_metrics(&head, &x, &labels);
        assert_eq!(m.accuracy, 1.0, "{kind:?}: {}", eval::markdown("separable", &m));
        assert_eq!(m.macro_f1, 1.0);
        assert!(!m.collapsed);
        assert!(rep.best_epoch >= 1 && rep.best_epoch <= rep.epochs.len());
        // Early stopping keeps the best epoch: the saved parameters are that epoch's.
        assert_eq!(head.meta.best_epoch, rep.best_epoch);
        let best = rep.epochs[rep.best_epoch - 1].val_loss.unwrap();
        assert!(rep.epochs.iter().all(|e| e.val_loss.unwrap() >= best));
    }
}

#[test]
fn majority_without_signal_is_reported_as_a_collapse_at_the_baseline() {
    // 90% class 0, features carry no information about the label.
    let labels: Vec<u32> = (0..400).map(|i| u32::from(i % 10 == 0)).collect();
    let x = synthetic(400, 8, &labels, false, 2);
    let cfg = TrainConfig { epochs: 30, lr: 1e-2, ..Default::default() };
    let (head, _) = train::train(&x, &labels, &cfg, meta(8, 2)).unwrap();
    let m = test_metrics(&head, &x, &labels);
    assert!(m.collapsed, "{}", eval::markdown("no signal", &m));
    assert_eq!(m.accuracy, m.majority_baseline, "{}", eval::markdown("no signal", &m));
    assert!((m.majority_baseline - 0.9).abs() < 0.02);
    let md = eval::markdown("no signal", &m);
    assert!(md.contains("**WARNING** COLLAPSE") && md.contains("majority-class baseline of 90"), "{md}");
    // Balanced class weights move the head off the prior; the report says what happened either way.
    let cfg = TrainConfig { class_weights: ClassWeights::Balanced, ..cfg };
    let (head, _) = train::train(&x, &labels, &cfg, meta(8, 2)).unwrap();
    let m = test_metrics(&head, &x, &labels);
    assert!(m.top_predicted_share < 1.0, "{}", eval::markdown("balanced", &m));
}

#[test]
fn training_is_seeded_and_the_saved_head_predicts_the_same_bits() {
    let labels: Vec<u32> = (0..200).map(|i| (i % 4) as u32).collect();
    let x = synthetic(200, 10, &labels, true, 3);
    let cfg = TrainConfig { epochs: 8, head: HeadKind::Mlp { width: 8 }, ..Default::default() };
    let (a, _) = train::train(&x, &labels, &cfg, meta(10, 4)).unwrap();
    let (b, _) = train::train(&x, &labels, &cfg, meta(10, 4)).unwrap();
    let bits = |h: &Head| h.params.iter().flatten().map(|v| v.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&a), bits(&b), "same seed, same bits");
    let (c, _) = train::train(&x, &labels, &TrainConfig { seed: 1, ..cfg.clone() }, meta(10, 4)).unwrap();
    assert_ne!(bits(&a), bits(&c), "another seed trains another head");
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("head.safetensors");
    a.save(&p).unwrap();
    let r = Head::load(&p).unwrap();
    assert_eq!(r.meta, a.meta);
    assert_eq!(r.split, a.split);
    let pb = |h: &Head, t: &Tensor| h.probs_tensor(t).unwrap().concat().iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    assert_eq!(pb(&a, &x), pb(&r, &x), "reloaded head, same probabilities to the bit");
    // A row alone gives the bits it gives inside the batch (the batch-invariant kernel).
    let one = pb(&r, &x.narrow(0, 37, 1).unwrap());
    assert_eq!(one, pb(&r, &x)[37 * 4..38 * 4]);
    // Features of another dtype are cast, not refused.
    let (h16, _) = train::train(&x.to_dtype(DType::F16).unwrap(), &labels, &cfg, meta(10, 4)).unwrap();
    assert!(h16.predict_tensor(&x.to_dtype(DType::BF16).unwrap()).is_ok());
    // Clear errors.
    let e = Head::load(&dir.path().join("nope.safetensors")).unwrap_err().to_string();
    assert!(e.contains("nope.safetensors"), "{e}");
    let e = train::train(&x, &labels[..10], &cfg, meta(10, 4)).unwrap_err().to_string();
    assert!(e.contains("200 feature rows but 10 labels"), "{e}");
    assert!(a.to_vector("c1").unwrap_err().to_string().contains("linear head"));
}

#[test]
fn class_direction_raises_the_class_probability() {
    let labels: Vec<u32> = (0..200).map(|i| (i % 2) as u32).collect();
    let x = synthetic(200, 6, &labels, true, 4);
    let (h, _) = train::train(&x, &labels, &TrainConfig { epochs: 20, ..Default::default() }, meta(6, 2)).unwrap();
    let v = h.to_vector("c1").unwrap();
    let d = v.layers[&0].to_vec1::<f32>().unwrap();
    let norm: f32 = d.iter().map(|x| x * x).sum::<f32>().sqrt();
    assert!((norm - 1.0).abs() < 1e-5);
    assert_eq!(v.meta.method, "probe");
    // Moving a class-0 row along the direction raises p(c1).
    let row: Vec<f32> = x.get(0).unwrap().to_vec1().unwrap();
    let p0 = h.probs(&row).unwrap()[0][1];
    let moved: Vec<f32> = row.iter().zip(&d).map(|(a, b)| a + 3.0 * b).collect();
    assert!(h.probs(&moved).unwrap()[0][1] > p0);
}

fn text_rows() -> Vec<Value> {
    let animals = ["cat", "dog", "horse", "whale", "owl", "tiger", "rabbit", "eagle", "shark", "fox", "bear", "frog"];
    let mut v = Vec::new();
    for (i, a) in animals.iter().enumerate() {
        v.push(json!({"text": format!("Tell me a fact about the {a}."), "label": "animal", "i": i}));
        v.push(json!({"text": format!("What is {} plus {}?", i * 7 + 3, i * 5 + 11), "label": "math"}));
    }
    v
}

fn write_jsonl(p: &Path, rows: &[Value]) {
    std::fs::write(p, rows.iter().map(|r| r.to_string() + "\n").collect::<String>()).unwrap();
}

fn shard_bytes(dir: &Path) -> Vec<u8> {
    std::fs::read(dir.join("shard-00000.safetensors")).unwrap()
}

#[test]
fn text_pipeline_end_to_end_on_smollm2() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("d.jsonl");
    write_jsonl(&data, &text_rows());
    let feats = dir.path().join("f");
    let args = |out: &Path, batch: &str, pool: &str| {
        let v: Vec<String> = ["probe", "features", "--model", "smollm2-135m", "--device", "cpu", "--dtype", "f32"]
            .iter()
            .map(|s| s.to_string())
            .chain(
                ["--data", s(&data), "--layers", "0,14,29", "--pool", pool, "--batch-size", batch, "--out", s(out)]
                    .map(String::from),
            )
            .collect();
        v
    };
    let a = args(&feats, "4", "last");
    run(&a.iter().map(|s| s.as_str()).collect::<Vec<_>>());
    // Batch invariance: the same features with one prompt per forward pass, to the byte.
    let feats1 = dir.path().join("f1");
    let a = args(&feats1, "1", "last");
    run(&a.iter().map(|s| s.as_str()).collect::<Vec<_>>());
    assert_eq!(shard_bytes(&feats), shard_bytes(&feats1));
    let fs = FeatureSet::open(&feats).unwrap();
    assert_eq!(fs.manifest.rows, 24);
    assert_eq!(fs.manifest.classes, ["animal", "math"]);
    assert_eq!(fs.manifest.hidden_size, 576);
    // The pooled features are `extract`'s states: last and mean over the chat-templated prompt.
    let m = Loaded::load("smollm2-135m", &candle_core::Device::Cpu, "f32".parse().unwrap()).unwrap();
    let tok = m.tokenizer();
    let text = tok
        .apply_chat_template(&[miniwob_steer::models::tokenizer::ChatMessage::new("user", "What is 10 plus 16?")], true)
        .unwrap();
    let ids = tok.encode(&text, false).unwrap();
    let p = HookPoint::ResidPost(14);
    let e = miniwob_steer::interp::extract::extract_text(m.decoder(), &ids, 0, &[p]).unwrap();
    let (x, labels) = fs.load(p).unwrap();
    assert_eq!(labels[3], 1);
    let bits = |t: &Tensor| t.to_vec1::<f32>().unwrap().iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    assert_eq!(
        bits(&x.get(3).unwrap()),
        bits(&e.states[0].get(ids.len() - 1).unwrap()),
        "row 3 = last token of its prompt"
    );
    let featsm = dir.path().join("fm");
    let a = args(&featsm, "4", "mean");
    run(&a.iter().map(|s| s.as_str()).collect::<Vec<_>>());
    let (xm, _) = FeatureSet::open(&featsm).unwrap().load(p).unwrap();
    let mean = e.states[0].mean(0).unwrap();
    let diff = (xm.get(3).unwrap() - mean).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert_eq!(diff, 0.0, "mean pooling = mean of extract's states");

    // Train, eval (files), sweep, vector from-probe.
    let head = dir.path().join("h.safetensors");
    let out = run(&[
        "probe",
        "train",
        "--features",
        s(&feats),
        "--layer",
        "14",
        "--epochs",
        "40",
        "--lr",
        "0.01",
        "--test-split",
        "0.25",
        "--out",
        s(&head),
    ]);
    assert!(out.contains("held-out accuracy"), "{out}");
    let ev = dir.path().join("ev");
    let out = run(&["probe", "eval", "--head", s(&head), "--out", s(&ev)]);
    assert!(out.contains("majority baseline") && out.contains("Confusion matrix"), "{out}");
    let j: Value = serde_json::from_str(&std::fs::read_to_string(ev.join("eval.json")).unwrap()).unwrap();
    assert!(j["accuracy"].as_f64().unwrap() >= 0.9, "animal vs arithmetic at layer 14: {out}");
    assert_eq!(j["majority_baseline"].as_f64().unwrap(), 0.5);
    assert!(std::fs::read(ev.join("confusion.png")).unwrap().starts_with(b"\x89PNG"));
    let sw = dir.path().join("sw");
    let out = run(&["probe", "sweep", "--features", s(&feats), "--epochs", "20", "--out", s(&sw)]);
    assert!(out.contains("blocks.0.hook_resid_post") && out.contains("blocks.29.hook_resid_post"), "{out}");
    assert!(std::fs::read(sw.join("sweep.png")).unwrap().starts_with(b"\x89PNG"));
    assert!(Head::load(&sw.join("heads/blocks.14.hook_resid_post.safetensors")).is_ok());
    let vec = dir.path().join("v.safetensors");
    run(&["vector", "from-probe", s(&head), "--class", "math", "--out", s(&vec)]);
    let v = miniwob_steer::steering::vector::SteeringVector::load(&vec).unwrap();
    assert_eq!(v.layers.keys().copied().collect::<Vec<_>>(), [14]);
    assert_eq!(v.meta.weights_hash, m.info().weights_hash);
    assert!(v.meta.mean_resid_norm[&14] > 0.0);

    // The gate reads the same probability on the prompt as the head on its stored features.
    let gate = Gate::load(&head, "math", 0.5).unwrap();
    gate.check_model(m.info()).unwrap();
    let h = Head::load(&head).unwrap();
    let want = h.probs_tensor(&x.get(3).unwrap().unsqueeze(0).unwrap()).unwrap()[0][1];
    let got = gate
        .read_prompts(m.decoder(), &[ids.clone(), tok.encode(&text.replace("10", "1"), false).unwrap()], 0)
        .unwrap();
    assert_eq!(got[0].probability.to_bits(), want.to_bits());
    assert!(got[0].on && got[1].on, "{got:?}");
    assert_eq!(Gate::coeffs(&got, 4.0), [4.0, 4.0]);
    let strict = Gate::load(&head, "animal", 0.5).unwrap();
    let off = strict.read_prompts(m.decoder(), &[ids], 0).unwrap();
    assert!(!off[0].on && (off[0].probability + got[0].probability - 1.0).abs() < 1e-5);
    assert!(format!("{:#}", Gate::load(&head, "plants", 0.5).unwrap_err()).contains("animal, math"));
}

#[test]
fn image_rows_on_the_tiny_qwen2_vl() {
    let vl = common::fixture("tiny-qwen2-vl");
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("d.jsonl");
    let img = |n: &str| vl.join("images").join(n).display().to_string();
    let mut rows = Vec::new();
    for k in 0..6 {
        rows.push(json!({"image": img("wide.png"), "text": format!("Describe {k}."), "label": "wide"}));
        rows.push(json!({"image": img("tall.png"), "text": format!("Describe {k}."), "label": "tall"}));
    }
    write_jsonl(&data, &rows);
    let feats = dir.path().join("f");
    run(&[
        "probe",
        "features",
        "--model",
        s(&vl),
        "--device",
        "cpu",
        "--data",
        s(&data),
        "--layers",
        "all",
        "--pool",
        "image-mean",
        "--save-dtype",
        "f16",
        "--out",
        s(&feats),
    ]);
    let fs = FeatureSet::open(&feats).unwrap();
    assert_eq!(fs.manifest.pool, Pool::ImageMean);
    assert_eq!(fs.manifest.save_dtype, "f16");
    // image-mean = the mean of extract's image-position states (then stored as f16).
    let m = Loaded::load(s(&vl), &candle_core::Device::Cpu, "f32".parse().unwrap()).unwrap();
    let Loaded::Vlm(vlm) = &m else { panic!("a VLM") };
    let im = image::open(img("tall.png")).unwrap().to_rgb8();
    let size = (im.width() as usize, im.height() as usize);
    let input = vlm.user_prompt(&[im], "Describe 0.").unwrap();
    let p = HookPoint::ResidPost(1);
    let e = miniwob_steer::interp::extract::extract_vlm(
        &**vlm,
        &input,
        &[size],
        &[p],
        miniwob_steer::models::Positions::Image,
    )
    .unwrap();
    let want = e.states[0].mean(0).unwrap().to_dtype(DType::F16).unwrap().to_dtype(DType::F32).unwrap();
    let (x, labels) = fs.load(p).unwrap();
    assert_eq!(labels[1], 0, "tall < wide");
    let d = (x.get(1).unwrap() - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert_eq!(d, 0.0);
    let head = dir.path().join("h.safetensors");
    run(&[
        "probe",
        "train",
        "--features",
        s(&feats),
        "--layer",
        "1",
        "--epochs",
        "30",
        "--lr",
        "0.01",
        "--val-split",
        "0.2",
        "--test-split",
        "0.2",
        "--out",
        s(&head),
    ]);
    let out = run(&["probe", "eval", "--head", s(&head), "--split", "all"]);
    assert!(out.contains("| 12 | 100.0%"), "two different images, every row: {out}");
    // A text model refuses image rows; image-mean refuses text rows, naming the cause.
    let o = Command::new(env!("CARGO_BIN_EXE_miniwob-steer"))
        .args([
            "probe",
            "features",
            "--model",
            "smollm2-135m",
            "--device",
            "cpu",
            "--data",
            s(&data),
            "--out",
            s(&dir.path().join("x")),
        ])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&o.stderr).contains("need a vision-language model"));
}

#[test]
fn hidden_size_from_text_config_or_the_embedding_shape() {
    let src = common::fixture("tiny-qwen2");
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(src.join("model.safetensors"), dir.path().join("model.safetensors")).unwrap();
    let mut cfg: Value = serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    let want = cfg["hidden_size"].as_u64().unwrap() as usize;
    cfg.as_object_mut().unwrap().remove("hidden_size");
    let p = dir.path().join("config.json");
    std::fs::write(&p, cfg.to_string()).unwrap();
    let c = miniwob_steer::models::DecoderConfig::from_file(&p).unwrap();
    assert_eq!(c.hidden_size, want, "from model.embed_tokens.weight's shape");
    // In text_config (Qwen3-VL's layout).
    cfg["text_config"] = json!({"hidden_size": want});
    std::fs::write(&p, cfg.to_string()).unwrap();
    assert_eq!(miniwob_steer::models::DecoderConfig::from_file(&p).unwrap().hidden_size, want);
    // Nowhere: the error says where it looked.
    cfg.as_object_mut().unwrap().remove("text_config");
    std::fs::write(&p, cfg.to_string()).unwrap();
    std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    let e = miniwob_steer::models::DecoderConfig::from_file(&p).unwrap_err().to_string();
    assert!(
        e.contains("no `hidden_size` at the top level or in `text_config`") && e.contains("embed_tokens.weight"),
        "{e}"
    );
}

#[test]
fn probe_data_from_real_chromium() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("fam.jsonl");
    run(&[
        "probe",
        "data",
        "--label",
        "family",
        "--tasks",
        "click-test,enter-text,choose-list",
        "--seeds-per-task",
        "2",
        "--out",
        s(&out),
    ]);
    let ds = miniwob_steer::probe::data::read(&out).unwrap();
    assert_eq!(ds.classes, ["click", "select", "type"]);
    assert_eq!(ds.rows.len(), 6);
    assert_eq!(ds.rows[2].meta["task"], "enter-text");
    assert_eq!(ds.rows[2].meta["seed"], 100_000);
    assert!(ds.rows[2].text.contains("Task: ") && ds.rows[2].text.contains("Page elements:"), "{}", ds.rows[2].text);
    // The row text is the text agent's user turn for that episode, from the runner's prompt builder.
    let again = dir.path().join("task.jsonl");
    run(&[
        "probe",
        "data",
        "--label",
        "task",
        "--tasks",
        "enter-text,click-test",
        "--seeds-per-task",
        "1",
        "--images",
        "--out",
        s(&again),
    ]);
    let t = miniwob_steer::probe::data::read(&again).unwrap();
    assert_eq!(t.rows.len(), 2);
    let img = t.rows[1].image.clone().unwrap();
    assert!(img.ends_with("images/click-test-100000.png"), "{img:?}");
    assert!(image::open(&img).unwrap().width() > 100);
    // success labels from a results file's baseline episodes.
    let res = dir.path().join("r.jsonl");
    let line = |seed: u64, ok: bool, c: &str| {
        json!({"task": "click-test", "seed": seed, "condition": c, "success": ok}).to_string()
    };
    std::fs::write(
        &res,
        [line(3, true, "baseline"), line(3, false, "steered"), line(4, false, "baseline")].join("\n") + "\n",
    )
    .unwrap();
    let sfile = dir.path().join("s.jsonl");
    run(&["probe", "data", "--label", "success", "--results", s(&res), "--out", s(&sfile)]);
    let sd = miniwob_steer::probe::data::read(&sfile).unwrap();
    assert_eq!(
        sd.rows.iter().map(|r| (r.meta["seed"].as_u64().unwrap(), r.label.as_str())).collect::<Vec<_>>(),
        [(3, "true"), (4, "false")]
    );
}

/// A head that gives class `on` probability ≈ 1 (`on = true`) or ≈ 0 whatever the input: the
/// gate's two extremes, whose runs must equal the ungated steered run and the baseline.
/// Issue 21.6: `run --gate` on real Chromium with smollm2: a gate that is always on gives the
/// ungated steered outputs, one that is always off gives the baseline's (α = 0 is bit-identical
/// to no steering), and every steered line records each step's probability and decision.
#[test]
fn gated_steering_end_to_end_on_smollm2() {
    let dir = tempfile::tempdir().unwrap();
    let (on, off) = (dir.path().join("on.safetensors"), dir.path().join("off.safetensors"));
    common::constant_head(&on, 576, 15, true, Pool::Last);
    common::constant_head(&off, 576, 15, false, Pool::Last);
    let base = [
        "run",
        "--model",
        "smollm2-135m",
        "--dtype",
        "f32",
        "--tasks",
        "click-test,click-button",
        "--eval-steps",
        "2",
        "--train-steps",
        "2",
        "--coeff-mode",
        "relative",
        "--coeff",
        "1.5",
        "--layer",
        "15",
        "--max-new-tokens",
        "10",
        "--no-progress",
    ];
    let go = |name: &str, extra: &[&str]| -> (Vec<Value>, String) {
        let out = dir.path().join(format!("{name}.jsonl"));
        let mut args: Vec<&str> = base.to_vec();
        args.extend(["--out", out.to_str().unwrap()]);
        args.extend(extra);
        let log = run(&args);
        let lines = std::fs::read_to_string(&out).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        (lines, log)
    };
    let outputs = |ls: &[Value], cond: &str| -> Vec<(String, u64, String)> {
        let mut v: Vec<_> = ls
            .iter()
            .filter(|l| l["condition"] == cond)
            .map(|l| {
                (
                    l["task"].as_str().unwrap().to_string(),
                    l["seed"].as_u64().unwrap(),
                    l["output"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        v.sort();
        v
    };
    let (plain, _) = go("plain", &[]);
    assert!(plain.iter().all(|l| l.get("gate").is_none()));
    assert_ne!(
        outputs(&plain, "steered"),
        outputs(&plain, "baseline"),
        "α = 1.5 × the residual norm should change some output"
    );
    let (gated_on, log) = go("on", &["--gate", on.to_str().unwrap(), "--gate-class", "on", "--gate-threshold", "0.5"]);
    assert_eq!(outputs(&gated_on, "steered"), outputs(&plain, "steered"), "an always-on gate is the ungated run");
    assert!(log.contains("gate on 4/4 steered steps"), "{log}");
    let (gated_off, log) = go("off", &["--gate", off.to_str().unwrap(), "--gate-class", "on"]);
    assert_eq!(outputs(&gated_off, "steered"), outputs(&plain, "baseline"), "an always-off gate is the baseline");
    assert!(log.contains("gate on 0/4 steered steps"), "{log}");
    for (ls, want) in [(&gated_on, true), (&gated_off, false)] {
        for l in ls.iter() {
            if l["condition"] == "steered" {
                let g = l["gate"].as_array().unwrap();
                assert_eq!(g.len(), l["steps"].as_u64().unwrap() as usize);
                assert!(g.iter().all(|d| d["on"] == want && (d["probability"].as_f64().unwrap() > 0.5) == want), "{l}");
            } else {
                assert!(l.get("gate").is_none(), "baseline lines have no gate decisions");
            }
        }
    }
    // The gate is part of the configuration: the same --out under another gate is refused.
    let out = dir.path().join("on.jsonl");
    let o = Command::new(env!("CARGO_BIN_EXE_miniwob-steer"))
        .args(base)
        .args(["--out", out.to_str().unwrap(), "--gate", off.to_str().unwrap(), "--gate-class", "on"])
        .output()
        .unwrap();
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("gate"));
}

/// The gate's last-token reading through the prefix cache (what `run --gate` uses for `last`
/// heads) gives the bits of a full prefill, and leaves the prompt's prefix cached for the
/// generation that follows.
#[test]
fn gate_reading_through_the_prefix_cache_is_exact() {
    use miniwob_steer::models::engine::Engine;
    use miniwob_steer::models::prefix_cache::PrefixCache;
    let m = miniwob_steer::models::load::LoadedModel::load(
        common::gguf_path("smollm2-135m").to_str().unwrap(),
        &Device::Cpu,
        miniwob_steer::models::WeightDType::F32,
    )
    .unwrap();
    let prompts: Vec<Vec<u32>> = [
        "Click the button labelled OK on the page below, then stop.",
        "Type the word blue into the colour field.",
        "Select the second option of the list.",
    ]
    .iter()
    .map(|t| m.tokenizer.encode(&t.repeat(6), false).unwrap())
    .collect();
    let rows: Vec<&Vec<u32>> = prompts.iter().collect();
    let point = HookPoint::ResidPost(15);
    let mut cache = PrefixCache::new(64);
    let fast = m.last_prompt_states(&rows, point, &mut cache).unwrap();
    let full = m.prompt_states(&rows, point).unwrap();
    for (r, (a, b)) in fast.iter().zip(&full).enumerate() {
        let n = b.dim(0).unwrap();
        let (a, b): (Vec<f32>, Vec<f32>) = (a.to_vec1().unwrap(), b.get(n - 1).unwrap().to_vec1().unwrap());
        assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()), "row {r}: not the full prefill's bits");
    }
    let before = cache.stats();
    let cfg = miniwob_steer::models::generate::GenerateConfig { max_new_tokens: 1, ..Default::default() };
    m.generate(&rows, &cfg, &Default::default(), &mut cache, None).unwrap();
    let after = cache.stats();
    // Every whole cache block of each prompt but its last token was served, none recomputed.
    let block = miniwob_steer::models::prefix_cache::BLOCK;
    let want: usize = prompts.iter().map(|p| (p.len() - 1) / block * block).sum();
    assert!(want >= 3 * block, "prompts long enough to fill blocks");
    assert_eq!(
        (after.hit_tokens - before.hit_tokens) as usize,
        want,
        "the generation reused the gate's prefixes: {after:?}"
    );
}
