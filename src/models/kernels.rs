//! Batch-invariant CPU kernels (docs/determinism.md): dense `x · Wᵀ` and attention.
//!
//! Every output element is reduced in an order fixed by that element's own inputs alone, never
//! by the number of rows in the call, other rows' padding, the tiling or the thread count. A
//! row's numbers are then the same bits whatever it was batched with, which is what makes the
//! paired baseline/steered differences and reruns of an experiment exact.
//!
//! The order of a dot product of length `k`, shared by the SIMD and the scalar code (so results
//! also agree between x86 machines with and without AVX2): eight lane accumulators, lane `l`
//! summing with fused multiply-adds the products at indices ≡ l (mod 8) below `k − k mod 8`;
//! the lanes folded as ((a0+a4)+(a2+a6)) + ((a1+a5)+(a3+a7)); then the remaining products
//! added in index order, fused. Softmax and the weighted sum of values run over a row's own key
//! positions in position order, so left padding (masked columns) never enters a sum.
use candle_core::utils::barrier_pool;
use candle_core::{DType, Storage, Tensor};

/// Calls `f` with the values of an f32 CPU tensor, without copying when it is contiguous.
pub fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> anyhow::Result<R>) -> anyhow::Result<R> {
    if t.dtype() != DType::F32 {
        anyhow::bail!("CPU kernel: expected an f32 tensor, found {:?}", t.dtype());
    }
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        anyhow::bail!("CPU kernel: the tensor is on {:?}", t.device().location());
    };
    let (start, end) = layout.contiguous_offsets().expect("made contiguous above");
    f(&cpu.as_slice::<f32>()?[start..end])
}

/// The fixed fold of eight lane accumulators; [`avx::hsum`] computes the same tree.
#[inline(always)]
pub(crate) fn fold8(a: [f32; 8]) -> f32 {
    ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7]))
}

/// The reference dot product in the order described above (scalar; `mul_add` is exact fused).
#[inline(always)]
pub fn dot(x: &[f32], w: &[f32]) -> f32 {
    debug_assert_eq!(x.len(), w.len());
    let k8 = x.len() / 8 * 8;
    let mut a = [0f32; 8];
    for (xc, wc) in x[..k8].chunks_exact(8).zip(w[..k8].chunks_exact(8)) {
        for l in 0..8 {
            a[l] = xc[l].mul_add(wc[l], a[l]);
        }
    }
    let mut s = fold8(a);
    for t in k8..x.len() {
        s = x[t].mul_add(w[t], s);
    }
    s
}

pub(crate) fn has_avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *ON.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// A raw output pointer that work items write disjoint elements through.
#[derive(Clone, Copy)]
pub(crate) struct OutPtr(pub(crate) *mut f32);
// SAFETY: every kernel below gives each output element to exactly one work item.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// Through a method, so closures capture the `Sync` wrapper, not the raw field.
    pub(crate) fn get(self) -> *mut f32 {
        self.0
    }
}

/// Output columns per work item: a multiple of the 3-column tile, small enough that a decode
/// step's projections still split across threads.
const COLS_PER_ITEM: usize = 48;

/// `x · Wᵀ`: `x` is `[m, k]`, `w` is `[n, k]` (both row-major); returns `[m, n]` row-major.
pub fn matmul_t(x: &[f32], m: usize, k: usize, w: &[f32], n: usize) -> Vec<f32> {
    assert_eq!(x.len(), m * k, "matmul_t: x has {} values, expected {m}×{k}", x.len());
    assert_eq!(w.len(), n * k, "matmul_t: w has {} values, expected {n}×{k}", w.len());
    let mut out = vec![0f32; m * n];
    let ptr = OutPtr(out.as_mut_ptr());
    let simd = has_avx2_fma();
    barrier_pool().execute_chunked(n.div_ceil(COLS_PER_ITEM), |items| {
        for item in items {
            let (j0, j1) = (item * COLS_PER_ITEM, ((item + 1) * COLS_PER_ITEM).min(n));
            // Column tiles outside, row tiles inside: a tile's three weight rows stay in L1
            // while every activation row streams past them.
            let mut j = j0;
            while j < j1 {
                let c = (j1 - j).min(3);
                let mut r = 0;
                while r < m {
                    let rows = (m - r).min(4);
                    // SAFETY: this item alone writes columns j..j+c of rows r..r+rows.
                    unsafe { tile(simd, x, k, w, n, ptr.get(), r, rows, j, c) };
                    r += rows;
                }
                j += c;
            }
        }
    });
    out
}

