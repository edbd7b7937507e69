//! An 8-bit weight matrix with its own CPU matmul, for `--dtype gguf` on CPU.
//!
//! Why not candle's `QMatMul`: its CPU kernel computes one dot product per (row, column) pair, so a
//! batch of two rows (a paired episode's baseline and steered rows) costs twice a single row,
//! and its prefill runs at a third of the f32 GEMM. Here weights are packed in groups of 16
//! output columns, so one load of a weight register serves 8 columns and every activation row
//! of a tile, and prefill (from [`AMX_MIN_ROWS`] rows) runs on the CPU's AMX tile unit where
//! it has one (Sapphire Rapids and later), 16 rows × 16 columns × 32 values per instruction.
//!
//! Batch invariant (docs/determinism.md), and the same bits from every kernel: each activation
//! row is quantized on its own; per (row, column) each 32-value block's integer dot product is
//! exact (|Σ| ≤ 32·127² fits i32 and f32), and the blocks are folded in block order, one fused
//! multiply-add each: `acc = fma(Σ_b, w_scale_b · x_scale_b, acc)`. The integer sums can be
//! formed in any order (AMX, AVX2, scalar) and the float steps are single IEEE operations per
//! element, so the row count, the kernel, the tile and the thread count never change a bit.
//!
//! Format: ggml's Q8_0 arithmetic (blocks of 32, one scale per block, values in −127..=127, the
//! activations quantized per block the same way), so results agree with candle's Q8_0 path up to
//! float summation order.
use super::kernels::{has_avx2_fma, OutPtr};
use anyhow::{bail, Result};
use rayon::prelude::*;

pub const BLOCK: usize = 32;
/// Output columns per packed group: one AMX tile's width, two AVX2 registers of eight.
const GROUP: usize = 16;
/// Bytes of one group's block: 16 columns × 32 values.
const GBLOCK: usize = GROUP * BLOCK;
/// Activation rows per AMX tile.
const TILE_ROWS: usize = 16;
/// From this many rows the AMX kernel runs (where the CPU has it); fewer rows take AVX2, as the
/// AMX tile would be mostly padding.
pub const AMX_MIN_ROWS: usize = 8;

/// `[n, k]` weights (output rows × input columns), quantized per 32-value block.
#[derive(Debug, Clone)]
pub struct Q8Matrix {
    n: usize,
    k: usize,
    /// Per group of 16 output columns (the last one zero-padded) and block: 8 rows of 4
    /// consecutive values of each of the 16 columns, `[g][b][t / 4][c][t % 4]`. AMX reads a
    /// group's block as one tile (its "VNNI" layout); AVX2 reads a row as eight columns' values.
    qs: Vec<i8>,
    /// Scales, `[g][b][c]`.
    d: Vec<f32>,
}

/// A CPU kernel for [`Q8Matrix::matmul_with`]; all give the same bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    Scalar,
    Avx2,
    /// AVX-512 VNNI (`vpdpbusd`): 16 columns × 4 values per instruction, for decode.
    Vnni,
    Amx,
}

impl Kernel {
    /// The fastest kernel this CPU has for `m` rows.
    pub fn best(m: usize) -> Self {
        if m >= AMX_MIN_ROWS && Kernel::Amx.available() {
            Kernel::Amx
        } else if Kernel::Vnni.available() {
            Kernel::Vnni
        } else if Kernel::Avx2.available() {
            Kernel::Avx2
        } else {
            Kernel::Scalar
        }
    }

    pub fn available(self) -> bool {
        match self {
            Kernel::Scalar => true,
            Kernel::Avx2 => has_avx2_fma(),
            #[cfg(target_arch = "x86_64")]
            Kernel::Vnni => vnni::available(),
            #[cfg(target_arch = "x86_64")]
            Kernel::Amx => amx::available(),
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }
}

/// Quantize one row into blocks: `d = max|x| / 127`, `q = round(x / d)` (ties away from zero),
/// as ggml's Q8_0 reference does.
fn quantize_row(x: &[f32], qs: &mut [i8], d: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: AVX2 was detected; the slices hold d.len() blocks.
        return unsafe { avx::quantize_row(x, qs, d) };
    }
    quantize_row_scalar(x, qs, d)
}

