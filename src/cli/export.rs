//! `coca export`: a committed checkpoint's parameters as one safetensors
//! file, the model configuration and tokenizer in its metadata; no
//! optimizer state. `--format open-clip` writes open_clip's state dict
//! names instead, and its model JSON beside the file.

use std::collections::{BTreeMap, HashMap};

use anyhow::Context;
use checkpoint::layout;
use safetensors::tensor::TensorView;
use safetensors::Dtype;

use super::StoreArgs;

/// What `coca export` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ExportFormat {
    /// coca's parameter names, with the configuration and tokenizer (what
    /// `coca eval --checkpoint FILE` reads).
    Coca,
    /// open_clip's CoCa state dict (`open_clip.create_model(..., pretrained=FILE)`),
    /// and its model JSON as FILE's name with `.json`.
    OpenClip,
}

pub fn export(
    checkpoint: &str,
    step: Option<u64>,
    out: &str,
    format: ExportFormat,
    weights: super::eval::Weights,
    store: &StoreArgs,
) -> anyhow::Result<u8> {
    let checkpoint::NamedState { dir, meta, values, .. } = super::eval::read_step(checkpoint, step, weights, store)?;
    if format == ExportFormat::OpenClip {
        return export_open_clip(&dir.object_url(""), &meta, &values, out, store);
    }
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
    let tokenizer = dir
        .get(layout::TOKENIZER)
        .with_context(|| format!("{}: the step's tokenizer", dir.object_url(layout::TOKENIZER)))?;
    let metadata = HashMap::from([
        ("format".to_string(), "coca-model".to_string()),
        (
            "tokenizer".to_string(),
            String::from_utf8_lossy(&tokenizer).into_owned(),
        ),
        ("step".to_string(), meta.step.to_string()),
        ("model".to_string(), meta.resume.model.clone()),
        ("software".to_string(), meta.software.clone()),
    ]);
    let file = with_sorted_metadata(safetensors::serialize(views, Some(metadata))?)?;
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

fn export_open_clip(
    origin: &str,
    meta: &checkpoint::layout::Meta,
    values: &[f32],
    out: &str,
    store: &StoreArgs,
) -> anyhow::Result<u8> {
    let config: contract::ModelConfig =
        serde_json::from_str(&meta.resume.model).with_context(|| format!("{origin}: meta.json `resume.model`"))?;
    let tensors: HashMap<&str, (&[usize], &[f32])> = meta
        .tensors
        .iter()
        .map(|t| {
            let range = t.offset as usize..(t.offset + t.len()) as usize;
            (t.path.as_str(), (t.shape.as_slice(), &values[range]))
        })
        .collect();
    let state = model::open_clip::export(&config, |path| tensors.get(path).copied())
        .map_err(|message| anyhow::anyhow!("{origin}: {message}"))?;
    let views = state
        .iter()
        .map(|(name, shape, values)| {
            Ok((
                name.clone(),
                TensorView::new(Dtype::F32, shape.clone(), bytemuck::cast_slice(values))?,
            ))
        })
        .collect::<Result<Vec<_>, safetensors::SafeTensorError>>()?;
    // What torch's safetensors writer puts there.
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    let file = safetensors::serialize(views, Some(metadata))?;
    let config_json = serde_json::to_string_pretty(&model::open_clip::config_to_json(&config))?;
    let config_out = format!("{}.json", out.strip_suffix(".safetensors").unwrap_or(out));
    let (target, name) = store.open_object(out)?;
    let size = file.len();
    target
        .put(&name, file.into())
        .with_context(|| format!("cannot write {out}"))?;
    let (target, name) = store.open_object(&config_out)?;
    target
        .put(&name, config_json.into_bytes().into())
        .with_context(|| format!("cannot write {config_out}"))?;
    println!(
        "exported step {} of {origin} as open_clip's state dict: {} tensors, {size} bytes -> {out}; its model JSON -> {config_out}",
        meta.step,
        state.len()
    );
    Ok(0)
}

/// safetensors writes its metadata map in hash order, which changes from
/// run to run; the same model must export to the same bytes. Rewrites the
/// header with its keys in a fixed order; the tensors' offsets stay.
fn with_sorted_metadata(file: Vec<u8>) -> anyhow::Result<Vec<u8>> {
    const LEN: usize = size_of::<u64>();
    let header_len = u64::from_le_bytes(file[..LEN].try_into()?) as usize;
    let (header, data) = file[LEN..].split_at(header_len);
    let mut header: BTreeMap<String, serde_json::Value> = serde_json::from_slice(header)?;
    if let Some(serde_json::Value::Object(metadata)) = header.get_mut("__metadata__") {
        let sorted: BTreeMap<String, serde_json::Value> = std::mem::take(metadata).into_iter().collect();
        metadata.extend(sorted);
    }
    let mut header = serde_json::to_vec(&header)?;
    // safetensors aligns the data to 8 bytes with spaces after the header.
    header.resize(header.len().next_multiple_of(LEN), b' ');
    let mut sorted = Vec::with_capacity(LEN + header.len() + data.len());
    sorted.extend_from_slice(&(header.len() as u64).to_le_bytes());
    sorted.extend_from_slice(&header);
    sorted.extend_from_slice(data);
    Ok(sorted)
}
