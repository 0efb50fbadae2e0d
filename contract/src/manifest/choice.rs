//! The manifest's choices between named options, as the TOML spells them
//! (and, with the `clap` feature, command lines).

use serde::{Deserialize, Serialize};

/// How a data source's shards are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum SourceFormat {
    /// Arrow shards with their index.json, as `coca data import` writes them.
    Arrow,
    /// WebDataset tars (img2dataset's output) read in place.
    Webdataset,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    Cosine,
    Linear,
    Constant,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum Contrastive {
    Local,
    Full,
}

/// `f32`, or `bf16`: mixed precision (matmuls and activations in bf16;
/// parameters, gradients, their all-reduce, AdamW's moments, losses,
/// softmaxes and the logit scale in f32).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    F32,
    Bf16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    Cpu,
    Cuda,
    /// burn's wgpu backend: Vulkan (Linux, Windows) or Metal (macOS) GPUs
    /// of any vendor, compiled from the same cubecl kernels as CUDA.
    Wgpu,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum CollectiveKind {
    Tcp,
    Nccl,
}

/// How much time cubecl spends choosing the fastest kernel for a shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum AutotuneLevel {
    Minimal,
    Balanced,
    Extensive,
    Full,
}
