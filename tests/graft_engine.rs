//! The hybrid (tiny Qwen2.5-VL tower on tiny Qwen3, `graft init`) as a model of the episode
//! pipeline: `Engine::generate` on a batch of rows (shared prefixes forked, per-row steering)
//! gives each row the bits of `Hybrid::generate` alone, with the `last` selector and with others;
//! captured image states are the prefill's; and `run --vlm --model <graft dir>` runs paired
//! episodes on real Chromium and resumes.
mod common;

use candle_core::{Device, Tensor};
use miniwob_steer::graft::init::{init, InitOptions};
use miniwob_steer::graft::Hybrid;
use miniwob_steer::models::engine::Engine;
use miniwob_steer::models::generate::GenerateConfig;
use miniwob_steer::models::hooks::{AddIntervention, Captures, HookPoint, HookSpec, Positions};
use miniwob_steer::models::prefix_cache::PrefixCache;
use miniwob_steer::models::WeightDType;
use std::path::Path;

fn hybrid(dir: &Path) -> Hybrid {
    init(&InitOptions {
        vision: common::fixture("tiny-qwen2.5-vl"),
        lm: common::fixture("tiny-qwen3"),
        out: dir.to_path_buf(),
        seed: 3,
        force: true,
    })
    .unwrap();
    Hybrid::load(dir, &Device::Cpu, WeightDType::F32).unwrap()
}

fn one_row(spec: &HookSpec, r: usize) -> HookSpec {
    HookSpec {
        captures: vec![],
        interventions: spec
            .interventions
            .iter()
            .map(|iv| AddIntervention { coeffs: vec![iv.coeffs[r]], ..iv.clone() })
            .collect(),
    }
}

#[test]
fn batched_rows_are_each_row_alone() {
    let dir = tempfile::tempdir().unwrap();
    let hy = hybrid(dir.path());
    let img = image::open(common::fixture("tiny-graft").join("tall.png")).unwrap().to_rgb8();
    let a = hy.user_prompt(Some(&img), "What does the button say?", Some(false)).unwrap();
    let b = hy.user_prompt(Some(&img), "Which element holds the text?", Some(false)).unwrap();
    let c = hy.user_prompt(None, "No image here.", Some(false)).unwrap();
    let h = hy.decoder.cfg.hidden_size;
    let v = Tensor::from_vec((0..h).map(|i| ((i * 37 % 11) as f32 - 5.0) / 5.0).collect::<Vec<_>>(), h, &Device::Cpu)
        .unwrap();
    let cfg = GenerateConfig { max_new_tokens: 6, ..Default::default() };
    let rows = [&a, &a, &b, &c, &a];
    let coeffs = vec![0.0, 6.0, 6.0, 6.0, -6.0];
    let point = HookPoint::ResidPost(1);
    for positions in [Positions::Last, Positions::All] {
        let spec = HookSpec::none().add(point, v.clone(), coeffs.clone(), positions);
        let out = Engine::generate(&hy, &rows, &cfg, &spec, &mut PrefixCache::new(0), Some(point)).unwrap();
        for (r, input) in rows.iter().enumerate() {
            let alone = hy.generate(input, &cfg, &one_row(&spec, r)).unwrap();
            assert_eq!(out[r].generation, alone, "{positions:?}: row {r} differs from itself alone");
        }
        assert_ne!(out[0].generation.logits_hash, out[1].generation.logits_hash, "steering changed nothing");
        // Captured image states: the unsteered prefill's states at the image positions.
        let mut caps = Captures::default();
        hy.prefill(&a, &HookSpec::none().capture(point), &mut caps).unwrap();
        let mask = hy.image_mask(&a);
        let cols: Vec<u32> = (0..mask.len()).filter(|&i| mask[i]).map(|i| i as u32).collect();
        let n = cols.len();
        let want = caps
            .get(point)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .index_select(&Tensor::from_vec(cols, n, &Device::Cpu).unwrap(), 0)
            .unwrap();
        let got = out[0].image_states.as_ref().unwrap();
        let bits = |t: &Tensor| {
            t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|x| x.to_bits()).collect::<Vec<_>>()
        };
        if positions == Positions::Last {
            assert_eq!(bits(got), bits(&want), "image states of the forked prefix");
        }
        assert!(out[3].image_states.as_ref().is_none_or(|t| t.dim(0).unwrap() == 0), "a text row has no image states");
    }
    // The states a gate reads: the prefill's, every prompt token.
    let s = hy.prompt_states(&[&a, &c], point).unwrap();
    assert_eq!(s[0].dims(), [a.ids.len(), h]);
    assert_eq!(s[1].dims(), [c.ids.len(), h]);
}

#[test]
fn run_vlm_on_a_graft_directory() {
    let dir = tempfile::tempdir().unwrap();
    hybrid(&dir.path().join("hybrid"));
    let out = dir.path().join("g.jsonl");
    let go = || {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_miniwob-steer"))
            .args(["run", "--vlm", "--model"])
            .arg(dir.path().join("hybrid"))
            .args(["--device", "cpu", "--dtype", "f32", "--tasks", "click-test", "--eval-steps", "2"])
            .args([
                "--train-steps",
                "2",
                "--coeff",
                "4",
                "--layer",
                "1",
                "--max-new-tokens",
                "6",
                "--no-progress",
                "--out",
            ])
            .arg(&out)
            .env("RUST_LOG", "warn")
            .output()
            .unwrap();
        assert!(o.status.success(), "run --vlm (graft): {}", String::from_utf8_lossy(&o.stderr));
        std::fs::read_to_string(&out).unwrap()
    };
    let text = go();
    let lines: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 4, "1 task × 2 seeds × (baseline + steered)");
    for l in &lines {
        assert_eq!(l["vlm"], true);
        assert_eq!(l["hook_point"], "blocks.1.hook_resid_post");
        assert!(l["weights_hash"].as_str().unwrap().contains('+'), "the hybrid's three-part hash: {l}");
        assert!(l["tokens_in"].as_u64().unwrap() > 100, "the screenshot's image tokens are in the prompt: {l}");
    }
    assert_eq!(go(), text, "a rerun adds nothing");
}

