//! `split`: one directory per pipeline stage (docs/stages.md), each holding exactly that stage's
//! weight tensors with their original names and bytes, the source's side files (config,
//! tokenizer, chat template, processor) and a [`StageManifest`].
//!
//! Tensors are assigned by name: the vision tower (`visual.*`) to the first stage; a decoder
//! layer's tensors (`…layers.N.…`, GGUF `blk.N.…`) to the stage whose layer range holds N; the
//! token embedding to the first stage (and to the last too when the LM head is tied to it); the
//! final norm and the LM head to the last stage. Anything else is an error naming the tensor.
use super::manifest::{SourceModel, StageManifest, FORMAT, MANIFEST};
use crate::models::config::DecoderConfig;
use crate::models::qwen2_vl::config::Qwen2VlConfig;
use crate::models::registry::{self, Location, Resolved};
use crate::models::weights::{fingerprint, safetensor_files};
use anyhow::{bail, Context, Result};
use candle_core::quantized::{gguf_file, QTensor};
use candle_core::Device;
use indicatif::{ProgressBar, ProgressStyle};
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// What `split` does; the command line's `--model`, `--stages`, `--at` and `--out`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SplitOptions {
    /// Registry alias, transformers checkpoint directory or `.gguf` file.
    pub model: String,
    /// The number of stages: alone, an even split; with `at`, it must agree.
    pub stages: Option<usize>,
    /// Split points: the first global layer of every stage after the first.
    pub at: Vec<usize>,
    /// `stage-0`, `stage-1`, … are written under this directory.
    pub out: PathBuf,
}

/// The weights file of a stage directory from a safetensors source.
pub const SAFETENSORS_WEIGHTS: &str = "model.safetensors";
/// The weights file of a stage directory from a GGUF source.
pub const GGUF_WEIGHTS: &str = "model.gguf";

/// The name of stage `k`'s directory under the output directory.
pub fn stage_dir_name(k: usize) -> String {
    format!("stage-{k}")
}

/// The split points (the first layer of each stage after the first) of `num_layers` layers:
/// `at` as given (checked: each in `1..=num_layers-1`, strictly increasing, agreeing with
/// `stages` when both are given), or, with `at` empty, the even split `round(k·L/N)` for
/// `k = 1..N-1`. `name` is the model's name for the messages.
pub fn split_points(num_layers: usize, stages: Option<usize>, at: &[usize], name: &str) -> Result<Vec<usize>> {
    let l = num_layers;
    let list = || at.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(",");
    let points: Vec<usize> = if at.is_empty() {
        let Some(n) = stages else {
            bail!("split: give --stages N (an even split) or --at A,B,… (the first layer of each later stage)")
        };
        if n == 0 {
            bail!("--stages 0: a split needs at least one stage");
        }
        if n > l {
            bail!("--stages {n}: {name} has {l} layers, and every stage needs at least one layer");
        }
        // round(k·L/N), halves up, in integers.
        (1..n).map(|k| (2 * k * l + n) / (2 * n)).collect()
    } else {
        if l < 2 {
            bail!("--at {}: {name} has {l} layer(s), too few to split", list());
        }
        for &p in at {
            if p < 1 || p > l - 1 {
                bail!("--at {p}: a split point must be between 1 and {} ({name} has {l} layers)", l - 1);
            }
        }
        if at.windows(2).any(|w| w[0] >= w[1]) {
            bail!("--at {}: split points must be strictly increasing", list());
        }
        if let Some(n) = stages {
            if n != at.len() + 1 {
                bail!(
                    "--stages {n} --at {}: {} split point(s) make {} stages, not {n}",
                    list(),
                    at.len(),
                    at.len() + 1
                );
            }
        }
        at.to_vec()
    };
    let bounds = bounds(l, &points);
    if let Some(k) = bounds.windows(2).position(|w| w[0] >= w[1]) {
        bail!("split: stage {k} of {name} would hold no layer (layers {}..{})", bounds[k], bounds[k + 1]);
    }
    Ok(points)
}

