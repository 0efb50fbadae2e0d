//! One step directory: reading and checking what was committed, and
//! writing a rank's shard and rank 0's meta.json.

use std::collections::HashMap;

use store::{Store, StoreError};

use crate::layout::{self, Committed, Meta, ShardRange, ShardRecord, TensorEntry};
use crate::{shard, CheckpointError};

fn damaged(dir: &Store, name: &str, message: impl Into<String>) -> CheckpointError {
    CheckpointError::Damaged {
        url: dir.object_url(name),
        message: message.into(),
    }
}

/// An object of a step; a missing one makes the step damaged.
fn get(dir: &Store, name: &str) -> Result<store::Bytes, CheckpointError> {
    dir.get(name).map_err(|e| match e {
        StoreError::NotFound { .. } => damaged(dir, name, "missing"),
        other => other.into(),
    })
}

fn read_json<T: serde::de::DeserializeOwned>(dir: &Store, name: &str) -> Result<T, CheckpointError> {
    serde_json::from_slice(&get(dir, name)?).map_err(|e| damaged(dir, name, e.to_string()))
}

/// A committed step's COMMITTED and meta.json, in a format this build reads.
pub fn read_step(dir: &Store) -> Result<(Meta, Committed), CheckpointError> {
    let committed: Committed = read_json(dir, layout::COMMITTED)?;
    let meta: Meta = read_json(dir, layout::META)?;
    if meta.format != layout::FORMAT || meta.version != layout::VERSION {
        let message = format!(
            "format {} version {}, not {} {}",
            meta.format,
            meta.version,
            layout::FORMAT,
            layout::VERSION
        );
        return Err(damaged(dir, layout::META, message));
    }
    Ok((meta, committed))
}

/// A shard's bytes, checked against the size and SHA-256 COMMITTED recorded.
fn read_shard(dir: &Store, committed: &Committed, range: &ShardRange) -> Result<store::Bytes, CheckpointError> {
    let record = committed
        .shards
        .iter()
        .find(|s| s.file == range.file)
        .ok_or_else(|| damaged(dir, &range.file, "not among the shards COMMITTED lists"))?;
    let bytes = get(dir, &range.file)?;
    record
        .check(bytes.len() as u64, &store::sha256_hex(&bytes))
        .map_err(|message| damaged(dir, &range.file, message))?;
    Ok(bytes)
}

/// A committed step's meta.json, once every shard is checked.
pub fn verify(dir: &Store) -> Result<Meta, CheckpointError> {
    let (meta, committed) = read_step(dir)?;
    for range in &meta.shards {
        read_shard(dir, &committed, range)?;
    }
    Ok(meta)
}

/// The full flattened state of a committed step, every shard checked.
pub fn read_state(dir: &Store) -> Result<(Meta, Vec<f32>), CheckpointError> {
    let (meta, committed) = read_step(dir)?;
    let entries: HashMap<&str, &TensorEntry> = meta.tensors.iter().map(|t| (t.path.as_str(), t)).collect();
    let total = meta.section_len * layout::SECTIONS.len() as u64;
    let mut values = vec![0f32; total as usize];
    for range in &meta.shards {
        let bytes = read_shard(dir, &committed, range)?;
        shard::decode_into(
            &bytes,
            (range.start, range.end),
            &entries,
            meta.section_len,
            &mut values,
        )
        .map_err(|message| damaged(dir, &range.file, message))?;
    }
    Ok((meta, values))
}

/// Writes one rank's encoded shard of step `step` under `root` (the
/// checkpoint URL), hashing it while it is written: the commit needs both.
pub fn write_shard(
    root: &Store,
    step: u64,
    rank: usize,
    world: usize,
    bytes: store::Bytes,
) -> Result<ShardRecord, CheckpointError> {
    let hashing = {
        let bytes = bytes.clone();
        std::thread::spawn(move || store::sha256_hex(&bytes))
    };
    let file = layout::shard_file(rank, world);
    let written = root.at(&layout::step_dir(step)).put(&file, bytes.clone());
    let sha256 = hashing.join().expect("hashing does not panic");
    written?;
    Ok(ShardRecord {
        file,
        bytes: bytes.len() as u64,
        sha256,
    })
}

/// Writes meta.json of a step (rank 0 does, before reporting its shard).
pub fn write_meta(root: &Store, meta: &Meta) -> Result<(), CheckpointError> {
    let json = serde_json::to_vec_pretty(meta).expect("meta serializes");
    root.at(&layout::step_dir(meta.step)).put(layout::META, json.into())?;
    Ok(())
}
