//! One config-driven decoder for the text families (Llama / SmolLM2, Qwen2, Qwen3, Gemma, Gemma2),
//! with hook points on the residual stream and a KV cache that supports left-padded batches.
use super::config::{Activation, DecoderConfig, RopeScaling};
use super::hooks::{self, Captures, HookPoint, HookSpec, StepInfo};
use super::kernels::{self, AttnShape};
use super::lora::LoraAdapter;
use super::weights::{LayerTensor as L, Linear, Name, Weights};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use std::sync::Arc;

struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    q_bias: Option<Tensor>,
    k_bias: Option<Tensor>,
    v_bias: Option<Tensor>,
    /// Qwen3: per-head RMSNorm weights `[head_dim]` for q and k.
    q_norm: Option<Tensor>,
    k_norm: Option<Tensor>,
}

struct Mlp {
    gate: Linear,
    up: Linear,
    down: Linear,
}

struct Layer {
    attn: Attention,
    mlp: Mlp,
    input_norm: Tensor,
    /// Llama/Qwen2: pre-MLP norm. Gemma2: norm of the attention output.
    post_attn_norm: Tensor,
    /// Gemma2 only.
    pre_ffn_norm: Option<Tensor>,
    post_ffn_norm: Option<Tensor>,
    sliding: bool,
}

/// Features spliced into the token embeddings (a VLM's image tokens): column `c` of the flattened
/// `[batch · seq]` embeddings becomes row `gather[c]` of `[embeddings; feats]`.
#[derive(Debug, Clone)]
pub struct Splice {
    /// `[image tokens, hidden]`.
    pub feats: Tensor,
    pub gather: Vec<u32>,
}

/// Per-sequence generation state: the KV cache and where each row's real tokens start.
#[derive(Debug, Clone, Default)]
pub struct State {
    /// Per layer `(k, v)`, each `[batch, kv_heads, cols, head_dim]`.
    pub kv: Vec<Option<(Tensor, Tensor)>>,
    /// Left-padding columns per row.
    pub left_pad: Vec<usize>,
    /// Columns consumed so far (padding included).
    pub cols: usize,
    /// Per row, the LoRA adapter its projections apply ([`Decoder::adapters`] index); empty or
    /// `None` = the base model.
    pub adapters: Vec<Option<u16>>,
    /// A decoder served by pipeline stages: its keys and values live on the stages, under this
    /// handle (`kv` is empty). Shared by clones until one of them runs a forward, which forks
    /// it first, so a clone behaves like a copy of a local state.
    pub remote: Option<Arc<crate::stage::client::RemoteState>>,
}

impl State {
    pub fn batch(&self) -> usize {
        self.left_pad.len()
    }

    /// Row `r`'s adapter.
    pub fn adapter(&self, r: usize) -> Option<u16> {
        self.adapters.get(r).copied().flatten()
    }

