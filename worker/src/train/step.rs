//! One training step: forward, both losses, backward, AdamW.

use std::time::{Duration, Instant};

use burn::module::AutodiffModule;
use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::{AdamW, AdamWConfig, GradientsParams, Optimizer};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{ElementConversion, Tensor};

use crate::model::loss::LossWeights;
use crate::model::{CocaBatch, CocaModel};

/// What one step measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepReport {
    pub losses: StepLosses,
    pub timings: StepTimings,
}

/// Wall time of each phase of a step.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct StepTimings {
    /// Forward pass and losses, including reading the loss values back.
    pub forward: Duration,
    pub backward: Duration,
    pub optimizer: Duration,
}

impl StepTimings {
    pub fn total(&self) -> Duration {
        self.forward + self.backward + self.optimizer
    }
}

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

    pub fn step(
        &mut self,
        model: CocaModel<B>,
        batch: &CocaBatch<B>,
        learning_rate: f64,
    ) -> (CocaModel<B>, StepReport) {
        let start = Instant::now();
        let losses = model.losses(batch, self.weights);
        let read = |loss: Tensor<B, 1>| loss.into_scalar().elem::<f32>();
        let values = StepLosses {
            total: read(losses.total.clone()),
            contrastive: losses.contrastive.map(read),
            captioning: losses.captioning.map(read),
        };
        let forward_done = Instant::now();
        let gradients = GradientsParams::from_grads(losses.total.backward(), &model);
        let backward_done = Instant::now();
        let model = self.optimizer.step(learning_rate, model, gradients);
        // Backends may run lazily; wait for the update so timings are honest.
        let _ = B::sync(&batch.images.device());
        let timings = StepTimings {
            forward: forward_done - start,
            backward: backward_done - forward_done,
            optimizer: backward_done.elapsed(),
        };
        (
            model,
            StepReport {
                losses: values,
                timings,
            },
        )
    }
}