/// `extract --image` on a graft directory: the hybrid's states at its image positions (through its
/// own tower and adapter), with the vision grid, equal to its prefill's, and the lenses' text
/// backbone is its LM.
#[test]
fn extract_images_from_a_graft_directory() {
    let dir = tempfile::tempdir().unwrap();
    let h = dir.path().join("hybrid");
    let hy = hybrid(&h);
    let png = common::fixture("tiny-graft").join("tall.png");
    let out = dir.path().join("x");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_miniwob-steer"))
        .args(["extract", "--model"])
        .arg(&h)
        .args(["--device", "cpu", "--dtype", "f32", "--layers", "0,2", "--save-dtype", "f32", "--image"])
        .arg(&png)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "extract (graft): {}", String::from_utf8_lossy(&o.stderr));
    let item = candle_core::safetensors::load(out.join("item-00000.safetensors"), &Device::Cpu).unwrap();
    let img = image::open(&png).unwrap().to_rgb8();
    use miniwob_steer::models::engine::VisionEngine;
    let input = hy.image_prompt(&[img], "Describe the picture.").unwrap();
    let spec = HookSpec::none().capture(HookPoint::ResidPost(0)).capture(HookPoint::ResidPost(2));
    let caps = hy.capture(&input, &spec).unwrap();
    let mask = hy.image_mask(&input);
    let cols: Vec<u32> = (0..mask.len()).filter(|&i| mask[i]).map(|i| i as u32).collect();
    let n = cols.len();
    let idx = Tensor::from_vec(cols, n, &Device::Cpu).unwrap();
    for p in [HookPoint::ResidPost(0), HookPoint::ResidPost(2)] {
        let want = caps.get(p).unwrap().squeeze(0).unwrap().index_select(&idx, 0).unwrap();
        let got = &item[&p.to_string()];
        assert_eq!(got.dims(), want.dims(), "{p}");
        let d = (got - &want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert_eq!(d, 0.0, "{p}: extract differs from the hybrid's prefill");
    }
    assert_eq!(item["grid"].dim(0).unwrap(), n, "a grid cell per vision token");
    // The embedding and logit lenses read them through the hybrid's LM (the extraction names the
    // graft directory).
    let q = dir.path().join("q.jsonl");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_miniwob-steer"))
        .args(["lens", "query", "--extracted"])
        .arg(&out)
        .args(["--lens", "embedding,logit", "--k", "3", "--device", "cpu", "--dtype", "f32", "--out"])
        .arg(&q)
        .output()
        .unwrap();
    assert!(o.status.success(), "lens query (graft): {}", String::from_utf8_lossy(&o.stderr));
    let lines = std::fs::read_to_string(&q).unwrap().lines().count();
    assert_eq!(lines, 2 * 2 * n, "item × 2 hook points × {n} tokens × 2 lenses");
}

/// `probe features` with image rows on a graft directory reads the hybrid (tower + adapter):
/// `image-mean` at a layer is the mean of its prefill's states at the image positions.
#[test]
fn probe_features_with_images_on_a_graft_directory() {
    let dir = tempfile::tempdir().unwrap();
    let h = dir.path().join("hybrid");
    let hy = hybrid(&h);
    let png = common::fixture("tiny-graft").join("tall.png");
    let data = dir.path().join("d.jsonl");
    let rows = [("What is this?", "a"), ("Name the shape.", "b")];
    let text: String =
        rows.iter().map(|(t, l)| serde_json::json!({"image": png, "text": t, "label": l}).to_string() + "\n").collect();
    std::fs::write(&data, text).unwrap();
    let out = dir.path().join("f");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_miniwob-steer"))
        .args(["probe", "features", "--model"])
        .arg(&h)
        .args(["--device", "cpu", "--dtype", "f32", "--layers", "1", "--pool", "image-mean", "--save-dtype", "f32"])
        .arg("--data")
        .arg(&data)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "probe features (graft): {}", String::from_utf8_lossy(&o.stderr));
    let fs = miniwob_steer::probe::FeatureSet::open(&out).unwrap();
    let (x, _) = fs.load(HookPoint::ResidPost(1)).unwrap();
    use miniwob_steer::models::engine::VisionEngine;
    let img = image::open(&png).unwrap().to_rgb8();
    let input = hy.image_prompt(&[img], rows[1].0).unwrap();
    let caps = hy.capture(&input, &HookSpec::none().capture(HookPoint::ResidPost(1))).unwrap();
    let mask = hy.image_mask(&input);
    let cols: Vec<u32> = (0..mask.len()).filter(|&i| mask[i]).map(|i| i as u32).collect();
    let n = cols.len();
    let want = caps
        .get(HookPoint::ResidPost(1))
        .unwrap()
        .squeeze(0)
        .unwrap()
        .index_select(&Tensor::from_vec(cols, n, &Device::Cpu).unwrap(), 0)
        .unwrap()
        .mean(0)
        .unwrap();
    let d = (x.get(1).unwrap() - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert_eq!(d, 0.0, "row 1's image-mean feature is not the hybrid's");
}