    /// A state whose row `i` is a copy of this state's row `rows[i]`: prefill a shared prefix
    /// once, then fork it into the rows that differ only after it.
    pub fn select_rows(&self, rows: &[usize]) -> Result<State> {
        if let Some(r) = &self.remote {
            return Ok(State {
                kv: Vec::new(),
                left_pad: rows.iter().map(|&i| self.left_pad[i]).collect(),
                cols: self.cols,
                adapters: rows.iter().map(|&i| self.adapter(i)).collect(),
                // Nothing on the stages yet: nothing to fork.
                remote: Some(if self.cols == 0 { r.fresh() } else { r.fork(rows)? }),
            });
        }
        let dev = self.kv.iter().flatten().next().map(|(k, _)| k.device().clone()).unwrap_or(Device::Cpu);
        let idx = Tensor::from_vec(rows.iter().map(|&r| r as u32).collect::<Vec<_>>(), rows.len(), &dev)?;
        let kv = self
            .kv
            .iter()
            .map(|e| match e {
                Some((k, v)) => Ok(Some((k.index_select(&idx, 0)?, v.index_select(&idx, 0)?))),
                None => Ok(None),
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(State {
            kv,
            left_pad: rows.iter().map(|&r| self.left_pad[r]).collect(),
            cols: self.cols,
            adapters: rows.iter().map(|&r| self.adapter(r)).collect(),
            remote: None,
        })
    }

    /// One batch of the rows of `states` (each batch 1), left-padded to the longest: row `i`
    /// continues `states[i]`. Padding columns are masked, so each row computes what it would alone.
    pub fn merge(states: &[State]) -> Result<State> {
        let cols = states.iter().map(|s| s.cols).max().unwrap_or(0);
        if let Some(first) = states.first().and_then(|s| s.remote.as_ref()) {
            let handles = states
                .iter()
                .map(|s| {
                    s.remote.clone().ok_or_else(|| anyhow::anyhow!("State::merge: a local state among remote ones"))
                })
                .collect::<Result<Vec<_>>>()?;
            let left_pad = states.iter().map(|s| cols - s.cols + s.left_pad[0]).collect();
            let adapters = states.iter().map(|s| s.adapter(0)).collect();
            return Ok(State { kv: Vec::new(), left_pad, cols, adapters, remote: Some(first.merge(&handles)?) });
        }
        let layers = states.first().map_or(0, |s| s.kv.len());
        let mut kv = Vec::with_capacity(layers);
        for l in 0..layers {
            let mut ks = Vec::with_capacity(states.len());
            let mut vs = Vec::with_capacity(states.len());
            for s in states {
                if s.batch() != 1 {
                    bail!("State::merge takes batch-1 states, found a batch of {}", s.batch());
                }
                let (k, v) = s.kv[l].as_ref().ok_or_else(|| anyhow::anyhow!("State::merge: layer {l} has no cache"))?;
                let pad = cols - s.cols;
                let left = |t: &Tensor| -> Result<Tensor> {
                    if pad == 0 {
                        return Ok(t.clone());
                    }
                    let (b, h, _, d) = t.dims4()?;
                    Ok(Tensor::cat(&[&Tensor::zeros((b, h, pad, d), t.dtype(), t.device())?, t], 2)?)
                };
                ks.push(left(k)?);
                vs.push(left(v)?);
            }
            kv.push(Some((Tensor::cat(&ks, 0)?, Tensor::cat(&vs, 0)?)));
        }
        let left_pad = states.iter().map(|s| cols - s.cols + s.left_pad[0]).collect();
        Ok(State { kv, left_pad, cols, adapters: states.iter().map(|s| s.adapter(0)).collect(), remote: None })
    }
}

/// Which part of a decoder a process holds: all of it, or one pipeline stage's (docs/stages.md).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part {
    /// Global layer indices held.
    pub layers: std::ops::Range<usize>,
    /// The token embedding (the first stage).
    pub embed: bool,
    /// The final norm and the LM head (the last stage).
    pub head: bool,
}

impl Part {
    pub fn whole(num_layers: usize) -> Self {
        Part { layers: 0..num_layers, embed: true, head: true }
    }
}

pub struct Decoder {
    pub cfg: DecoderConfig,
    /// What this process holds; the rest of the model is on other stages or absent.
    part: Part,
    embed: Tensor,
    /// Layers `part.layers`, in order.
    layers: Vec<Layer>,
    final_norm: Tensor,
    lm_head: Linear,
    inv_freq: Vec<f32>,
    device: Device,
    dtype: DType,
    /// LoRA adapters a row's state may name (`State::adapters`), unmerged.
    adapters: Vec<Arc<LoraAdapter>>,
    /// The adapter of every row of a new state (`--adapter`): the whole model is the adapted one.
    default_adapter: Option<u16>,
    /// A driver's decoder (`--stages`): every forward runs on the stages.
    remote: Option<Arc<crate::stage::client::Pipeline>>,
}

fn inv_freq(cfg: &DecoderConfig) -> Result<Vec<f32>> {
    let d = cfg.head_dim;
    // Same arithmetic as transformers: exponent in f32, power, then llama3 adjustments.
    let mut f: Vec<f64> = (0..d / 2).map(|i| 1.0 / cfg.rope_theta.powf((2 * i) as f32 as f64 / d as f64)).collect();
    match &cfg.rope_scaling {
        RopeScaling::None => {}
        RopeScaling::Linear { factor } => f.iter_mut().for_each(|x| *x /= factor),
        RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => {
            let low_wavelen = original_max_position_embeddings / low_freq_factor;
            let high_wavelen = original_max_position_embeddings / high_freq_factor;
            for x in f.iter_mut() {
                let wavelen = 2.0 * std::f64::consts::PI / *x;
                if wavelen > low_wavelen {
                    *x /= factor;
                } else if wavelen >= high_wavelen {
                    let smooth = (original_max_position_embeddings / wavelen - low_freq_factor)
                        / (high_freq_factor - low_freq_factor);
                    *x = (1.0 - smooth) * *x / factor + smooth * *x;
                }
            }
        }
        RopeScaling::FreqFactors(ff) => {
            if ff.len() != f.len() {
                bail!("rope_freqs has {} factors, expected head_dim / 2 = {}", ff.len(), f.len());
            }
            f.iter_mut().zip(ff).for_each(|(x, s)| *x /= s);
        }
    }
    Ok(f.into_iter().map(|x| x as f32).collect())
}

/// `x · Wᵀ` for a frozen weight `W` `[out, in]` (CPU, f32) as a custom op whose backward gives
/// the input's gradient only. candle's autograd computes a gradient for every argument of a
/// tracked matmul, weights included; for a frozen decoder those are wasted work and memory
/// (the tied LM head of a 152k vocabulary alone would be two 1.5 GB buffers per step).
struct FrozenLinear(Tensor);

impl candle_core::CustomOp1 for FrozenLinear {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let candle_core::CpuStorage::F32(x) = storage else {
            candle_core::bail!("frozen-linear: expected f32 input");
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("frozen-linear: expected a contiguous input");
        };
        let (n, k) = self.0.dims2()?;
        let dims = layout.shape().dims();
        if dims.last() != Some(&k) {
            candle_core::bail!("frozen-linear: input {dims:?}, weight [{n}, {k}]");
        }
        let m = (end - start) / k;
        let out = kernels::with_f32(&self.0, |w| Ok(kernels::matmul_t(&x[start..end], m, k, w, n)))
            .map_err(|e| candle_core::Error::Msg(format!("{e:#}")))?;
        let mut shape = dims.to_vec();
        *shape.last_mut().expect("non-empty") = n;
        Ok((candle_core::CpuStorage::F32(out), shape.into()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let (n, _) = self.0.dims2()?;
        let rows = grad_res.elem_count() / n;
        Ok(Some(grad_res.reshape((rows, n))?.matmul(&self.0)?.reshape(arg.shape())?.to_dtype(arg.dtype())?))
    }
}

/// A projection's output `[batch, seq, heads·head_dim]` plus its bias, as `[batch, heads, seq, head_dim]`.
fn split_heads(y: Tensor, bias: &Option<Tensor>, (b, seq, heads, hd): (usize, usize, usize, usize)) -> Result<Tensor> {
    let y = match bias {
        Some(bias) => y.broadcast_add(bias)?,
        None => y,
    };
    Ok(y.reshape((b, seq, heads, hd))?.transpose(1, 2)?.contiguous()?)
}

fn rms_norm(xs: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    // Computed in f32 like transformers, whatever the activation dtype.
    let dt = xs.dtype();
    let x = xs.to_dtype(DType::F32)?.contiguous()?;
    Ok(candle_nn::ops::rms_norm(&x, w, eps as f32)?.to_dtype(dt)?)
}

fn softcap(xs: &Tensor, cap: Option<f64>) -> Result<Tensor> {
    Ok(match cap {
        Some(c) => ((xs / c)?.tanh()? * c)?,
        None => xs.clone(),
    })
}

impl Decoder {
    pub fn load(cfg: DecoderConfig, w: &Weights) -> Result<Self> {
        let part = Part::whole(cfg.num_layers);
        Self::load_part(cfg, w, part)
    }

