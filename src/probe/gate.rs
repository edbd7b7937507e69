//! Steering gated by a probe (conditional activation steering, CAST, on agent episodes): a row is
//! steered on a step only when the probe, read at its hook point on that step's unsteered prompt,
//! gives the gate class a probability ≥ the threshold.
//!
//! The reading is the head's own pooling over the row's real prompt tokens at the head's hook
//! point, exactly what `probe features` stored for training, so a gate's probability on a prompt
//! equals the trained head's probability on that prompt's features (tested). Rows gate
//! independently: the decision becomes the row's coefficient (α or 0) in the batch's per-row
//! coefficients, and α = 0 leaves a row bit-identical to no steering.
use super::features::Pool;
use super::head::Head;
use crate::models::decoder::Decoder;
use crate::models::engine::Engine;
use crate::models::generate;
use crate::models::hooks::HookPoint;
use crate::models::load::ModelInfo;
use crate::models::prefix_cache::PrefixCache;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use serde::Serialize;
use std::path::Path;

/// What a result line records per step.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct GateDecision {
    /// p(gate class) from the head.
    pub probability: f32,
    /// probability ≥ threshold: the row is steered on this step.
    pub on: bool,
}

#[derive(Debug, Clone)]
pub struct Gate {
    pub head: Head,
    pub class: usize,
    pub threshold: f32,
    pub point: HookPoint,
}

impl Gate {
    /// `run --gate FILE --gate-class C --gate-threshold P`.
    pub fn load(path: &Path, class: &str, threshold: f32) -> Result<Self> {
        let head = Head::load(path)?;
        if !(0.0..=1.0).contains(&threshold) {
            bail!("--gate-threshold {threshold}: a probability in [0, 1]");
        }
        let class = head.class_index(class).with_context(|| format!("--gate-class for {}", path.display()))?;
        let point = head.point()?;
        Ok(Self { head, class, threshold, point })
    }

    /// [`Head::check_model`], for the gate's head.
    pub fn check_model(&self, info: &ModelInfo) -> Result<()> {
        self.head.check_model(info).context("--gate")
    }

    /// The hook point the run loop must capture on the step's prefill.
    pub fn capture_point(&self) -> HookPoint {
        self.point
    }

    /// Whether the head was trained on chat-templated prompts (the agent's prompts are).
    pub fn chat(&self) -> bool {
        self.head.meta.chat
    }

    /// The decision for one already pooled feature `[hidden]`.
    pub fn decide_pooled(&self, x: &[f32]) -> Result<GateDecision> {
        let probability = self.head.probs(x)?.first().context("no probability")?[self.class];
        Ok(GateDecision { probability, on: probability >= self.threshold })
    }

    /// The decision for one row's states at the gate's point over its real prompt tokens
    /// (`[tokens, hidden]`, padding removed); `image` marks image tokens (VLM rows).
    pub fn decide_states(&self, states: &Tensor, image: &[bool]) -> Result<GateDecision> {
        let probability = self.head.probs_of_states(states, image)?[self.class];
        Ok(GateDecision { probability, on: probability >= self.threshold })
    }

    /// One decision per model input (unsteered): what `run --gate` reads on every steered row.
    /// A head that pools the last token reads one token past the prompt's prefix, which goes
    /// through `cache` (the rows' generation then reuses it); other poolings read every prompt
    /// position in one more prefill. Either way the bits of a plain prefill (tests/probes.rs).
    pub fn decide_inputs<E: Engine>(
        &self,
        model: &E,
        inputs: &[&E::Input],
        cache: &mut PrefixCache,
    ) -> Result<Vec<GateDecision>> {
        if self.head.meta.pool == Pool::Last {
            let states = model.last_prompt_states(inputs, self.point, cache)?;
            return states
                .iter()
                .map(|s| self.decide_pooled(&s.to_device(&Device::Cpu)?.to_dtype(DType::F32)?.to_vec1::<f32>()?))
                .collect();
        }
        let states = model.prompt_states(inputs, self.point)?;
        states.iter().zip(inputs).map(|(s, u)| self.decide_states(s, &model.image_mask(u))).collect()
    }

    /// A capture-only prefill of the (unsteered, already tokenized) prompts of a text model and
    /// one decision per prompt (`probe gate`).
    pub fn read_prompts(&self, decoder: &Decoder, prompts: &[Vec<u32>], pad_id: u32) -> Result<Vec<GateDecision>> {
        if self.head.meta.pool == Pool::ImageMean {
            bail!("this gate pools image tokens; read it on the VLM prefill with decide_states");
        }
        let states = generate::prompt_states(decoder, prompts, pad_id, self.point)?;
        states.iter().map(|s| self.decide_states(s, &[])).collect()
    }

    /// Per-row coefficients: `alpha` where the gate is on, 0 where it is off.
    pub fn coeffs(decisions: &[GateDecision], alpha: f32) -> Vec<f32> {
        decisions.iter().map(|d| if d.on { alpha } else { 0.0 }).collect()
    }
}
