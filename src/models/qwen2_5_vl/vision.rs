//! The Qwen2.5-VL vision tower, as transformers 5.17's `Qwen2_5_VisionTransformerPretrainedModel`:
//! a Conv3d patch embedding (one matmul of each flattened patch, no bias), blocks of RMSNorm →
//! attention → RMSNorm → SwiGLU MLP (biases everywhere), 2-D rotary positions, and the merger
//! (RMSNorm, 2×2 patches concatenated, Linear–GELU–Linear to `out_hidden_size`).
//!
//! Window attention: the patches are reordered so that each window of
//! `window_tokens × window_tokens` merged tokens is contiguous (windows row-major per image,
//! tokens row-major inside a window, the 2×2 patches of a token kept together); blocks outside
//! `fullatt_block_indexes` attend only inside their window, the others inside their image. The
//! merger runs in window order and its output is put back in image order.
use super::config::Qwen25VisionConfig;
use crate::models::qwen2_vl::config::VisionAct;
use crate::models::qwen2_vl::rope;
use crate::models::qwen2_vl::vision::{attend_segments, Dense};
use crate::models::weights::{fingerprint, safetensor_files, Linear, WeightDType};
use anyhow::{bail, Context, Result};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};
use std::path::{Path, PathBuf};

struct Block {
    norm1: Tensor,
    norm2: Tensor,
    qkv: Dense,
    proj: Dense,
    gate: Dense,
    up: Dense,
    down: Dense,
    full: bool,
}

pub struct Qwen25VisionTower {
    pub cfg: Qwen25VisionConfig,
    patch_embed: Linear,
    blocks: Vec<Block>,
    ln_q: Tensor,
    mlp0: Dense,
    mlp2: Dense,
    device: Device,
    dtype: DType,
    /// The checkpoint's safetensors files and their fingerprint (the graft records it).
    pub files: Vec<PathBuf>,
    pub weights_hash: String,
}

/// The window order of one call's merged tokens, and the window lengths in patches (what
/// transformers' `get_vision_window_index` returns, without the empty windows that
/// `unique_consecutive` drops): `index[i]` is the image-order merged token at window position i.
pub fn window_index(grids: &[[usize; 3]], merge: usize, window_tokens: usize) -> (Vec<usize>, Vec<usize>) {
    let mut index = Vec::new();
    let mut lens = Vec::new();
    let mut offset = 0;
    let ws = window_tokens;
    for &[t, h, w] in grids {
        let (lh, lw) = (h / merge, w / merge);
        // transformers pads by a whole window when the side is a multiple: those windows are empty.
        let (nwh, nww) = (lh / ws + 1, lw / ws + 1);
        for ti in 0..t {
            for wh in 0..nwh {
                for ww in 0..nww {
                    let mut count = 0;
                    for r in 0..ws {
                        for c in 0..ws {
                            let (row, col) = (wh * ws + r, ww * ws + c);
                            if row < lh && col < lw {
                                index.push(offset + ti * lh * lw + row * lw + col);
                                count += 1;
                            }
                        }
                    }
                    if count > 0 {
                        lens.push(count * merge * merge);
                    }
                }
            }
        }
        offset += t * lh * lw;
    }
    (index, lens)
}

fn rms(xs: &Tensor, w: &Tensor) -> Result<Tensor> {
    let dt = xs.dtype();
    Ok(candle_nn::ops::rms_norm(&xs.to_dtype(DType::F32)?.contiguous()?, w, 1e-6)?.to_dtype(dt)?)
}

/// Rows of `xs` (`[units · unit, d]`) regrouped by unit: row block `i` of the result is block
/// `order[i]` of `xs`.
fn permute_units(xs: &Tensor, order: &[usize], unit: usize) -> Result<Tensor> {
    let (n, d) = xs.dims2()?;
    let idx = Tensor::from_vec(order.iter().map(|&i| i as u32).collect::<Vec<_>>(), order.len(), xs.device())?;
    Ok(xs.reshape((n / unit, unit * d))?.index_select(&idx, 0)?.reshape((n, d))?)
}

