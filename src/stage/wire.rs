//! What travels between a driver and its stages: HTTP/1.1 (hyper) request and reply bodies that
//! are safetensors files, the tensors by name and a JSON header in the `__metadata__` map. No
//! framing of our own: a body is a safetensors file any tool can open.
use crate::models::hooks::{AddIntervention, HookPoint, HookSpec, Positions, StepInfo};
use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use std::collections::HashMap;

/// The header's key in the safetensors metadata.
const HEADER: &str = "header";

/// A body: its header and tensors.
pub fn encode<H: Serialize>(header: &H, tensors: &[(String, Tensor)]) -> Result<Vec<u8>> {
    let meta = HashMap::from([(HEADER.to_string(), serde_json::to_string(header)?)]);
    crate::util::safetensors_bytes(tensors, &meta)
}

/// The header and tensors of a body made by [`encode`]; `what` names it in errors.
pub fn decode<H: DeserializeOwned>(bytes: &[u8], what: &str) -> Result<(H, HashMap<String, Tensor>)> {
    let (_, meta) =
        safetensors::SafeTensors::read_metadata(bytes).with_context(|| format!("{what}: not a safetensors body"))?;
    let header = meta
        .metadata()
        .as_ref()
        .and_then(|m| m.get(HEADER))
        .with_context(|| format!("{what}: no `{HEADER}` in the safetensors metadata"))?;
    let header = serde_json::from_str(header).with_context(|| format!("{what}: bad header {header}"))?;
    let tensors =
        candle_core::safetensors::load_buffer(bytes, &Device::Cpu).with_context(|| format!("{what}: tensors"))?;
    Ok((header, tensors))
}

/// A tensor of a decoded body, or an error naming it.
pub fn take(tensors: &mut HashMap<String, Tensor>, name: &str, what: &str) -> Result<Tensor> {
    tensors.remove(name).with_context(|| format!("{what}: no tensor `{name}`"))
}

/// [`StepInfo`] on the wire.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Step {
    pub left_pad: Vec<usize>,
    pub is_prefill: bool,
    pub modality: Option<Vec<Vec<bool>>>,
}

impl From<&StepInfo> for Step {
    fn from(s: &StepInfo) -> Self {
        Step { left_pad: s.left_pad.clone(), is_prefill: s.is_prefill, modality: s.modality.clone() }
    }
}

impl From<Step> for StepInfo {
    fn from(s: Step) -> Self {
        StepInfo { left_pad: s.left_pad, is_prefill: s.is_prefill, modality: s.modality }
    }
}

/// One intervention on the wire; its vector is the tensor `iv.{index}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Intervention {
    pub point: String,
    pub coeffs: Vec<f32>,
    pub positions: String,
}

/// One forward call on one stage.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Forward {
    /// The driver's state id; a stage creates it on its first call (`cols` = 0).
    pub state: u64,
    pub left_pad: Vec<usize>,
    /// Columns the state held before this call (checked: a stage that restarted has none).
    pub cols: usize,
    pub step: Step,
    pub interventions: Vec<Intervention>,
    pub captures: Vec<String>,
    /// On the last stage: `Some(all_logits)` returns logits, `None` only fills the KV cache.
    pub logits: Option<bool>,
    /// Tensors `cos` / `sin` are given (Qwen2-VL's M-RoPE); else each stage computes its own.
    pub rope: bool,
    /// Tensors `feats` / `gather` are given (first stage: image features to splice in).
    pub splice: bool,
}

/// A stage's reply to [`Forward`]: tensor `out` (the residual, or the logits on the last
/// stage; absent when nothing was asked), and `cap.{point}` per captured point.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ForwardReply {
    pub captures: Vec<String>,
    pub out: bool,
}

/// Forks `from` into `to`, row `i` of `to` being row `rows[i]` of `from`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Fork {
    pub from: u64,
    pub to: u64,
    pub rows: Vec<usize>,
}

/// Merges batch-1 states `from` into `to`, left-padded to the longest (`State::merge`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Merge {
    pub from: Vec<u64>,
    pub to: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Free {
    pub states: Vec<u64>,
}

/// The vision tower on the first stage: tensor `pixels`, the grids here.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Vision {
    pub grids: Vec<[usize; 3]>,
}

/// A reply without content.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Ack {}

/// `stage`'s share of `spec` (the interventions and captures at points it owns) as the wire
/// header's lists, with the vectors as tensors `iv.{i}`.
pub fn spec_part(
    spec: &HookSpec,
    owns: impl Fn(HookPoint) -> bool,
) -> (Vec<Intervention>, Vec<String>, Vec<(String, Tensor)>) {
    let mut ivs = Vec::new();
    let mut tensors = Vec::new();
    for iv in spec.interventions.iter().filter(|iv| owns(iv.point)) {
        tensors.push((format!("iv.{}", ivs.len()), iv.vector.clone()));
        ivs.push(Intervention {
            point: iv.point.to_string(),
            coeffs: iv.coeffs.clone(),
            positions: iv.positions.to_string(),
        });
    }
    let caps = spec.captures.iter().filter(|&&p| owns(p)).map(|p| p.to_string()).collect();
    (ivs, caps, tensors)
}

/// The [`HookSpec`] a stage runs from a [`Forward`] header and its tensors.
pub fn spec_of(f: &Forward, tensors: &mut HashMap<String, Tensor>) -> Result<HookSpec> {
    let mut spec = HookSpec::none();
    for (i, iv) in f.interventions.iter().enumerate() {
        let point: HookPoint = iv.point.parse()?;
        let positions: Positions = iv.positions.parse()?;
        let vector = take(tensors, &format!("iv.{i}"), "forward")?;
        spec.interventions.push(AddIntervention { point, vector, coeffs: iv.coeffs.clone(), positions });
    }
    for c in &f.captures {
        spec = spec.capture(c.parse()?);
    }
    Ok(spec)
}
