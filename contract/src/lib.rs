//! coca's contract, burn-free: the types every part agrees on. The gRPC
//! protocol ([`rpc`]) and the job token on both sides of it ([`auth`]); the
//! manifest, validated once with field-named errors ([`manifest`]); model
//! configurations and presets ([`model`]); dataset indexes ([`dataset`]);
//! the global sample order, a pure function of the seed, the sources and
//! the step ([`sample_order`]), with the counter-based random numbers it
//! and the model's initialisation draw ([`rng`]); and the status document
//! the coordinator serves and `coca status` reads ([`status`]). The
//! coordinator validates and describes a job from these alone, without
//! linking the tensor library.

pub mod auth;
pub mod dataset;
pub mod manifest;
pub mod model;
pub mod rng;
pub mod sample_order;
pub mod status;

/// The gRPC contract (coca.proto): messages and the Coordinator service.
pub mod rpc {
    tonic::include_proto!("coca.v1");

    /// Bumped on every incompatible change; a worker speaking another is refused.
    /// 2: NCCL jobs exchange unique ids through the rendezvous.
    pub const PROTOCOL_VERSION: u32 = 3;
}

pub use model::{Architecture, ModelConfig, ModelConfigError, ParamCounts, PoolerLayout, Preset};
