//! The Qwen2-VL vision tower: patch embedding (a Conv3d whose stride equals its kernel, so a
//! linear map of each flattened patch), pre-LayerNorm blocks with non-causal attention inside each
//! image and a quick_gelu MLP, 2-D rotary positions, and the merger (LayerNorm, then 2×2 patches
//! concatenated and projected by Linear–GELU–Linear into the LLM hidden size).
use super::config::{qwen25_message, VisionAct, VisionConfig};
use super::rope;
use crate::models::weights::{Linear, Source, Weights};
use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};

/// A linear layer with an optional bias (also the Qwen2.5-VL tower's).
pub(crate) struct Dense {
    /// Through the decoder's linear layer, so f32 on the CPU takes the batch-invariant kernel:
    /// the patches of every image in a call share these matmuls.
    pub(crate) w: Linear,
    pub(crate) b: Option<Tensor>,
}

impl Dense {
    pub(crate) fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let y = self.w.forward(xs)?;
        Ok(match &self.b {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }
}

struct Norm {
    w: Tensor,
    b: Tensor,
}

impl Norm {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::ops::layer_norm(&xs.contiguous()?, &self.w, &self.b, 1e-6)?)
    }
}

struct Block {
    norm1: Norm,
    norm2: Norm,
    qkv: Dense,
    proj: Dense,
    fc1: Dense,
    fc2: Dense,
}

pub struct VisionTower {
    pub cfg: VisionConfig,
    patch_embed: Linear,
    blocks: Vec<Block>,
    ln_q: Norm,
    mlp0: Dense,
    mlp2: Dense,
    device: Device,
    dtype: DType,
}

/// Tensor names of the vision tower: `visual.` (Hub and transformers 5 save_pretrained) or
/// `model.visual.` (transformers 5 in-memory names).
fn prefix(w: &Weights) -> Result<String> {
    let Source::Safetensors { st, files, .. } = &w.source else {
        bail!("the Qwen2-VL vision tower loads from safetensors only (GGUF has no vision weights)");
    };
    for p in ["visual.", "model.visual."] {
        if st.get(&format!("{p}patch_embed.proj.weight")).is_ok() {
            return Ok(p.to_string());
        }
    }
    let file = files.first().map(|f| f.display().to_string()).unwrap_or_default();
    bail!(
        "{file}: no vision tower (looked for visual.patch_embed.proj.weight and model.visual.patch_embed.proj.weight)"
    )
}

