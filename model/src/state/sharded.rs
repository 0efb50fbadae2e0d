//! The model and optimizer as a sharded checkpoint (the `checkpoint`
//! crate): each rank saves its range of the flattened state, rank 0 the
//! meta.json, and the coordinator commits the step once every shard is
//! reported; loading reads every shard of a committed step, whatever world
//! size wrote it.

use std::time::Instant;

use burn::module::AutodiffModule;
use burn::tensor::backend::AutodiffBackend;
use checkpoint::layout::{self, Meta, ResumeFields, RngState, ShardRecord, TensorEntry};
use checkpoint::{shard, CheckpointError};
use store::Store;

use super::{GatheredMoments, Moments, OptimizerRecord};
use crate::state;
use crate::CocaModel;

/// What one rank's save wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct SavedShard {
    pub record: ShardRecord,
    pub seconds: f64,
}

/// The parts of meta.json the flattened state determines.
pub struct StateLayout {
    pub tensors: Vec<TensorEntry>,
    pub section_len: u64,
    pub optimizer_steps: u64,
}

impl StateLayout {
    pub fn of<B: AutodiffBackend>(model: &CocaModel<B>, moments: &Moments<B>) -> Self {
        let (tensors, section_len) = state::tensor_index(model, moments);
        Self {
            tensors,
            section_len,
            optimizer_steps: state::optimizer_steps(model, moments),
        }
    }

    pub fn total(&self) -> u64 {
        self.section_len * layout::SECTIONS.len() as u64
    }

    pub fn shards(&self, world: usize) -> Vec<layout::ShardRange> {
        (0..world)
            .map(|rank| {
                let (start, end) = layout::shard_range(self.total(), rank, world);
                layout::ShardRange {
                    file: layout::shard_file(rank, world),
                    start,
                    end,
                }
            })
            .collect()
    }
}

/// What meta.json says about the job, beyond the state itself.
#[derive(Debug, Clone, Default)]
pub struct JobFacts {
    pub source_samples: Vec<u64>,
    pub source_epochs: Vec<f64>,
    pub seed: u64,
    pub resume: ResumeFields,
    pub tokenizer_sha256: String,
}

impl StateLayout {
    /// meta.json of step `step` saved by `world` ranks.
    pub fn meta(self, step: u64, world: usize, facts: JobFacts) -> Meta {
        Meta {
            format: layout::FORMAT.into(),
            version: layout::VERSION,
            step,
            world_size: world,
            optimizer_steps: self.optimizer_steps,
            source_samples: facts.source_samples,
            source_epochs: facts.source_epochs,
            rng: RngState {
                seed: facts.seed,
                scheme: "counter-based: every draw is SplitMix64 keyed by (seed, step or sample)".into(),
            },
            resume: facts.resume,
            tokenizer_sha256: facts.tokenizer_sha256,
            software: format!("coca {}", env!("CARGO_PKG_VERSION")),
            section_len: self.section_len,
            shards: self.shards(world),
            tensors: self.tensors,
            // Rank 0 records its EMA file once written.
            ema: None,
        }
    }
}

