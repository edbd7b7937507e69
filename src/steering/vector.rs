//! Steering vector files: safetensors with one unit tensor per layer (`layer.{i}`, `[hidden]`,
//! added at `blocks.{i}.hook_resid_post`) plus metadata; and llama.cpp control vectors (GGUF,
//! `direction.{i}` F32, which llama.cpp adds to the output of layer i: the same point).
use crate::models::hooks::HookPoint;
use crate::models::load::ModelInfo;
use anyhow::{bail, Context, Result};
use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

pub const FORMAT: &str = "miniwob-steer-vector/1";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct VectorMeta {
    pub model: String,
    pub checkpoint: String,
    pub weights_hash: String,
    pub hidden_size: usize,
    pub num_layers: usize,
    /// `prompt`, `response`, `pca`, `combine`, `import`.
    pub method: String,
    pub pair: String,
    pub samples: usize,
    /// Norm of the mean difference before normalisation, per layer.
    pub pre_norm: BTreeMap<usize, f32>,
    /// Mean L2 norm of the residual stream at the hook point over the training prompts, per
    /// layer: the unit for `--coeff-mode relative`.
    pub mean_resid_norm: BTreeMap<usize, f32>,
    pub created: String,
    /// Where the training states were read when not where the vector is added: `resid_pre`
    /// (the input of the layer). Absent: `resid_post`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read: Option<String>,
    /// The protocol (`name@hash`) the vector was computed under; absent in files of harnesses
    /// without protocols (they used today's default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    /// `--adapter`: the LoRA adapter (`name@hash`) of the model; absent for a plain model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adapter: Option<String>,
}

#[derive(Debug, Clone)]
pub struct SteeringVector {
    /// Unit vectors, f32, `[hidden]`, by layer.
    pub layers: BTreeMap<usize, Tensor>,
    pub meta: VectorMeta,
}

pub fn unit(t: &Tensor) -> Result<(Tensor, f32)> {
    let n = t.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?;
    if n.is_nan() || n <= 0.0 || !n.is_finite() {
        bail!("cannot normalise a vector of norm {n}");
    }
    Ok(((t / n as f64)?, n))
}

impl SteeringVector {
    pub fn hook_point(layer: usize) -> HookPoint {
        HookPoint::ResidPost(layer)
    }

    pub fn layer(&self, layer: usize) -> Result<&Tensor> {
        self.layers.get(&layer).with_context(|| {
            format!(
                "the vector has no direction for layer {layer} (it has layers {:?}); compute one with --layer {layer}",
                self.layers.keys().collect::<Vec<_>>()
            )
        })
    }

    /// The vector file's hash for result lines: [`content_hash`](Self::content_hash) of what
    /// the file holds.
    pub fn file_hash(path: &Path) -> Result<String> {
        Self::load(path)?.content_hash()
    }

    /// sha256 prefix of the directions' bytes and the metadata, leaving out the creation time:
    /// the same inputs give the same hash, so two identical runs' results pool in `analyze`.
    pub fn content_hash(&self) -> Result<String> {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        for (l, t) in &self.layers {
            h.update(format!("layer.{l}:").as_bytes());
            for x in t.to_dtype(DType::F32)?.to_vec1::<f32>()? {
                h.update(x.to_le_bytes());
            }
        }
        let mut meta = self.meta.clone();
        meta.created.clear();
        h.update(serde_json::to_string(&meta)?.as_bytes());
        Ok(hex::encode(&h.finalize()[..8]))
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let mut tensors = HashMap::new();
        for (l, t) in &self.layers {
            tensors.insert(format!("layer.{l}"), t.to_dtype(DType::F32)?.to_device(&Device::Cpu)?);
        }
        let mut meta: HashMap<String, String> = HashMap::new();
        meta.insert("format".into(), FORMAT.into());
        meta.insert("meta".into(), serde_json::to_string(&self.meta)?);
        meta.insert(
            "hook_points".into(),
            self.layers.keys().map(|&l| Self::hook_point(l).to_string()).collect::<Vec<_>>().join(","),
        );
        meta.insert("model".into(), self.meta.model.clone());
        meta.insert("weights_hash".into(), self.meta.weights_hash.clone());
        crate::util::save_safetensors(&tensors, &meta, path)
    }

