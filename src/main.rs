//! miniwob-steer command line.
use anyhow::Result;
use clap::{Parser, Subcommand};
use miniwob_steer::{bench, models, steering};

#[derive(Parser)]
#[command(name = "miniwob-steer", version, about = "Activation-steering experiments on MiniWoB++ web agents")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// List the model registry (aliases, layers, the auto layer, what is installed).
    Models(models::cli::ModelsArgs),
    /// Generate text, optionally steered (one row per coefficient, in one batch).
    Generate(models::cli::GenerateArgs),
    /// Per-layer hidden states at image or text positions (images, MiniWoB screenshots, text), with statistics.
    Extract(miniwob_steer::interp::cli::ExtractArgs),
    /// Lenses on extracted states: contextual index, embedding/logit/contextual top-k, grounded score.
    Lens(miniwob_steer::interp::cli::LensArgs),
    /// Compute, inspect, combine, import or export steering vectors.
    Vector(steering::cli::VectorArgs),
    /// Speed benchmarks.
    Bench(bench::BenchArgs),
    /// List the MiniWoB tasks (marks the exp12 set and the tasks that need several actions).
    Tasks(miniwob_steer::env::cli::TasksArgs),
    /// Reset a task with a seed and print the observation as JSON (optionally a screenshot).
    Observe(miniwob_steer::env::cli::ObserveArgs),
    /// Reset a task, run actions in order and print a StepResult per action.
    Play(miniwob_steer::env::cli::PlayArgs),
    /// Paired baseline/steered MiniWoB episodes (exp12): vector from training episodes, then evaluation.
    Run(miniwob_steer::experiment::RunArgs),
    /// Compare against the committed transformers goldens on this device (no cargo needed; docs/cuda.md).
    CheckGoldens(miniwob_steer::gpu::goldens::CheckGoldensArgs),
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match Cli::parse().command {
        Command::Models(a) => models::cli::run_models(a),
        Command::Generate(a) => models::cli::run_generate(a),
        Command::Extract(a) => miniwob_steer::interp::cli::run_extract(a),
        Command::Lens(a) => miniwob_steer::interp::cli::run_lens(a),
        Command::Vector(a) => steering::cli::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Tasks(a) => miniwob_steer::env::cli::run_tasks(a),
        Command::Observe(a) => miniwob_steer::env::cli::run_observe(a),
        Command::Play(a) => miniwob_steer::env::cli::run_play(a),
        Command::Run(a) => miniwob_steer::experiment::run::run(a),
        Command::CheckGoldens(a) => miniwob_steer::gpu::goldens::run(a),
    }
}