/// Writes this rank's shard of step `step` under `root` (the checkpoint URL).
pub fn save_shard<B: AutodiffBackend>(
    root: &Store,
    step: u64,
    rank: usize,
    world: usize,
    model: &CocaModel<B>,
    moments: &Moments<B>,
) -> Result<SavedShard, CheckpointError> {
    let started = Instant::now();
    let bytes = encode_shard(step, rank, world, model, moments);
    let record = checkpoint::write_shard(root, step, rank, world, bytes.into())?;
    Ok(SavedShard {
        record,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// This rank's shard of step `step`, copied out of the model and optimizer
/// as the file's bytes: what an asynchronous save takes before training
/// goes on, to write on another thread. `moments` hold at least the
/// shard's part of the moment sections.
pub fn encode_shard<B: AutodiffBackend>(
    step: u64,
    rank: usize,
    world: usize,
    model: &CocaModel<B>,
    moments: &Moments<B>,
) -> Vec<u8> {
    let layout = StateLayout::of(model, moments);
    let range = layout::shard_range(layout.total(), rank, world);
    shard::encode(&layout.tensors, layout.section_len, range, step, |data| {
        state::fill_range(model, moments, layout.section_len, range, data)
    })
}

/// Writes `model` under `root` as committed step 0 of one shard, with a
/// fresh optimizer (zero moments, no steps taken) and `tokenizer_json`: a
/// checkpoint a job starts from (`--from`) and evaluation reads. `resume`
/// says what it binds (an import binds only the model). Returns the step's
/// directory URL.
pub fn write_initial<B: AutodiffBackend>(
    root: &Store,
    model: &CocaModel<B>,
    resume: ResumeFields,
    tokenizer_json: &str,
    committed_at: f64,
) -> Result<String, CheckpointError> {
    let moments = Moments::Whole(OptimizerRecord::new());
    let saved = save_shard(root, 0, 0, 1, model, &moments)?;
    root.at(&layout::step_dir(0))
        .put(layout::TOKENIZER, tokenizer_json.as_bytes().to_vec().into())?;
    let facts = JobFacts {
        resume,
        tokenizer_sha256: store::sha256_hex(tokenizer_json.as_bytes()),
        ..JobFacts::default()
    };
    checkpoint::write_meta(root, &StateLayout::of(model, &moments).meta(0, 1, facts))?;
    checkpoint::commit(root, 0, vec![saved.record], usize::MAX, committed_at)?;
    Ok(checkpoint::step_url(root, 0))
}

/// Loads a committed step into `model`; returns the model and AdamW's state.
pub fn load<B: AutodiffBackend>(
    dir: &Store,
    model: CocaModel<B>,
) -> Result<(CocaModel<B>, OptimizerRecord<B>, Meta), CheckpointError>
where
    CocaModel<B>: AutodiffModule<B>,
{
    let (meta, values) = read_matching(dir, &model)?;
    let (model, record) = state::apply(model, &meta.tensors, meta.section_len, &values, meta.optimizer_steps);
    Ok((model, record, meta))
}

/// Loads a committed step into `model`; returns the model and AdamW's
/// moments of the elements `range` of a section (a sharded optimizer's
/// part), never the whole optimizer state on the device.
pub fn load_gathered<B: AutodiffBackend>(
    dir: &Store,
    model: CocaModel<B>,
    range: std::ops::Range<u64>,
) -> Result<(CocaModel<B>, GatheredMoments, Meta), CheckpointError>
where
    CocaModel<B>: AutodiffModule<B>,
{
    let (meta, values) = read_matching(dir, &model)?;
    let (model, moments) = state::apply_gathered(
        model,
        &meta.tensors,
        meta.section_len,
        &values,
        meta.optimizer_steps,
        range,
    );
    Ok((model, moments, meta))
}

/// A committed step's meta.json and flattened state, once its tensors are
/// checked against `model`'s.
fn read_matching<B: AutodiffBackend>(dir: &Store, model: &CocaModel<B>) -> Result<(Meta, Vec<f32>), CheckpointError> {
    let (meta, values) = checkpoint::read_state(dir)?;
    let (tensors, section_len) = state::tensor_index(model, &Moments::Whole(OptimizerRecord::new()));
    let mismatch = |message: String| CheckpointError::Mismatch {
        url: dir.object_url(layout::META),
        message,
    };
    if tensors.len() != meta.tensors.len() || section_len != meta.section_len {
        return Err(mismatch(format!(
            "it holds {} tensors of {} values, the model has {} of {}",
            meta.tensors.len(),
            meta.section_len,
            tensors.len(),
            section_len
        )));
    }
    for (saved, now) in meta.tensors.iter().zip(&tensors) {
        if saved.path != now.path || saved.shape != now.shape {
            return Err(mismatch(format!(
                "tensor {} {:?} where the model has {} {:?}",
                saved.path, saved.shape, now.path, now.shape
            )));
        }
    }
    Ok((meta, values))
}