/// `[0, points…, num_layers]`: stage k holds layers `bounds[k]..bounds[k+1]`.
fn bounds(num_layers: usize, points: &[usize]) -> Vec<usize> {
    let mut b = Vec::with_capacity(points.len() + 2);
    b.push(0);
    b.extend_from_slice(points);
    b.push(num_layers);
    b
}

/// Who owns a tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Owner {
    /// The vision tower: the first stage.
    Vision,
    /// A decoder layer: the stage whose range holds it.
    Layer(usize),
    /// The token embedding: the first stage, and the last when the head is tied.
    Embed,
    /// The final norm or the LM head: the last stage.
    Head,
    /// Needed by every stage (GGUF `rope_freqs.weight`: RoPE frequency factors that the
    /// config of every stage is computed from).
    All,
}

/// The decoder prefixes of the transformers layouts (as the safetensors loader knows them).
const HF_PREFIXES: [&str; 4] = ["model.", "model.language_model.", "language_model.model.", ""];

/// The layer index of `rest` = `N.…`.
fn layer_index(rest: &str) -> Option<usize> {
    let (n, tail) = rest.split_once('.')?;
    if tail.is_empty() || n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    n.parse().ok()
}

fn owner_hf(name: &str) -> Option<Owner> {
    if name.starts_with("visual.") || name.starts_with("model.visual.") {
        return Some(Owner::Vision);
    }
    if name == "lm_head.weight" {
        return Some(Owner::Head);
    }
    for p in HF_PREFIXES {
        let Some(rest) = name.strip_prefix(p) else { continue };
        if rest == "embed_tokens.weight" {
            return Some(Owner::Embed);
        }
        if rest == "norm.weight" {
            return Some(Owner::Head);
        }
        if let Some(i) = rest.strip_prefix("layers.").and_then(layer_index) {
            return Some(Owner::Layer(i));
        }
    }
    None
}

fn owner_gguf(name: &str) -> Option<Owner> {
    match name {
        "token_embd.weight" => Some(Owner::Embed),
        "output_norm.weight" | "output.weight" => Some(Owner::Head),
        "rope_freqs.weight" => Some(Owner::All),
        _ => name.strip_prefix("blk.").and_then(layer_index).map(Owner::Layer),
    }
}

/// One stage's share: its tensor names (in source order) and its flags.
#[derive(Debug, Clone, Default)]
struct Share {
    names: Vec<String>,
    embed: bool,
    head: bool,
    vision: bool,
}

/// Assigns every tensor to its stages. `tied`: the LM head is the embedding (the last stage
/// holds a copy of it).
fn assign(
    names: &[String],
    owner: fn(&str) -> Option<Owner>,
    bounds: &[usize],
    tied: bool,
    model: &str,
) -> Result<Vec<Share>> {
    let n = bounds.len() - 1;
    let num_layers = bounds[n];
    let last = n - 1;
    let mut shares = vec![Share::default(); n];
    shares[0].embed = true;
    shares[last].head = true;
    if tied {
        shares[last].embed = true;
    }
    let mut has_embed = false;
    for name in names {
        let o = owner(name).with_context(|| {
            format!(
                "split: tensor `{name}`: no stage owns it (expected visual.*, a layer, the embedding, \
                 the final norm or the LM head)"
            )
        })?;
        let to: Vec<usize> = match o {
            Owner::Vision => {
                shares[0].vision = true;
                vec![0]
            }
            Owner::Layer(i) => {
                if i >= num_layers {
                    bail!("split: tensor `{name}` belongs to layer {i}, but {model} has {num_layers} layers");
                }
                vec![bounds.windows(2).position(|w| w[0] <= i && i < w[1]).expect("bounds tile 0..L")]
            }
            Owner::Embed => {
                has_embed = true;
                if tied && last != 0 {
                    vec![0, last]
                } else {
                    vec![0]
                }
            }
            Owner::Head => vec![last],
            Owner::All => (0..n).collect(),
        };
        for k in to {
            shares[k].names.push(name.clone());
        }
    }
    if !has_embed {
        bail!("split: {model} has no token embedding tensor (embed_tokens.weight / token_embd.weight)");
    }
    Ok(shares)
}

/// The source's layer count, LM head tying and family, from its config.
struct SourceConfig {
    num_layers: usize,
    tie_word_embeddings: bool,
    family: String,
}

