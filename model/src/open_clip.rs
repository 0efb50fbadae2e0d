//! open_clip's CoCa checkpoints: its model JSON to a [`ModelConfig`] and
//! back, and its state dict to this model's parameters and back.
//!
//! Each open_clip tensor is one of ours, or three of ours packed
//! (attention's `in_proj_weight`/`in_proj_bias` hold the query, key and
//! value projections). Linear weights are stored transposed (torch keeps
//! [out, in], we keep [in, out]); the patch convolution is our patch
//! embedding's transpose; `logit_scale` is a scalar there. Every mapping is
//! exact, so an import followed by an export gives back the same bytes.

use std::collections::{BTreeSet, HashMap};

use burn::tensor::backend::Backend;
use contract::{Architecture, ModelConfig, PoolerLayout, Preset};
use safetensors::{Dtype, SafeTensors};
use serde_json::{json, Map, Value};

use crate::CocaModel;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum OpenClipError {
    #[error("{origin}: {field}: {message}")]
    Config {
        origin: String,
        field: String,
        message: String,
    },
    #[error("{origin}: not a whole safetensors file: {message}")]
    Format { origin: String, message: String },
    #[error("{origin}: holds a CLIP model's state dict (no `text_decoder.*` or `text.cls_emb` tensors), not a CoCa's")]
    NotCoca { origin: String },
    #[error("{origin}: `{name}`: {message}")]
    Tensor {
        origin: String,
        name: String,
        message: String,
    },
    #[error("{origin}: {count} tensor(s) the configuration has no place for: {names}")]
    Unexpected {
        origin: String,
        count: usize,
        names: String,
    },
}

/// open_clip's names of the configurations coca has presets for.
pub const NAMED_CONFIGS: [(&str, Preset); 2] = [
    ("coca_ViT-B-32", Preset::OpenClipB32),
    ("coca_ViT-L-14", Preset::OpenClipL14),
];

/// The configuration open_clip calls `name` (`coca_ViT-B-32`, `coca_ViT-L-14`).
pub fn named_config(name: &str) -> Option<ModelConfig> {
    NAMED_CONFIGS
        .iter()
        .find(|(known, _)| known.eq_ignore_ascii_case(name))
        .map(|(_, preset)| preset.config())
}

