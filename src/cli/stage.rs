//! `stage serve` (one pipeline stage per process) and `stage gateway` (an HTTP JSON API over a
//! model or its stages): docs/stages.md.
use anyhow::{Context, Result};
use miniwob_steer::device::parse_device;
use miniwob_steer::models::dtype::DTypeChoice;
use miniwob_steer::stage::{client, server};
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

pub fn run(a: StageArgs) -> Result<()> {
    match a.command {
        StageCommand::Serve(s) => serve(s),
    }
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
