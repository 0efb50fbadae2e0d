//! Averaging gradients across ranks.
//!
//! Gradients are flattened in the module's visiting order (burn's ParamIds
//! are random per process, so position, never id, identifies a parameter
//! across ranks), all-reduced bucket by bucket, and written back.

use burn::module::{AutodiffModule, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::backend::AutodiffBackend;
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
        values: Vec::new(),
        _backend: Default::default(),
    };
    module.visit(&mut flatten);
    let Flatten {
        mut gradients,
        mut values,
        ..
    } = flatten;
    let bucket = (bucket_bytes / size_of::<f32>()).max(1);
    for chunk in values.chunks_mut(bucket) {
        collective.all_reduce_mean(chunk)?;
    }
    module.visit(&mut Restore::<B> {
        gradients: &mut gradients,
        values: &values,
        offset: 0,
        _backend: Default::default(),
    });
    Ok(gradients)
}

/// Copies every gradient, in visiting order, into one flat buffer.
struct Flatten<B: AutodiffBackend> {
    gradients: GradientsParams,
    values: Vec<f32>,
    _backend: std::marker::PhantomData<B>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for Flatten<B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if let Some(gradient) = self.gradients.get::<B::InnerBackend, D>(param.id) {
            let data = gradient.into_data().convert::<f32>();
            self.values
                .extend_from_slice(data.as_slice().expect("f32 data after convert"));
        }
    }
}

/// Writes the reduced values back, walking the parameters in the same order.
struct Restore<'a, B: AutodiffBackend> {
    gradients: &'a mut GradientsParams,
    values: &'a [f32],
    offset: usize,
    _backend: std::marker::PhantomData<B>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for Restore<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let Some(gradient) = self.gradients.remove::<B::InnerBackend, D>(param.id) else {
            return;
        };
        let shape = gradient.dims();
        let device = gradient.device();
        let len: usize = shape.iter().product();
        let values = self.values[self.offset..self.offset + len].to_vec();
        self.offset += len;
        let reduced = Tensor::<B::InnerBackend, D>::from_data(TensorData::new(values, shape), &device);
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
