//! `miniwob-steer check-goldens` (the golden comparisons a GPU machine runs without cargo,
//! src/gpu/goldens.rs) proven on the CPU: it passes on the committed fixtures in f32 and bf16,
//! and it fails, naming the model and the quantity, on a perturbed reference.
mod common;

use candle_core::{DType, Device, Tensor};
use miniwob_steer::models::goldens::{self, GgufSelection};
use miniwob_steer::models::WeightDType;
use std::path::Path;
use std::process::Command;

fn fixtures() -> std::path::PathBuf {
    common::fixture("")
}

#[test]
fn tiny_goldens_pass_on_cpu_in_f32_and_bf16() {
    for dtype in [WeightDType::F32, WeightDType::BF16] {
        let report = goldens::run_all(&fixtures(), &Device::Cpu, dtype, GgufSelection::None).unwrap();
        assert!(report.passed(), "{}", report.markdown());
        assert_eq!(report.device, "cpu");
        assert_eq!(report.dtype, dtype.name());
        for fam in goldens::TINY_FAMILIES {
            let n = report.rows.iter().filter(|r| r.model == fam).count();
            // embed + layers + final norm + logits + top-1 + steered + moved (+ 2 greedy in f32).
            assert!(n >= 8, "{fam}: only {n} checks in {}", dtype.name());
        }
        let metric = if dtype == WeightDType::F32 { "rel_err" } else { "cosine" };
        assert!(report.rows.iter().any(|r| r.metric == metric), "{}: no {metric} rows", dtype.name());
    }
}

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_miniwob-steer"))
}

#[test]
fn check_goldens_subcommand_writes_a_passing_json_report() {
    let tmp = tempfile::tempdir().unwrap();
    let json = tmp.path().join("goldens.json");
    let out = bin()
        .args(["check-goldens", "--device", "cpu", "--dtype", "bf16", "--no-gguf", "--fixtures"])
        .arg(fixtures())
        .arg("--json")
        .arg(&json)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("goldens on cpu (bf16)") && stdout.contains("| tiny-gemma2 |"), "{stdout}");
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(v["device"], "cpu");
    assert_eq!(v["dtype"], "bf16");
    let rows = v["rows"].as_array().unwrap();
    assert!(rows.len() >= 32 && rows.iter().all(|r| r["passed"] == true), "{v}");
}

fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
}

#[test]
fn a_perturbed_reference_fails_naming_model_and_quantity() {
    let tmp = tempfile::tempdir().unwrap();
    for fam in goldens::TINY_FAMILIES {
        copy_dir(&common::fixture(fam), &tmp.path().join(fam));
    }
    // Nudge tiny-qwen2's reference logits by 1% of their scale: far above the f32 tolerance.
    let path = tmp.path().join("tiny-qwen2/reference.safetensors");
    let mut r = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    let logits = r["logits"].clone();
    let scale = logits.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap() as f64;
    let nudged = (logits.clone() + Tensor::ones_like(&logits).unwrap().affine(0.01 * scale.max(1.0), 0.0).unwrap())
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    r.insert("logits".into(), nudged);
    candle_core::safetensors::save(&r, &path).unwrap();
    let out = bin()
        .args(["check-goldens", "--device", "cpu", "--dtype", "f32", "--no-gguf", "--fixtures"])
        .arg(tmp.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a perturbed reference passed:\n{stdout}");
    assert!(stdout.contains("FAILED tiny-qwen2 logits: rel_err"), "{stdout}");
    assert!(stderr.contains("golden checks failed on cpu (f32)"), "{stderr}");
    // The other families still pass.
    assert!(stdout.contains("| tiny-llama | 11 | 0 |"), "{stdout}");
}

#[test]
fn bench_paired_runs_on_cpu_and_writes_the_report_fields() {
    let tmp = tempfile::tempdir().unwrap();
    let json = tmp.path().join("ours.json");
    let out = bin()
        .args(["bench", "paired", "--model", "smollm2-135m", "--device", "cpu", "--dtype", "auto"])
        .args(["--prompt-tokens", "12", "--new-tokens", "3", "--reps", "1", "--threads", "1", "--json"])
        .arg(&json)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("on cpu f32") && stdout.contains("blocks.15.hook_resid_post"), "{stdout}");
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(v["device"], "cpu");
    assert_eq!(v["dtype"], "f32", "--dtype auto resolves to f32 on the CPU");
    assert_eq!(v["layer"], 15);
    for k in ["sequential_s", "batched_s", "decode_tok_s_b1", "prefill_tok_s", "extract_s"] {
        assert!(v[k].as_f64().is_some_and(|x| x > 0.0), "{k}: {v}");
    }
    // No device memory to report on the CPU.
    assert!(v["peak_bytes_b2"].is_null() && v["weights_bytes"].is_null(), "{v}");
}

