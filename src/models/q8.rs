//! An 8-bit weight matrix with its own CPU matmul, for `--dtype gguf` on CPU.
//!
//! Why not candle's `QMatMul`: its CPU kernel computes one dot product per (row, column) pair, so a
//! batch of two rows (a paired episode's baseline and steered rows) costs twice a single row,
//! and its prefill runs at a third of the f32 GEMM. Here each 32-value weight block is loaded
//! once and multiplied into up to four activation rows while it sits in registers, scales are
//! kept as f32 (no f16 conversion in the inner loop), and prefill walks rows in tiles of four so
//! a chunk of weight columns stays in L1.
//!
//! Batch invariant (docs/determinism.md): each activation row is quantized on its own and each
//! (row, column) result is reduced in one fixed order, whatever the row count, the row's place
//! in a tile or the thread count; the scalar fallback computes the SIMD kernel's exact
//! arithmetic, so machines with and without AVX2 agree bit for bit.
//!
//! Format: ggml's Q8_0 arithmetic (blocks of 32, one scale per block, values in −127..=127, the
//! activations quantized per block the same way), so results agree with candle's Q8_0 path up to
//! float summation order.
use anyhow::{bail, Result};
use rayon::prelude::*;

pub const BLOCK: usize = 32;
/// Output columns per work item.
const COLS: usize = 16;

/// `[n, k]` weights (output rows × input columns), quantized per 32-value block.
#[derive(Debug, Clone)]
pub struct Q8Matrix {
    n: usize,
    k: usize,
    /// `n * k` values, row-major.
    qs: Vec<i8>,
    /// `n * k / 32` scales.
    d: Vec<f32>,
}

/// Quantize one row into blocks: `d = max|x| / 127`, `q = round(x / d)`, as ggml's Q8_0 does.
fn quantize_row(x: &[f32], qs: &mut [i8], d: &mut [f32]) {
    for ((xb, qb), db) in x.chunks_exact(BLOCK).zip(qs.chunks_exact_mut(BLOCK)).zip(d.iter_mut()) {
        let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
        let scale = amax / 127.0;
        let inv = if scale != 0.0 { 1.0 / scale } else { 0.0 };
        for (q, v) in qb.iter_mut().zip(xb) {
            *q = (v * inv).round() as i8;
        }
        *db = scale;
    }
}

impl Q8Matrix {
    /// Quantize a row-major `[n, k]` f32 matrix; `k` must be a multiple of 32.
    pub fn quantize(w: &[f32], n: usize, k: usize) -> Result<Self> {
        if !k.is_multiple_of(BLOCK) {
            bail!("Q8 matrix: input size {k} is not a multiple of {BLOCK}");
        }
        if w.len() != n * k {
            bail!("Q8 matrix: expected {n}×{k} = {} values, found {}", n * k, w.len());
        }
        let mut qs = vec![0i8; n * k];
        let mut d = vec![0f32; n * k / BLOCK];
        qs.par_chunks_mut(k).zip(d.par_chunks_mut(k / BLOCK)).zip(w.par_chunks(k)).for_each(|((q, d), w)| {
            quantize_row(w, q, d);
        });
        Ok(Self { n, k, qs, d })
    }

    pub fn out_dim(&self) -> usize {
        self.n
    }

    pub fn in_dim(&self) -> usize {
        self.k
    }

    /// The weights as f32, `[n, k]` row-major (for tests and debugging).
    pub fn dequantize(&self) -> Vec<f32> {
        let kb = self.k / BLOCK;
        (0..self.n * self.k).map(|i| self.qs[i] as f32 * self.d[i / BLOCK % kb + i / self.k * kb]).collect()
    }