    /// A driver's decoder over pipeline stages: the config only, no tensors; every forward is
    /// sent to `pipeline`.
    pub fn remote(cfg: DecoderConfig, pipeline: Arc<crate::stage::client::Pipeline>) -> Result<Self> {
        let h = cfg.hidden_size;
        Ok(Self {
            inv_freq: inv_freq(&cfg)?,
            part: Part { layers: 0..0, embed: false, head: false },
            embed: Tensor::zeros((0, h), DType::F32, &Device::Cpu)?,
            layers: Vec::new(),
            final_norm: Tensor::zeros(0, DType::F32, &Device::Cpu)?,
            lm_head: Linear::Dense(Tensor::zeros((0, h), DType::F32, &Device::Cpu)?),
            device: Device::Cpu,
            dtype: pipeline.dtype(),
            adapters: Vec::new(),
            default_adapter: None,
            remote: Some(pipeline),
            cfg,
        })
    }

    /// The stages a driver's decoder runs on.
    pub fn pipeline(&self) -> Option<&Arc<crate::stage::client::Pipeline>> {
        self.remote.as_ref()
    }

    pub fn part(&self) -> &Part {
        &self.part
    }

    /// Only the tensors of `part` (one pipeline stage's: the others are not in `w`).
    pub fn load_part(cfg: DecoderConfig, w: &Weights, part: Part) -> Result<Self> {
        let h = cfg.hidden_size;
        if part.layers.end > cfg.num_layers || part.layers.start > part.layers.end {
            bail!("layers {:?} of a {}-layer model", part.layers, cfg.num_layers);
        }
        let (nh, nkv, hd, im) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size);
        let dtype = w.dtype.compute();
        let norm = |name: Name| -> Result<Tensor> {
            let t = w.vector(name, h)?;
            Ok(if cfg.norm_offset != 0.0 { (t + cfg.norm_offset)? } else { t })
        };
        let tied = cfg.tie_word_embeddings || !w.has(Name::LmHead);
        let embed = if part.embed || (part.head && tied && w.dtype != super::weights::WeightDType::Gguf) {
            w.dense_f32(Name::Embed, &[cfg.vocab_size, h])?
        } else {
            Tensor::zeros((0, h), DType::F32, &w.device)?
        };
        let mut layers = Vec::with_capacity(part.layers.len());
        for i in part.layers.clone() {
            let n = |t: L| Name::Layer(i, t);
            let bias = |t: L, size: usize| -> Result<Option<Tensor>> {
                if cfg.qkv_bias {
                    Ok(Some(w.vector(n(t), size)?.to_dtype(dtype)?))
                } else {
                    Ok(None)
                }
            };
            layers.push(Layer {
                attn: Attention {
                    q: w.linear(n(L::Q), nh * hd, h)?,
                    k: w.linear(n(L::K), nkv * hd, h)?,
                    v: w.linear(n(L::V), nkv * hd, h)?,
                    o: w.linear(n(L::O), h, nh * hd)?,
                    q_bias: bias(L::QBias, nh * hd)?,
                    k_bias: bias(L::KBias, nkv * hd)?,
                    v_bias: bias(L::VBias, nkv * hd)?,
                    q_norm: if cfg.qk_norm { Some(w.vector(n(L::QNorm), hd)?) } else { None },
                    k_norm: if cfg.qk_norm { Some(w.vector(n(L::KNorm), hd)?) } else { None },
                },
                mlp: Mlp {
                    gate: w.linear(n(L::Gate), im, h)?,
                    up: w.linear(n(L::Up), im, h)?,
                    down: w.linear(n(L::Down), h, im)?,
                },
                input_norm: norm(n(L::InputNorm))?,
                post_attn_norm: norm(n(L::PostAttnNorm))?,
                pre_ffn_norm: if cfg.post_norms { Some(norm(n(L::PreFfnNorm))?) } else { None },
                post_ffn_norm: if cfg.post_norms { Some(norm(n(L::PostFfnNorm))?) } else { None },
                sliding: cfg.sliding_layers.get(i).copied().unwrap_or(false),
            });
        }
        let final_norm = if part.head { norm(Name::FinalNorm)? } else { Tensor::zeros(0, DType::F32, &w.device)? };
        let lm_head = if !part.head {
            Linear::Dense(Tensor::zeros((0, h), dtype, &w.device)?)
        } else if tied {
            if !cfg.tie_word_embeddings {
                tracing::warn!("no lm_head tensor although the config says untied; tying to the embedding");
            }
            match w.dtype {
                super::weights::WeightDType::Gguf => w.linear(Name::Embed, cfg.vocab_size, h)?,
                _ => Linear::Dense(embed.to_dtype(dtype)?),
            }
        } else {
            w.linear(Name::LmHead, cfg.vocab_size, h)?
        };
        // A tied last stage needed the embedding only to build its head.
        let embed = if part.embed { embed.to_dtype(dtype)? } else { Tensor::zeros((0, h), dtype, &w.device)? };
        Ok(Self {
            inv_freq: inv_freq(&cfg)?,
            cfg,
            part,
            remote: None,
            embed,
            layers,
            final_norm,
            lm_head,
            device: w.device.clone(),
            dtype,
            adapters: Vec::new(),
            default_adapter: None,
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// f32 on the CPU: every op of a forward is one of the batch-invariant kernels (or
    /// row-wise), so a row's numbers never depend on its batch (docs/determinism.md).
    pub fn batch_invariant(&self) -> bool {
        self.device.is_cpu() && self.dtype == DType::F32
    }

    /// A fresh state; every row gets the default adapter (none unless `--adapter`).
    pub fn new_state(&self, left_pad: Vec<usize>) -> State {
        let adapters = vec![self.default_adapter; left_pad.len()];
        let remote = self.remote.as_ref().map(|p| p.new_state());
        State { kv: vec![None; self.layers.len()], left_pad, cols: 0, adapters, remote }
    }

    /// Makes `adapter` available to rows (its index in [`adapters`](Self::adapters)).
    pub fn attach_adapter(&mut self, adapter: LoraAdapter) -> Result<u16> {
        if self.adapters.len() >= u16::MAX as usize {
            bail!("too many LoRA adapters");
        }
        self.adapters.push(Arc::new(adapter));
        Ok((self.adapters.len() - 1) as u16)
    }

    /// The adapter new states give every row (`None` = the base model).
    pub fn set_default_adapter(&mut self, id: Option<u16>) -> Result<()> {
        if let Some(i) = id {
            if i as usize >= self.adapters.len() {
                bail!("adapter {i}: only {} attached", self.adapters.len());
            }
        }
        self.default_adapter = id;
        Ok(())
    }

    pub fn adapters(&self) -> &[Arc<LoraAdapter>] {
        &self.adapters
    }

    pub fn default_adapter(&self) -> Option<u16> {
        self.default_adapter
    }

    /// `lin · x` plus the LoRA update of every row whose adapter targets this projection. A row
    /// without one gets the base projection's bits; each adapter's update runs on its own rows
    /// with the batch-invariant kernels, so a row computes what it would alone.
    fn project(&self, lin: &Linear, layer: usize, t: L, xs: &Tensor, rows: &[Option<u16>]) -> Result<Tensor> {
        let mut y = lin.forward(xs)?;
        if self.adapters.is_empty() {
            return Ok(y);
        }
        let mut ids: Vec<u16> = rows.iter().flatten().copied().collect();
        ids.sort_unstable();
        ids.dedup();
        for id in ids {
            let Some(pair) = self.adapters[id as usize].pair(layer, t) else { continue };
            let sel: Vec<u32> = (0..rows.len()).filter(|&r| rows[r] == Some(id)).map(|r| r as u32).collect();
            if sel.len() == rows.len() {
                let d = pair.delta(xs)?.to_dtype(y.dtype())?;
                y = (y + d)?;
            } else {
                let idx = Tensor::from_vec(sel.clone(), sel.len(), xs.device())?;
                let d = pair.delta(&xs.index_select(&idx, 0)?)?.to_dtype(y.dtype())?;
                y = y.index_add(&idx, &d, 0)?;
            }
        }
        Ok(y)
    }

    /// The prefix cache's root key for states of this decoder: prefixes computed under another
    /// default adapter are other keys and values.
    pub fn prefix_root(&self) -> Option<&str> {
        self.default_adapter.map(|i| self.adapters[i as usize].hash.as_str())
    }

    /// cos/sin `[batch, seq, head_dim/2]` for columns `start..start+seq` of each row.
    fn rope_tables(&self, state: &State, seq: usize) -> Result<(Tensor, Tensor)> {
        let b = state.batch();
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(b * seq * half);
        let mut sin = Vec::with_capacity(b * seq * half);
        for &pad in &state.left_pad {
            for c in state.cols..state.cols + seq {
                // Padding columns get position 0; they are masked out anyway.
                let pos = c.saturating_sub(pad) as f32;
                for &f in &self.inv_freq {
                    let a = pos * f;
                    cos.push(a.cos());
                    sin.push(a.sin());
                }
            }
        }
        let cos = Tensor::from_vec(cos, (b, seq, half), &self.device)?.to_dtype(self.dtype)?;
        let sin = Tensor::from_vec(sin, (b, seq, half), &self.device)?.to_dtype(self.dtype)?;
        Ok((cos, sin))
    }

    /// Additive mask `[batch, 1, seq, cols]`: causal, left padding, optional sliding window.
    fn mask(&self, state: &State, seq: usize, window: Option<usize>) -> Result<Option<Tensor>> {
        let total = state.cols + seq;
        let any_pad = state.left_pad.iter().any(|&p| p > 0);
        if seq == 1 && !any_pad && window.is_none_or(|w| total <= w) {
            return Ok(None);
        }
        let b = state.batch();
        let mut m = vec![0f32; b * seq * total];
        for (r, &pad) in state.left_pad.iter().enumerate() {
            for qi in 0..seq {
                let q = state.cols + qi;
                for k in 0..total {
                    let mut blocked = k > q || k < pad;
                    if let Some(w) = window {
                        blocked |= q >= k + w;
                    }
                    // A padding query sees only itself, so its softmax stays finite.
                    if k == q {
                        blocked = false;
                    }
                    if blocked {
                        m[(r * seq + qi) * total + k] = f32::NEG_INFINITY;
                    }
                }
            }
        }
        Ok(Some(Tensor::from_vec(m, (b, 1, seq, total), &self.device)?))
    }

    #[allow(clippy::too_many_arguments)] // one call site; a struct of borrowed tables would only rename them
    fn attention(
        &self,
        layer: &Layer,
        idx: usize,
        slot: usize,
        xs: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: Option<&Tensor>,
        state: &mut State,
    ) -> Result<Tensor> {
        let cfg = &self.cfg;
        let (b, seq, _) = xs.dims3()?;
        let (nh, nkv, hd) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        let a = &layer.attn;
        let rows: Vec<Option<u16>> = (0..b).map(|r| state.adapter(r)).collect();
        let proj = |lin: &Linear, t: L, bias: &Option<Tensor>, heads: usize| {
            split_heads(self.project(lin, idx, t, xs, &rows)?, bias, (b, seq, heads, hd))
        };
        let mut q = proj(&a.q, L::Q, &a.q_bias, nh)?;
        let mut k = proj(&a.k, L::K, &a.k_bias, nkv)?;
        let v = proj(&a.v, L::V, &a.v_bias, nkv)?;
        // Qwen3: RMSNorm over each head's values (row-wise, so batch invariant), before RoPE.
        if let Some(n) = &a.q_norm {
            q = rms_norm(&q, n, cfg.rms_norm_eps)?;
        }
        if let Some(n) = &a.k_norm {
            k = rms_norm(&k, n, cfg.rms_norm_eps)?;
        }
        let q = candle_nn::rotary_emb::rope(&q, cos, sin)?;
        let k = candle_nn::rotary_emb::rope(&k, cos, sin)?;
        let (k, v) = match &state.kv[slot] {
            Some((pk, pv)) => (Tensor::cat(&[pk, &k], 2)?, Tensor::cat(&[pv, &v], 2)?),
            None => (k, v),
        };
        state.kv[slot] = Some((k.clone(), v.clone()));
        if self.batch_invariant() {
            // The batch-invariant kernel: per query over its row's own keys, in position order.
            let shape = AttnShape {
                batch: b,
                heads: nh,
                kv_heads: nkv,
                seq,
                total: k.dim(2)?,
                head_dim: hd,
                start_col: state.cols,
                left_pad: state.left_pad.clone(),
                window: if layer.sliding { cfg.sliding_window } else { None },
                scale: cfg.attn_scale() as f32,
                softcap: cfg.attn_logit_softcap.map(|c| c as f32),
            };
            let out = kernels::with_f32(&q, |q| {
                kernels::with_f32(&k, |k| kernels::with_f32(&v, |v| Ok(kernels::attention(q, k, v, &shape))))
            })?;
            return self.project(&a.o, idx, L::O, &Tensor::from_vec(out, (b, seq, nh * hd), &self.device)?, &rows);
        }
        let n_rep = nh / nkv;
        let k = candle_transformers::utils::repeat_kv(k, n_rep)?.contiguous()?;
        let v = candle_transformers::utils::repeat_kv(v, n_rep)?.contiguous()?;
        // Scores and softmax in f32 (transformers upcasts the softmax too).
        let scores = (q.matmul(&k.t()?)?.to_dtype(DType::F32)? * cfg.attn_scale())?;
        let scores = softcap(&scores, cfg.attn_logit_softcap)?;
        let scores = match mask {
            Some(m) => scores.broadcast_add(m)?,
            None => scores,
        };
        let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(self.dtype)?;
        let out = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, seq, nh * hd))?;
        self.project(&a.o, idx, L::O, &out, &rows)
    }

