//! The graft (tests/fixtures/tiny-qwen2.5-vl's vision tower on tests/fixtures/tiny-qwen3 through a
//! trained adapter): `graft init`, two training steps against the torch reference
//! (scripts/goldens/graft_goldens.py, tests/fixtures/tiny-graft), the loss mask, resume after an
//! interruption, the NaN stop, frozen weights, and the loss drop on 16 screenshot QA pairs.
mod common;

use candle_core::{DType, Device, Tensor};
use miniwob_steer::graft::init::{init, InitOptions};
use miniwob_steer::graft::train::{self, encode_sample, read_samples, RunControl, TrainOptions};
use miniwob_steer::graft::{GraftConfig, Hybrid, ADAPTER_FILE};
use miniwob_steer::models::WeightDType;
use std::path::{Path, PathBuf};

fn make_hybrid(dir: &Path, seed: u64) -> GraftConfig {
    init(&InitOptions {
        vision: common::fixture("tiny-qwen2.5-vl"),
        lm: common::fixture("tiny-qwen3"),
        out: dir.to_path_buf(),
        seed,
        force: true,
    })
    .unwrap()
}

fn load(dir: &Path) -> Hybrid {
    Hybrid::load(dir, &Device::Cpu, WeightDType::F32).unwrap()
}

fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
}

fn file_sha(p: &Path) -> Vec<u8> {
    use sha2::Digest;
    sha2::Sha256::digest(std::fs::read(p).unwrap()).to_vec()
}

fn reference() -> std::collections::HashMap<String, Tensor> {
    candle_core::safetensors::load(common::fixture("tiny-graft").join("reference.safetensors"), &Device::Cpu).unwrap()
}

fn scalar(r: &std::collections::HashMap<String, Tensor>, k: &str) -> f64 {
    r[k].to_vec1::<f32>().unwrap()[0] as f64
}

/// A hybrid whose adapter starts from the torch reference's initial weights.
fn reference_hybrid(dir: &Path) -> Hybrid {
    make_hybrid(dir, 1);
    std::fs::copy(common::fixture("tiny-graft").join("adapter.init.safetensors"), dir.join(ADAPTER_FILE)).unwrap();
    load(dir)
}

fn reference_options() -> TrainOptions {
    let s = common::fixture_json("tiny-graft", "settings.json");
    TrainOptions {
        data: common::fixture("tiny-graft").join("sample.jsonl"),
        lr: s["lr"].as_f64().unwrap(),
        clip: Some(s["clip"].as_f64().unwrap()),
        beta1: s["beta1"].as_f64().unwrap(),
        beta2: s["beta2"].as_f64().unwrap(),
        eps: s["eps"].as_f64().unwrap(),
        weight_decay: s["weight_decay"].as_f64().unwrap(),
        strip_think: s["strip_think"].as_bool().unwrap(),
        batch_size: 1,
        epochs: 2,
        seed: 0,
        checkpoint_every: 1,
    }
}

#[test]
fn init_writes_a_hybrid_with_both_sources_and_a_seeded_adapter() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = make_hybrid(tmp.path(), 7);
    assert_eq!((cfg.adapter.in_features, cfg.adapter.out_features), (48, 32));
    assert_eq!((cfg.vision.model_type.as_str(), cfg.lm.model_type.as_str()), ("qwen2_5_vl", "qwen3"));
    assert_eq!((cfg.vision_start_token_id, cfg.image_token_id, cfg.vision_end_token_id), (3, 5, 4));
    assert!(!cfg.vision.weights_hash.is_empty() && !cfg.lm.weights_hash.is_empty());
    for f in ["graft.json", "adapter.safetensors", "tokenizer.json", "chat_template.jinja", "preprocessor_config.json"]
    {
        assert!(tmp.path().join(f).exists(), "{f} missing");
    }
    let h = load(tmp.path());
    let w = h.adapter.weight.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let bound = 1.0 / 48f32.sqrt();
    assert!(w.iter().all(|x| x.abs() <= bound) && w.iter().any(|x| x.abs() > bound * 0.9));
    assert_eq!(h.adapter.bias.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
    // Same seed, same bytes; another seed, other weights.
    let again = tempfile::tempdir().unwrap();
    make_hybrid(again.path(), 7);
    assert_eq!(max_abs(&load(again.path()).adapter.weight, &h.adapter.weight), 0.0);
    make_hybrid(again.path(), 8);
    assert!(max_abs(&load(again.path()).adapter.weight, &h.adapter.weight) > 0.0);
    // An existing hybrid is not overwritten without --force.
    let e = init(&InitOptions {
        vision: common::fixture("tiny-qwen2.5-vl"),
        lm: common::fixture("tiny-qwen3"),
        out: tmp.path().to_path_buf(),
        seed: 7,
        force: false,
    })
    .unwrap_err();
    assert!(format!("{e:#}").contains("--force"), "{e:#}");
}

