//! One training step: forward, both losses, backward, AdamW.

use burn::module::AutodiffModule;
use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::{AdamW, AdamWConfig, GradientsParams, Optimizer};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{ElementConversion, Tensor};

use crate::model::loss::LossWeights;
use crate::model::{CocaBatch, CocaModel};

/// Loss values of one step, read back from the device.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepLosses {
    pub total: f32,
    pub contrastive: Option<f32>,
    pub captioning: Option<f32>,
}

pub struct TrainStep<B: AutodiffBackend> {
    optimizer: OptimizerAdaptor<AdamW, CocaModel<B>, B>,
    weights: LossWeights,
}

impl<B: AutodiffBackend> TrainStep<B>
where
    CocaModel<B>: AutodiffModule<B>,
{
    pub fn new(optimizer: &AdamWConfig, weights: LossWeights) -> Self {
        Self {
            optimizer: optimizer.init(),
            weights,
        }
    }

    pub fn step(&mut self, model: CocaModel<B>, batch: &CocaBatch<B>, learning_rate: f64) -> (CocaModel<B>, StepLosses) {
        let losses = model.losses(batch, self.weights);
        let read = |loss: Tensor<B, 1>| loss.into_scalar().elem::<f32>();
        let values = StepLosses {
            total: read(losses.total.clone()),
            contrastive: losses.contrastive.map(read),
            captioning: losses.captioning.map(read),
        };
        let gradients = GradientsParams::from_grads(losses.total.backward(), &model);
        let model = self.optimizer.step(learning_rate, model, gradients);
        (model, values)
    }
}
