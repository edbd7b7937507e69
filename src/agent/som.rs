//! The VLM turn (Qwen2-VL): the Set-of-Marks screenshot of the task area (every element outlined
//! and labelled `[ref]`) first, then the utterance, in one user turn. Steering acts on the LLM
//! backbone only: the vector lives in the decoder's residual stream, never in the vision tower.
use super::prompt::PromptBuilder;
use super::turn::{AgentModel, Turn, View};
use crate::models::qwen2_vl::{Qwen2Vl, VlmInput};
use anyhow::{Context, Result};
use sha2::{Digest, Sha256};

impl AgentModel for Qwen2Vl {
    const SCREENSHOT: bool = true;

    fn turn(&self, prompts: &PromptBuilder, view: &View<'_>, suffix: Option<&str>) -> Result<Turn<VlmInput>> {
        let img = view.screenshot.context("a VLM turn needs the Set-of-Marks screenshot")?;
        let text = prompts.user_text(view.obs, view.history, view.step, true, suffix)?;
        let input = self.user_prompt_with(std::slice::from_ref(img), &text, prompts.vlm_system()?)?;
        Ok(Turn { input, hash: screenshot_hash(&text, img) })
    }

    fn image_grid(input: &VlmInput) -> Option<[usize; 3]> {
        input.images.first().map(|i| i.grid_thw)
    }
}

/// A screenshot turn's `prompt_hash`: the text and the image's size and pixels.
pub fn screenshot_hash(text: &str, img: &image::RgbImage) -> String {
    let mut h = Sha256::new();
    h.update(text.as_bytes());
    h.update(img.width().to_le_bytes());
    h.update(img.height().to_le_bytes());
    h.update(img.as_raw());
    hex::encode(&h.finalize()[..8])
}
