//! `models`, `generate` and `extract` subcommands.
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use miniwob_steer::device::parse_device;
use miniwob_steer::models::dtype::DTypeChoice;
use miniwob_steer::models::generate::{self, GenerateConfig, Sampling};
use miniwob_steer::models::hooks::{HookPoint, HookSpec, Positions};
pub use miniwob_steer::models::load::render_prompt;
use miniwob_steer::models::load::LoadedModel;
use miniwob_steer::models::registry::{self, REGISTRY};
use miniwob_steer::steering::vector::SteeringVector;
use std::collections::HashMap;
use std::path::PathBuf;

#[derive(clap::Args, Debug, Clone)]
pub struct ModelArgs {
    /// Registry alias, transformers checkpoint directory, or .gguf file.
    #[arg(long, default_value = registry::DEFAULT_MODEL)]
    pub model: String,
    /// Weight dtype: auto (bf16 on a GPU; on the CPU gguf for a GGUF checkpoint, else f32), f32
    /// (dequantized reference path), f16, bf16, or gguf (keep quantized).
    #[arg(long, default_value = "auto")]
    pub dtype: DTypeChoice,
    /// cpu, cuda, cuda:N or auto (the GPU when this binary has CUDA and one is visible).
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// A peft LoRA adapter (`[NAME=]DIR` holding adapter_config.json and
    /// adapter_model.safetensors) applied to every row, unmerged.
    #[arg(long)]
    pub adapter: Option<String>,
    /// Pipeline stages (`stage serve` addresses, in order) instead of a local model: the model
    /// is the one they were split from (docs/stages.md).
    #[arg(long, conflicts_with = "model")]
    pub stages: Option<String>,
}

impl ModelArgs {
    /// The model spec: `--model`, or `stages:ADDR,…` with `--stages`.
    pub fn spec(&self) -> String {
        match &self.stages {
            Some(s) => format!("{}{s}", miniwob_steer::stage::client::SCHEME),
            None => self.model.clone(),
        }
    }

    /// A text model, or a Qwen2-VL with its vision tower.
    pub fn load_any(&self) -> Result<miniwob_steer::models::load::Loaded> {
        use miniwob_steer::models::load::{apply_adapter, Loaded};
        let path = std::path::Path::new(&self.model);
        let mut m = if miniwob_steer::graft::is_graft_dir(path) {
            // A graft directory's text backbone is its LM, unchanged by the graft: what the lenses
            // and text prompts read (its screenshots go through `extract`'s hybrid path).
            let lm = miniwob_steer::graft::GraftConfig::read(path)?.lm.dir;
            tracing::info!("{}: a graft directory; its language model is {}", path.display(), lm.display());
            let spec = lm.display().to_string();
            Loaded::load(&spec, &parse_device(&self.device)?, self.dtype)?
        } else {
            Loaded::load(&self.spec(), &parse_device(&self.device)?, self.dtype)?
        };
        if let Some(a) = &self.adapter {
            match &mut m {
                Loaded::Text(t) => apply_adapter(&mut t.decoder, &mut t.info, a)?,
                Loaded::Vlm(v) => apply_adapter(&mut v.decoder, &mut v.info, a)?,
            }
        }
        Ok(m)
    }

    pub fn load(&self) -> Result<LoadedModel> {
        let device = parse_device(&self.device)?;
        LoadedModel::load(&self.spec(), &device, self.dtype.resolve_for(&device, &self.model))?
            .with_adapter(self.adapter.as_deref())
    }
}

