//! Hidden states of chosen layers at image or text positions, one input at a time, streamed to
//! safetensors files (one per input) with per-layer statistics; vision tokens carry their merged
//! grid cell and their pixel box in the original image.
//!
//! An output directory holds `item-NNNNN.safetensors` (tensors named by hook point, `[n, hidden]`,
//! plus `positions`, `token_ids`, and for images `grid` `[n, 3]` = (t, row, col) after the merge and
//! `boxes` `[n, 4]` = (x0, y0, x1, y1) in original-image pixels), `summary.jsonl` / `summary.csv`
//! (one row per item × hook point) and `manifest.json`.
use crate::models::decoder::Decoder;
use crate::models::engine::VisionEngine;
use crate::models::generate;
use crate::models::hooks::{HookPoint, HookSpec, Positions};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use serde::Serialize;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

/// The states of one input at the selected positions.
#[derive(Debug)]
pub struct Extracted {
    pub points: Vec<HookPoint>,
    /// Per point `[n, hidden]`, f32 on the CPU.
    pub states: Vec<Tensor>,
    /// Sequence positions (columns of the prompt) of the n tokens.
    pub positions: Vec<usize>,
    pub token_ids: Vec<u32>,
    /// Vision tokens only: (t, row, col) after the 2×2 merge, and the pixel box in the original image.
    pub grid: Vec<[usize; 3]>,
    pub boxes: Vec<[f32; 4]>,
}

/// Per vision token of one image (in the order the merger emits them, which is the order of its
/// `<|image_pad|>` tokens): the merged grid cell and its box in the original `width × height`
/// image. The processor resized the image to `grid_thw[1..] · patch` pixels; a merged cell covers
/// `merge · patch` of those, scaled back by the resize ratio per axis.
pub fn vision_cells(
    grid_thw: [usize; 3],
    merge: usize,
    patch: usize,
    width: usize,
    height: usize,
) -> (Vec<[usize; 3]>, Vec<[f32; 4]>) {
    let (t, gh, gw) = (grid_thw[0], grid_thw[1] / merge, grid_thw[2] / merge);
    let cell = (merge * patch) as f32;
    let sx = width as f32 / (grid_thw[2] * patch) as f32;
    let sy = height as f32 / (grid_thw[1] * patch) as f32;
    let mut grid = Vec::with_capacity(t * gh * gw);
    let mut boxes = Vec::with_capacity(t * gh * gw);
    for ti in 0..t {
        for r in 0..gh {
            for c in 0..gw {
                grid.push([ti, r, c]);
                let (x0, y0) = (c as f32 * cell * sx, r as f32 * cell * sy);
                boxes.push([x0, y0, x0 + cell * sx, y0 + cell * sy]);
            }
        }
    }
    (grid, boxes)
}

fn spec_for(points: &[HookPoint]) -> HookSpec {
    points.iter().fold(HookSpec::none(), |s, &p| s.capture(p))
}

fn gather(caps: &crate::models::hooks::Captures, points: &[HookPoint], cols: &[usize]) -> Result<Vec<Tensor>> {
    let dev = Device::Cpu;
    let idx = Tensor::from_vec(cols.iter().map(|&c| c as u32).collect::<Vec<_>>(), cols.len(), &dev)?;
    points
        .iter()
        .map(|&p| {
            let t = caps.get(p)?.to_device(&dev)?.to_dtype(DType::F32)?;
            Ok(t.squeeze(0)?.index_select(&idx, 0)?)
        })
        .collect()
}