fn quantize_row_scalar(x: &[f32], qs: &mut [i8], d: &mut [f32]) {
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

/// Quantize `m` rows of `k` values into `xq` and `xd`, rows spread over candle's pool: at
/// prefill sizes this step is otherwise as long as the matmul.
fn quantize_rows(x: &[f32], m: usize, k: usize, xq: &mut [i8], xd: &mut [f32]) {
    let kb = k / BLOCK;
    assert!(x.len() >= m * k && xq.len() >= m * k && xd.len() >= m * kb);
    let (qp, dp) = (xq.as_mut_ptr() as usize, xd.as_mut_ptr() as usize);
    let row = |r: usize| {
        // SAFETY: row r's ranges lie inside the buffers (asserted above), and each row is
        // quantized by exactly one call.
        let (q, d) = unsafe {
            (
                std::slice::from_raw_parts_mut((qp as *mut i8).add(r * k), k),
                std::slice::from_raw_parts_mut((dp as *mut f32).add(r * kb), kb),
            )
        };
        quantize_row(&x[r * k..(r + 1) * k], q, d);
    };
    if m >= TILE_ROWS {
        candle_core::utils::barrier_pool().execute_chunked(m, |rows| rows.for_each(row));
    } else {
        (0..m).for_each(row);
    }
}

/// Where value `t` of column `c` (within its group) sits in a group's block.
#[inline(always)]
fn packed(c: usize, t: usize) -> usize {
    (t / 4) * (GROUP * 4) + c * 4 + t % 4
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
        let kb = k / BLOCK;
        let groups = n.div_ceil(GROUP);
        let mut qs = vec![0i8; groups * kb * GBLOCK];
        let mut d = vec![0f32; groups * kb * GROUP];
        qs.par_chunks_mut(kb * GBLOCK).zip(d.par_chunks_mut(kb * GROUP)).enumerate().for_each(|(g, (qg, dg))| {
            let (mut q, mut s) = (vec![0i8; k], vec![0f32; kb]);
            for c in 0..GROUP.min(n - g * GROUP) {
                let j = g * GROUP + c;
                quantize_row(&w[j * k..(j + 1) * k], &mut q, &mut s);
                for b in 0..kb {
                    for t in 0..BLOCK {
                        qg[b * GBLOCK + packed(c, t)] = q[b * BLOCK + t];
                    }
                    dg[b * GROUP + c] = s[b];
                }
            }
        });
        Ok(Self { n, k, qs, d })
    }

    pub fn out_dim(&self) -> usize {
        self.n
    }

    pub fn in_dim(&self) -> usize {
        self.k
    }

    /// Column `j`'s quantized values and block scales, unpacked (tests and debugging).
    fn column(&self, j: usize) -> (Vec<i8>, Vec<f32>) {
        let kb = self.k / BLOCK;
        let (g, c) = (j / GROUP, j % GROUP);
        let qg = &self.qs[g * kb * GBLOCK..(g + 1) * kb * GBLOCK];
        let q = (0..self.k).map(|i| qg[i / BLOCK * GBLOCK + packed(c, i % BLOCK)]).collect();
        let d = (0..kb).map(|b| self.d[(g * kb + b) * GROUP + c]).collect();
        (q, d)
    }

    /// The weights as f32, `[n, k]` row-major (for tests and debugging).
    pub fn dequantize(&self) -> Vec<f32> {
        (0..self.n)
            .flat_map(|j| {
                let (q, d) = self.column(j);
                q.iter().enumerate().map(|(i, &v)| v as f32 * d[i / BLOCK]).collect::<Vec<_>>()
            })
            .collect()
    }

    /// `x · Wᵀ` for `m` rows of `x` (`[m, k]` row-major); returns `[m, n]` row-major.
    pub fn matmul(&self, x: &[f32], m: usize) -> Result<Vec<f32>> {
        self.matmul_with(x, m, Kernel::best(m))
    }

    /// [`Self::matmul`] on a chosen kernel (benchmarks and tests); the bits do not depend on it.
    pub fn matmul_with(&self, x: &[f32], m: usize, kernel: Kernel) -> Result<Vec<f32>> {
        let (n, k) = (self.n, self.k);
        if x.len() != m * k {
            bail!("Q8 matmul: expected {m} rows of {k} values ({}), found {}", m * k, x.len());
        }
        if !kernel.available() {
            bail!("Q8 matmul: this CPU has no {kernel:?} kernel");
        }
        let kb = k / BLOCK;
        // AMX loads whole tiles of rows: the padding rows are zeros and their results dropped.
        let rows = if kernel == Kernel::Amx { m.next_multiple_of(TILE_ROWS) } else { m };
        let mut xq = vec![0i8; rows * k];
        let mut xd = vec![0f32; rows * kb];
        quantize_rows(x, m, k, &mut xq, &mut xd);
        // VNNI multiplies unsigned by signed bytes: it takes the activations offset by 128.
        let xu: Vec<u8> =
            if kernel == Kernel::Vnni { xq.iter().map(|&v| v as u8 ^ 0x80).collect() } else { Vec::new() };
        let acts = Acts { q: &xq, d: &xd, k, m };
        let mut out = vec![0f32; m * n];
        let out_ptr = OutPtr(out.as_mut_ptr());
        // Groups of 16 output columns are the work items, on candle's CPU pool: the k-quant
        // layers between ours run there too, and a second (rayon) pool beside its spinning
        // workers made 2-thread decode slower than 1-thread on 2 cores.
        candle_core::utils::barrier_pool().execute_chunked(n.div_ceil(GROUP), |groups| {
            // SAFETY: the kernel was checked available above; group `g` alone writes columns
            // 16g..16g + 16 (clipped to n) of every row of `out`, and `acts` holds `rows` rows.
            let out = Out { ptr: out_ptr, n };
            match kernel {
                #[cfg(target_arch = "x86_64")]
                Kernel::Amx => unsafe { amx::groups(self, &acts, groups, out) },
                #[cfg(target_arch = "x86_64")]
                Kernel::Vnni => {
                    for g in groups {
                        unsafe { vnni::group(self, &acts, &xu, g, out) }
                    }
                }
                #[cfg(target_arch = "x86_64")]
                Kernel::Avx2 => {
                    for g in groups {
                        unsafe { avx::group(self, &acts, g, out) }
                    }
                }
                _ => {
                    for g in groups {
                        scalar_group(self, &acts, g, out)
                    }
                }
            }
        });
        Ok(out)
    }

    /// Group `g`'s packed values and scales.
    fn group(&self, g: usize) -> (&[i8], &[f32]) {
        let kb = self.k / BLOCK;
        (&self.qs[g * kb * GBLOCK..(g + 1) * kb * GBLOCK], &self.d[g * kb * GROUP..(g + 1) * kb * GROUP])
    }

    /// Output columns of group `g`: its first column and how many are real.
    fn cols(&self, g: usize) -> (usize, usize) {
        (g * GROUP, GROUP.min(self.n - g * GROUP))
    }
}

