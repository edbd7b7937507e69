//! `graft bench`: one training step of the graft at real shapes with random weights: the
//! Qwen2.5-VL tower (1280 wide, SwiGLU 3420, 16 heads, windows of 112 px, merger to 3584) and a
//! Qwen3-4B-shaped LM (2560 wide, 36 layers, 32 / 8 heads of 128, MLP 9728, vocabulary 151936,
//! tied embeddings) through `Linear(3584 → 2560)`. Building all 32 + 36 blocks needs ~20 GB in
//! f32, so the step runs with few blocks and is extrapolated: each part is timed at two depths,
//! the difference gives the cost per block and the rest the fixed cost (patch embedding and
//! merger; embedding, final norm, LM head and loss), and the full-depth figure is
//! `fixed + depth × per block`. Peak memory is measured (peak RSS on the CPU) for the built
//! depth and extrapolated the same way. Labelled as such in the output.
use super::train::{clip_grads, response_loss, AdamW, TrainOptions};
use super::Adapter;
use crate::models::load::decoder_from_dir;
use crate::models::qwen2_5_vl::Qwen25VisionTower;
use crate::models::weights::WeightDType;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use serde::Serialize;
use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

pub struct BenchShape {
    /// Vision blocks built at the deeper of the two depths (≥ 2).
    pub vision_layers: usize,
    /// LM layers built at the deeper of the two depths (≥ 2).
    pub lm_layers: usize,
    /// Screenshot (width, height) in pixels.
    pub image: (usize, usize),
    pub text_tokens: usize,
    pub steps: usize,
    pub device: Device,
}

#[derive(Debug, Serialize)]
pub struct Part {
    pub depth_a: usize,
    pub seconds_a: f64,
    pub depth_b: usize,
    pub seconds_b: f64,
    pub per_block_s: f64,
    pub fixed_s: f64,
    pub full_depth: usize,
    /// `fixed + full_depth × per block` (extrapolated).
    pub full_s_extrapolated: f64,
}

#[derive(Debug, Serialize)]
pub struct BenchReport {
    pub device: String,
    pub image: String,
    pub image_tokens: usize,
    pub sequence: usize,
    /// Vision tower forward (frozen, no graph).
    pub vision: Part,
    /// Adapter + LM forward, backward, clipping, AdamW.
    pub lm_step: Part,
    pub step_s_extrapolated: f64,
    /// Peak resident memory during one step at the deeper build (bytes; CPU only).
    pub peak_rss_bytes_measured: Option<u64>,
    pub peak_rss_bytes_at_lower_depth: Option<u64>,
    /// Extrapolated the same way to 32 vision + 36 LM blocks.
    pub peak_rss_bytes_extrapolated: Option<u64>,
    pub notes: String,
}

const VISION_DEPTH: usize = 32;
const LM_DEPTH: usize = 36;

fn rand_tensors(shapes: &[(String, Vec<usize>, f64)], dev: &Device) -> Result<HashMap<String, Tensor>> {
    let mut out = HashMap::new();
    for (name, shape, std) in shapes {
        let t = if *std == 0.0 {
            Tensor::ones(shape.as_slice(), DType::F32, dev)?
        } else {
            Tensor::randn(0f32, *std as f32, shape.as_slice(), dev)?
        };
        out.insert(name.clone(), t);
    }
    Ok(out)
}

fn write_vision(dir: &Path, depth: usize) -> Result<()> {
    let (e, m, out) = (1280usize, 3420usize, 3584usize);
    let mut s: Vec<(String, Vec<usize>, f64)> =
        vec![("visual.patch_embed.proj.weight".into(), vec![e, 3, 2, 14, 14], 0.02)];
    for i in 0..depth {
        let b = format!("visual.blocks.{i}");
        s.push((format!("{b}.norm1.weight"), vec![e], 0.0));
        s.push((format!("{b}.norm2.weight"), vec![e], 0.0));
        for (n, o, inp) in [
            ("attn.qkv", 3 * e, e),
            ("attn.proj", e, e),
            ("mlp.gate_proj", m, e),
            ("mlp.up_proj", m, e),
            ("mlp.down_proj", e, m),
        ] {
            s.push((format!("{b}.{n}.weight"), vec![o, inp], 0.02));
            s.push((format!("{b}.{n}.bias"), vec![o], 0.02));
        }
    }
    s.push(("visual.merger.ln_q.weight".into(), vec![e], 0.0));
    for (n, o, inp) in [("merger.mlp.0", 4 * e, 4 * e), ("merger.mlp.2", out, 4 * e)] {
        s.push((format!("visual.{n}.weight"), vec![o, inp], 0.02));
        s.push((format!("visual.{n}.bias"), vec![o], 0.02));
    }
    candle_core::safetensors::save(&rand_tensors(&s, &Device::Cpu)?, dir.join("model.safetensors"))?;
    let full: Vec<usize> = (0..depth).filter(|i| i % 2 == 1).collect();
    let cfg = serde_json::json!({"model_type": "qwen2_5_vl", "vision_config": {
        "depth": depth, "hidden_size": e, "intermediate_size": m, "num_heads": 16, "in_chans": 3, "patch_size": 14,
        "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112, "fullatt_block_indexes": full,
        "out_hidden_size": out, "hidden_act": "silu"}});
    std::fs::write(dir.join("config.json"), cfg.to_string())?;
    Ok(())
}

