//! miniwob-steer: activation-steering experiments on language and vision-language models
//! acting as MiniWoB++ web agents. See DESIGN.md for the architecture.
pub mod agent;
pub mod device;
pub mod env;
pub mod experiment;
pub mod graft;
pub mod interp;
pub mod models;
pub mod probe;
pub mod protocol;
pub mod stage;
pub mod steering;
pub mod util;
