//! Golden comparisons as library code, so they run without cargo (`miniwob-steer check-goldens`,
//! on a GPU machine that has only the binary and the fixtures) and from the CPU tests
//! (tests/decoder_goldens.rs, tests/gguf_goldens.rs, tests/check_goldens.rs).
//!
//! - Tiny seeded random models of every family (tests/fixtures/tiny-*, from
//!   scripts/goldens/make_goldens.py): in f32, `hook_embed`, every `blocks.{i}.hook_resid_post`,
//!   `hook_final_norm`, all-position logits and steered logits within 1e-4 (max abs error relative
//!   to the reference's max abs value), greedy and steered greedy continuations identical. In bf16
//!   and f16: cosine ≥ 0.99 for every state and the logits, and the reference's top-1 at every
//!   position (or, where the reference's top two are within 1% of its logit range, one of them).
//! - Real GGUF checkpoints when installed (tests/fixtures/smollm2, qwen2; scripts/goldens/
//!   gguf_goldens.py): prompt ids identical, top-1 identical (the quantized path may flip a near
//!   tie to the reference's top-2), cosine over the reference top-64 plus a fixed vocabulary sample
//!   and of the hidden state at the captured layer, greedy continuation identical in f32.
use crate::models::decoder::Decoder;
use crate::models::generate::{self, GenerateConfig};
use crate::models::load::{decoder_from_dir, LoadedModel};
use crate::models::registry::{self, Location};
use crate::models::weights::WeightDType;
use crate::models::{Captures, HookPoint, HookSpec, Positions, StepInfo};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use serde::Serialize;
use serde_json::Value;
use std::collections::HashMap;
use std::path::Path;

/// The tiny fixture families (directories under the fixtures root).
pub const TINY_FAMILIES: [&str; 4] = ["tiny-llama", "tiny-qwen2", "tiny-gemma", "tiny-gemma2"];
/// Real GGUF checkpoints with committed references: (registry alias, fixture directory).
pub const GGUF_CASES: [(&str, &str); 2] = [("smollm2-135m", "smollm2"), ("qwen-coder-0.5b", "qwen2")];

/// f32 tolerance of the tiny models (relative max abs error).
pub const F32_REL_TOL: f64 = 1e-4;
/// Cosine floor of reduced-precision (bf16/f16) states and logits against the f32 reference.
pub const HALF_MIN_COS: f64 = 0.99;
/// Logit gap under which the GGUF quantized path may pick the reference's top-2.
pub const GGUF_NEAR_TIE: f32 = 0.5;

/// One compared quantity.
#[derive(Debug, Clone, Serialize)]
pub struct CheckRow {
    /// `tiny-llama`, `smollm2-135m`, …
    pub model: String,
    /// What was compared: `blocks.1.hook_resid_post`, `logits`, `greedy_ids`, `case 0 top1`, …
    pub check: String,
    /// `rel_err`, `cosine`, `equal`, `top1`.
    pub metric: String,
    /// The measured value (1/0 for equalities).
    pub value: f64,
    /// The condition it had to meet, e.g. `< 0.0001`, `>= 0.99`, `== 1`.
    pub limit: String,
    pub passed: bool,
    /// On failure: what differed.
    pub detail: String,
}

impl CheckRow {
    fn le(model: &str, check: String, metric: &str, value: f64, max: f64) -> Self {
        let passed = value < max;
        Self {
            model: model.into(),
            check,
            metric: metric.into(),
            value,
            limit: format!("< {max}"),
            passed,
            detail: String::new(),
        }
    }
    fn ge(model: &str, check: String, metric: &str, value: f64, min: f64) -> Self {
        let passed = value >= min;
        Self {
            model: model.into(),
            check,
            metric: metric.into(),
            value,
            limit: format!(">= {min}"),
            passed,
            detail: String::new(),
        }
    }
    fn eq(model: &str, check: String, passed: bool, detail: String) -> Self {
        Self {
            model: model.into(),
            check,
            metric: "equal".into(),
            value: if passed { 1.0 } else { 0.0 },
            limit: "== 1".into(),
            passed,
            detail: if passed { String::new() } else { detail },
        }
    }
}

/// Everything one `check-goldens` invocation compared.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub device: String,
    pub dtype: String,
    pub rows: Vec<CheckRow>,
    /// Suites not run, with why (a GGUF model not installed here).
    pub skipped: Vec<String>,
}

