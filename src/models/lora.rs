//! PEFT LoRA adapters on the shared decoder, unmerged and chosen per row.
//!
//! An adapter directory is what `peft` saves: `adapter_config.json` (rank `r`, `lora_alpha`,
//! `target_modules`, …) and `adapter_model.safetensors` with `…layers.{i}.{self_attn|mlp}.
//! {q,k,v,o,gate,up,down}_proj.lora_A.weight` `[r, in]` and `lora_B.weight` `[out, r]`. A
//! targeted projection computes `W·x + s·B·(A·x)` with `s = alpha / r` (`alpha / √r` with
//! rsLoRA), in that order, as peft does. Unmerged, so one batch can hold rows of several adapters
//! and rows of none: each row's state names its adapter ([`super::decoder::State::adapters`]),
//! and a row without one computes exactly the base model's bits.
//!
//! What peft can save but this does not apply is refused with the key or field named (DoRA,
//! trained biases, `modules_to_save`, embedding or LM-head adapters, vision-tower adapters), never
//! silently dropped.
use super::config::DecoderConfig;
use super::weights::{LayerTensor, Linear};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// The projections an adapter may target, in a fixed order (`layers[i][slot]`).
pub const TARGETS: [(LayerTensor, &str); 7] = [
    (LayerTensor::Q, "q_proj"),
    (LayerTensor::K, "k_proj"),
    (LayerTensor::V, "v_proj"),
    (LayerTensor::O, "o_proj"),
    (LayerTensor::Gate, "gate_proj"),
    (LayerTensor::Up, "up_proj"),
    (LayerTensor::Down, "down_proj"),
];

/// Index of a projection in [`TARGETS`].
pub fn slot(t: LayerTensor) -> Option<usize> {
    TARGETS.iter().position(|(x, _)| *x == t)
}

/// One adapted projection: `scale · B · (A · x)`.
#[derive(Debug, Clone)]
pub struct LoraPair {
    pub a: Linear,
    pub b: Linear,
    pub rank: usize,
    pub scale: f64,
}

impl LoraPair {
    /// The update `scale · B(A x)` for inputs `[.., in]`.
    pub fn delta(&self, xs: &Tensor) -> Result<Tensor> {
        Ok((self.b.forward(&self.a.forward(xs)?)? * self.scale)?)
    }
}

#[derive(Debug, Clone)]
pub struct LoraAdapter {
    /// What rows and result lines call it (`NAME=DIR`, else the directory's name).
    pub name: String,
    pub dir: PathBuf,
    /// Fingerprint of the config and the weights.
    pub hash: String,
    /// `base_model_name_or_path` from the config, for the record.
    pub base_model: Option<String>,
    /// Per decoder layer, per [`TARGETS`] slot.
    pub layers: Vec<[Option<LoraPair>; 7]>,
}

/// peft's `(.*\.)?{pattern}$` on a module name, for literal patterns (what peft writes itself).
fn pattern_matches(pattern: &str, module: &str) -> bool {
    module == pattern || module.ends_with(&format!(".{pattern}"))
}

/// A `rank_pattern` / `alpha_pattern` value for `module` and the key that gave it, if a pattern
/// names it. peft takes the first matching key in file order, which a parsed JSON object does not
/// keep: two patterns that match one module with different values are refused instead.
fn pattern_value(cfg: &Value, field: &str, module: &str, file: &Path) -> Result<Option<(f64, String)>> {
    let Some(map) = cfg.get(field).and_then(|v| v.as_object()) else { return Ok(None) };
    let mut found: Option<(f64, String)> = None;
    for (pat, v) in map {
        if pat.chars().any(|c| "*()[]\\^$|+?{}".contains(c)) {
            bail!(
                "{}: `{field}` key `{pat}` is a regular expression; only literal module names are supported",
                file.display()
            );
        }
        if pattern_matches(pat, module) {
            let n = v.as_f64().with_context(|| format!("{}: `{field}.{pat}` is not a number", file.display()))?;
            match &found {
                Some((m, other)) if *m != n => bail!(
                    "{}: `{other}` and `{field}.{pat}` both match `{module}` with different values; peft would \
                     take the first in file order: keep one",
                    file.display()
                ),
                Some(_) => {}
                None => found = Some((n, format!("{field}.{pat}"))),
            }
        }
    }
    Ok(found)
}

