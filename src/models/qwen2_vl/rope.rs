//! Rotary positions of Qwen2-VL.
//!
//! Text tower (M-RoPE): every token has three position ids (temporal, height, width). Text tokens
//! carry the same running index in all three; the tokens of an image with a merged grid
//! `t × h' × w'` (h' = h / merge) get `(start + t_i, start + row, start + col)`; the text after it
//! resumes at `start + max(h', w')` (t = 1 for images). The head's `head_dim / 2` frequencies are
//! split by `mrope_section` into a temporal, a height and a width part, each rotated by its own
//! position id. Decoding continues at `rope_delta + column`, where `rope_delta = max position + 1 −
//! prompt length` (≤ 0: an image of n tokens advances positions by only max(h', w')).
//!
//! Vision tower (2-D RoPE): each patch rotates the first half of its head by its row and the
//! second half by its column, both with `head_dim / 4` frequencies.
use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};

/// Three position ids per token of one row: `[t, h, w]` each of prompt length.
#[derive(Debug, Clone, PartialEq)]
pub struct MropePositions {
    pub ids: [Vec<i64>; 3],
    /// Added to the column index (without padding) of each decoded token.
    pub delta: i64,
    /// Is this column an image token?
    pub image: Vec<bool>,
}

/// transformers' `get_rope_index` for one unpadded row of ids; `grids` are this row's images in
/// order (`[t, h, w]` in patches, before merging).
pub fn mrope_positions(ids: &[u32], grids: &[[usize; 3]], image_token_id: u32, merge: usize) -> Result<MropePositions> {
    let n = ids.len();
    let mut pos: [Vec<i64>; 3] = [Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n)];
    let mut image = Vec::with_capacity(n);
    let mut cur: i64 = 0;
    let mut next_grid = grids.iter();
    let mut i = 0;
    while i < n {
        if ids[i] != image_token_id {
            for p in pos.iter_mut() {
                p.push(cur);
            }
            image.push(false);
            cur += 1;
            i += 1;
            continue;
        }
        let Some(&[t, h, w]) = next_grid.next() else {
            bail!("the prompt has more image-token runs than images ({} images given)", grids.len());
        };
        let (lh, lw) = (h / merge, w / merge);
        let count = t * lh * lw;
        if i + count > n || ids[i..i + count].iter().any(|&x| x != image_token_id) {
            let run = ids[i..].iter().take_while(|&&x| x == image_token_id).count();
            bail!("an image with grid [{t}, {h}, {w}] needs {count} consecutive image tokens, found {run}");
        }
        for ti in 0..t {
            for r in 0..lh {
                for c in 0..lw {
                    pos[0].push(cur + ti as i64);
                    pos[1].push(cur + r as i64);
                    pos[2].push(cur + c as i64);
                    image.push(true);
                }
            }
        }
        cur += lh.max(lw) as i64;
        i += count;
    }
    if next_grid.next().is_some() {
        bail!("{} images given but the prompt has fewer image-token runs", grids.len());
    }
    let max = pos.iter().flat_map(|p| p.iter().copied()).max().unwrap_or(-1);
    Ok(MropePositions { ids: pos, delta: max + 1 - n as i64, image })
}

/// `1 / theta^(2i / dim)` for i < dim / 2, in f32 like transformers (`torch.arange(..., float)`).
pub fn inv_freq(dim: usize, theta: f64) -> Vec<f32> {
    (0..dim / 2).map(|i| 1.0 / (theta as f32).powf((2 * i) as f32 / dim as f32)).collect()
}

/// Which of the three position ids each frequency uses.
pub fn section_of(section: &[usize; 3]) -> Vec<usize> {
    section.iter().enumerate().flat_map(|(s, &n)| std::iter::repeat_n(s, n)).collect()
}

/// cos/sin `[batch, seq, half]` from per-row, per-column `[t, h, w]` positions.
pub fn mrope_tables(
    rows: &[Vec<[i64; 3]>],
    inv_freq: &[f32],
    section: &[usize; 3],
    dev: &Device,
    dtype: DType,
) -> Result<(Tensor, Tensor)> {
    let which = section_of(section);
    if which.len() != inv_freq.len() {
        bail!("mrope_section {section:?} covers {} frequencies, the head has {}", which.len(), inv_freq.len());
    }
    let b = rows.len();
    let seq = rows.first().map_or(0, |r| r.len());
    let half = inv_freq.len();
    let mut cos = Vec::with_capacity(b * seq * half);
    let mut sin = Vec::with_capacity(b * seq * half);
    for r in rows {
        if r.len() != seq {
            bail!("rows of different lengths ({} and {seq}) in one rotary table", r.len());
        }
        for p in r {
            for (f, &s) in inv_freq.iter().zip(&which) {
                let a = p[s] as f32 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
    }
    let cos = Tensor::from_vec(cos, (b, seq, half), dev)?.to_dtype(dtype)?;
    let sin = Tensor::from_vec(sin, (b, seq, half), dev)?.to_dtype(dtype)?;
    Ok((cos, sin))
}

/// The (row, col) of every patch in the processor's merge-block order, for each image.
pub fn vision_patch_positions(grids: &[[usize; 3]], merge: usize) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    for &[t, h, w] in grids {
        for _ in 0..t {
            for bh in 0..h / merge {
                for bw in 0..w / merge {
                    for i in 0..merge {
                        for j in 0..merge {
                            out.push((bh * merge + i, bw * merge + j));
                        }
                    }
                }
            }
        }
    }
    out
}

/// Vision cos/sin `[patches, head_dim / 2]`: the first `head_dim / 4` angles from the row, the
/// rest from the column.
pub fn vision_tables(
    grids: &[[usize; 3]],
    merge: usize,
    head_dim: usize,
    theta: f64,
    dev: &Device,
) -> Result<(Tensor, Tensor)> {
    let f = inv_freq(head_dim / 2, theta);
    let pos = vision_patch_positions(grids, merge);
    let half = head_dim / 2;
    let mut cos = Vec::with_capacity(pos.len() * half);
    let mut sin = Vec::with_capacity(pos.len() * half);
    for &(r, c) in &pos {
        for p in [r, c] {
            for &x in &f {
                let a = p as f32 * x;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
    }
    Ok((Tensor::from_vec(cos, (pos.len(), half), dev)?, Tensor::from_vec(sin, (pos.len(), half), dev)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_of_one_image() {
        // text(2) image 1x4x6 -> merged 2x3 = 6 tokens, then text(2)
        let ids = [9, 9, 5, 5, 5, 5, 5, 5, 9, 9];
        let p = mrope_positions(&ids, &[[1, 4, 6]], 5, 2).unwrap();
        assert_eq!(p.ids[0], vec![0, 1, 2, 2, 2, 2, 2, 2, 5, 6]);
        assert_eq!(p.ids[1], vec![0, 1, 2, 2, 2, 3, 3, 3, 5, 6]);
        assert_eq!(p.ids[2], vec![0, 1, 2, 3, 4, 2, 3, 4, 5, 6]);
        assert_eq!(p.delta, 7 - 10);
        assert!(mrope_positions(&ids, &[], 5, 2).is_err());
        assert!(mrope_positions(&ids, &[[1, 4, 4]], 5, 2).is_err());
    }

    #[test]
    fn vision_positions_are_block_major() {
        let p = vision_patch_positions(&[[1, 2, 4]], 2);
        assert_eq!(p, vec![(0, 0), (0, 1), (1, 0), (1, 1), (0, 2), (0, 3), (1, 2), (1, 3)]);
    }
}