impl Report {
    pub fn passed(&self) -> bool {
        self.rows.iter().all(|r| r.passed)
    }
    pub fn failures(&self) -> Vec<&CheckRow> {
        self.rows.iter().filter(|r| !r.passed).collect()
    }
    /// A markdown table: one line per model with counts and the worst value per metric, then
    /// every failing row.
    pub fn markdown(&self) -> String {
        let mut s = format!("goldens on {} ({}): ", self.device, self.dtype);
        let failed = self.failures().len();
        s += &format!("{} checks, {} failed\n\n", self.rows.len(), failed);
        s += "| model | checks | failed | worst rel_err | worst cosine |\n|---|---|---|---|---|\n";
        let mut models: Vec<&str> = Vec::new();
        for r in &self.rows {
            if !models.contains(&r.model.as_str()) {
                models.push(&r.model);
            }
        }
        for m in models {
            let rows: Vec<&CheckRow> = self.rows.iter().filter(|r| r.model == m).collect();
            let worst = |metric: &str, max: bool| {
                let v = rows.iter().filter(|r| r.metric == metric).map(|r| r.value);
                let w = if max { v.fold(f64::NAN, f64::max) } else { v.fold(f64::NAN, f64::min) };
                if w.is_nan() {
                    "-".to_string()
                } else {
                    format!("{w:.3e}")
                }
            };
            s += &format!(
                "| {m} | {} | {} | {} | {} |\n",
                rows.len(),
                rows.iter().filter(|r| !r.passed).count(),
                worst("rel_err", true),
                worst("cosine", false)
            );
        }
        for r in self.failures() {
            s += &format!(
                "\nFAILED {} {}: {} = {} (needs {}) {}",
                r.model, r.check, r.metric, r.value, r.limit, r.detail
            );
        }
        for k in &self.skipped {
            s += &format!("\nskipped: {k}");
        }
        s
    }
}

/// max |a − b| / max(max |b|, 1), both moved to the CPU in f32.
pub fn rel_err(a: &Tensor, b: &Tensor) -> Result<f64> {
    if a.dims() != b.dims() {
        bail!("shape mismatch: ours {:?}, reference {:?}", a.dims(), b.dims());
    }
    let a = a.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
    let b = b.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
    let diff = (&a - &b)?.abs()?.max_all()?.to_scalar::<f32>()?;
    let scale = b.abs()?.max_all()?.to_scalar::<f32>()?.max(1.0);
    Ok((diff / scale) as f64)
}

/// Cosine of two equally long vectors.
pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb).max(f64::MIN_POSITIVE)
}

fn flat_f32(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_device(&Device::Cpu)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?)
}

fn ids_of(r: &HashMap<String, Tensor>, key: &str, file: &Path) -> Result<Vec<u32>> {
    let t = r.get(key).with_context(|| format!("{}: no tensor `{key}`", file.display()))?;
    Ok(t.flatten_all()?.to_dtype(DType::I64)?.to_vec1::<i64>()?.into_iter().map(|x| x as u32).collect())
}

fn ref_tensor<'a>(r: &'a HashMap<String, Tensor>, key: &str, file: &Path) -> Result<&'a Tensor> {
    r.get(key).with_context(|| format!("{}: no tensor `{key}`", file.display()))
}

/// Full-sequence forward (logits at every position) of one row.
fn full_forward(d: &Decoder, ids: &[u32], spec: &HookSpec) -> Result<(Tensor, Captures)> {
    let t = Tensor::from_vec(ids.to_vec(), (1, ids.len()), d.device())?;
    let mut st = d.new_state(vec![0]);
    let mut caps = Captures::default();
    let logits = d.forward(&t, &mut st, &StepInfo::prefill(vec![0]), spec, &mut caps, true)?;
    Ok((logits, caps))
}

/// Per-position top-1 agreement of `[.., seq, vocab]` logits with the reference; positions where
/// the reference's top two are within 1% of its logit range accept either.
fn top1_rows(ours: &Tensor, reference: &Tensor) -> Result<(usize, usize, String)> {
    let vocab = *reference.dims().last().context("logits without a vocabulary axis")?;
    let o = flat_f32(ours)?;
    let r = flat_f32(reference)?;
    let (mut agree, mut n, mut detail) = (0, 0, String::new());
    for (pos, (orow, rrow)) in o.chunks(vocab).zip(r.chunks(vocab)).enumerate() {
        let rank = |row: &[f32]| {
            let mut idx: Vec<usize> = (0..row.len()).collect();
            idx.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
            idx
        };
        let (ro, rr) = (rank(orow), rank(rrow));
        let range = rrow[rr[0]] - rrow[rr[rr.len() - 1]];
        let tie = rrow[rr[0]] - rrow[rr[1]] < 0.01 * range;
        let ok = ro[0] == rr[0] || (tie && ro[0] == rr[1]);
        n += 1;
        if ok {
            agree += 1;
        } else if detail.is_empty() {
            detail = format!("position {pos}: ours {} reference {} (reference top-2 {})", ro[0], rr[0], rr[1]);
        }
    }
    Ok((agree, n, detail))
}

