//! The Qwen2-VL image processor, as transformers' `Qwen2VLImageProcessorPil` does it: smart_resize
//! (both sides multiples of patch·merge = 28, pixel count within [min_pixels, max_pixels], aspect
//! ratio kept), Pillow's bicubic resampling on 8-bit RGB, rescale by 1/255, CLIP mean/std
//! normalisation, then patchify into rows of C·T·P·P values in merge-block order (the 2×2
//! patches that the merger fuses into one LLM token are consecutive rows).
//!
//! The resampling reproduces Pillow's `ImagingResample` (separable, horizontal pass first,
//! antialiased support when shrinking, 22-bit fixed-point coefficients, an 8-bit intermediate), so
//! resized images match transformers to the 8-bit level; sizes already multiple of 28 are not
//! resampled at all (Pillow returns a copy), and those match to float rounding.
use anyhow::{bail, Context, Result};
use image::RgbImage;
use serde_json::Value;
use std::path::Path;

pub const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
pub const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_6, 0.275_777_1];

#[derive(Debug, Clone, PartialEq)]
pub struct ProcessorConfig {
    pub min_pixels: usize,
    pub max_pixels: usize,
    pub patch_size: usize,
    pub merge_size: usize,
    pub temporal_patch_size: usize,
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

impl Default for ProcessorConfig {
    fn default() -> Self {
        Self {
            min_pixels: 56 * 56,
            max_pixels: 28 * 28 * 1280,
            patch_size: 14,
            merge_size: 2,
            temporal_patch_size: 2,
            mean: CLIP_MEAN,
            std: CLIP_STD,
        }
    }
}

impl ProcessorConfig {
    /// `preprocessor_config.json` when the checkpoint has one (both the `min_pixels` and the
    /// `size: {shortest_edge, longest_edge}` spellings), else transformers' defaults.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let p = dir.join("preprocessor_config.json");
        let mut c = Self::default();
        if !p.exists() {
            return Ok(c);
        }
        let v: Value = serde_json::from_str(&std::fs::read_to_string(&p)?)
            .with_context(|| format!("{}: not valid JSON", p.display()))?;
        let n = |v: &Value, k: &str| v.get(k).and_then(|x| x.as_u64()).map(|x| x as usize);
        let size = v.get("size").cloned().unwrap_or(Value::Null);
        if let Some(x) = n(&v, "min_pixels").or(n(&size, "shortest_edge")).or(n(&size, "min_pixels")) {
            c.min_pixels = x;
        }
        if let Some(x) = n(&v, "max_pixels").or(n(&size, "longest_edge")).or(n(&size, "max_pixels")) {
            c.max_pixels = x;
        }
        c.patch_size = n(&v, "patch_size").unwrap_or(c.patch_size);
        c.merge_size = n(&v, "merge_size").unwrap_or(c.merge_size);
        c.temporal_patch_size = n(&v, "temporal_patch_size").unwrap_or(c.temporal_patch_size);
        let three = |k: &str| -> Result<Option<[f32; 3]>> {
            match v.get(k) {
                Some(Value::Array(a)) if a.len() == 3 => {
                    Ok(Some([0, 1, 2].map(|i| a[i].as_f64().unwrap_or(f64::NAN) as f32)))
                }
                Some(Value::Null) | None => Ok(None),
                Some(o) => bail!("{}: `{k}` must be three numbers, found {o}", p.display()),
            }
        };
        c.mean = three("image_mean")?.unwrap_or(c.mean);
        c.std = three("image_std")?.unwrap_or(c.std);
        Ok(c)
    }

    pub fn factor(&self) -> usize {
        self.patch_size * self.merge_size
    }
}

/// transformers' `smart_resize`: `(height, width)` → the resized `(height, width)`.
pub fn smart_resize(
    height: usize,
    width: usize,
    factor: usize,
    min_pixels: usize,
    max_pixels: usize,
) -> Result<(usize, usize)> {
    if height == 0 || width == 0 {
        bail!("image of {width}x{height} pixels: both sides must be positive");
    }
    let (h, w, f) = (height as f64, width as f64, factor as f64);
    if h.max(w) / h.min(w) > 200.0 {
        bail!("image of {width}x{height}: aspect ratio {} exceeds 200", h.max(w) / h.min(w));
    }
    // Python's round() ties to even (7.5 -> 8, 6.5 -> 6).
    let mut hb = (h / f).round_ties_even() * f;
    let mut wb = (w / f).round_ties_even() * f;
    if hb * wb > max_pixels as f64 {
        let beta = (h * w / max_pixels as f64).sqrt();
        hb = f.max((h / beta / f).floor() * f);
        wb = f.max((w / beta / f).floor() * f);
    } else if hb * wb < min_pixels as f64 {
        let beta = (min_pixels as f64 / (h * w)).sqrt();
        hb = (h * beta / f).ceil() * f;
        wb = (w * beta / f).ceil() * f;
    }
    Ok((hb as usize, wb as usize))
}

