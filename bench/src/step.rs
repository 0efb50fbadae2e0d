//! The training-step benchmark on synthetic data (`coca bench step`).

use std::time::{Duration, Instant};

use burn::module::AutodiffModule;
use burn::optim::AdamWConfig;
use burn::tensor::backend::AutodiffBackend;
use collective::{Collective, CollectiveError};
use contract::manifest::Precision;
use contract::ModelConfig;
use datasets::patch_dropout::PatchDropout;
use model::loss::LossWeights;
use model::parameters::parameter_values;
use model::profile::{profile_parts, PartTiming};
use model::train::contrastive::ContrastiveMode;
use model::train::replicas::ReplicatedStep;
use model::train::step::{compute_dtype, StepTimings, TrainStep};
use model::train::synthetic::{synthetic_batch, with_patch_dropout};
use model::CocaModel;

use crate::median;

#[derive(Debug, Clone)]
pub struct StepBenchmark {
    /// From the start (the model not yet built) to the end of the first step:
    /// on a GPU, mostly compiling and tuning kernels.
    pub first_step: Duration,
    /// Timings of the measured steps, in order (warm-up excluded): each
    /// step's phases (the first replica's, with replicas) and its wall time.
    pub steps: Vec<StepTimings>,
    pub walls: Vec<Duration>,
    /// Threads in the pool the CPU backend computes on.
    pub threads: usize,
    pub first_loss: f32,
    pub last_loss: f32,
    /// Each part's forward and backward, when asked for.
    pub parts: Vec<PartTiming>,
    /// The parameters after the last step, flattened in visiting order.
    pub parameters: Vec<f32>,
}

impl StepBenchmark {
    /// Median of one phase (or of the whole step) over the measured steps.
    pub fn median(&self, phase: impl Fn(&StepTimings) -> Duration) -> Duration {
        median(self.steps.iter().map(phase).collect())
    }

    /// Median wall time of a whole step.
    pub fn median_wall(&self) -> Duration {
        median(self.walls.clone())
    }
}

/// What `bench_step` runs.
#[derive(Debug, Clone, Copy)]
pub struct StepBenchmarkPlan {
    /// Samples per step over all ranks.
    pub batch: usize,
    pub warmup: usize,
    pub steps: usize,
    pub seed: u64,
    pub mode: ContrastiveMode,
    pub precision: Precision,
    /// Model replicas in this process, a thread each, splitting its share.
    pub replicas: usize,
    /// Profile each part of the network this many times after the steps (0: not).
    pub profile: usize,
    /// Chunks each replica's rows are processed in (train.accumulation).
    pub accumulation: usize,
    /// train.grad_clip_norm.
    pub clip_norm: Option<f32>,
    /// train.patch_dropout: the share of each image's patches dropped.
    pub patch_dropout: f64,
    /// train.shard_optimizer: AdamW's moments sharded between the ranks.
    pub shard_optimizer: bool,
    /// train.activation_checkpointing: the towers' blocks computed again
    /// in the backward pass.
    pub activation_checkpointing: bool,
}

/// Runs `warmup + steps` data-parallel training steps of the full CoCa
/// objective (both losses, global negatives, backward, gradient all-reduce,
/// AdamW) on one synthetic global batch, of which this rank takes its share.
pub fn bench_step<B: AutodiffBackend>(
    config: &ModelConfig,
    plan: StepBenchmarkPlan,
    collective: &mut dyn Collective,
    device: &B::Device,
) -> Result<StepBenchmark, CollectiveError>
where
    CocaModel<B>: AutodiffModule<B, InnerModule = CocaModel<B::InnerBackend>>,
{
    let StepBenchmarkPlan {
        batch,
        warmup,
        steps,
        seed,
        mode,
        precision,
        replicas,
        profile,
        accumulation,
        clip_norm,
        patch_dropout,
        shard_optimizer,
        activation_checkpointing,
    } = plan;
    assert!(steps > 0, "at least one measured step");
    let micro = batch / collective.world_size();
    assert_eq!(micro * collective.world_size(), batch, "the batch divides by the world");
    let started = Instant::now();
    let mut first_step = Duration::ZERO;
    let mut model = CocaModel::<B>::new(config, seed, device);
    let data = synthetic_batch::<B>(config, batch, seed, device);
    let data = match PatchDropout::new(config.image_tokens(), patch_dropout) {
        Some(dropout) => with_patch_dropout(data, dropout, seed),
        None => data,
    }
    .rows(collective.rank() * micro, micro);
    let trainer = TrainStep::new(
        &AdamWConfig::new().with_weight_decay(0.01),
        LossWeights::default(),
        mode,
    )
    .with_compute(compute_dtype(precision))
    .with_accumulation(accumulation)
    .with_clip_norm(clip_norm)
    .with_sharded_optimizer(shard_optimizer)
    .with_activation_checkpointing(activation_checkpointing);
    let mut trainer = ReplicatedStep::new(trainer, &model, replicas);
    let mut measured = Vec::with_capacity(steps);
    let mut walls = Vec::with_capacity(steps);
    let mut losses = Vec::with_capacity(warmup + steps);
    for index in 0..warmup + steps {
        let began = Instant::now();
        let (next, report) = trainer.step(model, &data, 1e-4, collective)?;
        let wall = began.elapsed();
        model = next;
        losses.push(report.losses.total);
        if index == 0 {
            first_step = started.elapsed();
        }
        if index >= warmup {
            measured.push(report.timings);
            walls.push(wall);
        }
    }
    let parts = if profile > 0 {
        profile_parts(&model, &data, profile)
    } else {
        Vec::new()
    };
    Ok(StepBenchmark {
        parts,
        first_step,
        steps: measured,
        walls,
        threads: rayon::current_num_threads(),
        first_loss: losses[0],
        last_loss: losses[losses.len() - 1],
        parameters: parameter_values(&model),
    })
}