/// One tiny fixture directory (config.json, model.safetensors, reference.safetensors).
pub fn check_tiny(dir: &Path, device: &Device, dtype: WeightDType) -> Result<Vec<CheckRow>> {
    let name = dir.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
    let (d, _) = decoder_from_dir(dir, device, dtype).with_context(|| format!("loading {}", dir.display()))?;
    check_decoder(&name, &d, dir, dtype == WeightDType::F32)
}

/// [`check_tiny`] for a GGUF conversion of the checkpoint in `dir` (its references are the
/// safetensors checkpoint's); `exact` for unquantized tensors read as f32, else cosine checks.
pub fn check_tiny_gguf(
    gguf: &Path,
    dir: &Path,
    device: &Device,
    dtype: WeightDType,
    exact: bool,
) -> Result<Vec<CheckRow>> {
    let name = format!(
        "{} ({})",
        dir.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default(),
        gguf.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default()
    );
    let (d, _) =
        super::load::decoder_from_gguf(gguf, device, dtype).with_context(|| format!("loading {}", gguf.display()))?;
    check_decoder(&name, &d, dir, exact)
}

/// Every hook point, the logits, steering and greedy tokens of `d` against `dir/reference.safetensors`.
fn check_decoder(name: &str, d: &Decoder, dir: &Path, exact: bool) -> Result<Vec<CheckRow>> {
    let name = name.to_string();
    let ref_path = dir.join("reference.safetensors");
    let r = candle_core::safetensors::load(&ref_path, &Device::Cpu)
        .with_context(|| format!("reading {}", ref_path.display()))?;
    let ids = ids_of(&r, "input_ids", &ref_path)?;
    let n = d.cfg.num_layers;
    let mut spec = HookSpec::none().capture(HookPoint::Embed).capture(HookPoint::FinalNorm);
    for i in 0..n {
        spec = spec.capture(HookPoint::ResidPost(i));
    }
    let (logits, caps) = full_forward(d, &ids, &spec)?;
    let mut rows = Vec::new();
    let compare = |rows: &mut Vec<CheckRow>, check: String, ours: &Tensor, reference: &Tensor| -> Result<()> {
        if exact {
            rows.push(CheckRow::le(&name, check, "rel_err", rel_err(ours, reference)?, F32_REL_TOL));
        } else {
            if ours.dims() != reference.dims() {
                bail!("{name} {check}: ours {:?}, reference {:?}", ours.dims(), reference.dims());
            }
            let c = cosine(&flat_f32(ours)?, &flat_f32(reference)?);
            rows.push(CheckRow::ge(&name, check, "cosine", c, HALF_MIN_COS));
        }
        Ok(())
    };
    let mut points = vec![(HookPoint::Embed, "hook_embed".to_string())];
    points.extend((0..n).map(|i| (HookPoint::ResidPost(i), format!("resid_post.{i}"))));
    points.push((HookPoint::FinalNorm, "final_norm".to_string()));
    for (p, key) in points {
        compare(&mut rows, p.to_string(), &caps.get(p)?, ref_tensor(&r, &key, &ref_path)?)?;
    }
    let ref_logits = ref_tensor(&r, "logits", &ref_path)?;
    compare(&mut rows, "logits".into(), &logits, ref_logits)?;
    let (agree, total, detail) = top1_rows(&logits, ref_logits)?;
    rows.push(CheckRow {
        detail,
        ..CheckRow::ge(&name, "logits top1 per position".into(), "top1", agree as f64 / total as f64, 1.0)
    });

    // Steering: the reference is a transformers forward hook adding α·v to the output of layer L.
    let layer = ids_of(&r, "steer_layer", &ref_path)?[0] as usize;
    let alpha = flat_f32(ref_tensor(&r, "steer_alpha", &ref_path)?)?[0];
    let v = ref_tensor(&r, "steer_vector", &ref_path)?.to_dtype(DType::F32)?;
    let steer = HookSpec::none().add(HookPoint::ResidPost(layer), v.clone(), vec![alpha], Positions::All);
    let (steered, _) = full_forward(d, &ids, &steer)?;
    let ref_steered = ref_tensor(&r, "steered_logits", &ref_path)?;
    compare(&mut rows, format!("steered logits (α={alpha} at blocks.{layer}.hook_resid_post)"), &steered, ref_steered)?;
    let moved = rel_err(&steered, &logits)?;
    rows.push(CheckRow::ge(&name, "steering changes the logits".into(), "moved", moved, 1e-3));
    if exact {
        let cfg = GenerateConfig { max_new_tokens: 8, ..Default::default() };
        let g = generate::generate(d, std::slice::from_ref(&ids), &cfg, &HookSpec::none(), &mut Captures::default())?;
        let want = ids_of(&r, "greedy_ids", &ref_path)?;
        rows.push(CheckRow::eq(
            &name,
            "greedy_ids".into(),
            g[0].tokens == want,
            format!("ours {:?}, transformers {want:?}", g[0].tokens),
        ));
        let spec = HookSpec::none().add(HookPoint::ResidPost(layer), v, vec![alpha], Positions::Last);
        let g = generate::generate(d, &[ids], &cfg, &spec, &mut Captures::default())?;
        let want = ids_of(&r, "greedy_steered_ids", &ref_path)?;
        rows.push(CheckRow::eq(
            &name,
            "greedy_steered_ids (positions=last)".into(),
            g[0].tokens == want,
            format!("ours {:?}, transformers {want:?}", g[0].tokens),
        ));
    }
    Ok(rows)
}

