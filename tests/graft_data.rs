//! `graft data` on real headless Chromium (needs ./scripts/setup.sh): screenshot QA pairs whose
//! answers come from the DOM, readable by `graft train`, and one training step on them.
mod common;

use candle_core::Device;
use miniwob_steer::graft::data::{collect, DataOptions};
use miniwob_steer::graft::init::{init, InitOptions};
use miniwob_steer::graft::train::{self, read_samples, RunControl, TrainOptions};
use miniwob_steer::graft::Hybrid;
use miniwob_steer::models::WeightDType;

#[test]
fn screenshot_qa_from_miniwob_trains_the_tiny_graft() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("qa.jsonl");
    let o = DataOptions { tasks: vec!["click-button".into()], seeds: vec![0, 1], out: out.clone(), per_kind: 2 };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let n = rt.block_on(collect(&o)).unwrap();
    let lines: Vec<serde_json::Value> =
        std::fs::read_to_string(&out).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), n);
    for seed in [0u64, 1] {
        let kinds: Vec<&str> =
            lines.iter().filter(|l| l["seed"] == seed).map(|l| l["kind"].as_str().unwrap()).collect();
        assert_eq!(kinds.iter().filter(|&&k| k == "instruction").count(), 1, "seed {seed}: {kinds:?}");
        assert!(kinds.contains(&"label") && kinds.contains(&"locate"), "seed {seed}: {kinds:?}");
    }
    // click-button's instruction names the button; a button of that text is marked and asked about.
    let instr = lines.iter().find(|l| l["seed"] == 0 && l["kind"] == "instruction").unwrap();
    let utter = instr["response"].as_str().unwrap();
    assert!(utter.starts_with("Click on the \""), "{utter}");
    let target = utter.split('"').nth(1).unwrap();
    assert!(lines.iter().any(|l| l["seed"] == 0 && l["kind"] == "label" && l["response"] == target), "{target}");
    // Screenshots are the Set-of-Marks task area.
    let img = image::open(dir.path().join(instr["image"].as_str().unwrap())).unwrap();
    assert!(img.width() >= 160 && img.height() >= 210);
    // graft train reads them; one step runs.
    let samples = read_samples(&out).unwrap();
    assert_eq!(samples.len(), n);
    let h = dir.path().join("hybrid");
    init(&InitOptions {
        vision: common::fixture("tiny-qwen2.5-vl"),
        lm: common::fixture("tiny-qwen3"),
        out: h.clone(),
        seed: 0,
        force: false,
    })
    .unwrap();
    let mut hy = Hybrid::load(&h, &Device::Cpu, WeightDType::F32).unwrap();
    let t = TrainOptions { data: out, epochs: 1, checkpoint_every: 0, ..Default::default() };
    let r = train::train(&mut hy, &t, &RunControl { stop_after: Some(1), ..Default::default() }).unwrap();
    assert_eq!(r.steps, 1);
    assert!(r.losses[0].loss.is_finite());
}
