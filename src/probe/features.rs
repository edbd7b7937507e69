//! Features once, heads many times: the frozen model runs once over a dataset; the residual stream
//! at every selected hook point is pooled over the prompt's tokens and streamed to disk.
//!
//! A features directory holds `shard-NNNNN.safetensors` (per hook point a `[rows, hidden]` tensor
//! named by the hook point, in the save dtype; `labels` and `rows` i64 `[rows]`), `rows.jsonl`
//! (row index, label, class, tokens, the dataset row's metadata) and `manifest.json` (model,
//! weights hash, hook points, pooling, classes, shards). A shard is written when it fills, so
//! memory stays flat whatever the dataset's size.
use super::data::Dataset;
use crate::models::engine::VisionEngine;
use crate::models::generate;
use crate::models::hooks::{HookPoint, HookSpec};
use crate::models::load::{Loaded, ModelInfo};
use crate::models::tokenizer::ChatMessage;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

pub const FORMAT: &str = "miniwob-steer-probe-features/1";

/// How a prompt's states at one hook point become one vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Pool {
    /// The first real token (after left padding).
    First,
    /// The last prompt token: what the model reads when it starts answering (the gate's point).
    Last,
    /// The mean over every real prompt token.
    Mean,
    /// The mean over the image tokens (Qwen2-VL prompts with an image).
    ImageMean,
}

impl std::str::FromStr for Pool {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "first" => Pool::First,
            "last" => Pool::Last,
            "mean" => Pool::Mean,
            "image-mean" => Pool::ImageMean,
            o => bail!("--pool {o}: expected first, last, mean or image-mean"),
        })
    }
}

impl std::fmt::Display for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Pool::First => "first",
            Pool::Last => "last",
            Pool::Mean => "mean",
            Pool::ImageMean => "image-mean",
        })
    }
}

/// Pools one row's states `[seq, hidden]` (real tokens only); `image` marks its image tokens.
pub fn pool(x: &Tensor, how: Pool, image: &[bool]) -> Result<Tensor> {
    let seq = x.dim(0)?;
    if seq == 0 {
        bail!("cannot pool an empty prompt");
    }
    // `copy`: a row view would keep the whole captured `[batch, seq, hidden]` storage alive
    // until its shard is written (memory grew by that much per batch).
    Ok(match how {
        Pool::First => x.get(0)?.copy()?,
        Pool::Last => x.get(seq - 1)?.copy()?,
        Pool::Mean => x.mean(0)?,
        Pool::ImageMean => {
            let cols: Vec<u32> =
                (0..seq).filter(|&c| image.get(c).copied().unwrap_or(false)).map(|c| c as u32).collect();
            if cols.is_empty() {
                bail!("--pool image-mean: the prompt has no image tokens (give rows with an `image`, on a Qwen2-VL model)");
            }
            let idx = Tensor::from_vec(cols.clone(), cols.len(), x.device())?;
            x.index_select(&idx, 0)?.mean(0)?
        }
    })
}

/// The token ids of a text row: with `chat`, the model's chat template (one user turn and the
/// generation prompt, the agent's prompt shape); else the text with the tokenizer's special tokens.
pub fn encode_text(tok: &crate::models::tokenizer::Tokenizer, text: &str, chat: bool) -> Result<Vec<u32>> {
    if chat {
        tok.encode(&tok.apply_chat_template(&[ChatMessage::new("user", text)], true)?, false)
    } else {
        tok.encode(text, true)
    }
}

/// What `probe features` records.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub model: String,
    pub model_spec: String,
    pub checkpoint: String,
    pub weights_hash: String,
    /// `--adapter`: the LoRA adapter (`name@hash`) of the model; absent for a plain model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adapter: Option<String>,
    pub model_dtype: String,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub hook_points: Vec<String>,
    pub pool: Pool,
    /// Text rows went through the model's chat template (user turn + generation prompt).
    pub chat: bool,
    pub classes: Vec<String>,
    pub rows: usize,
    pub save_dtype: String,
    pub shards: Vec<Shard>,
    pub dataset: String,
    pub seconds: f64,
    pub tokens: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Shard {
    pub file: String,
    pub rows: usize,
}

/// Options of one features run.
#[derive(Debug, Clone)]
pub struct Options {
    pub points: Vec<HookPoint>,
    pub pool: Pool,
    pub chat: bool,
    pub save_dtype: DType,
    /// Rows per shard file.
    pub shard_rows: usize,
    /// Text prompts per forward pass (rows are batch invariant: the values do not depend on it).
    pub batch: usize,
    pub model_spec: String,
    pub dataset: String,
}

