//! A trained model for evaluation and captioning: loaded from `coca
//! export`'s file or from a committed checkpoint step, with its
//! tokenizer, and the preprocessing evaluation uses (centre crops, framed
//! and padded token ids).

use burn::module::{Module, ModuleMapper, Param};
use burn::tensor::backend::Backend;
use burn::tensor::{Bool, Int, Tensor, TensorData};
use checkpoint::layout::{self as layout, Meta, TensorEntry};
use contract::ModelConfig;
use datasets::tokenizer::TokenizerError;
use safetensors::{Dtype, SafeTensors};
use store::Store;

use crate::state::PathStack;
use crate::CocaModel;
use checkpoint::CheckpointError;
use datasets::image::{self, Crop};
use datasets::tokenizer::TextTokenizer;

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error("{origin}: {message}")]
    Format { origin: String, message: String },
}

pub struct Loaded<B: Backend> {
    pub model: CocaModel<B>,
    pub config: ModelConfig,
    pub tokenizer: TextTokenizer,
    pub step: u64,
    /// Where it came from, for reports.
    pub origin: String,
}

/// Loads `coca export`'s file (parameters by module path, the model
/// configuration and tokenizer in its metadata).
pub fn from_export<B: Backend>(bytes: &[u8], origin: &str, device: &B::Device) -> Result<Loaded<B>, LoadError> {
    let format = |message: String| LoadError::Format {
        origin: origin.to_string(),
        message,
    };
    let (_, header) = SafeTensors::read_metadata(bytes).map_err(|e| format(format!("not a safetensors file: {e}")))?;
    let metadata = header.metadata().clone().unwrap_or_default();
    let field = |key: &str| {
        metadata
            .get(key)
            .cloned()
            .ok_or_else(|| format(format!("no `{key}` in its metadata (was it written by coca export?)")))
    };
    let config: ModelConfig =
        serde_json::from_str(&field("model")?).map_err(|e| format(format!("metadata `model`: {e}")))?;
    let tokenizer = TextTokenizer::from_json(&field("tokenizer")?, origin).map_err(|e| format(e.to_string()))?;
    let step = field("step")?
        .parse()
        .map_err(|_| format("metadata `step` is not a number".into()))?;
    let file = SafeTensors::deserialize(bytes).map_err(|e| format(format!("not a safetensors file: {e}")))?;
    let model = build(&config, device, |path, shape| {
        let view = file.tensor(path).map_err(|_| format!("no tensor `{path}`"))?;
        if view.dtype() != Dtype::F32 || view.shape() != shape {
            return Err(format!(
                "tensor `{path}` is {:?} {:?}, the model wants F32 {shape:?}",
                view.dtype(),
                view.shape()
            ));
        }
        Ok(view
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
            .collect())
    })
    .map_err(format)?;
    Ok(Loaded {
        model,
        config,
        tokenizer,
        step,
        origin: origin.to_string(),
    })
}

/// A model from a committed step's state (`checkpoint::read_state` of
/// `dir`), with the tokenizer the step holds.
pub fn from_state<B: Backend>(
    dir: &Store,
    meta: Meta,
    values: &[f32],
    device: &B::Device,
) -> Result<Loaded<B>, LoadError> {
    let origin = dir.object_url("");
    let format = |message: String| LoadError::Format {
        origin: origin.clone(),
        message,
    };
    let config: ModelConfig =
        serde_json::from_str(&meta.resume.model).map_err(|e| format(format!("meta.json `resume.model`: {e}")))?;
    let json = dir.get(layout::TOKENIZER)?;
    let tokenizer = TextTokenizer::from_json(&String::from_utf8_lossy(&json), &dir.object_url(layout::TOKENIZER))
        .map_err(|e| format(e.to_string()))?;
    let entries: std::collections::HashMap<&str, &TensorEntry> =
        meta.tensors.iter().map(|t| (t.path.as_str(), t)).collect();
    let model = build(&config, device, |path, shape| {
        let entry = entries
            .get(path)
            .ok_or_else(|| format!("no tensor `{path}` in meta.json"))?;
        if entry.shape != shape {
            return Err(format!(
                "tensor `{path}` is {:?}, the model wants {shape:?}",
                entry.shape
            ));
        }
        Ok(values[entry.offset as usize..(entry.offset + entry.len()) as usize].to_vec())
    })
    .map_err(format)?;
    Ok(Loaded {
        model,
        config,
        tokenizer,
        step: meta.step,
        origin,
    })
}

/// A model of `config` whose every parameter comes from `lookup(path,
/// shape)`; the first error ends it.
pub(crate) fn build<B: Backend, E>(
    config: &ModelConfig,
    device: &B::Device,
    lookup: impl Fn(&str, &[usize]) -> Result<Vec<f32>, E>,
) -> Result<CocaModel<B>, E> {
    struct Load<F, E> {
        stack: PathStack,
        lookup: F,
        error: Option<E>,
    }
    impl<B: Backend, E, F: Fn(&str, &[usize]) -> Result<Vec<f32>, E>> ModuleMapper<B> for Load<F, E> {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.stack.enter(name);
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.stack.exit();
        }
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
            let (id, tensor, mapper) = param.consume();
            let shape = tensor.dims().to_vec();
            let path = self.stack.path();
            let value = match (self.error.is_none()).then(|| (self.lookup)(&path, &shape)) {
                Some(Ok(values)) => Tensor::from_data(TensorData::new(values, shape), &tensor.device()),
                Some(Err(message)) => {
                    self.error = Some(message);
                    tensor
                }
                None => tensor,
            };
            Param::from_mapped_value(id, value, mapper)
        }
    }
    let mut load = Load {
        stack: PathStack::default(),
        lookup,
        error: None,
    };
    let model = CocaModel::<B>::placeholder(config, device).map(&mut load);
    match load.error {
        Some(message) => Err(message),
        None => Ok(model),
    }
}

/// Images as the model sees them at evaluation: centre crop, normalised:
/// [batch, 3, size, size].
pub fn image_batch<B: Backend>(images: &[image::RgbImage], size: u32, device: &B::Device) -> Tensor<B, 4> {
    let pixels: Vec<f32> = images
        .iter()
        .flat_map(|picture| image::prepare(picture, size, Crop::Centre, 0))
        .collect();
    let size = size as usize;
    Tensor::from_data(TensorData::new(pixels, [images.len(), 3, size, size]), device)
}

/// Texts as token ids framed by `<bos>`/`<eos>` and padded: (tokens, padding).
pub fn text_batch<B: Backend>(
    tokenizer: &TextTokenizer,
    texts: &[String],
    context: usize,
    device: &B::Device,
) -> Result<(Tensor<B, 2, Int>, Tensor<B, 2, Bool>), TokenizerError> {
    let mut ids = Vec::with_capacity(texts.len() * context);
    for text in texts {
        let encoded = tokenizer.encode(text, context)?;
        ids.extend(encoded.into_iter().map(i64::from));
    }
    let pad = i64::from(tokenizer.pad_id());
    let padding: Vec<bool> = ids.iter().map(|&id| id == pad).collect();
    let shape = [texts.len(), context];
    Ok((
        Tensor::from_data(TensorData::new(ids, shape), device),
        Tensor::from_bool(TensorData::new(padding, shape), device),
    ))
}

/// A tensor's values, row-major, as f32.
pub fn values<B: Backend, const D: usize>(tensor: Tensor<B, D>) -> Vec<f32> {
    tensor
        .into_data()
        .convert::<f32>()
        .to_vec()
        .expect("f32 data after convert")
}