/// One image prompt of a VLM (Qwen2-VL or the graft hybrid): the states at `positions`
/// (`image`, `text` or `all`) of every point. `image_sizes` are the original (width, height) of
/// the prompt's images, for the boxes.
pub fn extract_vlm<E: VisionEngine>(
    model: &E,
    input: &E::Input,
    image_sizes: &[(usize, usize)],
    points: &[HookPoint],
    positions: Positions,
) -> Result<Extracted> {
    let grids = E::grids(input);
    if image_sizes.len() != grids.len() {
        bail!("{} image sizes for {} images", image_sizes.len(), grids.len());
    }
    let caps = model.capture(input, &spec_for(points))?;
    let ids = E::ids(input);
    let mask = model.image_mask(input);
    let cols: Vec<usize> = (0..ids.len())
        .filter(|&c| {
            let img = mask[c];
            match positions {
                Positions::Image => img,
                Positions::Text => !img,
                _ => true,
            }
        })
        .collect();
    if cols.is_empty() {
        bail!("the prompt has no {positions} positions");
    }
    let states = gather(&caps, points, &cols)?;
    let (m, p) = model.vision_geometry();
    // Cells of every image token in prompt order, then keep those of the selected columns.
    let mut cell_of: HashMap<usize, ([usize; 3], [f32; 4])> = HashMap::new();
    let mut k = 0;
    let pads: Vec<usize> = (0..ids.len()).filter(|&c| mask[c]).collect();
    for (grid_thw, &(w, h)) in grids.iter().zip(image_sizes) {
        let (g, b) = vision_cells(*grid_thw, m, p, w, h);
        for (g, b) in g.into_iter().zip(b) {
            let col = *pads.get(k).context("fewer <|image_pad|> tokens than vision tokens")?;
            cell_of.insert(col, (g, b));
            k += 1;
        }
    }
    if k != pads.len() {
        bail!("the prompt has {} <|image_pad|> tokens but its images have {k} vision tokens", pads.len());
    }
    let (mut grid, mut boxes) = (Vec::new(), Vec::new());
    if positions == Positions::Image {
        for c in &cols {
            let (g, b) = cell_of[c];
            grid.push(g);
            boxes.push(b);
        }
    }
    Ok(Extracted {
        points: points.to_vec(),
        states,
        token_ids: cols.iter().map(|&c| ids[c]).collect(),
        positions: cols,
        grid,
        boxes,
    })
}

/// A text prompt on a decoder: every position (`text` or `all`).
pub fn extract_text(decoder: &Decoder, ids: &[u32], pad_id: u32, points: &[HookPoint]) -> Result<Extracted> {
    let (_logits, caps, _pads) = generate::prefill(decoder, &[ids.to_vec()], pad_id, &spec_for(points))?;
    let cols: Vec<usize> = (0..ids.len()).collect();
    Ok(Extracted {
        points: points.to_vec(),
        states: gather(&caps, points, &cols)?,
        positions: cols,
        token_ids: ids.to_vec(),
        grid: Vec::new(),
        boxes: Vec::new(),
    })
}

/// Per item × hook point statistics.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct LayerSummary {
    pub item: String,
    pub hook_point: String,
    pub tokens: usize,
    pub norm_mean: f64,
    pub norm_std: f64,
    pub norm_min: f64,
    pub norm_max: f64,
    /// Mean over tokens of cos(x_i, mean of the x_i).
    pub mean_cos_to_mean: f64,
}

pub fn summarize(item: &str, point: HookPoint, x: &Tensor) -> Result<LayerSummary> {
    let rows: Vec<Vec<f32>> = x.to_dtype(DType::F32)?.to_vec2()?;
    let n = rows.len();
    let h = rows.first().map(|r| r.len()).unwrap_or(0);
    let norms: Vec<f64> = rows.iter().map(|r| r.iter().map(|&v| (v as f64).powi(2)).sum::<f64>().sqrt()).collect();
    let mean = norms.iter().sum::<f64>() / n.max(1) as f64;
    let var = norms.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n.max(1) as f64;
    let mut centre = vec![0f64; h];
    for r in &rows {
        centre.iter_mut().zip(r).for_each(|(c, &v)| *c += v as f64 / n as f64);
    }
    let cn = centre.iter().map(|v| v * v).sum::<f64>().sqrt();
    let cos = rows
        .iter()
        .zip(&norms)
        .map(|(r, &nr)| {
            let d: f64 = r.iter().zip(&centre).map(|(&a, &b)| a as f64 * b).sum();
            if nr > 0.0 && cn > 0.0 {
                d / (nr * cn)
            } else {
                0.0
            }
        })
        .sum::<f64>()
        / n.max(1) as f64;
    Ok(LayerSummary {
        item: item.to_string(),
        hook_point: point.to_string(),
        tokens: n,
        norm_mean: mean,
        norm_std: var.sqrt(),
        norm_min: norms.iter().cloned().fold(f64::INFINITY, f64::min),
        norm_max: norms.iter().cloned().fold(f64::NEG_INFINITY, f64::max),
        mean_cos_to_mean: cos,
    })
}

/// Writes items to a directory one at a time: nothing of an item stays in memory after `write`.
pub struct ExtractWriter {
    dir: PathBuf,
    dtype: DType,
    common: Value,
    items: Vec<Value>,
    jsonl: std::fs::File,
    csv: std::fs::File,
}