    fn mlp(&self, m: &Mlp, idx: usize, xs: &Tensor, rows: &[Option<u16>]) -> Result<Tensor> {
        let g = self.project(&m.gate, idx, L::Gate, xs, rows)?;
        let g = match self.cfg.activation {
            Activation::Silu => candle_nn::ops::silu(&g)?,
            Activation::GeluTanh => g.gelu()?,
            Activation::Gelu => g.gelu_erf()?,
        };
        let h = (g * self.project(&m.up, idx, L::Up, xs, rows)?)?;
        self.project(&m.down, idx, L::Down, &h, rows)
    }

    /// Embeds token ids `[batch, seq]` (`hook_embed` is after Gemma's scaling).
    pub fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        if !self.part.embed {
            bail!("{}: the token embedding is on the first pipeline stage", self.where_());
        }
        let (b, seq) = ids.dims2()?;
        let e = self.embed.index_select(&ids.flatten_all()?, 0)?.reshape((b, seq, self.cfg.hidden_size))?;
        Ok(match self.cfg.embed_scale {
            // transformers rounds the scale to the activation dtype before multiplying.
            Some(s) => {
                let s = Tensor::new(&[s as f32], &self.device)?.to_dtype(self.dtype)?;
                e.broadcast_mul(&s)?
            }
            None => e,
        })
    }

