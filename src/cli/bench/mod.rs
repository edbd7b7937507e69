//! `bench` subcommands: speed measurements printed as tables (never asserted in tests).
use anyhow::Result;

pub mod decode;
pub mod env;
pub mod episodes;
pub mod paired;
pub mod stages;

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub which: BenchWhich,
}

#[derive(clap::Subcommand, Debug)]
pub enum BenchWhich {
    /// Prefill/decode tokens/s with and without steering hooks, beside the transformers peer.
    Decode(decode::BenchDecodeArgs),
    /// Matmul GFLOP/s at real layer shapes: our Q8 and f32 kernels vs candle's QMatMul per GGUF type and its f32 GEMM.
    Matmul(decode::BenchMatmulArgs),
    /// Batch invariance: the same rows in many batch compositions; prints how many rows differ
    /// (must be 0) and a fingerprint to compare across thread counts and machines.
    Determinism(decode::BenchDeterminismArgs),
    /// MiniWoB episodes/s (reset + observe + click + reward) with 1 and 2 browser sessions.
    Env(env::BenchEnvArgs),
    /// Paired exp12 episodes per minute (baseline + steered), beside the Python loop (scripts/peer/exp12_loop.py).
    Episodes(episodes::BenchEpisodesArgs),
    /// One paired exp12 episode (sequential and batched), decode, prefill and all-layer extraction
    /// on one device, for the GPU comparison with scripts/peer/hf_paired.py (docs/cuda.md).
    Paired(paired::BenchPairedArgs),
    /// A model split into pipeline stages on loopback vs one process: prefill/decode tokens/s and wire bytes per token.
    Stages(stages::BenchStagesArgs),
}

pub fn run(a: BenchArgs) -> Result<()> {
    match a.which {
        BenchWhich::Decode(d) => decode::run(d),
        BenchWhich::Matmul(m) => decode::run_matmul(m),
        BenchWhich::Determinism(d) => decode::run_determinism(d),
        BenchWhich::Env(e) => env::run(e),
        BenchWhich::Episodes(e) => episodes::run(e),
        BenchWhich::Paired(p) => paired::run(p),
        BenchWhich::Stages(s) => stages::run(s),
    }
}
