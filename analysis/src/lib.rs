//! `analyze`: comparison tables, paired statistics and plots from miniwob-steer episode result
//! files (docs/results-format.md). Reads only result files; never depends on the main crate.
//!
//! Pipeline: a streaming serde pass validates every JSONL line (bad lines are recorded with file and
//! line and skipped) into compact columns ([`ingest`]); steered rows are paired with their baselines
//! and duplicates / incompatible runs are found ([`pairing`]); polars groups the paired units
//! ([`aggregate`]); McNemar and a seeded paired bootstrap give p-values and CIs ([`stats`]); tables go
//! to markdown and CSV ([`report`], [`table`]) and plots to PNG ([`plots`]).

pub mod aggregate;
pub mod ingest;
pub mod lens;
pub mod pairing;
pub mod parquet;
pub mod plots;
pub mod registry;
pub mod report;
pub mod stats;
pub mod synth;
pub mod table;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use aggregate::{GroupStats, KeyCol, StatOpts};
use ingest::Ingested;
use pairing::Pairing;

/// Which table files to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Md,
    Csv,
    All,
}

impl std::str::FromStr for Format {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "md" | "markdown" => Ok(Format::Md),
            "csv" => Ok(Format::Csv),
            "all" => Ok(Format::All),
            _ => Err(format!("unknown format {s:?} (md, csv, all)")),
        }
    }
}

/// Options of one analysis.
#[derive(Debug, Clone)]
pub struct AnalyzeOpts {
    pub inputs: Vec<PathBuf>,
    pub out: PathBuf,
    pub by: Vec<KeyCol>,
    pub format: Format,
    pub plots: bool,
    pub font: Option<PathBuf>,
    pub stats: StatOpts,
    /// Print the markdown report on stdout.
    pub stdout: bool,
    /// Print the time of each phase on stderr.
    pub timings: bool,
}