/// Quantized activations: `m` real rows of `k` values (and maybe zero padding rows after them)
/// and their block scales.
struct Acts<'a> {
    q: &'a [i8],
    d: &'a [f32],
    k: usize,
    m: usize,
}

/// The `[m, n]` output that groups write disjoint columns of.
#[derive(Clone, Copy)]
struct Out {
    ptr: OutPtr,
    n: usize,
}

impl Out {
    /// Writes `vals` at row `r`, from column `j`.
    ///
    /// # Safety
    /// `r` and `j + vals.len()` lie within the output, and no other item writes these elements.
    unsafe fn put(self, r: usize, j: usize, vals: &[f32]) {
        std::ptr::copy_nonoverlapping(vals.as_ptr(), self.ptr.get().add(r * self.n + j), vals.len());
    }
}

/// The reference arithmetic, element by element.
fn scalar_group(w: &Q8Matrix, acts: &Acts, g: usize, out: Out) {
    let kb = acts.k / BLOCK;
    let (qg, dg) = w.group(g);
    let (j0, ncols) = w.cols(g);
    let mut vals = [0f32; GROUP];
    for r in 0..acts.m {
        let (xq, xd) = (&acts.q[r * acts.k..(r + 1) * acts.k], &acts.d[r * kb..(r + 1) * kb]);
        for (c, v) in vals.iter_mut().enumerate().take(ncols) {
            let mut acc = 0f32;
            for b in 0..kb {
                let s: i32 = (0..BLOCK).map(|t| qg[b * GBLOCK + packed(c, t)] as i32 * xq[b * BLOCK + t] as i32).sum();
                acc = (s as f32).mul_add(dg[b * GROUP + c] * xd[b], acc);
            }
            *v = acc;
        }
        // SAFETY: row r < m and columns j0..j0 + ncols belong to this group alone.
        unsafe { out.put(r, j0, &vals[..ncols]) };
    }
}