    pub fn load(path: &Path) -> Result<Self> {
        let md = crate::util::read_safetensors_metadata(path)?;
        match md.get("format") {
            Some(f) if f == FORMAT => {}
            Some(f) => bail!("{}: vector format `{f}`, expected `{FORMAT}`", path.display()),
            None => bail!(
                "{}: no `format` metadata; not a miniwob-steer vector file (llama.cpp control vectors are .gguf: use `vector import`)",
                path.display()
            ),
        }
        let meta: VectorMeta = serde_json::from_str(
            md.get("meta").with_context(|| format!("{}: missing `meta` metadata", path.display()))?,
        )
        .with_context(|| format!("{}: malformed `meta` metadata", path.display()))?;
        let tensors = candle_core::safetensors::load(path, &Device::Cpu)?;
        let mut layers = BTreeMap::new();
        for (name, t) in tensors {
            let l: usize = name
                .strip_prefix("layer.")
                .and_then(|n| n.parse().ok())
                .with_context(|| format!("{}: unexpected tensor `{name}` (expected layer.N)", path.display()))?;
            if t.dims() != [meta.hidden_size] {
                bail!(
                    "{}: tensor `{name}` has shape {:?}, expected [{}] (hidden_size in its metadata)",
                    path.display(),
                    t.dims(),
                    meta.hidden_size
                );
            }
            if l >= meta.num_layers {
                bail!(
                    "{}: tensor `{name}` is for layer {l} but the model has {} layers",
                    path.display(),
                    meta.num_layers
                );
            }
            let t = t.to_dtype(DType::F32)?;
            // A NaN or infinity would turn every steered row's output into garbage (and, times a
            // coefficient of 0, the baseline's too): refused here, with where it is.
            if let Some((i, x)) = t.to_vec1::<f32>()?.into_iter().enumerate().find(|(_, x)| !x.is_finite()) {
                bail!(
                    "{}: tensor `{name}` has a non-finite value ({x}) at index {i}; a steering vector must be finite",
                    path.display()
                );
            }
            layers.insert(l, t);
        }
        if layers.is_empty() {
            bail!("{}: no layer.N tensors", path.display());
        }
        Ok(Self { layers, meta })
    }

    /// Refuses a vector computed on another model: different hidden size or depth always; a
    /// different weights hash unless `allow_foreign` (e.g. the same model at another dtype).
    pub fn check_model(&self, info: &ModelInfo, allow_foreign: bool) -> Result<()> {
        if self.meta.hidden_size != info.hidden_size || self.meta.num_layers != info.num_layers {
            bail!(
                "steering vector is for a model with hidden size {} and {} layers ({}), but {} has hidden size {} and {} layers",
                self.meta.hidden_size,
                self.meta.num_layers,
                self.meta.model,
                info.name,
                info.hidden_size,
                info.num_layers
            );
        }
        if self.meta.adapter != info.adapter && !allow_foreign {
            let name = |a: &Option<String>| a.clone().unwrap_or_else(|| "no adapter".into());
            bail!(
                "steering vector was computed on {} with {}, this model has {}; pass --allow-foreign-vector (run, generate) to use it anyway",
                self.meta.model,
                name(&self.meta.adapter),
                name(&info.adapter)
            );
        }
        if self.meta.weights_hash != info.weights_hash && !allow_foreign {
            bail!(
                "steering vector was computed on {} (weights {}), not on {} (weights {}); pass --allow-foreign-vector (run, generate) to use it anyway",
                self.meta.model,
                self.meta.weights_hash,
                info.name,
                info.weights_hash
            );
        }
        Ok(())
    }

    /// Normalise each, sum, normalise (layers present in every input).
    pub fn combine(vectors: &[SteeringVector], name: &str) -> Result<SteeringVector> {
        let first = vectors.first().context("nothing to combine")?;
        for v in vectors {
            if v.meta.hidden_size != first.meta.hidden_size
                || v.meta.weights_hash != first.meta.weights_hash
                || v.meta.adapter != first.meta.adapter
            {
                bail!("cannot combine vectors of different models ({} and {})", first.meta.model, v.meta.model);
            }
        }
        let mut layers = BTreeMap::new();
        for &l in first.layers.keys() {
            if !vectors.iter().all(|v| v.layers.contains_key(&l)) {
                continue;
            }
            let mut sum = Tensor::zeros(first.meta.hidden_size, DType::F32, &Device::Cpu)?;
            for v in vectors {
                sum = (sum + unit(&v.layers[&l])?.0)?;
            }
            layers.insert(l, unit(&sum)?.0);
        }
        if layers.is_empty() {
            bail!("the vectors share no layer");
        }
        let mut meta = first.meta.clone();
        meta.method = "combine".into();
        meta.pair = name.into();
        meta.samples = vectors.iter().map(|v| v.meta.samples).sum();
        meta.pre_norm = BTreeMap::new();
        meta.created = now();
        Ok(SteeringVector { layers, meta })
    }

