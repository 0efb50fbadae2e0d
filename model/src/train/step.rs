//! One training step: forward, both losses, backward, gradient all-reduce,
//! AdamW.

use std::time::{Duration, Instant};

use burn::module::{AutodiffModule, Module, ModuleVisitor, Param};
use burn::optim::{AdamWConfig, GradientsAccumulator, GradientsParams, Optimizer as _};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{ElementConversion, FloatDType, Tensor};

use crate::loss::{captioning_loss_sum, Heads, LossWeights};
use crate::state::{Moments, Optimizer as AdamWOptimizer};
use crate::train::checkpointing;
use crate::train::contrastive::{contrastive_gradients, ContrastiveMode};
use crate::train::ema::Ema;
use crate::train::gradients::{all_reduce_mean, global_norm, scale, DEFAULT_BUCKET_BYTES};
use crate::train::parameter_groups::ParameterGroups;
use crate::train::sharded_adamw::{segment_of, ShardedAdamW};
use crate::{CocaBatch, CocaModel};
use collective::{Collective, CollectiveError};
use contract::manifest::Precision;

/// What one step measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepReport {
    pub losses: StepLosses,
    /// The L2 norm of the reduced gradient, before any clipping.
    pub gradient_norm: f32,
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

/// AdamW, whole on every rank or sharded between them.
#[derive(Clone)]
enum Optimizer<B: AutodiffBackend> {
    /// burn's optimizer: every rank holds every tensor's moments.
    Replicated(AdamWOptimizer<B>),
    /// Each rank holds the moments of its segment (ZeRO stage 2).
    Sharded(ShardedAdamW<B::InnerBackend>),
}

#[derive(Clone)]
pub struct TrainStep<B: AutodiffBackend> {
    config: AdamWConfig,
    optimizer: Optimizer<B>,
    weights: LossWeights,
    mode: ContrastiveMode,
    bucket_bytes: usize,
    /// What the towers compute in: f32, or bf16 (mixed precision).
    compute: FloatDType,
    /// Chunks this rank's rows are processed in.
    accumulation: usize,
    /// The largest L2 norm the reduced gradient may have.
    clip_norm: Option<f32>,
    /// The towers' blocks computed again in the backward pass.
    activation_checkpointing: bool,
    /// Layer-wise learning-rate decay (locking is the model's: locked
    /// parameters have no gradient).
    groups: ParameterGroups,
    /// Each parameter tensor's share of the learning rate, from the first step on.
    learning_rate_scales: Option<Vec<f64>>,
    /// The parameters' moving average, when kept.
    ema: Option<Ema>,
}

