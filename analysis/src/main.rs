//! `analyze`: comparison tables, statistics and plots from miniwob-steer result files.
//! See docs/analysis.md.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};

use miniwob_steer_analysis::aggregate::{KeyCol, StatOpts};
use miniwob_steer_analysis::synth::{self, SynthOpts};
use miniwob_steer_analysis::{analyze, convert, AnalyzeOpts, Format};

#[derive(Parser, Debug)]
#[command(
    name = "analyze",
    about = "Comparison tables, paired statistics and plots from miniwob-steer episode results",
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
struct Cli {
    /// Result files (*.jsonl, *.parquet) or directories (searched recursively).
    #[arg(required = true)]
    inputs: Vec<PathBuf>,
    /// Output directory for markdown, CSV and PNG files.
    #[arg(long, default_value = "analysis-out")]
    out: PathBuf,
    /// Group columns: experiment, model, layer, coeff, coeff_mode, prompt_pair (alias prompt_type),
    /// vector_method, protocol, task, vlm. Results of two protocols are never pooled: protocol
    /// joins the columns when the inputs hold more than one.
    #[arg(long, default_value = "model,layer,coeff,prompt_pair")]
    by: String,
    /// Table files to write: md, csv or all.
    #[arg(long, default_value = "all")]
    format: Format,
    /// Do not draw plots.
    #[arg(long)]
    no_plots: bool,
    /// TrueType font for the plots (default: $ANALYZE_FONT, then DejaVu/Liberation system paths).
    #[arg(long)]
    font: Option<PathBuf>,
    /// Bootstrap resamples per group.
    #[arg(long, default_value_t = miniwob_steer_analysis::stats::DEFAULT_RESAMPLES)]
    resamples: usize,
    /// Bootstrap seed.
    #[arg(long, default_value_t = 0x5eed)]
    seed: u64,
    /// Do not print the report on stdout.
    #[arg(long, short)]
    quiet: bool,
    /// Print the wall time of each phase on stderr.
    #[arg(long)]
    timings: bool,
    /// Exit with status 3 when lines were rejected or runs conflict.
    #[arg(long)]
    strict: bool,
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Validate result files and write their analysis columns to one parquet file.
    Convert {
        /// Result files or directories.
        #[arg(required = true)]
        inputs: Vec<PathBuf>,
        /// Parquet file to write.
        #[arg(long)]
        out: PathBuf,
    },
    /// Write the statistics of `miniwob-steer extract --out DIR` directories (summary.jsonl) as
    /// parquet: DIR/summary.parquet, or --out for several directories.
    LensSummary {
        /// Extraction directories.
        #[arg(required = true)]
        dirs: Vec<PathBuf>,
        /// Parquet file to write (default DIR/summary.parquet for one directory).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Write seeded synthetic result lines (for scale tests).
    Synth {
        /// Number of lines.
        #[arg(long)]
        lines: u64,
        /// JSONL file to write.
        #[arg(long)]
        out: PathBuf,
        /// Generator seed.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Number of tasks.
        #[arg(long, default_value_t = 20)]
        tasks: usize,
        /// Bytes of fake model output per line.
        #[arg(long, default_value_t = 200)]
        output_bytes: usize,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Some(Cmd::Convert { inputs, out }) => {
            convert(&inputs, &out)?;
        }
        Some(Cmd::LensSummary { dirs, out }) => {
            let (n, path) = miniwob_steer_analysis::lens::lens_summary(&dirs, out.as_deref())?;
            eprintln!("wrote {n} summary rows to {}", path.display());
        }
        Some(Cmd::Synth { lines, out, seed, tasks, output_bytes }) => {
            let opts = SynthOpts { lines, seed, tasks, output_bytes, ..SynthOpts::default() };
            let n = synth::generate(&opts, &out)?;
            eprintln!("wrote {n} lines to {}", out.display());
        }
        None => {
            let opts = AnalyzeOpts {
                inputs: cli.inputs,
                out: cli.out,
                by: KeyCol::parse_list(&cli.by)?,
                format: cli.format,
                plots: !cli.no_plots,
                font: cli.font,
                stats: StatOpts { resamples: cli.resamples, seed: cli.seed, ..StatOpts::default() },
                stdout: !cli.quiet,
                timings: cli.timings,
            };
            let s = analyze(&opts)?;
            if cli.strict && (s.problems > 0 || s.conflicts > 0) {
                std::process::exit(3);
            }
        }
    }
    Ok(())
}
