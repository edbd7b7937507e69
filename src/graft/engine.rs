//! The hybrid as a model of the episode pipeline ([`Engine`] and [`AgentModel`]), so `run --vlm`,
//! `vector`, `extract` and the lenses take a graft directory like any other VLM.
//!
//! Generation follows `Qwen2Vl::generate_rows`: with the `last` selector (the exp12 setting),
//! each distinct input but its last token is prefilled once (its screenshot through the tower and
//! the adapter), the caches are merged and forked into the rows, and the last prompt token runs
//! with the per-row hooks; the hybrid's positions are the LM's 1-D ones, so the merged state's
//! left padding is all a fork needs. Other selectors generate each row alone. Both paths give
//! the bits of [`Hybrid::generate`] on each row (tests/graft_engine.rs).
use super::{Hybrid, HybridInput};
use crate::agent::prompt::PromptBuilder;
use crate::agent::turn::{AgentModel, Turn, View};
use crate::models::decoder::{Decoder, State};
use crate::models::engine::{Engine, RowGeneration, VisionEngine};
use crate::models::generate::{self, GenerateConfig};
use crate::models::hooks::{AddIntervention, Captures, HookPoint, HookSpec, Positions};
use crate::models::load::ModelInfo;
use crate::models::prefix_cache::PrefixCache;
use crate::models::tokenizer::Tokenizer;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::BTreeMap;

/// `spec` for batch row `r` alone (its coefficient of every intervention).
fn row_spec(spec: &HookSpec, r: usize) -> HookSpec {
    HookSpec {
        captures: spec.captures.clone(),
        interventions: spec
            .interventions
            .iter()
            .map(|iv| AddIntervention { coeffs: vec![iv.coeffs[r]], ..iv.clone() })
            .collect(),
    }
}

impl Hybrid {
    fn image_token(&self) -> u32 {
        self.cfg.image_token_id
    }

    /// One batch-1 prefill per row (`specs[r]` its hooks), each distinct screenshot through the
    /// tower and the adapter once: the rows of one call (an episode's, a CAA pair's) share it.
    fn prefill_rows(&self, rows: &[&HybridInput], specs: &[HookSpec]) -> Result<Vec<(Tensor, State, Captures)>> {
        let mut seen: Vec<(&crate::models::qwen2_vl::processor::Processed, Tensor)> = Vec::new();
        let mut out = Vec::with_capacity(rows.len());
        for (r, spec) in rows.iter().zip(specs) {
            let img = match &r.image {
                Some(p) => Some(match seen.iter().find(|(q, _)| *q == p) {
                    Some((_, t)) => t.clone(),
                    None => {
                        let t = self.adapter.forward(&self.vision_features(p)?)?;
                        seen.push((p, t.clone()));
                        t
                    }
                }),
                None => None,
            };
            let mut caps = Captures::default();
            let (logits, state) = self.prefill_embedded(&r.ids, img.as_ref(), spec, &mut caps)?;
            out.push((logits, state, caps));
        }
        Ok(out)
    }

    /// A row's states at `point` at its image positions (`[tokens, hidden]`, f32 on the CPU),
    /// from a batch-1 prefill's captures.
    fn image_states(&self, caps: &Captures, point: HookPoint, ids: &[u32]) -> Result<Tensor> {
        let cols: Vec<u32> = (0..ids.len()).filter(|&c| ids[c] == self.image_token()).map(|c| c as u32).collect();
        let idx = Tensor::from_vec(cols.clone(), cols.len(), self.device())?;
        let t = caps.get(point)?.squeeze(0)?.index_select(&idx, 0)?;
        Ok(t.to_device(&Device::Cpu)?.to_dtype(DType::F32)?)
    }
}

impl Engine for Hybrid {
    type Input = HybridInput;

