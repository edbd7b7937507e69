//! The `run` subcommand: loads the model (a text decoder, or Qwen2-VL for `--vlm`), then the one
//! pipeline of [`super::evaluate`]: the steering vector from MiniWoB training episodes, paired
//! baseline/steered episodes, resumably, one result line per episode, and the summary.
use super::config::{ExperimentFile, LayerSpec};
use super::evaluate::execute;
use super::settings::{RunArgs, Settings};
use super::summary::{print_summary, print_table, Summary};
use crate::interp::readout::LensProbe;
use crate::models::cli::parse_device;
use crate::models::hooks::HookPoint;
use crate::models::load::{LoadedModel, ModelInfo};
use crate::models::qwen2_vl::{is_vlm_model, Qwen2Vl};
use crate::models::registry;
use anyhow::{bail, Context, Result};
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
    let device = parse_device(&s.device)?;
    if vlm || is_vlm_model(&s.model) {
        if !is_vlm_model(&s.model) {
            bail!(
                "--vlm needs a vision-language model (--model qwen-vl-2b or a Qwen2-VL directory); `{}` is not one",
                s.model
            );
        }
        let model = Arc::new(Qwen2Vl::load(&s.model, &device, s.dtype)?);
        let probe = lens.map(|(dir, l)| lens_probe(dir, l, s, &model.info)).transpose()?;
        execute(s, model, vector_cache, progress, probe)
    } else {
        if lens.is_some() {
            bail!("--lens reads vision tokens: it needs --vlm and a Qwen2-VL model");
        }
        let model = Arc::new(LoadedModel::load(&s.model, &device, s.dtype)?);
        execute(s, model, vector_cache, progress, None)
    }
}

/// The `run` subcommand.
pub fn run(a: RunArgs) -> Result<()> {
    if a.print_sweep {
        return sweep(&a);
    }
    if !a.print_table.is_empty() {
        return print_table(&a.print_table);
    }
    let s = Settings::resolve(&a)?;
    let lens = a.lens.as_deref().map(|p| (p, a.lens_layer));
    let summary = run_settings(&s, a.vlm, a.vector_cache.as_deref(), !a.no_progress, lens)?;
    print_summary(&summary);
    if let Some(p) = &a.summary_json {
        std::fs::write(p, serde_json::to_string_pretty(&summary)? + "\n")
            .with_context(|| format!("writing {}", p.display()))?;
    }
    if summary.failed_pairs > 0 {
        bail!("{} (task, seed) pairs failed (see the log); rerun the same command to retry them", summary.failed_pairs);
    }
    Ok(())
}

fn sweep(a: &RunArgs) -> Result<()> {
    let f = ExperimentFile::load(a.experiment.as_deref().context("--print-sweep needs --experiment")?)?;
    let layers: Vec<LayerSpec> =
        if f.layers.is_empty() { vec![LayerSpec::Name("auto".into())] } else { f.layers.clone() };
    for (models, modality) in [(&f.models, "text"), (&f.vlm_models, "vlm")] {
        for m in models {
            for l in &layers {
                println!("{m}\t{l}\t{modality}");
            }
        }
    }
    Ok(())
}
