//! The CoCa model's shape: named presets (data, not code branches), field
//! overrides from the manifest's `[model]` table, validation, and parameter
//! arithmetic.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// How the image tokens are pooled for the two heads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PoolerLayout {
    /// The paper's layout: a 1-query pooler for the contrastive embedding and
    /// a separate `caption_queries`-query pooler for the decoder.
    Parallel,
    /// open_clip's default: one pooler with `1 + caption_queries` queries; the
    /// first output is the contrastive embedding, the rest feed the decoder.
    Shared,
}

/// Which CoCa network a configuration builds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Architecture {
    /// The paper's (Yu et al. 2022): what coca trains from scratch.
    #[default]
    Paper,
    /// open_clip's CoCa, so that its checkpoints import exactly: the ViT
    /// has a class token, a LayerNorm before its blocks and no patch bias;
    /// the pooler works in `embed_dim` and normalises its queries; every
    /// attention has a key bias; the text CLS has a position of its own and
    /// open_clip's padding mask (shifted one position right); a multimodal
    /// layer is a self-attention block and a cross-attention block (with a
    /// LayerNorm on the image tokens), each with its own MLP, and reads the
    /// unimodal states before their final LayerNorm.
    OpenClip,
}

impl Architecture {
    fn is_paper(&self) -> bool {
        *self == Architecture::Paper
    }
}

/// Every dimension of a CoCa model. Any field may be overridden from the
/// manifest's `[model]` table; `validate` runs once at the edge.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Absent from the JSON of paper models, so their checkpoints from
    /// before the field resume unchanged.
    #[serde(default, skip_serializing_if = "Architecture::is_paper")]
    pub architecture: Architecture,
    pub image_size: usize,
    pub patch_size: usize,
    pub channels: usize,
    pub vision_width: usize,
    pub vision_layers: usize,
    pub vision_heads: usize,
    pub vision_mlp: usize,
    pub pooler_layout: PoolerLayout,
    pub pooler_heads: usize,
    /// Learned queries of the captioning pooler (the decoder's image tokens).
    pub caption_queries: usize,
    /// Width of the shared image-text embedding space.
    pub embed_dim: usize,
    pub text_width: usize,
    pub text_heads: usize,
    pub text_mlp: usize,
    pub unimodal_layers: usize,
    pub multimodal_layers: usize,
    pub vocab_size: usize,
    /// Text tokens per sample, before the CLS token is appended.
    pub context_length: usize,
    /// Share the token embedding with the vocabulary projection.
    pub tie_embeddings: bool,
    pub layer_norm_eps: f64,
}

/// The named configurations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Preset {
    /// For tests: builds and steps in milliseconds.
    Tiny,
    /// The configuration compared against open_clip in `coca bench step`.
    Bench,
    /// CoCa-Base (paper Table 1, 383M parameters).
    Base,
    /// CoCa-Large (787M).
    Large,
    /// CoCa (2.1B).
    Giant,
    /// open_clip's `coca_ViT-B-32` (253M), for its checkpoints.
    OpenClipB32,
    /// open_clip's `coca_ViT-L-14` (638M).
    OpenClipL14,
}

impl Preset {
    pub const ALL: [Preset; 7] = [
        Preset::Tiny,
        Preset::Bench,
        Preset::Base,
        Preset::Large,
        Preset::Giant,
        Preset::OpenClipB32,
        Preset::OpenClipL14,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Preset::Tiny => "tiny",
            Preset::Bench => "bench",
            Preset::Base => "base",
            Preset::Large => "large",
            Preset::Giant => "giant",
            Preset::OpenClipB32 => "coca_vit_b_32",
            Preset::OpenClipL14 => "coca_vit_l_14",
        }
    }

    /// The preset's configuration, from `presets.toml`.
    pub fn config(self) -> ModelConfig {
        decode(&self.table()).expect("every preset in presets.toml has every field")
    }

    /// The preset's table in `presets.toml`.
    fn table(self) -> toml::Table {
        let presets: toml::Table = PRESETS.parse().expect("presets.toml is valid TOML");
        presets[self.name()]
            .as_table()
            .expect("every preset has a table")
            .clone()
    }
}

const PRESETS: &str = include_str!("presets.toml");