impl<B: AutodiffBackend> TrainStep<B>
where
    CocaModel<B>: AutodiffModule<B>,
{
    pub fn new(optimizer: &AdamWConfig, weights: LossWeights, mode: ContrastiveMode) -> Self {
        Self {
            config: optimizer.clone(),
            optimizer: Optimizer::Replicated(optimizer.init()),
            weights,
            mode,
            bucket_bytes: DEFAULT_BUCKET_BYTES,
            compute: FloatDType::F32,
            accumulation: 1,
            clip_norm: None,
            activation_checkpointing: false,
            groups: ParameterGroups::default(),
            learning_rate_scales: None,
            ema: None,
        }
    }

    /// Mixed precision with `FloatDType::BF16`: matmuls and activations in
    /// bf16; parameters, gradients, their all-reduce, AdamW's moments, the
    /// losses and softmaxes, and the logit scale in f32.
    pub fn with_compute(mut self, compute: FloatDType) -> Self {
        self.compute = compute;
        self
    }

    /// Processes each rank's rows in `chunks` (at most its rows) with cached
    /// contrastive features: activations for one chunk at a time, negatives
    /// from the whole global batch, the same gradient as one pass.
    pub fn with_accumulation(mut self, chunks: usize) -> Self {
        self.accumulation = chunks.max(1);
        self
    }

    /// Scales the reduced gradient down to an L2 norm of `max_norm` when it
    /// is larger (as torch's `clip_grad_norm_`).
    pub fn with_clip_norm(mut self, max_norm: Option<f32>) -> Self {
        self.clip_norm = max_norm;
        self
    }

    /// Keeps only each tower block's input in the forward pass and
    /// computes the block again in the backward pass: activations for one
    /// block at a time (`train::checkpointing`).
    pub fn with_activation_checkpointing(mut self, checkpointing: bool) -> Self {
        self.activation_checkpointing = checkpointing;
        self
    }

    /// Steps each tower's groups at their layer-decayed share of the
    /// learning rate. Locked groups must be locked in the model too
    /// ([`ParameterGroups::lock`]).
    pub fn with_parameter_groups(mut self, groups: ParameterGroups) -> Self {
        self.groups = groups;
        self.learning_rate_scales = None;
        self
    }

    /// Keeps a moving average of the parameters with `decay` (none: not).
    pub fn with_ema(mut self, decay: Option<f64>) -> Self {
        self.ema = decay.map(Ema::new);
        self
    }

    /// Continues the moving average from a checkpoint's.
    pub fn with_ema_values(mut self, values: Vec<f32>) -> Self {
        self.ema = self.ema.map(|ema| ema.with_values(values));
        self
    }

    /// The moving average's decay and values, once it has any.
    pub fn ema(&self) -> Option<(f64, &[f32])> {
        let ema = self.ema.as_ref()?;
        Some((ema.decay, ema.values()?))
    }

    /// Shards AdamW's state between the ranks (ZeRO stage 2): each holds
    /// the moments of 1/N of the parameters; the gradient is
    /// reduce-scattered and the updated parameters all-gathered.
    pub fn with_sharded_optimizer(mut self, sharded: bool) -> Self {
        self.optimizer = if sharded {
            Optimizer::Sharded(ShardedAdamW::new(&self.config))
        } else {
            Optimizer::Replicated(self.config.init())
        };
        self
    }

    pub fn is_sharded(&self) -> bool {
        matches!(self.optimizer, Optimizer::Sharded(_))
    }

    /// Continues from saved AdamW state: the whole record (keyed by this
    /// model's ParamIds) of an unsharded optimizer, or a sharded one's
    /// segment (`state::load_gathered` of [`TrainStep::segment`]).
    pub fn with_moments(mut self, moments: Moments<B>) -> Self {
        self.optimizer = match (self.optimizer, moments) {
            (Optimizer::Replicated(optimizer), Moments::Whole(record)) => {
                Optimizer::Replicated(optimizer.load_record(record))
            }
            (Optimizer::Sharded(optimizer), Moments::Gathered(moments)) => {
                Optimizer::Sharded(optimizer.with_loaded(moments))
            }
            (Optimizer::Replicated(_), Moments::Gathered(_)) => {
                panic!("an unsharded optimizer loads the whole record, not a segment")
            }
            (Optimizer::Sharded(_), Moments::Whole(_)) => {
                panic!("a sharded optimizer loads its segment, not the whole record")
            }
        };
        self
    }

    /// The elements of a section whose moments rank `rank` of `world`
    /// keeps when sharded.
    pub fn segment(model: &CocaModel<B>, rank: usize, world: usize) -> std::ops::Range<u64> {
        segment_of(model, rank, world)
    }

    /// AdamW's moments as this rank's checkpoint shard needs them. Every
    /// rank of `collective` calls it at the same step (a sharded optimizer
    /// gathers the moments of the shard's range from the ranks holding them).
    pub fn moments(
        &mut self,
        model: &CocaModel<B>,
        collective: &mut dyn Collective,
    ) -> Result<Moments<B>, CollectiveError> {
        match &mut self.optimizer {
            Optimizer::Replicated(optimizer) => Ok(Moments::Whole(optimizer.to_record())),
            Optimizer::Sharded(optimizer) => {
                let section_len = segment_of(model, 0, 1).end;
                let range = shard_moments(section_len, collective.rank(), collective.world_size());
                Ok(Moments::Gathered(optimizer.gather(model, range, collective)?))
            }
        }
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
    ///
    /// With accumulation (GradCache, open_clip's `--accum-freq`): a first
    /// pass computes every chunk's embeddings (the first chunk's with its
    /// graph, kept; the others without); the contrastive loss over the
    /// global batch gives their gradients; then each chunk's part of both
    /// losses is back-propagated (the others computed again, now with a
    /// graph), the gradients summed over chunks.
    pub fn step(
        &mut self,
        model: CocaModel<B>,
        batch: &CocaBatch<B>,
        learning_rate: f64,
        collective: &mut dyn Collective,
    ) -> Result<(CocaModel<B>, StepReport), CollectiveError>
    where
        CocaModel<B>: AutodiffModule<B, InnerModule = CocaModel<B::InnerBackend>>,
    {
        let start = Instant::now();
        if let Some(ema) = &mut self.ema {
            ema.start(&model);
        }
        let world = collective.world_size() as f32;
        let heads = self.weights.heads();
        let read = |loss: Tensor<B, 1>| loss.into_scalar().elem::<f32>();
        let computed = |part: &CocaBatch<B>| CocaBatch {
            images: part.images.clone().cast(self.compute),
            ..part.clone()
        };
        let forward_pass = |part: &CocaBatch<B>| {
            let part = computed(part);
            if self.activation_checkpointing {
                let (output, checkpoints) = checkpointing::forward(&model, &part, heads);
                (output, Some(checkpoints))
            } else {
                (model.forward(&part, heads), None)
            }
        };
        let [rows, ..] = batch.images.dims();
        let parts: Vec<CocaBatch<B>> = chunks(rows, self.accumulation)
            .map(|(first, len)| batch.rows(first, len))
            .collect();

        // The captioning loss is a mean over the global batch's tokens,
        // split so the mean over ranks is exact.
        let [_, len] = batch.tokens.dims();
        let ignore_of = |part: &CocaBatch<B>| part.padding.clone().narrow(1, 1, len - 1);
        let mut tokens = [0.0];
        if heads.captioning {
            tokens = [read(ignore_of(batch).bool_not().float().sum())];
            collective.all_reduce_sum(&mut tokens)?;
        }

        // The first chunk's forward keeps its graph for its backward below;
        // the others' embeddings come without one.
        let mut first_output = None;
        let contrastive = if heads.contrastive {
            let (output, checkpoints) = forward_pass(&parts[0]);
            let image = output.image_embedding.clone().expect("the contrastive head");
            let text = output.text_embedding.clone().expect("the contrastive head");
            first_output = Some((output, checkpoints));
            let (image, text) = if parts.len() == 1 {
                (image, text)
            } else {
                let (mut images, mut texts) = cached_embeddings(&model.valid(), &parts[1..], self.compute);
                images.insert(0, image.inner());
                texts.insert(0, text.inner());
                (
                    Tensor::from_inner(Tensor::cat(images, 0)),
                    Tensor::from_inner(Tensor::cat(texts, 0)),
                )
            };
            Some(contrastive_gradients(
                image,
                text,
                model.logit_scale.val(),
                self.weights.contrastive,
                self.mode,
                collective,
            )?)
        } else {
            None
        };

        let (mut forward, mut backward) = (start.elapsed(), Duration::ZERO);
        let mut captioning_sum = 0.0;
        let mut accumulated = GradientsAccumulator::<CocaModel<B>>::new();
        let mut gradients = None;
        let mut offset = 0;
        for (i, part) in parts.iter().enumerate() {
            let chunk_start = Instant::now();
            let (output, checkpoints) = match first_output.take() {
                Some(first) => first,
                None => forward_pass(part),
            };
            let [part_rows, ..] = part.images.dims();
            let mut objective: Option<Tensor<B, 1>> = None;
            if let Some(logits) = output.caption_logits {
                let targets = part.tokens.clone().narrow(1, 1, len - 1);
                let loss = captioning_loss_sum(logits, targets, ignore_of(part)) / (tokens[0] / world).max(1.0);
                captioning_sum += read(loss.clone());
                objective = Some(loss * self.weights.captioning);
            }
            if let (Some(cached), Some(image), Some(text)) =
                (&contrastive, output.image_embedding, output.text_embedding)
            {
                // A surrogate whose gradient through the towers is exactly
                // the contrastive gradient of this chunk's rows.
                let rows_of = |gradient: &Tensor<B::InnerBackend, 2>| {
                    Tensor::from_inner(gradient.clone().narrow(0, offset, part_rows))
                };
                let mut surrogate = (image * rows_of(&cached.image)).sum() + (text * rows_of(&cached.text)).sum();
                if i == 0 {
                    surrogate =
                        surrogate + (model.logit_scale.val() * Tensor::from_inner(cached.logit_scale.clone())).sum();
                }
                objective = Some(match objective {
                    Some(captioning) => captioning + surrogate,
                    None => surrogate,
                });
            }
            let objective = objective.expect("at least one loss weight is non-zero");
            let backward_start = Instant::now();
            forward += backward_start - chunk_start;
            let grads = objective.backward();
            match checkpoints {
                Some(checkpoints) => checkpoints.backward(&model, grads, &mut accumulated),
                None if parts.len() == 1 => gradients = Some(GradientsParams::from_grads(grads, &model)),
                None => accumulated.accumulate(&model, GradientsParams::from_grads(grads, &model)),
            }
            backward += backward_start.elapsed();
            offset += part_rows;
        }
        let gradients = gradients.unwrap_or_else(|| accumulated.grads());

        let mut captioning = None;
        if heads.captioning {
            let mut value = [captioning_sum];
            collective.all_reduce_mean(&mut value)?;
            captioning = Some(value[0]);
        }
        let contrastive = contrastive.map(|gradients| gradients.loss);
        let losses = StepLosses {
            total: contrastive.unwrap_or(0.0) * self.weights.contrastive
                + captioning.unwrap_or(0.0) * self.weights.captioning,
            contrastive,
            captioning,
        };
        let reducing = Instant::now();
        let groups = self.groups;
        let scales = self.learning_rate_scales.get_or_insert_with(|| {
            let scales = groups.learning_rate_scales(&model);
            scales.into_iter().map(|scale| scale.unwrap_or(1.0)).collect()
        });
        let (model, gradient_norm, backward_done) = match &mut self.optimizer {
            Optimizer::Replicated(optimizer) => {
                let gradients = all_reduce_mean(&model, gradients, collective, self.bucket_bytes)?;
                // Every rank holds the same reduced gradient: the same norm, the same clip.
                let gradient_norm = global_norm(&model, &gradients);
                let gradients = match self.clip_norm {
                    Some(max_norm) if gradient_norm > max_norm => {
                        scale(&model, gradients, max_norm / (gradient_norm + 1e-6))
                    }
                    _ => gradients,
                };
                let backward_done = Instant::now();
                backward += backward_done - reducing;
                let mut model = model;
                for (scale, gradients) in by_learning_rate(&model, gradients, scales) {
                    model = optimizer.step(learning_rate * scale, model, gradients);
                }
                (model, gradient_norm, backward_done)
            }
            // The reduction is part of the sharded update.
            Optimizer::Sharded(optimizer) => {
                let (model, gradient_norm) =
                    optimizer.step(model, gradients, learning_rate, scales, self.clip_norm, collective)?;
                (model, gradient_norm, reducing)
            }
        };
        if let Some(ema) = &mut self.ema {
            ema.update(&model);
        }
        // Backends may run lazily; wait for the update so timings are honest.
        let _ = B::sync(&batch.images.device());
        let timings = StepTimings {
            forward,
            backward,
            optimizer: backward_done.elapsed(),
        };
        Ok((
            model,
            StepReport {
                losses,
                gradient_norm,
                timings,
            },
        ))
    }
}

/// `gradients` split by the share of the learning rate each parameter
/// tensor trains at (`scales`, in visiting order): one optimizer step each.
fn by_learning_rate<B: AutodiffBackend>(
    model: &CocaModel<B>,
    gradients: GradientsParams,
    scales: &[f64],
) -> Vec<(f64, GradientsParams)> {
    if scales.iter().all(|&scale| scale == 1.0) {
        return vec![(1.0, gradients)];
    }
    struct Split<'a> {
        gradients: GradientsParams,
        scales: std::slice::Iter<'a, f64>,
        groups: Vec<(f64, GradientsParams)>,
    }
    impl<B: AutodiffBackend> ModuleVisitor<B> for Split<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            let scale = *self.scales.next().expect("a scale per parameter tensor");
            let Some(gradient) = self.gradients.remove::<B::InnerBackend, D>(param.id) else {
                return;
            };
            let at = match self.groups.iter().position(|(s, _)| *s == scale) {
                Some(at) => at,
                None => {
                    self.groups.push((scale, GradientsParams::new()));
                    self.groups.len() - 1
                }
            };
            self.groups[at].1.register(param.id, gradient);
        }
    }
    let mut split = Split {
        gradients,
        scales: scales.iter(),
        groups: Vec::new(),
    };
    model.visit(&mut split);
    split.groups
}