#[test]
fn an_lm_without_the_placeholder_tokens_is_a_clear_error() {
    let lm = tempfile::tempdir().unwrap();
    let src = common::fixture("tiny-qwen3");
    for f in ["config.json", "model.safetensors", "tokenizer_config.json", "chat_template.jinja"] {
        std::fs::copy(src.join(f), lm.path().join(f)).unwrap();
    }
    let tj = std::fs::read_to_string(src.join("tokenizer.json")).unwrap().replace("<|image_pad|>", "<|imagepad|>");
    std::fs::write(lm.path().join("tokenizer.json"), tj).unwrap();
    let out = tempfile::tempdir().unwrap();
    let e = init(&InitOptions {
        vision: common::fixture("tiny-qwen2.5-vl"),
        lm: lm.path().to_path_buf(),
        out: out.path().join("h"),
        seed: 0,
        force: false,
    })
    .unwrap_err();
    let e = format!("{e:#}");
    assert!(e.contains("<|image_pad|>") && e.contains("tokenizer.json") && !e.contains("<|vision_start|>,"), "{e}");
    assert!(!out.path().join("h").exists(), "a failed init left a directory");
}

#[test]
fn sample_ids_loss_mask_and_features_equal_the_reference() {
    let tmp = tempfile::tempdir().unwrap();
    let h = reference_hybrid(tmp.path());
    let r = reference();
    let s = read_samples(&common::fixture("tiny-graft").join("sample.jsonl")).unwrap();
    let e = encode_sample(&h, &s[0], true).unwrap();
    let want: Vec<u32> = r["input_ids"].to_vec1::<i64>().unwrap().iter().map(|&x| x as u32).collect();
    assert_eq!(e.ids, want, "ids\nours {:?}\nref  {want:?}", h.tokenizer.decode(&e.ids, false).unwrap());
    let mask: Vec<bool> = r["loss_mask"].to_vec1::<i64>().unwrap().iter().map(|&x| x == 1).collect();
    assert_eq!(e.loss_mask(), mask);
    assert_eq!(mask.iter().filter(|&&m| m).count(), h.tokenizer.encode("OK<|im_end|>", false).unwrap().len());
    let f = h.vision_features(&e.image).unwrap();
    let d = max_abs(&f, &r["image_features"]);
    assert!(d < 1e-4, "vision features differ by {d}");
}

#[test]
fn two_training_steps_equal_the_torch_reference() {
    let tmp = tempfile::tempdir().unwrap();
    let mut h = reference_hybrid(tmp.path());
    let r = reference();
    let o = reference_options();
    let out = train::train(&mut h, &o, &RunControl::default()).unwrap();
    assert!(out.finished && out.steps == 2);
    for (i, l) in out.losses.iter().enumerate() {
        let s = i + 1;
        let want = scalar(&r, &format!("loss.{s}"));
        assert!((l.loss - want).abs() < 1e-5 * want.max(1.0), "step {s}: loss {} vs torch {want}", l.loss);
        let want = scalar(&r, &format!("grad_norm.{s}"));
        assert!(
            (l.grad_norm - want).abs() < 1e-4 * want.max(1.0),
            "step {s}: grad norm {} vs torch {want}",
            l.grad_norm
        );
        assert!(l.grad_norm > o.clip.unwrap(), "the clipping did not act at step {s}");
    }
    let dw = max_abs(&out.adapter.weight, &r["weight.2"]);
    let db = max_abs(&out.adapter.bias, &r["bias.2"]);
    assert!(dw < 1e-5 && db < 1e-5, "after two steps the adapter differs from torch's by {dw} (weight), {db} (bias)");
    // The steps really moved it (by far more than the tolerance).
    let init =
        candle_core::safetensors::load(common::fixture("tiny-graft").join("adapter.init.safetensors"), &Device::Cpu)
            .unwrap();
    assert!(max_abs(&out.adapter.weight, &init["adapter.weight"]) > 1e-3);
    // The step-1 checkpoint equals torch after one step.
    let c = candle_core::safetensors::load(out.run_dir.join("step-000001.safetensors"), &Device::Cpu).unwrap();
    assert!(max_abs(&c["adapter.weight"], &r["weight.1"]) < 1e-5);
    // The trained adapter is the hybrid's now, the init kept beside it, the record written.
    let again = load(tmp.path());
    assert_eq!(max_abs(&again.adapter.weight, &out.adapter.weight), 0.0);
    assert!(tmp.path().join("adapter.init.safetensors").exists());
    let t = again.cfg.training.unwrap();
    assert_eq!(t["frozen_digest_before"], t["frozen_digest_after"]);
    assert!(tmp.path().join("train/loss.png").exists());
}