fn bicubic(x: f64) -> f64 {
    // Pillow's bicubic kernel, a = -0.5.
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc`: per output index, the first input
/// index and the fixed-point weights.
fn coeffs(in_size: usize, out_size: usize) -> Vec<(usize, Vec<i32>)> {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = 2.0 * filterscale;
    let mut out = Vec::with_capacity(out_size);
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        // C casts truncate toward zero.
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
        let n = xmax.saturating_sub(xmin);
        let mut w: Vec<f64> = (0..n).map(|x| bicubic((x as f64 + xmin as f64 - center + 0.5) * ss)).collect();
        let total: f64 = w.iter().sum();
        if total != 0.0 {
            w.iter_mut().for_each(|x| *x /= total);
        }
        let k = w
            .into_iter()
            .map(|x| {
                let s = x * (1u32 << PRECISION_BITS) as f64;
                if x < 0.0 {
                    (-0.5 + s) as i32
                } else {
                    (0.5 + s) as i32
                }
            })
            .collect();
        out.push((xmin, k));
    }
    out
}

fn clip8(x: i64) -> u8 {
    let v = x >> PRECISION_BITS;
    v.clamp(0, 255) as u8
}

/// Bicubic resize of 8-bit RGB exactly as Pillow's `Image.resize(..., BICUBIC)`.
pub fn resize_bicubic(img: &RgbImage, width: usize, height: usize) -> RgbImage {
    let (w0, h0) = (img.width() as usize, img.height() as usize);
    if (w0, h0) == (width, height) {
        return img.clone();
    }
    let src = img.as_raw();
    let mut cur: Vec<u8> = src.clone();
    let (mut cw, ch) = (w0, h0);
    if width != w0 {
        let k = coeffs(w0, width);
        let mut out = vec![0u8; width * ch * 3];
        for y in 0..ch {
            for (x, (xmin, ws)) in k.iter().enumerate() {
                for c in 0..3 {
                    let mut s: i64 = 1 << (PRECISION_BITS - 1);
                    for (i, &wt) in ws.iter().enumerate() {
                        s += cur[(y * cw + xmin + i) * 3 + c] as i64 * wt as i64;
                    }
                    out[(y * width + x) * 3 + c] = clip8(s);
                }
            }
        }
        cur = out;
        cw = width;
    }
    if height != h0 {
        let k = coeffs(h0, height);
        let mut out = vec![0u8; cw * height * 3];
        for (y, (ymin, ws)) in k.iter().enumerate() {
            for x in 0..cw {
                for c in 0..3 {
                    let mut s: i64 = 1 << (PRECISION_BITS - 1);
                    for (i, &wt) in ws.iter().enumerate() {
                        s += cur[((ymin + i) * cw + x) * 3 + c] as i64 * wt as i64;
                    }
                    out[(y * cw + x) * 3 + c] = clip8(s);
                }
            }
        }
        cur = out;
    }
    RgbImage::from_raw(width as u32, height as u32, cur).expect("buffer size matches")
}

/// One processed image: `rows` patches of `patch_dim` values, and its `[t, h, w]` patch grid.
#[derive(Debug, Clone, PartialEq)]
pub struct Processed {
    pub pixel_values: Vec<f32>,
    pub grid_thw: [usize; 3],
    pub patch_dim: usize,
}

impl Processed {
    pub fn rows(&self) -> usize {
        self.grid_thw.iter().product()
    }
    /// LLM tokens after the merger: t·h·w / merge².
    pub fn llm_tokens(&self, merge: usize) -> usize {
        self.rows() / (merge * merge)
    }
}

/// smart_resize → bicubic → rescale → normalise → patchify.
pub fn process(img: &RgbImage, c: &ProcessorConfig) -> Result<Processed> {
    let (h0, w0) = (img.height() as usize, img.width() as usize);
    let (h, w) = smart_resize(h0, w0, c.factor(), c.min_pixels, c.max_pixels)?;
    let img = resize_bicubic(img, w, h);
    let raw = img.as_raw();
    // Channel-first float planes; rescale in f64 then f32 like numpy (`astype(float64) * scale`).
    let mut planes = vec![0f32; 3 * h * w];
    for y in 0..h {
        for x in 0..w {
            for ch in 0..3 {
                let v = (raw[(y * w + x) * 3 + ch] as f64 * (1.0 / 255.0)) as f32;
                planes[(ch * h + y) * w + x] = (v - c.mean[ch]) / c.std[ch];
            }
        }
    }
    let (p, m, t) = (c.patch_size, c.merge_size, c.temporal_patch_size);
    let (gh, gw) = (h / p, w / p);
    let patch_dim = 3 * t * p * p;
    let mut out = Vec::with_capacity(gh * gw * patch_dim);
    for bh in 0..gh / m {
        for bw in 0..gw / m {
            for i in 0..m {
                for j in 0..m {
                    let (py, px) = ((bh * m + i) * p, (bw * m + j) * p);
                    for ch in 0..3 {
                        // A still image is its own temporal neighbour: T copies of the frame.
                        for _ in 0..t {
                            for y in 0..p {
                                let row = (ch * h + py + y) * w + px;
                                out.extend_from_slice(&planes[row..row + p]);
                            }
                        }
                    }
                }
            }
        }
    }
    Ok(Processed { pixel_values: out, grid_thw: [1, gh, gw], patch_dim })
}
