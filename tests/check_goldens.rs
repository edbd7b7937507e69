//! `miniwob-steer check-goldens` (the golden comparisons a GPU machine runs without cargo,
//! src/gpu/goldens.rs) proven on the CPU: it passes on the committed fixtures in f32 and bf16,
//! and it fails, naming the model and the quantity, on a perturbed reference.
mod common;

use candle_core::{DType, Device, Tensor};
use miniwob_steer::gpu::goldens::{self, GgufSelection};
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

/// The whole GPU check flow on the CPU (goldens, random checkpoint, ours and the transformers
/// peer, report). Needs the target/py venv (scripts/goldens/venv.sh); ~3 minutes.
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
    assert!(report.contains("| smollm2-135m | ") && report.contains("Goldens: all passed."), "{report}");
}