/// Reads open_clip's model JSON (`model_configs/coca_*.json`, or the
/// `open_clip_config.json` of a hub checkpoint, whose `model_cfg` it is).
/// Options coca does not implement are errors naming them.
pub fn config_from_json(json: &str, origin: &str) -> Result<ModelConfig, OpenClipError> {
    let error = |field: &str, message: String| OpenClipError::Config {
        origin: origin.to_string(),
        field: field.to_string(),
        message,
    };
    let root: Value = serde_json::from_str(json).map_err(|e| error("(file)", format!("not JSON: {e}")))?;
    let root = root.get("model_cfg").unwrap_or(&root);
    let section = |name: &str| -> Result<Map<String, Value>, OpenClipError> {
        match root.get(name) {
            Some(Value::Object(map)) => Ok(map.clone()),
            Some(_) => Err(error(name, "must be an object".into())),
            None => Err(error(name, "missing (not an open_clip CoCa configuration?)".into())),
        }
    };
    let top = root
        .as_object()
        .ok_or_else(|| error("(file)", "must be an object".into()))?;
    for key in top.keys() {
        if ![
            "embed_dim",
            "vision_cfg",
            "text_cfg",
            "multimodal_cfg",
            "custom_text",
            "quick_gelu",
        ]
        .contains(&key.as_str())
        {
            return Err(error(key, "not supported by coca's import".into()));
        }
    }
    if top.get("quick_gelu").and_then(Value::as_bool) == Some(true) {
        return Err(error("quick_gelu", "coca's MLPs use exact GELU".into()));
    }
    let embed_dim = uint(top.get("embed_dim"), None).map_err(|m| error("embed_dim", m))?;

    let vision = section("vision_cfg")?;
    let text = section("text_cfg")?;
    let multimodal = section("multimodal_cfg")?;
    // (field, what coca requires of it); anything else in the section is refused.
    let check = |name: &str, map: &Map<String, Value>, known: &[&str], fixed: &[(&str, Value)]| {
        for (key, value) in map {
            let field = format!("{name}.{key}");
            if let Some((_, wanted)) = fixed.iter().find(|(k, _)| k == key) {
                if value != wanted && !(value.is_null() && wanted.is_null()) {
                    return Err(error(
                        &field,
                        format!("{value} is not supported (coca implements {wanted})"),
                    ));
                }
            } else if !known.contains(&key.as_str()) {
                return Err(error(&field, "not supported by coca's import".into()));
            }
        }
        Ok(())
    };
    check(
        "vision_cfg",
        &vision,
        &[
            "image_size",
            "layers",
            "width",
            "head_width",
            "mlp_ratio",
            "patch_size",
            "attn_pooler_queries",
            "attn_pooler_heads",
            "output_tokens",
            "patch_dropout",
        ],
        &[
            ("attentional_pool", json!(true)),
            ("ls_init_value", Value::Null),
            ("no_ln_pre", json!(false)),
            ("pos_embed_type", json!("learnable")),
            ("pool_type", json!("tok")),
            ("final_ln_after_pool", json!(false)),
        ],
    )?;
    check(
        "text_cfg",
        &text,
        &[
            "context_length",
            "vocab_size",
            "width",
            "heads",
            "layers",
            "mlp_ratio",
            "output_tokens",
            "pad_id",
        ],
        &[
            ("embed_cls", json!(true)),
            ("ls_init_value", Value::Null),
            ("no_causal_mask", json!(false)),
            ("correct_cls_mask", json!(false)),
            ("proj_bias", json!(false)),
            ("proj_type", json!("linear")),
        ],
    )?;
    check(
        "multimodal_cfg",
        &multimodal,
        &[
            "context_length",
            "vocab_size",
            "width",
            "heads",
            "layers",
            "mlp_ratio",
            "attn_pooler_heads",
            "n_queries",
            "dim_head",
        ],
        &[("ls_init_value", Value::Null)],
    )?;
    if !vision.contains_key("attentional_pool") {
        return Err(error(
            "vision_cfg.attentional_pool",
            "missing: coca imports CoCa models, whose image tower pools with attention".into(),
        ));
    }
    if !text.contains_key("embed_cls") {
        return Err(error(
            "text_cfg.embed_cls",
            "missing: CoCa's text tower appends a CLS token".into(),
        ));
    }
    if let Some(pad) = text.get("pad_id") {
        if pad != &json!(0) {
            return Err(error(
                "text_cfg.pad_id",
                format!("{pad} is not supported (coca pads with 0, as open_clip)"),
            ));
        }
    }

    let field = |name: &str, map: &Map<String, Value>, key: &str, default: Option<usize>| {
        uint(map.get(key), default).map_err(|m| error(&format!("{name}.{key}"), m))
    };
    let ratio = |name: &str, map: &Map<String, Value>, width: usize| -> Result<usize, OpenClipError> {
        let ratio = match map.get("mlp_ratio") {
            None => 4.0,
            Some(value) => value
                .as_f64()
                .ok_or_else(|| error(&format!("{name}.mlp_ratio"), "must be a number".into()))?,
        };
        Ok((width as f64 * ratio) as usize)
    };
    let image_size = match vision.get("image_size") {
        Some(Value::Array(sides)) if sides.len() == 2 && sides[0] == sides[1] => uint(Some(&sides[0]), None),
        Some(Value::Array(_)) => Err("coca implements square images only".into()),
        other => uint(other, Some(224)),
    }
    .map_err(|m| error("vision_cfg.image_size", m))?;
    let vision_width = field("vision_cfg", &vision, "width", Some(768))?;
    let head_width = field("vision_cfg", &vision, "head_width", Some(64))?;
    if head_width == 0 || vision_width % head_width != 0 {
        return Err(error(
            "vision_cfg.head_width",
            format!("{head_width} does not divide width = {vision_width}"),
        ));
    }
    let queries = field("vision_cfg", &vision, "attn_pooler_queries", Some(256))?;
    if queries < 2 {
        return Err(error(
            "vision_cfg.attn_pooler_queries",
            "must be at least 2 (the first is the contrastive one)".into(),
        ));
    }
    let text_width = field("text_cfg", &text, "width", Some(512))?;
    let config = ModelConfig {
        architecture: Architecture::OpenClip,
        image_size,
        patch_size: field("vision_cfg", &vision, "patch_size", Some(16))?,
        channels: 3,
        vision_width,
        vision_layers: field("vision_cfg", &vision, "layers", Some(12))?,
        vision_heads: vision_width / head_width,
        vision_mlp: ratio("vision_cfg", &vision, vision_width)?,
        pooler_layout: PoolerLayout::Shared,
        pooler_heads: field("vision_cfg", &vision, "attn_pooler_heads", Some(8))?,
        caption_queries: queries - 1,
        embed_dim,
        text_width,
        text_heads: field("text_cfg", &text, "heads", Some(8))?,
        text_mlp: ratio("text_cfg", &text, text_width)?,
        unimodal_layers: field("text_cfg", &text, "layers", Some(12))?,
        multimodal_layers: field("multimodal_cfg", &multimodal, "layers", Some(12))?,
        vocab_size: field("text_cfg", &text, "vocab_size", Some(49408))?,
        context_length: field("text_cfg", &text, "context_length", Some(77))?,
        tie_embeddings: false,
        layer_norm_eps: 1e-5,
    };
    // coca has one text width, head count, MLP, vocabulary and context for both decoders.
    for (key, ours, default) in [
        ("width", config.text_width, Some(512)),
        ("heads", config.text_heads, Some(8)),
        ("vocab_size", config.vocab_size, Some(49408)),
        ("context_length", config.context_length, Some(77)),
    ] {
        let theirs = field("multimodal_cfg", &multimodal, key, default)?;
        if theirs != ours {
            return Err(error(
                &format!("multimodal_cfg.{key}"),
                format!("{theirs} differs from text_cfg.{key} = {ours}; coca's decoders share it"),
            ));
        }
    }
    if ratio("multimodal_cfg", &multimodal, config.text_width)? != config.text_mlp {
        return Err(error(
            "multimodal_cfg.mlp_ratio",
            "differs from text_cfg.mlp_ratio; coca's decoders share it".into(),
        ));
    }
    config
        .validate()
        .map_err(|e| error("(the configuration)", e.to_string()))?;
    Ok(config)
}

