//! Checkpoints as files on disk: a state saved by N ranks loads on any
//! world size exactly, the step after a resume equals the uninterrupted
//! one, and damaged shards are named.

use burn::optim::AdamWConfig;
use checkpoint::layout::{self as layout, Committed};
use collective::Solo;
use contract::Preset;
use model::backend::CpuTrain;
use model::loss::LossWeights;
use model::parameters::parameter_checksum;
use model::state::{self, JobFacts, StateLayout};
use model::state::{read_range, OptimizerRecord};
use model::train::contrastive::ContrastiveMode;
use model::train::step::TrainStep;
use model::train::synthetic::synthetic_batch;
use model::CocaModel;
use store::{Store, StoreOptions};

type B = CpuTrain;

fn trainer() -> TrainStep<B> {
    TrainStep::new(
        &AdamWConfig::new().with_weight_decay(0.01),
        LossWeights::default(),
        ContrastiveMode::Full,
    )
}

/// A model and trainer after `steps` steps on synthetic batches.
fn trained(steps: u64) -> (CocaModel<B>, TrainStep<B>) {
    let config = Preset::Tiny.config();
    let device = Default::default();
    let mut model = CocaModel::<B>::new(&config, 7, &device);
    let mut trainer = trainer();
    for step in 0..steps {
        model = step_once(model, &mut trainer, step);
    }
    (model, trainer)
}

fn step_once(model: CocaModel<B>, trainer: &mut TrainStep<B>, step: u64) -> CocaModel<B> {
    let config = Preset::Tiny.config();
    let batch = synthetic_batch::<B>(&config, 4, 300 + step, &Default::default());
    trainer.step(model, &batch, 1e-3, &mut Solo).unwrap().0
}

/// The whole flattened state (parameters and both moments).
fn flat(model: &CocaModel<B>, record: &OptimizerRecord<B>) -> Vec<f32> {
    let layout = StateLayout::of(model, record);
    read_range(model, record, layout.section_len, 0, layout.total())
}

/// Saves step `step` as `world` ranks would, and commits it as the coordinator would.
fn save(root: &Store, step: u64, world: usize, model: &CocaModel<B>, record: &OptimizerRecord<B>) {
    let mut shards = Vec::new();
    for rank in 0..world {
        shards.push(
            state::save_shard(root, step, rank, world, model, record)
                .unwrap()
                .record,
        );
    }
    let meta = StateLayout::of(model, record).meta(step, world, JobFacts::default());
    checkpoint::write_meta(root, &meta).unwrap();
    let committed = Committed {
        step,
        committed_at: 0.0,
        shards,
    };
    root.at(&layout::step_dir(step))
        .put(layout::COMMITTED, serde_json::to_vec(&committed).unwrap().into())
        .unwrap();
}

fn fresh_model() -> CocaModel<B> {
    CocaModel::<B>::new(&Preset::Tiny.config(), 99, &Default::default())
}

#[test]
fn a_state_saved_by_n_ranks_loads_exactly_on_any_world_size() {
    let dir = tempfile::tempdir().unwrap();
    let root = Store::open(dir.path().to_str().unwrap(), &StoreOptions::default()).unwrap();
    let (model, trainer) = trained(2);
    let record = trainer.optimizer_record();
    let expected = flat(&model, &record);
    assert!(
        expected.iter().skip(expected.len() / 3).any(|v| *v != 0.0),
        "the moments hold values"
    );

    // 4 ranks write; load; 3 ranks write what was loaded; load; then 1 -> 4.
    save(&root, 2, 4, &model, &record);
    let (loaded, loaded_record, meta) = state::load(&root.at(&layout::step_dir(2)), fresh_model()).unwrap();
    assert_eq!((meta.world_size, meta.optimizer_steps), (4, 2));
    assert_eq!(flat(&loaded, &loaded_record), expected, "4 ranks -> loaded");
    save(&root, 3, 3, &loaded, &loaded_record);
    let (again, again_record, _) = state::load(&root.at(&layout::step_dir(3)), fresh_model()).unwrap();
    assert_eq!(flat(&again, &again_record), expected, "3 ranks -> loaded");
    save(&root, 4, 1, &again, &again_record);
    let (single, single_record, _) = state::load(&root.at(&layout::step_dir(4)), fresh_model()).unwrap();
    assert_eq!(flat(&single, &single_record), expected, "1 rank -> loaded");
    let files: Vec<String> = root
        .list("step-00000003")
        .unwrap()
        .into_iter()
        .map(|o| o.name)
        .collect();
    assert_eq!(
        files,
        [
            "step-00000003/COMMITTED",
            "step-00000003/meta.json",
            "step-00000003/rank-00000-of-00003.safetensors",
            "step-00000003/rank-00001-of-00003.safetensors",
            "step-00000003/rank-00002-of-00003.safetensors",
        ]
    );
}

#[test]
fn the_step_after_a_resume_equals_the_uninterrupted_one() {
    let dir = tempfile::tempdir().unwrap();
    let root = Store::open(dir.path().to_str().unwrap(), &StoreOptions::default()).unwrap();
    let (model, mut straight) = trained(2);
    save(&root, 2, 2, &model, &straight.optimizer_record());
    let model = step_once(model, &mut straight, 2);
    let model = step_once(model, &mut straight, 3);

    let (resumed, record, _) = state::load(&root.at(&layout::step_dir(2)), fresh_model()).unwrap();
    let mut trainer = trainer().with_optimizer_record(record);
    let resumed = step_once(resumed, &mut trainer, 2);
    let resumed = step_once(resumed, &mut trainer, 3);
    assert_eq!(parameter_checksum(&resumed), parameter_checksum(&model));
    assert_eq!(
        flat(&resumed, &trainer.optimizer_record()),
        flat(&model, &straight.optimizer_record())
    );
}

#[test]
fn damaged_shards_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let root = Store::open(dir.path().to_str().unwrap(), &StoreOptions::default()).unwrap();
    let (model, trainer) = trained(1);
    save(&root, 1, 2, &model, &trainer.optimizer_record());
    let step = dir.path().join("step-00000001");
    let shard = step.join("rank-00001-of-00002.safetensors");
    let bytes = std::fs::read(&shard).unwrap();
    let load = || {
        state::load(&root.at("step-00000001"), fresh_model())
            .err()
            .expect("a damaged step does not load")
            .to_string()
    };

    let mut flipped = bytes.clone();
    let last = flipped.len() - 1;
    flipped[last] ^= 1;
    std::fs::write(&shard, &flipped).unwrap();
    let message = load();
    assert!(
        message.contains("rank-00001-of-00002.safetensors: checksum mismatch"),
        "{message}"
    );

    std::fs::write(&shard, &bytes[..bytes.len() / 2]).unwrap();
    let message = load();
    assert!(message.contains("rank-00001-of-00002.safetensors: "), "{message}");
    assert!(message.contains("were committed (truncated?)"), "{message}");

    std::fs::remove_file(&shard).unwrap();
    let message = load();
    assert!(message.contains("rank-00001-of-00002.safetensors"), "{message}");

    std::fs::write(&shard, &bytes).unwrap();
    std::fs::remove_file(step.join("COMMITTED")).unwrap();
    let message = load();
    assert!(message.contains("step-00000001/COMMITTED"), "{message}");

    // Another model's shape is refused by name.
    std::fs::write(step.join("COMMITTED"), b"{}").unwrap();
    let message = load();
    assert!(message.contains("COMMITTED: missing field"), "{message}");
}
