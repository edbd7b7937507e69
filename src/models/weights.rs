//! Weight sources: transformers safetensors (one file or sharded) and GGUF. Every tensor is
//! checked against the shape the config implies; a mismatch names the tensor, the file, both
//! shapes and the likely cause.
use super::kernels;
use super::q8::Q8Matrix;
use anyhow::{bail, Context, Result};
use candle_core::quantized::{gguf_file, GgmlDType, QMatMul, QTensor};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Module, Tensor};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The tensors a decoder needs, named independently of the file format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Name {
    Embed,
    FinalNorm,
    LmHead,
    Layer(usize, LayerTensor),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerTensor {
    Q,
    K,
    V,
    O,
    QBias,
    KBias,
    VBias,
    /// Qwen3: per-head RMSNorm weights `[head_dim]` of q and k.
    QNorm,
    KNorm,
    InputNorm,
    /// Llama/Qwen2: the norm before the MLP. Gemma2: the norm after attention.
    PostAttnNorm,
    PreFfnNorm,
    PostFfnNorm,
    Gate,
    Up,
    Down,
}

impl Name {
    pub fn hf(&self, prefix: &str) -> String {
        use LayerTensor::*;
        match self {
            Name::Embed => format!("{prefix}embed_tokens.weight"),
            Name::FinalNorm => format!("{prefix}norm.weight"),
            Name::LmHead => "lm_head.weight".to_string(),
            Name::Layer(i, t) => {
                let s = match t {
                    Q => "self_attn.q_proj.weight",
                    K => "self_attn.k_proj.weight",
                    V => "self_attn.v_proj.weight",
                    O => "self_attn.o_proj.weight",
                    QBias => "self_attn.q_proj.bias",
                    KBias => "self_attn.k_proj.bias",
                    VBias => "self_attn.v_proj.bias",
                    QNorm => "self_attn.q_norm.weight",
                    KNorm => "self_attn.k_norm.weight",
                    InputNorm => "input_layernorm.weight",
                    PostAttnNorm => "post_attention_layernorm.weight",
                    PreFfnNorm => "pre_feedforward_layernorm.weight",
                    PostFfnNorm => "post_feedforward_layernorm.weight",
                    Gate => "mlp.gate_proj.weight",
                    Up => "mlp.up_proj.weight",
                    Down => "mlp.down_proj.weight",
                };
                format!("{prefix}layers.{i}.{s}")
            }
        }
    }

    /// llama.cpp tensor names. `post_norms` selects Gemma2's naming of the extra norms.
    pub fn gguf(&self, post_norms: bool) -> String {
        use LayerTensor::*;
        match self {
            Name::Embed => "token_embd.weight".into(),
            Name::FinalNorm => "output_norm.weight".into(),
            Name::LmHead => "output.weight".into(),
            Name::Layer(i, t) => {
                let s = match (t, post_norms) {
                    (Q, _) => "attn_q.weight",
                    (K, _) => "attn_k.weight",
                    (V, _) => "attn_v.weight",
                    (O, _) => "attn_output.weight",
                    (QBias, _) => "attn_q.bias",
                    (KBias, _) => "attn_k.bias",
                    (VBias, _) => "attn_v.bias",
                    (QNorm, _) => "attn_q_norm.weight",
                    (KNorm, _) => "attn_k_norm.weight",
                    (InputNorm, _) => "attn_norm.weight",
                    (PostAttnNorm, false) => "ffn_norm.weight",
                    (PostAttnNorm, true) => "post_attention_norm.weight",
                    (PreFfnNorm, _) => "ffn_norm.weight",
                    (PostFfnNorm, _) => "post_ffw_norm.weight",
                    (Gate, _) => "ffn_gate.weight",
                    (Up, _) => "ffn_up.weight",
                    (Down, _) => "ffn_down.weight",
                };
                format!("blk.{i}.{s}")
            }
        }
    }
}

/// A linear layer without bias handling; the decoder adds biases itself.
///
/// On the CPU every variant is batch invariant (docs/determinism.md): one kernel for any number
/// of rows, each output element reduced in a fixed order.
#[derive(Debug, Clone)]
pub enum Linear {
    /// `[out, in]` weight, in the compute dtype (f32 on the CPU: [`kernels::matmul_t`]).
    Dense(Tensor),
    /// Kept quantized (`--dtype gguf`) on a non-CPU device.
    Quant(QMatMul),
    /// Kept quantized (`--dtype gguf`) on CPU: every GGUF block type re-quantized into 8-bit
    /// blocks of 32 for our batched kernel, for decode and prefill alike.
    Q8(Arc<Q8Matrix>),
}

impl Linear {
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let in_dim = |n: usize| -> Result<(Vec<usize>, usize)> {
            let dims = xs.dims().to_vec();
            let k = *dims.last().unwrap_or(&0);
            if k != n {
                bail!("linear layer: input has {k} features, the weight expects {n}");
            }
            Ok((dims, xs.elem_count() / k.max(1)))
        };
        let out_shape = |mut dims: Vec<usize>, n: usize| {
            *dims.last_mut().expect("non-empty") = n;
            dims
        };
        Ok(match self {
            Linear::Dense(w) if xs.device().is_cpu() && xs.dtype() == DType::F32 && w.dtype() == DType::F32 => {
                let (n, k) = w.dims2()?;
                let (dims, m) = in_dim(k)?;
                let out = kernels::with_f32(xs, |x| kernels::with_f32(w, |w| Ok(kernels::matmul_t(x, m, k, w, n))))?;
                Tensor::from_vec(out, out_shape(dims, n), xs.device())?
            }
            // One 2-D matmul over all rows: a batched (broadcast) matmul re-reads the weight for
            // every batch row, which made decode cost grow linearly with the batch.
            Linear::Dense(w) => match xs.dims() {
                [b, s, h] => xs.reshape((b * s, *h))?.matmul(&w.t()?)?.reshape((*b, *s, ()))?,
                _ => xs.broadcast_matmul(&w.t()?)?,
            },
            Linear::Quant(q) => q.forward(xs)?,
            Linear::Q8(w) => {
                let (dims, m) = in_dim(w.in_dim())?;
                let out = kernels::with_f32(xs, |x| w.matmul(x, m))?;
                Tensor::from_vec(out, out_shape(dims, w.out_dim()), xs.device())?
            }
        })
    }
}

