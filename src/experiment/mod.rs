//! Experiments: settings (TOML + flags), the expanded episode plan and its shards, the results
//! file with resume, and the `run` subcommand that drives the agent (DESIGN.md §1, §6, §7).
pub mod bench;
pub mod config;
pub mod plan;
pub mod results;
pub mod run;
pub mod vector;
pub mod vlm;

pub use plan::{Item, Shard};
pub use results::{EpisodeLine, ResultsFile};
pub use run::{RunArgs, Settings, Summary};