/// `(layer, slot, is_a, module name)` of a peft tensor key, or why it cannot be applied.
fn parse_key(key: &str) -> std::result::Result<(usize, usize, bool, String), String> {
    let lower = key.to_ascii_lowercase();
    if lower.contains("visual.") || lower.contains("vision_tower") || lower.contains("vision_model") {
        return Err("adapts the vision tower, which takes no LoRA here".into());
    }
    let (module, is_a) = if let Some(m) = key.strip_suffix(".lora_A.weight") {
        (m, true)
    } else if let Some(m) = key.strip_suffix(".lora_B.weight") {
        (m, false)
    } else if key.contains("lora_magnitude_vector") {
        return Err("is a DoRA magnitude, which is not supported".into());
    } else if key.contains("lora_embedding") {
        return Err("adapts the token embedding, which is not supported".into());
    } else {
        return Err("is not a lora_A/lora_B weight of a decoder projection (modules_to_save or a bias?)".into());
    };
    let at = module.rfind("layers.").ok_or("names no decoder layer (`layers.N.`)")?;
    let rest = &module[at + "layers.".len()..];
    let (n, proj) = rest.split_once('.').ok_or("names no projection after the layer")?;
    let layer: usize = n.parse().map_err(|_| format!("layer `{n}` is not a number"))?;
    let proj = proj.rsplit('.').next().unwrap_or(proj);
    let slot = TARGETS
        .iter()
        .position(|(_, name)| *name == proj)
        .ok_or_else(|| format!("targets `{proj}`, expected one of q/k/v/o/gate/up/down_proj"))?;
    Ok((layer, slot, is_a, module.to_string()))
}

/// `[out, in]` of each [`TARGETS`] slot for a decoder.
fn shapes(cfg: &DecoderConfig) -> [(usize, usize); 7] {
    let (h, q, kv, im) =
        (cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.intermediate_size);
    [(q, h), (kv, h), (kv, h), (h, q), (im, h), (im, h), (h, im)]
}

