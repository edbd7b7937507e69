//! One interface over every model the harness drives (the text decoder and Qwen2-VL): a batch of
//! rows, each an input and its own steering coefficients in a [`HookSpec`], becomes one
//! generation per row. The episode pipeline, the generation thread and CAA are written once
//! against this trait; what differs between modalities (how an input is prefilled, how rows with
//! the same input share that prefill) lives in the two implementations.
use super::decoder::Decoder;
use super::generate::{self, GenerateConfig, Generation};
use super::hooks::{HookPoint, HookSpec};
use super::load::{LoadedModel, ModelInfo};
use super::prefix_cache::PrefixCache;
use super::qwen2_vl::{Qwen2Vl, VlmInput};
use super::tokenizer::Tokenizer;
use crate::stage::client::with_retry;
use anyhow::{bail, Result};
use candle_core::Tensor;
use std::collections::BTreeMap;

/// What one call of [`Engine::generate`] returns per row.
pub struct RowGeneration {
    pub generation: Generation,
    /// With a capture point: the row's states there at its image positions, `[image tokens,
    /// hidden]` in f32 (what a lens reads; the same for rows with the same input).
    pub image_states: Option<Tensor>,
}

/// The last row (`[hidden]`) of each `[tokens, hidden]` state.
fn last_rows(states: Vec<Tensor>) -> Result<Vec<Tensor>> {
    states.into_iter().map(|s| Ok(s.get(s.dim(0)? - 1)?)).collect()
}

/// A model that turns rows of inputs into generations and hidden states.
pub trait Engine: Send + Sync + 'static {
    /// One row's prompt: token ids, and for a VLM its processed images.
    type Input: Clone + PartialEq + Send + Sync + 'static;

    fn info(&self) -> &ModelInfo;
    fn tokenizer(&self) -> &Tokenizer;
    /// The language model (hooks, steering vectors and `--layer` refer to its layers).
    fn decoder(&self) -> &Decoder;
    /// Token ids of an input (image pads expanded).
    fn ids(input: &Self::Input) -> &[u32];
    /// The input followed by `tokens` (a prompt and its response).
    fn append(input: &Self::Input, tokens: &[u32]) -> Self::Input;
    /// A text-only input of these token ids (no template, no image).
    fn text_input(ids: Vec<u32>) -> Self::Input;

    /// Generates every row in one batch; `spec`'s per-row coefficients index `rows`. Rows with
    /// equal inputs share one prefill when the spec only acts at `last` positions, and `cache`
    /// may serve prompt prefixes; neither changes a bit of any row (docs/determinism.md).
    fn generate(
        &self,
        rows: &[&Self::Input],
        cfg: &GenerateConfig,
        spec: &HookSpec,
        cache: &mut PrefixCache,
        capture: Option<HookPoint>,
    ) -> Result<Vec<RowGeneration>>;

    /// The states at every capture point of `spec` (captures only) at each row's last prompt
    /// position: `[rows, hidden]` per point. The rows of one call usually share a prefix (the
    /// positive and negative prompts of one CAA pair).
    fn last_states(
        &self,
        rows: &[Self::Input],
        spec: &HookSpec,
        cache: &mut PrefixCache,
    ) -> Result<BTreeMap<HookPoint, Tensor>>;

    /// Each row's states at `point` over its real prompt tokens (`[tokens, hidden]`, padding
    /// removed), from one unsteered prefill: what a gate probe reads.
    fn prompt_states(&self, rows: &[&Self::Input], point: HookPoint) -> Result<Vec<Tensor>>;

    /// Each row's state at `point` at its last prompt token (`[hidden]`), unsteered. The default
    /// takes it from [`prompt_states`](Self::prompt_states); the text decoder prefills the prompt
    /// but its last token through `cache` (which the row's generation then reuses) and runs only
    /// the last token with the capture, the same bits (docs/determinism.md).
    fn last_prompt_states(
        &self,
        rows: &[&Self::Input],
        point: HookPoint,
        _cache: &mut PrefixCache,
    ) -> Result<Vec<Tensor>> {
        last_rows(self.prompt_states(rows, point)?)
    }

    /// Which tokens of an input are image tokens (a probe's `image-mean` pooling).
    fn image_mask(&self, _input: &Self::Input) -> Vec<bool> {
        Vec::new()
    }

    /// The generation settings of this model's agent turns.
    fn generate_config(&self, max_new_tokens: usize) -> GenerateConfig {
        let tok = self.tokenizer();
        GenerateConfig {
            max_new_tokens,
            repetition_penalty: 1.0,
            stop_ids: tok.stop_token_ids(),
            pad_id: tok.pad_token_id().unwrap_or(0),
            ..Default::default()
        }
    }
}

