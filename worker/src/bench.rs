//! Training-step benchmark on synthetic data (`coca bench step`).

use std::time::{Duration, Instant};

use burn::module::AutodiffModule;
use burn::optim::AdamWConfig;
use burn::tensor::backend::AutodiffBackend;
use proto::ModelConfig;

use crate::collective::{Collective, CollectiveError};
use crate::model::loss::LossWeights;
use crate::model::parameters::parameter_values;
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
    /// The parameters after the last step, flattened in visiting order.
    pub parameters: Vec<f32>,
}

impl StepBenchmark {
    /// Median of one phase (or of the whole step) over the measured steps.
    pub fn median(&self, phase: impl Fn(&StepTimings) -> Duration) -> Duration {
        let mut times: Vec<Duration> = self.steps.iter().map(phase).collect();
        times.sort();
        times[times.len() / 2]
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
    CocaModel<B>: AutodiffModule<B>,
{
    let StepBenchmarkPlan {
        batch,
        warmup,
        steps,
        seed,
        mode,
    } = plan;
    assert!(steps > 0, "at least one measured step");
    let micro = batch / collective.world_size();
    assert_eq!(micro * collective.world_size(), batch, "the batch divides by the world");
    let mut model = CocaModel::<B>::new(config, seed, device);
    let data = synthetic_batch::<B>(config, batch, seed, device).rows(collective.rank() * micro, micro);
    let mut trainer = TrainStep::new(
        &AdamWConfig::new().with_weight_decay(0.01),
        LossWeights::default(),
        mode,
    );
    let mut measured = Vec::with_capacity(steps);
    let mut losses = Vec::with_capacity(warmup + steps);
    for index in 0..warmup + steps {
        let (next, report) = trainer.step(model, &data, 1e-4, collective)?;
        model = next;
        losses.push(report.losses.total);
        if index >= warmup {
            measured.push(report.timings);
        }
    }
    Ok(StepBenchmark {
        steps: measured,
        threads: rayon::current_num_threads(),
        first_loss: losses[0],
        last_loss: losses[losses.len() - 1],
        parameters: parameter_values(&model),
    })
}

/// Timings of repeated all-reduces of one buffer.
#[derive(Debug, Clone)]
pub struct AllReduceBenchmark {
    pub bytes: usize,
    pub world: usize,
    /// Wall time of each measured all-reduce.
    pub times: Vec<Duration>,
}

impl AllReduceBenchmark {
    pub fn median(&self) -> Duration {
        let mut times = self.times.clone();
        times.sort();
        times[times.len() / 2]
    }
}

/// (algorithm, bus) bandwidth in bytes per second of an all-reduce of
/// `bytes` over `world` ranks taking `time`. Bus bandwidth is what
/// nccl-tests reports: algorithm bandwidth (size over time) times
/// 2 (n - 1) / n, the share of the buffer each rank sends and receives,
/// comparable across world sizes.
pub fn all_reduce_bandwidth(bytes: usize, world: usize, time: Duration) -> (f64, f64) {
    let algorithm = bytes as f64 / time.as_secs_f64();
    let n = world as f64;
    (algorithm, algorithm * 2.0 * (n - 1.0) / n)
}

/// All-reduces a buffer of `bytes` (f32) `warmup + iterations` times; every
/// rank must call it with the same arguments.
pub fn bench_all_reduce(
    collective: &mut dyn Collective,
    bytes: usize,
    warmup: usize,
    iterations: usize,
) -> Result<AllReduceBenchmark, CollectiveError> {
    let mut buffer = vec![1.0f32; bytes / size_of::<f32>()];
    let mut times = Vec::with_capacity(iterations);
    for index in 0..warmup + iterations {
        collective.barrier()?;
        let start = std::time::Instant::now();
        collective.all_reduce_sum(&mut buffer)?;
        if index >= warmup {
            times.push(start.elapsed());
        }
    }
    Ok(AllReduceBenchmark {
        bytes: buffer.len() * size_of::<f32>(),
        world: collective.world_size(),
        times,
    })
}

/// This machine's single-threaded memcpy bandwidth (bytes per second) on a
/// buffer of `bytes`: the ceiling for moving data between processes.
pub fn memcpy_bandwidth(bytes: usize, iterations: usize) -> f64 {
    let source = vec![1u8; bytes];
    let mut target = vec![0u8; bytes];
    target.copy_from_slice(&source);
    let mut times: Vec<Duration> = (0..iterations.max(1))
        .map(|_| {
            let start = std::time::Instant::now();
            target.copy_from_slice(std::hint::black_box(&source));
            std::hint::black_box(&target);
            start.elapsed()
        })
        .collect();
    times.sort();
    bytes as f64 / times[times.len() / 2].as_secs_f64()
}

/// Figures of `coca bench data`.
#[derive(Debug, Clone, PartialEq)]
pub struct DataBenchmark {
    pub samples: usize,
    pub seconds: f64,
    pub threads: usize,
}

impl DataBenchmark {
    pub fn samples_per_second(&self) -> f64 {
        self.samples as f64 / self.seconds
    }

    pub fn per_core(&self) -> f64 {
        self.samples_per_second() / self.threads as f64
    }
}

/// Assembles `batches` training batches of `batch` samples from one dataset
/// (decode, random resized crop, normalise, tokenize) on `threads` threads,
/// after one unmeasured batch that brings the shards into memory.
pub fn bench_data(
    dataset: crate::data::dataset::Dataset,
    tokenizer: crate::data::tokenizer::TextTokenizer,
    image_size: u32,
    threads: usize,
    batch: usize,
    batches: usize,
) -> Result<DataBenchmark, crate::data::loader::LoaderError> {
    use crate::data::loader::{BatchAssembler, LoaderConfig, LoaderSource};
    use proto::sample_order::{SampleOrder, SourceSize};

    let order = SampleOrder::new(
        0,
        &[SourceSize {
            samples: dataset.index().rows(),
            weight: 1.0,
        }],
        batch,
    )?;
    let config = LoaderConfig {
        threads,
        ..LoaderConfig::new(image_size, 77)
    };
    let source = LoaderSource {
        dataset,
        templates: crate::data::prompt::PromptTemplates::clip80(),
    };
    let mut assembler = BatchAssembler::new(vec![source], order, tokenizer, config, 0, 0, 1)?;
    assembler.assemble(0)?;
    let started = Instant::now();
    for step in 1..=batches as u64 {
        assembler.assemble(step)?;
    }
    Ok(DataBenchmark {
        samples: batch * batches,
        seconds: started.elapsed().as_secs_f64(),
        threads,
    })
}