impl ExtractWriter {
    /// `common`: what the manifest records about the run (model, weights hash, positions, …).
    pub fn create(dir: &Path, dtype: DType, common: Value) -> Result<Self> {
        if !matches!(dtype, DType::F16 | DType::F32) {
            bail!("extraction dtype must be f16 or f32, found {dtype:?}");
        }
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let open =
            |n: &str| std::fs::File::create(dir.join(n)).with_context(|| format!("creating {}", dir.join(n).display()));
        let jsonl = open("summary.jsonl")?;
        let mut csv = open("summary.csv")?;
        writeln!(csv, "item,hook_point,tokens,norm_mean,norm_std,norm_min,norm_max,mean_cos_to_mean")?;
        Ok(Self { dir: dir.to_path_buf(), dtype, common, items: Vec::new(), jsonl, csv })
    }

    /// Writes one item; `meta` (source, image size, DOM, token strings, …) goes into the file's
    /// metadata and the manifest. Returns the item's name.
    pub fn write(&mut self, e: &Extracted, meta: Value) -> Result<(String, Vec<LayerSummary>)> {
        let name = format!("item-{:05}", self.items.len());
        let cpu = Device::Cpu;
        let n = e.positions.len();
        let mut t: HashMap<String, Tensor> = HashMap::new();
        let mut sums = Vec::new();
        for (p, x) in e.points.iter().zip(&e.states) {
            sums.push(summarize(&name, *p, x)?);
            t.insert(p.to_string(), x.to_dtype(self.dtype)?);
        }
        let i64s = |v: Vec<i64>, shape: (usize, usize)| Tensor::from_vec(v, shape, &cpu);
        t.insert("positions".into(), i64s(e.positions.iter().map(|&x| x as i64).collect(), (n, 1))?.squeeze(1)?);
        t.insert("token_ids".into(), i64s(e.token_ids.iter().map(|&x| x as i64).collect(), (n, 1))?.squeeze(1)?);
        if !e.grid.is_empty() {
            t.insert("grid".into(), i64s(e.grid.iter().flatten().map(|&x| x as i64).collect(), (n, 3))?);
            t.insert(
                "boxes".into(),
                Tensor::from_vec(e.boxes.iter().flatten().copied().collect::<Vec<_>>(), (n, 4), &cpu)?,
            );
        }
        let hooks: Vec<String> = e.points.iter().map(|p| p.to_string()).collect();
        let mut md: HashMap<String, String> = HashMap::new();
        md.insert("hook_points".into(), serde_json::to_string(&hooks)?);
        md.insert("meta".into(), meta.to_string());
        md.insert("run".into(), self.common.to_string());
        md.insert(
            "note".into(),
            "blocks.{i}.hook_resid_post = output of decoder layer i = transformers hidden_states[i+1]; hook_embed = hidden_states[0]; hook_final_norm = transformers' last hidden_states entry".into(),
        );
        let path = self.dir.join(format!("{name}.safetensors"));
        crate::util::save_safetensors(&t, &md, &path)?;
        for s in &sums {
            writeln!(self.jsonl, "{}", serde_json::to_string(s)?)?;
            writeln!(
                self.csv,
                "{},{},{},{},{},{},{},{}",
                s.item, s.hook_point, s.tokens, s.norm_mean, s.norm_std, s.norm_min, s.norm_max, s.mean_cos_to_mean
            )?;
        }
        self.items.push(json!({"item": name, "file": format!("{name}.safetensors"), "tokens": n, "meta": meta}));
        Ok((name, sums))
    }

    pub fn finish(self) -> Result<PathBuf> {
        let mut m = self.common.clone();
        m["items"] = Value::Array(self.items);
        m["dtype"] = json!(format!("{:?}", self.dtype).to_lowercase());
        let p = self.dir.join("manifest.json");
        std::fs::write(&p, serde_json::to_string_pretty(&m)? + "\n")
            .with_context(|| format!("writing {}", p.display()))?;
        Ok(p)
    }
}

/// One item read back.
#[derive(Debug)]
pub struct Item {
    pub name: String,
    pub points: Vec<HookPoint>,
    /// Per point `[n, hidden]` f32.
    pub states: Vec<Tensor>,
    pub positions: Vec<i64>,
    pub token_ids: Vec<i64>,
    pub grid: Vec<[i64; 3]>,
    pub boxes: Vec<[f32; 4]>,
    pub meta: Value,
}