    /// `x · Wᵀ` for `m` rows of `x` (`[m, k]` row-major); returns `[m, n]` row-major.
    pub fn matmul(&self, x: &[f32], m: usize) -> Result<Vec<f32>> {
        let (n, k) = (self.n, self.k);
        if x.len() != m * k {
            bail!("Q8 matmul: expected {m} rows of {k} values ({}), found {}", m * k, x.len());
        }
        let kb = k / BLOCK;
        let mut xq = vec![0i8; m * k];
        let mut xd = vec![0f32; m * kb];
        for r in 0..m {
            quantize_row(&x[r * k..(r + 1) * k], &mut xq[r * k..(r + 1) * k], &mut xd[r * kb..(r + 1) * kb]);
        }
        let acts = Acts { q: &xq, d: &xd, k };
        let avx2 = has_avx2();
        let mut out_t = vec![0f32; n * m];
        let out_ptr = out_t.as_mut_ptr() as usize;
        // Runs of COLS output columns are the work items, on candle's CPU pool: the k-quant
        // layers between ours run there too, and a second (rayon) pool beside its spinning
        // workers made 2-thread decode slower than 1-thread on 2 cores.
        candle_core::utils::barrier_pool().execute_chunked(n.div_ceil(COLS), |items| {
            for c in items {
                let j0 = c * COLS;
                let ncols = COLS.min(n - j0);
                // SAFETY: item `c` alone writes columns j0..j0 + ncols of the transposed output
                // (`[n, m]`), a range no other item touches, inside `out_t`'s allocation.
                let out = unsafe { std::slice::from_raw_parts_mut((out_ptr as *mut f32).add(j0 * m), ncols * m) };
                // Tiles of four rows keep this run of weight columns hot in L1 across the rows.
                for r0 in (0..m).step_by(4) {
                    let rows = (m - r0).min(4);
                    for jj in 0..ncols {
                        let j = j0 + jj;
                        let w = &self.qs[j * k..(j + 1) * k];
                        let wd = &self.d[j * kb..(j + 1) * kb];
                        dot_rows(avx2, w, wd, &acts, r0, &mut out[jj * m + r0..jj * m + r0 + rows]);
                    }
                }
            }
        });
        if m == 1 {
            return Ok(out_t);
        }
        let mut out = vec![0f32; m * n];
        for j in 0..n {
            for r in 0..m {
                out[r * n + j] = out_t[j * m + r];
            }
        }
        Ok(out)
    }
}

/// Quantized activations: `m` rows of `k` values and their block scales.
struct Acts<'a> {
    q: &'a [i8],
    d: &'a [f32],
    k: usize,
}

impl Acts<'_> {
    fn row(&self, r: usize) -> (&[i8], &[f32]) {
        let kb = self.k / BLOCK;
        (&self.q[r * self.k..(r + 1) * self.k], &self.d[r * kb..(r + 1) * kb])
    }
}

fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static AVX2: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *AVX2.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// `dst[i] = w · act_row(r0 + i)` for `dst.len()` (1..=4) rows.
fn dot_rows(avx2: bool, w: &[i8], wd: &[f32], acts: &Acts, r0: usize, dst: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if avx2 {
        // SAFETY: AVX2 and FMA were detected at run time; slices are bounds-checked by construction.
        unsafe {
            match dst.len() {
                1 => avx::dot::<1>(w, wd, acts, r0, dst),
                2 => avx::dot::<2>(w, wd, acts, r0, dst),
                3 => avx::dot::<3>(w, wd, acts, r0, dst),
                _ => avx::dot::<4>(w, wd, acts, r0, dst),
            }
        }
        return;
    }
    let _ = avx2;
    // The SIMD kernel's exact arithmetic: lane l of a block sums bytes 4l..4l+3 (exact in i32),
    // then a fused multiply-add by the block's scale product into lane l; the same lane fold.
    for (i, out) in dst.iter_mut().enumerate() {
        let (xq, xd) = acts.row(r0 + i);
        let mut acc = [0f32; 8];
        for b in 0..wd.len() {
            let scale = wd[b] * xd[b];
            for (l, a) in acc.iter_mut().enumerate() {
                let p: i32 = (0..4).map(|t| w[b * BLOCK + 4 * l + t] as i32 * xq[b * BLOCK + 4 * l + t] as i32).sum();
                *a = (p as f32).mul_add(scale, *a);
            }
        }
        *out = super::kernels::fold8(acc);
    }
}

#[cfg(target_arch = "x86_64")]
mod avx {
    use super::{Acts, BLOCK};
    use crate::models::kernels::avx::hsum;
    use std::arch::x86_64::*;