fn uint(value: Option<&Value>, default: Option<usize>) -> Result<usize, String> {
    match (value, default) {
        (None, Some(default)) => Ok(default),
        (None, None) => Err("missing".into()),
        (Some(value), _) => value
            .as_u64()
            .map(|v| v as usize)
            .ok_or_else(|| format!("{value} is not a whole number")),
    }
}

/// open_clip's model JSON of an open_clip-architecture configuration.
pub fn config_to_json(config: &ModelConfig) -> Value {
    json!({
        "embed_dim": config.embed_dim,
        "vision_cfg": {
            "image_size": config.image_size,
            "layers": config.vision_layers,
            "width": config.vision_width,
            "head_width": config.vision_width / config.vision_heads,
            "mlp_ratio": config.vision_mlp as f64 / config.vision_width as f64,
            "patch_size": config.patch_size,
            "attentional_pool": true,
            "attn_pooler_queries": config.caption_queries + 1,
            "attn_pooler_heads": config.pooler_heads,
            "output_tokens": true
        },
        "text_cfg": {
            "context_length": config.context_length,
            "vocab_size": config.vocab_size,
            "width": config.text_width,
            "heads": config.text_heads,
            "layers": config.unimodal_layers,
            "mlp_ratio": config.text_mlp as f64 / config.text_width as f64,
            "embed_cls": true,
            "output_tokens": true
        },
        "multimodal_cfg": {
            "context_length": config.context_length,
            "vocab_size": config.vocab_size,
            "width": config.text_width,
            "heads": config.text_heads,
            "layers": config.multimodal_layers,
            "mlp_ratio": config.text_mlp as f64 / config.text_width as f64
        },
        "custom_text": true
    })
}

