//! `extract`, `lens index`, `lens query` and `lens grounded` end to end through the binary: image
//! files against the transformers goldens, MiniWoB screenshots from real Chromium with the tiny
//! Qwen2-VL, and text prompts on a text model.
mod common;

use candle_core::{Device, Tensor};
use miniwob_steer::interp::extract;
use miniwob_steer::interp::grounded::{self, TextBox};
use serde_json::Value;
use std::path::Path;
use std::process::Command;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_miniwob-steer"))
}

fn run(args: &[&str]) -> String {
    let o = bin().args(args).output().expect("run miniwob-steer");
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "miniwob-steer {}: {err}", args.join(" "));
    String::from_utf8_lossy(&o.stdout).into_owned() + &err
}

fn fails(args: &[&str]) -> String {
    let o = bin().args(args).output().expect("run miniwob-steer");
    assert!(!o.status.success(), "miniwob-steer {} should fail", args.join(" "));
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
}

#[test]
fn extract_image_files_matches_goldens_and_streams_items() {
    let vl = common::fixture("tiny-qwen2-vl");
    let g = candle_core::safetensors::load(common::fixture("lens").join("hidden.safetensors"), &Device::Cpu).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("ext");
    let (wide, tall) = (vl.join("images/wide.png"), vl.join("images/tall.png"));
    run(&[
        "extract",
        "--model",
        s(&vl),
        "--device",
        "cpu",
        "--image",
        s(&wide),
        s(&tall),
        "--layers",
        "hs:0,1,2,3",
        "--save-dtype",
        "f32",
        "--out",
        s(&out),
    ]);
    let files = extract::item_files(&out).unwrap();
    assert_eq!(files.len(), 2);
    for (f, name) in files.iter().zip(["wide", "tall"]) {
        let it = extract::read_item(f).unwrap();
        let hooks: Vec<String> = it.points.iter().map(|p| p.to_string()).collect();
        assert_eq!(hooks, ["hook_embed", "blocks.0.hook_resid_post", "blocks.1.hook_resid_post", "hook_final_norm"]);
        assert_eq!(it.positions, g[&format!("{name}.image_positions")].to_vec1::<i64>().unwrap());
        for (j, x) in it.states.iter().enumerate() {
            let d = max_abs(x, &g[&format!("{name}.hs.{j}")]);
            assert!(d < 1e-4 * 50.0, "{name} hs.{j}: {d}");
        }
        assert_eq!(it.meta["source"], "file");
        assert_eq!(it.grid.len(), it.boxes.len());
    }
    // One summary row per item × hook point, recomputable from the stored states.
    let rows: Vec<Value> = std::fs::read_to_string(out.join("summary.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 8);
    let it = extract::read_item(&files[1]).unwrap();
    let norms: Vec<f32> = it.states[2].sqr().unwrap().sum(1).unwrap().sqrt().unwrap().to_vec1().unwrap();
    let mean = norms.iter().sum::<f32>() / norms.len() as f32;
    let r = rows.iter().find(|r| r["item"] == "item-00001" && r["hook_point"] == "blocks.1.hook_resid_post").unwrap();
    assert!((r["norm_mean"].as_f64().unwrap() as f32 - mean).abs() < 1e-3 * mean, "{r}");
    assert_eq!(r["tokens"], 6);
    assert_eq!(std::fs::read_to_string(out.join("summary.csv")).unwrap().lines().count(), 9);
    let m: Value = serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(m["items"].as_array().unwrap().len(), 2);
    assert_eq!(m["hook_points"][3], "hook_final_norm");
    // f16 on disk: same values to f16 precision.
    let out16 = dir.path().join("ext16");
    run(&[
        "extract",
        "--model",
        s(&vl),
        "--device",
        "cpu",
        "--image",
        s(&wide),
        "--layers",
        "hs:2",
        "--out",
        s(&out16),
    ]);
    let it = extract::read_item(&extract::item_files(&out16).unwrap()[0]).unwrap();
    let want = &g["wide.hs.2"];
    let scale = want.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(max_abs(&it.states[0], want) < 1e-3 * scale);
    // Bad input names what was expected.
    let err = fails(&[
        "extract",
        "--model",
        s(&vl),
        "--device",
        "cpu",
        "--image",
        s(&wide),
        "--layers",
        "hs:4",
        "--out",
        s(&out16),
    ]);
    assert!(err.contains("hidden_states has indices 0..=3"), "{err}");
    let err =
        fails(&["extract", "--model", s(&vl), "--device", "cpu", "--image", "/nonexistent.png", "--out", s(&out16)]);
    assert!(err.contains("/nonexistent.png"), "{err}");
}

#[test]
fn miniwob_screenshots_extract_lens_and_grounded_score() {
    let vl = common::fixture("tiny-qwen2-vl");
    let dir = tempfile::tempdir().unwrap();
    let (ext, idx, res, gout) =
        (dir.path().join("ext"), dir.path().join("idx"), dir.path().join("lens.jsonl"), dir.path().join("g"));
    let corpus = dir.path().join("corpus.txt");
    let lens_json = common::fixture_json("lens", "lens.json");
    let lines: Vec<&str> = lens_json["corpus"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    std::fs::write(&corpus, lines.join("\n") + "\n").unwrap();
    run(&[
        "extract",
        "--model",
        s(&vl),
        "--device",
        "cpu",
        "--task",
        "click-button",
        "--seeds",
        "0..2",
        "--som",
        "--out",
        s(&ext),
    ]);
    run(&[
        "lens",
        "index",
        "--model",
        s(&vl),
        "--device",
        "cpu",
        "--corpus",
        s(&corpus),
        "--layers",
        "0,2",
        "--per-token",
        "3",
        "--out",
        s(&idx),
    ]);
    run(&[
        "lens",
        "query",
        "--extracted",
        s(&ext),
        "--index",
        s(&idx),
        "--device",
        "cpu",
        "--k",
        "5",
        "--out",
        s(&res),
    ]);
    let out = run(&["lens", "grounded", "--extracted", s(&ext), "--lens-results", s(&res), "--out", s(&gout)]);
    let files = extract::item_files(&ext).unwrap();
    assert_eq!(files.len(), 2);
    let it = extract::read_item(&files[0]).unwrap();
    // The Set-of-Marks screenshot at 2 px per CSS px: 320×420 → 165 vision tokens.
    assert_eq!(it.meta["image_size"], serde_json::json!([320, 420]));
    assert_eq!(it.positions.len(), 165);
    assert_eq!(it.points.len(), 4, "--layers all = hook_embed + 3 blocks");
    let texts: Vec<TextBox> = serde_json::from_value(it.meta["text_boxes"].clone()).unwrap();
    assert!(!texts.is_empty(), "click-button has text on its buttons");
    // Every result line: 2 items × 4 hook points × 165 tokens × 3 lenses.
    let lines: Vec<Value> =
        std::fs::read_to_string(&res).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 2 * 4 * 165 * 3);
    let c = lines.iter().find(|l| l["lens"] == "contextual").unwrap();
    let nb = &c["neighbours"][0];
    assert!(
        nb["source"]["sentence"].as_str().unwrap().len() > 3 && nb["source"]["position"].as_u64().unwrap() >= 2,
        "{nb}"
    );
    for lens in ["embedding", "logit", "contextual"] {
        assert!(out.contains(lens), "{out}");
    }
    // The agent's own prompt puts its text after the image: causal attention leaves the image
    // positions' states unchanged (bit for bit), and the prompt is longer.
    let exta = dir.path().join("exta");
    run(&[
        "extract",
        "--model",
        s(&vl),
        "--device",
        "cpu",
        "--task",
        "click-button",
        "--seeds",
        "0..1",
        "--som",
        "--agent-prompt",
        "--layers",
        "1",
        "--out",
        s(&exta),
    ]);
    let a = extract::read_item(&extract::item_files(&exta).unwrap()[0]).unwrap();
    assert_eq!(a.meta["prompt"], "agent");
    assert_eq!(a.positions, it.positions);
    assert_eq!(max_abs(&a.states[0], it.state("blocks.1.hook_resid_post".parse().unwrap()).unwrap()), 0.0);
    let png = image::open(gout.join("grounded.png")).unwrap();
    assert_eq!((png.width(), png.height()), (760, 440));
    // The score itself, on crafted neighbours: each token's overlapped words as its neighbours
    // are all grounded; a nonsense neighbour never is.
    let crafted = |good: bool| {
        let p = dir.path().join(format!("crafted-{good}.jsonl"));
        let mut body = String::new();
        let mut scored = 0;
        for f in &files {
            let it = extract::read_item(f).unwrap();
            let texts: Vec<TextBox> = serde_json::from_value(it.meta["text_boxes"].clone()).unwrap();
            for b in &it.boxes {
                let words = grounded::words_under(b, &texts);
                scored += !words.is_empty() as usize;
                let tok = if good { words.first().cloned().unwrap_or_default() } else { "zzqx".into() };
                let nb = serde_json::json!([{"token": format!(" {}", tok.to_uppercase()), "id": 0, "score": 1.0}]);
                body += &format!(
                    "{}\n",
                    serde_json::json!({"item": it.name, "hook_point": "hook_embed", "lens": "x", "box": b, "neighbours": nb})
                );
            }
        }
        std::fs::write(&p, body).unwrap();
        (miniwob_steer::interp::grounded::tally_lens_results(&ext, &p, 5).unwrap(), scored)
    };
    let (t, scored) = crafted(true);
    assert!(scored > 0);
    assert_eq!(t.counts[&("x".to_string(), "hook_embed".to_string())], (scored as u64, scored as u64));
    let (t, _) = crafted(false);
    assert_eq!(t.rate("x", "hook_embed"), Some(0.0));
}

#[test]
fn text_prompts_on_a_text_model() {
    common::gguf_path("smollm2-135m");
    let m = std::path::PathBuf::from("smollm2-135m");
    let dir = tempfile::tempdir().unwrap();
    let prompts = dir.path().join("p.txt");
    std::fs::write(&prompts, "Click the button.\n{\"text\": \"Select the box.\"}\n").unwrap();
    let ext = dir.path().join("ext");
    run(&[
        "extract",
        "--model",
        s(&m),
        "--device",
        "cpu",
        "--prompts-file",
        s(&prompts),
        "--layers",
        "hs:0,30",
        "--out",
        s(&ext),
    ]);
    let files = extract::item_files(&ext).unwrap();
    assert_eq!(files.len(), 2);
    let it = extract::read_item(&files[1]).unwrap();
    assert_eq!(it.meta["prompt"], "Select the box.");
    assert_eq!(it.meta["token_strings"].as_array().unwrap().len(), it.positions.len());
    assert!(it.grid.is_empty() && it.boxes.is_empty());
    let res = dir.path().join("lens.jsonl");
    run(&["lens", "query", "--extracted", s(&ext), "--lens", "embedding,logit", "--device", "cpu", "--out", s(&res)]);
    let n_tokens: usize = files.iter().map(|f| extract::read_item(f).unwrap().positions.len()).sum();
    let layers = it.points.len();
    assert_eq!(it.points.iter().map(|p| p.to_string()).collect::<Vec<_>>(), ["hook_embed", "hook_final_norm"]);
    assert_eq!(std::fs::read_to_string(&res).unwrap().lines().count(), n_tokens * layers * 2);
    // Images on a text model, and the contextual lens without an index, are refused clearly.
    let err = fails(&["lens", "query", "--extracted", s(&ext), "--lens", "contextual", "--out", s(&res)]);
    assert!(err.contains("--index"), "{err}");
    let err = fails(&["extract", "--model", s(&m), "--device", "cpu", "--image", "x.png", "--out", s(&ext)]);
    assert!(err.contains("vision-language"), "{err}");
    // The older one-file format is still there for a .safetensors --out.
    let f = dir.path().join("one.safetensors");
    run(&["extract", "--model", s(&m), "--device", "cpu", "--prompt", "Hello there", "--layers", "0", "--out", s(&f)]);
    assert!(f.exists());
}

#[test]
fn run_vlm_with_lens_logs_a_readout_per_step() {
    let vl = common::fixture("tiny-qwen2-vl");
    let dir = tempfile::tempdir().unwrap();
    let corpus = dir.path().join("corpus.txt");
    std::fs::write(&corpus, "Click on the button below.\nSubmit the form and press the button.\n").unwrap();
    let idx = dir.path().join("idx");
    run(&[
        "lens",
        "index",
        "--model",
        s(&vl),
        "--device",
        "cpu",
        "--corpus",
        s(&corpus),
        "--layers",
        "0,1",
        "--out",
        s(&idx),
    ]);
    let out = dir.path().join("run.jsonl");
    let base = [
        "run",
        "--vlm",
        "--model",
        s(&vl),
        "--device",
        "cpu",
        "--tasks",
        "click-button",
        "--eval-steps",
        "1",
        "--train-steps",
        "2",
        "--coeff",
        "4",
        "--max-new-tokens",
        "8",
        "--concurrency",
        "1",
        "--no-progress",
        "--max-steps",
        "2",
    ];
    let mut args: Vec<&str> = base.to_vec();
    args.extend(["--lens", s(&idx), "--lens-layer", "1", "--out", s(&out)]);
    run(&args);
    let lines: Vec<Value> =
        std::fs::read_to_string(&out).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 2, "baseline and steered");
    for l in &lines {
        let r = l["lens"].as_array().unwrap_or_else(|| panic!("no lens field: {l}"));
        assert_eq!(r.len() as u64, l["steps"].as_u64().unwrap(), "one read-out per step");
        for (i, x) in r.iter().enumerate() {
            assert_eq!(x["step"], i + 1);
            // The random tiny model does not produce actions: no element, so no neighbours.
            if x["ref"].is_null() {
                assert!(x.get("top").is_none());
            }
        }
    }
    // Without --lens the field is absent; a text model refuses --lens.
    let out2 = dir.path().join("run2.jsonl");
    let mut args: Vec<&str> = base.to_vec();
    args.extend(["--out", s(&out2)]);
    run(&args);
    assert!(!std::fs::read_to_string(&out2).unwrap().contains("\"lens\""));
    let err =
        fails(&["run", "--model", "smollm2-135m", "--tasks", "click-button", "--lens", s(&idx), "--out", s(&out2)]);
    assert!(err.contains("--vlm"), "{err}");
    let err = fails(&[&args[..args.len() - 2], &["--lens", s(&idx), "--lens-layer", "7", "--out", s(&out2)]].concat());
    assert!(err.contains("--lens-layer 7"), "{err}");
}