/// The range of a section a checkpoint shard (rank `rank` of `world`)
/// holds of either moment section: both moments over it cover the shard.
fn shard_moments(section_len: u64, rank: usize, world: usize) -> std::ops::Range<u64> {
    let (start, end) = checkpoint::layout::shard_range(3 * section_len, rank, world);
    let within = |section: u64| {
        let begin = section * section_len;
        start.max(begin).min(begin + section_len) - begin..end.max(begin).min(begin + section_len) - begin
    };
    let (first, second) = (within(1), within(2));
    match (first.is_empty(), second.is_empty()) {
        (true, true) => 0..0,
        (false, true) => first,
        (true, false) => second,
        (false, false) => first.start.min(second.start)..first.end.max(second.end),
    }
}

/// `(first row, rows)` of each of `chunks` parts of `rows`, in order; the
/// first `rows % chunks` parts hold one row more.
fn chunks(rows: usize, chunks: usize) -> impl Iterator<Item = (usize, usize)> {
    let chunks = chunks.clamp(1, rows.max(1));
    let (base, extra) = (rows / chunks, rows % chunks);
    (0..chunks).map(move |i| (i * base + i.min(extra), base + usize::from(i < extra)))
}

/// Each part's normalised embeddings, without an autodiff graph: image
/// and text, [rows, dim] each.
fn cached_embeddings<B: Backend>(
    model: &CocaModel<B>,
    parts: &[CocaBatch<impl AutodiffBackend<InnerBackend = B>>],
    compute: FloatDType,
) -> (Vec<Tensor<B, 2>>, Vec<Tensor<B, 2>>) {
    let heads = Heads {
        contrastive: true,
        captioning: false,
    };
    parts
        .iter()
        .map(|part| {
            let part = CocaBatch {
                images: part.images.clone().inner().cast(compute),
                tokens: part.tokens.clone().inner(),
                padding: part.padding.clone().inner(),
                kept_patches: part.kept_patches.clone().map(|kept| kept.inner()),
            };
            let output = model.forward(&part, heads);
            (
                output.image_embedding.expect("the contrastive head"),
                output.text_embedding.expect("the contrastive head"),
            )
        })
        .unzip()
}

#[cfg(test)]
mod tests {
    use super::{chunks, shard_moments};

    #[test]
    fn a_shard_gathers_the_moments_of_its_range_only() {
        // Sections of 10: rank 0 of 3 holds params 0..10, rank 1 the first
        // moments, rank 2 the second.
        assert_eq!(shard_moments(10, 0, 3), 0..0);
        assert_eq!(shard_moments(10, 1, 3), 0..10);
        assert_eq!(shard_moments(10, 2, 3), 0..10);
        // Of 2: rank 0 params and half the first moments; rank 1 the rest.
        assert_eq!(shard_moments(10, 0, 2), 0..5);
        assert_eq!(shard_moments(10, 1, 2), 0..10);
        assert_eq!(shard_moments(10, 3, 4), 2..10);
    }

    #[test]
    fn chunks_cover_the_rows_in_order_and_differ_by_at_most_one() {
        assert_eq!(chunks(10, 4).collect::<Vec<_>>(), [(0, 3), (3, 3), (6, 2), (8, 2)]);
        assert_eq!(chunks(8, 1).collect::<Vec<_>>(), [(0, 8)]);
        assert_eq!(chunks(3, 5).collect::<Vec<_>>(), [(0, 1), (1, 1), (2, 1)]);
    }
}