#[test]
fn an_interrupted_run_resumes_without_repeating_or_skipping() {
    let data = sixteen_pairs();
    let o = TrainOptions {
        data: data.path().join("qa.jsonl"),
        lr: 1e-2,
        epochs: 2,
        batch_size: 3,
        checkpoint_every: 2,
        seed: 5,
        ..Default::default()
    };
    // Uninterrupted.
    let a = tempfile::tempdir().unwrap();
    make_hybrid(a.path(), 3);
    let full = train::train(&mut load(a.path()), &o, &RunControl::default()).unwrap();
    // 16 samples in batches of 3: 6 steps per epoch.
    assert_eq!(full.steps, 12);
    // Killed after 5 steps (the last checkpoint is step 4), then resumed in a new process' worth of state.
    let b = tempfile::tempdir().unwrap();
    make_hybrid(b.path(), 3);
    let part =
        train::train(&mut load(b.path()), &o, &RunControl { stop_after: Some(5), ..Default::default() }).unwrap();
    assert!(!part.finished && part.steps == 5);
    let before = load(b.path()).adapter.weight;
    let rest = train::train(&mut load(b.path()), &o, &RunControl::default()).unwrap();
    assert!(rest.finished);
    assert!(max_abs(&before, &rest.adapter.weight) > 0.0);
    assert!(max_abs(&before, &load(a.path()).adapter.weight) > 0.0, "the interrupted run wrote the final adapter");
    // Every step once, in the same order, with the same numbers: the result is bit-identical.
    let steps: Vec<usize> = rest.losses.iter().map(|l| l.step).collect();
    assert_eq!(steps, (1..=12).collect::<Vec<_>>());
    let samples = |ls: &[train::StepLog]| ls.iter().map(|l| l.samples.clone()).collect::<Vec<_>>();
    assert_eq!(samples(&rest.losses), samples(&full.losses));
    let mut seen: Vec<usize> = rest.losses.iter().take(6).flat_map(|l| l.samples.clone()).collect();
    seen.sort();
    assert_eq!(seen, (0..16).collect::<Vec<_>>(), "epoch 0 visits every sample once");
    assert_eq!(max_abs(&rest.adapter.weight, &full.adapter.weight), 0.0);
    assert_eq!(max_abs(&load(a.path()).adapter.weight, &load(b.path()).adapter.weight), 0.0);
    assert_eq!(max_abs(&load(a.path()).adapter.bias, &load(b.path()).adapter.bias), 0.0);
    // Other settings refuse the checkpoints instead of mixing runs.
    let c = tempfile::tempdir().unwrap();
    make_hybrid(c.path(), 3);
    train::train(&mut load(c.path()), &o, &RunControl { stop_after: Some(2), ..Default::default() }).unwrap();
    let other = TrainOptions { lr: 5e-3, ..o.clone() };
    let e = train::train(&mut load(c.path()), &other, &RunControl::default()).expect_err("resumed with another lr");
    assert!(format!("{e:#}").contains("--restart"), "{e:#}");
}