impl fmt::Display for Preset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Preset {
    type Err = ModelConfigError;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        Preset::ALL
            .into_iter()
            .find(|preset| preset.name() == name)
            .ok_or_else(|| ModelConfigError::UnknownPreset(name.to_string()))
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ModelConfigError {
    #[error("unknown model preset `{0}` (known: {known})", known = Preset::ALL.map(Preset::name).join(", "))]
    UnknownPreset(String),
    #[error("model.{field}: {message}")]
    Invalid { field: &'static str, message: String },
    #[error("model.{key}: {message}")]
    Override { key: String, message: String },
}

impl ModelConfigError {
    /// The manifest field it is about, and what is wrong with it.
    pub fn field_and_message(&self) -> (String, String) {
        match self {
            Self::UnknownPreset(_) => ("model.preset".into(), self.to_string()),
            Self::Invalid { field, message } => (format!("model.{field}"), message.clone()),
            Self::Override { key, message } => (format!("model.{key}"), message.clone()),
        }
    }
}

fn decode(table: &toml::Table) -> Result<ModelConfig, String> {
    toml::Value::Table(table.clone())
        .try_into()
        .map_err(|error: toml::de::Error| error.message().trim().to_string())
}

fn invalid(field: &'static str, message: impl Into<String>) -> ModelConfigError {
    ModelConfigError::Invalid {
        field,
        message: message.into(),
    }
}

impl ModelConfig {
    /// A preset with `overrides` (the manifest's `[model]` keys other than
    /// `preset`) applied on top, then validated.
    pub fn resolve(preset: Preset, overrides: &toml::Table) -> Result<Self, ModelConfigError> {
        let mut merged = preset.table();
        for (key, value) in overrides {
            if !merged.contains_key(key) {
                let known: Vec<&str> = merged.keys().map(String::as_str).collect();
                return Err(ModelConfigError::Override {
                    key: key.clone(),
                    message: match closest(key, &known) {
                        Some(near) => format!("unknown field; did you mean `{near}`?"),
                        None => "unknown field".into(),
                    },
                });
            }
            merged.insert(key.clone(), value.clone());
            // Decoding after each key pins a type error on the key that caused it.
            decode(&merged).map_err(|message| ModelConfigError::Override {
                key: key.clone(),
                message,
            })?;
        }
        let config = decode(&merged).map_err(|message| ModelConfigError::Override {
            key: "preset".into(),
            message,
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks the relations between fields; errors name the field.
    pub fn validate(&self) -> Result<(), ModelConfigError> {
        let positive = [
            ("image_size", self.image_size),
            ("patch_size", self.patch_size),
            ("channels", self.channels),
            ("vision_width", self.vision_width),
            ("vision_heads", self.vision_heads),
            ("vision_mlp", self.vision_mlp),
            ("pooler_heads", self.pooler_heads),
            ("caption_queries", self.caption_queries),
            ("embed_dim", self.embed_dim),
            ("text_width", self.text_width),
            ("text_heads", self.text_heads),
            ("text_mlp", self.text_mlp),
            ("vocab_size", self.vocab_size),
            ("context_length", self.context_length),
        ];
        for (field, value) in positive {
            if value == 0 {
                return Err(invalid(field, "must be at least 1"));
            }
        }
        if self.image_size % self.patch_size != 0 {
            return Err(invalid(
                "patch_size",
                format!("{} does not divide image_size = {}", self.patch_size, self.image_size),
            ));
        }
        for (field, heads, width_field, width) in [
            ("vision_heads", self.vision_heads, "vision_width", self.vision_width),
            ("pooler_heads", self.pooler_heads, "vision_width", self.vision_width),
            ("text_heads", self.text_heads, "text_width", self.text_width),
        ] {
            if width % heads != 0 {
                return Err(invalid(
                    field,
                    format!("{heads} does not divide {width_field} = {width}"),
                ));
            }
        }
        if self.context_length < 2 {
            return Err(invalid(
                "context_length",
                "must be at least 2 (captioning predicts each next token)",
            ));
        }
        if !(self.layer_norm_eps > 0.0 && self.layer_norm_eps.is_finite()) {
            return Err(invalid("layer_norm_eps", "must be a positive number"));
        }
        if self.architecture == Architecture::OpenClip {
            let open_clip =
                |field, message: String| invalid(field, format!("{message} (architecture = \"open_clip\")"));
            if self.pooler_layout != PoolerLayout::Shared {
                return Err(open_clip("pooler_layout", "must be \"shared\"".into()));
            }
            if self.embed_dim != self.text_width {
                return Err(open_clip(
                    "embed_dim",
                    format!(
                        "{} must equal text_width = {}: the decoder attends to pooled image tokens of embed_dim",
                        self.embed_dim, self.text_width
                    ),
                ));
            }
            if self.embed_dim % self.pooler_heads != 0 {
                return Err(open_clip(
                    "pooler_heads",
                    format!("{} does not divide embed_dim = {}", self.pooler_heads, self.embed_dim),
                ));
            }
            if self.tie_embeddings {
                return Err(open_clip("tie_embeddings", "must be false".into()));
            }
        }
        Ok(())
    }

    fn open_clip(&self) -> bool {
        self.architecture == Architecture::OpenClip
    }

    /// Width of the poolers' queries and outputs.
    pub fn pooler_width(&self) -> usize {
        if self.open_clip() {
            self.embed_dim
        } else {
            self.vision_width
        }
    }

    /// Whether attention projects keys with a bias (softmax cancels it;
    /// open_clip's checkpoints carry one).
    pub fn key_bias(&self) -> bool {
        self.open_clip()
    }

    /// Rows of the image encoder's position embedding: a patch each, and
    /// the class token's.
    pub fn image_positions(&self) -> usize {
        self.image_tokens() + usize::from(self.open_clip())
    }

    /// Rows of the text position embedding: a token each, and the CLS's.
    pub fn text_positions(&self) -> usize {
        self.context_length + usize::from(self.open_clip())
    }

    pub fn image_tokens(&self) -> usize {
        let side = self.image_size / self.patch_size;
        side * side
    }

    /// Parameter counts per part, from the shapes the worker builds (a worker
    /// test checks this arithmetic against the built module).
    pub fn param_counts(&self) -> ParamCounts {
        let layer_norm = |width: usize| 2 * width;
        let linear = |input: usize, output: usize, bias: bool| input * output + usize::from(bias) * output;
        let key_bias = self.key_bias();
        let cross_attention = |width: usize, context: usize| {
            // Query, key (a bias only where open_clip has one), value, output.
            linear(width, width, true)
                + linear(context, width, key_bias)
                + linear(context, width, true)
                + linear(width, width, true)
        };
        let self_attention = |width: usize| cross_attention(width, width);
        let mlp = |width: usize, hidden: usize| linear(width, hidden, true) + linear(hidden, width, true);
        let encoder_block =
            |width: usize, hidden: usize| 2 * layer_norm(width) + self_attention(width) + mlp(width, hidden);

        let (v, t) = (self.vision_width, self.text_width);
        let patch_dim = self.channels * self.patch_size * self.patch_size;
        let open_clip = self.open_clip();
        // open_clip: no patch bias; a class token and a LayerNorm before the blocks.
        let image_encoder = linear(patch_dim, v, !open_clip)
            + self.image_positions() * v
            + usize::from(open_clip) * (v + layer_norm(v))
            + self.vision_layers * encoder_block(v, self.vision_mlp)
            + layer_norm(v);

        let p = self.pooler_width();
        let query_norm = usize::from(open_clip) * layer_norm(p);
        let pooler = |queries: usize| queries * p + query_norm + cross_attention(p, v) + layer_norm(p);
        let poolers = match self.pooler_layout {
            PoolerLayout::Parallel => pooler(1) + pooler(self.caption_queries),
            PoolerLayout::Shared => pooler(1 + self.caption_queries),
        } + linear(p, self.embed_dim, false);

        // CLS token, blocks, final norm, text projection, logit scale.
        let unimodal = t
            + self.unimodal_layers * encoder_block(t, self.text_mlp)
            + layer_norm(t)
            + linear(t, self.embed_dim, false)
            + 1;
        // open_clip: a second MLP after the self-attention, a LayerNorm on the image tokens.
        let multimodal_block = 3 * layer_norm(t)
            + self_attention(t)
            + cross_attention(t, p)
            + mlp(t, self.text_mlp)
            + usize::from(open_clip) * (2 * layer_norm(t) + mlp(t, self.text_mlp));
        let multimodal = self.multimodal_layers * multimodal_block + layer_norm(t);
        let token_embedding = self.vocab_size * t;
        let vocab_projection = if self.tie_embeddings { 0 } else { t * self.vocab_size };
        let embeddings = token_embedding + self.text_positions() * t + vocab_projection;

        ParamCounts {
            image_encoder,
            poolers,
            unimodal,
            multimodal,
            embeddings,
        }
    }

    /// Floating-point operations of one training step on `batch` samples:
    /// 3 x the forward (the backward costs two forwards), where the forward
    /// is 2 x (elements x tokens through it) summed over every weight matrix
    /// plus 4 x query length x key length x width over every attention, and
    /// the contrastive logits of the whole batch. Embedding lookups, norms,
    /// softmax and activations are not counted; causal attention counts in
    /// full (its kernels compute the masked half). The same formula as the
    /// open_clip baseline script uses, on this model's shapes.
    pub fn training_flops(&self, batch: usize) -> f64 {
        let (v, t, e) = (self.vision_width as f64, self.text_width as f64, self.embed_dim as f64);
        let image_tokens = self.image_tokens() as f64;
        let queries = self.caption_queries as f64;
        // The unimodal tower sees the text and its CLS; the decoder predicts all but the first token.
        let (unimodal_tokens, decoder_tokens) = (self.context_length as f64 + 1.0, self.context_length as f64 - 1.0);
        // 2 x weight elements x tokens.
        let dense = |input: f64, output: f64, tokens: f64| 2.0 * input * output * tokens;
        let attention_scores = |queries: f64, keys: f64, width: f64| 4.0 * queries * keys * width;
        let attention = |width: f64, context: f64, queries: f64, keys: f64| {
            dense(width, width, queries) * 2.0
                + dense(context, width, keys) * 2.0
                + attention_scores(queries, keys, width)
        };
        let mlp = |width: f64, hidden: f64, tokens: f64| dense(width, hidden, tokens) + dense(hidden, width, tokens);
        let encoder_block =
            |width: f64, hidden: f64, tokens: f64| attention(width, width, tokens, tokens) + mlp(width, hidden, tokens);

        let patch_dim = (self.channels * self.patch_size * self.patch_size) as f64;
        let image = dense(patch_dim, v, image_tokens)
            + self.vision_layers as f64 * encoder_block(v, self.vision_mlp as f64, image_tokens);
        let pooler = |queries: f64| attention(v, v, queries, image_tokens);
        let poolers = match self.pooler_layout {
            PoolerLayout::Parallel => pooler(1.0) + pooler(queries),
            PoolerLayout::Shared => pooler(1.0 + queries),
        } + dense(v, e, 1.0);
        let unimodal =
            self.unimodal_layers as f64 * encoder_block(t, self.text_mlp as f64, unimodal_tokens) + dense(t, e, 1.0);
        let multimodal_block = attention(t, t, decoder_tokens, decoder_tokens)
            + attention(t, v, decoder_tokens, queries)
            + mlp(t, self.text_mlp as f64, decoder_tokens);
        let multimodal =
            self.multimodal_layers as f64 * multimodal_block + dense(t, self.vocab_size as f64, decoder_tokens);
        let per_sample = image + poolers + unimodal + multimodal;
        let batch = batch as f64;
        // Image-to-text and text-to-image logits over the whole batch.
        let contrastive_logits = 2.0 * dense(e, batch, batch);
        3.0 * (batch * per_sample + contrastive_logits)
    }
}

/// Parameters per part of the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ParamCounts {
    /// Patch embedding, positions, transformer blocks, final norm.
    pub image_encoder: usize,
    /// Attentional poolers and the image projection.
    pub poolers: usize,
    /// Unimodal blocks, CLS token, norm, text projection, logit scale.
    pub unimodal: usize,
    /// Multimodal blocks and final norm.
    pub multimodal: usize,
    /// Token and position embeddings, vocabulary projection.
    pub embeddings: usize,
}

impl ParamCounts {
    pub fn total(&self) -> usize {
        self.image_encoder + self.poolers + self.unimodal + self.multimodal + self.embeddings
    }

    /// The paper's "text decoder": everything on the text side.
    pub fn text_decoder(&self) -> usize {
        self.unimodal + self.multimodal + self.embeddings
    }
}

/// The candidate with the smallest edit distance to `word`, if it is close.
pub(crate) fn closest<'a>(word: &str, candidates: &[&'a str]) -> Option<&'a str> {
    candidates
        .iter()
        .map(|candidate| (edit_distance(word, candidate), *candidate))
        .filter(|(distance, candidate)| *distance <= candidate.len().max(word.len()) / 3 + 1)
        .min()
        .map(|(_, candidate)| candidate)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut current = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let substitution = previous[j] + usize::from(ca != *cb);
            current.push(substitution.min(previous[j + 1] + 1).min(current[j] + 1));
        }
        previous = current;
    }
    previous[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn within(actual: usize, paper: f64, tolerance: f64) -> bool {
        ((actual as f64 - paper) / paper).abs() <= tolerance
    }

    #[test]
    fn training_flops_follow_the_shapes() {
        // base at batch 64: the figure the open_clip baseline's formula gives on
        // this model's shapes (no class token, one MLP per decoder layer).
        let base = Preset::Base.config();
        let flops = base.training_flops(64);
        assert!((flops / 1.6544e13 - 1.0).abs() < 1e-3, "{flops:e}");
        // Linear in the batch, except the contrastive logits, which are quadratic.
        let logits = |batch: f64| 3.0 * 4.0 * batch * batch * base.embed_dim as f64;
        let per_sample = (flops - logits(64.0)) / 64.0;
        let doubled = base.training_flops(128);
        assert!((doubled - (128.0 * per_sample + logits(128.0))).abs() / doubled < 1e-12);
        // Roughly 6 x parameters x tokens: the weights dominate.
        let counts = base.param_counts();
        let six_nd = 6.0 * counts.image_encoder as f64 * base.image_tokens() as f64;
        assert!(per_sample > six_nd, "{per_sample:e} <= {six_nd:e}");
    }

    #[test]
    fn open_clip_presets_have_open_clips_parameter_counts() {
        // sum(p.numel() for p in open_clip.create_model(name).parameters()), open_clip 3.3.0.
        assert_eq!(Preset::OpenClipB32.config().param_counts().total(), 253_560_065);
        assert_eq!(Preset::OpenClipL14.config().param_counts().total(), 638_450_177);
    }

    #[test]
    fn presets_match_the_paper_within_two_percent() {
        // Paper Table 1: (total, image encoder, text decoder).
        for (preset, total, image, text) in [
            (Preset::Base, 383e6, 86e6, 297e6),
            (Preset::Large, 787e6, 303e6, 484e6),
            (Preset::Giant, 2.1e9, 1.0e9, 1.1e9),
        ] {
            let counts = preset.config().param_counts();
            assert!(
                within(counts.total(), total, 0.02),
                "{preset}: total {} vs {total}",
                counts.total()
            );
            // The parts are rounded in the paper (1.1B is anything in 1.05..1.15).
            assert!(
                within(counts.image_encoder, image, 0.05),
                "{preset}: image {}",
                counts.image_encoder
            );
            assert!(
                within(counts.text_decoder(), text, 0.05),
                "{preset}: text {}",
                counts.text_decoder()
            );
        }
    }

    #[test]
    fn every_preset_validates_and_round_trips_its_name() {
        let tables: toml::Table = PRESETS.parse().unwrap();
        let names: Vec<&str> = tables.keys().map(String::as_str).collect();
        let mut known: Vec<&str> = Preset::ALL.iter().map(|preset| preset.name()).collect();
        known.sort();
        assert_eq!(names, known, "presets.toml holds exactly the named presets");
        for preset in Preset::ALL {
            preset.config().validate().unwrap();
            assert_eq!(preset.name().parse::<Preset>().unwrap(), preset);
        }
        assert_eq!(
            "huge".parse::<Preset>(),
            Err(ModelConfigError::UnknownPreset("huge".into()))
        );
    }

    fn overrides(text: &str) -> toml::Table {
        text.parse().unwrap()
    }

    #[test]
    fn overrides_replace_fields() {
        let config = ModelConfig::resolve(
            Preset::Tiny,
            &overrides("vocab_size = 1000\npooler_layout = \"shared\""),
        )
        .unwrap();
        assert_eq!(config.vocab_size, 1000);
        assert_eq!(config.pooler_layout, PoolerLayout::Shared);
        assert_eq!(config.text_width, Preset::Tiny.config().text_width);
    }

    #[test]
    fn bad_overrides_name_the_field() {
        let cases = [
            (
                "vocab_sise = 10",
                "model.vocab_sise: unknown field; did you mean `vocab_size`?",
            ),
            ("patch_size = 7", "model.patch_size: 7 does not divide image_size = 32"),
            ("text_heads = 3", "model.text_heads: 3 does not divide text_width = 32"),
            (
                "pooler_heads = 5",
                "model.pooler_heads: 5 does not divide vision_width = 32",
            ),
            ("vision_heads = 0", "model.vision_heads: must be at least 1"),
            (
                "context_length = 1",
                "model.context_length: must be at least 2 (captioning predicts each next token)",
            ),
            (
                "layer_norm_eps = -1.0",
                "model.layer_norm_eps: must be a positive number",
            ),
        ];
        for (text, expected) in cases {
            let error = ModelConfig::resolve(Preset::Tiny, &overrides(text)).unwrap_err();
            assert_eq!(error.to_string(), expected, "for `{text}`");
        }
        let error = ModelConfig::resolve(Preset::Tiny, &overrides("vocab_size = \"big\"")).unwrap_err();
        assert!(
            error.to_string().starts_with("model.vocab_size:") && error.to_string().contains("invalid type"),
            "{error}"
        );
        let error = ModelConfig::resolve(Preset::Tiny, &overrides("pooler_layout = \"stacked\"")).unwrap_err();
        assert!(error.to_string().starts_with("model.pooler_layout:"), "{error}");
    }
}