/// Wall time of each phase.
struct Phases {
    start: std::time::Instant,
    last: std::time::Instant,
    done: Vec<(&'static str, f64)>,
}

impl Phases {
    fn new() -> Self {
        let now = std::time::Instant::now();
        Phases { start: now, last: now, done: vec![] }
    }
    fn mark(&mut self, name: &'static str) {
        let now = std::time::Instant::now();
        self.done.push((name, (now - self.last).as_secs_f64()));
        self.last = now;
    }
    fn line(&self) -> String {
        let parts: Vec<String> = self.done.iter().map(|(n, t)| format!("{n} {t:.2}s")).collect();
        format!("timings: {} (total {:.2}s)", parts.join(", "), self.start.elapsed().as_secs_f64())
    }
}

/// What an analysis found (for the exit status and tests).
#[derive(Debug, Default)]
pub struct Summary {
    pub files: usize,
    pub lines: u64,
    pub episodes: usize,
    pub problems: usize,
    pub problem_counts: BTreeMap<String, usize>,
    pub duplicates: u64,
    pub conflicts: usize,
    pub unpaired_steered: usize,
    pub groups: usize,
    pub written: Vec<PathBuf>,
    pub plot_warning: Option<String>,
}

const MAX_LISTED: usize = 20;

/// Reads every input (directories recursively), validating line by line: JSONL through
/// `ingest`, parquet (from `analyze convert`) through `parquet`, into the same rows.
pub fn read_inputs(inputs: &[std::path::PathBuf]) -> Result<Ingested> {
    let files = ingest::expand_inputs(inputs)?;
    let mut ing = Ingested::default();
    for path in files {
        let fid = ing.rows.files.len() as u32;
        ing.rows.files.push(path.clone());
        ing.files_read += 1;
        if path.extension().and_then(|e| e.to_str()) == Some("parquet") {
            parquet::read_parquet(&path, fid, &mut ing)?;
        } else {
            ingest::read_jsonl(&path, fid, &mut ing)?;
        }
    }
    Ok(ing)
}

/// Reads the inputs, and fails when there is no episode at all.
pub fn load(inputs: &[PathBuf]) -> Result<Ingested> {
    if inputs.is_empty() {
        bail!("no input given: pass result files or directories");
    }
    let ing = read_inputs(inputs)?;
    report_problems(&ing);
    if ing.rows.is_empty() {
        let what = inputs.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ");
        bail!(
            "no episodes found in {what} ({} files, {} lines, {} rejected)",
            ing.files_read,
            ing.lines_read,
            ing.problems.len()
        );
    }
    Ok(ing)
}

fn report_problems(ing: &Ingested) {
    if ing.problems.is_empty() {
        return;
    }
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for p in &ing.problems {
        *counts.entry(p.kind.label()).or_default() += 1;
    }
    let parts: Vec<String> = counts.iter().map(|(k, v)| format!("{v} {k}")).collect();
    eprintln!("warning: {} input lines skipped ({})", ing.problems.len(), parts.join(", "));
    for p in ing.problems.iter().take(MAX_LISTED) {
        eprintln!("  {}:{}: {}: {}", p.file.display(), p.line, p.kind.label(), p.message);
    }
    if ing.problems.len() > MAX_LISTED {
        eprintln!("  … {} more (see problems.csv / problems.md)", ing.problems.len() - MAX_LISTED);
    }
}

fn report_pairing(p: &Pairing, r: &ingest::Rows) {
    if p.duplicates > 0 {
        eprintln!("warning: {} duplicate episode lines ignored (same key and vector_hash; first kept)", p.duplicates);
        for e in p.duplicate_examples.iter().take(5) {
            eprintln!("  {e}");
        }
    }
    if !p.conflicts.is_empty() {
        eprintln!(
            "warning: {} incompatible runs: same key, different vector_hash; their groups are kept apart and flagged ⚠ (see conflicts.csv)",
            p.conflicts.len()
        );
        for c in p.conflicts.iter().take(MAX_LISTED) {
            eprintln!("  {}: {} ({}) vs {} ({})", c.key, c.first_source, c.first_hash, c.other_source, c.other_hash);
        }
    }
    if !p.unpaired_steered.is_empty() {
        eprintln!(
            "warning: {} steered episodes have no baseline with the same (experiment, model, layer, prompt_pair, vector_method, task, seed); left out of Δ",
            p.unpaired_steered.len()
        );
        for &i in p.unpaired_steered.iter().take(5) {
            eprintln!("  {}: {}", r.source(i as usize), pairing::full_key(r, i as usize));
        }
    }
}

fn write(path: &Path, text: &str, summary: &mut Summary) -> Result<()> {
    fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    summary.written.push(path.to_path_buf());
    Ok(())
}

/// Runs a full analysis: tables on stdout and in `opts.out`, CSV, plots.
pub fn analyze(opts: &AnalyzeOpts) -> Result<Summary> {
    let mut ph = Phases::new();
    let ing = load(&opts.inputs)?;
    ph.mark("read+validate");
    let r = &ing.rows;
    let p = pairing::pair(r);
    report_pairing(&p, r);
    ph.mark("pair");
    let units = aggregate::unit_frame(r, &p)?;
    // Results of two protocols are never pooled: the protocol joins every grouping then.
    let by = &KeyCol::with_protocol(&opts.by, r);
    if by.len() > opts.by.len() {
        eprintln!("note: the results hold {} protocols; grouping by protocol too", r.protocols.len() - 1);
    }
    let groups = aggregate::aggregate(&units, r, by, opts.stats)?;
    let mut task_by = by.clone();
    if !task_by.contains(&KeyCol::Task) {
        task_by.push(KeyCol::Task);
    }
    let task_groups = aggregate::aggregate(&units, r, &task_by, opts.stats)?;
    let fine_by = KeyCol::with_protocol(
        &[KeyCol::Experiment, KeyCol::Model, KeyCol::Layer, KeyCol::Coeff, KeyCol::PromptPair, KeyCol::VectorMethod],
        r,
    );
    let fine = aggregate::aggregate(&units, r, &fine_by, opts.stats)?;
    ph.mark("group+stats");

    let comparison = report::comparison_table(r, by, &groups);
    let per_task = report::comparison_table(r, &task_by, &task_groups);
    let models = report::model_table(r, &p, &fine_by, &fine);
    let problems = report::problems_table(&ing);
    let conflicts = report::conflicts_table(&p);

    let mut summary = Summary {
        files: ing.files_read,
        lines: ing.lines_read,
        episodes: r.len(),
        problems: ing.problems.len(),
        duplicates: p.duplicates,
        conflicts: p.conflicts.len(),
        unpaired_steered: p.unpaired_steered.len(),
        groups: groups.len(),
        ..Default::default()
    };
    for pr in &ing.problems {
        *summary.problem_counts.entry(pr.kind.label().to_string()).or_default() += 1;
    }

    let n_steered = (0..r.len()).filter(|&i| r.steered(i)).count();
    let by_names: Vec<&str> = by.iter().map(|k| k.name()).collect();
    let mut md = String::new();
    md.push_str("# miniwob-steer analysis\n\n");
    md.push_str(&format!(
        "{} files, {} lines: {} episodes ({} baseline, {} steered); {} lines rejected, {} duplicates, {} incompatible-run conflicts, {} steered episodes without a baseline.\n\n",
        summary.files,
        summary.lines,
        r.len(),
        r.len() - n_steered,
        n_steered,
        summary.problems,
        summary.duplicates,
        summary.conflicts,
        summary.unpaired_steered
    ));
    md.push_str(&format!(
        "Δ = steered − baseline success over paired (task, seed) episodes; 95% CI: paired bootstrap ({} resamples, seed {}); p: exact McNemar on the discordant pairs b (baseline only) / c (steered only). Rows without steered cells are baseline-only.\n\n",
        opts.stats.resamples, opts.stats.seed
    ));
    md.push_str(&format!("## Comparison by {}\n\n{}\n", by_names.join(", "), comparison.to_markdown()));
    md.push_str(&format!("## Per task\n\n{}\n", per_task.to_markdown()));
    md.push_str(&format!("## Models\n\n{}\n", models.to_markdown()));
    if !p.conflicts.is_empty() {
        md.push_str(&format!(
            "## ⚠ Incompatible runs (same key, different vector_hash)\n\n{}\n",
            conflicts.to_markdown()
        ));
    }
    if !ing.problems.is_empty() {
        let shown = ing.problems.len().min(50);
        let mut head = problems.clone();
        for c in &mut head.cols {
            c.cells.truncate(shown);
        }
        md.push_str(&format!(
            "## Rejected lines ({} total, first {shown})\n\n{}\n",
            ing.problems.len(),
            head.to_markdown()
        ));
    }
    if opts.stdout {
        print!("{md}");
    }

    fs::create_dir_all(&opts.out).with_context(|| format!("creating {}", opts.out.display()))?;
    let o = |name: &str| opts.out.join(name);
    if matches!(opts.format, Format::Md | Format::All) {
        write(&o("report.md"), &md, &mut summary)?;
        write(&o("comparison.md"), &comparison.to_markdown(), &mut summary)?;
        write(&o("per_task.md"), &per_task.to_markdown(), &mut summary)?;
        write(&o("models.md"), &models.to_markdown(), &mut summary)?;
        if !ing.problems.is_empty() {
            write(&o("problems.md"), &problems.to_markdown(), &mut summary)?;
        }
    }
    if matches!(opts.format, Format::Csv | Format::All) {
        let mut csv = |t: &table::Table, name: &str| -> Result<()> {
            t.write_csv(&o(name))?;
            summary.written.push(o(name));
            Ok(())
        };
        csv(&comparison, "comparison.csv")?;
        csv(&per_task, "per_task.csv")?;
        csv(&models, "models.csv")?;
        if !ing.problems.is_empty() {
            csv(&problems, "problems.csv")?;
        }
        if !p.conflicts.is_empty() {
            csv(&conflicts, "conflicts.csv")?;
        }
    }
    ph.mark("write tables");
    if opts.plots {
        match plots::init_font(opts.font.as_deref()) {
            Ok(_) => make_plots(&units, r, opts, &mut summary)?,
            Err(e) => {
                eprintln!("warning: plots skipped: {e}");
                summary.plot_warning = Some(e.to_string());
            }
        }
    }
    ph.mark("plots");
    eprintln!("wrote {} files to {}", summary.written.len(), opts.out.display());
    if opts.timings {
        eprintln!("{}", ph.line());
    }
    Ok(summary)
}

fn series_by(r: &ingest::Rows, groups: &[GroupStats], x: KeyCol) -> Vec<(String, Vec<plots::DeltaPoint>)> {
    let mut map: BTreeMap<String, Vec<plots::DeltaPoint>> = BTreeMap::new();
    for g in groups.iter().filter(|g| !g.baseline_only) {
        let Some(xv) = x.numeric(r, g.key[1]) else { continue };
        let mut name = KeyCol::Model.display(r, g.key[0]);
        if let Some(&pc) = g.key.get(2) {
            name.push_str(&format!(" [{}]", KeyCol::Protocol.display(r, pc)));
        }
        if g.variant != 0 {
            name.push_str(&format!(" ⚠{}", r.vector_hashes.name(g.variant).unwrap_or("null")));
        }
        let (lo, hi) = g.ci.unwrap_or((f64::NAN, f64::NAN));
        map.entry(name).or_default().push(plots::DeltaPoint {
            x: xv,
            delta: 100.0 * g.delta().unwrap_or(f64::NAN),
            lo: 100.0 * lo,
            hi: 100.0 * hi,
        });
    }
    map.into_iter().collect()
}

fn make_plots(
    units: &polars::prelude::DataFrame,
    r: &ingest::Rows,
    opts: &AnalyzeOpts,
    summary: &mut Summary,
) -> Result<()> {
    let o = |name: &str| opts.out.join(name);
    for (x, file, title) in [
        (
            KeyCol::Layer,
            "delta_vs_layer.png",
            "Δ success against steered layer (pooled over coefficients, prompt pairs)",
        ),
        (KeyCol::Coeff, "delta_vs_coeff.png", "Δ success against coefficient (pooled over layers, prompt pairs)"),
    ] {
        let groups = aggregate::aggregate(units, r, &KeyCol::with_protocol(&[KeyCol::Model, x], r), opts.stats)?;
        let series = series_by(r, &groups, x);
        if series.iter().all(|(_, p)| p.is_empty()) {
            eprintln!("note: {file} not drawn: no paired steered episodes");
            continue;
        }
        let xl = if x == KeyCol::Layer { "layer (0-based decoder layer)" } else { "coefficient α" };
        plots::delta_plot(&o(file), title, xl, &series)?;
        summary.written.push(o(file));
    }
    let groups = aggregate::aggregate(units, r, &KeyCol::with_protocol(&[KeyCol::Task], r), opts.stats)?;
    let mut tasks: BTreeMap<String, (f64, Option<f64>)> = BTreeMap::new();
    for g in &groups {
        if g.variant != 0 {
            continue;
        }
        let mut name = KeyCol::Task.display(r, g.key[0]);
        if let Some(&pc) = g.key.get(1) {
            name.push_str(&format!(" [{}]", KeyCol::Protocol.display(r, pc)));
        }
        let e = tasks.entry(name).or_insert((g.base_rate(), None));
        if !g.baseline_only {
            *e = (g.base_rate(), g.steered_rate());
        }
    }
    let tasks: Vec<(String, f64, Option<f64>)> = tasks.into_iter().map(|(k, (b, s))| (k, b, s)).collect();
    if !tasks.is_empty() {
        plots::task_plot(&o("task_success.png"), "Baseline vs steered success per task (pooled)", &tasks)?;
        summary.written.push(o("task_success.png"));
    }
    Ok(())
}

/// `analyze convert`: validates the inputs and writes their analysis columns to one parquet file.
pub fn convert(inputs: &[PathBuf], out: &Path) -> Result<u64> {
    let ing = load(inputs)?;
    let n = parquet::write_parquet(&ing.rows, out)?;
    eprintln!("wrote {n} episodes to {} ({} lines rejected)", out.display(), ing.problems.len());
    Ok(n)
}
