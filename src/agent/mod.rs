//! The agent: prompt building (shared with the CAA vector), the action parser, the generation
//! thread that batches rows across episodes, and the paired episode loop (DESIGN.md §1, §5).
pub mod episode;
pub mod generator;
pub mod parse;
pub mod prompt;
pub mod vlm;

pub use episode::{Agent, Arm, EpisodeOutcome};
pub use generator::{Generator, GeneratorConfig, Row, RowOutput, Steering};
pub use parse::{parse_output, Parsed};
pub use prompt::PromptBuilder;
