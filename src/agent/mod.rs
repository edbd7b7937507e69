//! The agent: prompt building (shared with the CAA vector), the turn of each modality, the
//! action parser, the generation thread that batches rows across episodes, and the paired
//! episode loop (DESIGN.md §1, §5). One pipeline for text models and VLMs.
pub mod episode;
pub mod generator;
pub mod parse;
pub mod prompt;
pub mod som;
pub mod turn;

pub use episode::{Agent, Arm, Condition, EpisodeOutcome};
pub use generator::{Generator, GeneratorConfig, Row, RowOutput, Steering};
pub use parse::{parse_output, parse_with, ParseOptions, Parsed};
pub use prompt::PromptBuilder;
pub use turn::{AgentModel, Turn, View};