/// GGUF types our CPU kernel (`q8.rs`) takes, re-quantized into its 8-bit blocks of 32: the
/// 32-value block types (`bench matmul` measured it 1.5–4× faster than candle's Q8_0 kernel and
/// 6–26× faster than its scalar Q5_0 one) and the k-quants, whose prefill on candle's generic
/// kernel (the one that is batch invariant) took 40% of qwen-coder-0.5b's prefill after the
/// AMX kernel (its `ffn_down` is Q4_K/Q6_K). The re-quantization adds at most half an 8-bit
/// step per weight, and the k-quant layers take 8.5 bits per weight instead of 4.5–6.6.
fn takes_q8(t: GgmlDType) -> bool {
    matches!(
        t,
        GgmlDType::Q8_0
            | GgmlDType::Q4_0
            | GgmlDType::Q4_1
            | GgmlDType::Q5_0
            | GgmlDType::Q5_1
            | GgmlDType::Q2K
            | GgmlDType::Q3K
            | GgmlDType::Q4K
            | GgmlDType::Q5K
            | GgmlDType::Q6K
    )
}

/// What dtype to hold weights and activations in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightDType {
    F32,
    F16,
    BF16,
    /// Keep GGUF matrices quantized (quantized matmul); activations in f32.
    Gguf,
}

impl WeightDType {
    pub fn compute(self) -> DType {
        match self {
            WeightDType::F32 | WeightDType::Gguf => DType::F32,
            WeightDType::F16 => DType::F16,
            WeightDType::BF16 => DType::BF16,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            WeightDType::F32 => "f32",
            WeightDType::F16 => "f16",
            WeightDType::BF16 => "bf16",
            WeightDType::Gguf => "gguf",
        }
    }
}