#[test]
fn a_non_finite_loss_stops_training_naming_step_sample_and_checkpoint() {
    let data = sixteen_pairs();
    let tmp = tempfile::tempdir().unwrap();
    make_hybrid(tmp.path(), 3);
    let init_sha = file_sha(&tmp.path().join(ADAPTER_FILE));
    // An absurd learning rate: the first update overflows the activations a step or two later.
    let o = TrainOptions {
        data: data.path().join("qa.jsonl"),
        lr: 1e20,
        clip: None,
        checkpoint_every: 1,
        ..Default::default()
    };
    let e =
        format!("{:#}", train::train(&mut load(tmp.path()), &o, &RunControl::default()).expect_err("NaN not caught"));
    // Which step overflows first depends on the numbers; the message names it, a sample, and the
    // checkpoint of the step before.
    let step: usize =
        e.split("at step ").nth(1).and_then(|r| r.split(' ').next()).and_then(|n| n.parse().ok()).expect(&e);
    assert!(step >= 2 && e.contains("sample(s) #"), "{e}");
    assert!(e.contains(&format!("step-{:06}.safetensors", step - 1)), "{e}");
    assert_eq!(init_sha, file_sha(&tmp.path().join(ADAPTER_FILE)), "a failed run replaced the adapter");
    // NaN weights from the start: no checkpoint to name.
    let tmp = tempfile::tempdir().unwrap();
    make_hybrid(tmp.path(), 3);
    let h = load(tmp.path());
    let nan = miniwob_steer::graft::Adapter {
        weight: (h.adapter.weight.clone() * f64::NAN).unwrap(),
        bias: h.adapter.bias.clone(),
    };
    nan.save(&tmp.path().join(ADAPTER_FILE), &[]).unwrap();
    let o = TrainOptions { data: data.path().join("qa.jsonl"), ..Default::default() };
    let e =
        format!("{:#}", train::train(&mut load(tmp.path()), &o, &RunControl::default()).expect_err("NaN not caught"));
    assert!(e.contains("step 1") && e.contains("no checkpoint yet"), "{e}");
}

/// One token each in the tiny tokenizer, so each answer is two targets (the word, `<|im_end|>`).
const WORDS: [&str; 16] = [
    "Actions", "Select", "Click", "TEXT", "The", "You", "Let", "Ent", "Des", "ction", "istant", "ton", "wer", "ele",
    "age", "ion",
];

/// 16 screenshot QA pairs: distinct seeded pictures, one word each.
fn sixteen_pairs() -> tempfile::TempDir {
    use rand::{Rng, SeedableRng};
    let dir = tempfile::tempdir().unwrap();
    let mut lines = String::new();
    for (i, w) in WORDS.iter().enumerate() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(i as u64);
        let base = [rng.random::<u8>(), rng.random::<u8>(), rng.random::<u8>()];
        let img = image::RgbImage::from_fn(16, 32, |x, y| {
            let stripe = ((x / 4 + y / 8 + i as u32) % 2) as u8 * 60;
            image::Rgb([base[0].wrapping_add(stripe), base[1], base[2].wrapping_sub(stripe)])
        });
        let name = format!("{i}.png");
        img.save(dir.path().join(&name)).unwrap();
        let resp = if i % 2 == 0 { format!("<think>\nI see a {w}.\n</think>\n\n{w}") } else { w.to_string() };
        lines +=
            &serde_json::json!({"image": name, "prompt": "What does the picture show?", "response": resp}).to_string();
        lines.push('\n');
    }
    std::fs::write(dir.path().join("qa.jsonl"), lines).unwrap();
    dir
}

fn mean_loss(h: &Hybrid, data: &Path) -> f64 {
    let samples = read_samples(data).unwrap();
    let mut total = 0.0;
    for s in &samples {
        let e = encode_sample(h, s, true).unwrap();
        let f = h.vision_features(&e.image).unwrap();
        let l = train::sample_loss(h, &e, &f, &h.adapter.weight, &h.adapter.bias).unwrap();
        total += l.to_scalar::<f32>().unwrap() as f64;
    }
    total / samples.len() as f64
}

/// tiny-qwen3 with its (tied) embedding scaled by 4. The fixture's embeddings (0.2·N(0, 1)) and
/// unit final norm bound every logit by about |e|·|h| ≈ 6, so no input can push a token's
/// probability much past one half (a loss floor near 0.7 nats, above 10% of the initial loss);
/// scaled, the same architecture can be confident.
fn confident_lm() -> tempfile::TempDir {
    let src = common::fixture("tiny-qwen3");
    let dir = tempfile::tempdir().unwrap();
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"] {
        std::fs::copy(src.join(f), dir.path().join(f)).unwrap();
    }
    let mut t = candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).unwrap();
    let e = t.remove("model.embed_tokens.weight").unwrap();
    t.insert("model.embed_tokens.weight".into(), (e * 4.0).unwrap());
    candle_core::safetensors::save(&t, dir.path().join("model.safetensors")).unwrap();
    dir
}

