//! A step's exponential moving average of the parameters
//! (`train.ema_decay`): `ema.safetensors` beside the shards, written by
//! rank 0, every tensor by its module path, checked against the size and
//! SHA-256 meta.json records.

use std::collections::HashMap;

use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use serde::{Deserialize, Serialize};
use store::{Store, StoreError};

use crate::layout::{self, Meta, TensorEntry};
use crate::CheckpointError;

/// What meta.json says of the step's EMA file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EmaRecord {
    pub decay: f64,
    pub bytes: u64,
    pub sha256: String,
}

/// The EMA file of `values` (a parameter section, in `tensors`' layout).
pub fn encode(tensors: &[TensorEntry], values: &[f32]) -> Vec<u8> {
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|tensor| {
            let data = bytemuck::cast_slice(&values[tensor.offset as usize..(tensor.offset + tensor.len()) as usize]);
            let view =
                TensorView::new(Dtype::F32, tensor.shape.clone(), data).expect("a tensor's values fill its shape");
            (tensor.path.clone(), view)
        })
        .collect();
    safetensors::serialize(views, None).expect("f32 tensors serialize")
}

/// Writes the EMA file of step `step` under `root`; its record for meta.json.
pub fn write(root: &Store, step: u64, decay: f64, bytes: store::Bytes) -> Result<EmaRecord, CheckpointError> {
    let record = EmaRecord {
        decay,
        bytes: bytes.len() as u64,
        sha256: store::sha256_hex(&bytes),
    };
    root.at(&layout::step_dir(step)).put(layout::EMA, bytes)?;
    Ok(record)
}

/// The EMA of a committed step, as a parameter section (`meta`'s layout),
/// checked against its record; `None` when the step has none.
pub fn read(dir: &Store, meta: &Meta) -> Result<Option<Vec<f32>>, CheckpointError> {
    let Some(record) = &meta.ema else { return Ok(None) };
    let damaged = |message: String| CheckpointError::Damaged {
        url: dir.object_url(layout::EMA),
        message,
    };
    let bytes = dir.get(layout::EMA).map_err(|error| match error {
        StoreError::NotFound { .. } => damaged("missing (meta.json records one)".into()),
        other => other.into(),
    })?;
    let check = layout::ShardRecord {
        file: layout::EMA.into(),
        bytes: record.bytes,
        sha256: record.sha256.clone(),
    };
    check
        .check(bytes.len() as u64, &store::sha256_hex(&bytes))
        .map_err(damaged)?;
    let file = SafeTensors::deserialize(&bytes).map_err(|e| damaged(format!("not a safetensors file: {e}")))?;
    let entries: HashMap<&str, &TensorEntry> = meta.tensors.iter().map(|t| (t.path.as_str(), t)).collect();
    let mut values = vec![0f32; meta.section_len as usize];
    let mut covered = 0u64;
    for (name, view) in file.iter() {
        let entry = entries
            .get(name)
            .ok_or_else(|| damaged(format!("tensor `{name}` is not in meta.json's index")))?;
        if view.dtype() != Dtype::F32 || view.shape() != entry.shape.as_slice() {
            return Err(damaged(format!("tensor `{name}` is not F32 {:?}", entry.shape)));
        }
        let target = &mut values[entry.offset as usize..(entry.offset + entry.len()) as usize];
        for (value, chunk) in target.iter_mut().zip(view.data().chunks_exact(4)) {
            *value = f32::from_le_bytes(chunk.try_into().expect("4 bytes"));
        }
        covered += entry.len();
    }
    if covered != meta.section_len {
        return Err(damaged(format!(
            "holds {covered} of the {} parameters",
            meta.section_len
        )));
    }
    Ok(Some(values))
}