impl Qwen25VisionTower {
    /// Loads the `visual.*` (Hub, transformers-5 `save_pretrained`) or `model.visual.*` tensors of
    /// a Qwen2.5-VL checkpoint directory; the language model's tensors are never read.
    pub fn from_dir(dir: &Path, device: &Device, dtype: WeightDType) -> Result<Self> {
        if dtype == WeightDType::Gguf {
            bail!("the Qwen2.5-VL vision tower loads from safetensors (f32, f16 or bf16), not GGUF");
        }
        let cfg = Qwen25VisionConfig::from_file(&dir.join("config.json"))?;
        let files = safetensor_files(dir)?;
        // SAFETY: read-only memory maps, as in `Weights::from_safetensors_dir`.
        let st = unsafe { MmapedSafetensors::multi(&files) }
            .with_context(|| format!("opening safetensors in {}", dir.display()))?;
        let file = files.first().map(|f| f.display().to_string()).unwrap_or_default();
        let p = ["visual.", "model.visual."]
            .into_iter()
            .find(|p| st.get(&format!("{p}patch_embed.proj.weight")).is_ok())
            .with_context(|| {
                format!(
                    "{file}: no vision tower (looked for visual.patch_embed.proj.weight and \
                     model.visual.patch_embed.proj.weight)"
                )
            })?;
        if st.get(&format!("{p}blocks.0.mlp.fc1.weight")).is_ok() {
            bail!(
                "{file}: tensor {p}blocks.0.mlp.fc1.weight is a Qwen2-VL vision MLP (quick_gelu fc1/fc2); the \
                 Qwen2.5-VL tower has a SwiGLU MLP (gate_proj/up_proj/down_proj). Use a Qwen2.5-VL checkpoint"
            );
        }
        let cdt = dtype.compute();
        let load = |name: &str, shape: &[usize]| -> Result<Tensor> {
            let full = format!("{p}{name}");
            let view = st.get(&full).map_err(|_| anyhow::anyhow!("tensor `{full}` not found in {file}"))?;
            if view.shape() != shape {
                bail!(
                    "tensor `{full}` in {file}: expected shape {shape:?} from vision_config (depth {}, hidden_size {}, \
                     intermediate_size {}, {} heads, out_hidden_size {}), found {:?}. Check that config.json belongs \
                     to these weights",
                    cfg.depth,
                    cfg.hidden_size,
                    cfg.intermediate_size,
                    cfg.num_heads,
                    cfg.out_hidden_size,
                    view.shape()
                );
            }
            Ok(st.load(&full, device)?.to_dtype(DType::F32)?)
        };
        let lin = |name: &str, out: usize, inp: usize| -> Result<Dense> {
            Ok(Dense {
                w: Linear::Dense(load(&format!("{name}.weight"), &[out, inp])?.to_dtype(cdt)?),
                b: Some(load(&format!("{name}.bias"), &[out])?.to_dtype(cdt)?),
            })
        };
        let (e, m) = (cfg.hidden_size, cfg.intermediate_size);
        let pe = load(
            "patch_embed.proj.weight",
            &[e, cfg.in_channels, cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size],
        )?
        .reshape((e, cfg.patch_dim()))?
        .to_dtype(cdt)?;
        let mut blocks = Vec::with_capacity(cfg.depth);
        for i in 0..cfg.depth {
            let b = format!("blocks.{i}");
            blocks.push(Block {
                // Norms stay f32 (computed in f32).
                norm1: load(&format!("{b}.norm1.weight"), &[e])?,
                norm2: load(&format!("{b}.norm2.weight"), &[e])?,
                qkv: lin(&format!("{b}.attn.qkv"), 3 * e, e)?,
                proj: lin(&format!("{b}.attn.proj"), e, e)?,
                gate: lin(&format!("{b}.mlp.gate_proj"), m, e)?,
                up: lin(&format!("{b}.mlp.up_proj"), m, e)?,
                down: lin(&format!("{b}.mlp.down_proj"), e, m)?,
                full: cfg.fullatt_block_indexes.contains(&i),
            });
        }
        let merged = e * cfg.spatial_merge_size * cfg.spatial_merge_size;
        let weights_hash = fingerprint(&files)?;
        Ok(Self {
            patch_embed: Linear::Dense(pe),
            blocks,
            ln_q: load("merger.ln_q.weight", &[e])?,
            mlp0: lin("merger.mlp.0", merged, merged)?,
            mlp2: lin("merger.mlp.2", cfg.out_hidden_size, merged)?,
            device: device.clone(),
            dtype: cdt,
            files,
            weights_hash,
            cfg,
        })
    }