/// How an open_clip tensor holds ours.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Layout {
    Same,
    /// A torch Linear weight: [out, in] to our [in, out].
    Transposed,
    /// The patch convolution [width, channels, p, p] to our [channels p p, width].
    Convolution {
        channels: usize,
    },
    /// A 0-dimensional tensor to our [1].
    Scalar,
    /// `in_proj_weight`: our three [in, w] weights, each transposed, stacked to [3w, in].
    Stacked,
    /// `in_proj_bias`: our three [w] biases, concatenated.
    Concatenated,
}

/// One open_clip tensor and the tensors of ours it holds.
#[derive(Debug, Clone)]
struct Rule {
    name: String,
    ours: Vec<String>,
    layout: Layout,
}

/// Every tensor of open_clip's CoCa state dict for `config`.
fn rules(config: &ModelConfig) -> Vec<Rule> {
    let mut rules = Rules(Vec::new());
    rules.one(
        "visual.conv1.weight",
        "image_encoder.patch_embedding.weight",
        Layout::Convolution {
            channels: config.channels,
        },
    );
    rules.one("visual.class_embedding", "image_encoder.class_token", Layout::Same);
    rules.one(
        "visual.positional_embedding",
        "image_encoder.position_embedding",
        Layout::Same,
    );
    rules.norm("visual.ln_pre", "image_encoder.ln_pre");
    for i in 0..config.vision_layers {
        rules.block(
            &format!("visual.transformer.resblocks.{i}"),
            &format!("image_encoder.blocks.{i}"),
        );
    }
    rules.norm("visual.attn_pool.ln_k", "image_encoder.ln_final");
    rules.one("visual.attn_pool.query", "caption_pooler.queries", Layout::Same);
    rules.norm("visual.attn_pool.ln_q", "caption_pooler.query_norm");
    // torch packs the projections only when keys and queries are as wide.
    let packed = config.vision_width == config.pooler_width();
    rules.attention("visual.attn_pool.attn", "caption_pooler.attn", packed);
    rules.norm("visual.ln_post", "caption_pooler.ln");
    rules.one("visual.proj", "image_projection.weight", Layout::Same);
    rules.one("text.token_embedding.weight", "text_embedding.token", Layout::Same);
    rules.one("text.positional_embedding", "text_embedding.position", Layout::Same);
    rules.one("text.cls_emb", "unimodal.cls", Layout::Same);
    for i in 0..config.unimodal_layers {
        rules.block(
            &format!("text.transformer.resblocks.{i}"),
            &format!("unimodal.blocks.{i}"),
        );
    }
    rules.norm("text.ln_final", "unimodal.ln_final");
    rules.one("text.text_projection", "unimodal.projection.weight", Layout::Same);
    for i in 0..config.multimodal_layers {
        let (theirs, cross, ours) = (
            format!("text_decoder.resblocks.{i}"),
            format!("text_decoder.cross_attn.{i}"),
            format!("multimodal.blocks.{i}"),
        );
        rules.norm(&format!("{theirs}.ln_1"), &format!("{ours}.ln_self"));
        rules.attention(&format!("{theirs}.attn"), &format!("{ours}.self_attn"), true);
        rules.norm(&format!("{theirs}.ln_2"), &format!("{ours}.ln_self_mlp"));
        rules.linear(&format!("{theirs}.mlp.c_fc"), &format!("{ours}.self_mlp.fc"));
        rules.linear(&format!("{theirs}.mlp.c_proj"), &format!("{ours}.self_mlp.proj"));
        rules.norm(&format!("{cross}.ln_1"), &format!("{ours}.ln_cross"));
        rules.norm(&format!("{cross}.ln_1_kv"), &format!("{ours}.ln_image"));
        rules.attention(&format!("{cross}.attn"), &format!("{ours}.cross_attn"), true);
        rules.norm(&format!("{cross}.ln_2"), &format!("{ours}.ln_mlp"));
        rules.linear(&format!("{cross}.mlp.c_fc"), &format!("{ours}.mlp.fc"));
        rules.linear(&format!("{cross}.mlp.c_proj"), &format!("{ours}.mlp.proj"));
    }
    rules.norm("text_decoder.ln_final", "multimodal.ln_final");
    rules.one(
        "text_decoder.text_projection",
        "vocab_projection.untied.weight",
        Layout::Same,
    );
    rules.one("logit_scale", "logit_scale", Layout::Scalar);
    rules.0
}