/// Tolerances of one GGUF comparison.
#[derive(Debug, Clone, Copy)]
pub struct GgufTolerance {
    pub min_cos: f64,
    /// Top-1 must be exact and the greedy continuation identical (the f32 path); otherwise a
    /// near tie (< [`GGUF_NEAR_TIE`]) may go to the reference's top-2 and greedy is not compared.
    pub exact: bool,
}

impl GgufTolerance {
    pub fn for_dtype(dtype: WeightDType) -> Self {
        match dtype {
            WeightDType::F32 => Self { min_cos: 0.999, exact: true },
            _ => Self { min_cos: 0.99, exact: false },
        }
    }
}

fn u32s(v: &Value) -> Vec<u32> {
    v.as_array().map(|a| a.iter().filter_map(|x| x.as_u64()).map(|x| x as u32).collect()).unwrap_or_default()
}

fn f32s(v: &Value) -> Vec<f32> {
    v.as_array().map(|a| a.iter().filter_map(|x| x.as_f64()).map(|x| x as f32).collect()).unwrap_or_default()
}

/// A GGUF model (`model`: alias or path) against `fixture_dir/logits.json`.
pub fn check_gguf(
    model: &str,
    fixture_dir: &Path,
    device: &Device,
    dtype: WeightDType,
    tol: GgufTolerance,
) -> Result<Vec<CheckRow>> {
    let name = model.to_string();
    let m = LoadedModel::load(model, device, dtype)?;
    let path = fixture_dir.join("logits.json");
    let doc: Value =
        serde_json::from_str(&std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?)
            .with_context(|| format!("{}: not valid JSON", path.display()))?;
    let cases = doc["cases"].as_array().with_context(|| format!("{}: no `cases` array", path.display()))?;
    if cases.len() < 3 {
        bail!("{}: expected at least 3 cases, found {}", path.display(), cases.len());
    }
    let mut rows = Vec::new();
    for (k, c) in cases.iter().enumerate() {
        let text = c["text"].as_str().with_context(|| format!("{}: case {k} has no `text`", path.display()))?;
        let ids = u32s(&c["ids"]);
        let ours_ids = m.tokenizer.encode(text, false)?;
        rows.push(CheckRow::eq(
            &name,
            format!("case {k} prompt ids"),
            ours_ids == ids,
            format!("ours {ours_ids:?}, transformers {ids:?}"),
        ));
        let mut check_ids = u32s(&c["top_ids"]);
        let mut check_logits = f32s(&c["top_logits"]);
        check_ids.extend(u32s(&c["sample_ids"]));
        check_logits.extend(f32s(&c["sample_logits"]));
        if check_ids.len() < 2 || check_ids.len() != check_logits.len() {
            bail!("{}: case {k}: top/sample ids and logits missing or of different lengths", path.display());
        }
        let hidden_layer = c.get("hidden_layer").and_then(|l| l.as_u64()).map(|l| l as usize);
        let mut spec = HookSpec::none();
        if let Some(l) = hidden_layer {
            spec = spec.capture(HookPoint::ResidPost(l));
        }
        let (logits, caps, _) = generate::prefill(&m.decoder, std::slice::from_ref(&ids), 0, &spec)?;
        let logits: Vec<f32> = flat_f32(&logits.get(0)?)?;
        let top1 = generate::top_k(&Tensor::new(logits.as_slice(), &Device::Cpu)?, 1)?[0].0;
        let gap = check_logits[0] - check_logits[1];
        let (ok, want) = if tol.exact || gap >= GGUF_NEAR_TIE {
            (top1 == check_ids[0], format!("{}", check_ids[0]))
        } else {
            (check_ids[..2].contains(&top1), format!("one of the near-tied {:?}", &check_ids[..2]))
        };
        rows.push(CheckRow::eq(&name, format!("case {k} top1"), ok, format!("ours {top1}, transformers {want}")));
        let ours: Vec<f32> = check_ids.iter().map(|&i| logits.get(i as usize).copied().unwrap_or(f32::NAN)).collect();
        rows.push(CheckRow::ge(
            &name,
            format!("case {k} logits (top-64 + sample)"),
            "cosine",
            cosine(&ours, &check_logits),
            tol.min_cos,
        ));
        if let (Some(l), Some(h)) = (hidden_layer, c.get("hidden")) {
            let reference: Vec<f32> = h.as_array().map(|rows| rows.iter().flat_map(f32s).collect()).unwrap_or_default();
            let got = flat_f32(&caps.get(HookPoint::ResidPost(l))?)?;
            if got.len() != reference.len() {
                bail!(
                    "{}: case {k}: hidden state has {} values, reference {}",
                    path.display(),
                    got.len(),
                    reference.len()
                );
            }
            rows.push(CheckRow::ge(
                &name,
                format!("case {k} blocks.{l}.hook_resid_post"),
                "cosine",
                cosine(&got, &reference),
                tol.min_cos,
            ));
        }
        if tol.exact {
            let greedy = u32s(&c["greedy"]);
            let cfg = GenerateConfig { max_new_tokens: greedy.len(), ..Default::default() };
            let g = generate::generate(
                &m.decoder,
                std::slice::from_ref(&ids),
                &cfg,
                &HookSpec::none(),
                &mut Default::default(),
            )?;
            let detail = format!(
                "ours {:?}, transformers {:?}",
                m.tokenizer.decode(&g[0].tokens, false).unwrap_or_default(),
                m.tokenizer.decode(&greedy, false).unwrap_or_default()
            );
            rows.push(CheckRow::eq(&name, format!("case {k} greedy continuation"), g[0].tokens == greedy, detail));
        }
    }
    Ok(rows)
}