impl Engine for LoadedModel {
    type Input = Vec<u32>;

    fn info(&self) -> &ModelInfo {
        &self.info
    }
    fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }
    fn decoder(&self) -> &Decoder {
        &self.decoder
    }
    fn ids(input: &Vec<u32>) -> &[u32] {
        input
    }
    fn text_input(ids: Vec<u32>) -> Vec<u32> {
        ids
    }
    fn append(input: &Vec<u32>, tokens: &[u32]) -> Vec<u32> {
        let mut v = input.clone();
        v.extend_from_slice(tokens);
        v
    }

    fn generate(
        &self,
        rows: &[&Vec<u32>],
        cfg: &GenerateConfig,
        spec: &HookSpec,
        cache: &mut PrefixCache,
        capture: Option<HookPoint>,
    ) -> Result<Vec<RowGeneration>> {
        if let Some(p) = capture {
            bail!("capturing image states at `{p}` needs a vision-language model");
        }
        let prompts: Vec<Vec<u32>> = rows.iter().map(|r| (*r).clone()).collect();
        let gens =
            with_retry(&self.decoder, || generate::generate_shared(&self.decoder, &prompts, cfg, spec, Some(cache)))?;
        Ok(gens.into_iter().map(|generation| RowGeneration { generation, image_states: None }).collect())
    }

    fn last_states(
        &self,
        rows: &[Vec<u32>],
        spec: &HookSpec,
        cache: &mut PrefixCache,
    ) -> Result<BTreeMap<HookPoint, Tensor>> {
        let pad = self.tokenizer.pad_token_id().unwrap_or(0);
        with_retry(&self.decoder, || Ok(generate::last_states_shared(&self.decoder, rows, pad, spec, Some(cache))?.1))
    }

    fn last_prompt_states(&self, rows: &[&Vec<u32>], point: HookPoint, cache: &mut PrefixCache) -> Result<Vec<Tensor>> {
        if rows.iter().any(|r| r.len() < 2) {
            return last_rows(self.prompt_states(rows, point)?);
        }
        let spec = HookSpec::none().capture(point);
        let row_of: Vec<usize> = (0..rows.len()).collect();
        with_retry(&self.decoder, || {
            let mut caps = super::hooks::Captures::default();
            generate::prefill_forked_captured(&self.decoder, rows, &row_of, &spec, Some(cache), &mut caps)?;
            let s = caps.get(point)?;
            (0..rows.len()).map(|r| Ok(s.get(r)?.squeeze(0)?)).collect()
        })
    }

    fn prompt_states(&self, rows: &[&Vec<u32>], point: HookPoint) -> Result<Vec<Tensor>> {
        let prompts: Vec<Vec<u32>> = rows.iter().map(|r| (*r).clone()).collect();
        let pad = self.tokenizer.pad_token_id().unwrap_or(0);
        with_retry(&self.decoder, || generate::prompt_states(&self.decoder, &prompts, pad, point))
    }
}

impl Engine for Qwen2Vl {
    type Input = VlmInput;

