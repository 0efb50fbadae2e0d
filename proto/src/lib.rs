//! coca's contract: the types every part agrees on. The manifest's model
//! section lives here so the coordinator can validate and describe a job
//! without linking the tensor library.

pub mod dataset;
pub mod manifest;
pub mod model;
pub mod sample_order;

pub use model::{ModelConfig, ModelConfigError, ParamCounts, PoolerLayout, Preset};
