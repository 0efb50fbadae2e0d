//! The defining property of data parallelism: N ranks on micro-batches of B
//! end with the same parameters as one rank on the N * B batch; so do K
//! accumulated chunks of each rank's rows.

use std::time::Duration;

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::AdamWConfig;
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;
use collective::{Collective, Solo};
use contract::{ModelConfig, Preset};
use model::backend::CpuTrain;
use model::loss::LossWeights;
use model::parameters::parameter_checksum;
use model::train::contrastive::ContrastiveMode;
use model::train::replicas::ReplicatedStep;
use model::train::step::{StepReport, TrainStep};
use model::train::synthetic::synthetic_batch;
use model::CocaModel;

use collective::loopback::{on_every_rank, rings};

const SEED: u64 = 23;
const GLOBAL_BATCH: usize = 6;
const STEPS: u64 = 3;

fn config() -> ModelConfig {
    Preset::Tiny.config()
}

/// Every parameter tensor's values, in visiting order.
struct Parameters(Vec<Vec<f32>>);

impl<B: Backend> ModuleVisitor<B> for Parameters {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        self.0
            .push(param.val().into_data().convert::<f32>().to_vec::<f32>().unwrap());
    }
}

/// Trains this rank's share of every global batch; returns the final
/// parameters, the initial checksum and the reported losses.
fn train(collective: &mut dyn Collective, mode: ContrastiveMode) -> (Vec<Vec<f32>>, u64, Vec<StepReport>) {
    train_with(collective, mode, Layout::default())
}

/// How a rank does its part of a step.
#[derive(Debug, Clone, Copy)]
struct Layout {
    /// Model replicas (threads) in the rank.
    replicas: usize,
    /// Chunks each replica's rows are processed in.
    accumulation: usize,
    /// AdamW's state sharded between the ranks.
    sharded: bool,
    clip_norm: Option<f32>,
    /// The towers' blocks computed again in the backward pass.
    checkpointing: bool,
}

impl Default for Layout {
    fn default() -> Self {
        Self {
            replicas: 1,
            accumulation: 1,
            sharded: false,
            clip_norm: None,
            checkpointing: false,
        }
    }
}

/// [`train`] in the given layout.
fn train_with(
    collective: &mut dyn Collective,
    mode: ContrastiveMode,
    layout: Layout,
) -> (Vec<Vec<f32>>, u64, Vec<StepReport>) {
    let config = config();
    let device = Default::default();
    let mut model = CocaModel::<CpuTrain>::new(&config, SEED, &device);
    let checksum = parameter_checksum(&model);
    let optimizer = AdamWConfig::new().with_weight_decay(0.01);
    // Small buckets, so the bucketing itself is exercised.
    let trainer = TrainStep::new(&optimizer, LossWeights::default(), mode)
        .with_bucket_bytes(4096)
        .with_accumulation(layout.accumulation)
        .with_sharded_optimizer(layout.sharded)
        .with_clip_norm(layout.clip_norm)
        .with_activation_checkpointing(layout.checkpointing);
    let mut trainer = ReplicatedStep::new(trainer, &model, layout.replicas);
    let micro = GLOBAL_BATCH / collective.world_size();
    let mut losses = Vec::new();
    for step in 0..STEPS {
        let global = synthetic_batch::<CpuTrain>(&config, GLOBAL_BATCH, 100 + step, &device);
        let local = global.rows(collective.rank() * micro, micro);
        let (next, report) = trainer.step(model, &local, 1e-3, collective).unwrap();
        model = next;
        losses.push(report);
    }
    let mut parameters = Parameters(Vec::new());
    model.visit(&mut parameters);
    (parameters.0, checksum, losses)
}

fn replicas(replicas: usize) -> Layout {
    Layout {
        replicas,
        ..Layout::default()
    }
}

fn chunks(accumulation: usize) -> Layout {
    Layout {
        accumulation,
        ..Layout::default()
    }
}

fn bits(tensors: &[Vec<f32>]) -> Vec<u32> {
    tensors.iter().flatten().map(|v| v.to_bits()).collect()
}

