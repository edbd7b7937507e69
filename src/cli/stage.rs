//! `stage serve` (one pipeline stage per process) and `stage gateway` (an HTTP JSON API over a
//! model or its stages): docs/stages.md.
use anyhow::{Context, Result};
use miniwob_steer::device::parse_device;
use miniwob_steer::models::dtype::DTypeChoice;
use miniwob_steer::stage::{client, gateway, server};
use miniwob_steer::steering::vector::SteeringVector;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct StageArgs {
    #[command(subcommand)]
    pub command: StageCommand,
}

#[derive(clap::Subcommand, Debug)]
pub enum StageCommand {
    /// Serve one stage directory made by `split` (its layers, KV caches and hooks).
    Serve(ServeArgs),
    /// An HTTP JSON API over a model or its stages: POST /generate (prompt, optional image and
    /// steering coefficients, one row each in one batch), GET /info.
    Gateway(GatewayArgs),
}

#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    /// A stage directory (`split --out DIR` writes DIR/stage-K).
    #[arg(long)]
    pub stage: PathBuf,
    /// Address to listen on; port 0 picks a free one (printed). Any non-loopback address needs
    /// --token-file.
    #[arg(long, default_value = "127.0.0.1:7800")]
    pub listen: SocketAddr,
    /// A file holding the shared token every request must carry (drivers read the file named
    /// by MINIWOB_STEER_STAGE_TOKEN_FILE).
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// Weight dtype: auto (gguf for a GGUF split on the CPU, else f32; bf16 on a GPU), f32, f16, bf16, gguf.
    /// Every stage of a pipeline must run the same.
    #[arg(long, default_value = "auto")]
    pub dtype: DTypeChoice,
    /// cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "auto")]
    pub device: String,
}

#[derive(clap::Args, Debug)]
pub struct GatewayArgs {
    /// The model: --model (a local one) or --stages (`stage serve` addresses, in order), with
    /// --dtype and --device for a local one. The stages' own token, if any, is read from the file
    /// named by MINIWOB_STEER_STAGE_TOKEN_FILE.
    #[command(flatten)]
    pub model: crate::cli::models::ModelArgs,
    /// Address to listen on; port 0 picks a free one (printed). Any non-loopback address needs
    /// --token-file.
    #[arg(long, default_value = "127.0.0.1:7900")]
    pub listen: SocketAddr,
    /// A file holding the token every request must carry (`Authorization: Bearer TOKEN`).
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// Steering vector file (safetensors with `layer.{i}` tensors): requests may then give
    /// `coeffs`.
    #[arg(long)]
    pub vector: Option<PathBuf>,
    /// Layer of --vector to steer: auto (50% depth) or an index.
    #[arg(long, default_value = "auto", requires = "vector")]
    pub layer: String,
    /// Use a vector computed on other weights of the same shape (e.g. another quantization).
    #[arg(long, requires = "vector")]
    pub allow_foreign_vector: bool,
    /// Bound of the prefix cache shared by requests, in MiB (0 disables it).
    #[arg(long, default_value_t = miniwob_steer::models::prefix_cache::DEFAULT_MB)]
    pub prefix_cache_mb: usize,
}

pub fn run(a: StageArgs) -> Result<()> {
    match a.command {
        StageCommand::Serve(s) => serve(s),
        StageCommand::Gateway(g) => run_gateway(g),
    }
}

fn run_gateway(a: GatewayArgs) -> Result<()> {
    let token = a.token_file.as_deref().map(client::read_token).transpose()?;
    // Refused before the model loads, and so is a bad vector file.
    server::check_bind(&a.listen, token.as_deref())?;
    let vector = a.vector.as_deref().map(SteeringVector::load).transpose()?;
    let model = a.model.load_any()?;
    let steering = match (&a.vector, &vector) {
        (Some(path), Some(sv)) => Some(
            gateway::Steering::new(sv, &a.layer, model.info(), a.allow_foreign_vector)
                .with_context(|| format!("--vector {}", path.display()))?,
        ),
        _ => None,
    };
    let name = model.info().name.clone();
    let mut opts = gateway::Options::new(a.listen, token);
    opts.prefix_cache_mb = a.prefix_cache_mb;
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(gateway::serve_loaded(model, steering, opts, |addr| {
        // One line on stdout, for scripts that start a gateway on port 0.
        println!("gateway for {name} listening on {addr}");
        let _ = std::io::stdout().flush();
    }))
}

fn serve(a: ServeArgs) -> Result<()> {
    let token = a.token_file.as_deref().map(client::read_token).transpose()?;
    // Refused before minutes of loading.
    server::check_bind(&a.listen, token.as_deref())?;
    let model = server::StageModel::load(&a.stage, &parse_device(&a.device)?, a.dtype)
        .with_context(|| format!("--stage {}", a.stage.display()))?;
    let m = model.manifest.clone();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(server::serve(model, a.listen, token, |addr| {
        // One line on stdout, for scripts that start a stage on port 0.
        println!(
            "stage {} of {} ({} layers {}..{}) listening on {addr}",
            m.stage, m.stages, m.source.name, m.layers[0], m.layers[1]
        );
        let _ = std::io::stdout().flush();
    }))
}