    /// Every tensor of the tower, for checks that training the graft's adapter leaves them untouched.
    pub fn tensors(&self) -> Vec<&Tensor> {
        fn dense(d: &Dense) -> Vec<&Tensor> {
            let mut v: Vec<&Tensor> = match &d.w {
                Linear::Dense(t) => vec![t],
                _ => vec![],
            };
            v.extend(d.b.as_ref());
            v
        }
        let mut v: Vec<&Tensor> = match &self.patch_embed {
            Linear::Dense(t) => vec![t],
            _ => vec![],
        };
        for b in &self.blocks {
            v.extend([&b.norm1, &b.norm2]);
            for d in [&b.qkv, &b.proj, &b.gate, &b.up, &b.down] {
                v.extend(dense(d));
            }
        }
        v.push(&self.ln_q);
        v.extend(dense(&self.mlp0));
        v.extend(dense(&self.mlp2));
        v
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    fn act(&self, x: &Tensor) -> Result<Tensor> {
        Ok(match self.cfg.hidden_act {
            VisionAct::Silu => candle_nn::ops::silu(x)?,
            VisionAct::Gelu => x.gelu_erf()?,
            VisionAct::QuickGelu => (x * candle_nn::ops::sigmoid(&(x * 1.702)?)?)?,
        })
    }

    /// Patch embedding and blocks: `[patches, hidden_size]` in **window order** (transformers'
    /// `last_hidden_state`), with the window order used.
    pub fn encode(&self, pixel_values: &Tensor, grids: &[[usize; 3]]) -> Result<(Tensor, Vec<usize>)> {
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
        let m = cfg.spatial_merge_size;
        if let Some(g) = grids.iter().find(|g| g[1] % m != 0 || g[2] % m != 0) {
            bail!("grid {g:?} is not a multiple of spatial_merge_size {m}");
        }
        let unit = m * m;
        let (order, window_lens) = window_index(grids, m, cfg.window_tokens());
        let image_lens: Vec<usize> =
            grids.iter().flat_map(|&[t, h, w]| std::iter::repeat_n(h * w, t)).collect::<Vec<_>>();
        let xs = self.patch_embed.forward(&pixel_values.to_device(&self.device)?.to_dtype(self.dtype)?)?;
        let mut xs = permute_units(&xs, &order, unit)?;
        let (cos, sin) = rope::vision_tables(grids, m, cfg.head_dim(), cfg.rope_theta, &self.device)?;
        let cos = permute_units(&cos, &order, unit)?.to_dtype(self.dtype)?;
        let sin = permute_units(&sin, &order, unit)?.to_dtype(self.dtype)?;
        for blk in &self.blocks {
            let lens = if blk.full { &image_lens } else { &window_lens };
            let h = rms(&xs, &blk.norm1)?;
            let h = attend_segments(&blk.qkv.forward(&h)?, cfg.num_heads, &cos, &sin, lens, self.dtype)?;
            xs = (xs + blk.proj.forward(&h)?)?;
            let h = rms(&xs, &blk.norm2)?;
            let g = self.act(&blk.gate.forward(&h)?)?;
            xs = (xs + blk.down.forward(&(g * blk.up.forward(&h)?)?)?)?;
        }
        Ok((xs, order))
    }

    /// Image features `[Σ t·h·w / merge², out_hidden_size]`, images in order, tokens row-major.
    pub fn forward(&self, pixel_values: &Tensor, grids: &[[usize; 3]]) -> Result<Tensor> {
        let (xs, order) = self.encode(pixel_values, grids)?;
        let unit = self.cfg.spatial_merge_size * self.cfg.spatial_merge_size;
        let h = rms(&xs, &self.ln_q)?;
        let (n, e) = h.dims2()?;
        let h = h.reshape((n / unit, e * unit))?;
        let h = self.mlp2.forward(&self.mlp0.forward(&h)?.gelu_erf()?)?;
        // Back to image order: row order[i] of the image-order output is row i here.
        let mut inverse = vec![0u32; order.len()];
        for (i, &o) in order.iter().enumerate() {
            inverse[o] = i as u32;
        }
        let idx = Tensor::from_vec(inverse, order.len(), &self.device)?;
        Ok(h.index_select(&idx, 0)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_of_a_grid_that_fills_them_exactly_and_one_that_does_not() {
        // merged 4×2 with 2×2 windows: two full windows (transformers' padding windows are empty).
        let (idx, lens) = window_index(&[[1, 8, 4]], 2, 2);
        assert_eq!(idx, vec![0, 1, 2, 3, 4, 5, 6, 7]);
        assert_eq!(lens, vec![16, 16]);
        // merged 3×5: windows (0,0) (0,1) full, (0,2) 2 tokens, row 1: 2, 2, 1 tokens.
        let (idx, lens) = window_index(&[[1, 6, 10]], 2, 2);
        assert_eq!(idx, vec![0, 1, 5, 6, 2, 3, 7, 8, 4, 9, 10, 11, 12, 13, 14]);
        assert_eq!(lens, vec![16, 16, 8, 8, 8, 4]);
    }
}
