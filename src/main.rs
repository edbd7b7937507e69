//! miniwob-steer command line (src/cli/).
mod cli;

fn main() -> anyhow::Result<()> {
    cli::main()
}