    /// One forward call over `ids` (`[batch, seq]`), appending to `state`'s KV cache.
    /// Returns f32 logits for every position (`all_logits`) or for the last one only
    /// (`[batch, 1, vocab]`).
    pub fn forward(
        &self,
        ids: &Tensor,
        state: &mut State,
        step: &StepInfo,
        spec: &HookSpec,
        caps: &mut Captures,
        all_logits: bool,
    ) -> Result<Tensor> {
        self.forward_ids(ids, None, state, step, spec, caps, all_logits, None)
    }

    /// [`forward`](Self::forward) with features spliced into the embeddings (a VLM's image
    /// tokens) and optional rotary tables (see [`forward_embeds_rope`](Self::forward_embeds_rope)).
    /// The one entry that also runs on pipeline stages: the embedding is on the first.
    #[allow(clippy::too_many_arguments)] // forward's arguments plus the splice and the override
    pub fn forward_ids(
        &self,
        ids: &Tensor,
        splice: Option<&Splice>,
        state: &mut State,
        step: &StepInfo,
        spec: &HookSpec,
        caps: &mut Captures,
        all_logits: bool,
        rope: Option<(Tensor, Tensor)>,
    ) -> Result<Tensor> {
        if let Some(p) = &self.remote {
            let out = p.forward(self, ids, splice, state, step, spec, caps, Some(all_logits), rope)?;
            return out.context("the last stage returned no logits");
        }
        let xs = self.embed_spliced(ids, splice)?;
        self.forward_embeds_rope(xs, state, step, spec, caps, all_logits, rope)
    }

