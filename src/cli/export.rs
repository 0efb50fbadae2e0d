//! `coca export`: a committed checkpoint's parameters as one safetensors
//! file, the model configuration in its metadata; no optimizer state.

use std::collections::HashMap;

use anyhow::{bail, Context};
use proto::checkpoint::{self as layout};
use safetensors::tensor::TensorView;
use safetensors::Dtype;

use super::StoreArgs;

pub fn export(checkpoint: &str, step: Option<u64>, out: &str, store: &StoreArgs) -> anyhow::Result<u8> {
    let root = store.open(checkpoint)?;
    let last = checkpoint.trim_end_matches('/').rsplit('/').next().unwrap_or_default();
    let dir = match (layout::parse_step_dir(last), step) {
        // The URL is a step directory itself.
        (Some(_), None) => root,
        (_, Some(step)) => root.at(&layout::step_dir(step)),
        (None, None) => {
            let (committed, _) = coordinator::checkpoints::steps(&root)?;
            let mut chosen = None;
            for step in committed {
                let dir = root.at(&layout::step_dir(step));
                match coordinator::checkpoints::verify(&dir) {
                    Ok(_) => {
                        chosen = Some(dir);
                        break;
                    }
                    Err(error) => eprintln!("export: skipping {error}"),
                }
            }
            match chosen {
                Some(dir) => dir,
                None => bail!("{checkpoint}: no committed checkpoint here"),
            }
        }
    };
    let (meta, values) = worker::checkpoint::read_state(&dir)?;
    let bytes: Vec<&[u8]> = meta
        .tensors
        .iter()
        .map(|t| bytemuck::cast_slice(&values[t.offset as usize..(t.offset + t.len()) as usize]))
        .collect();
    let views = meta
        .tensors
        .iter()
        .zip(&bytes)
        .map(|(tensor, data)| {
            Ok((
                tensor.path.clone(),
                TensorView::new(Dtype::F32, tensor.shape.clone(), data)?,
            ))
        })
        .collect::<Result<Vec<_>, safetensors::SafeTensorError>>()?;
    let metadata = HashMap::from([
        ("format".to_string(), "coca-model".to_string()),
        ("step".to_string(), meta.step.to_string()),
        ("model".to_string(), meta.resume.model.clone()),
        ("software".to_string(), meta.software.clone()),
    ]);
    let file = safetensors::serialize(views, Some(metadata))?;
    let (target, name) = store.open_object(out)?;
    let size = file.len();
    target
        .put(&name, file.into())
        .with_context(|| format!("cannot write {out}"))?;
    println!(
        "exported step {} of {}: {} tensors, {} parameters, {size} bytes -> {out}",
        meta.step,
        dir.object_url(""),
        meta.tensors.len(),
        meta.section_len
    );
    Ok(0)
}
