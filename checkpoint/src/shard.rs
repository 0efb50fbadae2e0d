//! One rank's shard file: a safetensors file of 1-D F32 pieces named
//! `<section>.<module path>`, holding a contiguous range of the flattened
//! state; the range is in its metadata and in meta.json.

use std::collections::HashMap;

use crate::layout::{TensorEntry, SECTIONS};
use safetensors::{Dtype, SafeTensors};

/// The pieces of tensors a range of the flattened state holds, in
/// flattened order: (`<section>.<path>`, first element, end element).
pub fn pieces(entries: &[TensorEntry], section_len: u64, (start, end): (u64, u64)) -> Vec<(String, u64, u64)> {
    let mut pieces = Vec::new();
    for (section, prefix) in SECTIONS.iter().enumerate() {
        for entry in entries {
            let begin = section as u64 * section_len + entry.offset;
            let (lo, hi) = (begin.max(start), (begin + entry.len()).min(end));
            if lo < hi {
                pieces.push((format!("{prefix}.{}", entry.path), lo, hi));
            }
        }
    }
    pieces
}

/// A shard file of the range `[start, end)`: the safetensors header for its
/// pieces, then the range's values, written in place by `fill` (4 bytes
/// per element, little-endian), so the data is copied once.
pub fn encode(
    entries: &[TensorEntry],
    section_len: u64,
    (start, end): (u64, u64),
    step: u64,
    fill: impl FnOnce(&mut [u8]),
) -> Vec<u8> {
    let about = format!(r#"{{"format":"coca-checkpoint-shard","step":{step},"start":{start},"end":{end}}}"#);
    let quote = |text: &str| serde_json::to_string(text).expect("a string serializes");
    let mut header = format!(r#"{{"__metadata__":{{"coca":{}}}"#, quote(&about));
    for (name, lo, hi) in pieces(entries, section_len, (start, end)) {
        let (from, to) = (4 * (lo - start), 4 * (hi - start));
        header.push_str(&format!(
            r#",{}:{{"dtype":"F32","shape":[{}],"data_offsets":[{from},{to}]}}"#,
            quote(&name),
            hi - lo
        ));
    }
    header.push('}');
    // safetensors pads its header to 8 bytes so the data stays aligned.
    while header.len() % 8 != 0 {
        header.push(' ');
    }
    let data = 4 * (end - start) as usize;
    let mut file = vec![0u8; 8 + header.len() + data];
    file[..8].copy_from_slice(&(header.len() as u64).to_le_bytes());
    file[8..8 + header.len()].copy_from_slice(header.as_bytes());
    fill(&mut file[8 + header.len()..]);
    file
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