impl std::str::FromStr for WeightDType {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "f32" => WeightDType::F32,
            "f16" => WeightDType::F16,
            "bf16" => WeightDType::BF16,
            "gguf" | "q" | "quantized" => WeightDType::Gguf,
            other => bail!("unknown dtype `{other}`: expected f32, f16, bf16 or gguf"),
        })
    }
}

pub enum Source {
    Safetensors {
        st: MmapedSafetensors,
        files: Vec<PathBuf>,
        /// `model.` for plain causal LMs, `model.language_model.` for transformers-5 VLMs, ...
        prefix: String,
    },
    Gguf {
        content: gguf_file::Content,
        file: std::sync::Mutex<std::fs::File>,
        path: PathBuf,
        /// Undo llama.cpp's Q/K row permutation (llama architecture only).
        unpermute: Option<(usize, usize)>,
        post_norms: bool,
    },
}

pub struct Weights {
    pub source: Source,
    pub device: Device,
    pub dtype: WeightDType,
    /// Appended to shape errors: which model/config the shapes came from.
    pub hint: String,
}

pub(crate) fn safetensor_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&index)?)
            .with_context(|| format!("{}: not valid JSON", index.display()))?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .with_context(|| format!("{}: missing object `weight_map`", index.display()))?;
        let mut files: Vec<String> = map.values().filter_map(|f| f.as_str().map(String::from)).collect();
        files.sort();
        files.dedup();
        return Ok(files.into_iter().map(|f| dir.join(f)).collect());
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading model directory {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        bail!("{}: no *.safetensors files (looked for model.safetensors.index.json and *.safetensors)", dir.display());
    }
    Ok(files)
}

impl Weights {
    pub fn from_safetensors_dir(dir: &Path, device: &Device, dtype: WeightDType) -> Result<Self> {
        if dtype == WeightDType::Gguf {
            bail!("--dtype gguf needs a GGUF file; {} is a safetensors checkpoint", dir.display());
        }
        let files = safetensor_files(dir)?;
        // SAFETY: the files are memory-mapped read-only; modifying them while loading is UB we accept
        // like every other mmap-based loader.
        let st = unsafe { MmapedSafetensors::multi(&files) }
            .with_context(|| format!("opening safetensors in {}", dir.display()))?;
        let names: Vec<String> = st.tensors().into_iter().map(|(n, _)| n).collect();
        let prefix = ["model.", "model.language_model.", "language_model.model.", ""]
            .into_iter()
            // A pipeline stage may hold no embedding: its layers or final norm name the prefix.
            .find(|p| {
                names.iter().any(|n| n == &format!("{p}embed_tokens.weight") || n == &format!("{p}norm.weight"))
                    || names.iter().any(|n| n.strip_prefix(p).is_some_and(|r| r.starts_with("layers.")))
            })
            .with_context(|| {
                format!(
                    "{}: no embedding tensor (looked for model.embed_tokens.weight, \
                     model.language_model.embed_tokens.weight, language_model.model.embed_tokens.weight)",
                    dir.display()
                )
            })?
            .to_string();
        Ok(Self {
            source: Source::Safetensors { st, files, prefix },
            device: device.clone(),
            dtype,
            hint: String::new(),
        })
    }

    pub fn from_gguf(path: &Path, content: gguf_file::Content, device: &Device, dtype: WeightDType) -> Result<Self> {
        let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
        Ok(Self {
            source: Source::Gguf {
                content,
                file: std::sync::Mutex::new(file),
                path: path.to_path_buf(),
                unpermute: None,
                post_norms: false,
            },
            device: device.clone(),
            dtype,
            hint: String::new(),
        })
    }

    pub fn files(&self) -> Vec<PathBuf> {
        match &self.source {
            Source::Safetensors { files, .. } => files.clone(),
            Source::Gguf { path, .. } => vec![path.clone()],
        }
    }

    fn display_name(&self, name: Name) -> String {
        match &self.source {
            Source::Safetensors { prefix, .. } => name.hf(prefix),
            Source::Gguf { post_norms, .. } => name.gguf(*post_norms),
        }
    }

