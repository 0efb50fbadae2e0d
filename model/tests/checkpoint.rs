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
use model::state::{read_range, Moments};
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
fn flat(model: &CocaModel<B>, moments: &Moments<B>) -> Vec<f32> {
    let layout = StateLayout::of(model, moments);
    read_range(model, moments, layout.section_len, 0, layout.total())
}

/// A trainer's whole AdamW state.
fn moments(model: &CocaModel<B>, trainer: &mut TrainStep<B>) -> Moments<B> {
    trainer.moments(model, &mut Solo).unwrap()
}

/// Saves step `step` as `world` ranks would, and commits it as the coordinator would.
fn save(root: &Store, step: u64, world: usize, model: &CocaModel<B>, moments: &Moments<B>) {
    let mut shards = Vec::new();
    for rank in 0..world {
        shards.push(
            state::save_shard(root, step, rank, world, model, moments)
                .unwrap()
                .record,
        );
    }
    let meta = StateLayout::of(model, moments).meta(step, world, JobFacts::default());
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
    let (model, mut trainer) = trained(2);
    let record = moments(&model, &mut trainer);
    let expected = flat(&model, &record);
    assert!(
        expected.iter().skip(expected.len() / 3).any(|v| *v != 0.0),
        "the moments hold values"
    );

    // 4 ranks write; load; 3 ranks write what was loaded; load; then 1 -> 4.
    save(&root, 2, 4, &model, &record);
    let (loaded, loaded_record, meta) = state::load(&root.at(&layout::step_dir(2)), fresh_model()).unwrap();
    let loaded_record = Moments::Whole(loaded_record);
    assert_eq!((meta.world_size, meta.optimizer_steps), (4, 2));
    assert_eq!(flat(&loaded, &loaded_record), expected, "4 ranks -> loaded");
    save(&root, 3, 3, &loaded, &loaded_record);
    let (again, again_record, _) = state::load(&root.at(&layout::step_dir(3)), fresh_model()).unwrap();
    let again_record = Moments::Whole(again_record);
    assert_eq!(flat(&again, &again_record), expected, "3 ranks -> loaded");
    save(&root, 4, 1, &again, &again_record);
    let (single, single_record, _) = state::load(&root.at(&layout::step_dir(4)), fresh_model()).unwrap();
    let single_record = Moments::Whole(single_record);
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
    save(&root, 2, 2, &model, &moments(&model, &mut straight));
    let model = step_once(model, &mut straight, 2);
    let model = step_once(model, &mut straight, 3);

    let (resumed, record, _) = state::load(&root.at(&layout::step_dir(2)), fresh_model()).unwrap();
    let mut trainer = trainer().with_moments(Moments::Whole(record));
    let resumed = step_once(resumed, &mut trainer, 2);
    let resumed = step_once(resumed, &mut trainer, 3);
    assert_eq!(parameter_checksum(&resumed), parameter_checksum(&model));
    assert_eq!(
        flat(&resumed, &moments(&resumed, &mut trainer)),
        flat(&model, &moments(&model, &mut straight))
    );
}

#[test]
fn damaged_shards_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let root = Store::open(dir.path().to_str().unwrap(), &StoreOptions::default()).unwrap();
    let (model, mut trainer) = trained(1);
    save(&root, 1, 2, &model, &moments(&model, &mut trainer));
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

/// How [`ranks_train`] starts: fresh, or from a committed step.
#[derive(Clone, Copy)]
enum Start<'a> {
    Fresh,
    From(&'a Store),
}

