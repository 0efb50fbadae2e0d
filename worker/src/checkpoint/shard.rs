//! One rank's shard file: a safetensors file of 1-D F32 pieces named
//! `<section>.<module path>`, holding a contiguous range of the flattened
//! state; the range is in its metadata and in meta.json.

use std::collections::HashMap;

use proto::checkpoint::{TensorEntry, SECTIONS};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

use super::state::Piece;

pub fn encode(pieces: &[Piece], start: u64, end: u64, step: u64) -> Result<Vec<u8>, String> {
    let bytes: Vec<&[u8]> = pieces.iter().map(|p| bytemuck::cast_slice(&p.values)).collect();
    let views = pieces
        .iter()
        .zip(&bytes)
        .map(|(piece, data)| {
            TensorView::new(Dtype::F32, vec![piece.values.len()], data)
                .map(|view| (piece.name.clone(), view))
                .map_err(|e| e.to_string())
        })
        .collect::<Result<Vec<_>, _>>()?;
    // One key: safetensors writes a map's keys in hash order, and equal
    // states should give equal bytes (and checksums).
    let metadata = HashMap::from([(
        "coca".to_string(),
        format!(r#"{{"format":"coca-checkpoint-shard","step":{step},"start":{start},"end":{end}}}"#),
    )]);
    safetensors::serialize(views, Some(metadata)).map_err(|e| e.to_string())
}

/// Writes a shard's pieces into `values` (the whole flattened state),
/// checking that they cover exactly `[start, end)`.
pub fn decode_into(
    bytes: &[u8],
    (start, end): (u64, u64),
    entries: &HashMap<&str, &TensorEntry>,
    section_len: u64,
    values: &mut [f32],
) -> Result<(), String> {
    let file = SafeTensors::deserialize(bytes).map_err(|e| format!("not a safetensors file: {e}"))?;
    let mut covered = 0u64;
    for (name, view) in file.iter() {
        let (section, path) = SECTIONS
            .iter()
            .enumerate()
            .find_map(|(s, prefix)| Some((s as u64, name.strip_prefix(prefix)?.strip_prefix('.')?)))
            .ok_or_else(|| format!("tensor `{name}` belongs to no section"))?;
        let entry = entries
            .get(path)
            .ok_or_else(|| format!("tensor `{name}` is not in meta.json's index"))?;
        if view.dtype() != Dtype::F32 || view.shape().len() != 1 {
            return Err(format!("tensor `{name}` is not a 1-D F32 piece"));
        }
        let begin = section * section_len + entry.offset;
        let (lo, hi) = (begin.max(start), (begin + entry.len()).min(end));
        let len = view.shape()[0] as u64;
        if lo >= hi || hi - lo != len {
            return Err(format!(
                "tensor `{name}` holds {len} elements; this shard's range holds {} of it",
                hi.saturating_sub(lo)
            ));
        }
        let target = &mut values[lo as usize..hi as usize];
        for (value, chunk) in target.iter_mut().zip(view.data().chunks_exact(4)) {
            *value = f32::from_le_bytes(chunk.try_into().expect("4 bytes"));
        }
        covered += len;
    }
    if covered != end - start {
        return Err(format!("holds {covered} of the {} elements of its range", end - start));
    }
    Ok(())
}
