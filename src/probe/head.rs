//! Probe heads: `linear` (logits = W·z + b) or `mlp` (W₂·relu(W₁·z + b₁) + b₂) over the
//! standardised feature z = (x − μ) / σ, μ and σ from the training rows, all in f32.
//!
//! Inference runs on plain f32 slices with the batch-invariant kernel
//! ([`crate::models::kernels::matmul_t`]), so a row's probabilities are the same bits alone or in a
//! batch, before and after a save/load round trip. Training (autograd) is in [`super::train`].
//!
//! Head file (safetensors): `norm.mean`, `norm.std` `[hidden]`; `linear.weight` `[classes,
//! hidden]`, `linear.bias`; or `fc1.weight` `[width, hidden]`, `fc1.bias`, `fc2.weight`
//! `[classes, width]`, `fc2.bias`; the split as i64 `split.train`, `split.val`, `split.test` (row
//! indices of the features directory); metadata `format`, `meta` (JSON [`HeadMeta`]).
use super::features::Pool;
use crate::models::hooks::HookPoint;
use crate::models::kernels::matmul_t;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;

pub const FORMAT: &str = "miniwob-steer-probe-head/1";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "kind")]
pub enum HeadKind {
    Linear,
    Mlp { width: usize },
}

/// Everything a head file records besides its tensors.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct HeadMeta {
    pub head: HeadKind,
    pub classes: Vec<String>,
    pub hook_point: String,
    pub pool: Pool,
    pub chat: bool,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub model: String,
    pub checkpoint: String,
    pub weights_hash: String,
    /// `--adapter`: the LoRA adapter (`name@hash`) of the model; absent for a plain model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adapter: Option<String>,
    pub features: String,
    /// Mean L2 norm of the raw features over the training rows (the unit of relative coefficients).
    pub mean_resid_norm: f32,
    pub train: serde_json::Value,
    pub best_epoch: usize,
    pub best_val_loss: Option<f64>,
    pub epochs_run: usize,
    pub created: String,
}

/// Row indices of a features directory.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Split {
    pub train: Vec<u32>,
    pub val: Vec<u32>,
    pub test: Vec<u32>,
}

#[derive(Debug, Clone)]
pub struct Head {
    pub meta: HeadMeta,
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
    /// linear: [W (classes×hidden), b]; mlp: [W₁ (width×hidden), b₁, W₂ (classes×width), b₂].
    pub params: Vec<Vec<f32>>,
    pub split: Split,
}

fn vec1(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_device(&Device::Cpu)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
}

impl Head {
    pub fn point(&self) -> Result<HookPoint> {
        self.meta.hook_point.parse()
    }

    pub fn num_classes(&self) -> usize {
        self.meta.classes.len()
    }

    /// Refuses a model whose hidden size differs; warns when its weights (or adapter) differ from
    /// the ones the head was trained on.
    pub fn check_model(&self, info: &crate::models::load::ModelInfo) -> Result<()> {
        if info.hidden_size != self.meta.hidden_size {
            bail!(
                "the head expects hidden size {} ({}), the model {} has {}",
                self.meta.hidden_size,
                self.meta.model,
                info.name,
                info.hidden_size
            );
        }
        if info.weights_hash != self.meta.weights_hash || info.adapter != self.meta.adapter {
            tracing::warn!(
                "the head was trained on {} (weights {}, adapter {:?}), this model is {} (weights {}, adapter {:?})",
                self.meta.model,
                self.meta.weights_hash,
                self.meta.adapter,
                info.name,
                info.weights_hash,
                info.adapter
            );
        }
        Ok(())
    }

    /// Class probabilities of one prompt from its states at the head's point over its real tokens
    /// (`[tokens, hidden]`, any dtype or device), pooled as the head's features were; `image`
    /// marks image tokens (VLM rows).
    pub fn probs_of_states(&self, states: &Tensor, image: &[bool]) -> Result<Vec<f32>> {
        let x = states.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
        let pooled = super::features::pool(&x, self.meta.pool, image)?;
        self.probs(&pooled.to_vec1::<f32>()?)?.pop().context("no probabilities")
    }

    pub fn class_index(&self, class: &str) -> Result<usize> {
        self.meta.classes.iter().position(|c| c == class).with_context(|| {
            format!("class `{class}` is not one of the head's classes ({})", self.meta.classes.join(", "))
        })
    }

    /// Shapes `(rows, cols)` of the parameters, in order, for this kind.
    pub fn param_shapes(kind: HeadKind, hidden: usize, classes: usize) -> Vec<(usize, usize)> {
        match kind {
            HeadKind::Linear => vec![(classes, hidden), (classes, 1)],
            HeadKind::Mlp { width } => vec![(width, hidden), (width, 1), (classes, width), (classes, 1)],
        }
    }

