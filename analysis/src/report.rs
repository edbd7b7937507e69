//! Builds the comparison, per-task, model and problem tables.

use crate::aggregate::{fmt_num, group_label, GroupStats, KeyCol};
use crate::ingest::{Ingested, Rows};
use crate::pairing::Pairing;
use crate::registry;
use crate::table::{dec1, pct, pp, pval, Table};

/// The comparison table for groups keyed by `by` (also used for the per-task table).
pub fn comparison_table(r: &Rows, by: &[KeyCol], groups: &[GroupStats]) -> Table {
    let mut t = Table::default();
    for (j, k) in by.iter().enumerate() {
        match k {
            KeyCol::Layer => {
                let v = groups.iter().map(|g| r.layer_value(g.key[j])).collect();
                let c = t.i64(k.name(), k.name(), v);
                c.right = false;
                for cell in c.cells.iter_mut().filter(|s| s.is_empty()) {
                    *cell = "—".into();
                }
            }
            KeyCol::Coeff => {
                let v = groups.iter().map(|g| Some(r.coeff_value(g.key[j]))).collect();
                t.f64(k.name(), k.name(), v, fmt_num).right = false;
            }
            _ => {
                let v = groups.iter().map(|g| Some(k.display(r, g.key[j])).filter(|s| s != "—")).collect();
                let c = t.str(k.name(), k.name(), v);
                for cell in c.cells.iter_mut().filter(|s| s.is_empty()) {
                    *cell = "—".into();
                }
            }
        }
    }
    if groups.iter().any(|g| g.variant != 0) {
        let v = groups
            .iter()
            .map(|g| (g.variant != 0).then(|| r.vector_hashes.name(g.variant).unwrap_or("null").to_string()))
            .collect();
        let c = t.str("mixed_vector_hash", "⚠ mixed runs: vector_hash", v);
        for cell in c.cells.iter_mut().filter(|s| !s.is_empty()) {
            *cell = format!("⚠ {cell}");
        }
    }
    let opt = |f: &dyn Fn(&GroupStats) -> Option<f64>| groups.iter().map(f).collect::<Vec<_>>();
    t.i64("episodes", "episodes", groups.iter().map(|g| Some(g.n as i64)).collect());
    t.f64("baseline_success", "baseline", opt(&|g| Some(g.base_rate())), pct);
    t.f64("steered_success", "steered", opt(&|g| g.steered_rate()), pct);
    t.f64("delta", "Δ (pp)", opt(&|g| g.delta()), pp);
    t.md_only(
        "95% CI (pp)",
        groups.iter().map(|g| g.ci.map(|(lo, hi)| format!("[{}, {}]", pp(lo), pp(hi))).unwrap_or_default()).collect(),
    );
    t.f64("ci_low", "ci_low", opt(&|g| g.ci.map(|c| c.0)), pp).md = false;
    t.f64("ci_high", "ci_high", opt(&|g| g.ci.map(|c| c.1)), pp).md = false;
    t.f64("mcnemar_p", "McNemar p", opt(&|g| g.p), pval);
    t.md_only(
        "b/c",
        groups
            .iter()
            .map(|g| if g.baseline_only { String::new() } else { format!("{}/{}", g.b_only, g.c_only) })
            .collect(),
    );
    t.i64(
        "baseline_only_success",
        "b",
        groups.iter().map(|g| (!g.baseline_only).then_some(g.b_only as i64)).collect(),
    )
    .md = false;
    t.i64(
        "steered_only_success",
        "c",
        groups.iter().map(|g| (!g.baseline_only).then_some(g.c_only as i64)).collect(),
    )
    .md = false;
    t.f64("baseline_parse_fail", "parse fail (b)", opt(&|g| Some(g.base_parse_fail as f64 / g.n as f64)), pct);
    t.f64(
        "steered_parse_fail",
        "parse fail (s)",
        opt(&|g| (!g.baseline_only).then(|| g.steered_parse_fail as f64 / g.n as f64)),
        pct,
    );
    t.f64("baseline_mean_steps", "steps (b)", opt(&|g| Some(g.base_steps)), dec1);
    t.f64("steered_mean_steps", "steps (s)", opt(&|g| (!g.baseline_only).then_some(g.steered_steps)), dec1);
    t.f64("baseline_mean_tokens_out", "tok out (b)", opt(&|g| Some(g.base_tokens_out)), dec1);
    t.f64("steered_mean_tokens_out", "tok out (s)", opt(&|g| (!g.baseline_only).then_some(g.steered_tokens_out)), dec1);
    t
}

fn params_value(p: &str) -> f64 {
    let (num, mult) = match p.chars().last() {
        Some('B') => (&p[..p.len() - 1], 1e9),
        Some('M') => (&p[..p.len() - 1], 1e6),
        _ => (p, 1.0),
    };
    num.parse::<f64>().map_or(f64::INFINITY, |x| x * mult)
}