#[cfg(target_arch = "x86_64")]
mod avx {
    use super::{Acts, Out, Q8Matrix, BLOCK, GBLOCK, GROUP};
    use std::arch::x86_64::*;

    /// [`super::quantize_row_scalar`]'s exact arithmetic, a block (four registers) at a time:
    /// the maximum is order-free, `x · inv` the same product, and ties round away from zero
    /// through truncation plus a ±1 where the dropped fraction is at least one half.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn quantize_row(x: &[f32], qs: &mut [i8], d: &mut [f32]) {
        assert!(x.len() >= d.len() * BLOCK && qs.len() >= d.len() * BLOCK);
        let sign = _mm256_set1_ps(-0.0);
        let (half, one) = (_mm256_set1_ps(0.5), _mm256_set1_ps(1.0));
        for (b, db) in d.iter_mut().enumerate() {
            let p = x.as_ptr().add(b * BLOCK);
            let v: [__m256; 4] = std::array::from_fn(|i| _mm256_loadu_ps(p.add(8 * i)));
            let a: [__m256; 4] = std::array::from_fn(|i| _mm256_andnot_ps(sign, v[i]));
            let m = _mm256_max_ps(_mm256_max_ps(a[0], a[1]), _mm256_max_ps(a[2], a[3]));
            let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
            let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
            let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
            let scale = amax / 127.0;
            let inv = _mm256_set1_ps(if scale != 0.0 { 1.0 / scale } else { 0.0 });
            let q: [__m256i; 4] = std::array::from_fn(|i| {
                let y = _mm256_mul_ps(v[i], inv);
                let t = _mm256_round_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(y);
                let frac = _mm256_andnot_ps(sign, _mm256_sub_ps(y, t));
                let away = _mm256_or_ps(_mm256_and_ps(y, sign), one);
                _mm256_cvtps_epi32(_mm256_add_ps(t, _mm256_and_ps(_mm256_cmp_ps::<_CMP_GE_OQ>(frac, half), away)))
            });
            // i32 → i8 (the values fit), then the dwords back into order: the packs interleave
            // the 128-bit lanes as [q0 0-3, q1 0-3, q2 0-3, q3 0-3 | q0 4-7, q1 4-7, …].
            let p8 = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
            let p8 = _mm256_permutevar8x32_epi32(p8, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
            _mm256_storeu_si256(qs.as_mut_ptr().add(b * BLOCK) as *mut __m256i, p8);
            *db = scale;
        }
    }

    /// Group `g` for every row, in tiles of up to four rows and two halves of eight columns.
    ///
    /// # Safety
    /// AVX2 and FMA are available; `out` is this group's to write.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn group(w: &Q8Matrix, acts: &Acts, g: usize, out: Out) {
        let (j0, ncols) = w.cols(g);
        for r0 in (0..acts.m).step_by(4) {
            for h in 0..ncols.div_ceil(8) {
                let mut vals = [[0f32; 8]; 4];
                let rows = (acts.m - r0).min(4);
                match rows {
                    1 => dot::<1>(w, acts, g, h, r0, &mut vals),
                    2 => dot::<2>(w, acts, g, h, r0, &mut vals),
                    3 => dot::<3>(w, acts, g, h, r0, &mut vals),
                    _ => dot::<4>(w, acts, g, h, r0, &mut vals),
                }
                let n = (ncols - 8 * h).min(8);
                for (i, v) in vals.iter().enumerate().take(rows) {
                    out.put(r0 + i, j0 + 8 * h, &v[..n]);
                }
            }
        }
    }

    /// Columns 8h..8h + 8 of group `g` against rows r0..r0 + R. A weight register holds four
    /// values of each of eight columns; each row's matching four values are broadcast against
    /// it. `maddubs` multiplies unsigned by signed bytes, so the weight's sign is moved onto the
    /// activation (|w| · x·sign(w) = w · x); its i16 pair sums cannot saturate as |w|, |x| ≤ 127.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn dot<const R: usize>(w: &Q8Matrix, acts: &Acts, g: usize, h: usize, r0: usize, vals: &mut [[f32; 8]; 4]) {
        let (qg, dg) = w.group(g);
        let (k, kb) = (acts.k, acts.k / BLOCK);
        let ones = _mm256_set1_epi16(1);
        let mut acc = [_mm256_setzero_ps(); R];
        for b in 0..kb {
            let blk = qg.as_ptr().add(b * GBLOCK + 8 * 4 * h);
            let mut sums = [_mm256_setzero_si256(); R];
            for kk in 0..BLOCK / 4 {
                let wv = _mm256_loadu_si256(blk.add(kk * GROUP * 4) as *const __m256i);
                let aw = _mm256_sign_epi8(wv, wv);
                for (i, s) in sums.iter_mut().enumerate() {
                    let x4 = (acts.q.as_ptr().add((r0 + i) * k + b * BLOCK + 4 * kk) as *const i32).read_unaligned();
                    let sx = _mm256_sign_epi8(_mm256_set1_epi32(x4), wv);
                    *s = _mm256_add_epi32(*s, _mm256_madd_epi16(_mm256_maddubs_epi16(aw, sx), ones));
                }
            }
            let ws = _mm256_loadu_ps(dg.as_ptr().add(b * GROUP + 8 * h));
            for (i, a) in acc.iter_mut().enumerate() {
                let scale = _mm256_mul_ps(ws, _mm256_set1_ps(*acts.d.get_unchecked((r0 + i) * kb + b)));
                *a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums[i]), scale, *a);
            }
        }
        for i in 0..R {
            _mm256_storeu_ps(vals[i].as_mut_ptr(), acc[i]);
        }
    }
}

