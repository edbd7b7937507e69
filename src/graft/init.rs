//! `graft init`: a hybrid directory from a Qwen2.5-VL checkpoint (its vision tower) and a
//! language model checkpoint (Qwen3 or any decoder family of `models::config`).
use super::{Adapter, AdapterInfo, GraftConfig, SourceInfo, ADAPTER_FILE, FORMAT, IMAGE_PAD, VISION_END, VISION_START};
use crate::models::config::DecoderConfig;
use crate::models::qwen2_5_vl::Qwen25VisionConfig;
use crate::models::tokenizer::Tokenizer;
use crate::models::weights::{fingerprint, safetensor_files};
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use std::path::{Path, PathBuf};

/// How the adapter starts: PyTorch `nn.Linear`'s default bound for the weight, a zero bias.
pub const INIT: &str =
    "weight ~ U(-1/sqrt(in), 1/sqrt(in)) from rand's StdRng seeded with `seed` (row-major), bias = 0";

#[derive(Debug, Clone)]
pub struct InitOptions {
    pub vision: PathBuf,
    pub lm: PathBuf,
    pub out: PathBuf,
    pub seed: u64,
    /// Overwrite an existing hybrid in `out`.
    pub force: bool,
}

fn model_type(dir: &Path) -> Result<String> {
    let p = dir.join("config.json");
    let v: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(&p).with_context(|| format!("reading model config {}", p.display()))?,
    )
    .with_context(|| format!("{}: not valid JSON", p.display()))?;
    Ok(v.get("model_type").and_then(|m| m.as_str()).unwrap_or("").to_string())
}

/// The adapter's initial weights (deterministic in `seed`).
pub fn init_adapter(in_features: usize, out_features: usize, seed: u64) -> Result<Adapter> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let a = 1.0 / (in_features as f32).sqrt();
    let w: Vec<f32> = (0..in_features * out_features).map(|_| rng.random_range(-a..a)).collect();
    Ok(Adapter {
        weight: Tensor::from_vec(w, (out_features, in_features), &Device::Cpu)?,
        bias: Tensor::zeros(out_features, candle_core::DType::F32, &Device::Cpu)?,
    })
}

/// Writes the hybrid; returns its config.
pub fn init(o: &InitOptions) -> Result<GraftConfig> {
    let vision_dir = o.vision.canonicalize().with_context(|| format!("vision checkpoint {}", o.vision.display()))?;
    let lm_dir = o.lm.canonicalize().with_context(|| format!("language model checkpoint {}", o.lm.display()))?;
    let vcfg = Qwen25VisionConfig::from_file(&vision_dir.join("config.json"))?;
    let lcfg = DecoderConfig::from_file(&lm_dir.join("config.json"))?;
    let tok = Tokenizer::from_dir(&lm_dir).with_context(|| format!("loading the tokenizer of {}", lm_dir.display()))?;
    let missing: Vec<&str> =
        [VISION_START, IMAGE_PAD, VISION_END].into_iter().filter(|t| tok.token_to_id(t).is_none()).collect();
    if !missing.is_empty() {
        bail!(
            "{}: the language model's vocabulary has no {} token(s). The hybrid marks the image with \
             {VISION_START} {IMAGE_PAD}… {VISION_END} from the LM's own vocabulary (Qwen2.5 and Qwen3 tokenizers have \
             them); choose an LM whose tokenizer.json defines them",
            lm_dir.join("tokenizer.json").display(),
            missing.join(", ")
        );
    }
    let id = |t: &str| tok.token_to_id(t).expect("checked above");
    for t in [VISION_START, IMAGE_PAD, VISION_END] {
        if id(t) as usize >= lcfg.vocab_size {
            bail!(
                "{}: token {t} has id {}, outside the embedding table (vocab_size {})",
                lm_dir.display(),
                id(t),
                lcfg.vocab_size
            );
        }
    }
    if o.out.join(super::GRAFT_FILE).exists() && !o.force {
        bail!("{} already holds a hybrid (graft.json); pass --force to overwrite it", o.out.display());
    }
    std::fs::create_dir_all(&o.out).with_context(|| format!("creating {}", o.out.display()))?;
    let (inf, outf) = (vcfg.out_hidden_size, lcfg.hidden_size);
    let adapter = init_adapter(inf, outf, o.seed)?;
    adapter.save(
        &o.out.join(ADAPTER_FILE),
        &[("init", INIT.to_string()), ("seed", o.seed.to_string()), ("step", "0".to_string())],
    )?;
    for f in ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "chat_template.json"] {
        if lm_dir.join(f).exists() {
            std::fs::copy(lm_dir.join(f), o.out.join(f)).with_context(|| format!("copying {f}"))?;
        }
    }
    if vision_dir.join("preprocessor_config.json").exists() {
        std::fs::copy(vision_dir.join("preprocessor_config.json"), o.out.join("preprocessor_config.json"))?;
    }
    let cfg = GraftConfig {
        format: FORMAT.to_string(),
        vision: SourceInfo {
            weights_hash: fingerprint(&safetensor_files(&vision_dir)?)?,
            model_type: model_type(&vision_dir)?,
            width: inf,
            dir: vision_dir,
        },
        lm: SourceInfo {
            weights_hash: fingerprint(&safetensor_files(&lm_dir)?)?,
            model_type: model_type(&lm_dir)?,
            width: outf,
            dir: lm_dir,
        },
        adapter: AdapterInfo { in_features: inf, out_features: outf, init: INIT.to_string(), seed: o.seed },
        image_token_id: id(IMAGE_PAD),
        vision_start_token_id: id(VISION_START),
        vision_end_token_id: id(VISION_END),
        training: None,
    };
    cfg.write(&o.out)?;
    tracing::info!(out = %o.out.display(), adapter = %format!("{inf} -> {outf}"), "graft initialised");
    Ok(cfg)
}
