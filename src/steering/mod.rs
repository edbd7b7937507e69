//! Steering vectors: contrastive prompt pairs, CAA (mean difference, PCA), vector files and
//! llama.cpp control-vector interop.
pub mod caa;
pub mod pairs;
pub mod vector;

pub use caa::{CoeffMode, Method};
pub use vector::SteeringVector;
