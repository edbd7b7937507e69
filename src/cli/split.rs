//! `split`: a model into pipeline stages, one directory per stage (docs/stages.md).
use anyhow::{Context, Result};
use miniwob_steer::stage::split::{split, SplitOptions};
use std::path::{Path, PathBuf};

#[derive(clap::Args, Debug, Clone)]
pub struct SplitArgs {
    /// Registry alias, transformers checkpoint directory, or .gguf file.
    #[arg(long)]
    pub model: String,
    /// Number of stages. Alone: an even split (stage k starts at round(k·L/N)); with --at it
    /// must agree (one more than the split points).
    #[arg(long)]
    pub stages: Option<usize>,
    /// Split points, comma-separated: the first global layer of each stage after the first
    /// (`--at 12`: layers 0..12 and 12..L; `--at 8,16`: three stages).
    #[arg(long, value_delimiter = ',')]
    pub at: Vec<usize>,
    /// Output directory: `stage-0`, `stage-1`, … are written under it (never over an existing one).
    #[arg(long)]
    pub out: PathBuf,
}

pub fn run_split(a: SplitArgs) -> Result<()> {
    let stages = split(&SplitOptions { model: a.model, stages: a.stages, at: a.at, out: a.out })?;
    for (dir, m) in &stages {
        let flags: Vec<&str> = [(m.vision, "vision"), (m.embed, "embed"), (m.head, "head")]
            .into_iter()
            .filter_map(|(on, what)| on.then_some(what))
            .collect();
        let flags = if flags.is_empty() { String::new() } else { format!("  ({})", flags.join(", ")) };
        println!(
            "{}  layers {}..{} of {}  {}{flags}",
            dir.display(),
            m.layers[0],
            m.layers[1],
            m.num_layers,
            human(dir_size(dir)?)
        );
    }
    Ok(())
}

fn dir_size(dir: &Path) -> Result<u64> {
    let mut n = 0;
    for e in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let e = e.with_context(|| format!("reading {}", dir.display()))?;
        n += e.metadata().with_context(|| format!("reading {}", e.path().display()))?.len();
    }
    Ok(n)
}

fn human(bytes: u64) -> String {
    let b = bytes as f64;
    match bytes {
        n if n >= 1 << 30 => format!("{:.2} GiB", b / (1u64 << 30) as f64),
        n if n >= 1 << 20 => format!("{:.1} MiB", b / (1u64 << 20) as f64),
        n if n >= 1 << 10 => format!("{:.1} KiB", b / 1024.0),
        n => format!("{n} B"),
    }
}
