//! Checkpoint save and load throughput (`coca bench checkpoint`).

use std::time::Instant;

use burn::module::AutodiffModule;
use burn::tensor::backend::AutodiffBackend;
use contract::ModelConfig;
use model::parameters::parameter_values;
use model::CocaModel;

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
    let (mut tensors, section_len) = state::tensor_index(&model, &state::Moments::Whole(Default::default()));
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
    let record = state::Moments::Whole(record);
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
