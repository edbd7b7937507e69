//! Group-by aggregation of the paired units with polars, then the paired statistics per group.

use std::cmp::Ordering;

use anyhow::{bail, Result};
use polars::prelude::*;

use crate::ingest::{Rows, F_VLM};
use crate::pairing::{Pairing, NONE};
use crate::stats;

/// A column results can be grouped by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyCol {
    Experiment,
    Model,
    Layer,
    Coeff,
    CoeffMode,
    PromptPair,
    VectorMethod,
    Protocol,
    Task,
    Vlm,
}

impl KeyCol {
    pub const ALL: [KeyCol; 10] = [
        KeyCol::Experiment,
        KeyCol::Model,
        KeyCol::Layer,
        KeyCol::Coeff,
        KeyCol::CoeffMode,
        KeyCol::PromptPair,
        KeyCol::VectorMethod,
        KeyCol::Protocol,
        KeyCol::Task,
        KeyCol::Vlm,
    ];

    pub fn name(self) -> &'static str {
        match self {
            KeyCol::Experiment => "experiment",
            KeyCol::Model => "model",
            KeyCol::Layer => "layer",
            KeyCol::Coeff => "coeff",
            KeyCol::CoeffMode => "coeff_mode",
            KeyCol::PromptPair => "prompt_pair",
            KeyCol::VectorMethod => "vector_method",
            KeyCol::Protocol => "protocol",
            KeyCol::Task => "task",
            KeyCol::Vlm => "vlm",
        }
    }

    /// Parses one `--by` name (`prompt_type`, exp12's name, is an alias of `prompt_pair`).
    pub fn parse(s: &str) -> Result<KeyCol> {
        let s = s.trim();
        if s == "prompt_type" || s == "prompt-type" {
            return Ok(KeyCol::PromptPair);
        }
        match KeyCol::ALL.iter().find(|k| k.name() == s || k.name().replace('_', "-") == s) {
            Some(k) => Ok(*k),
            None => bail!(
                "unknown --by column {s:?}; expected one of {}",
                KeyCol::ALL.iter().map(|k| k.name()).collect::<Vec<_>>().join(", ")
            ),
        }
    }

    /// `keys`, with [`KeyCol::Protocol`] added when the rows hold more than one protocol: results
    /// of two protocols are never pooled.
    pub fn with_protocol(keys: &[KeyCol], r: &Rows) -> Vec<KeyCol> {
        let mut k = keys.to_vec();
        // Code 0 of a dictionary is null: more than one protocol means more than two entries.
        if r.protocols.len() > 2 && !k.contains(&KeyCol::Protocol) {
            k.push(KeyCol::Protocol);
        }
        k
    }

    /// Parses a comma-separated list, without repeats.
    pub fn parse_list(s: &str) -> Result<Vec<KeyCol>> {
        let mut out = Vec::new();
        for part in s.split(',').filter(|p| !p.trim().is_empty()) {
            let k = KeyCol::parse(part)?;
            if !out.contains(&k) {
                out.push(k);
            }
        }
        Ok(out)
    }

    fn code(self, r: &Rows, i: usize) -> u32 {
        match self {
            KeyCol::Experiment => r.experiment[i],
            KeyCol::Model => r.model[i],
            KeyCol::Layer => r.layer[i],
            KeyCol::Coeff => r.coeff[i],
            KeyCol::CoeffMode => r.coeff_mode[i],
            KeyCol::PromptPair => r.prompt_pair[i],
            KeyCol::VectorMethod => r.vector_method[i],
            KeyCol::Protocol => r.protocol[i],
            KeyCol::Task => r.task[i],
            KeyCol::Vlm => u32::from(r.flags[i] & F_VLM != 0),
        }
    }

    /// Text of a code ("—" for null).
    pub fn display(self, r: &Rows, code: u32) -> String {
        let s = |d: &crate::ingest::Dict| d.name(code).unwrap_or("—").to_string();
        match self {
            KeyCol::Experiment => s(&r.experiments),
            KeyCol::Model => s(&r.models),
            KeyCol::Layer => r.layer_value(code).map_or("—".into(), |l| l.to_string()),
            KeyCol::Coeff => fmt_num(r.coeff_value(code)),
            KeyCol::CoeffMode => s(&r.coeff_modes),
            KeyCol::PromptPair => s(&r.prompt_pairs),
            KeyCol::VectorMethod => s(&r.vector_methods),
            KeyCol::Protocol => s(&r.protocols),
            KeyCol::Task => s(&r.tasks),
            KeyCol::Vlm => (code == 1).to_string(),
        }
    }

    /// Numeric value for plots and sorting (layer, coeff).
    pub fn numeric(self, r: &Rows, code: u32) -> Option<f64> {
        match self {
            KeyCol::Layer => r.layer_value(code).map(|l| l as f64),
            KeyCol::Coeff => Some(r.coeff_value(code)),
            KeyCol::Vlm => Some(code as f64),
            _ => None,
        }
    }

    fn compare(self, r: &Rows, a: u32, b: u32) -> Ordering {
        match (self.numeric(r, a), self.numeric(r, b)) {
            (Some(x), Some(y)) => x.total_cmp(&y),
            (None, Some(_)) => Ordering::Less,
            (Some(_), None) => Ordering::Greater,
            (None, None) => self.display(r, a).cmp(&self.display(r, b)),
        }
    }
}