    pub fn has(&self, name: Name) -> bool {
        match &self.source {
            Source::Safetensors { st, prefix, .. } => st.get(&name.hf(prefix)).is_ok(),
            Source::Gguf { content, post_norms, .. } => content.tensor_infos.contains_key(&name.gguf(*post_norms)),
        }
    }

    fn shape_error(&self, name: Name, expected: &[usize], found: &[usize]) -> anyhow::Error {
        let file = self.files().first().map(|p| p.display().to_string()).unwrap_or_default();
        anyhow::anyhow!(
            "tensor `{}` in {file}: expected shape {expected:?} from the config{}, found {found:?}. \
             The checkpoint does not fit its config: check the model id and architecture \
             (e.g. a Qwen2.5-VL checkpoint loaded as Qwen2-VL, or a 1.5B config with 0.5B weights)",
            self.display_name(name),
            self.hint
        )
    }

    fn missing(&self, name: Name) -> anyhow::Error {
        let file = self.files().first().map(|p| p.display().to_string()).unwrap_or_default();
        anyhow::anyhow!("tensor `{}` not found in {file}{}", self.display_name(name), self.hint)
    }

    /// GGUF stores matrices as `[out, in]` in ggml order, which candle exposes as `[out, in]`.
    fn gguf_qtensor(&self, name: Name) -> Result<QTensor> {
        let Source::Gguf { content, file, post_norms, .. } = &self.source else { unreachable!() };
        let n = name.gguf(*post_norms);
        if !content.tensor_infos.contains_key(&n) {
            return Err(self.missing(name));
        }
        let mut f = file.lock().map_err(|_| anyhow::anyhow!("GGUF file lock poisoned"))?;
        // Quantized tensors live on the CPU first; moved to the device after any row permutation.
        content.tensor(&mut *f, &n, &Device::Cpu).with_context(|| {
            let path = self.files().first().map(|p| p.display().to_string()).unwrap_or_default();
            format!("{path}: reading tensor `{n}` (a truncated or corrupt GGUF file? re-run ./scripts/setup.sh)")
        })
    }

    /// Loads a dense tensor in f32 with the given expected shape.
    pub fn dense_f32(&self, name: Name, shape: &[usize]) -> Result<Tensor> {
        let t = match &self.source {
            Source::Safetensors { st, prefix, .. } => {
                let n = name.hf(prefix);
                let view = st.get(&n).map_err(|_| self.missing(name))?;
                if view.shape() != shape {
                    return Err(self.shape_error(name, shape, view.shape()));
                }
                st.load(&n, &self.device)?.to_dtype(DType::F32)?
            }
            Source::Gguf { .. } => {
                let q = self.gguf_qtensor(name)?;
                if q.shape().dims() != shape {
                    return Err(self.shape_error(name, shape, q.shape().dims()));
                }
                let q = self.unpermute_q(name, q)?;
                q.dequantize(&self.device)?
            }
        };
        Ok(t)
    }

    /// Norm weights and biases: always f32 (norms are computed in f32, as transformers does).
    pub fn vector(&self, name: Name, n: usize) -> Result<Tensor> {
        self.dense_f32(name, &[n])
    }