struct Rules(Vec<Rule>);

impl Rules {
    fn push(&mut self, theirs: String, ours: Vec<String>, layout: Layout) {
        self.0.push(Rule {
            name: theirs,
            ours,
            layout,
        });
    }

    fn one(&mut self, theirs: &str, ours: &str, layout: Layout) {
        self.push(theirs.into(), vec![ours.into()], layout);
    }

    fn norm(&mut self, theirs: &str, ours: &str) {
        self.one(&format!("{theirs}.weight"), &format!("{ours}.gamma"), Layout::Same);
        self.one(&format!("{theirs}.bias"), &format!("{ours}.beta"), Layout::Same);
    }

    fn linear(&mut self, theirs: &str, ours: &str) {
        self.one(
            &format!("{theirs}.weight"),
            &format!("{ours}.weight"),
            Layout::Transposed,
        );
        self.one(&format!("{theirs}.bias"), &format!("{ours}.bias"), Layout::Same);
    }

    /// torch's `nn.MultiheadAttention`: packed `in_proj_weight`, or one
    /// weight per projection when the keys are of another width.
    fn attention(&mut self, theirs: &str, ours: &str, packed: bool) {
        let parts = |suffix: &str| ["q", "k", "v"].map(|p| format!("{ours}.{p}.{suffix}")).to_vec();
        if packed {
            self.push(format!("{theirs}.in_proj_weight"), parts("weight"), Layout::Stacked);
        } else {
            for p in ["q", "k", "v"] {
                self.one(
                    &format!("{theirs}.{p}_proj_weight"),
                    &format!("{ours}.{p}.weight"),
                    Layout::Transposed,
                );
            }
        }
        self.push(format!("{theirs}.in_proj_bias"), parts("bias"), Layout::Concatenated);
        self.linear(&format!("{theirs}.out_proj"), &format!("{ours}.out"));
    }

    /// open_clip's `ResidualAttentionBlock`.
    fn block(&mut self, theirs: &str, ours: &str) {
        self.norm(&format!("{theirs}.ln_1"), &format!("{ours}.ln_attn"));
        self.attention(&format!("{theirs}.attn"), &format!("{ours}.attn"), true);
        self.norm(&format!("{theirs}.ln_2"), &format!("{ours}.ln_mlp"));
        self.linear(&format!("{theirs}.mlp.c_fc"), &format!("{ours}.mlp.fc"));
        self.linear(&format!("{theirs}.mlp.c_proj"), &format!("{ours}.mlp.proj"));
    }
}