impl LoraAdapter {
    /// Loads a peft adapter directory for a decoder of `cfg`, in the decoder's compute dtype.
    pub fn load(name: &str, dir: &Path, cfg: &DecoderConfig, device: &Device, dtype: DType) -> Result<Self> {
        let cfg_path = dir.join("adapter_config.json");
        let st_path = dir.join("adapter_model.safetensors");
        let text = std::fs::read_to_string(&cfg_path).with_context(|| {
            format!("reading {} (a peft LoRA adapter directory holds adapter_config.json)", cfg_path.display())
        })?;
        let c: Value = serde_json::from_str(&text).with_context(|| format!("parsing {}", cfg_path.display()))?;
        let field = |k: &str| c.get(k).filter(|v| !v.is_null());
        let f = cfg_path.display();
        if let Some(t) = field("peft_type").and_then(|v| v.as_str()) {
            if t != "LORA" {
                bail!("{f}: peft_type is `{t}`, expected LORA");
            }
        }
        if field("use_dora").and_then(|v| v.as_bool()) == Some(true) {
            bail!("{f}: use_dora = true; DoRA adapters are not supported (only plain LoRA)");
        }
        if let Some(b) = field("bias").and_then(|v| v.as_str()) {
            if b != "none" {
                bail!("{f}: bias = `{b}`; adapters that train biases are not supported (expected \"none\")");
            }
        }
        if field("fan_in_fan_out").and_then(|v| v.as_bool()) == Some(true) {
            bail!("{f}: fan_in_fan_out = true (GPT-2 Conv1D layers); these decoders have none");
        }
        if let Some(m) = field("modules_to_save").and_then(|v| v.as_array()).filter(|a| !a.is_empty()) {
            bail!("{f}: modules_to_save = {m:?}; fully trained modules are not supported, only LoRA pairs");
        }
        // LoRA variants peft saves in the same files but computes differently.
        for (k, what) in [
            ("lora_bias", "a trained bias on lora_B"),
            ("use_qalora", "QALoRA"),
            ("use_bdlora", "block-diagonal LoRA"),
            ("layer_replication", "replicated layers"),
            ("alora_invocation_tokens", "activated LoRA (aLoRA)"),
            ("trainable_token_indices", "trainable token embeddings"),
            ("target_parameters", "adapted nn.Parameters"),
            ("arrow_config", "Arrow routing"),
            ("monteclora_config", "MonteCLoRA"),
        ] {
            if let Some(v) =
                field(k).filter(|v| v.as_bool() != Some(false) && v.as_object().is_none_or(|o| !o.is_empty()))
            {
                bail!("{f}: {k} = {v}: {what} is not supported (only plain LoRA)");
            }
        }
        let r = field("r").and_then(|v| v.as_f64()).with_context(|| format!("{f}: no rank `r`"))?;
        let alpha = field("lora_alpha").and_then(|v| v.as_f64()).with_context(|| format!("{f}: no `lora_alpha`"))?;
        let rslora = field("use_rslora").and_then(|v| v.as_bool()).unwrap_or(false);

        let tensors = candle_core::safetensors::load(&st_path, &Device::Cpu)
            .with_context(|| format!("reading {} (safetensors)", st_path.display()))?;
        let want = shapes(cfg);
        let mut halves: Vec<[(Option<Tensor>, Option<Tensor>); 7]> =
            (0..cfg.num_layers).map(|_| Default::default()).collect();
        let mut modules: Vec<[Option<String>; 7]> = vec![Default::default(); cfg.num_layers];
        let mut names: Vec<&String> = tensors.keys().collect();
        names.sort();
        for key in names {
            let (layer, slot, is_a, module) =
                parse_key(key).map_err(|why| anyhow::anyhow!("{}: tensor `{key}` {why}", st_path.display()))?;
            if layer >= cfg.num_layers {
                bail!(
                    "{}: tensor `{key}` is for layer {layer}; the model has {} layers",
                    st_path.display(),
                    cfg.num_layers
                );
            }
            let t = tensors[key].to_dtype(DType::F32)?;
            if let Some(other) = modules[layer][slot].as_ref().filter(|m| **m != module) {
                bail!(
                    "{}: `{other}` and `{module}` both map to layer {layer}'s {} (only the decoder's own layers take adapters)",
                    st_path.display(),
                    TARGETS[slot].1
                );
            }
            let entry = &mut halves[layer][slot];
            if is_a {
                entry.0 = Some(t)
            } else {
                entry.1 = Some(t)
            }
            modules[layer][slot] = Some(module);
        }
        let mut layers: Vec<[Option<LoraPair>; 7]> = (0..cfg.num_layers).map(|_| Default::default()).collect();
        let mut count = 0;
        for (l, row) in halves.into_iter().enumerate() {
            for (s, (a, b)) in row.into_iter().enumerate() {
                let module = modules[l][s].clone().unwrap_or_default();
                let (a, b) = match (a, b) {
                    (None, None) => continue,
                    (Some(a), Some(b)) => (a, b),
                    (a, _) => bail!(
                        "{}: `{module}` has lora_{} but no lora_{}",
                        st_path.display(),
                        if a.is_some() { "A" } else { "B" },
                        if a.is_some() { "B" } else { "A" }
                    ),
                };
                let (out, inp) = want[s];
                let rank = a.dim(0)?;
                if a.dims() != [rank, inp] || b.dims() != [out, rank] {
                    bail!(
                        "{}: `{module}`: lora_A is {:?} and lora_B {:?}, expected [r, {inp}] and [{out}, r] \
                         for this model's {} (an adapter for another model?)",
                        st_path.display(),
                        a.dims(),
                        b.dims(),
                        TARGETS[s].1
                    );
                }
                let (r_cfg, r_field) =
                    pattern_value(&c, "rank_pattern", &module, &cfg_path)?.unwrap_or((r, "r".to_string()));
                if rank as f64 != r_cfg {
                    bail!(
                        "{}: `{module}` has rank {rank}, {} says {r_cfg} (`{r_field}`)",
                        st_path.display(),
                        cfg_path.display()
                    );
                }
                let a_cfg = pattern_value(&c, "alpha_pattern", &module, &cfg_path)?.map_or(alpha, |v| v.0);
                let scale = if rslora { a_cfg / (rank as f64).sqrt() } else { a_cfg / rank as f64 };
                let dense = |t: Tensor| -> Result<Linear> { Ok(Linear::Dense(t.to_dtype(dtype)?.to_device(device)?)) };
                layers[l][s] = Some(LoraPair { a: dense(a)?, b: dense(b)?, rank, scale });
                count += 1;
            }
        }
        if count == 0 {
            bail!("{}: no lora_A/lora_B pairs", st_path.display());
        }
        // Both files whole (an adapter is small; `fingerprint` samples large files).
        let hash = {
            use sha2::Digest;
            let mut h = sha2::Sha256::new();
            for p in [&cfg_path, &st_path] {
                h.update(std::fs::read(p).with_context(|| format!("reading {}", p.display()))?);
            }
            hex::encode(&h.finalize()[..8])
        };
        let base_model = field("base_model_name_or_path").and_then(|v| v.as_str()).map(String::from);
        tracing::info!(adapter = name, modules = count, hash = %hash, "loaded LoRA adapter {}", dir.display());
        Ok(Self { name: name.to_string(), dir: dir.to_path_buf(), hash, base_model, layers })
    }