    /// Token embeddings `[batch, seq, hidden]` of `ids` with `splice`'s features in place.
    pub fn embed_spliced(&self, ids: &Tensor, splice: Option<&Splice>) -> Result<Tensor> {
        let xs = self.embed(ids)?;
        let Some(sp) = splice else { return Ok(xs) };
        let (b, seq, h) = xs.dims3()?;
        let k = sp.gather.iter().filter(|&&g| g as usize >= b * seq).count();
        if sp.feats.dims() != [k, h] || sp.gather.len() != b * seq {
            bail!(
                "spliced features {:?} with {} gather indices, expected [{k}, {h}] and {} (one per column)",
                sp.feats.dims(),
                sp.gather.len(),
                b * seq
            );
        }
        let flat = xs.reshape((b * seq, h))?;
        let all = Tensor::cat(&[&flat, &sp.feats.to_dtype(flat.dtype())?.to_device(flat.device())?], 0)?;
        let idx = Tensor::from_vec(sp.gather.clone(), b * seq, flat.device())?;
        Ok(all.index_select(&idx, 0)?.reshape((b, seq, h))?)
    }

    /// This process's share, for messages: "stage layers 12..24" or "the model".
    fn where_(&self) -> String {
        if self.remote.is_some() {
            "a driver over pipeline stages".into()
        } else if self.part == Part::whole(self.cfg.num_layers) {
            "the model".into()
        } else {
            format!("the stage holding layers {}..{}", self.part.layers.start, self.part.layers.end)
        }
    }

    /// One pipeline stage's share of a forward: from `xs` (token ids `[batch, seq]` on the
    /// first stage, spliced with `splice`; the previous stage's residual `[batch, seq, hidden]`
    /// on the others) through this stage's layers, then, on the last stage and when `logits`
    /// says so, the final norm and head (`Some(all_logits)`). Returns the residual stream, or
    /// the logits on the last stage.
    #[allow(clippy::too_many_arguments)] // forward_ids' arguments, one stage's share
    pub fn forward_part(
        &self,
        xs: &Tensor,
        splice: Option<&Splice>,
        state: &mut State,
        step: &StepInfo,
        spec: &HookSpec,
        caps: &mut Captures,
        logits: Option<bool>,
        rope: Option<(Tensor, Tensor)>,
    ) -> Result<Tensor> {
        let xs = if self.part.embed && self.part.layers.start == 0 {
            self.embed_spliced(xs, splice)?
        } else {
            xs.to_dtype(self.dtype)?
        };
        match logits {
            Some(all) if self.part.head => self.forward_embeds_rope(xs, state, step, spec, caps, all, rope),
            _ => self.layers(xs, state, step, spec, caps, rope),
        }
    }

    /// Like [`forward`](Self::forward) from input embeddings (`[batch, seq, hidden]`), so
    /// multimodal models can splice image features in.
    pub fn forward_embeds(
        &self,
        xs: Tensor,
        state: &mut State,
        step: &StepInfo,
        spec: &HookSpec,
        caps: &mut Captures,
        all_logits: bool,
    ) -> Result<Tensor> {
        self.forward_embeds_rope(xs, state, step, spec, caps, all_logits, None)
    }

    /// [`forward_embeds`](Self::forward_embeds) with the rotary tables given per position:
    /// `rope = (cos, sin)`, each `[batch, seq, head_dim/2]` in the activation dtype. Qwen2-VL's
    /// M-RoPE gives image tokens 2-D positions and text a shifted 1-D position, which a column
    /// index cannot express; `None` uses the usual 1-D positions (column minus left padding).
    #[allow(clippy::too_many_arguments)] // forward_embeds' arguments plus the override
    pub fn forward_embeds_rope(
        &self,
        xs: Tensor,
        state: &mut State,
        step: &StepInfo,
        spec: &HookSpec,
        caps: &mut Captures,
        all_logits: bool,
        rope: Option<(Tensor, Tensor)>,
    ) -> Result<Tensor> {
        if self.remote.is_some() || !self.part.head {
            bail!("{}: forward from embeddings needs the whole model in this process", self.where_());
        }
        let seq = xs.dim(1)?;
        let hooked = !spec.is_empty();
        let xs = self.layers(xs, state, step, spec, caps, rope)?;
        let cfg = &self.cfg;
        let capture_norm = hooked && spec.touches(HookPoint::FinalNorm);
        // Norm and project only the last position unless every position is asked for.
        let xs = if all_logits || capture_norm { xs } else { xs.narrow(1, seq - 1, 1)? };
        let mut xs = rms_norm(&xs, &self.final_norm, cfg.rms_norm_eps)?;
        if capture_norm {
            xs = hooks::apply(spec, HookPoint::FinalNorm, xs, step, caps)?;
            if !all_logits {
                xs = xs.narrow(1, seq - 1, 1)?;
            }
        }
        let logits = self.lm_head.forward(&xs)?.to_dtype(DType::F32)?;
        softcap(&logits, cfg.final_logit_softcap)
    }