/// open_clip's shape of a rule's tensor, from the shape of (each of) ours.
fn their_shape(layout: Layout, ours: &[usize], parts: usize) -> Vec<usize> {
    match layout {
        Layout::Same => ours.to_vec(),
        Layout::Transposed => vec![ours[1], ours[0]],
        Layout::Convolution { channels } => {
            let side = ((ours[0] / channels) as f64).sqrt().round() as usize;
            vec![ours[1], channels, side, side]
        }
        Layout::Scalar => Vec::new(),
        Layout::Stacked => vec![parts * ours[1], ours[0]],
        Layout::Concatenated => vec![parts * ours[0]],
    }
}

/// [rows, cols] row-major to [cols, rows].
fn transpose(values: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0; values.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = values[r * cols + c];
        }
    }
    out
}

/// Part `part` of a rule's open_clip tensor (`theirs`), as ours of `shape`.
fn to_ours(layout: Layout, part: usize, theirs: &[f32], shape: &[usize]) -> Vec<f32> {
    let len: usize = shape.iter().product();
    match layout {
        Layout::Same | Layout::Scalar => theirs.to_vec(),
        // Ours [in, out] from theirs [out, in] (the convolution flattened to [width, c p p]).
        Layout::Transposed | Layout::Convolution { .. } => transpose(theirs, shape[1], shape[0]),
        Layout::Stacked => transpose(&theirs[part * len..(part + 1) * len], shape[1], shape[0]),
        Layout::Concatenated => theirs[part * len..(part + 1) * len].to_vec(),
    }
}

/// A rule's open_clip tensor from ours (each with its shape).
fn to_theirs(layout: Layout, ours: &[(&[usize], &[f32])]) -> Vec<f32> {
    match layout {
        Layout::Same | Layout::Scalar => ours[0].1.to_vec(),
        Layout::Transposed | Layout::Convolution { .. } => transpose(ours[0].1, ours[0].0[0], ours[0].0[1]),
        Layout::Stacked => ours
            .iter()
            .flat_map(|(shape, values)| transpose(values, shape[0], shape[1]))
            .collect(),
        Layout::Concatenated => ours.iter().flat_map(|(_, values)| values.iter().copied()).collect(),
    }
}

/// Reads a tensor as f32 (open_clip checkpoints come in f32, f16 and bf16).
fn read_f32(view: &safetensors::tensor::TensorView<'_>) -> Result<Vec<f32>, String> {
    let bytes = view.data();
    match view.dtype() {
        Dtype::F32 => Ok(bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect()),
        Dtype::F16 => Ok(bytes
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect()),
        Dtype::BF16 => Ok(bytes
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect()),
        other => Err(format!("dtype {other:?}; coca reads F32, F16 and BF16")),
    }
}