/// Shortest form of a number (2, 0.5, -1.25). A value that is exactly an f32 prints as that f32
/// (a runner storing α as f32 writes 0.1 as 0.10000000149011612; this shows 0.1).
pub fn fmt_num(x: f64) -> String {
    let s = if x.is_finite() && f64::from(x as f32) == x { format!("{}", x as f32) } else { format!("{x}") };
    if s == "-0" {
        "0".into()
    } else {
        s
    }
}

/// Aggregates of one group.
#[derive(Debug, Clone)]
pub struct GroupStats {
    /// Codes of the key columns, in `by` order.
    pub key: Vec<u32>,
    /// Vector-hash code when the group belongs to a run configuration with incompatible hashes.
    pub variant: u32,
    /// Only baselines (a `--base-only` run, or baselines no steered row used).
    pub baseline_only: bool,
    /// Paired units (or baseline episodes for a baseline-only group).
    pub n: u64,
    pub base_success: u64,
    pub steered_success: u64,
    /// Baseline succeeded, steered failed.
    pub b_only: u64,
    /// Steered succeeded, baseline failed.
    pub c_only: u64,
    pub base_parse_fail: u64,
    pub steered_parse_fail: u64,
    pub base_steps: f64,
    pub steered_steps: f64,
    pub base_tokens_out: f64,
    pub steered_tokens_out: f64,
    /// Bootstrap CI of Δ (None for baseline-only groups).
    pub ci: Option<(f64, f64)>,
    /// McNemar exact p (None for baseline-only groups).
    pub p: Option<f64>,
}

impl GroupStats {
    pub fn base_rate(&self) -> f64 {
        self.base_success as f64 / self.n as f64
    }
    pub fn steered_rate(&self) -> Option<f64> {
        (!self.baseline_only).then(|| self.steered_success as f64 / self.n as f64)
    }
    pub fn delta(&self) -> Option<f64> {
        (!self.baseline_only).then(|| (self.c_only as f64 - self.b_only as f64) / self.n as f64)
    }
}

/// Options of the statistics.
#[derive(Debug, Clone, Copy)]
pub struct StatOpts {
    pub resamples: usize,
    pub seed: u64,
    pub level: f64,
}

impl Default for StatOpts {
    fn default() -> Self {
        StatOpts { resamples: stats::DEFAULT_RESAMPLES, seed: 0x5eed, level: 0.95 }
    }
}

/// The unit frame: one row per analysis unit with every key column (codes) and the outcome columns.
pub fn unit_frame(r: &Rows, p: &Pairing) -> Result<DataFrame> {
    let n = p.len();
    let mut cols: Vec<Column> = Vec::new();
    for k in KeyCol::ALL {
        let v: Vec<u32> = (0..n).map(|u| k.code(r, p.key_row(u))).collect();
        cols.push(Column::new(k.name().into(), v));
    }
    cols.push(Column::new("variant".into(), p.variant.clone()));
    let kind: Vec<u32> = p.steered_row.iter().map(|&s| u32::from(s == NONE)).collect();
    cols.push(Column::new("baseline_only".into(), kind));
    let b = |f: &dyn Fn(usize) -> u32| -> Vec<u32> { p.baseline_row.iter().map(|&i| f(i as usize)).collect() };
    let s = |f: &dyn Fn(usize) -> u32| -> Vec<u32> {
        p.steered_row.iter().map(|&i| if i == NONE { 0 } else { f(i as usize) }).collect()
    };
    let succ = |i: usize| u32::from(r.success(i));
    let pf = |i: usize| u32::from(r.parse_failure(i));
    let steps = |i: usize| r.steps[i];
    let tok = |i: usize| r.tokens_out[i];
    let bs = b(&succ);
    let ss = s(&succ);
    let b_only: Vec<u32> = bs
        .iter()
        .zip(&ss)
        .zip(&p.steered_row)
        .map(|((&x, &y), &st)| u32::from(st != NONE && x == 1 && y == 0))
        .collect();
    let c_only: Vec<u32> = bs.iter().zip(&ss).map(|(&x, &y)| u32::from(x == 0 && y == 1)).collect();
    cols.push(Column::new("b_s".into(), bs));
    cols.push(Column::new("s_s".into(), ss));
    cols.push(Column::new("b_only".into(), b_only));
    cols.push(Column::new("c_only".into(), c_only));
    cols.push(Column::new("b_pf".into(), b(&pf)));
    cols.push(Column::new("s_pf".into(), s(&pf)));
    cols.push(Column::new("b_steps".into(), b(&steps)));
    cols.push(Column::new("s_steps".into(), s(&steps)));
    cols.push(Column::new("b_tok".into(), b(&tok)));
    cols.push(Column::new("s_tok".into(), s(&tok)));
    Ok(DataFrame::new(n, cols)?)
}

