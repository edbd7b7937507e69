//! The formats `miniwob-steer` writes and `analyze` reads, in one small serde-only crate (no
//! candle, no polars): the result line and its resume key, the model registry's table, the
//! asset paths.
pub mod line;
pub mod paths;
pub mod registry;

pub use line::{episode_key, fmt_coeff, hash16, Condition, EpisodeLine, RunConfig};
