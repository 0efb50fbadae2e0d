//! coca's contract: the types every part agrees on. The manifest's model
//! section lives here so the coordinator can validate and describe a job
//! without linking the tensor library.

pub mod dataset;
pub mod rng;

/// The gRPC contract (coca.proto): messages and the Coordinator service.
pub mod rpc {
    tonic::include_proto!("coca.v1");

    /// Bumped on every incompatible change; a worker speaking another is refused.
    pub const PROTOCOL_VERSION: u32 = 1;
}
pub mod manifest;
pub mod model;
pub mod sample_order;

pub use model::{ModelConfig, ModelConfigError, ParamCounts, PoolerLayout, Preset};