fn dir_config(spec: &str, dir: &Path) -> Result<SourceConfig> {
    let path = dir.join("config.json");
    if crate::models::qwen2_vl::is_vlm_model(spec) {
        let cfg = Qwen2VlConfig::from_file(&path)?;
        Ok(SourceConfig {
            num_layers: cfg.text.num_layers,
            tie_word_embeddings: cfg.text.tie_word_embeddings,
            family: "qwen2-vl".into(),
        })
    } else {
        let cfg = DecoderConfig::from_file(&path)?;
        Ok(SourceConfig {
            num_layers: cfg.num_layers,
            tie_word_embeddings: cfg.tie_word_embeddings,
            family: cfg.family.name().into(),
        })
    }
}

/// The files holding the model's tensors: those of `model.safetensors.index.json`, else
/// `model.safetensors`, else every `*.safetensors` (other safetensors files of a directory,
/// such as a fixture's `reference.safetensors`, are not the model's).
fn model_files(dir: &Path) -> Result<Vec<PathBuf>> {
    if dir.join("model.safetensors.index.json").exists() {
        return safetensor_files(dir);
    }
    let single = dir.join(SAFETENSORS_WEIGHTS);
    if single.is_file() {
        return Ok(vec![single]);
    }
    safetensor_files(dir)
}

/// The side files of a checkpoint directory: every plain file (symlinks followed) that is not
/// a weights file, a hidden file or a stage manifest.
fn side_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).with_context(|| format!("reading model directory {}", dir.display()))? {
        let e = e.with_context(|| format!("reading model directory {}", dir.display()))?;
        let path = e.path();
        let name = e.file_name().to_string_lossy().into_owned();
        let is_file = std::fs::metadata(&path).with_context(|| format!("reading {}", path.display()))?.is_file();
        if !is_file
            || name.starts_with('.')
            || name.ends_with(".safetensors")
            || name == "model.safetensors.index.json"
            // Other frameworks' weights: not side files (each stage would hold a full copy).
            || [".bin", ".pth", ".pt", ".h5", ".gguf", ".msgpack", ".onnx", ".ckpt", ".pkl"].iter().any(|x| name.ends_with(x))
            || name == MANIFEST
        {
            continue;
        }
        out.push(path);
    }
    out.sort();
    Ok(out)
}

fn progress(total: usize) -> ProgressBar {
    let pb = ProgressBar::new(total as u64);
    pb.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} tensors {elapsed_precise} eta {eta}")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    pb.set_message("split");
    pb
}

/// A source tensor's view that ticks the progress bar when its bytes are written.
struct Counted<'a> {
    view: safetensors::tensor::TensorView<'a>,
    pb: &'a ProgressBar,
}

impl safetensors::View for Counted<'_> {
    fn dtype(&self) -> safetensors::Dtype {
        self.view.dtype()
    }
    fn shape(&self) -> &[usize] {
        self.view.shape()
    }
    fn data(&self) -> Cow<'_, [u8]> {
        self.pb.inc(1);
        Cow::Borrowed(self.view.data())
    }
    fn data_len(&self) -> usize {
        self.view.data().len()
    }
}

/// Where a stage is built before it is renamed into place.
fn partial_dir(out: &Path, k: usize) -> PathBuf {
    out.join(format!(".{}.partial", stage_dir_name(k)))
}

/// Splits a model into pipeline stages (see the module docs); returns each stage's directory
/// and manifest, in stage order.
pub fn split(o: &SplitOptions) -> Result<Vec<(PathBuf, StageManifest)>> {
    let resolved = registry::resolve(&o.model)?;
    match &resolved.location {
        Location::Dir(dir) => split_dir(o, &resolved, dir),
        Location::Gguf(path) => split_gguf(o, &resolved, path),
    }
}

/// What every stage's manifest shares.
struct Plan<'a> {
    o: &'a SplitOptions,
    bounds: Vec<usize>,
    source: SourceModel,
    weights: &'static str,
}