/// A model of `config` (open_clip's architecture) holding open_clip's
/// state dict `weights` (safetensors bytes; `origin` names it in errors).
/// Names may carry the `module.` prefix of open_clip's training
/// checkpoints. Every tensor must have its place, with its shape.
pub fn import<B: Backend>(
    config: &ModelConfig,
    weights: &[u8],
    origin: &str,
    device: &B::Device,
) -> Result<CocaModel<B>, OpenClipError> {
    if config.architecture != Architecture::OpenClip {
        return Err(OpenClipError::Config {
            origin: origin.to_string(),
            field: "architecture".into(),
            message: "open_clip's checkpoints need architecture = \"open_clip\"".into(),
        });
    }
    let file = SafeTensors::deserialize(weights).map_err(|e| OpenClipError::Format {
        origin: origin.to_string(),
        message: e.to_string(),
    })?;
    let names: HashMap<String, String> = file
        .names()
        .into_iter()
        .map(|name| {
            (
                name.strip_prefix("module.").unwrap_or(name).to_string(),
                name.to_string(),
            )
        })
        .collect();
    if !names.contains_key("text.cls_emb") && !names.keys().any(|n| n.starts_with("text_decoder.")) {
        return Err(OpenClipError::NotCoca {
            origin: origin.to_string(),
        });
    }
    let rules = rules(config);
    let by_ours: HashMap<&str, (usize, usize)> = rules
        .iter()
        .enumerate()
        .flat_map(|(r, rule)| {
            rule.ours
                .iter()
                .enumerate()
                .map(move |(p, ours)| (ours.as_str(), (r, p)))
        })
        .collect();
    let tensor_error = |name: &str, message: String| OpenClipError::Tensor {
        origin: origin.to_string(),
        name: name.to_string(),
        message,
    };
    let lookup = |path: &str, shape: &[usize]| -> Result<Vec<f32>, OpenClipError> {
        let &(r, part) = by_ours
            .get(path)
            .unwrap_or_else(|| panic!("open_clip's layout maps every parameter; {path} is missing from it"));
        let rule = &rules[r];
        let stored = names.get(&rule.name).ok_or_else(|| {
            tensor_error(
                &rule.name,
                format!("missing, and the configuration's model has it (our {path})"),
            )
        })?;
        let view = file
            .tensor(stored)
            .map_err(|e| tensor_error(&rule.name, e.to_string()))?;
        let wanted = their_shape(rule.layout, shape, rule.ours.len());
        let found = view.shape().to_vec();
        // A scalar saved as [1] is the same scalar.
        if found != wanted && !(rule.layout == Layout::Scalar && found == [1]) {
            return Err(tensor_error(
                &rule.name,
                format!("shape {found:?}, the configuration wants {wanted:?} (our {path} is {shape:?})"),
            ));
        }
        let values = read_f32(&view).map_err(|m| tensor_error(&rule.name, m))?;
        Ok(to_ours(rule.layout, part, &values, shape))
    };
    let model = crate::inference::build(config, device, lookup)?;
    let known: BTreeSet<&str> = rules.iter().map(|rule| rule.name.as_str()).collect();
    let extra: Vec<&str> = names
        .iter()
        .filter(|(name, _)| !known.contains(name.as_str()))
        .map(|(_, stored)| stored.as_str())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    if !extra.is_empty() {
        return Err(OpenClipError::Unexpected {
            origin: origin.to_string(),
            count: extra.len(),
            names: extra.iter().take(8).copied().collect::<Vec<_>>().join(", ")
                + if extra.len() > 8 { ", ..." } else { "" },
        });
    }
    Ok(model)
}

/// One open_clip tensor: name, shape, f32 values.
pub type NamedTensor = (String, Vec<usize>, Vec<f32>);

