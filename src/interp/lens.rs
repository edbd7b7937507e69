//! The embedding lens (cosine against the input embedding matrix) and the logit lens (final norm
//! and LM head), top-k per token; the contextual lens lives in [`super::index`].
//!
//! Ranking everywhere: highest score first, ties broken by the lower id, so results are a pure
//! function of the vectors (the numpy references in scripts/goldens/lens_goldens.py use the same rule).
use crate::models::decoder::Decoder;
use crate::models::hooks::HookPoint;
use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor, D};
use serde::{Deserialize, Serialize};

/// One neighbour of a token under a lens.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Neighbour {
    pub token: String,
    pub id: u32,
    /// Cosine (embedding, contextual) or logit (logit lens).
    pub score: f32,
    /// Contextual lens only: where the neighbour came from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<Source>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Source {
    pub sentence: String,
    pub sentence_index: u32,
    pub hook_point: String,
    pub position: u32,
    /// Slot in the index (for exact comparisons).
    pub slot: u32,
}

/// The k best `(index, score)` of each row of `scores` (`[n, m]`), best first, ties by lower index.
pub fn topk_rows(scores: &Tensor, k: usize) -> Result<Vec<Vec<(u32, f32)>>> {
    let rows: Vec<Vec<f32>> = scores.to_device(&Device::Cpu)?.to_dtype(DType::F32)?.to_vec2()?;
    Ok(rows.iter().map(|r| topk(r, k)).collect())
}

pub fn topk(r: &[f32], k: usize) -> Vec<(u32, f32)> {
    let cmp = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    let mut v: Vec<(u32, f32)> = r.iter().enumerate().map(|(i, &s)| (i as u32, s)).collect();
    let k = k.min(v.len());
    if k == 0 {
        return Vec::new();
    }
    if k < v.len() {
        v.select_nth_unstable_by(k - 1, cmp);
        v.truncate(k);
    }
    v.sort_by(cmp);
    v
}

/// Rows divided by their L2 norm (zero rows stay zero).
pub fn l2_normalize(x: &Tensor) -> Result<Tensor> {
    let n = x.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?;
    let n = n.maximum(&n.ones_like()?.affine(1e-30, 0.0)?)?;
    Ok(x.broadcast_div(&n)?)
}

/// Cosine against every row of the input embedding matrix.
pub struct EmbeddingLens {
    /// `[vocab, hidden]`, rows L2-normalised, f32.
    normed: Tensor,
}

impl EmbeddingLens {
    pub fn new(decoder: &Decoder) -> Result<Self> {
        Ok(Self { normed: l2_normalize(&decoder.embedding_matrix()?.to_dtype(DType::F32)?)? })
    }

    /// `x`: `[n, hidden]` → per row the k best `(token id, cosine)`.
    pub fn topk(&self, x: &Tensor, k: usize) -> Result<Vec<Vec<(u32, f32)>>> {
        let (_, h) = x.dims2()?;
        if h != self.normed.dim(1)? {
            bail!("embedding lens: vectors have {h} features, the embedding matrix {}", self.normed.dim(1)?);
        }
        let q = l2_normalize(&x.to_device(self.normed.device())?.to_dtype(DType::F32)?)?;
        topk_rows(&q.matmul(&self.normed.t()?)?, k)
    }
}

/// The logit lens: final norm + LM head of the model on states taken at `point` (the norm is
/// skipped for `hook_final_norm`, which already had it).
pub fn logit_lens(decoder: &Decoder, point: HookPoint, x: &Tensor, k: usize) -> Result<Vec<Vec<(u32, f32)>>> {
    let logits = logit_lens_logits(decoder, point, x)?;
    topk_rows(&logits, k)
}

/// The full `[n, vocab]` logits of the logit lens.
pub fn logit_lens_logits(decoder: &Decoder, point: HookPoint, x: &Tensor) -> Result<Tensor> {
    let x = x.to_device(decoder.device())?.unsqueeze(0)?;
    Ok(decoder.unembed(&x, point == HookPoint::FinalNorm)?.squeeze(0)?)
}

/// What a token string is for matching and display: the decoded single token.
pub fn token_string(tok: &crate::models::tokenizer::Tokenizer, id: u32) -> String {
    tok.decode(&[id], false).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topk_orders_and_breaks_ties() {
        assert_eq!(topk(&[0.5, 2.0, 2.0, -1.0, 1.0], 3), vec![(1, 2.0), (2, 2.0), (4, 1.0)]);
        assert_eq!(topk(&[1.0, 3.0], 5), vec![(1, 3.0), (0, 1.0)]);
        assert!(topk(&[1.0], 0).is_empty());
    }
}