    fn info(&self) -> &ModelInfo {
        &self.info
    }
    fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }
    fn decoder(&self) -> &Decoder {
        &self.decoder
    }
    fn ids(input: &VlmInput) -> &[u32] {
        &input.ids
    }
    fn text_input(ids: Vec<u32>) -> VlmInput {
        VlmInput { ids, images: Vec::new() }
    }
    fn append(input: &VlmInput, tokens: &[u32]) -> VlmInput {
        let mut v = input.clone();
        v.ids.extend_from_slice(tokens);
        v
    }

    fn generate(
        &self,
        rows: &[&VlmInput],
        cfg: &GenerateConfig,
        spec: &HookSpec,
        _cache: &mut PrefixCache,
        capture: Option<HookPoint>,
    ) -> Result<Vec<RowGeneration>> {
        let (gens, states) = with_retry(&self.decoder, || self.generate_rows(rows, cfg, spec, capture))?;
        Ok(gens
            .into_iter()
            .zip(states)
            .map(|(generation, image_states)| RowGeneration { generation, image_states })
            .collect())
    }

    fn last_states(
        &self,
        rows: &[VlmInput],
        spec: &HookSpec,
        _cache: &mut PrefixCache,
    ) -> Result<BTreeMap<HookPoint, Tensor>> {
        if !spec.interventions.is_empty() {
            bail!("last_states takes captures only, found {} interventions", spec.interventions.len());
        }
        let mut caps = super::hooks::Captures::default();
        with_retry(&self.decoder, || {
            caps = super::hooks::Captures::default();
            self.prefill(rows, spec, &mut caps, false).map(drop)
        })?;
        spec.captures
            .iter()
            .map(|&p| {
                let h = caps.get(p)?;
                let seq = h.dim(1)?;
                // Left padding: the last column is every row's last prompt token.
                Ok((p, h.narrow(1, seq - 1, 1)?.squeeze(1)?))
            })
            .collect()
    }

    fn prompt_states(&self, rows: &[&VlmInput], point: HookPoint) -> Result<Vec<Tensor>> {
        let batch: Vec<VlmInput> = rows.iter().map(|r| (*r).clone()).collect();
        let mut caps = super::hooks::Captures::default();
        let pre = with_retry(&self.decoder, || {
            caps = super::hooks::Captures::default();
            self.prefill(&batch, &HookSpec::none().capture(point), &mut caps, false)
        })?;
        let s = caps.get(point)?;
        (0..rows.len()).map(|r| Ok(s.get(r)?.narrow(0, pre.state.left_pad[r], rows[r].ids.len())?)).collect()
    }

    fn image_mask(&self, input: &VlmInput) -> Vec<bool> {
        input.ids.iter().map(|&t| t == self.cfg.image_token_id).collect()
    }
}

/// A model that reads images (Qwen2-VL, the graft hybrid): what `extract`, `probe features` and
/// the lenses need beyond [`Engine`], written once for both.
pub trait VisionEngine: Engine {
    /// One user turn: the images, then `text` (the model's chat template).
    fn image_prompt(&self, images: &[image::RgbImage], text: &str) -> Result<Self::Input>;
    /// What `spec` (captures only) records in one unsteered prefill of `input` alone
    /// (`[1, seq, hidden]` per point).
    fn capture(&self, input: &Self::Input, spec: &HookSpec) -> Result<super::hooks::Captures>;
    /// Each image's `[t, h, w]` patch grid, in prompt order.
    fn grids(input: &Self::Input) -> Vec<[usize; 3]>;
    /// (spatial merge, patch size) of the vision tower: a vision token's pixel box.
    fn vision_geometry(&self) -> (usize, usize);
}

impl VisionEngine for Qwen2Vl {
    fn image_prompt(&self, images: &[image::RgbImage], text: &str) -> Result<VlmInput> {
        self.user_prompt(images, text)
    }
    fn capture(&self, input: &VlmInput, spec: &HookSpec) -> Result<super::hooks::Captures> {
        with_retry(&self.decoder, || {
            let mut caps = super::hooks::Captures::default();
            self.prefill(std::slice::from_ref(input), spec, &mut caps, false)?;
            Ok(caps)
        })
    }
    fn grids(input: &VlmInput) -> Vec<[usize; 3]> {
        input.grids()
    }
    fn vision_geometry(&self) -> (usize, usize) {
        (self.cfg.vision.spatial_merge_size, self.cfg.vision.patch_size)
    }
}