/// `world` ranks train steps `steps` on their shares of 6-sample global
/// batches, AdamW sharded or whole, and save (and commit) step `save` under
/// `root` as a job's workers do; returns each rank's parameters.
fn ranks_train(
    world: usize,
    sharded: bool,
    start: Start,
    steps: std::ops::Range<u64>,
    save: Option<(&Store, u64)>,
) -> Vec<Vec<f32>> {
    use collective::loopback::{on_every_rank, rings};
    use collective::Collective;
    let config = Preset::Tiny.config();
    let micro = 6 / world;
    let results = on_every_rank(rings(world, std::time::Duration::from_secs(60)).unwrap(), |ring| {
        let rank = ring.rank();
        let device = Default::default();
        let trainer = trainer().with_sharded_optimizer(sharded);
        let (mut model, mut trainer) = match start {
            Start::Fresh => (CocaModel::<B>::new(&config, 7, &device), trainer),
            Start::From(dir) if sharded => {
                let range = TrainStep::segment(&fresh_model(), rank, world);
                let (model, moments, _) = state::load_gathered(dir, fresh_model(), range).unwrap();
                (model, trainer.with_moments(Moments::Gathered(moments)))
            }
            Start::From(dir) => {
                let (model, record, _) = state::load(dir, fresh_model()).unwrap();
                (model, trainer.with_moments(Moments::Whole(record)))
            }
        };
        let mut saved = None;
        for step in steps.clone() {
            let batch = synthetic_batch::<B>(&config, 6, 300 + step, &device).rows(rank * micro, micro);
            model = trainer.step(model, &batch, 1e-3, ring).unwrap().0;
            if let Some((root, _)) = save.filter(|(_, at)| *at == step + 1) {
                let moments = trainer.moments(&model, ring).unwrap();
                saved = Some(
                    state::save_shard(root, step + 1, rank, world, &model, &moments)
                        .unwrap()
                        .record,
                );
                if rank == 0 {
                    let meta = StateLayout::of(&model, &moments).meta(step + 1, world, JobFacts::default());
                    checkpoint::write_meta(root, &meta).unwrap();
                }
            }
        }
        (model::parameters::parameter_values(&model), saved)
    });
    if let Some((root, step)) = save {
        let shards = results.iter().map(|(_, saved)| saved.clone().unwrap()).collect();
        checkpoint::commit(root, step, shards, usize::MAX, 0.0).unwrap();
    }
    results.into_iter().map(|(parameters, _)| parameters).collect()
}

fn bits(values: &[f32]) -> Vec<u32> {
    values.iter().map(|v| v.to_bits()).collect()
}

/// A job with a sharded optimizer saves the same checkpoint format: each
/// rank's shard gathers the moments of its range from the ranks holding
/// them. Its step equals, bit for bit, what the unsharded optimizer saves;
/// it resumes exactly (sharded, or into an unsharded job) and on another
/// world size.
#[test]
fn a_sharded_optimizer_saves_and_resumes_on_any_world_size() {
    let (sharded_dir, whole_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let open = |dir: &tempfile::TempDir| Store::open(dir.path().to_str().unwrap(), &StoreOptions::default()).unwrap();
    let (sharded_root, whole_root) = (open(&sharded_dir), open(&whole_dir));
    let straight = ranks_train(2, true, Start::Fresh, 0..4, Some((&sharded_root, 2)));
    ranks_train(2, false, Start::Fresh, 0..2, Some((&whole_root, 2)));

    let step = |root: &Store| {
        let (model, record, meta) = state::load(&root.at(&layout::step_dir(2)), fresh_model()).unwrap();
        (flat(&model, &Moments::Whole(record)), meta)
    };
    let ((sharded_state, meta), (whole_state, _)) = (step(&sharded_root), step(&whole_root));
    assert_eq!((meta.world_size, meta.optimizer_steps), (2, 2));
    assert!(meta.tensors.iter().all(|tensor| tensor.optimizer_state));
    assert!(
        sharded_state[sharded_state.len() / 3..].iter().any(|v| *v != 0.0),
        "the moments hold values"
    );
    assert!(
        bits(&sharded_state) == bits(&whole_state),
        "the sharded job saved another state"
    );

    let from = sharded_root.at(&layout::step_dir(2));
    let resumed = ranks_train(2, true, Start::From(&from), 2..4, None);
    assert!(bits(&resumed[0]) == bits(&straight[0]), "resumed sharded: other bits");
    let unsharded = ranks_train(2, false, Start::From(&from), 2..4, None);
    assert!(
        bits(&unsharded[0]) == bits(&straight[0]),
        "resumed unsharded: other bits"
    );
    // Three ranks sum in another order: within the data-parallel bound.
    let three = ranks_train(3, true, Start::From(&from), 2..4, None);
    let norm = |values: &mut dyn Iterator<Item = f32>| values.map(|v| f64::from(v).powi(2)).sum::<f64>().sqrt();
    let difference = norm(&mut three[0].iter().zip(&straight[0]).map(|(a, b)| a - b));
    let relative = difference / norm(&mut straight[0].iter().copied());
    assert!(relative <= 1e-4, "3 ranks resumed: {relative:.1e} relative difference");
    assert!(three.iter().all(|p| bits(p) == bits(&three[0])), "3 ranks drifted");
}