impl Plan<'_> {
    fn stages(&self) -> usize {
        self.bounds.len() - 1
    }

    /// Refuses an existing stage directory before anything is written; clears stale partial
    /// directories of an interrupted split.
    fn prepare(&self) -> Result<()> {
        let out = &self.o.out;
        for k in 0..self.stages() {
            let d = out.join(stage_dir_name(k));
            if d.exists() {
                bail!(
                    "split: {} already exists (an earlier split?); pass another --out, or remove it first",
                    d.display()
                );
            }
        }
        std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
        for k in 0..self.stages() {
            let p = partial_dir(out, k);
            if p.exists() {
                tracing::info!("removing {}, left by an interrupted split", p.display());
                std::fs::remove_dir_all(&p).with_context(|| format!("removing {}", p.display()))?;
            }
            std::fs::create_dir(&p).with_context(|| format!("creating {}", p.display()))?;
        }
        Ok(())
    }

    /// Writes stage `k`'s manifest into its partial directory (after its other files).
    fn manifest(&self, k: usize, share: &Share) -> Result<StageManifest> {
        let dir = partial_dir(&self.o.out, k);
        let mut files = BTreeMap::new();
        for e in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
            let e = e.with_context(|| format!("reading {}", dir.display()))?;
            let name = e.file_name().to_string_lossy().into_owned();
            if name != MANIFEST && e.file_type()?.is_file() {
                files.insert(name, crate::util::sha256_file(&e.path())?);
            }
        }
        let m = StageManifest {
            format: FORMAT,
            stage: k,
            stages: self.stages(),
            layers: [self.bounds[k], self.bounds[k + 1]],
            num_layers: *self.bounds.last().expect("non-empty"),
            embed: share.embed,
            head: share.head,
            vision: share.vision,
            source: self.source.clone(),
            weights: self.weights.to_string(),
            files,
        };
        m.write(&dir)?;
        Ok(m)
    }

    /// Renames every partial directory into place.
    fn finish(&self, manifests: Vec<StageManifest>) -> Result<Vec<(PathBuf, StageManifest)>> {
        let mut out = Vec::with_capacity(manifests.len());
        for (k, m) in manifests.into_iter().enumerate() {
            let (from, to) = (partial_dir(&self.o.out, k), self.o.out.join(stage_dir_name(k)));
            std::fs::rename(&from, &to).with_context(|| format!("renaming {} to {}", from.display(), to.display()))?;
            tracing::info!("stage {k}: {} (layers {}..{})", to.display(), m.layers[0], m.layers[1]);
            out.push((to, m));
        }
        Ok(out)
    }

    /// Removes the partial directories after a failure (best effort).
    fn cleanup(&self) {
        for k in 0..self.stages() {
            let _ = std::fs::remove_dir_all(partial_dir(&self.o.out, k));
        }
    }

    /// Runs `build` (which writes every stage's files), then the manifests and the renames;
    /// cleans up on failure.
    fn run(&self, shares: &[Share], build: impl FnOnce() -> Result<()>) -> Result<Vec<(PathBuf, StageManifest)>> {
        self.prepare()?;
        let r = build().and_then(|()| {
            let manifests = shares.iter().enumerate().map(|(k, s)| self.manifest(k, s)).collect::<Result<Vec<_>>>()?;
            self.finish(manifests)
        });
        if r.is_err() {
            self.cleanup();
        }
        r
    }
}

