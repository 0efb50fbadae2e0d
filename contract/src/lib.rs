//! coca's contract, burn-free: the types every part agrees on, apart from
//! the wire (the `proto` crate). The manifest, validated once with
//! field-named errors ([`manifest`]); the job plan every rank receives,
//! derived once from it ([`plan`]); model configurations and presets
//! ([`model`]); dataset indexes ([`dataset`]) and where a WebDataset
//! source's tars are ([`shard_pattern`]);
//! the global sample order, a pure function of the seed, the sources and
//! the step ([`sample_order`]), its stream count fitted to the workers'
//! memory ([`stream_layout`]), with the counter-based random numbers it
//! and the model's initialisation draw ([`rng`]); and the status document
//! the coordinator serves and `coca status` reads ([`status`]). The
//! coordinator validates and describes a job from these alone, without
//! linking the tensor library.

pub mod dataset;
pub mod manifest;
pub mod model;
pub mod plan;
pub mod rng;
pub mod sample_order;
pub mod shard_pattern;
pub mod status;
pub mod stream_layout;

pub use model::{Architecture, ModelConfig, ModelConfigError, ParamCounts, PoolerLayout, Preset};