/// Which GGUF suites to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GgufSelection {
    /// Those installed here (registry resolves the alias to a GGUF file); the others are skipped.
    Installed,
    None,
}

/// All suites: every tiny family, then the installed GGUF models.
pub fn run_all(fixtures: &Path, device: &Device, dtype: WeightDType, gguf: GgufSelection) -> Result<Report> {
    let mut rows = Vec::new();
    let mut skipped = Vec::new();
    if dtype == WeightDType::Gguf {
        bail!("check-goldens --dtype gguf: the tiny models are safetensors; use f32, bf16 or f16");
    }
    for fam in TINY_FAMILIES {
        let dir = fixtures.join(fam);
        if !dir.join("reference.safetensors").is_file() {
            bail!("{}: no reference.safetensors (is --fixtures the repository's tests/fixtures?)", dir.display());
        }
        let t0 = std::time::Instant::now();
        rows.extend(check_tiny(&dir, device, dtype)?);
        tracing::info!("{fam}: {:.2}s", t0.elapsed().as_secs_f64());
    }
    if gguf == GgufSelection::Installed {
        for (alias, fixture) in GGUF_CASES {
            let path = match registry::resolve(alias).map(|r| r.location) {
                Ok(Location::Gguf(p)) => p,
                Ok(other) => {
                    skipped.push(format!("{alias}: resolves to {other:?}, not a GGUF"));
                    continue;
                }
                Err(e) => {
                    skipped.push(format!("{alias}: not installed here ({e:#})"));
                    continue;
                }
            };
            let t0 = std::time::Instant::now();
            let tol = GgufTolerance::for_dtype(dtype);
            rows.extend(check_gguf(alias, &fixtures.join(fixture), device, dtype, tol)?);
            tracing::info!("{alias} ({}): {:.2}s", path.display(), t0.elapsed().as_secs_f64());
        }
    }
    Ok(Report { device: crate::device::device_name(device), dtype: dtype.name().into(), rows, skipped })
}
