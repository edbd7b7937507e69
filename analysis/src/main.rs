//! `analyze`: turns miniwob-steer result files into tables and plots.
//! The polars implementation lands with the analysis issue; until then this binary
//! refuses to run rather than pretend to analyze.
fn main() -> anyhow::Result<()> {
    anyhow::bail!("analyze is not implemented yet (see the analysis issue)")
}