/// AVX-512 VNNI: `vpdpbusd` sums four unsigned × signed byte products into each of 16 i32
/// lanes, one lane per column of a group. The activations come offset by 128 (`x + 128` is
/// unsigned), and `128 · Σ w` of the block, from one more `vpdpbusd` per weight register shared
/// by all rows, is taken off again: the exact integer sums of the other kernels.
#[cfg(target_arch = "x86_64")]
mod vnni {
    use super::{Acts, Out, Q8Matrix, BLOCK, GBLOCK, GROUP};
    use std::arch::x86_64::*;

    pub(super) fn available() -> bool {
        static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *ON.get_or_init(|| is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512vnni"))
    }

    /// Group `g` for every row, in tiles of up to eight rows.
    ///
    /// # Safety
    /// [`available`]; `xu` holds the activations offset by 128; `out` is this group's to write.
    #[target_feature(enable = "avx512f,avx512vnni")]
    pub(super) unsafe fn group(w: &Q8Matrix, acts: &Acts, xu: &[u8], g: usize, out: Out) {
        let (j0, ncols) = w.cols(g);
        for r0 in (0..acts.m).step_by(8) {
            let rows = (acts.m - r0).min(8);
            let mut vals = [[0f32; GROUP]; 8];
            match rows {
                1 => dot::<1>(w, acts, xu, g, r0, &mut vals),
                2 => dot::<2>(w, acts, xu, g, r0, &mut vals),
                3 => dot::<3>(w, acts, xu, g, r0, &mut vals),
                4 => dot::<4>(w, acts, xu, g, r0, &mut vals),
                5 => dot::<5>(w, acts, xu, g, r0, &mut vals),
                6 => dot::<6>(w, acts, xu, g, r0, &mut vals),
                7 => dot::<7>(w, acts, xu, g, r0, &mut vals),
                _ => dot::<8>(w, acts, xu, g, r0, &mut vals),
            }
            for (i, v) in vals.iter().enumerate().take(rows) {
                out.put(r0 + i, j0, &v[..ncols]);
            }
        }
    }

    #[target_feature(enable = "avx512f,avx512vnni")]
    unsafe fn dot<const R: usize>(
        w: &Q8Matrix,
        acts: &Acts,
        xu: &[u8],
        g: usize,
        r0: usize,
        vals: &mut [[f32; GROUP]; 8],
    ) {
        let (qg, dg) = w.group(g);
        let (k, kb) = (acts.k, acts.k / BLOCK);
        assert!(xu.len() >= (r0 + R) * k);
        let offset = _mm512_set1_epi8(i8::MIN); // the byte 0x80: 128 as unsigned
        let mut acc = [_mm512_setzero_ps(); R];
        for b in 0..kb {
            let blk = qg.as_ptr().add(b * GBLOCK);
            let mut corr = _mm512_setzero_si512();
            let mut sums = [_mm512_setzero_si512(); R];
            for kk in 0..BLOCK / 4 {
                let wv = _mm512_loadu_si512(blk.add(kk * GROUP * 4) as *const _);
                corr = _mm512_dpbusd_epi32(corr, offset, wv);
                for (i, s) in sums.iter_mut().enumerate() {
                    let x4 = (xu.as_ptr().add((r0 + i) * k + b * BLOCK + 4 * kk) as *const i32).read_unaligned();
                    *s = _mm512_dpbusd_epi32(*s, _mm512_set1_epi32(x4), wv);
                }
            }
            let ws = _mm512_loadu_ps(dg.as_ptr().add(b * GROUP));
            for (i, a) in acc.iter_mut().enumerate() {
                let exact = _mm512_sub_epi32(sums[i], corr);
                let scale = _mm512_mul_ps(ws, _mm512_set1_ps(*acts.d.get_unchecked((r0 + i) * kb + b)));
                *a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(exact), scale, *a);
            }
        }
        for i in 0..R {
            _mm512_storeu_ps(vals[i].as_mut_ptr(), acc[i]);
        }
    }
}