/// One line per model: registry family and size, pooled baseline and steered success, parse
/// failures, and the best group of `fine` (groups keyed by model, layer, coeff, prompt pair).
pub fn model_table(r: &Rows, p: &Pairing, fine_by: &[KeyCol], fine: &[GroupStats]) -> Table {
    let nm = r.models.len();
    let mut b_n = vec![0u64; nm];
    let mut b_s = vec![0u64; nm];
    let mut b_pf = vec![0u64; nm];
    let mut s_n = vec![0u64; nm];
    let mut s_s = vec![0u64; nm];
    let mut s_pf = vec![0u64; nm];
    for &i in &p.unique_baselines {
        let (i, m) = (i as usize, r.model[i as usize] as usize);
        b_n[m] += 1;
        b_s[m] += u64::from(r.success(i));
        b_pf[m] += u64::from(r.parse_failure(i));
    }
    for &i in &p.unique_steered {
        let (i, m) = (i as usize, r.model[i as usize] as usize);
        s_n[m] += 1;
        s_s[m] += u64::from(r.success(i));
        s_pf[m] += u64::from(r.parse_failure(i));
    }
    let mpos = fine_by.iter().position(|k| *k == KeyCol::Model);
    let mut models: Vec<u32> = (1..nm as u32).filter(|&m| b_n[m as usize] + s_n[m as usize] > 0).collect();
    let info = |m: u32| registry::lookup(r.models.name(m).unwrap_or(""));
    models.sort_by(|&a, &b| {
        let (ia, ib) = (info(a), info(b));
        let fam = |i: Option<registry::ModelInfo>| i.map_or("\u{10ffff}", |i| i.family);
        let size = |i: Option<registry::ModelInfo>| i.map_or(f64::INFINITY, |i| params_value(i.params));
        fam(ia).cmp(fam(ib)).then(size(ia).total_cmp(&size(ib))).then(r.models.name(a).cmp(&r.models.name(b)))
    });
    let mut t = Table::default();
    let frac = |num: &[u64], den: &[u64]| -> Vec<Option<f64>> {
        models.iter().map(|&m| (den[m as usize] > 0).then(|| num[m as usize] as f64 / den[m as usize] as f64)).collect()
    };
    t.str("model", "model", models.iter().map(|&m| r.models.name(m).map(String::from)).collect());
    t.str(
        "family",
        "family",
        models.iter().map(|&m| Some(info(m).map_or("?".into(), |i| i.family.to_string()))).collect(),
    );
    t.str(
        "params",
        "params",
        models.iter().map(|&m| Some(info(m).map_or("?".into(), |i| i.params.to_string()))).collect(),
    )
    .right = true;
    t.str(
        "layers",
        "layers",
        models.iter().map(|&m| Some(info(m).map_or("?".into(), |i| i.layers.to_string()))).collect(),
    )
    .right = true;
    t.i64("baseline_episodes", "baseline eps", models.iter().map(|&m| Some(b_n[m as usize] as i64)).collect());
    t.f64("baseline_success", "baseline", frac(&b_s, &b_n), pct);
    t.i64("steered_episodes", "steered eps", models.iter().map(|&m| Some(s_n[m as usize] as i64)).collect());
    t.f64("steered_success", "steered (all configs)", frac(&s_s, &s_n), pct);
    t.f64("baseline_parse_fail", "parse fail (b)", frac(&b_pf, &b_n), pct);
    t.f64("steered_parse_fail", "parse fail (s)", frac(&s_pf, &s_n), pct);
    let best: Vec<Option<&GroupStats>> = models
        .iter()
        .map(|&m| {
            fine.iter().filter(|g| !g.baseline_only && mpos.is_some_and(|j| g.key[j] == m)).max_by(|a, b| {
                a.delta().unwrap_or(f64::NEG_INFINITY).total_cmp(&b.delta().unwrap_or(f64::NEG_INFINITY))
            })
        })
        .collect();
    let others: Vec<KeyCol> = fine_by.iter().copied().filter(|k| *k != KeyCol::Model).collect();
    t.str(
        "best_config",
        "best config",
        best.iter()
            .map(|g| {
                g.map(|g| {
                    let mut g2 = g.clone();
                    g2.key =
                        fine_by.iter().zip(&g.key).filter(|(k, _)| **k != KeyCol::Model).map(|(_, c)| *c).collect();
                    group_label(r, &others, &g2)
                })
            })
            .collect(),
    );
    t.f64("best_delta", "best Δ (pp)", best.iter().map(|g| g.and_then(|g| g.delta())).collect(), pp);
    t.f64("best_mcnemar_p", "p", best.iter().map(|g| g.and_then(|g| g.p)).collect(), pval);
    if !p.conflicts.is_empty() {
        // the pooled columns above mix the incompatible runs: say so
        let per_model = |m: u32| p.conflicts.iter().filter(|c| c.model == m).count() as i64;
        let c = t.i64("incompatible_runs", "⚠ conflicts", models.iter().map(|&m| Some(per_model(m))).collect());
        for cell in c.cells.iter_mut() {
            if cell == "0" {
                cell.clear();
            }
        }
    }
    t
}

/// The rejected lines.
pub fn problems_table(ing: &Ingested) -> Table {
    let mut t = Table::default();
    let ps = &ing.problems;
    t.str("file", "file", ps.iter().map(|p| Some(p.file.display().to_string())).collect());
    t.i64("line", "line", ps.iter().map(|p| Some(p.line as i64)).collect());
    t.str("kind", "kind", ps.iter().map(|p| Some(p.kind.label().to_string())).collect());
    t.str("message", "message", ps.iter().map(|p| Some(p.message.clone())).collect());
    t
}

/// The incompatible-run conflicts.
pub fn conflicts_table(p: &Pairing) -> Table {
    let mut t = Table::default();
    let cs = &p.conflicts;
    t.str("key", "key", cs.iter().map(|c| Some(c.key.clone())).collect());
    t.str("first_source", "first", cs.iter().map(|c| Some(c.first_source.clone())).collect());
    t.str("first_vector_hash", "vector_hash", cs.iter().map(|c| Some(c.first_hash.clone())).collect());
    t.str("other_source", "other", cs.iter().map(|c| Some(c.other_source.clone())).collect());
    t.str("other_vector_hash", "vector_hash", cs.iter().map(|c| Some(c.other_hash.clone())).collect());
    t
}
