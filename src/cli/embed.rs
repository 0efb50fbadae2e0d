//! `coca embed`: L2-normalised embeddings of image files or lines of text,
//! one row per input in input order, as a safetensors file whose metadata
//! names the inputs: what a retrieval index is built from.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use model::backend::Cpu;
use model::inference;
use safetensors::tensor::TensorView;
use safetensors::Dtype;

use super::eval::{load, read_image, ModelSource};

pub fn embed(
    source: &ModelSource,
    images: &[PathBuf],
    texts: Option<&Path>,
    out: &str,
    batch: usize,
) -> anyhow::Result<u8> {
    if batch == 0 {
        bail!("--batch must be at least 1");
    }
    let loaded = load(source)?;
    let device = Default::default();
    let (kind, inputs, rows) = match texts {
        Some(path) => {
            let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
            let lines: Vec<String> = text.lines().map(str::to_string).collect();
            if lines.is_empty() {
                bail!("{}: no lines to embed", path.display());
            }
            let mut rows = Vec::new();
            for chunk in lines.chunks(batch) {
                let (tokens, padding) =
                    inference::text_batch::<Cpu>(&loaded.tokenizer, chunk, loaded.config.context_length, &device)
                        .with_context(|| path.display().to_string())?;
                rows.extend(inference::values(loaded.model.embed_texts(tokens, padding)));
            }
            ("text", lines, rows)
        }
        None => {
            let mut rows = Vec::new();
            for chunk in images.chunks(batch) {
                let pictures = chunk
                    .iter()
                    .map(|path| read_image(path))
                    .collect::<anyhow::Result<Vec<_>>>()?;
                let pixels = inference::image_batch::<Cpu>(&pictures, loaded.config.image_size as u32, &device);
                rows.extend(inference::values(loaded.model.embed_images(pixels)));
            }
            let names = images.iter().map(|path| path.display().to_string()).collect();
            ("image", names, rows)
        }
    };
    let (count, dim) = (inputs.len(), loaded.config.embed_dim);
    let metadata = HashMap::from([
        ("kind".to_string(), kind.to_string()),
        ("inputs".to_string(), serde_json::to_string(&inputs)?),
        ("checkpoint".to_string(), loaded.origin.clone()),
        ("step".to_string(), loaded.step.to_string()),
    ]);
    let view = TensorView::new(Dtype::F32, vec![count, dim], bytemuck::cast_slice(&rows))?;
    let file = safetensors::serialize([("embeddings", view)], Some(metadata))?;
    let (target, name) = source.store.open_object(out)?;
    target
        .put(&name, file.into())
        .with_context(|| format!("cannot write {out}"))?;
    println!(
        "embedded {count} {kind}s ({dim} values each) with step {} of {} -> {out}",
        loaded.step, loaded.origin
    );
    Ok(0)
}