fn split_dir(o: &SplitOptions, r: &Resolved, dir: &Path) -> Result<Vec<(PathBuf, StageManifest)>> {
    let cfg = dir_config(&o.model, dir)?;
    let points = split_points(cfg.num_layers, o.stages, &o.at, &r.name)?;
    let bounds = bounds(cfg.num_layers, &points);
    let files = model_files(dir)?;
    // SAFETY: read-only maps of files nobody should modify while we copy them (as every
    // mmap-based loader assumes).
    let maps = files
        .iter()
        .map(|f| {
            let file = std::fs::File::open(f).with_context(|| format!("opening {}", f.display()))?;
            unsafe { memmap2::Mmap::map(&file) }.with_context(|| format!("mapping {}", f.display()))
        })
        .collect::<Result<Vec<_>>>()?;
    let mut sts = Vec::with_capacity(maps.len());
    let mut metadata: HashMap<String, String> = HashMap::new();
    for (f, m) in files.iter().zip(&maps) {
        let st = safetensors::SafeTensors::deserialize(m)
            .with_context(|| format!("{}: not a safetensors file", f.display()))?;
        let (_, meta) = safetensors::SafeTensors::read_metadata(m)
            .with_context(|| format!("{}: not a safetensors file", f.display()))?;
        for (k, v) in meta.metadata().clone().unwrap_or_default() {
            metadata.entry(k).or_insert(v);
        }
        sts.push(st);
    }
    // name -> index of the file holding it; names in file order, then by offset.
    let mut holder: HashMap<String, usize> = HashMap::new();
    let mut names = Vec::new();
    for (i, st) in sts.iter().enumerate() {
        let mut ts = st.tensors();
        ts.sort_by_key(|(_, v)| v.data().as_ptr() as usize);
        for (name, _) in ts {
            if let Some(j) = holder.insert(name.clone(), i) {
                bail!("split: tensor `{name}` is in both {} and {}", files[j].display(), files[i].display());
            }
            names.push(name);
        }
    }
    let tied = cfg.tie_word_embeddings || !holder.contains_key("lm_head.weight");
    let shares = assign(&names, owner_hf, &bounds, tied, &r.name)?;
    let plan = Plan {
        o,
        bounds,
        source: SourceModel {
            name: r.name.clone(),
            checkpoint: r.checkpoint.clone(),
            weights_hash: fingerprint(&safetensor_files(dir)?)?,
            family: cfg.family,
            format: "safetensors".into(),
        },
        weights: SAFETENSORS_WEIGHTS,
    };
    let side = side_files(dir)?;
    tracing::info!(
        model = %r.name, layers = cfg.num_layers, stages = shares.len(), tied,
        "splitting {} at {points:?} ({} tensors, {} side files)", dir.display(), names.len(), side.len()
    );
    plan.run(&shares, || {
        let pb = progress(shares.iter().map(|s| s.names.len()).sum());
        for (k, share) in shares.iter().enumerate() {
            let stage = partial_dir(&o.out, k);
            for f in &side {
                let to = stage.join(f.file_name().expect("a file name"));
                std::fs::copy(f, &to).with_context(|| format!("copying {} to {}", f.display(), to.display()))?;
            }
            let mut views = Vec::with_capacity(share.names.len());
            for name in &share.names {
                let view = sts[holder[name]].tensor(name).with_context(|| format!("reading tensor `{name}`"))?;
                views.push((name.as_str(), Counted { view, pb: &pb }));
            }
            let path = stage.join(SAFETENSORS_WEIGHTS);
            let meta = if metadata.is_empty() { None } else { Some(metadata.clone()) };
            safetensors::serialize_to_file(views, meta, &path)
                .with_context(|| format!("writing {}", path.display()))?;
        }
        pb.finish_and_clear();
        Ok(())
    })
}