struct Writer {
    dir: PathBuf,
    dtype: DType,
    points: Vec<HookPoint>,
    buf: Vec<Vec<Tensor>>,
    labels: Vec<i64>,
    ids: Vec<i64>,
    shards: Vec<Shard>,
    rows_jsonl: std::io::BufWriter<std::fs::File>,
}

impl Writer {
    fn push(&mut self, row: usize, class: usize, pooled: Vec<Tensor>, meta: Value, shard_rows: usize) -> Result<()> {
        writeln!(self.rows_jsonl, "{}", json!({"row": row, "class": class, "meta": meta}))?;
        for (b, t) in self.buf.iter_mut().zip(pooled) {
            b.push(t);
        }
        self.labels.push(class as i64);
        self.ids.push(row as i64);
        if (row + 1).is_multiple_of(50) {
            tracing::info!("probe features: {} rows", row + 1);
        }
        if self.labels.len() >= shard_rows {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        let n = self.labels.len();
        if n == 0 {
            return Ok(());
        }
        let mut t: HashMap<String, Tensor> = HashMap::new();
        for (p, b) in self.points.iter().zip(self.buf.iter_mut()) {
            t.insert(p.to_string(), Tensor::stack(&std::mem::take(b), 0)?.to_dtype(self.dtype)?);
        }
        t.insert("labels".into(), Tensor::from_vec(std::mem::take(&mut self.labels), n, &Device::Cpu)?);
        t.insert("rows".into(), Tensor::from_vec(std::mem::take(&mut self.ids), n, &Device::Cpu)?);
        let file = format!("shard-{:05}.safetensors", self.shards.len());
        let mut md = HashMap::new();
        md.insert("format".to_string(), FORMAT.to_string());
        crate::util::save_safetensors(&t, &md, &self.dir.join(&file))?;
        self.shards.push(Shard { file, rows: n });
        Ok(())
    }
}

/// Runs the model over `data` and writes the pooled features to `out`. Returns the manifest.
pub fn compute(model: &Loaded, data: &Dataset, opts: &Options, out: &Path) -> Result<Manifest> {
    match model {
        Loaded::Vlm(vlm) => compute_vision(&**vlm, data, opts, out),
        Loaded::Text(lm) => {
            if data.rows.iter().any(|r| r.image.is_some()) {
                bail!(
                    "{}: rows with an `image` need a vision-language model (Qwen2-VL or a graft directory); {} is a text model",
                    opts.dataset,
                    opts.model_spec
                );
            }
            write_features(&lm.info, &lm.decoder, data, opts, out, |w, spec, pb, tokens| {
                text_rows(lm, data, opts, spec, w, pb, tokens)
            })
        }
    }
}

/// [`compute`] on a vision-language model (Qwen2-VL, the graft hybrid): each row alone, its
/// image (if any) first in the user turn.
pub fn compute_vision<E: VisionEngine>(vlm: &E, data: &Dataset, opts: &Options, out: &Path) -> Result<Manifest> {
    write_features(vlm.info(), vlm.decoder(), data, opts, out, |w, spec, pb, tokens| {
        image_rows(vlm, data, opts, spec, w, pb, tokens)
    })
}

type Progress = indicatif::ProgressBar;

/// The writer, the progress bar and the manifest around `rows`, which pushes every row.
fn write_features(
    info: &ModelInfo,
    dec: &crate::models::decoder::Decoder,
    data: &Dataset,
    opts: &Options,
    out: &Path,
    rows: impl FnOnce(&mut Writer, &HookSpec, &Progress, &mut usize) -> Result<()>,
) -> Result<Manifest> {
    if !matches!(opts.save_dtype, DType::F32 | DType::F16 | DType::BF16) {
        bail!("features are saved as f32, f16 or bf16, not {:?}", opts.save_dtype);
    }
    if opts.pool == Pool::ImageMean && !data.rows.iter().any(|r| r.image.is_some()) {
        bail!("--pool image-mean needs rows with an `image` (a VLM); {} has none", opts.dataset);
    }
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let rows_jsonl = std::io::BufWriter::new(
        std::fs::File::create(out.join("rows.jsonl"))
            .with_context(|| format!("creating {}/rows.jsonl", out.display()))?,
    );
    let mut w = Writer {
        dir: out.to_path_buf(),
        dtype: opts.save_dtype,
        points: opts.points.clone(),
        buf: vec![Vec::new(); opts.points.len()],
        labels: Vec::new(),
        ids: Vec::new(),
        shards: Vec::new(),
        rows_jsonl,
    };
    let spec = opts.points.iter().fold(HookSpec::none(), |s, &p| s.capture(p));
    let t0 = std::time::Instant::now();
    let mut tokens = 0usize;
    let pb = crate::interp::progress(data.rows.len() as u64, "probe features");
    rows(&mut w, &spec, &pb, &mut tokens)?;
    w.flush()?;
    w.rows_jsonl.flush()?;
    pb.finish_and_clear();
    let m = Manifest {
        format: FORMAT.into(),
        model: info.name.clone(),
        model_spec: opts.model_spec.clone(),
        checkpoint: info.checkpoint.clone(),
        weights_hash: info.weights_hash.clone(),
        adapter: info.adapter.clone(),
        model_dtype: info.dtype.clone(),
        hidden_size: dec.cfg.hidden_size,
        num_layers: dec.cfg.num_layers,
        hook_points: opts.points.iter().map(|p| p.to_string()).collect(),
        pool: opts.pool,
        chat: opts.chat,
        classes: data.classes.clone(),
        rows: data.rows.len(),
        save_dtype: format!("{:?}", opts.save_dtype).to_lowercase(),
        shards: std::mem::take(&mut w.shards),
        dataset: opts.dataset.clone(),
        seconds: t0.elapsed().as_secs_f64(),
        tokens,
    };
    let p = out.join("manifest.json");
    std::fs::write(&p, serde_json::to_string_pretty(&m)? + "\n").with_context(|| format!("writing {}", p.display()))?;
    Ok(m)
}

/// Text rows, batched (left-padded; the values do not depend on the batch).
fn text_rows(
    lm: &crate::models::load::LoadedModel,
    data: &Dataset,
    opts: &Options,
    spec: &HookSpec,
    w: &mut Writer,
    pb: &Progress,
    tokens: &mut usize,
) -> Result<()> {
    let (dec, tok) = (&lm.decoder, &lm.tokenizer);
    let shard_rows = opts.shard_rows.max(1);
    let pad = tok.pad_token_id().unwrap_or(0);
    for (b, chunk) in data.rows.chunks(opts.batch.max(1)).enumerate() {
        let mut ids = Vec::with_capacity(chunk.len());
        for r in chunk {
            let v = encode_text(tok, &r.text, opts.chat)?;
            if v.is_empty() {
                bail!("{}: row {} encodes to no tokens", opts.dataset, b * opts.batch.max(1) + ids.len());
            }
            ids.push(v);
        }
        let (_logits, caps, pads) = generate::prefill(dec, &ids, pad, spec)?;
        let states: Vec<Tensor> = opts
            .points
            .iter()
            .map(|&p| Ok(caps.get(p)?.to_device(&Device::Cpu)?.to_dtype(DType::F32)?))
            .collect::<Result<_>>()?;
        for (k, r) in chunk.iter().enumerate() {
            let row = b * opts.batch.max(1) + k;
            let n = ids[k].len();
            *tokens += n;
            let pooled = states
                .iter()
                .map(|s| pool(&s.get(k)?.narrow(0, pads[k], n)?, opts.pool, &[]))
                .collect::<Result<Vec<_>>>()?;
            w.push(row, data.class_of(r), pooled, json!({"label": r.label, "tokens": n, "meta": r.meta}), shard_rows)?;
            pb.inc(1);
        }
    }
    Ok(())
}

/// Rows of a VLM, one prefill each.
fn image_rows<E: VisionEngine>(
    vlm: &E,
    data: &Dataset,
    opts: &Options,
    spec: &HookSpec,
    w: &mut Writer,
    pb: &Progress,
    tokens: &mut usize,
) -> Result<()> {
    let shard_rows = opts.shard_rows.max(1);
    for (row, r) in data.rows.iter().enumerate() {
        let images = match &r.image {
            Some(p) => vec![image::open(p)
                .with_context(|| format!("{}: row {row}: reading image {}", opts.dataset, p.display()))?
                .to_rgb8()],
            None => vec![],
        };
        let input = vlm.image_prompt(&images, &r.text)?;
        let caps = vlm.capture(&input, spec)?;
        let image = vlm.image_mask(&input);
        let n = E::ids(&input).len();
        *tokens += n;
        let pooled = opts
            .points
            .iter()
            .map(|&p| pool(&caps.get(p)?.to_device(&Device::Cpu)?.to_dtype(DType::F32)?.squeeze(0)?, opts.pool, &image))
            .collect::<Result<Vec<_>>>()
            .with_context(|| format!("{}: row {row}", opts.dataset))?;
        let meta = json!({"label": r.label, "tokens": n, "image_tokens": image.iter().filter(|&&x| x).count(), "meta": r.meta});
        w.push(row, data.class_of(r), pooled, meta, shard_rows)?;
        pb.inc(1);
    }
    Ok(())
}

/// A features directory opened for reading.
#[derive(Debug, Clone)]
pub struct FeatureSet {
    pub dir: PathBuf,
    pub manifest: Manifest,
}

impl FeatureSet {
    pub fn open(dir: &Path) -> Result<Self> {
        let p = dir.join("manifest.json");
        let text = std::fs::read_to_string(&p)
            .with_context(|| format!("reading {} (is {} a `probe features` output?)", p.display(), dir.display()))?;
        let manifest: Manifest =
            serde_json::from_str(&text).with_context(|| format!("{}: not a features manifest", p.display()))?;
        if manifest.format != FORMAT {
            bail!("{}: format `{}`, expected `{FORMAT}`", p.display(), manifest.format);
        }
        Ok(Self { dir: dir.to_path_buf(), manifest })
    }