/// open_clip's state dict of `config` from our tensors (`ours(path)`:
/// shape and values).
pub fn export<'a>(
    config: &ModelConfig,
    ours: impl Fn(&str) -> Option<(&'a [usize], &'a [f32])>,
) -> Result<Vec<NamedTensor>, String> {
    if config.architecture != Architecture::OpenClip {
        return Err(
            "only a model of architecture = \"open_clip\" has open_clip's layout (this one is the paper's)".into(),
        );
    }
    rules(config)
        .into_iter()
        .map(|rule| {
            let parts = rule
                .ours
                .iter()
                .map(|path| ours(path).ok_or_else(|| format!("the checkpoint has no tensor `{path}`")))
                .collect::<Result<Vec<_>, String>>()?;
            let shape = their_shape(rule.layout, parts[0].0, parts.len());
            Ok((rule.name, shape, to_theirs(rule.layout, &parts)))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Cpu;
    use crate::parameters::{named_parameters, parameter_values};

    fn small() -> ModelConfig {
        let mut config = Preset::Tiny.config();
        config.architecture = Architecture::OpenClip;
        config.pooler_layout = PoolerLayout::Shared;
        config.vision_width = 48;
        config.vision_heads = 3;
        config.vision_mlp = 96;
        config.validate().unwrap();
        config
    }

    #[test]
    fn every_parameter_has_exactly_one_place() {
        for config in [small(), named_config("coca_ViT-B-32").unwrap()] {
            let mut seen = BTreeSet::new();
            for rule in rules(&config) {
                for ours in rule.ours {
                    assert!(seen.insert(ours.clone()), "{ours} twice");
                }
            }
            if config == small() {
                let model = CocaModel::<Cpu>::new(&config, 1, &Default::default());
                let paths: BTreeSet<String> = named_parameters(&model).into_iter().map(|(path, _, _)| path).collect();
                assert_eq!(seen, paths);
            }
        }
    }

    #[test]
    fn the_configuration_json_round_trips() {
        for config in [small(), Preset::OpenClipB32.config(), Preset::OpenClipL14.config()] {
            let json = config_to_json(&config).to_string();
            assert_eq!(config_from_json(&json, "x.json").unwrap(), config);
        }
    }

    #[test]
    fn open_clips_own_configurations_read_as_the_presets() {
        let b32 = r#"{"embed_dim": 512, "vision_cfg": {"image_size": 224, "layers": 12, "width": 768,
            "patch_size": 32, "attentional_pool": true, "attn_pooler_heads": 8, "output_tokens": true},
            "text_cfg": {"context_length": 76, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12,
            "embed_cls": true, "output_tokens": true}, "multimodal_cfg": {"context_length": 76,
            "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12, "attn_pooler_heads": 8},
            "custom_text": true}"#;
        assert_eq!(
            config_from_json(b32, "coca_ViT-B-32.json").unwrap(),
            Preset::OpenClipB32.config()
        );
    }

    #[test]
    fn unsupported_options_name_their_field() {
        let base = config_to_json(&small());
        let cases: [(&str, Value, &str); 5] = [
            (
                "/vision_cfg/attentional_pool",
                json!(false),
                "vision_cfg.attentional_pool",
            ),
            ("/text_cfg/correct_cls_mask", json!(true), "text_cfg.correct_cls_mask"),
            ("/multimodal_cfg/width", json!(64), "multimodal_cfg.width"),
            ("/vision_cfg/head_width", json!(5), "vision_cfg.head_width"),
            (
                "/vision_cfg/timm_model_name",
                json!("vit"),
                "vision_cfg.timm_model_name",
            ),
        ];
        for (pointer, value, field) in cases {
            let mut json = base.clone();
            let (parent, key) = pointer.rsplit_once('/').unwrap();
            json.pointer_mut(parent).unwrap()[key] = value;
            let error = config_from_json(&json.to_string(), "c.json").unwrap_err().to_string();
            assert!(error.starts_with(&format!("c.json: {field}: ")), "{error}");
        }
    }

    #[test]
    fn export_then_import_is_the_identity() {
        let config = small();
        let device = Default::default();
        let model = CocaModel::<Cpu>::new(&config, 7, &device);
        let values = parameter_values(&model);
        let tensors = named_parameters(&model);
        let by_path: HashMap<&str, (&[usize], &[f32])> = tensors
            .iter()
            .map(|(path, shape, values)| (path.as_str(), (shape.as_slice(), values.as_slice())))
            .collect();
        let theirs = export(&config, |path| by_path.get(path).copied()).unwrap();
        let bytes: Vec<Vec<u8>> = theirs
            .iter()
            .map(|(_, _, v)| bytemuck::cast_slice(v).to_vec())
            .collect();
        let views = theirs
            .iter()
            .zip(&bytes)
            .map(|((name, shape, _), data)| {
                (
                    name.clone(),
                    safetensors::tensor::TensorView::new(Dtype::F32, shape.clone(), data).unwrap(),
                )
            })
            .collect::<Vec<_>>();
        let file = safetensors::serialize(views, None).unwrap();
        let again = import::<Cpu>(&config, &file, "exported", &device).unwrap();
        assert_eq!(parameter_values(&again), values);

        // The paper's layout has no open_clip counterpart.
        let error = export(&Preset::Tiny.config(), |path| by_path.get(path).copied()).unwrap_err();
        assert!(
            error.starts_with("only a model of architecture = \"open_clip\""),
            "{error}"
        );
    }
}