#[derive(clap::Args, Debug)]
pub struct ModelsArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub fn run_models(a: ModelsArgs) -> Result<()> {
    if a.json {
        let rows: Vec<_> = REGISTRY
            .iter()
            .map(|e| {
                serde_json::json!({
                    "alias": e.alias, "checkpoint": e.checkpoint, "family": e.family, "params": e.params,
                    "layers": e.layers, "auto_layer": e.auto_layer(),
                    "modality": format!("{:?}", e.modality).to_lowercase(),
                    "installed": registry::resolve(e.alias).is_ok(),
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!("| alias | checkpoint | family | params | layers | auto layer | modality | available here |");
    println!("|---|---|---|---|---|---|---|---|");
    for e in REGISTRY {
        let default = if e.alias == registry::DEFAULT_MODEL { " (default)" } else { "" };
        println!(
            "| {}{default} | {} | {} | {} | {} | {} | {:?} | {} |",
            e.alias,
            e.checkpoint,
            e.family,
            e.params,
            e.layers,
            e.auto_layer(),
            e.modality,
            if registry::resolve(e.alias).is_ok() { "yes" } else { "no" }
        );
    }
    Ok(())
}

#[derive(clap::Args, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[arg(long)]
    pub prompt: String,
    /// Wrap the prompt as a user message in the model's chat template.
    #[arg(long)]
    pub chat: bool,
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
    /// Sampling seed (with --temperature > 0).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    /// Steering vector file (safetensors with `layer.{i}` tensors).
    #[arg(long)]
    pub vector: Option<PathBuf>,
    /// Layer to steer: auto (50% depth) or an index.
    #[arg(long, default_value = "auto")]
    pub layer: String,
    /// Steering coefficients; several values generate one row each in one batch.
    #[arg(long, value_delimiter = ',', default_value = "4")]
    pub coeff: Vec<f32>,
    /// Positions to steer: last, all, prompt, generated.
    #[arg(long, default_value = "last")]
    pub positions: Positions,
    /// Use a vector computed on other weights of the same shape (e.g. another quantization).
    #[arg(long)]
    pub allow_foreign_vector: bool,
    /// Also generate an unsteered baseline row in the same batch.
    #[arg(long)]
    pub with_baseline: bool,
    /// One JSON object per row instead of text.
    #[arg(long)]
    pub json: bool,
}

pub fn run_generate(a: GenerateArgs) -> Result<()> {
    // Read and checked before the model loads: a bad file fails at once.
    let vector = a.vector.as_deref().map(SteeringVector::load).transpose()?;
    if let Some(c) = a.coeff.iter().find(|c| !c.is_finite()) {
        bail!("--coeff {c}: coefficients must be finite");
    }
    let m = a.model.load()?;
    let text = render_prompt(&m, &a.prompt, a.chat)?;
    let ids = m.tokenizer.encode(&text, !a.chat)?;
    let mut coeffs: Vec<f32> = Vec::new();
    let mut spec = HookSpec::none();
    let mut layer = None;
    if let (Some(path), Some(sv)) = (&a.vector, &vector) {
        let ctx = || format!("--vector {}", path.display());
        sv.check_model(&m.info, a.allow_foreign_vector).with_context(ctx)?;
        let l = registry::parse_layer(&a.layer, m.decoder.cfg.num_layers)?;
        let v = sv.layer(l).with_context(ctx)?.clone();
        if a.with_baseline {
            coeffs.push(0.0);
        }
        coeffs.extend(&a.coeff);
        spec = spec.add(HookPoint::ResidPost(l), v, coeffs.clone(), a.positions);
        layer = Some(l);
    } else {
        coeffs.push(0.0);
    }
    let prompts = vec![ids.clone(); coeffs.len()];
    let cfg = GenerateConfig {
        max_new_tokens: a.max_new_tokens,
        sampling: if a.temperature > 0.0 {
            Sampling::Sample { temperature: a.temperature, top_p: a.top_p }
        } else {
            Sampling::Greedy
        },
        seed: a.seed,
        stop_ids: m.tokenizer.stop_token_ids(),
        pad_id: m.tokenizer.pad_token_id().unwrap_or(0),
        ..Default::default()
    };
    let t0 = std::time::Instant::now();
    let out = generate::generate(&m.decoder, &prompts, &cfg, &spec, &mut Default::default())?;
    let secs = t0.elapsed().as_secs_f64();
    for (g, c) in out.iter().zip(&coeffs) {
        let text = m.tokenizer.decode(&g.tokens, true)?;
        if a.json {
            println!(
                "{}",
                serde_json::json!({
                    "model": m.info.name, "weights_hash": m.info.weights_hash, "dtype": m.info.dtype, "adapter": m.info.adapter,
                    "hook_point": layer.map(|l| HookPoint::ResidPost(l).to_string()),
                    "coeff": c, "positions": a.positions.to_string(), "seed": a.seed,
                    "prompt_tokens": g.prompt_tokens, "tokens": g.tokens, "stopped": g.stop.is_some(), "text": text,
                })
            );
        } else {
            match layer {
                Some(l) => println!("--- {} coeff {c} ---", HookPoint::ResidPost(l)),
                None => println!("---"),
            }
            println!("{text}");
        }
    }
    let new: usize = out.iter().map(|g| g.tokens.len()).sum();
    tracing::info!("{} rows, {new} new tokens in {secs:.2}s", out.len());
    Ok(())
}

#[derive(clap::Args, Debug)]
pub struct ExtractArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// One prompt.
    #[arg(long, conflicts_with = "prompts_file")]
    pub prompt: Option<String>,
    /// Prompts, one per line (plain text, or JSON objects with a `text` field).
    #[arg(long)]
    pub prompts_file: Option<PathBuf>,
    #[arg(long)]
    pub chat: bool,
    /// `all` or a comma-separated list of layer indices.
    #[arg(long, default_value = "all")]
    pub layers: String,
    #[arg(long)]
    pub out: PathBuf,
}

pub fn parse_layers(spec: &str, n: usize) -> Result<Vec<usize>> {
    if spec == "all" {
        return Ok((0..n).collect());
    }
    spec.split(',').map(|s| registry::parse_layer(s.trim(), n)).collect()
}

fn read_prompts(path: &std::path::Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading prompts file {}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        if line.trim_start().starts_with('{') {
            let v: serde_json::Value =
                serde_json::from_str(line).with_context(|| format!("{}:{}: invalid JSON", path.display(), i + 1))?;
            let t =
                v.get("text").or_else(|| v.get("prompt")).and_then(|t| t.as_str()).with_context(|| {
                    format!("{}:{}: JSON line without a string field `text`", path.display(), i + 1)
                })?;
            out.push(t.to_string());
        } else {
            out.push(line.to_string());
        }
    }
    if out.is_empty() {
        bail!("{}: no prompts", path.display());
    }
    Ok(out)
}

pub fn run_extract(a: ExtractArgs) -> Result<()> {
    let prompts = match (&a.prompt, &a.prompts_file) {
        (Some(p), None) => vec![p.clone()],
        (None, Some(f)) => read_prompts(f)?,
        _ => bail!("give --prompt TEXT or --prompts-file FILE"),
    };
    let m = a.model.load()?;
    let layers = parse_layers(&a.layers, m.decoder.cfg.num_layers)?;
    let mut spec = HookSpec::none().capture(HookPoint::FinalNorm);
    for &l in &layers {
        spec = spec.capture(HookPoint::ResidPost(l));
    }
    let ids: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| {
            let text = render_prompt(&m, p, a.chat)?;
            m.tokenizer.encode(&text, !a.chat)
        })
        .collect::<Result<_>>()?;
    let pad_id = m.tokenizer.pad_token_id().unwrap_or(0);
    let (logits, caps, pads) = generate::prefill(&m.decoder, &ids, pad_id, &spec)?;
    let mut out: HashMap<String, Tensor> = HashMap::new();
    for &l in &layers {
        let p = HookPoint::ResidPost(l);
        out.insert(p.to_string(), caps.get(p)?);
    }
    out.insert(HookPoint::FinalNorm.to_string(), caps.get(HookPoint::FinalNorm)?);
    out.insert("logits_last".into(), logits);
    let (ids_t, _) = generate::left_pad(&ids, pad_id, &Device::Cpu)?;
    out.insert("input_ids".into(), ids_t.to_dtype(DType::I64)?);
    out.insert(
        "left_pad".into(),
        Tensor::from_vec(pads.iter().map(|&p| p as i64).collect::<Vec<_>>(), pads.len(), &Device::Cpu)?,
    );
    let meta: HashMap<String, String> = [
        ("model", m.info.name.clone()),
        ("checkpoint", m.info.checkpoint.clone()),
        ("weights_hash", m.info.weights_hash.clone()),
        ("dtype", m.info.dtype.clone()),
        ("chat", a.chat.to_string()),
        ("prompts", serde_json::to_string(&prompts)?),
        (
            "note",
            "blocks.{i}.hook_resid_post = output of decoder layer i = transformers hidden_states[i+1]; rows are left-padded (see left_pad)".into(),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    miniwob_steer::util::save_safetensors(&out, &meta, &a.out)?;
    eprintln!("wrote {} ({} prompts, layers {:?})", a.out.display(), prompts.len(), layers);
    Ok(())
}