fn split_gguf(o: &SplitOptions, r: &Resolved, path: &Path) -> Result<Vec<(PathBuf, StageManifest)>> {
    let content = crate::models::gguf::read(path)?;
    let cfg = crate::models::gguf::config(&content, path)?;
    // candle's writer aligns tensor data to 32 bytes; a copied `general.alignment` must agree.
    if let Some(v) = content.metadata.get("general.alignment") {
        let a = v.to_u32().map(u64::from).or_else(|_| v.to_u64()).ok();
        if a != Some(32) {
            bail!(
                "{}: general.alignment is {v:?}; split writes GGUF files aligned to 32 bytes and keeps the \
                 metadata unchanged, so it can only split files aligned to 32",
                path.display()
            );
        }
    }
    let points = split_points(cfg.num_layers, o.stages, &o.at, &r.name)?;
    let bounds = bounds(cfg.num_layers, &points);
    let mut infos: Vec<(&String, u64)> = content.tensor_infos.iter().map(|(n, i)| (n, i.offset)).collect();
    infos.sort_by_key(|&(n, off)| (off, n.clone()));
    let names: Vec<String> = infos.into_iter().map(|(n, _)| n.clone()).collect();
    let tied = cfg.tie_word_embeddings || !content.tensor_infos.contains_key("output.weight");
    let shares = assign(&names, owner_gguf, &bounds, tied, &r.name)?;
    let plan = Plan {
        o,
        bounds,
        source: SourceModel {
            name: r.name.clone(),
            checkpoint: r.checkpoint.clone(),
            weights_hash: fingerprint(&[path.to_path_buf()])?,
            family: cfg.family.name().into(),
            format: "gguf".into(),
        },
        weights: GGUF_WEIGHTS,
    };
    let mut metadata: Vec<(&str, &gguf_file::Value)> = content.metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    metadata.sort_by_key(|&(k, _)| k);
    tracing::info!(
        model = %r.name, layers = cfg.num_layers, stages = shares.len(), tied,
        "splitting {} at {points:?} ({} tensors, {} metadata keys)", path.display(), names.len(), metadata.len()
    );
    plan.run(&shares, || {
        let mut reader = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let pb = progress(shares.iter().map(|s| s.names.len()).sum());
        for (k, share) in shares.iter().enumerate() {
            let mut tensors: Vec<(&str, QTensor)> = Vec::with_capacity(share.names.len());
            for name in &share.names {
                let t = content
                    .tensor(&mut reader, name, &Device::Cpu)
                    .with_context(|| format!("{}: reading tensor `{name}`", path.display()))?;
                tensors.push((name.as_str(), t));
                pb.inc(1);
            }
            let refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (*n, t)).collect();
            let to = partial_dir(&o.out, k).join(GGUF_WEIGHTS);
            let file = std::fs::File::create(&to).with_context(|| format!("creating {}", to.display()))?;
            let mut w = std::io::BufWriter::new(file);
            gguf_file::write(&mut w, &metadata, &refs).with_context(|| format!("writing {}", to.display()))?;
            std::io::Write::flush(&mut w).with_context(|| format!("writing {}", to.display()))?;
        }
        pb.finish_and_clear();
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn even_points_round() {
        assert_eq!(split_points(24, Some(2), &[], "m").unwrap(), vec![12]);
        assert_eq!(split_points(24, Some(3), &[], "m").unwrap(), vec![8, 16]);
        assert_eq!(split_points(3, Some(2), &[], "m").unwrap(), vec![2]); // round(1.5) = 2
        assert_eq!(split_points(3, Some(3), &[], "m").unwrap(), vec![1, 2]);
        assert_eq!(split_points(28, Some(3), &[], "m").unwrap(), vec![9, 19]);
        assert!(split_points(5, Some(1), &[], "m").unwrap().is_empty());
        assert!(split_points(3, Some(4), &[], "m").is_err());
        assert!(split_points(3, None, &[], "m").is_err());
    }

    #[test]
    fn owners() {
        assert_eq!(owner_hf("model.layers.12.mlp.up_proj.weight"), Some(Owner::Layer(12)));
        assert_eq!(owner_hf("model.language_model.layers.3.input_layernorm.weight"), Some(Owner::Layer(3)));
        assert_eq!(owner_hf("language_model.model.layers.0.self_attn.q_proj.bias"), Some(Owner::Layer(0)));
        assert_eq!(owner_hf("model.language_model.norm.weight"), Some(Owner::Head));
        assert_eq!(owner_hf("model.embed_tokens.weight"), Some(Owner::Embed));
        assert_eq!(owner_hf("lm_head.weight"), Some(Owner::Head));
        assert_eq!(owner_hf("visual.blocks.0.attn.qkv.weight"), Some(Owner::Vision));
        assert_eq!(owner_hf("model.layers.x.mlp.weight"), None);
        assert_eq!(owner_hf("model.layers.1"), None);
        assert_eq!(owner_hf("model.rotary_emb.inv_freq"), None);
        assert_eq!(owner_gguf("blk.7.attn_q.weight"), Some(Owner::Layer(7)));
        assert_eq!(owner_gguf("output_norm.weight"), Some(Owner::Head));
        assert_eq!(owner_gguf("token_embd.weight"), Some(Owner::Embed));
        assert_eq!(owner_gguf("rope_freqs.weight"), Some(Owner::All));
        assert_eq!(owner_gguf("something.weight"), None);
    }
}
