//! Averaging gradients across ranks.
//!
//! Gradients are concatenated in the module's visiting order (burn's
//! ParamIds are random per process, so position, never id, identifies a
//! parameter across ranks) into one buffer on the device, all-reduced
//! bucket by bucket, and handed back as views of it. The buckets are
//! reduced in GPU memory where the collective reaches it (NCCL on a CUDA
//! build), else read to the host once and written back once.

use burn::module::{AutodiffModule, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{ElementConversion, Tensor, TensorData};

use collective::{Collective, CollectiveError};

/// Default all-reduce bucket: 32 MiB of f32.
pub const DEFAULT_BUCKET_BYTES: usize = 32 << 20;

/// Replaces every gradient in `gradients` by its mean over all ranks.
/// Parameters without a gradient (a head switched off) are skipped on every
/// rank alike, since every rank runs the same heads.
pub fn all_reduce_mean<B: AutodiffBackend, M: AutodiffModule<B>>(
    module: &M,
    gradients: GradientsParams,
    collective: &mut dyn Collective,
    bucket_bytes: usize,
) -> Result<GradientsParams, CollectiveError> {
    if collective.world_size() == 1 {
        return Ok(gradients);
    }
    let mut flatten = Flatten::<B> {
        gradients,
        parts: Vec::new(),
    };
    module.visit(&mut flatten);
    let Flatten { mut gradients, parts } = flatten;
    if parts.is_empty() {
        return Ok(gradients);
    }
    let flat = reduce_mean(Tensor::cat(parts, 0), collective, bucket_bytes)?;
    module.visit(&mut Restore::<B> {
        gradients: &mut gradients,
        flat,
        offset: 0,
    });
    Ok(gradients)
}

/// `flat`'s mean over all ranks, `bucket_bytes` at a time: in device
/// memory where the collective reaches it, else through host memory.
pub fn reduce_mean<B: Backend>(
    flat: Tensor<B, 1>,
    collective: &mut dyn Collective,
    bucket_bytes: usize,
) -> Result<Tensor<B, 1>, CollectiveError> {
    let len = flat.dims()[0];
    let bucket = (bucket_bytes / size_of::<f32>()).max(1);
    #[cfg(feature = "cuda")]
    if let Some(device) = collective.on_device() {
        let memory = crate::cuda_memory::CudaMemory::of(&flat).map_err(|message| CollectiveError::Device {
            operation: "reach the gradients in GPU memory",
            message,
        })?;
        if let Some(memory) = memory {
            for start in (0..len).step_by(bucket) {
                let address = memory.address(start);
                // SAFETY: `memory` holds `len` f32 values on this device,
                // allocated while it lives, their writes finished.
                unsafe { device.all_reduce_mean_f32(address, address, bucket.min(len - start))? };
            }
            return Ok(flat);
        }
    }
    let device = flat.device();
    let mut values = flat
        .into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .expect("f32 data after convert");
    for chunk in values.chunks_mut(bucket) {
        collective.all_reduce_mean(chunk)?;
    }
    Ok(Tensor::from_data(TensorData::new(values, [len]), &device))
}

/// Every gradient, in visiting order, as a flat tensor.
struct Flatten<B: AutodiffBackend> {
    gradients: GradientsParams,
    parts: Vec<Tensor<B::InnerBackend, 1>>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for Flatten<B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if let Some(gradient) = self.gradients.get::<B::InnerBackend, D>(param.id) {
            let len = gradient.shape().num_elements();
            self.parts.push(gradient.reshape([len]));
        }
    }
}

/// Puts the reduced gradients back, walking the parameters in the same order.
struct Restore<'a, B: AutodiffBackend> {
    gradients: &'a mut GradientsParams,
    flat: Tensor<B::InnerBackend, 1>,
    offset: usize,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for Restore<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let Some(gradient) = self.gradients.remove::<B::InnerBackend, D>(param.id) else {
            return;
        };
        let shape = gradient.shape();
        let len = shape.num_elements();
        let reduced: Tensor<B::InnerBackend, D> = self.flat.clone().narrow(0, self.offset, len).reshape(shape);
        self.offset += len;
        self.gradients.register(param.id, reduced);
    }
}

/// The L2 norm of every gradient in `gradients` together (one read-back).
pub fn global_norm<B: AutodiffBackend, M: AutodiffModule<B>>(module: &M, gradients: &GradientsParams) -> f32 {
    let mut squares = SumOfSquares::<B> { gradients, total: None };
    module.visit(&mut squares);
    squares
        .total
        .map_or(0.0, |total| total.into_scalar().elem::<f32>().sqrt())
}

/// Every gradient in `gradients` times `factor`.
pub fn scale<B: AutodiffBackend, M: AutodiffModule<B>>(
    module: &M,
    mut gradients: GradientsParams,
    factor: f32,
) -> GradientsParams {
    module.visit(&mut Scale::<B> {
        gradients: &mut gradients,
        factor,
        _backend: Default::default(),
    });
    gradients
}

struct SumOfSquares<'a, B: AutodiffBackend> {
    gradients: &'a GradientsParams,
    total: Option<Tensor<B::InnerBackend, 1>>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for SumOfSquares<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if let Some(gradient) = self.gradients.get::<B::InnerBackend, D>(param.id) {
            let squares = gradient.square().sum();
            self.total = Some(match self.total.take() {
                Some(total) => total + squares,
                None => squares,
            });
        }
    }
}

struct Scale<'a, B: AutodiffBackend> {
    gradients: &'a mut GradientsParams,
    factor: f32,
    _backend: std::marker::PhantomData<B>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for Scale<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if let Some(gradient) = self.gradients.remove::<B::InnerBackend, D>(param.id) {
            self.gradients.register(param.id, gradient * self.factor);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Cpu;
    use collective::loopback;

    /// The host path (no collective here reaches device memory): buckets
    /// of 3 values over 10, so the last is short, every value averaged once.
    #[test]
    fn a_flat_buffer_is_averaged_bucket_by_bucket() {
        let rings = loopback::rings(2, std::time::Duration::from_secs(10)).unwrap();
        let reduced = loopback::on_every_rank(rings, |ring| {
            assert!(ring.on_device().is_none());
            let scale = 1.0 + 2.0 * ring.rank() as f32; // rank 0: i, rank 1: 3 i
            let values: Vec<f32> = (0..10).map(|i| scale * i as f32).collect();
            let flat = Tensor::<Cpu, 1>::from_data(TensorData::new(values, [10]), &Default::default());
            let mean = reduce_mean(flat, ring, 3 * size_of::<f32>()).unwrap();
            mean.into_data().into_vec::<f32>().unwrap()
        });
        let expected: Vec<f32> = (0..10).map(|i| 2.0 * i as f32).collect();
        assert_eq!(reduced, [expected.clone(), expected]);
    }
}
