//! Training-step benchmark on synthetic data (`coca bench step`).

use std::time::{Duration, Instant};

use burn::module::AutodiffModule;
use burn::optim::AdamWConfig;
use burn::tensor::backend::AutodiffBackend;
use contract::manifest::Precision;
use contract::ModelConfig;

use collective::{Collective, CollectiveError};
use model::loss::LossWeights;
use model::parameters::parameter_values;
use model::profile::{profile_parts, PartTiming};
use model::train::contrastive::ContrastiveMode;
use model::train::replicas::ReplicatedStep;
use model::train::step::{compute_dtype, StepTimings, TrainStep};
use model::train::synthetic::synthetic_batch;
use model::CocaModel;

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

fn median(mut times: Vec<Duration>) -> Duration {
    times.sort();
    times[times.len() / 2]
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
    } = plan;
    assert!(steps > 0, "at least one measured step");
    let micro = batch / collective.world_size();
    assert_eq!(micro * collective.world_size(), batch, "the batch divides by the world");
    let started = Instant::now();
    let mut first_step = Duration::ZERO;
    let mut model = CocaModel::<B>::new(config, seed, device);
    let data = synthetic_batch::<B>(config, batch, seed, device).rows(collective.rank() * micro, micro);
    let trainer = TrainStep::new(
        &AdamWConfig::new().with_weight_decay(0.01),
        LossWeights::default(),
        mode,
    )
    .with_compute(compute_dtype(precision));
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
    dataset: datasets::dataset::Dataset,
    tokenizer: datasets::tokenizer::TextTokenizer,
    image_size: u32,
    threads: usize,
    batch: usize,
    batches: usize,
) -> Result<DataBenchmark, datasets::loader::LoaderError> {
    use contract::sample_order::{SampleOrder, SourceSize, Streaming};
    use datasets::loader::{BatchAssembler, LoaderConfig, LoaderSource};

    let order = SampleOrder::new(
        0,
        &[SourceSize {
            shard_rows: dataset.index().shards.iter().map(|shard| shard.rows).collect(),
            weight: 1.0,
        }],
        batch,
        Streaming::default(),
    )?;
    let config = LoaderConfig {
        threads,
        ..LoaderConfig::new(image_size, 77)
    };
    let source = LoaderSource {
        dataset,
        templates: datasets::prompt::PromptTemplates::clip80(),
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

/// Checkpoint save and load throughput against a local directory.
#[derive(Debug, Clone)]
pub struct CheckpointBenchmark {
    pub total_bytes: u64,
    /// Per rank: bytes written and seconds, all ranks saving at once.
    pub saves: Vec<(u64, f64)>,
    pub save_seconds: f64,
    /// One rank reading every shard back (what each rank does on resume).
    pub load_seconds: f64,
    /// The same bytes per rank written as plain files at once and synced
    /// (what `dd conv=fsync` measures): the ceiling.
    pub baseline_seconds: f64,
}

/// Saves a model's full training state (AdamW moments filled in) as
/// `world` ranks at once into `dir`, loads it back, and writes the same
/// byte counts as plain files for comparison.
pub fn bench_checkpoint<B: AutodiffBackend>(
    config: &ModelConfig,
    world: usize,
    dir: &std::path::Path,
) -> Result<CheckpointBenchmark, checkpoint::CheckpointError>
where
    CocaModel<B>: AutodiffModule<B>,
{
    use model::state::{self, StateLayout};
    let device = Default::default();
    let model = CocaModel::<B>::new(config, 0, &device);
    let (mut tensors, section_len) = state::tensor_index(&model, &state::OptimizerRecord::new());
    for tensor in &mut tensors {
        tensor.optimizer_state = true;
    }
    let params = parameter_values(&model);
    // Distinct bytes in each section, as real moments are (a virtual disk
    // may shortcut repeated blocks).
    let values: Vec<f32> = params
        .iter()
        .copied()
        .chain(params.iter().map(|p| 0.1 * p))
        .chain(params.iter().map(|p| p * p))
        .collect();
    drop(params);
    let (model, record) = state::apply(model, &tensors, section_len, &values, 1);
    drop(values);
    let root = store::Store::open(&dir.display().to_string(), &store::StoreOptions::default())?;

    // The ceiling first, with the same memory in use as the save has.
    let layout = StateLayout::of(&model, &record);
    let sizes: Vec<u64> = layout.shards(world).iter().map(|s| 4 * (s.end - s.start)).collect();
    let baseline_seconds = plain_write_seconds(dir, &sizes);

    let started = Instant::now();
    let saves = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..world)
            .map(|rank| {
                let (root, model, record) = (&root, &model, &record);
                scope.spawn(move || state::save_shard(root, 1, rank, world, model, record))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a save thread does not panic"))
            .collect::<Result<Vec<_>, _>>()
    })?;
    let save_seconds = started.elapsed().as_secs_f64();
    let meta = StateLayout::of(&model, &record).meta(1, world, state::JobFacts::default());
    checkpoint::write_meta(&root, &meta)?;
    checkpoint::commit(&root, 1, saves.iter().map(|s| s.record.clone()).collect(), 1, 0.0)?;
    let step = root.at(&checkpoint::layout::step_dir(1));
    drop((model, record));

    let started = Instant::now();
    let (_, state) = checkpoint::read_state(&step)?;
    let load_seconds = started.elapsed().as_secs_f64();
    drop(state);

    Ok(CheckpointBenchmark {
        total_bytes: saves.iter().map(|s| s.record.bytes).sum(),
        saves: saves.iter().map(|s| (s.record.bytes, s.seconds)).collect(),
        save_seconds,
        load_seconds,
        baseline_seconds,
    })
}

/// Seconds to write (and sync) one file of each size at once: the ceiling a
/// checkpoint save is measured against.
fn plain_write_seconds(dir: &std::path::Path, sizes: &[u64]) -> f64 {
    // Incompressible bytes: virtual disks may shortcut repeated blocks.
    let buffers: Vec<Vec<u8>> = sizes
        .iter()
        .enumerate()
        .map(|(rank, &size)| {
            let mut random = contract::rng::SplitMix64::new(rank as u64);
            (0..size.div_ceil(8))
                .flat_map(|_| random.next_u64().to_le_bytes())
                .take(size as usize)
                .collect()
        })
        .collect();
    let started = Instant::now();
    std::thread::scope(|scope| {
        for (rank, data) in buffers.iter().enumerate() {
            let path = dir.join(format!("baseline-{rank}"));
            scope.spawn(move || {
                use std::io::Write;
                let mut file = std::fs::File::create(&path).expect("a baseline file");
                file.write_all(data).expect("baseline write");
                // As the store does: durable before it counts as written.
                file.sync_all().expect("baseline sync");
            });
        }
    });
    let seconds = started.elapsed().as_secs_f64();
    drop(buffers);
    for rank in 0..sizes.len() {
        let _ = std::fs::remove_file(dir.join(format!("baseline-{rank}")));
    }

    seconds
}

/// Seconds to generate one caption of exactly `max_len` tokens with
/// `beams` beams: (with the key/value cache, recomputing the prefix).
pub fn bench_caption<B: burn::tensor::backend::Backend>(
    config: &ModelConfig,
    beams: usize,
    max_len: usize,
) -> (f64, f64) {
    use model::generate::{generate, Generation, Strategy};
    let device = Default::default();
    let model = CocaModel::<B>::new(config, 0, &device);
    let images = synthetic_batch::<B>(config, 1, 0, &device).images;
    let image_tokens = model.caption_image_tokens(images);
    let time = |cache: bool| {
        let generation = Generation {
            strategy: if beams > 1 {
                Strategy::Beam(beams)
            } else {
                Strategy::Greedy
            },
            max_len,
            bos: 1,
            // No token ends the caption: every run generates max_len tokens.
            eos: u32::MAX,
            cache,
        };
        let started = Instant::now();
        let tokens = generate(&model, image_tokens.clone(), &generation);
        assert_eq!(tokens.len(), max_len.min(config.context_length - 1));
        started.elapsed().as_secs_f64()
    };
    // One unmeasured run of each warms the allocator and kernels.
    time(true);
    time(false);
    (time(true), time(false))
}
