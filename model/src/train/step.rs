//! One training step: forward, both losses, backward, gradient all-reduce,
//! AdamW.

use std::time::{Duration, Instant};

use burn::module::AutodiffModule;
use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{ElementConversion, FloatDType, Tensor};

use crate::loss::{captioning_loss_sum, LossWeights};
use crate::state::{Optimizer as AdamWOptimizer, OptimizerRecord};
use crate::train::contrastive::{contrastive_gradients, ContrastiveMode};
use crate::train::gradients::{all_reduce_mean, DEFAULT_BUCKET_BYTES};
use crate::{CocaBatch, CocaModel};
use collective::{Collective, CollectiveError};
use contract::manifest::Precision;

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

/// The dtype the towers compute in for a manifest's `train.precision`.
pub fn compute_dtype(precision: Precision) -> FloatDType {
    match precision {
        Precision::F32 => FloatDType::F32,
        Precision::Bf16 => FloatDType::BF16,
    }
}

#[derive(Clone)]
pub struct TrainStep<B: AutodiffBackend> {
    optimizer: AdamWOptimizer<B>,
    weights: LossWeights,
    mode: ContrastiveMode,
    bucket_bytes: usize,
    /// What the towers compute in: f32, or bf16 (mixed precision).
    compute: FloatDType,
}

impl<B: AutodiffBackend> TrainStep<B>
where
    CocaModel<B>: AutodiffModule<B>,
{
    pub fn new(optimizer: &AdamWConfig, weights: LossWeights, mode: ContrastiveMode) -> Self {
        Self {
            optimizer: optimizer.init(),
            weights,
            mode,
            bucket_bytes: DEFAULT_BUCKET_BYTES,
            compute: FloatDType::F32,
        }
    }

    /// Mixed precision with `FloatDType::BF16`: matmuls and activations in
    /// bf16; parameters, gradients, their all-reduce, AdamW's moments, the
    /// losses and softmaxes, and the logit scale in f32.
    pub fn with_compute(mut self, compute: FloatDType) -> Self {
        self.compute = compute;
        self
    }

    /// AdamW's state, keyed by the model's ParamIds (for checkpoints).
    pub fn optimizer_record(&self) -> OptimizerRecord<B> {
        self.optimizer.to_record()
    }

    /// Continues from saved AdamW state (keyed by this model's ParamIds).
    pub fn with_optimizer_record(mut self, record: OptimizerRecord<B>) -> Self {
        self.optimizer = self.optimizer.load_record(record);
        self
    }

    /// Size of the gradient all-reduce buckets.
    pub fn with_bucket_bytes(mut self, bytes: usize) -> Self {
        self.bucket_bytes = bytes;
        self
    }

    /// One data-parallel step on this rank's micro-batch. Every rank of
    /// `collective` calls it with its own slice of the global batch (ranks
    /// in sample order, equal rows) and ends with the same parameters as one
    /// rank stepping on the whole batch. The losses reported are those of
    /// the global batch.
    pub fn step(
        &mut self,
        model: CocaModel<B>,
        batch: &CocaBatch<B>,
        learning_rate: f64,
        collective: &mut dyn Collective,
    ) -> Result<(CocaModel<B>, StepReport), CollectiveError> {
        let start = Instant::now();
        let world = collective.world_size() as f32;
        let computed = CocaBatch {
            images: batch.images.clone().cast(self.compute),
            ..batch.clone()
        };
        let output = model.forward(&computed, self.weights.heads());
        let read = |loss: Tensor<B, 1>| loss.into_scalar().elem::<f32>();

        let mut objective: Option<Tensor<B, 1>> = None;
        let mut captioning = None;
        if let Some(logits) = output.caption_logits {
            let [_, len] = batch.tokens.dims();
            let ignore = batch.padding.clone().narrow(1, 1, len - 1);
            // The global mean over tokens, split so the mean over ranks is exact.
            let mut tokens = [read(ignore.clone().bool_not().float().sum())];
            collective.all_reduce_sum(&mut tokens)?;
            let loss = captioning_loss_sum(logits, batch.tokens.clone().narrow(1, 1, len - 1), ignore)
                / (tokens[0] / world).max(1.0);
            let mut value = [read(loss.clone())];
            collective.all_reduce_mean(&mut value)?;
            captioning = Some(value[0]);
            objective = Some(loss * self.weights.captioning);
        }
        let mut contrastive = None;
        if let (Some(image), Some(text)) = (output.image_embedding, output.text_embedding) {
            let gradients = contrastive_gradients(
                image.clone(),
                text.clone(),
                model.logit_scale.val(),
                self.weights.contrastive,
                self.mode,
                collective,
            )?;
            contrastive = Some(gradients.loss);
            // A surrogate whose gradient through the towers is exactly the
            // contrastive gradient computed above.
            let surrogate = (image * Tensor::from_inner(gradients.image)).sum()
                + (text * Tensor::from_inner(gradients.text)).sum()
                + (model.logit_scale.val() * Tensor::from_inner(gradients.logit_scale)).sum();
            objective = Some(match objective {
                Some(captioning) => captioning + surrogate,
                None => surrogate,
            });
        }
        let objective = objective.expect("at least one loss weight is non-zero");
        let losses = StepLosses {
            total: contrastive.unwrap_or(0.0) * self.weights.contrastive
                + captioning.unwrap_or(0.0) * self.weights.captioning,
            contrastive,
            captioning,
        };
        let forward_done = Instant::now();
        let gradients = GradientsParams::from_grads(objective.backward(), &model);
        let gradients = all_reduce_mean(&model, gradients, collective, self.bucket_bytes)?;
        let backward_done = Instant::now();
        let model = self.optimizer.step(learning_rate, model, gradients);
        // Backends may run lazily; wait for the update so timings are honest.
        let _ = B::sync(&batch.images.device());
        let timings = StepTimings {
            forward: forward_done - start,
            backward: backward_done - forward_done,
            optimizer: backward_done.elapsed(),
        };
        Ok((model, StepReport { losses, timings }))
    }
}