    /// Writes a llama.cpp control vector. llama.cpp cannot steer layer 0, so it is refused.
    pub fn export_gguf(&self, path: &Path, arch: &str) -> Result<()> {
        if self.layers.contains_key(&0) {
            bail!(
                "layer 0 cannot be exported: llama.cpp control vectors start at direction.1 (pick --layer 1 or higher)"
            );
        }
        let mut qt = Vec::new();
        for (l, t) in &self.layers {
            qt.push((format!("direction.{l}"), QTensor::quantize(&t.to_device(&Device::Cpu)?, GgmlDType::F32)?));
        }
        let arch_v = gguf_file::Value::String("controlvector".into());
        let hint = gguf_file::Value::String(arch.into());
        let count = gguf_file::Value::U32(self.layers.len() as u32);
        let meta = [
            ("general.architecture", &arch_v),
            ("controlvector.model_hint", &hint),
            ("controlvector.layer_count", &count),
        ];
        let tensors: Vec<(&str, &QTensor)> = qt.iter().map(|(n, t)| (n.as_str(), t)).collect();
        let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let tmp = tempfile::NamedTempFile::new_in(dir)?;
        {
            let mut f = std::io::BufWriter::new(tmp.as_file());
            gguf_file::write(&mut f, &meta, &tensors)?;
            use std::io::Write;
            f.flush()?;
        }
        tmp.persist(path).with_context(|| format!("writing {}", path.display()))?;
        Ok(())
    }

    /// Reads a llama.cpp control vector for `info`'s model. Directions are stored as-is (they
    /// may carry a scale); `pre_norm` records their norms and the tensors are normalised.
    pub fn import_gguf(path: &Path, info: &ModelInfo) -> Result<SteeringVector> {
        let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let c = gguf_file::Content::read(&mut f).with_context(|| format!("{}: not a GGUF file", path.display()))?;
        let arch = crate::models::gguf::meta_str(&c, "general.architecture").unwrap_or("");
        if arch != "controlvector" {
            bail!("{}: general.architecture is `{arch}`, expected `controlvector`", path.display());
        }
        let mut layers = BTreeMap::new();
        let mut pre_norm = BTreeMap::new();
        for (name, ti) in &c.tensor_infos {
            let l: usize = name
                .strip_prefix("direction.")
                .and_then(|n| n.parse().ok())
                .with_context(|| format!("{}: unexpected tensor `{name}` (expected direction.N)", path.display()))?;
            if l == 0 {
                bail!(
                    "{}: tensor `direction.0` is invalid: llama.cpp control vectors start at layer 1",
                    path.display()
                );
            }
            if l >= info.num_layers {
                bail!("{}: `{name}` is for layer {l} but {} has {} layers", path.display(), info.name, info.num_layers);
            }
            if ti.shape.dims() != [info.hidden_size] {
                bail!(
                    "{}: `{name}` has shape {:?}, expected [{}] ({}'s hidden size)",
                    path.display(),
                    ti.shape.dims(),
                    info.hidden_size,
                    info.name
                );
            }
            let t = c.tensor(&mut f, name, &Device::Cpu)?.dequantize(&Device::Cpu)?;
            let (u, n) = unit(&t)?;
            layers.insert(l, u);
            pre_norm.insert(l, n);
        }
        if layers.is_empty() {
            bail!("{}: no direction.N tensors", path.display());
        }
        Ok(SteeringVector {
            layers,
            meta: VectorMeta {
                model: info.name.clone(),
                checkpoint: info.checkpoint.clone(),
                weights_hash: info.weights_hash.clone(),
                hidden_size: info.hidden_size,
                num_layers: info.num_layers,
                method: "import".into(),
                pair: path.file_stem().unwrap_or_default().to_string_lossy().into_owned(),
                samples: 0,
                pre_norm,
                mean_resid_norm: BTreeMap::new(),
                created: now(),
                read: None,
                protocol: None,
                adapter: info.adapter.clone(),
            },
        })
    }
}

pub fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}