fn write_lm(dir: &Path, layers: usize) -> Result<()> {
    let (h, im, nh, nkv, hd, vocab) = (2560usize, 9728usize, 32usize, 8usize, 128usize, 151936usize);
    let mut s: Vec<(String, Vec<usize>, f64)> =
        vec![("model.embed_tokens.weight".into(), vec![vocab, h], 0.02), ("model.norm.weight".into(), vec![h], 0.0)];
    for i in 0..layers {
        let p = format!("model.layers.{i}");
        for (n, shape) in [
            ("self_attn.q_proj.weight", vec![nh * hd, h]),
            ("self_attn.k_proj.weight", vec![nkv * hd, h]),
            ("self_attn.v_proj.weight", vec![nkv * hd, h]),
            ("self_attn.o_proj.weight", vec![h, nh * hd]),
            ("mlp.gate_proj.weight", vec![im, h]),
            ("mlp.up_proj.weight", vec![im, h]),
            ("mlp.down_proj.weight", vec![h, im]),
        ] {
            s.push((format!("{p}.{n}"), shape, 0.02));
        }
        for n in ["self_attn.q_norm.weight", "self_attn.k_norm.weight"] {
            s.push((format!("{p}.{n}"), vec![hd], 0.0));
        }
        for n in ["input_layernorm.weight", "post_attention_layernorm.weight"] {
            s.push((format!("{p}.{n}"), vec![h], 0.0));
        }
    }
    candle_core::safetensors::save(&rand_tensors(&s, &Device::Cpu)?, dir.join("model.safetensors"))?;
    let cfg = serde_json::json!({"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"], "hidden_size": h,
        "intermediate_size": im, "num_hidden_layers": layers, "num_attention_heads": nh, "num_key_value_heads": nkv,
        "head_dim": hd, "vocab_size": vocab, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "tie_word_embeddings": true,
        "max_position_embeddings": 40960, "hidden_act": "silu"});
    std::fs::write(dir.join("config.json"), cfg.to_string())?;
    Ok(())
}

/// Peak resident set size since the last reset (Linux: `VmHWM`; reset through `clear_refs`).
fn peak_rss() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

struct Timed {
    vision_s: f64,
    step_s: f64,
    peak: Option<u64>,
}

fn run_depth(root: &Path, vdepth: usize, ldepth: usize, s: &BenchShape, tokens: (usize, usize)) -> Result<Timed> {
    let vdir = root.join(format!("vision-{vdepth}"));
    let ldir = root.join(format!("lm-{ldepth}"));
    for d in [&vdir, &ldir] {
        std::fs::create_dir_all(d)?;
    }
    write_vision(&vdir, vdepth)?;
    write_lm(&ldir, ldepth)?;
    let vision = Qwen25VisionTower::from_dir(&vdir, &s.device, WeightDType::F32)?;
    let (decoder, _) = decoder_from_dir(&ldir, &s.device, WeightDType::F32)?;
    let (w, h) = s.image;
    let img = image::RgbImage::from_fn(w as u32, h as u32, |x, y| image::Rgb([(x % 256) as u8, (y % 256) as u8, 128]));
    let pc = crate::models::qwen2_vl::ProcessorConfig { max_pixels: 28 * 28 * 16384, ..Default::default() };
    let p = crate::models::qwen2_vl::process(&img, &pc)?;
    let (n_img, n_text) = tokens;
    if p.llm_tokens(2) != n_img {
        bail!("processed image has {} tokens, expected {n_img}", p.llm_tokens(2));
    }
    let image_id = 151655u32; // Qwen's <|image_pad|>
    let mut ids: Vec<u32> = (0..8).map(|i| 1000 + i).collect();
    ids.extend(std::iter::repeat_n(image_id, n_img));
    ids.extend((0..n_text as u32).map(|i| 2000 + i));
    let prompt_len = ids.len() - n_text.min(16);
    let adapter = super::init::init_adapter(3584, 2560, 0)?;
    let adapter = Adapter { weight: adapter.weight.to_device(&s.device)?, bias: adapter.bias.to_device(&s.device)? };
    let o = TrainOptions::default();
    let mut opt = AdamW::new(&adapter)?;
    let (mut vision_s, mut step_s, mut peak) = (0.0, 0.0, None);
    let px = Tensor::from_vec(p.pixel_values.clone(), (p.rows(), p.patch_dim), &s.device)?;
    let mut a = adapter;
    // One warm-up step, then `steps` timed ones.
    for it in 0..=s.steps {
        reset_peak_rss();
        let t0 = Instant::now();
        let feats = vision.forward(&px, &[p.grid_thw])?;
        let _ = feats.sum_all()?.to_scalar::<f32>()?;
        let t1 = Instant::now();
        let wv = Var::from_tensor(&a.weight)?;
        let bv = Var::from_tensor(&a.bias)?;
        let loss = response_loss(&decoder, image_id, &ids, prompt_len, &feats, wv.as_tensor(), bv.as_tensor())?;
        let grads = loss.backward()?;
        let gw = grads.get(wv.as_tensor()).context("no adapter gradient")?;
        let gb = grads.get(bv.as_tensor()).context("no adapter gradient")?;
        let (_, [gw, gb]) = clip_grads([gw, gb], Some(1.0))?;
        let (mut wt, mut bt) = (a.weight.clone(), a.bias.clone());
        opt.update([&mut wt, &mut bt], [&gw, &gb], &o)?;
        let _ = wt.sum_all()?.to_scalar::<f32>()?;
        a = Adapter { weight: wt, bias: bt };
        let t2 = Instant::now();
        if it > 0 {
            vision_s += (t1 - t0).as_secs_f64() / s.steps as f64;
            step_s += (t2 - t1).as_secs_f64() / s.steps as f64;
            peak = peak.max(peak_rss());
        }
        tracing::info!(
            vision = vdepth,
            lm = ldepth,
            it,
            vision_s = (t1 - t0).as_secs_f64(),
            step_s = (t2 - t1).as_secs_f64(),
            "graft bench"
        );
    }
    for d in [&vdir, &ldir] {
        std::fs::remove_dir_all(d).ok();
    }
    Ok(Timed { vision_s, step_s, peak })
}