    /// Logits `[n][classes]` of raw features (`x`: n rows of `hidden` values, row-major).
    pub fn logits(&self, x: &[f32]) -> Result<Vec<Vec<f32>>> {
        let h = self.meta.hidden_size;
        if h == 0 || !x.len().is_multiple_of(h) || x.is_empty() {
            bail!("head input has {} values, expected rows of {h} (the head's hidden size)", x.len());
        }
        let n = x.len() / h;
        let z: Vec<f32> = x.iter().enumerate().map(|(i, &v)| (v - self.mean[i % h]) / self.std[i % h]).collect();
        let affine = |inp: &[f32], k: usize, w: &[f32], b: &[f32]| -> Vec<f32> {
            let out = b.len();
            let mut y = matmul_t(inp, n, k, w, out);
            for (i, v) in y.iter_mut().enumerate() {
                *v += b[i % out];
            }
            y
        };
        let c = self.num_classes();
        let y = match self.meta.head {
            HeadKind::Linear => affine(&z, h, &self.params[0], &self.params[1]),
            HeadKind::Mlp { width } => {
                let mut a = affine(&z, h, &self.params[0], &self.params[1]);
                a.iter_mut().for_each(|v| *v = v.max(0.0));
                affine(&a, width, &self.params[2], &self.params[3])
            }
        };
        Ok(y.chunks(c).map(|r| r.to_vec()).collect())
    }

    /// Class probabilities `[n][classes]` (softmax per row, in a fixed order).
    pub fn probs(&self, x: &[f32]) -> Result<Vec<Vec<f32>>> {
        Ok(self.logits(x)?.into_iter().map(|r| softmax(&r)).collect())
    }

    /// Predicted classes (argmax, the first on a tie).
    pub fn predict(&self, x: &[f32]) -> Result<Vec<u32>> {
        Ok(self.logits(x)?.iter().map(|r| argmax(r) as u32).collect())
    }

    /// Predictions of a `[n, hidden]` tensor of any dtype.
    pub fn predict_tensor(&self, x: &Tensor) -> Result<Vec<u32>> {
        self.predict(&vec1(x)?)
    }

    pub fn probs_tensor(&self, x: &Tensor) -> Result<Vec<Vec<f32>>> {
        self.probs(&vec1(x)?)
    }

    /// The class direction in the residual stream, unit norm: for a linear head, the gradient of
    /// `logit_c − mean_k logit_k` with respect to the raw feature, `(W_c − mean_k W_k) / σ`
    /// (for two classes, `(W_c − W_other) / (2σ)`: the direction that raises p(c)). Returns the
    /// direction and its norm before normalisation.
    pub fn class_direction(&self, class: usize) -> Result<(Vec<f32>, f32)> {
        if self.meta.head != HeadKind::Linear {
            bail!("a class direction needs a linear head; this head is {:?} (no single direction)", self.meta.head);
        }
        let (h, c) = (self.meta.hidden_size, self.num_classes());
        if class >= c {
            bail!("class index {class} out of range for {c} classes");
        }
        let w = &self.params[0];
        let d: Vec<f64> = (0..h)
            .map(|j| {
                let mean: f64 = (0..c).map(|k| w[k * h + j] as f64).sum::<f64>() / c as f64;
                (w[class * h + j] as f64 - mean) / self.std[j] as f64
            })
            .collect();
        let n = d.iter().map(|v| v * v).sum::<f64>().sqrt();
        if !(n > 0.0 && n.is_finite()) {
            bail!("the direction of class `{}` has norm {n}; cannot normalise it", self.meta.classes[class]);
        }
        Ok((d.iter().map(|v| (v / n) as f32).collect(), n as f32))
    }