/// Groups the unit frame by `by` (+ variant and baseline-only), computes the statistics and sorts
/// the groups by their key values (numbers numerically).
pub fn aggregate(units: &DataFrame, r: &Rows, by: &[KeyCol], opts: StatOpts) -> Result<Vec<GroupStats>> {
    let mut keys: Vec<Expr> = by.iter().map(|k| col(k.name())).collect();
    keys.push(col("variant"));
    keys.push(col("baseline_only"));
    let sum = |c: &str| col(c).sum().cast(DataType::Int64).alias(c);
    let mean = |c: &str| col(c).cast(DataType::Float64).mean().alias(c);
    let df = units
        .clone()
        .lazy()
        .group_by(keys)
        .agg([
            len().cast(DataType::Int64).alias("n"),
            sum("b_s"),
            sum("s_s"),
            sum("b_only"),
            sum("c_only"),
            sum("b_pf"),
            sum("s_pf"),
            mean("b_steps"),
            mean("s_steps"),
            mean("b_tok"),
            mean("s_tok"),
        ])
        .collect()?;
    let h = df.height();
    let key_cols: Vec<&UInt32Chunked> =
        by.iter().map(|k| df.column(k.name()).and_then(|c| c.u32())).collect::<PolarsResult<_>>()?;
    let u32c = |c: &str| df.column(c).and_then(|c| c.u32());
    let i64c = |c: &str| df.column(c).and_then(|c| c.i64());
    let f64c = |c: &str| df.column(c).and_then(|c| c.f64());
    let (variant, kind) = (u32c("variant")?, u32c("baseline_only")?);
    let (n, b_s, s_s, b_only, c_only, b_pf, s_pf) =
        (i64c("n")?, i64c("b_s")?, i64c("s_s")?, i64c("b_only")?, i64c("c_only")?, i64c("b_pf")?, i64c("s_pf")?);
    let (b_steps, s_steps, b_tok, s_tok) = (f64c("b_steps")?, f64c("s_steps")?, f64c("b_tok")?, f64c("s_tok")?);
    let gi = |c: &Int64Chunked, i: usize| c.get(i).unwrap_or(0) as u64;
    let gf = |c: &Float64Chunked, i: usize| c.get(i).unwrap_or(f64::NAN);
    let mut out: Vec<GroupStats> = (0..h)
        .map(|i| {
            let mut g = GroupStats {
                key: key_cols.iter().map(|c| c.get(i).unwrap_or(0)).collect(),
                variant: variant.get(i).unwrap_or(0),
                baseline_only: kind.get(i) == Some(1),
                n: gi(n, i),
                base_success: gi(b_s, i),
                steered_success: gi(s_s, i),
                b_only: gi(b_only, i),
                c_only: gi(c_only, i),
                base_parse_fail: gi(b_pf, i),
                steered_parse_fail: gi(s_pf, i),
                base_steps: gf(b_steps, i),
                steered_steps: gf(s_steps, i),
                base_tokens_out: gf(b_tok, i),
                steered_tokens_out: gf(s_tok, i),
                ci: None,
                p: None,
            };
            if !g.baseline_only {
                let label = group_label(r, by, &g);
                let seed = opts.seed ^ stats::fnv1a(label.as_bytes());
                g.ci = Some(stats::bootstrap_delta_ci(g.n, g.b_only, g.c_only, opts.resamples, opts.level, seed));
                g.p = Some(stats::mcnemar_exact_p(g.b_only, g.c_only));
            }
            g
        })
        .collect();
    out.sort_by(|a, b| {
        for (j, k) in by.iter().enumerate() {
            let o = k.compare(r, a.key[j], b.key[j]);
            if o != Ordering::Equal {
                return o;
            }
        }
        a.baseline_only
            .cmp(&b.baseline_only)
            .then_with(|| r.vector_hashes.name(a.variant).cmp(&r.vector_hashes.name(b.variant)))
    });
    Ok(out)
}

/// Readable key of a group ("model=m layer=12 …"), also the bootstrap seed's source.
pub fn group_label(r: &Rows, by: &[KeyCol], g: &GroupStats) -> String {
    let mut s: Vec<String> = by.iter().zip(&g.key).map(|(k, &c)| format!("{}={}", k.name(), k.display(r, c))).collect();
    if g.variant != 0 {
        s.push(format!("vector_hash={}", r.vector_hashes.name(g.variant).unwrap_or("null")));
    }
    if g.baseline_only {
        s.push("baseline-only".into());
    }
    s.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_print_short() {
        assert_eq!(fmt_num(2.0), "2");
        assert_eq!(fmt_num(-1.25), "-1.25");
        assert_eq!(fmt_num(f64::from(0.1f32)), "0.1");
        assert_eq!(fmt_num(0.1), "0.1");
        assert_eq!(fmt_num(-0.0), "0");
    }

    #[test]
    fn by_parsing() {
        assert_eq!(
            KeyCol::parse_list("model,prompt_type,layer,model").unwrap(),
            vec![KeyCol::Model, KeyCol::PromptPair, KeyCol::Layer]
        );
        assert_eq!(KeyCol::parse("vector-method").unwrap(), KeyCol::VectorMethod);
        assert!(KeyCol::parse("colour").is_err());
    }
}