fn train_on_ring(world: usize, mode: ContrastiveMode) -> Vec<(Vec<Vec<f32>>, u64, Vec<StepReport>)> {
    on_every_rank(
        rings(world, Duration::from_secs(60)).expect("a loopback ring"),
        |ring| train(ring, mode),
    )
}

/// Each parameter tensor within relative 1e-3 (L2 norm of the difference
/// over the norm of the tensor). N ranks sum each gradient in a different
/// order than one rank does; in f32 a gradient that is a sum of many
/// cancelling terms (an MLP bias, over all tokens) keeps only about 1e-4 of
/// relative accuracy, and AdamW's normalised update passes that on to a
/// bias that started at zero. Measured worst: 1.1e-4 (full mode, 3 ranks).
/// A real error is far larger: dropping the gradient scaling of the full
/// mode gives 0.6.
fn assert_close(name: &str, actual: &[Vec<f32>], expected: &[Vec<f32>]) -> f64 {
    assert_eq!(actual.len(), expected.len());
    let mut worst = 0.0f64;
    for (index, (a, e)) in actual.iter().zip(expected).enumerate() {
        let norm = |values: &mut dyn Iterator<Item = f32>| values.map(|v| (v as f64).powi(2)).sum::<f64>().sqrt();
        let difference = norm(&mut a.iter().zip(e).map(|(a, e)| a - e));
        let scale = norm(&mut e.iter().copied()).max(1e-6);
        assert!(
            difference / scale <= 1e-3,
            "{name}: parameter #{index} differs by {:.2e} relative",
            difference / scale
        );
        worst = worst.max(difference / scale);
    }
    worst
}

#[test]
fn ranks_compute_what_one_rank_computes_on_the_whole_batch() {
    for mode in [ContrastiveMode::Local, ContrastiveMode::Full] {
        let (reference, reference_checksum, reference_losses) = train(&mut Solo, mode);
        for world in [2, 3] {
            let ranks = train_on_ring(world, mode);
            for (rank, (parameters, checksum, losses)) in ranks.iter().enumerate() {
                let name = format!("{mode:?}, world {world}, rank {rank}");
                // Identical start on every rank.
                assert_eq!(*checksum, reference_checksum, "{name}: initial parameters differ");
                let worst = assert_close(&name, parameters, &reference);
                eprintln!("{name}: worst parameter tensor relative difference {worst:.1e}");
                for (step, (ours, theirs)) in losses.iter().zip(&reference_losses).enumerate() {
                    let (ours, theirs) = (ours.losses.total, theirs.losses.total);
                    assert!(
                        (ours - theirs).abs() <= 1e-5 * theirs.abs(),
                        "{name}, step {step}: loss {ours} vs {theirs}"
                    );
                }
            }
            // Replicas never drift: bit-identical across ranks.
            for (parameters, _, _) in &ranks[1..] {
                assert!(
                    bits(parameters) == bits(&ranks[0].0),
                    "{mode:?}, world {world}: replicas drifted"
                );
            }
        }
    }
}

/// Replicas inside a worker are ranks too: 1 worker of 3 replicas and 2
/// workers of 3 (one sample each) train as one rank on the whole batch,
/// and the same layout gives the same bits twice.
#[test]
fn replicas_in_a_worker_compute_what_one_rank_computes() {
    let mode = ContrastiveMode::Local;
    let (reference, _, reference_losses) = train(&mut Solo, mode);
    let (one_worker, _, losses) = train_with(&mut Solo, mode, replicas(3));
    let worst = assert_close("1 worker x 3 replicas", &one_worker, &reference);
    eprintln!("1 worker x 3 replicas: worst parameter tensor relative difference {worst:.1e}");
    for (ours, theirs) in losses.iter().zip(&reference_losses) {
        assert!((ours.losses.total - theirs.losses.total).abs() <= 1e-5 * theirs.losses.total.abs());
    }
    let workers = on_every_rank(rings(2, Duration::from_secs(60)).expect("a loopback ring"), |ring| {
        train_with(ring, mode, replicas(3))
    });
    for (rank, (parameters, _, _)) in workers.iter().enumerate() {
        let worst = assert_close(
            &format!("2 workers x 3 replicas, worker {rank}"),
            parameters,
            &reference,
        );
        eprintln!("2 workers x 3 replicas: worst parameter tensor relative difference {worst:.1e}");
    }
    assert!(bits(&workers[0].0) == bits(&workers[1].0), "workers drifted");
    let (again, _, _) = train_with(&mut Solo, mode, replicas(3));
    assert!(bits(&again) == bits(&one_worker), "the same layout gave other bits");
}

