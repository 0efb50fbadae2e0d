//! Sharded checkpoints (layout in `proto::checkpoint`): each rank saves its
//! range of the flattened state, rank 0 the meta.json, and the coordinator
//! commits the step once every shard is reported; loading reads every
//! shard of a committed step, whatever world size wrote it.

pub mod shard;
pub mod state;

use std::collections::HashMap;
use std::time::Instant;

use burn::module::AutodiffModule;
use burn::tensor::backend::AutodiffBackend;
use proto::checkpoint::{self as layout, Committed, Meta, ResumeFields, RngState, ShardRecord, TensorEntry};
use store::{Store, StoreError};

use crate::model::CocaModel;
use state::OptimizerRecord;

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{url}: {message}")]
    Damaged { url: String, message: String },
    #[error("{url}: this checkpoint does not fit the model: {message}")]
    Mismatch { url: String, message: String },
}

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
    pub fn of<B: AutodiffBackend>(model: &CocaModel<B>, record: &OptimizerRecord<B>) -> Self {
        let (tensors, section_len) = state::tensor_index(model, record);
        Self {
            tensors,
            section_len,
            optimizer_steps: state::optimizer_steps(model, record),
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
    record: &OptimizerRecord<B>,
) -> Result<SavedShard, CheckpointError> {
    let started = Instant::now();
    let layout = StateLayout::of(model, record);
    let range = layout::shard_range(layout.total(), rank, world);
    let bytes = shard::encode(&layout.tensors, layout.section_len, range, step, |data| {
        state::fill_range(model, record, layout.section_len, range, data)
    });
    let bytes = store::Bytes::from(bytes);
    // Hash while the file is written: the commit needs both.
    let hashing = {
        let bytes = bytes.clone();
        std::thread::spawn(move || store::sha256_hex(&bytes))
    };
    let dir = root.at(&layout::step_dir(step));
    let file = layout::shard_file(rank, world);
    let written = dir.put(&file, bytes.clone());
    let sha256 = hashing.join().expect("hashing does not panic");
    written?;
    Ok(SavedShard {
        record: ShardRecord {
            file,
            bytes: bytes.len() as u64,
            sha256,
        },
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Writes meta.json of a step (rank 0 does, before reporting its shard).
pub fn write_meta(root: &Store, meta: &Meta) -> Result<(), CheckpointError> {
    let json = serde_json::to_vec_pretty(meta).expect("meta serializes");
    root.at(&layout::step_dir(meta.step)).put(layout::META, json.into())?;
    Ok(())
}

/// An object of a step; a missing one makes the step damaged.
fn get(dir: &Store, name: &str) -> Result<store::Bytes, CheckpointError> {
    dir.get(name).map_err(|e| match e {
        StoreError::NotFound { .. } => CheckpointError::Damaged {
            url: dir.object_url(name),
            message: "missing".into(),
        },
        other => other.into(),
    })
}

/// Reads a committed step's meta.json and COMMITTED.
pub fn read_step(dir: &Store) -> Result<(Meta, Committed), CheckpointError> {
    let parse = |name: &str| -> Result<serde_json::Value, CheckpointError> {
        let bytes = get(dir, name)?;
        serde_json::from_slice(&bytes).map_err(|e| CheckpointError::Damaged {
            url: dir.object_url(name),
            message: format!("not valid JSON: {e}"),
        })
    };
    let committed = parse(layout::COMMITTED)?;
    let meta = parse(layout::META)?;
    let damaged = |name: &str, e: serde_json::Error| CheckpointError::Damaged {
        url: dir.object_url(name),
        message: e.to_string(),
    };
    Ok((
        serde_json::from_value(meta).map_err(|e| damaged(layout::META, e))?,
        serde_json::from_value(committed).map_err(|e| damaged(layout::COMMITTED, e))?,
    ))
}

/// The full flattened state of a committed step, every shard checked
/// against the sizes and SHA-256 sums COMMITTED recorded.
pub fn read_state(dir: &Store) -> Result<(Meta, Vec<f32>), CheckpointError> {
    let (meta, committed) = read_step(dir)?;
    let entries: HashMap<&str, &TensorEntry> = meta.tensors.iter().map(|t| (t.path.as_str(), t)).collect();
    let total = meta.section_len * layout::SECTIONS.len() as u64;
    let mut values = vec![0f32; total as usize];
    for range in &meta.shards {
        let url = dir.object_url(&range.file);
        let damaged = |message: String| CheckpointError::Damaged {
            url: url.clone(),
            message,
        };
        let expected = committed
            .shards
            .iter()
            .find(|s| s.file == range.file)
            .ok_or_else(|| damaged("not among the shards COMMITTED lists".into()))?;
        let bytes = get(dir, &range.file)?;
        expected
            .check(bytes.len() as u64, &store::sha256_hex(&bytes))
            .map_err(&damaged)?;
        shard::decode_into(
            &bytes,
            (range.start, range.end),
            &entries,
            meta.section_len,
            &mut values,
        )
        .map_err(damaged)?;
    }
    Ok((meta, values))
}

/// Loads a committed step into `model`; returns the model and AdamW's state.
pub fn load<B: AutodiffBackend>(
    dir: &Store,
    model: CocaModel<B>,
) -> Result<(CocaModel<B>, OptimizerRecord<B>, Meta), CheckpointError>
where
    CocaModel<B>: AutodiffModule<B>,
{
    let (meta, values) = read_state(dir)?;
    let (tensors, section_len) = state::tensor_index(&model, &OptimizerRecord::new());
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
    let (model, record) = state::apply(model, &meta.tensors, meta.section_len, &values, meta.optimizer_steps);
    Ok((model, record, meta))
}
