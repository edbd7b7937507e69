//! The Qwen2.5-VL vision tower against transformers 5.17 (tests/fixtures/tiny-qwen2.5-vl, made by
//! scripts/goldens/qwen2_5_vl_goldens.py): a tiny seeded tower (depth 3, block 1 full attention,
//! 2×2-token windows) on two aspect ratios (one filling exactly two windows, one with partial
//! windows) and on both images in one call.
mod common;

use candle_core::{DType, Device, Tensor};
use miniwob_steer::models::qwen2_5_vl::{window_index, Qwen25VisionConfig, Qwen25VisionTower};
use miniwob_steer::models::qwen2_vl::{process, ProcessorConfig};
use miniwob_steer::models::WeightDType;
use std::collections::HashMap;

const FIXTURE: &str = "tiny-qwen2.5-vl";

fn reference() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(common::fixture(FIXTURE).join("reference.safetensors"), &Device::Cpu).unwrap()
}

fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    diff / b.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap().max(1.0)
}

fn grids(r: &HashMap<String, Tensor>, s: &str) -> Vec<[usize; 3]> {
    r[&format!("{s}.grid_thw")]
        .to_vec2::<i64>()
        .unwrap()
        .iter()
        .map(|g| [g[0] as usize, g[1] as usize, g[2] as usize])
        .collect()
}

fn pixels(names: &[&str]) -> (Tensor, Vec<[usize; 3]>) {
    let dir = common::fixture(FIXTURE);
    let pc = ProcessorConfig::from_dir(&dir).unwrap();
    let mut px = Vec::new();
    let mut gs = Vec::new();
    let mut dim = 0;
    for n in names {
        let img = image::open(dir.join("images").join(format!("{n}.png"))).unwrap().to_rgb8();
        let p = process(&img, &pc).unwrap();
        px.extend_from_slice(&p.pixel_values);
        gs.push(p.grid_thw);
        dim = p.patch_dim;
    }
    let rows = px.len() / dim;
    (Tensor::from_vec(px, (rows, dim), &Device::Cpu).unwrap(), gs)
}

const SAMPLES: [(&str, &[&str]); 3] = [("tall", &["tall"]), ("wide", &["wide"]), ("both", &["tall", "wide"])];

#[test]
fn config_parses_the_tiny_tower() {
    let c = Qwen25VisionConfig::from_file(&common::fixture(FIXTURE).join("config.json")).unwrap();
    assert_eq!((c.depth, c.hidden_size, c.intermediate_size, c.num_heads), (3, 32, 48, 4));
    assert_eq!((c.window_size, c.window_tokens(), c.out_hidden_size), (16, 2, 48));
    assert_eq!(c.fullatt_block_indexes, vec![1]);
    // A Qwen2-VL config is refused with the reason.
    let e = Qwen25VisionConfig::from_file(&common::fixture("tiny-qwen2-vl").join("config.json")).unwrap_err();
    assert!(format!("{e:#}").contains("not a Qwen2.5-VL vision tower"), "{e:#}");
}

#[test]
fn processor_matches_transformers() {
    let r = reference();
    for (s, names) in SAMPLES {
        let (px, gs) = pixels(names);
        assert_eq!(gs, grids(&r, s), "{s}: grid");
        let e = rel_err(&px, &r[&format!("{s}.pixel_values")]);
        assert!(e < 1e-5, "{s}: pixel_values differ by {e}");
    }
}

#[test]
fn window_index_matches_transformers() {
    let r = reference();
    for (s, _) in SAMPLES {
        let (idx, lens) = window_index(&grids(&r, s), 2, 2);
        let want: Vec<usize> =
            r[&format!("{s}.window_index")].to_vec1::<i64>().unwrap().iter().map(|&x| x as usize).collect();
        assert_eq!(idx, want, "{s}: window index");
        let cu: Vec<usize> =
            r[&format!("{s}.cu_window_seqlens")].to_vec1::<i64>().unwrap().iter().map(|&x| x as usize).collect();
        let mut ours = vec![0];
        for l in lens {
            ours.push(ours.last().unwrap() + l);
        }
        assert_eq!(ours, cu, "{s}: window boundaries");
    }
}

#[test]
fn blocks_and_merger_output_match_transformers_on_two_aspect_ratios() {
    let r = reference();
    let tower = Qwen25VisionTower::from_dir(&common::fixture(FIXTURE), &Device::Cpu, WeightDType::F32).unwrap();
    for (s, names) in SAMPLES {
        let (px, gs) = pixels(names);
        let (pre, _) = tower.encode(&px, &gs).unwrap();
        let e = rel_err(&pre, &r[&format!("{s}.pre_merge")]);
        assert!(e < 1e-4, "{s}: blocks' output differs by {e}");
        let out = tower.forward(&px, &gs).unwrap();
        let e = rel_err(&out, &r[&format!("{s}.vision_out")]);
        assert!(e < 1e-4, "{s}: merger output differs by {e}");
    }
}

/// Full attention everywhere (Qwen2-VL's pattern) misses the golden: the windows matter.
#[test]
fn without_windows_the_golden_fails() {
    let dir = common::fixture(FIXTURE);
    let tmp = tempfile::tempdir().unwrap();
    std::fs::copy(dir.join("model.safetensors"), tmp.path().join("model.safetensors")).unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    cfg["vision_config"]["fullatt_block_indexes"] = serde_json::json!([0, 1, 2]);
    std::fs::write(tmp.path().join("config.json"), cfg.to_string()).unwrap();
    let tower = Qwen25VisionTower::from_dir(tmp.path(), &Device::Cpu, WeightDType::F32).unwrap();
    let r = reference();
    let (px, gs) = pixels(&["wide"]);
    let e = rel_err(&tower.forward(&px, &gs).unwrap(), &r["wide.vision_out"]);
    assert!(e > 1e-3, "full attention in every block still matched ({e})");
}

#[test]
fn wrong_shapes_and_qwen2_vl_weights_are_named() {
    let dir = common::fixture(FIXTURE);
    let tmp = tempfile::tempdir().unwrap();
    std::fs::copy(dir.join("model.safetensors"), tmp.path().join("model.safetensors")).unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    cfg["vision_config"]["intermediate_size"] = 64.into();
    std::fs::write(tmp.path().join("config.json"), cfg.to_string()).unwrap();
    let e = format!("{:#}", Qwen25VisionTower::from_dir(tmp.path(), &Device::Cpu, WeightDType::F32).err().unwrap());
    assert!(
        e.contains("visual.blocks.0.mlp.gate_proj.weight") && e.contains("[64, 32]") && e.contains("[48, 32]"),
        "{e}"
    );
    let _ = DType::F32;
}