/// The Qwen2-VL workload of `bench paired` on the tiny fixture: the report's image and prompt
/// token counts and its prompt ids, computed here independently of the binary (smart_resize by
/// hand from the fixture's vision config, the chat template's output written out, the fixture's
/// tokenizer.json through the tokenizers crate directly).
#[test]
fn bench_paired_vlm_workload_has_the_image_and_prompt_tokens() {
    let dir = fixtures().join("tiny-qwen2-vl");
    let tmp = tempfile::tempdir().unwrap();
    let json = tmp.path().join("ours.json");
    let out = bin()
        .args(["bench", "paired", "--model"])
        .arg(&dir)
        .args(["--device", "cpu", "--dtype", "f32", "--new-tokens", "3", "--reps", "1", "--threads", "1", "--json"])
        .arg(&json)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();

    // The picture: 320 wide, 420 high; smart_resize rounds each side to a multiple of
    // patch · merge (no preprocessor_config.json: transformers' default pixel bounds).
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    assert!(!dir.join("preprocessor_config.json").exists());
    let patch = cfg["vision_config"]["patch_size"].as_u64().unwrap();
    let merge = cfg["vision_config"]["spatial_merge_size"].as_u64().unwrap();
    let factor = patch * merge;
    let round = |v: u64| (v as f64 / factor as f64).round() as u64 * factor;
    let (h, w) = (round(420), round(320));
    assert!(h * w >= 56 * 56 && h * w <= 28 * 28 * 1280, "within the default pixel bounds: no rescale");
    let grid = [1, h / patch, w / patch];
    let image_tokens = grid[1] * grid[2] / (merge * merge);
    assert_eq!((grid, image_tokens), ([1, 30, 22], 165), "the issue's screenshot workload");
    assert_eq!(v["workload"], "vlm");
    assert_eq!(v["image_size"], serde_json::json!([320, 420]));
    assert_eq!(v["image_grid_thw"], serde_json::json!(grid));
    assert_eq!(v["image_tokens"].as_u64(), Some(image_tokens));
    assert_eq!(v["prompt_tokens"], 487, "the default VLM prompt length, image tokens included");
    assert!(stdout.contains("vlm workload, prompt 487 tokens (165 image tokens"), "{stdout}");

    // The ids: Qwen2-VL's template for one user turn (image, then empty text), the pads
    // expanded, and the filler text's ids cycled after <|vision_end|> up to 487.
    let tok = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    let enc = |s: &str| tok.encode(s, false).unwrap().get_ids().to_vec();
    let head = enc(&format!(
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<|vision_start|>{}<|vision_end|>",
        "<|image_pad|>".repeat(image_tokens as usize)
    ));
    let tail = enc("<|im_end|>\n<|im_start|>assistant\n");
    let filler = enc(miniwob_steer::models::workload::VLM_FILLER);
    let n_text = 487 - head.len() - tail.len();
    let ids: Vec<u32> =
        head.iter().copied().chain((0..n_text).map(|i| filler[i % filler.len()])).chain(tail.iter().copied()).collect();
    assert_eq!(ids.iter().filter(|&&t| t == cfg["image_token_id"].as_u64().unwrap() as u32).count(), 165);
    let joined = ids.iter().map(|t| t.to_string()).collect::<Vec<_>>().join(",");
    let hash = hex::encode(&<sha2::Sha256 as sha2::Digest>::digest(joined.as_bytes())[..8]);
    assert_eq!(v["prompt_hash"], hash, "the workload's prompt ids");
    for k in ["sequential_s", "batched_s", "decode_tok_s_b1", "prefill_tok_s", "extract_s"] {
        assert!(v[k].as_f64().is_some_and(|x| x > 0.0), "{k}: {v}");
    }

    // A prompt shorter than the template and the image is refused, saying why.
    let out = bin()
        .args(["bench", "paired", "--model"])
        .arg(&dir)
        .args(["--device", "cpu", "--dtype", "f32", "--prompt-tokens", "100", "--reps", "1"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("--prompt-tokens 100 is below the"), "{stderr}");
}

/// The whole GPU check flow on the CPU (goldens, random checkpoint, ours and the transformers
/// peer on the text workload and on the tiny Qwen2-VL's image workload, report). Needs the target/py venv (scripts/goldens/venv.sh); ~3 minutes.
#[test]
#[ignore]
fn gpu_check_script_runs_on_cpu_small() {
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let tmp = tempfile::tempdir().unwrap();
    let status = Command::new(root.join("scripts/gpu-check.sh"))
        .args(["--device", "cpu", "--small", "--bin", env!("CARGO_BIN_EXE_miniwob-steer"), "--out"])
        .arg(tmp.path())
        .env("CKPT_DIR", tmp.path().join("ckpt"))
        .status()
        .unwrap();
    assert!(status.success());
    let report = std::fs::read_to_string(tmp.path().join("report.md")).unwrap();
    assert!(report.contains("### cpu f32: ") && report.contains("### cpu bf16: "), "{report}");
    assert!(report.contains("| smollm2-135m | 64 (0) | yes | ") && report.contains("Goldens: all passed."), "{report}");
    // The Qwen2-VL image workload on both sides, with the same ids.
    assert!(report.contains("| tiny-qwen2-vl | 487 (165) | yes | "), "{report}");
}