fn part(a: usize, ta: f64, b: usize, tb: f64, full: usize) -> Part {
    let per = (tb - ta) / (b - a) as f64;
    let fixed = ta - a as f64 * per;
    Part {
        depth_a: a,
        seconds_a: ta,
        depth_b: b,
        seconds_b: tb,
        per_block_s: per,
        fixed_s: fixed,
        full_depth: full,
        full_s_extrapolated: fixed + full as f64 * per,
    }
}

pub fn bench(s: &BenchShape) -> Result<BenchReport> {
    if s.vision_layers < 2 || s.lm_layers < 2 || s.steps == 0 {
        bail!("graft bench needs --vision-layers ≥ 2, --lm-layers ≥ 2 and --steps ≥ 1");
    }
    let (w, h) = s.image;
    let (gh, gw) = crate::models::qwen2_vl::smart_resize(h, w, 28, 56 * 56, 28 * 28 * 16384)?;
    let n_img = (gh / 28) * (gw / 28);
    let tmp = tempfile::tempdir()?;
    let (va, la) = (s.vision_layers / 2, s.lm_layers / 2);
    let lo = run_depth(tmp.path(), va, la, s, (n_img, s.text_tokens))?;
    let hi = run_depth(tmp.path(), s.vision_layers, s.lm_layers, s, (n_img, s.text_tokens))?;
    let vision = part(va, lo.vision_s, s.vision_layers, hi.vision_s, VISION_DEPTH);
    let lm_step = part(la, lo.step_s, s.lm_layers, hi.step_s, LM_DEPTH);
    let peak_ext = match (lo.peak, hi.peak) {
        (Some(a), Some(b)) if b >= a => {
            // Memory grows with both depths; attribute the growth to the LM and vision blocks by
            // their weight bytes (LM block ≈ 101 M params, vision block ≈ 19.6 M).
            let (lm_p, v_p) = (101.2e6, 19.6e6);
            let added = (s.lm_layers - la) as f64 * lm_p + (s.vision_layers - va) as f64 * v_p;
            let per_param = (b - a) as f64 / added;
            let more = (LM_DEPTH - s.lm_layers) as f64 * lm_p + (VISION_DEPTH - s.vision_layers) as f64 * v_p;
            Some(b + (more * per_param) as u64)
        }
        _ => None,
    };
    Ok(BenchReport {
        device: crate::device::device_name(&s.device),
        image: format!("{w}x{h} -> {gw}x{gh} px"),
        image_tokens: n_img,
        sequence: 8 + n_img + s.text_tokens,
        step_s_extrapolated: vision.full_s_extrapolated + lm_step.full_s_extrapolated,
        vision,
        lm_step,
        peak_rss_bytes_measured: hi.peak,
        peak_rss_bytes_at_lower_depth: lo.peak,
        peak_rss_bytes_extrapolated: peak_ext,
        notes: format!(
            "random f32 weights; built {va} and {} vision blocks, {la} and {} LM layers; full-depth figures \
             (32 vision blocks, 36 LM layers) are extrapolated linearly (fixed + depth x per block). Half of the \
             built vision blocks are full-attention (the real tower: 4 of 32), so the vision figure is an upper \
             bound. Loss on the last {} tokens.",
            s.vision_layers,
            s.lm_layers,
            s.text_tokens.min(16)
        ),
    })
}
