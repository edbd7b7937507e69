//! `check-goldens`: the committed transformers goldens on this device (docs/cuda.md).
use anyhow::{bail, Context, Result};
use miniwob_steer::models::goldens::{run_all, GgufSelection};
use std::path::PathBuf;

/// `check-goldens`.
#[derive(clap::Args, Debug)]
pub struct CheckGoldensArgs {
    /// cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// f32 (tolerance 1e-4 as on the CPU), bf16 or f16 (cosine and top-1), or auto.
    #[arg(long, default_value = "f32")]
    pub dtype: miniwob_steer::models::dtype::DTypeChoice,
    /// The repository's tests/fixtures directory.
    #[arg(long, default_value = "tests/fixtures")]
    pub fixtures: PathBuf,
    /// Skip the real GGUF checkpoints even when installed.
    #[arg(long)]
    pub no_gguf: bool,
    /// Also write the report as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

pub fn run(a: CheckGoldensArgs) -> Result<()> {
    let device = miniwob_steer::device::parse_device(&a.device)?;
    let dtype = a.dtype.resolve(&device);
    let report =
        run_all(&a.fixtures, &device, dtype, if a.no_gguf { GgufSelection::None } else { GgufSelection::Installed })?;
    println!("{}", report.markdown());
    if let Some(p) = &a.json {
        std::fs::write(p, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    if !report.passed() {
        bail!(
            "{} of {} golden checks failed on {} ({})",
            report.failures().len(),
            report.rows.len(),
            report.device,
            report.dtype
        );
    }
    Ok(())
}