impl Item {
    pub fn state(&self, p: HookPoint) -> Result<&Tensor> {
        let i = self.points.iter().position(|&q| q == p).with_context(|| {
            format!(
                "item {} has no `{p}` (it has {:?})",
                self.name,
                self.points.iter().map(|p| p.to_string()).collect::<Vec<_>>()
            )
        })?;
        Ok(&self.states[i])
    }
}

pub fn read_item(path: &Path) -> Result<Item> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let (_, md) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| anyhow::anyhow!("{}: not a safetensors file: {e}", path.display()))?;
    let md = md.metadata().clone().unwrap_or_default();
    let hooks: Vec<String> = serde_json::from_str(md.get("hook_points").map(|s| s.as_str()).unwrap_or(""))
        .with_context(|| format!("{}: metadata field `hook_points` missing or not a JSON list", path.display()))?;
    let points = hooks.iter().map(|h| h.parse()).collect::<Result<Vec<HookPoint>>>()?;
    let mut t = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)?;
    let mut take = |k: &str| t.remove(k).with_context(|| format!("{}: no tensor `{k}`", path.display()));
    let states = points.iter().map(|p| Ok(take(&p.to_string())?.to_dtype(DType::F32)?)).collect::<Result<Vec<_>>>()?;
    let positions = take("positions")?.to_vec1::<i64>()?;
    let token_ids = take("token_ids")?.to_vec1::<i64>()?;
    let grid = match t.remove("grid") {
        Some(g) => g.to_vec2::<i64>()?.into_iter().map(|r| [r[0], r[1], r[2]]).collect(),
        None => Vec::new(),
    };
    let boxes = match t.remove("boxes") {
        Some(b) => b.to_vec2::<f32>()?.into_iter().map(|r| [r[0], r[1], r[2], r[3]]).collect(),
        None => Vec::new(),
    };
    let n = positions.len();
    for (p, s) in points.iter().zip(&states) {
        if s.dim(0)? != n {
            bail!("{}: `{p}` has {} rows, expected {n} (one per position)", path.display(), s.dim(0)?);
        }
    }
    let meta = md.get("meta").map(|m| serde_json::from_str(m)).transpose()?.unwrap_or(Value::Null);
    let name = path.file_stem().map(|s| s.to_string_lossy().to_string()).unwrap_or_default();
    Ok(Item { name, points, states, positions, token_ids, grid, boxes, meta })
}

/// The item files of an extraction directory, in order.
pub fn item_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading extraction directory {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .map(|n| n.to_string_lossy())
                .is_some_and(|n| n.starts_with("item-") && n.ends_with(".safetensors"))
        })
        .collect();
    v.sort();
    if v.is_empty() {
        bail!("{}: no item-*.safetensors files (not an `extract` output directory)", dir.display());
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cells_cover_the_image() {
        // 4×8 patches of 14 px on a 112×56 image: 2×4 merged cells of 28 px, no resize.
        let (g, b) = vision_cells([1, 4, 8], 2, 14, 112, 56);
        assert_eq!(g.len(), 8);
        assert_eq!(g[5], [0, 1, 1]);
        assert_eq!(b[5], [28.0, 28.0, 56.0, 56.0]);
        // Resized 420 → 308 wide: boxes scale back to the original width.
        let (_, b) = vision_cells([1, 30, 22], 2, 14, 320, 420);
        let last = b.last().unwrap();
        assert!((last[2] - 320.0).abs() < 1e-3 && (last[3] - 420.0).abs() < 1e-3, "{last:?}");
    }

    #[test]
    fn summary_stats() {
        let x = Tensor::new(&[[3f32, 4.0], [0.0, 2.0]], &Device::Cpu).unwrap();
        let s = summarize("a", HookPoint::Embed, &x).unwrap();
        assert_eq!((s.norm_min, s.norm_max, s.norm_mean), (2.0, 5.0, 3.5));
        assert!((s.norm_std - 1.5).abs() < 1e-12);
        // mean = (1.5, 3); cos((3,4),(1.5,3)) and cos((0,2),(1.5,3)).
        let c = |a: [f64; 2]| {
            (a[0] * 1.5 + a[1] * 3.0) / ((a[0] * a[0] + a[1] * a[1]).sqrt() * (1.5f64 * 1.5 + 9.0).sqrt())
        };
        assert!((s.mean_cos_to_mean - (c([3.0, 4.0]) + c([0.0, 2.0])) / 2.0).abs() < 1e-9);
    }
}