/// Accumulation with cached contrastive features: one rank in 4 chunks
/// (rows 2, 2, 1, 1) and 2 ranks in 2 chunks each (2, 1) train as one rank
/// in one pass, negatives from the whole global batch; within the bound of
/// the N-rank comparison (the sums run in another order).
#[test]
fn accumulated_chunks_compute_what_one_pass_computes() {
    for mode in [ContrastiveMode::Local, ContrastiveMode::Full] {
        let (reference, _, reference_losses) = train(&mut Solo, mode);
        let (chunked, _, losses) = train_with(&mut Solo, mode, chunks(4));
        let worst = assert_close(&format!("{mode:?}, 1 rank x 4 chunks"), &chunked, &reference);
        eprintln!("{mode:?}, 1 rank x 4 chunks: worst parameter tensor relative difference {worst:.1e}");
        // The gradient norm too: AdamW's update hides a gradient off by a constant factor.
        for (ours, theirs) in losses.iter().zip(&reference_losses) {
            for (ours, theirs) in [
                (ours.losses.total, theirs.losses.total),
                (ours.losses.contrastive.unwrap(), theirs.losses.contrastive.unwrap()),
                (ours.losses.captioning.unwrap(), theirs.losses.captioning.unwrap()),
                (ours.gradient_norm, theirs.gradient_norm),
            ] {
                assert!((ours - theirs).abs() <= 1e-5 * theirs.abs(), "{ours} vs {theirs}");
            }
        }
        let ranks = on_every_rank(rings(2, Duration::from_secs(60)).expect("a loopback ring"), |ring| {
            train_with(ring, mode, chunks(2))
        });
        for (rank, (parameters, _, _)) in ranks.iter().enumerate() {
            let name = format!("{mode:?}, 2 ranks x 2 chunks, rank {rank}");
            let worst = assert_close(&name, parameters, &reference);
            eprintln!("{name}: worst parameter tensor relative difference {worst:.1e}");
        }
    }
}

/// ZeRO stage 2: AdamW's state sharded between the ranks updates every
/// element as the whole optimizer does. On one rank and on two the
/// parameters are bit-identical to the unsharded optimizer's (a sum of two
/// values is the same in either order); on three, within the N-rank bound,
/// every rank bit-identical; and clipped, within the same bound.
#[test]
fn a_sharded_optimizer_computes_what_the_whole_one_computes() {
    let mode = ContrastiveMode::Full;
    let sharded = Layout {
        sharded: true,
        ..Layout::default()
    };
    let (whole, _, whole_reports) = train(&mut Solo, mode);
    let (one, _, one_reports) = train_with(&mut Solo, mode, sharded);
    assert!(bits(&one) == bits(&whole), "1 rank, sharded: other bits");
    for (ours, theirs) in one_reports.iter().zip(&whole_reports) {
        let (ours, theirs) = (ours.gradient_norm, theirs.gradient_norm);
        assert!(
            (ours - theirs).abs() <= 1e-5 * theirs,
            "gradient norm {ours} vs {theirs}"
        );
    }

    let on_ring = |world: usize, layout: Layout| {
        on_every_rank(
            rings(world, Duration::from_secs(60)).expect("a loopback ring"),
            |ring| train_with(ring, mode, layout),
        )
    };
    let two_whole = on_ring(2, Layout::default());
    let two_sharded = on_ring(2, sharded);
    for (rank, (ours, theirs)) in two_sharded.iter().zip(&two_whole).enumerate() {
        assert!(
            bits(&ours.0) == bits(&theirs.0),
            "2 ranks, sharded: rank {rank} has other bits"
        );
    }

    let three = on_ring(3, sharded);
    for (rank, (parameters, _, _)) in three.iter().enumerate() {
        let worst = assert_close(&format!("3 ranks sharded, rank {rank}"), parameters, &whole);
        eprintln!("3 ranks sharded: worst parameter tensor relative difference {worst:.1e}");
        assert!(
            bits(parameters) == bits(&three[0].0),
            "3 ranks sharded: rank {rank} drifted"
        );
    }

    // Clipped to a quarter of the first step's norm: every step clips.
    let clip_norm = Some(whole_reports[0].gradient_norm / 4.0);
    let (clipped, _, _) = train_with(
        &mut Solo,
        mode,
        Layout {
            clip_norm,
            ..Layout::default()
        },
    );
    let three_clipped = on_ring(3, Layout { clip_norm, ..sharded });
    let worst = assert_close("3 ranks sharded, clipped", &three_clipped[0].0, &clipped);
    eprintln!("3 ranks sharded, clipped: worst parameter tensor relative difference {worst:.1e}");
    assert!(bits(&clipped) != bits(&whole), "clipping changed nothing");
}

