//! Paired statistics: McNemar's exact test and a seeded paired bootstrap CI for Δ success.
//!
//! A paired unit is one (task, seed) episode run both as baseline and steered. With binary outcomes a
//! unit is one of four cells: both fail, baseline only (`b`), steered only (`c`), both succeed.
//! Δ = steered − baseline success = (c − b) / n.

use rand::rngs::StdRng;
use rand::SeedableRng;
use rand_distr::{Binomial, Distribution};

/// Default number of bootstrap resamples.
pub const DEFAULT_RESAMPLES: usize = 2000;

/// Two-sided exact McNemar test on the discordant pairs: `b` = baseline succeeded and steered failed,
/// `c` = the reverse. p = min(1, 2·P(X ≤ min(b, c))) with X ~ Bin(b + c, 1/2); p = 1 when b + c = 0.
pub fn mcnemar_exact_p(b: u64, c: u64) -> f64 {
    let n = b + c;
    if n == 0 {
        return 1.0;
    }
    let k = b.min(c);
    let tail = if n <= 120 {
        // Exact integer combinatorics: Σ_{i≤k} C(n, i) < 2^n ≤ 2^120 fits in u128.
        let mut c_ni: u128 = 1; // C(n, 0)
        let mut sum: u128 = 1;
        for i in 0..k {
            c_ni = c_ni * u128::from(n - i) / u128::from(i + 1);
            sum += c_ni;
        }
        sum as f64 / 2f64.powi(n as i32)
    } else {
        // Log space: log pmf(0) = n·ln ½, pmf(i+1) = pmf(i)·(n−i)/(i+1); log-sum-exp.
        let mut lp = n as f64 * 0.5f64.ln();
        let mut terms = Vec::with_capacity(k as usize + 1);
        terms.push(lp);
        for i in 0..k {
            lp += ((n - i) as f64).ln() - ((i + 1) as f64).ln();
            terms.push(lp);
        }
        let m = terms.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        (m + terms.iter().map(|t| (t - m).exp()).sum::<f64>().ln()).exp()
    };
    (2.0 * tail).min(1.0)
}

/// 95% (or `level`) percentile bootstrap CI of Δ = (c − b)/n over `n` paired units of which `b` are
/// baseline-only successes and `c` steered-only successes.
///
/// Resampling n units with replacement draws the four cell counts from Multinomial(n; p00, b/n, c/n,
/// p11), and Δ* depends only on the two discordant counts, so each resample draws
/// c* ~ Bin(n, c/n) and b* | c* ~ Bin(n − c*, (b/n)/(1 − c/n)): the same distribution as resampling
/// units one by one, in O(1) per resample. Deterministic for a given `seed`.
pub fn bootstrap_delta_ci(n: u64, b: u64, c: u64, resamples: usize, level: f64, seed: u64) -> (f64, f64) {
    assert!(b + c <= n, "discordant counts exceed the number of units");
    if n == 0 || resamples == 0 {
        return (f64::NAN, f64::NAN);
    }
    let nf = n as f64;
    let p_c = c as f64 / nf;
    let p_b = b as f64 / nf;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut deltas = Vec::with_capacity(resamples);
    let bin_c = Binomial::new(n, p_c).expect("valid binomial");
    for _ in 0..resamples {
        let cs = bin_c.sample(&mut rng);
        let rest = n - cs;
        let q = if p_c >= 1.0 { 0.0 } else { (p_b / (1.0 - p_c)).clamp(0.0, 1.0) };
        let bs =
            if rest == 0 || q == 0.0 { 0 } else { Binomial::new(rest, q).expect("valid binomial").sample(&mut rng) };
        deltas.push((cs as f64 - bs as f64) / nf);
    }
    deltas.sort_by(|a, b| a.total_cmp(b));
    let alpha = (1.0 - level) / 2.0;
    (quantile_sorted(&deltas, alpha), quantile_sorted(&deltas, 1.0 - alpha))
}