impl VisionTower {
    pub fn load(cfg: &VisionConfig, w: &Weights) -> Result<Self> {
        let p = prefix(w)?;
        let Source::Safetensors { st, files, .. } = &w.source else { unreachable!() };
        let file = files.first().map(|f| f.display().to_string()).unwrap_or_default();
        // Qwen2.5-VL blocks have RMSNorm (no bias) and a gated MLP: say so instead of a shape error.
        if st.get(&format!("{p}blocks.0.mlp.gate_proj.weight")).is_ok() {
            bail!(qwen25_message(&file, "tensor blocks.0.mlp.gate_proj.weight (SwiGLU vision MLP)"));
        }
        let dtype = w.dtype.compute();
        let dev = &w.device;
        let load = |name: &str, shape: &[usize]| -> Result<Tensor> {
            let full = format!("{p}{name}");
            let view = st.get(&full).map_err(|_| anyhow::anyhow!("tensor `{full}` not found in {file}"))?;
            if view.shape() != shape {
                bail!(
                    "tensor `{full}` in {file}: expected shape {shape:?} from vision_config (depth {}, embed_dim {}, \
                     {} heads, hidden_size {}), found {:?}. Check that the checkpoint is Qwen2-VL (not Qwen2.5-VL) \
                     and that config.json belongs to these weights",
                    cfg.depth,
                    cfg.embed_dim,
                    cfg.num_heads,
                    cfg.hidden_size,
                    view.shape()
                );
            }
            Ok(st.load(&full, dev)?.to_dtype(DType::F32)?)
        };
        let (e, m) = (cfg.embed_dim, cfg.mlp_dim());
        let lin = |name: &str, out: usize, inp: usize, bias: bool| -> Result<Dense> {
            Ok(Dense {
                w: Linear::Dense(load(&format!("{name}.weight"), &[out, inp])?.to_dtype(dtype)?),
                b: if bias { Some(load(&format!("{name}.bias"), &[out])?.to_dtype(dtype)?) } else { None },
            })
        };
        // Norms stay f32 (computed in f32).
        let norm = |name: &str, n: usize| -> Result<Norm> {
            Ok(Norm { w: load(&format!("{name}.weight"), &[n])?, b: load(&format!("{name}.bias"), &[n])? })
        };
        let pe = load(
            "patch_embed.proj.weight",
            &[e, cfg.in_channels, cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size],
        )?
        .reshape((e, cfg.patch_dim()))?
        .to_dtype(dtype)?;
        let mut blocks = Vec::with_capacity(cfg.depth);
        for i in 0..cfg.depth {
            let b = format!("blocks.{i}");
            blocks.push(Block {
                norm1: norm(&format!("{b}.norm1"), e)?,
                norm2: norm(&format!("{b}.norm2"), e)?,
                qkv: lin(&format!("{b}.attn.qkv"), 3 * e, e, true)?,
                proj: lin(&format!("{b}.attn.proj"), e, e, true)?,
                fc1: lin(&format!("{b}.mlp.fc1"), m, e, true)?,
                fc2: lin(&format!("{b}.mlp.fc2"), e, m, true)?,
            });
        }
        let merged = e * cfg.spatial_merge_size * cfg.spatial_merge_size;
        Ok(Self {
            cfg: cfg.clone(),
            patch_embed: Linear::Dense(pe),
            blocks,
            ln_q: norm("merger.ln_q", e)?,
            mlp0: lin("merger.mlp.0", merged, merged, true)?,
            mlp2: lin("merger.mlp.2", cfg.hidden_size, merged, true)?,
            device: dev.clone(),
            dtype,
        })
    }

    fn act(&self, x: &Tensor) -> Result<Tensor> {
        Ok(match self.cfg.hidden_act {
            // x · sigmoid(1.702 x)
            VisionAct::QuickGelu => (x * candle_nn::ops::sigmoid(&(x * 1.702)?)?)?,
            VisionAct::Gelu => x.gelu_erf()?,
            VisionAct::Silu => candle_nn::ops::silu(x)?,
        })
    }

    /// Runs the patch embedding and the blocks; returns the hidden states before the merger
    /// `[patches, embed_dim]`.
    pub fn encode(&self, pixel_values: &Tensor, grids: &[[usize; 3]]) -> Result<Tensor> {
        let cfg = &self.cfg;
        let (n, d) = pixel_values.dims2()?;
        let want: usize = grids.iter().map(|g| g.iter().product::<usize>()).sum();
        if d != cfg.patch_dim() || n != want {
            bail!(
                "pixel_values has shape [{n}, {d}], expected [{want}, {}] (grids {grids:?}, C·T·P·P = {})",
                cfg.patch_dim(),
                cfg.patch_dim()
            );
        }
        let mut xs = self.patch_embed.forward(&pixel_values.to_device(&self.device)?.to_dtype(self.dtype)?)?;
        let (cos, sin) =
            rope::vision_tables(grids, cfg.spatial_merge_size, cfg.head_dim(), cfg.rope_theta, &self.device)?;
        let (cos, sin) = (cos.to_dtype(self.dtype)?, sin.to_dtype(self.dtype)?);
        let lens: Vec<usize> = grids.iter().map(|g| g.iter().product()).collect();
        for blk in &self.blocks {
            let h = blk.norm1.forward(&xs.to_dtype(DType::F32)?)?.to_dtype(self.dtype)?;
            let h = self.attention(blk, &h, &cos, &sin, &lens)?;
            xs = (xs + h)?;
            let h = blk.norm2.forward(&xs.to_dtype(DType::F32)?)?.to_dtype(self.dtype)?;
            let h = blk.fc2.forward(&self.act(&blk.fc1.forward(&h)?)?)?;
            xs = (xs + h)?;
        }
        Ok(xs)
    }

