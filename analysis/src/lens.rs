//! `analyze lens-summary`: the per item × hook point statistics that `miniwob-steer extract`
//! writes as `summary.jsonl`, as one parquet file (the main crate has no polars).

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use polars::prelude::*;
use polars_io::prelude::*;

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Row {
    item: String,
    hook_point: String,
    tokens: i64,
    norm_mean: Option<f64>,
    norm_std: Option<f64>,
    norm_min: Option<f64>,
    norm_max: Option<f64>,
    mean_cos_to_mean: Option<f64>,
}

/// Reads `DIR/summary.jsonl` of each extraction directory and writes one parquet file
/// (default `DIR/summary.parquet` for a single directory), with an `extraction` column naming
/// the directory. Returns the number of rows.
pub fn lens_summary(dirs: &[PathBuf], out: Option<&Path>) -> Result<(u64, PathBuf)> {
    let out = match (out, dirs) {
        (Some(o), _) => o.to_path_buf(),
        (None, [d]) => d.join("summary.parquet"),
        (None, _) => bail!("--out is needed with {} extraction directories", dirs.len()),
    };
    let (mut extraction, mut rows) = (Vec::new(), Vec::new());
    for d in dirs {
        let path = d.join("summary.jsonl");
        let f = File::open(&path)
            .with_context(|| format!("opening {} (an `extract --out DIR` directory?)", path.display()))?;
        for (i, line) in BufReader::new(f).lines().enumerate() {
            let line = line.with_context(|| format!("reading {}", path.display()))?;
            if line.trim().is_empty() {
                continue;
            }
            let r: Row = serde_json::from_str(&line)
                .with_context(|| format!("{} line {}: not a summary row", path.display(), i + 1))?;
            extraction.push(d.display().to_string());
            rows.push(r);
        }
    }
    // serde_json writes a non-finite statistic (an item with no tokens) as null.
    let f64s = |g: fn(&Row) -> Option<f64>| rows.iter().map(g).collect::<Vec<Option<f64>>>();
    let n = rows.len();
    let columns = vec![
        Column::new("extraction".into(), extraction),
        Column::new("item".into(), rows.iter().map(|r| r.item.as_str()).collect::<Vec<_>>()),
        Column::new("hook_point".into(), rows.iter().map(|r| r.hook_point.as_str()).collect::<Vec<_>>()),
        Column::new("tokens".into(), rows.iter().map(|r| r.tokens).collect::<Vec<_>>()),
        Column::new("norm_mean".into(), f64s(|r| r.norm_mean)),
        Column::new("norm_std".into(), f64s(|r| r.norm_std)),
        Column::new("norm_min".into(), f64s(|r| r.norm_min)),
        Column::new("norm_max".into(), f64s(|r| r.norm_max)),
        Column::new("mean_cos_to_mean".into(), f64s(|r| r.mean_cos_to_mean)),
    ];
    let mut df = DataFrame::new(n, columns)?;
    let f = File::create(&out).with_context(|| format!("creating {}", out.display()))?;
    ParquetWriter::new(f).finish(&mut df).map_err(|e| anyhow!("writing {}: {e}", out.display()))?;
    Ok((n as u64, out))
}