/// Linear-interpolation quantile (type 7) of sorted data.
pub fn quantile_sorted(xs: &[f64], q: f64) -> f64 {
    if xs.is_empty() {
        return f64::NAN;
    }
    let pos = q.clamp(0.0, 1.0) * (xs.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = pos.ceil() as usize;
    xs[lo] + (xs[hi] - xs[lo]) * (pos - lo as f64)
}

/// FNV-1a, used to derive a per-group bootstrap seed from the group's key text so results do not
/// depend on row order.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &x in bytes {
        h ^= u64::from(x);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;

    #[test]
    fn mcnemar_known_values() {
        assert_eq!(mcnemar_exact_p(10, 2), 0.03857421875);
        assert_eq!(mcnemar_exact_p(2, 10), 0.03857421875);
        assert_eq!(mcnemar_exact_p(5, 5), 1.0);
        assert_eq!(mcnemar_exact_p(0, 6), 0.03125);
        assert_eq!(mcnemar_exact_p(0, 0), 1.0);
        assert_eq!(mcnemar_exact_p(4, 8), 0.3876953125);
        assert_eq!(mcnemar_exact_p(0, 1), 1.0);
    }

    #[test]
    fn mcnemar_log_space_matches_exact_branch() {
        // n = 120 uses integers, n = 121 log space; both must agree with a direct f64 evaluation.
        for &(b, c) in &[(50u64, 70u64), (50, 71), (100, 160), (300, 420)] {
            let p = mcnemar_exact_p(b, c);
            let n = b + c;
            let mut lp = n as f64 * 0.5f64.ln();
            let mut sum = lp.exp();
            for i in 0..b.min(c) {
                lp += ((n - i) as f64).ln() - ((i + 1) as f64).ln();
                sum += lp.exp();
            }
            let want = (2.0 * sum).min(1.0);
            assert!((p - want).abs() <= 1e-12 * want.max(1e-300), "{b},{c}: {p} vs {want}");
        }
        assert!(mcnemar_exact_p(5000, 6000) < 1e-20);
    }

    #[test]
    fn bootstrap_ci_contains_true_delta_and_is_seeded() {
        // 400 units drawn with baseline p = 0.4 and steered p = 0.6 (independent): true Δ = 0.2.
        let mut rng = StdRng::seed_from_u64(7);
        let (mut b, mut c) = (0u64, 0u64);
        let n = 400u64;
        for _ in 0..n {
            let bs = rng.random_bool(0.4);
            let ss = rng.random_bool(0.6);
            match (bs, ss) {
                (true, false) => b += 1,
                (false, true) => c += 1,
                _ => {}
            }
        }
        let (lo, hi) = bootstrap_delta_ci(n, b, c, DEFAULT_RESAMPLES, 0.95, 1);
        assert!(lo < 0.2 && 0.2 < hi, "CI [{lo}, {hi}] misses 0.2");
        assert!(lo > 0.0, "an effect this size on 400 units should exclude 0: [{lo}, {hi}]");
        assert_eq!((lo, hi), bootstrap_delta_ci(n, b, c, DEFAULT_RESAMPLES, 0.95, 1));
        // Half-width close to the normal approximation sqrt((b + c)/n² − Δ̂²/n)·1.96.
        let d = (c as f64 - b as f64) / n as f64;
        let se = (((b + c) as f64 / n as f64 - d * d) / n as f64).sqrt();
        assert!(((hi - lo) / 2.0 - 1.96 * se).abs() < 0.01, "{lo} {hi} {se}");
    }

    #[test]
    fn multinomial_shortcut_matches_unit_resampling() {
        // Resample units one by one and compare the CI with the O(1) shortcut.
        let (n, b, c) = (200u64, 30u64, 50u64);
        let mut units = vec![0i8; n as usize];
        units[..b as usize].fill(-1);
        units[b as usize..(b + c) as usize].fill(1);
        let mut rng = StdRng::seed_from_u64(3);
        let mut ds: Vec<f64> = (0..4000)
            .map(|_| {
                let s: i64 = (0..n).map(|_| units[rng.random_range(0..n as usize)] as i64).sum();
                s as f64 / n as f64
            })
            .collect();
        ds.sort_by(|a, b| a.total_cmp(b));
        let (lo, hi) = bootstrap_delta_ci(n, b, c, 4000, 0.95, 9);
        assert!((lo - quantile_sorted(&ds, 0.025)).abs() < 0.015, "{lo}");
        assert!((hi - quantile_sorted(&ds, 0.975)).abs() < 0.015, "{hi}");
    }

    #[test]
    fn degenerate_bootstrap() {
        assert_eq!(bootstrap_delta_ci(10, 0, 0, 100, 0.95, 1), (0.0, 0.0));
        assert_eq!(bootstrap_delta_ci(10, 0, 10, 100, 0.95, 1), (1.0, 1.0));
        assert!(bootstrap_delta_ci(0, 0, 0, 100, 0.95, 1).0.is_nan());
    }
}