    /// Runs the decoder layers over `xs`, appending to `state`'s KV cache; returns the last
    /// layer's residual stream (no final norm).
    fn layers(
        &self,
        xs: Tensor,
        state: &mut State,
        step: &StepInfo,
        spec: &HookSpec,
        caps: &mut Captures,
        rope: Option<(Tensor, Tensor)>,
    ) -> Result<Tensor> {
        let cfg = &self.cfg;
        let (b, seq, _) = xs.dims3()?;
        if b != state.batch() {
            bail!("batch of {b} rows but the state was made for {}", state.batch());
        }
        if !spec.is_empty() {
            spec.validate(b, cfg.hidden_size, cfg.num_layers)?;
        }
        let hooked = !spec.is_empty();
        let mut xs = xs;
        if hooked && self.part.layers.start == 0 && spec.touches(HookPoint::Embed) {
            xs = hooks::apply(spec, HookPoint::Embed, xs, step, caps)?;
        }
        let (cos, sin) = match rope {
            Some((cos, sin)) => {
                let want = [b, seq, self.inv_freq.len()];
                if cos.dims() != want || sin.dims() != want {
                    bail!("rotary tables have shapes {:?} / {:?}, expected {want:?}", cos.dims(), sin.dims());
                }
                (cos, sin)
            }
            None => self.rope_tables(state, seq)?,
        };
        // The CPU f32 attention kernel masks by itself.
        let rows: Vec<Option<u16>> = (0..b).map(|r| state.adapter(r)).collect();
        let masked = !self.batch_invariant();
        let full_mask = if masked { self.mask(state, seq, None)? } else { None };
        let window_mask = match cfg.sliding_window {
            Some(w) if masked => self.mask(state, seq, Some(w))?,
            _ => None,
        };
        for (j, layer) in self.layers.iter().enumerate() {
            let i = self.part.layers.start + j;
            if hooked && spec.touches(HookPoint::ResidPre(i)) {
                xs = hooks::apply(spec, HookPoint::ResidPre(i), xs, step, caps)?;
            }
            let mask = if layer.sliding { window_mask.as_ref() } else { full_mask.as_ref() };
            let h = rms_norm(&xs, &layer.input_norm, cfg.rms_norm_eps)?;
            let mut h = self.attention(layer, i, j, &h, &cos, &sin, mask, state)?;
            if cfg.post_norms {
                h = rms_norm(&h, &layer.post_attn_norm, cfg.rms_norm_eps)?;
            }
            xs = (xs + h)?;
            let pre = layer.pre_ffn_norm.as_ref().unwrap_or(&layer.post_attn_norm);
            let h = rms_norm(&xs, pre, cfg.rms_norm_eps)?;
            let mut h = self.mlp(&layer.mlp, i, &h, &rows)?;
            if let Some(n) = &layer.post_ffn_norm {
                h = rms_norm(&h, n, cfg.rms_norm_eps)?;
            }
            xs = (xs + h)?;
            if hooked && spec.touches(HookPoint::ResidPost(i)) {
                xs = hooks::apply(spec, HookPoint::ResidPost(i), xs, step, caps)?;
            }
        }
        state.cols += seq;
        Ok(xs)
    }

    /// A differentiable forward for training something upstream of the decoder (the graft's
    /// adapter): input embeddings `[batch, seq, hidden]` of unpadded rows at positions
    /// `0..seq`, causal attention, f32 logits `[batch, seq, vocab]`. Only candle ops with a
    /// backward pass (no custom kernels, no KV cache, no hooks), so gradients reach `xs`; the
    /// decoder's own weights are plain tensors and get none. Dense weights only; the sliding
    /// window and Gemma2's post-norms are refused. The numbers agree with
    /// [`forward_embeds`](Self::forward_embeds) to float rounding (tested), not bit for bit.
    /// Logits only for positions `from..seq` (`[batch, seq - from, vocab]`): a loss on the
    /// response skips most of the LM head.
    pub fn forward_train(&self, xs: &Tensor, from: usize) -> Result<Tensor> {
        let cfg = &self.cfg;
        if self.remote.is_some() || self.part != Part::whole(cfg.num_layers) {
            bail!("{}: training needs the whole model in this process", self.where_());
        }
        if !self.adapters.is_empty() {
            bail!("forward_train does not apply LoRA adapters; load the model without --adapter");
        }
        if cfg.sliding_window.is_some() || cfg.post_norms {
            bail!("forward_train supports llama, qwen2, qwen3 and gemma decoders (no sliding window, no post-norms)");
        }
        let (b, seq, _) = xs.dims3()?;
        let (nh, nkv, hd) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        let eps = cfg.rms_norm_eps as f32;
        let xs = xs.to_dtype(self.dtype)?;
        let lin = |l: &Linear, x: &Tensor| -> Result<Tensor> {
            match l {
                // CPU f32: the frozen weight's own op (no weight gradient, batch-invariant kernel).
                Linear::Dense(w) if x.device().is_cpu() && x.dtype() == DType::F32 && w.dtype() == DType::F32 => {
                    Ok(x.contiguous()?.apply_op1(FrozenLinear(w.clone()))?)
                }
                Linear::Dense(w) => Ok(x.broadcast_matmul(&w.t()?)?),
                _ => bail!("forward_train needs dense weights (a safetensors checkpoint), not quantized GGUF ones"),
            }
        };
        let norm = |x: &Tensor, w: &Tensor| -> Result<Tensor> {
            let dt = x.dtype();
            Ok(candle_nn::ops::rms_norm_slow(&x.to_dtype(DType::F32)?, w, eps)?.to_dtype(dt)?)
        };
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(seq * half);
        let mut sin = Vec::with_capacity(seq * half);
        for p in 0..seq {
            for &f in &self.inv_freq {
                let a = p as f32 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        let cos = Tensor::from_vec(cos, (seq, half), &self.device)?.to_dtype(self.dtype)?;
        let sin = Tensor::from_vec(sin, (seq, half), &self.device)?.to_dtype(self.dtype)?;
        let mask: Vec<f32> =
            (0..seq).flat_map(|q| (0..seq).map(move |k| if k > q { f32::NEG_INFINITY } else { 0.0 })).collect();
        let mask = Tensor::from_vec(mask, (1, 1, seq, seq), &self.device)?;
        let mut xs = xs;
        for layer in &self.layers {
            let a = &layer.attn;
            let h = norm(&xs, &layer.input_norm)?;
            let proj =
                |l: &Linear, bias: &Option<Tensor>, heads: usize| split_heads(lin(l, &h)?, bias, (b, seq, heads, hd));
            let mut q = proj(&a.q, &a.q_bias, nh)?;
            let mut k = proj(&a.k, &a.k_bias, nkv)?;
            let v = proj(&a.v, &a.v_bias, nkv)?;
            if let Some(n) = &a.q_norm {
                q = norm(&q, n)?;
            }
            if let Some(n) = &a.k_norm {
                k = norm(&k, n)?;
            }
            let q = candle_nn::rotary_emb::rope_slow(&q, &cos, &sin)?;
            let k = candle_nn::rotary_emb::rope_slow(&k, &cos, &sin)?;
            let k = candle_transformers::utils::repeat_kv(k, nh / nkv)?.contiguous()?;
            let v = candle_transformers::utils::repeat_kv(v, nh / nkv)?.contiguous()?;
            let scores = (q.matmul(&k.t()?)?.to_dtype(DType::F32)? * cfg.attn_scale())?;
            let scores = softcap(&scores, cfg.attn_logit_softcap)?.broadcast_add(&mask)?;
            let probs = candle_nn::ops::softmax(&scores, candle_core::D::Minus1)?.to_dtype(self.dtype)?;
            let out = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, seq, nh * hd))?;
            xs = (xs + lin(&a.o, &out)?)?;
            let h = norm(&xs, &layer.post_attn_norm)?;
            let g = lin(&layer.mlp.gate, &h)?;
            let g = match cfg.activation {
                Activation::Silu => g.silu()?,
                Activation::GeluTanh => g.gelu()?,
                Activation::Gelu => g.gelu_erf()?,
            };
            let m = lin(&layer.mlp.down, &(g * lin(&layer.mlp.up, &h)?)?)?;
            xs = (xs + m)?;
        }
        if from >= seq {
            bail!("forward_train: logits from position {from} of a {seq}-token sequence");
        }
        let xs = norm(&xs.narrow(1, from, seq - from)?, &self.final_norm)?;
        let logits = lin(&self.lm_head, &xs)?.to_dtype(DType::F32)?;
        softcap(&logits, cfg.final_logit_softcap)
    }

