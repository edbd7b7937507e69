//! The fixed workloads of `bench paired` (scripts/gpu-check.sh runs the same in the peer): a text
//! prompt of ordinary token ids, and a Qwen2-VL prompt of one synthetic picture plus filler text.
use super::qwen2_vl::model::{Qwen2Vl, VlmInput};
use anyhow::{bail, Result};
use image::RgbImage;

/// Default prompt lengths of the two workloads.
pub const TEXT_PROMPT_TOKENS: usize = 400;
pub const VLM_PROMPT_TOKENS: usize = 487;

/// The prompt of the text workload: `n` ordinary (non-special) token ids, identical in the peer
/// (scripts/peer/hf_paired.py `workload_ids`).
pub fn workload_ids(n: usize) -> Vec<u32> {
    (0..n).map(|i| 1000 + ((i as u64 * 7919) % 20000) as u32).collect()
}

/// The VLM workload's text: its token ids (the model's tokenizer, no special tokens) are cycled
/// to the length the prompt needs. Identical in the peer (`VLM_FILLER`).
pub const VLM_FILLER: &str =
    "Click the button labelled Submit, then type the name into the text field and press Enter. ";

/// The VLM workload's picture, `width`×`height` RGB: pixel (x, y) is
/// ((7x + 13y) mod 256, (3x + 5y + 100) mod 256, xy mod 256). Identical in the peer
/// (`workload_image`).
pub fn workload_image(width: u32, height: u32) -> RgbImage {
    RgbImage::from_fn(width, height, |x, y| {
        let (x, y) = (x as u64, y as u64);
        image::Rgb([((7 * x + 13 * y) % 256) as u8, ((3 * x + 5 * y + 100) % 256) as u8, ((x * y) % 256) as u8])
    })
}

/// The VLM workload's prompt: the chat template of one user turn with `workload_image(w, h)`
/// then an empty text (`Qwen2Vl::user_prompt`: template, processor, pad expansion), and
/// `VLM_FILLER`'s ids cycled into the text slot (right after `<|vision_end|>`) so that the
/// prompt has `prompt_tokens` ids in all.
pub fn vlm_workload(m: &Qwen2Vl, prompt_tokens: usize, (w, h): (u32, u32)) -> Result<VlmInput> {
    let base = m.user_prompt(&[workload_image(w, h)], "")?;
    let end = m.cfg.vision_end_token_id;
    let at = match base.ids.iter().position(|&t| t == end) {
        Some(i) if base.ids.iter().filter(|&&t| t == end).count() == 1 => i + 1,
        _ => bail!("the rendered one-image prompt must hold exactly one <|vision_end|> ({end})"),
    };
    let Some(text) = prompt_tokens.checked_sub(base.ids.len()) else {
        bail!(
            "--prompt-tokens {prompt_tokens} is below the {} tokens of the chat template and the {w}x{h} image alone",
            base.ids.len()
        );
    };
    let filler = m.tokenizer.encode(VLM_FILLER, false)?;
    let mut ids = Vec::with_capacity(prompt_tokens);
    ids.extend_from_slice(&base.ids[..at]);
    ids.extend((0..text).map(|i| filler[i % filler.len()]));
    ids.extend_from_slice(&base.ids[at..]);
    Ok(VlmInput { ids, images: base.images })
}