    pub fn points(&self) -> Result<Vec<HookPoint>> {
        self.manifest.hook_points.iter().map(|s| s.parse()).collect()
    }

    /// Resolves `--layer`: a layer index (`blocks.{i}.hook_resid_post`) or a hook point name,
    /// which must be one the features hold.
    pub fn point(&self, spec: &str) -> Result<HookPoint> {
        let p: HookPoint = if spec.contains("hook_") {
            spec.parse()?
        } else {
            HookPoint::ResidPost(
                spec.trim()
                    .parse()
                    .with_context(|| format!("--layer {spec}: expected a layer index or a hook point name"))?,
            )
        };
        if !self.manifest.hook_points.contains(&p.to_string()) {
            bail!("{}: no features at `{p}` (it has {})", self.dir.display(), self.manifest.hook_points.join(", "));
        }
        Ok(p)
    }

    /// Every row's features at `point`, cast to f32 whatever the save dtype, `[rows, hidden]`, and
    /// the class indices.
    pub fn load(&self, point: HookPoint) -> Result<(Tensor, Vec<u32>)> {
        let name = point.to_string();
        let mut xs = Vec::new();
        let mut labels = Vec::new();
        for s in &self.manifest.shards {
            let path = self.dir.join(&s.file);
            let mut t = candle_core::safetensors::load(&path, &Device::Cpu)
                .with_context(|| format!("reading {}", path.display()))?;
            let x = t.remove(&name).with_context(|| format!("{}: no tensor `{name}`", path.display()))?;
            let h = self.manifest.hidden_size;
            if x.dims() != [s.rows, h] {
                bail!(
                    "{}: `{name}` has shape {:?}, expected [{}, {h}] (rows, hidden_size)",
                    path.display(),
                    x.dims(),
                    s.rows
                );
            }
            xs.push(x.to_dtype(DType::F32)?);
            let l = t.remove("labels").with_context(|| format!("{}: no tensor `labels`", path.display()))?;
            labels.extend(l.to_vec1::<i64>()?.into_iter().map(|v| v as u32));
        }
        if xs.is_empty() {
            bail!("{}: no shards", self.dir.display());
        }
        let c = self.manifest.classes.len() as u32;
        if let Some(bad) = labels.iter().find(|&&l| l >= c) {
            bail!("{}: label {bad} out of range for {c} classes", self.dir.display());
        }
        Ok((Tensor::cat(&xs, 0)?, labels))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pooling() {
        let x = Tensor::new(&[[1f32, 2.0], [3.0, 4.0], [5.0, 9.0]], &Device::Cpu).unwrap();
        let v = |p: Pool, img: &[bool]| pool(&x, p, img).unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(v(Pool::First, &[]), [1.0, 2.0]);
        assert_eq!(v(Pool::Last, &[]), [5.0, 9.0]);
        assert_eq!(v(Pool::Mean, &[]), [3.0, 5.0]);
        assert_eq!(v(Pool::ImageMean, &[false, true, true]), [4.0, 6.5]);
        assert!(pool(&x, Pool::ImageMean, &[false; 3]).unwrap_err().to_string().contains("no image tokens"));
        assert_eq!("image-mean".parse::<Pool>().unwrap(), Pool::ImageMean);
        assert!("max".parse::<Pool>().is_err());
    }
}
