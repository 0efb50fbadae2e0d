//! The step benchmark on a GPU, with cubecl's kernels set up as a worker
//! sets them up (autotune level, the kernel cache, compilations counted).

use collective::{CollectiveError, Solo};
use contract::manifest::Gpu;
use contract::ModelConfig;
use store::StoreOptions;
use worker::kernels::{KernelError, Kernels};

use crate::step::{bench_step, StepBenchmark, StepBenchmarkPlan};

/// A step benchmark on one GPU.
pub struct GpuStep {
    pub report: StepBenchmark,
    /// The device as its driver names it.
    pub device: String,
    /// Kernels compiled in this process (none: not counted).
    pub kernels_compiled: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum GpuStepError {
    #[error(transparent)]
    Kernels(#[from] KernelError),
    #[error("{0}")]
    Device(String),
    #[error(transparent)]
    Collective(#[from] CollectiveError),
    #[error("this coca was built without CUDA (cargo build --release --features cuda)")]
    WithoutCuda,
}

/// The step benchmark on wgpu adapter `ordinal` (Vulkan or Metal).
pub fn wgpu(config: &ModelConfig, plan: StepBenchmarkPlan, gpu: &Gpu, ordinal: usize) -> Result<GpuStep, GpuStepError> {
    let (mut kernels, adapter) = Kernels::prepare_wgpu(gpu, &StoreOptions::default(), ordinal)?;
    let report = bench_step::<model::backend::WgpuTrain>(config, plan, &mut Solo, &adapter.device)?;
    kernels.publish();
    Ok(GpuStep {
        report,
        device: format!("wgpu device {ordinal} ({})", adapter.name),
        kernels_compiled: kernels.compiled(),
    })
}

/// The step benchmark on CUDA device `ordinal`.
#[cfg(feature = "cuda")]
pub fn cuda(config: &ModelConfig, plan: StepBenchmarkPlan, gpu: &Gpu, ordinal: usize) -> Result<GpuStep, GpuStepError> {
    let (mut kernels, _) = Kernels::prepare_cuda(gpu, &StoreOptions::default(), ordinal)?;
    let device = model::backend::device::<model::backend::CudaTrain>(ordinal).map_err(GpuStepError::Device)?;
    let report = bench_step::<model::backend::CudaTrain>(config, plan, &mut Solo, &device)?;
    kernels.publish();
    Ok(GpuStep {
        report,
        device: format!("cuda device {ordinal}"),
        kernels_compiled: kernels.compiled(),
    })
}

#[cfg(not(feature = "cuda"))]
pub fn cuda(_: &ModelConfig, _: StepBenchmarkPlan, _: &Gpu, _: usize) -> Result<GpuStep, GpuStepError> {
    Err(GpuStepError::WithoutCuda)
}
