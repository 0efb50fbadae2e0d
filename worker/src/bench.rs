//! Training-step benchmark on synthetic data (`coca bench step`).

use std::time::Duration;

use burn::module::AutodiffModule;
use burn::optim::AdamWConfig;
use burn::tensor::backend::AutodiffBackend;
use proto::ModelConfig;

use crate::collective::Solo;
use crate::model::loss::LossWeights;
use crate::model::CocaModel;
use crate::train::contrastive::ContrastiveMode;
use crate::train::step::{StepTimings, TrainStep};
use crate::train::synthetic::synthetic_batch;

#[derive(Debug, Clone)]
pub struct StepBenchmark {
    /// Timings of the measured steps, in order (warm-up excluded).
    pub steps: Vec<StepTimings>,
    /// Threads in the pool the CPU backend computes on.
    pub threads: usize,
    pub first_loss: f32,
    pub last_loss: f32,
}

impl StepBenchmark {
    /// Median of one phase (or of the whole step) over the measured steps.
    pub fn median(&self, phase: impl Fn(&StepTimings) -> Duration) -> Duration {
        let mut times: Vec<Duration> = self.steps.iter().map(phase).collect();
        times.sort();
        times[times.len() / 2]
    }
}

/// Runs `warmup + steps` training steps of the full CoCa objective (both
/// losses, backward, AdamW) on one synthetic batch of `batch` samples.
pub fn bench_step<B: AutodiffBackend>(
    config: &ModelConfig,
    batch: usize,
    warmup: usize,
    steps: usize,
    seed: u64,
    device: &B::Device,
) -> StepBenchmark
where
    CocaModel<B>: AutodiffModule<B>,
{
    assert!(steps > 0, "at least one measured step");
    let mut model = CocaModel::<B>::new(config, seed, device);
    let data = synthetic_batch::<B>(config, batch, seed, device);
    let mut trainer = TrainStep::new(
        &AdamWConfig::new().with_weight_decay(0.01),
        LossWeights::default(),
        ContrastiveMode::default(),
    );
    let mut measured = Vec::with_capacity(steps);
    let mut losses = Vec::with_capacity(warmup + steps);
    for index in 0..warmup + steps {
        let (next, report) = trainer
            .step(model, &data, 1e-4, &mut Solo)
            .expect("a single rank has no peers to lose");
        model = next;
        losses.push(report.losses.total);
        if index >= warmup {
            measured.push(report.timings);
        }
    }
    StepBenchmark {
        steps: measured,
        threads: rayon::current_num_threads(),
        first_loss: losses[0],
        last_loss: losses[losses.len() - 1],
    }
}