/// Activation checkpointing computes the same gradients: each block's
/// backward gets the very gradient the whole graph would give it, and a
/// parameter's gradient from two passes (the token table: embedding and
/// output projection) is a sum of two, the same in either order. So the
/// parameters after 3 AdamW steps and every reported gradient norm are
/// bit-identical, on one rank and on two; with 2 accumulated chunks the
/// token table's four terms add up in another order: within the N-rank
/// bound.
#[test]
fn activation_checkpointing_computes_the_same_gradients() {
    for mode in [ContrastiveMode::Local, ContrastiveMode::Full] {
        let checkpointed = Layout {
            checkpointing: true,
            ..Layout::default()
        };
        let (reference, _, reference_reports) = train(&mut Solo, mode);
        let (ours, _, reports) = train_with(&mut Solo, mode, checkpointed);
        assert!(bits(&ours) == bits(&reference), "{mode:?}: checkpointed, other bits");
        for (ours, theirs) in reports.iter().zip(&reference_reports) {
            assert_eq!(ours.gradient_norm.to_bits(), theirs.gradient_norm.to_bits(), "{mode:?}");
            assert_eq!(ours.losses, theirs.losses, "{mode:?}");
        }
        let on_ring = |layout: Layout| {
            on_every_rank(rings(2, Duration::from_secs(60)).expect("a loopback ring"), |ring| {
                train_with(ring, mode, layout)
            })
        };
        let (straight, ranks) = (on_ring(Layout::default()), on_ring(checkpointed));
        assert!(
            bits(&ranks[1].0) == bits(&straight[1].0),
            "{mode:?}: 2 ranks checkpointed, other bits"
        );
        let (chunked, _, _) = train_with(
            &mut Solo,
            mode,
            Layout {
                accumulation: 2,
                ..checkpointed
            },
        );
        let worst = assert_close(&format!("{mode:?}, checkpointed in 2 chunks"), &chunked, &reference);
        eprintln!("{mode:?}, checkpointed in 2 chunks: worst parameter tensor relative difference {worst:.1e}");
    }
}

#[test]
fn the_training_actually_moves_the_parameters() {
    // Guards the comparison above against a step that does nothing.
    let (trained, _, losses) = train(&mut Solo, ContrastiveMode::Local);
    let device = Default::default();
    let mut initial = Parameters(Vec::new());
    CocaModel::<CpuTrain>::new(&config(), SEED, &device).visit(&mut initial);
    let moved = trained.iter().zip(&initial.0).filter(|(a, b)| a != b).count();
    assert_eq!(moved, trained.len(), "every parameter tensor is trained");
    assert!(losses.iter().all(|report| {
        let loss = &report.losses;
        loss.total.is_finite() && loss.contrastive.is_some() && loss.captioning.is_some()
    }));
}