    pub fn linear(&self, name: Name, out_dim: usize, in_dim: usize) -> Result<Linear> {
        match (&self.source, self.dtype) {
            (Source::Gguf { .. }, WeightDType::Gguf) => {
                let q = self.gguf_qtensor(name)?;
                let expected = [out_dim, in_dim];
                if q.shape().dims() != expected {
                    return Err(self.shape_error(name, &expected, q.shape().dims()));
                }
                let q = self.unpermute_q(name, q)?;
                if self.device.is_cpu() {
                    // Every CPU path is one batch-invariant kernel for any row count.
                    if in_dim.is_multiple_of(super::q8::BLOCK) && takes_q8(q.dtype()) {
                        let w = q.dequantize(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?;
                        return Ok(Linear::Q8(Arc::new(Q8Matrix::quantize(&w, out_dim, in_dim)?)));
                    }
                    // Float matrices (and block types our kernel cannot take at this size) run
                    // dequantized through the dense kernel.
                    return Ok(Linear::Dense(q.dequantize(&Device::Cpu)?));
                }
                // Re-upload the raw blocks to the target device.
                let data = q.data()?.into_owned();
                let storage = candle_core::quantized::QStorage::from_data(
                    std::borrow::Cow::Owned(data),
                    &self.device,
                    q.dtype(),
                )?;
                let q = QTensor::new(storage, q.shape().clone())?;
                Ok(Linear::Quant(QMatMul::from_arc(Arc::new(q))?))
            }
            _ => {
                let w = self.dense_f32(name, &[out_dim, in_dim])?;
                Ok(Linear::Dense(w.to_dtype(self.dtype.compute())?))
            }
        }
    }

    /// Rows of Q/K were permuted by llama.cpp's converter for the llama architecture so that
    /// ggml's interleaved RoPE applies; undo it so the half-split (transformers) RoPE is right.
    /// Rows are whole quantization blocks, so the permutation is exact on quantized data.
    fn unpermute_q(&self, name: Name, q: QTensor) -> Result<QTensor> {
        let Source::Gguf { unpermute: Some((n_head, n_kv_head)), .. } = &self.source else {
            return Ok(q);
        };
        let heads = match name {
            Name::Layer(_, LayerTensor::Q) | Name::Layer(_, LayerTensor::QBias) => *n_head,
            Name::Layer(_, LayerTensor::K) | Name::Layer(_, LayerTensor::KBias) => *n_kv_head,
            _ => return Ok(q),
        };
        let dims = q.shape().dims().to_vec();
        let rows = dims[0];
        let row_elems: usize = dims[1..].iter().product();
        let dtype = q.dtype();
        let row_bytes = row_elems / dtype.block_size() * dtype.type_size();
        let data = q.data()?;
        if data.len() != rows * row_bytes {
            bail!(
                "{}: unexpected byte size {} for {rows} rows of {row_bytes} bytes",
                self.display_name(name),
                data.len()
            );
        }
        let hd = rows / heads;
        let half = hd / 2;
        let mut out = vec![0u8; data.len()];
        for h in 0..heads {
            for j in 0..2 {
                for i in 0..half {
                    let hf_row = h * hd + j * half + i;
                    let gg_row = h * hd + 2 * i + j;
                    out[hf_row * row_bytes..(hf_row + 1) * row_bytes]
                        .copy_from_slice(&data[gg_row * row_bytes..(gg_row + 1) * row_bytes]);
                }
            }
        }
        let storage = candle_core::quantized::QStorage::from_data(std::borrow::Cow::Owned(out), &Device::Cpu, dtype)?;
        Ok(QTensor::new(storage, q.shape().clone())?)
    }

    pub fn set_unpermute(&mut self, n_head: usize, n_kv_head: usize) {
        if let Source::Gguf { unpermute, .. } = &mut self.source {
            *unpermute = Some((n_head, n_kv_head));
        }
    }

    pub fn set_post_norms(&mut self, on: bool) {
        if let Source::Gguf { post_norms, .. } = &mut self.source {
            *post_norms = on;
        }
    }
}

/// A cheap identity for weights: sha256 over each file's size and its first and last 4 MiB.
/// Hashing whole checkpoints costs seconds per load; this still changes with any re-export.
pub fn fingerprint(files: &[PathBuf]) -> Result<String> {
    use sha2::{Digest, Sha256};
    use std::io::{Read, Seek, SeekFrom};
    const CHUNK: u64 = 4 << 20;
    let mut h = Sha256::new();
    for path in files {
        let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let len = f.metadata()?.len();
        h.update(len.to_le_bytes());
        let mut buf = Vec::new();
        (&mut f).take(CHUNK).read_to_end(&mut buf)?;
        h.update(&buf);
        if len > 2 * CHUNK {
            f.seek(SeekFrom::Start(len - CHUNK))?;
            buf.clear();
            f.take(CHUNK).read_to_end(&mut buf)?;
            h.update(&buf);
        }
    }
    Ok(hex::encode(&h.finalize()[..8]))
}