    /// One weight row against `R` activation rows. `maddubs` multiplies unsigned by signed
    /// bytes, so the weight's sign is moved onto the activation (|w| · x·sign(w) = w · x); the
    /// i16 pair sums cannot saturate because |w|, |x| ≤ 127.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot<const R: usize>(w: &[i8], wd: &[f32], acts: &Acts, r0: usize, dst: &mut [f32]) {
        let kb = wd.len();
        let ones = _mm256_set1_epi16(1);
        let mut acc = [_mm256_setzero_ps(); R];
        let rows: [(&[i8], &[f32]); R] = std::array::from_fn(|i| acts.row(r0 + i));
        for b in 0..kb {
            let wv = _mm256_loadu_si256(w.as_ptr().add(b * BLOCK) as *const __m256i);
            let aw = _mm256_sign_epi8(wv, wv);
            let dw = *wd.get_unchecked(b);
            for i in 0..R {
                let (xq, xd) = rows[i];
                let xv = _mm256_loadu_si256(xq.as_ptr().add(b * BLOCK) as *const __m256i);
                let sx = _mm256_sign_epi8(xv, wv);
                let p = _mm256_madd_epi16(_mm256_maddubs_epi16(aw, sx), ones);
                let scale = _mm256_set1_ps(dw * *xd.get_unchecked(b));
                acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), scale, acc[i]);
            }
        }
        for i in 0..R {
            dst[i] = hsum(acc[i]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::kernels::tests::lcg;

    /// The exact integer result of the quantized product, computed independently.
    fn reference(w: &Q8Matrix, x: &[f32], m: usize) -> Vec<f32> {
        let (n, k) = (w.n, w.k);
        let kb = k / BLOCK;
        let mut xq = vec![0i8; m * k];
        let mut xd = vec![0f32; m * kb];
        for r in 0..m {
            quantize_row(&x[r * k..(r + 1) * k], &mut xq[r * k..(r + 1) * k], &mut xd[r * kb..(r + 1) * kb]);
        }
        let mut out = vec![0f32; m * n];
        for r in 0..m {
            for j in 0..n {
                let mut acc = 0f64;
                for b in 0..kb {
                    let s: i64 =
                        (0..BLOCK).map(|t| w.qs[j * k + b * BLOCK + t] as i64 * xq[r * k + b * BLOCK + t] as i64).sum();
                    acc += s as f64 * w.d[j * kb + b] as f64 * xd[r * kb + b] as f64;
                }
                out[r * n + j] = acc as f32;
            }
        }
        out
    }

    #[test]
    fn matches_the_integer_reference_for_every_row_count() {
        let (n, k) = (37, 96);
        let w = Q8Matrix::quantize(&lcg(1, n * k), n, k).unwrap();
        for m in [1, 2, 3, 4, 5, 9] {
            let x = lcg(2 + m as u64, m * k);
            let got = w.matmul(&x, m).unwrap();
            let want = reference(&w, &x, m);
            for (g, e) in got.iter().zip(&want) {
                assert!((g - e).abs() <= 1e-5 * e.abs().max(1.0), "m={m}: {g} vs {e}");
            }
            // The scalar path gives the same numbers as the SIMD one.
            let acts_q = {
                let mut q = vec![0i8; m * k];
                let mut d = vec![0f32; m * k / BLOCK];
                for r in 0..m {
                    quantize_row(&x[r * k..(r + 1) * k], &mut q[r * k..(r + 1) * k], &mut d[r * 3..(r + 1) * 3]);
                }
                (q, d)
            };
            let acts = Acts { q: &acts_q.0, d: &acts_q.1, k };
            for r in 0..m {
                let mut s = [0f32];
                dot_rows(false, &w.qs[..k], &w.d[..3], &acts, r, &mut s);
                // Bit for bit: the scalar code is the SIMD kernel's arithmetic, not an approximation.
                assert_eq!(s[0].to_bits(), got[r * n].to_bits(), "m={m} row {r}");
                // And every row's numbers are the same whatever the row count.
                assert_eq!(w.matmul(&x[r * k..(r + 1) * k], 1).unwrap(), got[r * n..(r + 1) * n].to_vec());
            }
        }
    }

    #[test]
    fn quantization_error_is_small_against_f32() {
        let (n, k) = (16, 256);
        let wf = lcg(7, n * k);
        let w = Q8Matrix::quantize(&wf, n, k).unwrap();
        let deq = w.dequantize();
        let max_err = wf.iter().zip(&deq).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        // Half a quantization step of the largest block (|w| ≤ 1): 0.5 / 127.
        assert!(max_err <= 0.5 / 127.0 + 1e-7, "max error {max_err}");
        let x = lcg(8, k);
        let got = w.matmul(&x, 1).unwrap();
        // Each product carries up to half a step (1/254) of error from w and from x; over 256
        // terms the error is a random walk of about 0.04, so 0.2 is five of its deviations.
        for j in 0..n {
            let exact: f32 = (0..k).map(|t| wf[j * k + t] * x[t]).sum();
            assert!((got[j] - exact).abs() < 0.2, "col {j}: {} vs {exact}", got[j]);
        }
    }

    #[test]
    fn rejects_bad_shapes() {
        let e = Q8Matrix::quantize(&[0.0; 30], 1, 30).unwrap_err().to_string();
        assert!(e.contains("not a multiple of 32"), "{e}");
        let w = Q8Matrix::quantize(&[0.0; 64], 2, 32).unwrap();
        let e = w.matmul(&[0.0; 31], 1).unwrap_err().to_string();
        assert!(e.contains("expected 1 rows of 32"), "{e}");
    }
}