/// One `rows × cols` tile (1..=4 × 1..=3) of [`matmul_t`] at `(r0, j0)`.
///
/// # Safety
/// `out` must point at an `[m, n]` buffer and no other thread may write this tile.
#[allow(clippy::too_many_arguments)] // the tile's coordinates and the problem's strides
unsafe fn tile(
    simd: bool,
    x: &[f32],
    k: usize,
    w: &[f32],
    n: usize,
    out: *mut f32,
    r0: usize,
    rows: usize,
    j0: usize,
    cols: usize,
) {
    #[cfg(target_arch = "x86_64")]
    if simd {
        macro_rules! go {
            ($($r:literal $c:literal),*) => {
                match (rows, cols) {
                    $(($r, $c) => avx::tile::<$r, $c>(x, k, w, n, out, r0, j0),)*
                    _ => unreachable!("tile {rows}×{cols}"),
                }
            };
        }
        go!(1 1, 1 2, 1 3, 2 1, 2 2, 2 3, 3 1, 3 2, 3 3, 4 1, 4 2, 4 3);
        return;
    }
    let _ = simd;
    for r in r0..r0 + rows {
        for j in j0..j0 + cols {
            *out.add(r * n + j) = dot(&x[r * k..(r + 1) * k], &w[j * k..(j + 1) * k]);
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx {
    use std::arch::x86_64::*;

    /// ((a0+a4)+(a2+a6)) + ((a1+a5)+(a3+a7)), as [`super::fold8`].
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(crate) unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    /// `R × C` dot products with one accumulator register each; per element the same order as
    /// [`super::dot`].
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn tile<const R: usize, const C: usize>(
        x: &[f32],
        k: usize,
        w: &[f32],
        n: usize,
        out: *mut f32,
        r0: usize,
        j0: usize,
    ) {
        let k8 = k / 8 * 8;
        let xp = x.as_ptr().add(r0 * k);
        let wp = w.as_ptr().add(j0 * k);
        let mut acc = [[_mm256_setzero_ps(); C]; R];
        let mut i = 0;
        while i < k8 {
            let wv: [__m256; C] = std::array::from_fn(|c| _mm256_loadu_ps(wp.add(c * k + i)));
            for (r, acc_r) in acc.iter_mut().enumerate() {
                let xv = _mm256_loadu_ps(xp.add(r * k + i));
                for c in 0..C {
                    acc_r[c] = _mm256_fmadd_ps(xv, wv[c], acc_r[c]);
                }
            }
            i += 8;
        }
        for (r, acc_r) in acc.iter().enumerate() {
            for (c, a) in acc_r.iter().enumerate() {
                let mut s = hsum(*a);
                for t in k8..k {
                    s = (*xp.add(r * k + t)).mul_add(*wp.add(c * k + t), s);
                }
                *out.add((r0 + r) * n + j0 + c) = s;
            }
        }
    }
}

/// Shapes and masking of one [`attention`] call.
#[derive(Debug, Clone)]
pub struct AttnShape {
    pub batch: usize,
    pub heads: usize,
    pub kv_heads: usize,
    /// Query positions in this call.
    pub seq: usize,
    /// Key columns in the cache (padding included), this call's included.
    pub total: usize,
    pub head_dim: usize,
    /// The cache column of this call's first query.
    pub start_col: usize,
    /// Left-padding columns per row.
    pub left_pad: Vec<usize>,
    /// Sliding window: a query at column q sees keys above q − window.
    pub window: Option<usize>,
    pub scale: f32,
    pub softcap: Option<f32>,
}

/// Causal attention of `q` (`[batch, heads, seq, head_dim]`) over the cache `k`, `v`
/// (`[batch, kv_heads, total, head_dim]`), all contiguous f32; returns `[batch, seq, heads ·
/// head_dim]`. A query sees its row's real keys up to itself (and within the window); a padding
/// query sees only itself, so its output stays finite. Scores, softmax and the weighted sum of
/// values are computed per query in key-position order, starting at the row's first visible key.
pub fn attention(q: &[f32], k: &[f32], v: &[f32], s: &AttnShape) -> Vec<f32> {
    let (b, nh, nkv, seq, total, hd) = (s.batch, s.heads, s.kv_heads, s.seq, s.total, s.head_dim);
    assert_eq!(q.len(), b * nh * seq * hd, "attention: q size");
    assert_eq!(k.len(), b * nkv * total * hd, "attention: k size");
    assert_eq!(v.len(), b * nkv * total * hd, "attention: v size");
    assert!(nkv > 0 && nh.is_multiple_of(nkv), "attention: {nh} heads over {nkv} kv heads");
    assert_eq!(s.left_pad.len(), b, "attention: one padding count per row");
    let rep = nh / nkv;
    let mut out = vec![0f32; b * seq * nh * hd];
    let ptr = OutPtr(out.as_mut_ptr());
    let simd = has_avx2_fma();
    // One work item per (row, head, query); items of one (row, head) are adjacent.
    barrier_pool().execute_chunked(b * nh * seq, |items| {
        let mut scores = Vec::with_capacity(total);
        for item in items {
            let (r, h, qi) = (item / (nh * seq), item / seq % nh, item % seq);
            let col = s.start_col + qi;
            let pad = s.left_pad[r];
            let lo = if col < pad { col } else { pad.max(s.window.map_or(0, |w| (col + 1).saturating_sub(w))) };
            let kvh = r * nkv + h / rep;
            let qv = &q[((r * nh + h) * seq + qi) * hd..][..hd];
            let keys = &k[(kvh * total + lo) * hd..(kvh * total + col + 1) * hd];
            let vals = &v[(kvh * total + lo) * hd..(kvh * total + col + 1) * hd];
            // SAFETY: this item alone writes query `qi` of head `h` in row `r`.
            let o = unsafe { std::slice::from_raw_parts_mut(ptr.get().add(((r * seq + qi) * nh + h) * hd), hd) };
            #[cfg(target_arch = "x86_64")]
            if simd {
                // SAFETY: AVX2 and FMA were detected at run time.
                unsafe { attend_avx(qv, keys, vals, s.scale, s.softcap, &mut scores, o) };
                continue;
            }
            let _ = simd;
            attend(qv, keys, vals, s.scale, s.softcap, &mut scores, o);
        }
    });
    out
}

/// One query against its visible keys (`keys`/`vals`: `n × hd`, position order) into `o`.
#[inline(always)]
fn attend(q: &[f32], keys: &[f32], vals: &[f32], scale: f32, softcap: Option<f32>, sc: &mut Vec<f32>, o: &mut [f32]) {
    let hd = q.len();
    sc.clear();
    for key in keys.chunks_exact(hd) {
        let x = dot(q, key) * scale;
        sc.push(match softcap {
            Some(c) => (x / c).tanh() * c,
            None => x,
        });
    }
    let max = sc.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    let mut sum = 0f32;
    for x in sc.iter_mut() {
        *x = (*x - max).exp();
        sum += *x;
    }
    o.iter_mut().for_each(|x| *x = 0.0);
    for (p, val) in sc.iter().zip(vals.chunks_exact(hd)) {
        let p = p / sum;
        for (od, &vd) in o.iter_mut().zip(val) {
            *od = p.mul_add(vd, *od);
        }
    }
}

/// [`attend`] compiled for AVX2 + FMA: the same source, so the same results, only vectorized
/// (`mul_add` is an exact fused operation either way; nothing is reassociated).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn attend_avx(
    q: &[f32],
    keys: &[f32],
    vals: &[f32],
    scale: f32,
    softcap: Option<f32>,
    sc: &mut Vec<f32>,
    o: &mut [f32],
) {
    attend(q, keys, vals, scale, softcap, sc, o)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Seeded values in [-1, 1) for kernel tests.
    pub(crate) fn lcg(seed: u64, n: usize) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn matmul_rows_are_bit_identical_whatever_the_row_count() {
        // k with a tail (k mod 8 ≠ 0) and n not a multiple of the tile or the work item.
        for (n, k) in [(50, 37), (97, 64), (5, 8)] {
            let w = lcg(1, n * k);
            let x = lcg(2, 9 * k);
            let all = matmul_t(&x, 9, k, &w, n);
            for m in 1..=9 {
                let part = matmul_t(&x[..m * k], m, k, &w, n);
                assert_eq!(part, all[..m * n].to_vec(), "n={n} k={k} m={m}");
            }
            // A row alone, from the middle of the batch.
            assert_eq!(matmul_t(&x[5 * k..6 * k], 1, k, &w, n), all[5 * n..6 * n].to_vec());
            // The scalar reference order gives the same bits as the tiled SIMD code.
            for r in 0..9 {
                for j in 0..n {
                    assert_eq!(all[r * n + j].to_bits(), dot(&x[r * k..(r + 1) * k], &w[j * k..(j + 1) * k]).to_bits());
                }
            }
            // And it is a dot product.
            let exact: f64 = (0..k).map(|t| x[t] as f64 * w[t] as f64).sum();
            assert!((all[0] as f64 - exact).abs() < 1e-4, "{} vs {exact}", all[0]);
        }
    }

    #[test]
    fn scalar_and_simd_attention_agree_and_padding_does_not_matter() {
        let (nh, nkv, hd) = (4, 2, 12);
        let real = 7;
        let q = lcg(3, nh * real * hd);
        let kv = lcg(4, nkv * real * hd * 2);
        let (k, v) = kv.split_at(nkv * real * hd);
        let shape = |pad: usize, window| AttnShape {
            batch: 1,
            heads: nh,
            kv_heads: nkv,
            seq: real + pad,
            total: real + pad,
            head_dim: hd,
            start_col: 0,
            left_pad: vec![pad],
            window,
            scale: 0.3,
            softcap: Some(5.0),
        };
        // Left-pad the same keys and queries by 3 columns of garbage.
        let padded = |x: &[f32], heads: usize, pad: usize| -> Vec<f32> {
            let mut o = Vec::new();
            for h in 0..heads {
                o.extend(lcg(99, pad * hd));
                o.extend_from_slice(&x[h * real * hd..(h + 1) * real * hd]);
            }
            o
        };
        for window in [None, Some(3)] {
            let plain = attention(&q, k, v, &shape(0, window));
            let pq = padded(&q, nh, 3);
            let out = attention(&pq, &padded(k, nkv, 3), &padded(v, nkv, 3), &shape(3, window));
            let row = nh * hd;
            assert_eq!(out[3 * row..].to_vec(), plain, "window {window:?}");
            assert!(out.iter().all(|x| x.is_finite()));
            // The scalar path (no SIMD) gives the same bits.
            let mut sc = Vec::new();
            let mut o = vec![0f32; hd];
            let (qi, h) = (5, 3);
            let lo = window.map_or(0, |w| (qi + 1usize).saturating_sub(w));
            let kvh = h / 2;
            attend(
                &q[(h * real + qi) * hd..][..hd],
                &k[(kvh * real + lo) * hd..(kvh * real + qi + 1) * hd],
                &v[(kvh * real + lo) * hd..(kvh * real + qi + 1) * hd],
                0.3,
                Some(5.0),
                &mut sc,
                &mut o,
            );
            assert_eq!(o, plain[(qi * nh + h) * hd..][..hd].to_vec());
        }
    }
}