    /// `name@hash`: what result lines and resume keys record.
    pub fn id(&self) -> String {
        format!("{}@{}", self.name, self.hash)
    }

    pub fn pair(&self, layer: usize, t: LayerTensor) -> Option<&LoraPair> {
        self.layers.get(layer)?[slot(t)?].as_ref()
    }
}

/// `NAME=DIR` or `DIR` (named by its last path component).
pub fn parse_named(spec: &str) -> (String, PathBuf) {
    match spec.split_once('=') {
        Some((n, d)) if !n.is_empty() && !n.contains('/') => (n.to_string(), PathBuf::from(d)),
        _ => {
            let p = PathBuf::from(spec);
            let name = p.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| spec.to_string());
            (name, p)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_parse_or_say_why() {
        let (l, s, a, m) = parse_key("base_model.model.model.layers.3.self_attn.v_proj.lora_A.weight").unwrap();
        assert_eq!((l, s, a), (3, 2, true));
        assert_eq!(m, "base_model.model.model.layers.3.self_attn.v_proj");
        let (l, s, a, _) =
            parse_key("base_model.model.model.language_model.layers.0.mlp.down_proj.lora_B.weight").unwrap();
        assert_eq!((l, s, a), (0, 6, false));
        assert!(parse_key("base_model.model.visual.blocks.0.attn.qkv.lora_A.weight").unwrap_err().contains("vision"));
        assert!(parse_key("base_model.model.lm_head.weight").unwrap_err().contains("modules_to_save"));
        assert!(parse_key("base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector")
            .unwrap_err()
            .contains("DoRA"));
        assert!(parse_key("base_model.model.model.layers.0.self_attn.qkv.lora_A.weight").unwrap_err().contains("qkv"));
    }

    #[test]
    fn patterns_match_on_module_boundaries() {
        assert!(pattern_matches("q_proj", "model.layers.0.self_attn.q_proj"));
        assert!(pattern_matches("layers.0.self_attn.q_proj", "model.layers.0.self_attn.q_proj"));
        assert!(!pattern_matches("0.self_attn.q_proj", "model.layers.10.self_attn.q_proj"));
        assert!(!pattern_matches("q_proj", "model.layers.0.self_attn.kq_proj"));
    }

    #[test]
    fn named_specs() {
        assert_eq!(parse_named("cal=/a/b"), ("cal".to_string(), PathBuf::from("/a/b")));
        assert_eq!(parse_named("/a/calendar"), ("calendar".to_string(), PathBuf::from("/a/calendar")));
    }
}