    fn attention(&self, blk: &Block, xs: &Tensor, cos: &Tensor, sin: &Tensor, lens: &[usize]) -> Result<Tensor> {
        let out = attend_segments(&blk.qkv.forward(xs)?, self.cfg.num_heads, cos, sin, lens, self.dtype)?;
        blk.proj.forward(&out)
    }

    /// The merger: `[patches, embed_dim]` → `[patches / merge², hidden_size]`.
    pub fn merge(&self, xs: &Tensor) -> Result<Tensor> {
        let m2 = self.cfg.spatial_merge_size * self.cfg.spatial_merge_size;
        let h = self.ln_q.forward(&xs.to_dtype(DType::F32)?)?.to_dtype(self.dtype)?;
        let (n, e) = h.dims2()?;
        let h = h.reshape((n / m2, e * m2))?;
        let h = self.mlp0.forward(&h)?.gelu_erf()?;
        self.mlp2.forward(&h)
    }

    /// Image features for the LLM: `[Σ t·h·w / merge², hidden_size]`, images in order.
    pub fn forward(&self, pixel_values: &Tensor, grids: &[[usize; 3]]) -> Result<Tensor> {
        let xs = self.encode(pixel_values, grids)?;
        self.merge(&xs)
    }

    pub fn device(&self) -> &Device {
        &self.device
    }
}

/// Non-causal multi-head attention of packed patches, each attending only inside its own segment
/// (an image for Qwen2-VL; a window or an image for Qwen2.5-VL): `qkv` `[n, 3·e]` (q, k, v
/// concatenated, heads inside each), 2-D rotary tables `[n, head_dim/2]`, segment lengths summing to
/// n. Returns `[n, e]` before the output projection. Scores and softmax in f32.
pub(crate) fn attend_segments(
    qkv: &Tensor,
    nh: usize,
    cos: &Tensor,
    sin: &Tensor,
    lens: &[usize],
    dtype: DType,
) -> Result<Tensor> {
    let (n, e3) = qkv.dims2()?;
    let e = e3 / 3;
    let hd = e / nh;
    if lens.iter().sum::<usize>() != n {
        bail!("attention segments {lens:?} do not cover the {n} patches");
    }
    // [n, 3, heads, hd] -> q, k, v as [1, heads, n, hd]
    let qkv = qkv.reshape((n, 3, nh, hd))?;
    let part = |i: usize| -> Result<Tensor> {
        Ok(qkv.narrow(1, i, 1)?.squeeze(1)?.transpose(0, 1)?.unsqueeze(0)?.contiguous()?)
    };
    let q = candle_nn::rotary_emb::rope(&part(0)?, cos, sin)?;
    let k = candle_nn::rotary_emb::rope(&part(1)?, cos, sin)?;
    let v = part(2)?;
    let scale = 1.0 / (hd as f64).sqrt();
    let mut outs = Vec::with_capacity(lens.len());
    let mut start = 0;
    for &len in lens {
        let (q, k, v) = (q.narrow(2, start, len)?, k.narrow(2, start, len)?, v.narrow(2, start, len)?);
        let s = (q.contiguous()?.matmul(&k.contiguous()?.t()?)?.to_dtype(DType::F32)? * scale)?;
        let p = candle_nn::ops::softmax_last_dim(&s)?.to_dtype(dtype)?;
        outs.push(p.matmul(&v.contiguous()?)?);
        start += len;
    }
    Ok(Tensor::cat(&outs, 2)?.squeeze(0)?.transpose(0, 1)?.reshape((n, e))?)
}
