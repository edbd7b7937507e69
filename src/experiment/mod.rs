//! Experiments: settings (TOML + flags), the expanded episode plan and its shards, the results
//! file with resume, the steering vector of a run, the evaluation loop shared by every model,
//! and the summary (DESIGN.md §1, §6, §7).
pub mod config;
pub mod evaluate;
pub mod meta;
pub mod plan;
pub mod results;
pub mod run;
pub mod settings;
pub mod summary;
pub mod vectors;

pub use plan::{Item, Shard};
pub use results::{EpisodeLine, ResultsFile};
pub use settings::Settings;
pub use summary::Summary;