/// Intel AMX (`tdpbssd`): a 16-row × 32-byte activation tile times a group's 8 × 64-byte block
/// tile gives the 16 × 16 exact block sums at once; AVX-512 then folds them into the
/// accumulators. The tile instructions are written in `asm!` (their intrinsics are not stable).
#[cfg(target_arch = "x86_64")]
mod amx {
    use super::{Acts, Out, Q8Matrix, BLOCK, GBLOCK, GROUP, TILE_ROWS};
    use std::arch::asm;
    use std::arch::x86_64::*;

    /// The CPU has AMX-INT8 and AVX-512F, and Linux granted this process the tile state.
    /// `MINIWOB_STEER_NO_AMX=1` turns it off (the results are the same bits either way).
    pub(super) fn available() -> bool {
        static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *ON.get_or_init(|| {
            if std::env::var_os("MINIWOB_STEER_NO_AMX").is_some_and(|v| v != "0") {
                return false;
            }
            let edx = __cpuid_count(7, 0).edx;
            let (tile, int8) = (edx >> 24 & 1 == 1, edx >> 25 & 1 == 1);
            if !(tile && int8 && is_x86_feature_detected!("avx512f")) {
                return false;
            }
            // ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA: without it tile instructions fault.
            const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
            const XFEATURE_XTILEDATA: libc::c_long = 18;
            // SAFETY: a plain syscall with integer arguments.
            let rc = unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) };
            if rc != 0 {
                tracing::debug!("AMX: the kernel refused the tile state ({})", std::io::Error::last_os_error());
            }
            rc == 0
        })
    }

    /// The tile configuration (palette 1), for two blocks at a time: tmm0-1 the 16 × 16 i32
    /// sums, tmm2-3 the activations (16 rows × 32 bytes), tmm4-5 a group's blocks (8 rows × 64
    /// bytes).
    #[repr(C, align(64))]
    struct Config {
        palette: u8,
        start_row: u8,
        reserved: [u8; 14],
        colsb: [u16; 16],
        rows: [u8; 16],
    }

    /// Groups `groups` for every row.
    ///
    /// # Safety
    /// [`available`]; `acts` holds a multiple of 16 rows; `out` is these groups' to write.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn groups(w: &Q8Matrix, acts: &Acts, groups: std::ops::Range<usize>, out: Out) {
        let mut cfg = Config { palette: 1, start_row: 0, reserved: [0; 14], colsb: [0; 16], rows: [0; 16] };
        for t in 0..2 {
            (cfg.colsb[t], cfg.rows[t]) = (64, TILE_ROWS as u8);
            (cfg.colsb[2 + t], cfg.rows[2 + t]) = (BLOCK as u16, TILE_ROWS as u8);
            (cfg.colsb[4 + t], cfg.rows[4 + t]) = (64, (BLOCK / 4) as u8);
        }
        // The configuration is per thread, so each call on a pool thread loads it.
        asm!("ldtilecfg [{}]", in(reg) &cfg as *const Config, options(nostack, readonly));
        let (k, kb) = (acts.k, acts.k / BLOCK);
        #[repr(C, align(64))]
        struct Sums([i32; 4 * TILE_ROWS * GROUP]);
        let mut sums = Sums([0; 4 * TILE_ROWS * GROUP]);
        let tile = TILE_ROWS * GROUP;
        for g in groups {
            let (qg, dg) = w.group(g);
            let (j0, ncols) = w.cols(g);
            for r0 in (0..acts.m).step_by(TILE_ROWS) {
                let mut acc = [_mm512_setzero_ps(); TILE_ROWS];
                let xt = acts.q.as_ptr().add(r0 * k);
                // Two blocks per step on separate tiles, so the second product overlaps the first;
                // steps alternate between two halves of `sums`, so the vector unit folds one
                // step's sums while the tile unit computes and stores the next.
                let step = |b: usize, s: *mut i32| {
                    if b + 1 < kb {
                        asm!(
                            "tilezero tmm0",
                            "tilezero tmm1",
                            "tileloadd tmm2, [{x} + {xs} * 1]",
                            "tileloadd tmm4, [{w} + {ws} * 1]",
                            "tileloadd tmm3, [{x} + {xs} * 1 + 32]",
                            "tileloadd tmm5, [{w} + {ws} * 1 + 512]",
                            "tdpbssd tmm0, tmm2, tmm4",
                            "tdpbssd tmm1, tmm3, tmm5",
                            "tilestored [{s} + {ss} * 1], tmm0",
                            "tilestored [{s} + {ss} * 1 + 1024], tmm1",
                            x = in(reg) xt.add(b * BLOCK),
                            xs = in(reg) k,
                            w = in(reg) qg.as_ptr().add(b * GBLOCK),
                            ws = in(reg) GROUP * 4,
                            s = in(reg) s,
                            ss = in(reg) GROUP * 4,
                            options(nostack),
                        );
                    } else {
                        asm!(
                            "tilezero tmm0",
                            "tileloadd tmm2, [{x} + {xs} * 1]",
                            "tileloadd tmm4, [{w} + {ws} * 1]",
                            "tdpbssd tmm0, tmm2, tmm4",
                            "tilestored [{s} + {ss} * 1], tmm0",
                            x = in(reg) xt.add(b * BLOCK),
                            xs = in(reg) k,
                            w = in(reg) qg.as_ptr().add(b * GBLOCK),
                            ws = in(reg) GROUP * 4,
                            s = in(reg) s,
                            ss = in(reg) GROUP * 4,
                            options(nostack),
                        );
                    }
                };
                // Blocks b and b + 1 from `s`, in block order.
                macro_rules! fold {
                    ($b:expr, $s:expr) => {
                        for bb in $b..kb.min($b + 2) {
                            let ws = _mm512_loadu_ps(dg.as_ptr().add(bb * GROUP));
                            let sb = ($s as *const i32).add((bb - $b) * tile);
                            for (i, a) in acc.iter_mut().enumerate() {
                                let s = _mm512_cvtepi32_ps(_mm512_load_si512(sb.add(i * GROUP) as *const _));
                                let scale =
                                    _mm512_mul_ps(ws, _mm512_set1_ps(*acts.d.get_unchecked((r0 + i) * kb + bb)));
                                *a = _mm512_fmadd_ps(s, scale, *a);
                            }
                        }
                    };
                }
                let base = sums.0.as_mut_ptr();
                let half = |p: usize| base.add(p % 2 * 2 * tile);
                let steps = kb.div_ceil(2);
                step(0, half(0));
                for p in 1..steps {
                    step(2 * p, half(p));
                    fold!(2 * (p - 1), half(p - 1));
                }
                fold!(2 * (steps - 1), half(steps - 1));
                let mut vals = [0f32; GROUP];
                for (i, a) in acc.iter().enumerate().take(acts.m - r0) {
                    _mm512_storeu_ps(vals.as_mut_ptr(), *a);
                    out.put(r0 + i, j0, &vals[..ncols]);
                }
            }
        }
        // Hands the tile state back, so context switches stop saving 8 KiB of it.
        asm!("tilerelease", options(nostack, nomem));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::kernels::tests::lcg;

    /// The exact integer result of the quantized product, computed independently in f64.
    fn reference(w: &Q8Matrix, x: &[f32], m: usize) -> Vec<f32> {
        let (n, k) = (w.n, w.k);
        let kb = k / BLOCK;
        let mut xq = vec![0i8; m * k];
        let mut xd = vec![0f32; m * kb];
        for r in 0..m {
            quantize_row(&x[r * k..(r + 1) * k], &mut xq[r * k..(r + 1) * k], &mut xd[r * kb..(r + 1) * kb]);
        }
        let mut out = vec![0f32; m * n];
        for j in 0..n {
            let (wq, wd) = w.column(j);
            for r in 0..m {
                let mut acc = 0f64;
                for b in 0..kb {
                    let s: i64 = (0..BLOCK).map(|t| wq[b * BLOCK + t] as i64 * xq[r * k + b * BLOCK + t] as i64).sum();
                    acc += s as f64 * wd[b] as f64 * xd[r * kb + b] as f64;
                }
                out[r * n + j] = acc as f32;
            }
        }
        out
    }

    #[test]
    fn every_kernel_gives_the_same_bits_for_every_row_count() {
        // 37 columns: two full groups and a ragged one; 3 blocks.
        let (n, k) = (37, 96);
        let w = Q8Matrix::quantize(&lcg(1, n * k), n, k).unwrap();
        let kernels: Vec<Kernel> =
            [Kernel::Scalar, Kernel::Avx2, Kernel::Vnni, Kernel::Amx].into_iter().filter(|k| k.available()).collect();
        eprintln!("kernels on this CPU: {kernels:?}");
        for m in [1, 2, 3, 4, 5, 8, 9, 16, 17, 33] {
            let x = lcg(2 + m as u64, m * k);
            let want = reference(&w, &x, m);
            let scalar = w.matmul_with(&x, m, Kernel::Scalar).unwrap();
            for (g, e) in scalar.iter().zip(&want) {
                assert!((g - e).abs() <= 1e-5 * e.abs().max(1.0), "m={m}: {g} vs {e}");
            }
            for &kernel in &kernels {
                let got = w.matmul_with(&x, m, kernel).unwrap();
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                // Bit for bit: the SIMD and tile kernels compute the scalar code's arithmetic.
                assert_eq!(bits(&got), bits(&scalar), "m={m}: {kernel:?} vs scalar");
                // And every row's numbers are the same whatever the row count and kernel.
                for r in 0..m {
                    let alone = w.matmul(&x[r * k..(r + 1) * k], 1).unwrap();
                    assert_eq!(bits(&alone), bits(&got[r * n..(r + 1) * n]), "m={m} row {r} {kernel:?}");
                }
            }
            assert_eq!(w.matmul(&x, m).unwrap(), scalar, "m={m}: the default kernel");
        }
    }

    #[test]
    fn simd_quantization_is_the_scalar_one_ties_included() {
        // A block whose scale is 1 (max 127), so its other values, −15.5..=14.5, are exact ties;
        // a zero block; random blocks.
        let mut x = lcg(11, 4 * BLOCK);
        for (i, v) in x.iter_mut().enumerate().take(BLOCK) {
            *v = if i == BLOCK - 1 { 127.0 } else { i as f32 - 15.5 };
        }
        x[BLOCK..2 * BLOCK].fill(0.0);
        x[2 * BLOCK] = -3.0;
        let (mut q1, mut d1) = (vec![0i8; x.len()], vec![0f32; 4]);
        let (mut q2, mut d2) = (vec![0i8; x.len()], vec![0f32; 4]);
        quantize_row_scalar(&x, &mut q1, &mut d1);
        quantize_row(&x, &mut q2, &mut d2);
        assert_eq!(q1, q2);
        assert_eq!(
            d1.iter().map(|d| d.to_bits()).collect::<Vec<_>>(),
            d2.iter().map(|d| d.to_bits()).collect::<Vec<_>>()
        );
        assert_eq!((q1[0], q1[15], q1[16], q1[BLOCK - 1]), (-16, -1, 1, 127), "ties round away from zero");
        assert!(q1[BLOCK..2 * BLOCK].iter().all(|&q| q == 0));
    }

    #[test]
    fn unavailable_kernels_are_refused() {
        let w = Q8Matrix::quantize(&[0.0; 64], 2, 32).unwrap();
        for kernel in [Kernel::Avx2, Kernel::Vnni, Kernel::Amx] {
            if !kernel.available() {
                let e = w.matmul_with(&[0.0; 32], 1, kernel).unwrap_err().to_string();
                assert!(e.contains("no") && e.contains(&format!("{kernel:?}")), "{e}");
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
