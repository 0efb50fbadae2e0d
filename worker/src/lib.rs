//! coca's data plane: the CoCa model on burn, and the training step.

pub mod backend;
pub mod bench;
pub mod checkpoint;
pub mod collective;
pub mod data;
pub mod discovery;
pub mod eval;
pub mod generate;
pub mod inference;
pub mod job;
pub mod kernels;
pub mod model;
pub mod rng;
pub mod train;