    /// Appends `ids` (`[batch, seq]`) to `state`'s KV cache without hooks and without the final
    /// norm and head: a prefix whose logits nobody reads (the prefix cache, shared prefills).
    pub fn extend_cache(&self, ids: &Tensor, state: &mut State, step: &StepInfo) -> Result<()> {
        if let Some(p) = &self.remote {
            p.forward(self, ids, None, state, step, &HookSpec::none(), &mut Captures::default(), None, None)?;
            return Ok(());
        }
        self.layers(self.embed(ids)?, state, step, &HookSpec::none(), &mut Captures::default(), None)?;
        Ok(())
    }

    /// Every tensor the decoder holds (embedding, norms, projections, biases; quantized matrices
    /// are skipped), for checks that training something else leaves them untouched.
    pub fn dense_tensors(&self) -> Vec<&Tensor> {
        fn lin(l: &Linear) -> Option<&Tensor> {
            match l {
                Linear::Dense(t) => Some(t),
                _ => None,
            }
        }
        let mut v = vec![&self.embed, &self.final_norm];
        v.extend(lin(&self.lm_head));
        for l in &self.layers {
            let a = &l.attn;
            v.extend([&a.q, &a.k, &a.v, &a.o, &l.mlp.gate, &l.mlp.up, &l.mlp.down].into_iter().filter_map(lin));
            v.extend([&a.q_bias, &a.k_bias, &a.v_bias, &a.q_norm, &a.k_norm].into_iter().flatten());
            v.extend([&l.input_norm, &l.post_attn_norm]);
            v.extend([&l.pre_ffn_norm, &l.post_ffn_norm].into_iter().flatten());
        }
        v
    }

    /// The input embedding matrix `[vocab, hidden]` (before Gemma's scale), for the embedding lens.
    pub fn embedding_matrix(&self) -> Result<&Tensor> {
        if !self.part.embed {
            bail!("{}: the embedding lens needs the token embedding (on the first stage)", self.where_());
        }
        Ok(&self.embed)
    }

    /// Final norm, LM head and soft-cap on residual states `[.., hidden]`: the logit lens. On
    /// `blocks.{L-1}.hook_resid_post` this is the model's own logits; `normed` skips the norm
    /// for states that already went through it (`hook_final_norm`).
    pub fn unembed(&self, xs: &Tensor, normed: bool) -> Result<Tensor> {
        if !self.part.head {
            bail!("{}: the logit lens needs the final norm and LM head (on the last stage)", self.where_());
        }
        let xs = xs.to_dtype(self.dtype)?;
        let xs = if normed { xs } else { rms_norm(&xs, &self.final_norm, self.cfg.rms_norm_eps)? };
        let logits = self.lm_head.forward(&xs)?.to_dtype(DType::F32)?;
        softcap(&logits, self.cfg.final_logit_softcap)
    }

    /// Embedding table row count check for token ids (clear error instead of an index panic).
    pub fn check_ids(&self, ids: &[u32]) -> Result<()> {
        if let Some(&bad) = ids.iter().find(|&&t| t as usize >= self.cfg.vocab_size) {
            bail!("token id {bad} is outside the vocabulary (size {})", self.cfg.vocab_size);
        }
        Ok(())
    }
}
