//! How an observation becomes a model's input: the one modality-specific step of the episode
//! pipeline. A text model reads the DOM as text through its chat template ([`PromptBuilder`]);
//! a VLM reads the Set-of-Marks screenshot beside the protocol's screenshot text ([`super::som`]).
use super::prompt::{hash16, PromptBuilder};
use crate::env::Observation;
use crate::models::engine::Engine;
use crate::models::load::LoadedModel;
use anyhow::Result;
use image::RgbImage;

/// What the agent sees at one model turn.
#[derive(Clone, Copy)]
pub struct View<'a> {
    pub obs: &'a Observation,
    /// The Set-of-Marks screenshot, when the model reads one ([`AgentModel::SCREENSHOT`]).
    pub screenshot: Option<&'a RgbImage>,
    /// Actions taken so far in the episode.
    pub history: &'a [String],
    /// The model turn of the episode, from 1.
    pub step: usize,
}

/// One model turn's input and the hash recorded as the result line's `prompt_hash`.
#[derive(Debug, Clone)]
pub struct Turn<I> {
    pub input: I,
    pub hash: String,
}

/// A model the agent can drive.
pub trait AgentModel: Engine {
    /// Whether a turn shows the model the Set-of-Marks screenshot (taken by the pipeline).
    const SCREENSHOT: bool;

    /// The input of one turn; `suffix` (a CAA instruction) follows the user text.
    fn turn(&self, prompts: &PromptBuilder, view: &View<'_>, suffix: Option<&str>) -> Result<Turn<Self::Input>>;

    /// The `[t, h, w]` patch grid of the input's first image (the lens read-out's geometry).
    fn image_grid(_input: &Self::Input) -> Option<[usize; 3]> {
        None
    }
}

impl AgentModel for LoadedModel {
    const SCREENSHOT: bool = false;

    fn turn(&self, prompts: &PromptBuilder, view: &View<'_>, suffix: Option<&str>) -> Result<Turn<Vec<u32>>> {
        let user = prompts.user_text(view.obs, view.history, view.step, false, suffix)?;
        let text = prompts.model_text(&self.tokenizer, &user)?;
        Ok(Turn { input: prompts.encode(&self.tokenizer, &text)?, hash: hash16(&text) })
    }
}