    /// `vector from-probe`: the class direction as a steering vector file's content (unit norm, at
    /// the head's layer; `blocks.{i}.hook_resid_post` only, the point `run --vector` steers).
    pub fn to_vector(&self, class: &str) -> Result<crate::steering::vector::SteeringVector> {
        use crate::steering::vector::{SteeringVector, VectorMeta};
        let layer = match self.point()? {
            HookPoint::ResidPost(l) => l,
            p => bail!("the head reads `{p}`; a steering vector is added at blocks.N.hook_resid_post (train the head on a layer)"),
        };
        let k = self.class_index(class)?;
        let (d, norm) = self.class_direction(k)?;
        let h = self.meta.hidden_size;
        let meta = VectorMeta {
            model: self.meta.model.clone(),
            checkpoint: self.meta.checkpoint.clone(),
            weights_hash: self.meta.weights_hash.clone(),
            hidden_size: h,
            num_layers: self.meta.num_layers,
            method: "probe".into(),
            pair: format!("probe:{class}"),
            samples: self.split.train.len(),
            pre_norm: [(layer, norm)].into(),
            mean_resid_norm: [(layer, self.meta.mean_resid_norm)].into(),
            created: crate::steering::vector::now(),
            read: None,
            protocol: None,
            adapter: self.meta.adapter.clone(),
        };
        Ok(SteeringVector { layers: [(layer, Tensor::from_vec(d, h, &Device::Cpu)?)].into(), meta })
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let cpu = Device::Cpu;
        let (h, c) = (self.meta.hidden_size, self.num_classes());
        let mut t: HashMap<String, Tensor> = HashMap::new();
        t.insert("norm.mean".into(), Tensor::from_vec(self.mean.clone(), h, &cpu)?);
        t.insert("norm.std".into(), Tensor::from_vec(self.std.clone(), h, &cpu)?);
        let names: &[&str] = match self.meta.head {
            HeadKind::Linear => &["linear.weight", "linear.bias"],
            HeadKind::Mlp { .. } => &["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"],
        };
        for ((name, p), (r, k)) in names.iter().zip(&self.params).zip(Self::param_shapes(self.meta.head, h, c)) {
            let shape: Vec<usize> = if k == 1 { vec![r] } else { vec![r, k] };
            t.insert(name.to_string(), Tensor::from_vec(p.clone(), shape, &cpu)?);
        }
        for (name, v) in
            [("split.train", &self.split.train), ("split.val", &self.split.val), ("split.test", &self.split.test)]
        {
            t.insert(name.into(), Tensor::from_vec(v.iter().map(|&x| x as i64).collect::<Vec<_>>(), v.len(), &cpu)?);
        }
        let mut md = HashMap::new();
        md.insert("format".to_string(), FORMAT.to_string());
        md.insert("meta".to_string(), serde_json::to_string(&self.meta)?);
        md.insert("hook_point".to_string(), self.meta.hook_point.clone());
        crate::util::save_safetensors(&t, &md, path)
    }

    pub fn load(path: &Path) -> Result<Self> {
        let md = crate::util::read_safetensors_metadata(path)?;
        match md.get("format") {
            Some(f) if f == FORMAT => {}
            Some(f) => bail!("{}: format `{f}`, expected `{FORMAT}` (a `probe train` head)", path.display()),
            None => bail!("{}: no `format` metadata; not a `probe train` head file", path.display()),
        }
        let meta: HeadMeta =
            serde_json::from_str(md.get("meta").with_context(|| format!("{}: no `meta` metadata", path.display()))?)
                .with_context(|| format!("{}: metadata `meta` is not a head description", path.display()))?;
        let mut t = candle_core::safetensors::load(path, &Device::Cpu)
            .with_context(|| format!("reading {}", path.display()))?;
        let (h, c) = (meta.hidden_size, meta.classes.len());
        let mut take = |name: &str, shape: &[usize]| -> Result<Tensor> {
            let x = t.remove(name).with_context(|| format!("{}: no tensor `{name}`", path.display()))?;
            if x.dims() != shape {
                bail!("{}: `{name}` has shape {:?}, expected {shape:?}", path.display(), x.dims());
            }
            Ok(x)
        };
        let mean = vec1(&take("norm.mean", &[h])?)?;
        let std = vec1(&take("norm.std", &[h])?)?;
        let names: &[&str] = match meta.head {
            HeadKind::Linear => &["linear.weight", "linear.bias"],
            HeadKind::Mlp { .. } => &["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"],
        };
        let mut params = Vec::new();
        for (name, (r, k)) in names.iter().zip(Self::param_shapes(meta.head, h, c)) {
            let shape: Vec<usize> = if k == 1 { vec![r] } else { vec![r, k] };
            params.push(vec1(&take(name, &shape)?)?);
        }
        let mut idx = |name: &str| -> Result<Vec<u32>> {
            match t.remove(name) {
                Some(x) => Ok(x.to_vec1::<i64>()?.into_iter().map(|v| v as u32).collect()),
                None => bail!("{}: no tensor `{name}`", path.display()),
            }
        };
        let split = Split { train: idx("split.train")?, val: idx("split.val")?, test: idx("split.test")? };
        Ok(Self { meta, mean, std, params, split })
    }
}

pub fn softmax(r: &[f32]) -> Vec<f32> {
    let m = r.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let e: Vec<f64> = r.iter().map(|&v| ((v - m) as f64).exp()).collect();
    let s: f64 = e.iter().sum();
    e.iter().map(|v| (v / s) as f32).collect()
}

pub fn argmax(r: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in r.iter().enumerate() {
        if v > r[best] {
            best = i;
        }
    }
    best
}
