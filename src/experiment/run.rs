//! `run`: loads the model (a text decoder, or Qwen2-VL for `--vlm`), then the one
//! pipeline of [`super::evaluate`]: the steering vector from MiniWoB training episodes, paired
//! baseline/steered episodes, resumably, one result line per episode, and the summary.
use super::evaluate::{execute, preflight};
use super::settings::Settings;
use super::summary::Summary;
use crate::device::parse_device;
use crate::interp::readout::LensProbe;
use crate::models::hooks::HookPoint;
use crate::models::load::{LoadedModel, ModelInfo};
use crate::models::qwen2_vl::{is_vlm_model, Qwen2Vl};
use crate::models::registry;
use anyhow::{bail, Result};
use std::path::Path;
use std::sync::{Arc, Mutex};

/// `--lens IDX --lens-layer L`: the contextual index, checked against the model.
fn lens_probe(dir: &Path, layer: Option<usize>, s: &Settings, info: &ModelInfo) -> Result<LensProbe> {
    let n = info.num_layers;
    let steer = if s.base_only && s.vector.is_none() { None } else { Some(registry::parse_layer(&s.layer, n)?) };
    let l = layer.or(steer).unwrap_or(n / 2);
    if l >= n {
        bail!("--lens-layer {l}: the model has {n} layers (0..{})", n - 1);
    }
    let index = crate::interp::index::Index::open(dir)?;
    if index.meta.hidden != info.hidden_size {
        bail!(
            "--lens {}: the index has {} features, {} has {} (an index of another model)",
            dir.display(),
            index.meta.hidden,
            info.name,
            info.hidden_size
        );
    }
    tracing::info!("lens read-out at {} against {}", HookPoint::ResidPost(l), dir.display());
    Ok(LensProbe { index: Mutex::new(index), layer: l, k: 3 })
}

/// Loads the model `s` names and runs its plan: the text decoder, or Qwen2-VL when `vlm` (or
/// when the model is one).
pub fn run_settings(
    s: &Settings,
    vlm: bool,
    vector_cache: Option<&Path>,
    progress: bool,
    lens: Option<(&Path, Option<usize>)>,
) -> Result<Summary> {
    let given = preflight(s)?;
    let device = parse_device(&s.device)?;
    // A graft directory (`graft init`): Qwen2.5-VL's tower and an adapter on another LM.
    if crate::graft::is_graft_dir(Path::new(&s.model)) {
        let mut model = crate::graft::Hybrid::load(Path::new(&s.model), &device, s.dtype)?;
        if let Some(a) = &s.adapter {
            crate::models::load::apply_adapter(&mut model.decoder, &mut model.info, a)?;
        }
        let model = Arc::new(model);
        let probe = lens.map(|(dir, l)| lens_probe(dir, l, s, &model.info)).transpose()?;
        return execute(s, model, given, vector_cache, progress, probe);
    }
    if vlm || is_vlm_model(&s.model) {
        if !is_vlm_model(&s.model) {
            bail!(
                "--vlm needs a vision-language model (--model qwen-vl-2b or a Qwen2-VL directory); `{}` is not one",
                s.model
            );
        }
        let mut model = Qwen2Vl::load(&s.model, &device, s.dtype)?;
        if let Some(a) = &s.adapter {
            crate::models::load::apply_adapter(&mut model.decoder, &mut model.info, a)?;
        }
        let model = Arc::new(model);
        let probe = lens.map(|(dir, l)| lens_probe(dir, l, s, &model.info)).transpose()?;
        execute(s, model, given, vector_cache, progress, probe)
    } else {
        if lens.is_some() {
            bail!("--lens reads vision tokens: it needs --vlm and a Qwen2-VL model");
        }
        let model = Arc::new(LoadedModel::load(&s.model, &device, s.dtype)?.with_adapter(s.adapter.as_deref())?);
        execute(s, model, given, vector_cache, progress, None)
    }
}