#[test]
fn training_on_sixteen_pairs_drives_the_loss_down_by_ninety_percent_and_freezes_the_rest() {
    let data = sixteen_pairs();
    let tmp = tempfile::tempdir().unwrap();
    let lm = confident_lm();
    init(&InitOptions {
        vision: common::fixture("tiny-qwen2.5-vl"),
        lm: lm.path().to_path_buf(),
        out: tmp.path().to_path_buf(),
        seed: 11,
        force: false,
    })
    .unwrap();
    let sources: Vec<PathBuf> =
        vec![common::fixture("tiny-qwen2.5-vl").join("model.safetensors"), lm.path().join("model.safetensors")];
    let shas: Vec<Vec<u8>> = sources.iter().map(|p| file_sha(p)).collect();
    let mut h = load(tmp.path());
    let qa = data.path().join("qa.jsonl");
    let before = mean_loss(&h, &qa);
    let o = TrainOptions {
        data: qa.clone(),
        lr: 3e-2,
        epochs: 100,
        strip_think: true,
        checkpoint_every: 0,
        seed: 1,
        ..Default::default()
    };
    let out = train::train(&mut h, &o, &RunControl::default()).unwrap();
    let after = mean_loss(&h, &qa);
    eprintln!("mean training loss {before:.4} -> {after:.4}");
    assert!(after < 0.1 * before, "loss {before:.4} -> {after:.4}: less than a 90% drop");
    assert_eq!(out.steps, 16 * 100);
    // Vision tower and LM byte-identical: the files, and the in-memory tensors (digest).
    for (p, sha) in sources.iter().zip(&shas) {
        assert_eq!(&file_sha(p), sha, "{} changed", p.display());
    }
    let t = h.cfg.training.clone().unwrap();
    assert_eq!(t["frozen_digest_before"], t["frozen_digest_after"]);
    // The trained hybrid answers through the inference path (KV cache, hooks) what it learned:
    // `graft eval` with thinking off (the training rendering) and on.
    let o = miniwob_steer::graft::eval::EvalOptions {
        data: qa.clone(),
        modes: vec![Some(false), Some(true)],
        max_new_tokens: 8,
        samples: 3,
    };
    let rows = miniwob_steer::graft::eval::evaluate(&h, &o).unwrap();
    let right = rows[0].correct;
    eprintln!("graft eval after training: thinking off {right}/16, on {}/16", rows[1].correct);
    assert!(right >= 10, "only {right}/16 answers reproduced after training");
    assert_eq!((rows[0].n, rows[0].samples.len(), rows[1].n), (16, 3, 16));
    assert!(rows[0].samples.iter().all(|s| s.correct == (s.answer == s.expected)));
    let _ = DType::F32;
}

/// A real SIGKILL of the `graft train` process once it has written a checkpoint: rerunning the
/// same command resumes from it and ends with the uninterrupted run's adapter, bit for bit.
#[test]
fn a_killed_train_process_resumes_bit_identically() {
    use std::os::unix::process::ExitStatusExt;
    let data = sixteen_pairs();
    let qa = data.path().join("qa.jsonl");
    let cmd = |dir: &Path| {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_miniwob-steer"));
        c.args(["graft", "train", "--model"]).arg(dir).arg("--data").arg(&qa);
        c.args(["--lr", "0.01", "--epochs", "40", "--batch-size", "1", "--checkpoint-every", "8", "--seed", "5"]);
        c.args(["--device", "cpu", "--dtype", "f32"]).env("RUST_LOG", "warn");
        c.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null());
        c
    };
    let a = tempfile::tempdir().unwrap();
    make_hybrid(a.path(), 3);
    assert!(cmd(a.path()).status().unwrap().success());
    let b = tempfile::tempdir().unwrap();
    make_hybrid(b.path(), 3);
    let mut child = cmd(b.path()).spawn().unwrap();
    let has_checkpoint = || {
        std::fs::read_dir(b.path().join("train"))
            .is_ok_and(|d| d.flatten().any(|e| e.file_name().to_string_lossy().starts_with("step-")))
    };
    let t0 = std::time::Instant::now();
    while !has_checkpoint() {
        assert!(t0.elapsed().as_secs() < 120, "no checkpoint after 2 minutes");
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    child.kill().unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.signal(), Some(9), "the run finished before the kill ({status:?}): make it longer");
    let killed = load(b.path()).adapter.weight;
    // The rerun must resume from the checkpoint (a fresh start would end at the same bits too).
    let o = cmd(b.path()).env("RUST_LOG", "info").stderr(std::process::Stdio::piped()).output().unwrap();
    let log = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success() && log.contains("resuming"), "the rerun did not resume:\n{log}");
    let (ha, hb) = (load(a.path()), load(b.path()));
    assert!(max_abs(&killed, &hb.adapter.weight) > 0.0, "the rerun trained nothing");
    assert_eq!(max_abs(&ha.adapter.weight, &hb.adapter.weight), 0.0);
    assert_eq!(max_abs(&ha.adapter.bias, &hb.adapter.bias), 0.0);
}
