//! The command line, in one place: every flag and subcommand (the library knows nothing of
//! clap). Each file holds one command group's flags and the thin code that calls the library.
use anyhow::Result;
use clap::{Parser, Subcommand};

pub mod bench;
pub mod env;
pub mod goldens;
pub mod graft;
pub mod interp;
pub mod models;
pub mod probe;
pub mod run;
pub mod split;
pub mod stage;
pub mod vector;

#[derive(Parser)]
#[command(name = "miniwob-steer", version, about = "Activation-steering experiments on MiniWoB++ web agents")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// List the model registry (aliases, layers, the auto layer, what is installed).
    Models(models::ModelsArgs),
    /// Generate text, optionally steered (one row per coefficient, in one batch).
    Generate(models::GenerateArgs),
    /// Per-layer hidden states at image or text positions (images, MiniWoB screenshots, text), with statistics.
    Extract(interp::ExtractArgs),
    /// Lenses on extracted states: contextual index, embedding/logit/contextual top-k, grounded score.
    Lens(interp::LensArgs),
    /// Compute, inspect, combine, import or export steering vectors.
    Vector(vector::VectorArgs),
    /// Speed benchmarks.
    Bench(bench::BenchArgs),
    /// List the MiniWoB tasks (marks the exp12 set and the tasks that need several actions).
    Tasks(env::TasksArgs),
    /// Reset a task with a seed and print the observation as JSON (optionally a screenshot).
    Observe(env::ObserveArgs),
    /// Reset a task, run actions in order and print a StepResult per action.
    Play(env::PlayArgs),
    /// Paired baseline/steered MiniWoB episodes (exp12): vector from training episodes, then evaluation.
    Run(run::RunArgs),
    /// Compare against the committed transformers goldens on this device (no cargo needed; docs/cuda.md).
    CheckGoldens(goldens::CheckGoldensArgs),
    /// Probes and router heads on pooled hidden states: data, features, train, eval, sweep.
    Probe(probe::ProbeArgs),
    /// Hybrid vision + language models: init, train, eval, data, bench (docs/graft.md).
    Graft(graft::GraftArgs),
    /// Split a model into pipeline stages, one directory per stage (docs/stages.md).
    Split(split::SplitArgs),
    /// Pipeline stages: serve one stage of a split model (docs/stages.md).
    Stage(stage::StageArgs),
}

pub fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match Cli::parse().command {
        Command::Models(a) => models::run_models(a),
        Command::Generate(a) => models::run_generate(a),
        Command::Extract(a) => interp::run_extract(a),
        Command::Lens(a) => interp::run_lens(a),
        Command::Vector(a) => vector::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Tasks(a) => env::run_tasks(a),
        Command::Observe(a) => env::run_observe(a),
        Command::Play(a) => env::run_play(a),
        Command::Run(a) => run::run(a),
        Command::CheckGoldens(a) => goldens::run(a),
        Command::Probe(a) => probe::run(a),
        Command::Graft(a) => graft::run(a),
        Command::Split(a) => split::run_split(a),
        Command::Stage(a) => stage::run(a),
    }
}