    fn info(&self) -> &ModelInfo {
        &self.info
    }
    fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }
    fn decoder(&self) -> &Decoder {
        &self.decoder
    }
    fn ids(input: &HybridInput) -> &[u32] {
        &input.ids
    }
    fn text_input(ids: Vec<u32>) -> HybridInput {
        HybridInput { ids, image: None }
    }
    fn append(input: &HybridInput, tokens: &[u32]) -> HybridInput {
        let mut v = input.clone();
        v.ids.extend_from_slice(tokens);
        v
    }

    fn generate(
        &self,
        rows: &[&HybridInput],
        cfg: &GenerateConfig,
        spec: &HookSpec,
        _cache: &mut PrefixCache,
        capture: Option<HookPoint>,
    ) -> Result<Vec<RowGeneration>> {
        if rows.is_empty() {
            return Ok(vec![]);
        }
        let ids: Vec<Vec<u32>> = rows.iter().map(|r| r.ids.clone()).collect();
        crate::models::memory::guard(&self.decoder, &ids, cfg.max_new_tokens, spec)?;
        let image = self.image_token();
        let forkable = rows.iter().all(|r| r.ids.len() >= 2 && r.ids.last() != Some(&image))
            && spec.interventions.iter().all(|iv| iv.positions == Positions::Last);
        if !forkable {
            // Each row alone, its hooks at every position they select.
            let specs: Vec<HookSpec> = (0..rows.len()).map(|r| row_spec(spec, r)).collect();
            let prefill_specs: Vec<HookSpec> =
                specs.iter().map(|s| capture.iter().fold(s.clone(), |s, &p| s.capture(p))).collect();
            let prefilled = self.prefill_rows(rows, &prefill_specs)?;
            return prefilled
                .into_iter()
                .zip(rows.iter().zip(&specs))
                .map(|((logits, mut state, caps), (input, s))| {
                    let image_states = capture.map(|p| self.image_states(&caps, p, &input.ids)).transpose()?;
                    let g = generate::continue_generation(
                        &self.decoder,
                        &mut state,
                        logits,
                        &[&input.ids[..]],
                        cfg,
                        s,
                        &mut Captures::default(),
                    )?;
                    Ok(RowGeneration { generation: g.into_iter().next().context("no generation")?, image_states })
                })
                .collect();
        }
        let mut unique: Vec<&HybridInput> = Vec::new();
        let mut row_of = Vec::with_capacity(rows.len());
        for r in rows {
            match unique.iter().position(|u| u == r) {
                Some(i) => row_of.push(i),
                None => {
                    row_of.push(unique.len());
                    unique.push(r);
                }
            }
        }
        let prefix_spec = capture.iter().fold(HookSpec::none(), |s, &p| s.capture(p));
        let prefixes: Vec<HybridInput> = unique
            .iter()
            .map(|u| HybridInput { ids: u.ids[..u.ids.len() - 1].to_vec(), image: u.image.clone() })
            .collect();
        let prefix_refs: Vec<&HybridInput> = prefixes.iter().collect();
        let mut states = Vec::with_capacity(unique.len());
        let mut unique_states = Vec::with_capacity(unique.len());
        for ((_, state, caps), prefix) in
            self.prefill_rows(&prefix_refs, &vec![prefix_spec; unique.len()])?.into_iter().zip(&prefixes)
        {
            unique_states.push(capture.map(|p| self.image_states(&caps, p, &prefix.ids)).transpose()?);
            states.push(state);
        }
        let mut state = State::merge(&states)?.select_rows(&row_of)?;
        let last: Vec<u32> = row_of.iter().map(|&u| *unique[u].ids.last().expect("checked above")).collect();
        let last = Tensor::from_vec(last, (row_of.len(), 1), self.device())?;
        let mut caps = Captures::default();
        let step = crate::models::hooks::StepInfo::decode(row_of.len());
        let logits = self.decoder.forward(&last, &mut state, &step, spec, &mut caps, false)?;
        let prompts: Vec<&[u32]> = row_of.iter().map(|&u| unique[u].ids.as_slice()).collect();
        let gens = generate::continue_generation(&self.decoder, &mut state, logits, &prompts, cfg, spec, &mut caps)?;
        Ok(gens
            .into_iter()
            .zip(&row_of)
            .map(|(generation, &u)| RowGeneration { generation, image_states: unique_states[u].clone() })
            .collect())
    }

    fn last_states(
        &self,
        rows: &[HybridInput],
        spec: &HookSpec,
        _cache: &mut PrefixCache,
    ) -> Result<BTreeMap<HookPoint, Tensor>> {
        if !spec.interventions.is_empty() {
            bail!("last_states takes captures only, found {} interventions", spec.interventions.len());
        }
        let refs: Vec<&HybridInput> = rows.iter().collect();
        let mut per_point: BTreeMap<HookPoint, Vec<Tensor>> = BTreeMap::new();
        for (_, _, caps) in self.prefill_rows(&refs, &vec![spec.clone(); rows.len()])? {
            for &p in &spec.captures {
                let h = caps.get(p)?;
                let seq = h.dim(1)?;
                per_point.entry(p).or_default().push(h.narrow(1, seq - 1, 1)?.squeeze(1)?.squeeze(0)?);
            }
        }
        per_point.into_iter().map(|(p, v)| Ok((p, Tensor::stack(&v, 0)?))).collect()
    }

    fn prompt_states(&self, rows: &[&HybridInput], point: HookPoint) -> Result<Vec<Tensor>> {
        let spec = HookSpec::none().capture(point);
        self.prefill_rows(rows, &vec![spec; rows.len()])?
            .into_iter()
            .map(|(_, _, caps)| Ok(caps.get(point)?.squeeze(0)?))
            .collect()
    }

    fn image_mask(&self, input: &HybridInput) -> Vec<bool> {
        input.ids.iter().map(|&t| t == self.image_token()).collect()
    }
}

impl AgentModel for Hybrid {
    const SCREENSHOT: bool = true;

    /// The Set-of-Marks screenshot, then the protocol's screenshot text, in one user turn
    /// (a protocol system prompt first); Qwen3's thinking switch is [`Hybrid::thinking`].
    fn turn(&self, prompts: &PromptBuilder, view: &View<'_>, suffix: Option<&str>) -> Result<Turn<HybridInput>> {
        let img = view.screenshot.context("a VLM turn needs the Set-of-Marks screenshot")?;
        let text = prompts.user_text(view.obs, view.history, view.step, true, suffix)?;
        let input = self.user_prompt_with(Some(img), &text, prompts.vlm_system()?, self.thinking)?;
        Ok(Turn { input, hash: crate::agent::som::screenshot_hash(&text, img) })
    }

    fn image_grid(input: &HybridInput) -> Option<[usize; 3]> {
        Self::grids(input).first().copied()
    }
}

impl VisionEngine for Hybrid {
    fn image_prompt(&self, images: &[image::RgbImage], text: &str) -> Result<HybridInput> {
        if images.len() > 1 {
            bail!("the hybrid's prompt holds one image, {} given", images.len());
        }
        self.user_prompt(images.first(), text, self.thinking)
    }
    fn capture(&self, input: &HybridInput, spec: &HookSpec) -> Result<Captures> {
        let mut caps = Captures::default();
        self.prefill(input, spec, &mut caps)?;
        Ok(caps)
    }
    fn grids(input: &HybridInput) -> Vec<[usize; 3]> {
        input.image.iter().map(|i| i.grid_thw).collect()
    }
    fn vision_geometry(&self) -> (usize, usize) {
        (self.vision.cfg.spatial_merge_size, self.vision.cfg.patch_size)
    }
}
