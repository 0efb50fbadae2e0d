//! Filling a job's kernel cache before its workers start (`coca kernels
//! warm`): a few training steps at the job's own shapes (its model, each
//! rank's micro-batch, its precision and contrastive mode, the gathered
//! embeddings of its world) on one GPU of the job's kind, then the cache is
//! shared. Every worker of the fresh job then starts warm.

use std::time::{Duration, Instant};

use burn::module::AutodiffModule;
use burn::tensor::backend::AutodiffBackend;
use collective::Rehearsal;
use contract::manifest::{Backend, Manifest};
use model::train::synthetic::synthetic_batch;
use model::CocaModel;

use super::error::KernelError;
use super::Kernels;

/// What warming did.
#[derive(Debug, Clone)]
pub struct Warmed {
    /// The GPU, as its driver names it.
    pub device: String,
    /// Files the shared cache held before.
    pub fetched: usize,
    pub first_step: Duration,
    /// Kernels compiled by the steps, when counted.
    pub compiled: Option<u64>,
    /// Files shared afterwards.
    pub shared: usize,
}

/// Runs `steps` training steps of `manifest`'s job as one of its ranks on
/// GPU `ordinal` of the manifest's backend and shares the kernels compiled.
pub fn warm(manifest: &Manifest, ordinal: usize, steps: usize) -> Result<Warmed, KernelError> {
    let options = crate::job::store_options(&contract::plan::StorePlan::of(&manifest.data));
    match manifest.cluster.backend {
        Backend::Cpu => Err(KernelError::Device(
            "cluster.backend = \"cpu\" compiles no kernels: nothing to warm".into(),
        )),
        Backend::Wgpu => {
            let (mut kernels, adapter) = Kernels::prepare_wgpu(&manifest.gpu, &options, ordinal)?;
            let first_step = rehearse::<model::backend::WgpuTrain>(manifest, &adapter.device, steps)?;
            Ok(warmed(&mut kernels, adapter.name, first_step))
        }
        #[cfg(feature = "cuda")]
        Backend::Cuda => {
            let (mut kernels, name) = Kernels::prepare_cuda(&manifest.gpu, &options, ordinal)?;
            let device = model::backend::device::<model::backend::CudaTrain>(ordinal).map_err(KernelError::Device)?;
            let first_step = rehearse::<model::backend::CudaTrain>(manifest, &device, steps)?;
            Ok(warmed(&mut kernels, name, first_step))
        }
        #[cfg(not(feature = "cuda"))]
        Backend::Cuda => Err(KernelError::Device(
            "cluster.backend = \"cuda\": this coca was built without CUDA (cargo build --features cuda)".into(),
        )),
    }
}

fn warmed(kernels: &mut Kernels, device: String, first_step: Duration) -> Warmed {
    let compiled = kernels.compiled();
    Warmed {
        device,
        fetched: kernels.fetched,
        first_step,
        compiled,
        shared: kernels.publish(),
    }
}

/// Trains `steps` steps on synthetic data of rank 0's shapes; returns the
/// first step's time.
fn rehearse<B: AutodiffBackend>(manifest: &Manifest, device: &B::Device, steps: usize) -> Result<Duration, KernelError>
where
    CocaModel<B>: AutodiffModule<B, InnerModule = CocaModel<B::InnerBackend>>,
{
    let world = manifest.cluster.workers;
    let seed = manifest.job.seed;
    let data = synthetic_batch::<B>(&manifest.model, manifest.train.global_batch / world, seed, device);
    let mut model = CocaModel::<B>::new(&manifest.model, seed, device);
    let mut trainer = crate::job::setup::train_step::<B>(&manifest.train);
    let mut collective = Rehearsal { world };
    let mut first_step = Duration::ZERO;
    for step in 0..steps.max(1) {
        let began = Instant::now();
        let learning_rate = manifest.train.learning_rate_at(step as u64, steps as u64);
        let (next, _) = trainer
            .step(model, &data, learning_rate, &mut collective)
            .map_err(KernelError::Rehearsal)?;
        model = next;
        if step == 0 {
            first_step = began.elapsed();
        }
    }
    Ok(first_step)
}
