//! The manifest as written: every key optional, unknown keys refused.
//! serde reads the types; the manifest module applies the defaults and the
//! rules between fields.

use std::ops::Range;

use serde::de::{self, Visitor};
use serde::Deserialize;
use serde_path_to_error::Segment;

use super::choice::{AutotuneLevel, Backend, CollectiveKind, Contrastive, Precision, Schedule, SourceFormat};
use crate::dataset::DatasetKind;
use crate::model::closest;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ManifestFile {
    #[serde(default)]
    pub job: JobFile,
    /// `preset` and the preset's fields to override, read by `ModelConfig::resolve`.
    pub model: Option<toml::Table>,
    #[serde(default)]
    pub data: DataFile,
    #[serde(default)]
    pub train: TrainFile,
    #[serde(default)]
    pub cluster: ClusterFile,
    pub checkpoint: Option<CheckpointFile>,
    pub eval: Option<EvalFile>,
    #[serde(default)]
    pub gpu: GpuFile,
    #[serde(default)]
    pub status: StatusFile,
    #[serde(default)]
    pub logging: LoggingFile,
    #[serde(default)]
    pub auth: AuthFile,
    #[serde(default)]
    pub recovery: RecoveryFile,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct JobFile {
    pub name: Option<String>,
    pub seed: Option<u64>,
    pub steps: Option<u64>,
    pub epochs: Option<f64>,
    pub dir: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct DataFile {
    pub source: Option<Vec<SourceFile>>,
    pub tokenizer: Option<String>,
    pub demo: Option<String>,
    pub loader_threads: Option<usize>,
    pub prefetch_batches: Option<usize>,
    pub max_bad_fraction: Option<f64>,
    pub max_image_pixels: Option<u64>,
    pub streams: Option<usize>,
    pub accept_refetching: Option<bool>,
    pub shuffle_window: Option<usize>,
    pub shard_memory_bytes: Option<u64>,
    pub fetch_ahead_bytes: Option<u64>,
    pub cache_dir: Option<String>,
    pub cache_bytes: Option<u64>,
    pub s3_endpoint: Option<String>,
    pub s3_region: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct SourceFile {
    pub url: Option<String>,
    pub kind: Option<DatasetKind>,
    pub format: Option<SourceFormat>,
    pub classes: Option<String>,
    pub weight: Option<f64>,
    pub templates: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct TrainFile {
    pub global_batch: Option<usize>,
    pub learning_rate: Option<f64>,
    pub warmup_steps: Option<u64>,
    pub schedule: Option<Schedule>,
    pub end_learning_rate: Option<f64>,
    pub beta1: Option<f64>,
    pub beta2: Option<f64>,
    pub weight_decay: Option<f64>,
    pub eps: Option<f64>,
    pub lambda_con: Option<f64>,
    pub lambda_cap: Option<f64>,
    pub contrastive: Option<Contrastive>,
    pub precision: Option<Precision>,
    pub accumulation: Option<usize>,
    pub grad_clip_norm: Option<f64>,
    pub patch_dropout: Option<f64>,
    pub shard_optimizer: Option<bool>,
    pub activation_checkpointing: Option<bool>,
    pub lock_image: Option<bool>,
    pub lock_image_unlocked_groups: Option<usize>,
    pub lock_text: Option<bool>,
    pub lock_text_unlocked_groups: Option<usize>,
    pub image_layer_decay: Option<f64>,
    pub text_layer_decay: Option<f64>,
    pub ema_decay: Option<f64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ClusterFile {
    pub workers: Option<usize>,
    pub backend: Option<Backend>,
    pub collective: Option<CollectiveKind>,
    pub coordinator: Option<String>,
    pub worker_host: Option<String>,
    pub heartbeat_ms: Option<u64>,
    pub heartbeat_timeout_ms: Option<u64>,
    pub replicas: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct CheckpointFile {
    pub url: Option<String>,
    pub every: Option<u64>,
    pub keep: Option<usize>,
    pub save_retry_seconds: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct EvalFile {
    pub every: Option<u64>,
    pub zeroshot: Option<String>,
    pub retrieval: Option<String>,
    pub templates: Option<String>,
    pub limit: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct GpuFile {
    pub autotune: Option<AutotuneLevel>,
    pub kernel_cache: Option<String>,
    pub log_compilations: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct StatusFile {
    pub bind: Option<String>,
    pub public: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct LoggingFile {
    pub tensorboard: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct AuthFile {
    pub token_env: Option<String>,
    pub token_file: Option<String>,
    pub tls_cert: Option<String>,
    pub tls_key: Option<String>,
    pub tls_ca: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RecoveryFile {
    pub max_restarts: Option<u32>,
    pub min_workers: Option<usize>,
    pub replacement_timeout_ms: Option<u64>,
}

/// What serde could not read: the field path (empty for a syntax error),
/// what is wrong, and where in the text.
#[derive(Debug)]
pub(super) struct ReadError {
    pub field: String,
    pub message: String,
    pub span: Option<Range<usize>>,
}

impl ManifestFile {
    pub fn read(text: &str) -> Result<Self, ReadError> {
        serde_path_to_error::deserialize(toml::Deserializer::new(text)).map_err(|error| {
            let segments: Vec<Segment> = error.path().iter().cloned().collect();
            let field = field_path(&segments);
            let inner = error.into_inner();
            let message = match segments.split_last() {
                Some((Segment::Map { key }, parent)) => unknown_key(key, parent),
                _ => None,
            };
            ReadError {
                field,
                // toml's messages may run over lines ("invalid table header\nexpected ...").
                message: message.unwrap_or_else(|| inner.message().trim().lines().collect::<Vec<_>>().join("; ")),
                span: inner.span(),
            }
        })
    }
}

/// `data.source[1].url` from serde_path_to_error's segments.
fn field_path(segments: &[Segment]) -> String {
    let mut path = String::new();
    for segment in segments {
        match segment {
            Segment::Seq { index } => path.push_str(&format!("[{index}]")),
            Segment::Map { key } => {
                if !path.is_empty() {
                    path.push('.');
                }
                path.push_str(key);
            }
            Segment::Enum { .. } | Segment::Unknown => {}
        }
    }
    path
}

/// When `key` is not one the table at `parent` reads: what to say, with the
/// closest known key suggested.
fn unknown_key(key: &str, parent: &[Segment]) -> Option<String> {
    let table: Vec<&str> = parent
        .iter()
        .filter_map(|segment| match segment {
            Segment::Map { key } => Some(key.as_str()),
            _ => None,
        })
        .collect();
    let known = match table.as_slice() {
        [] => keys_of::<ManifestFile>(),
        ["job"] => keys_of::<JobFile>(),
        ["data"] => keys_of::<DataFile>(),
        ["data", "source"] => keys_of::<SourceFile>(),
        ["train"] => keys_of::<TrainFile>(),
        ["cluster"] => keys_of::<ClusterFile>(),
        ["checkpoint"] => keys_of::<CheckpointFile>(),
        ["eval"] => keys_of::<EvalFile>(),
        ["gpu"] => keys_of::<GpuFile>(),
        ["status"] => keys_of::<StatusFile>(),
        ["logging"] => keys_of::<LoggingFile>(),
        ["auth"] => keys_of::<AuthFile>(),
        ["recovery"] => keys_of::<RecoveryFile>(),
        _ => return None,
    };
    if known.contains(&key) {
        return None;
    }
    Some(match (table.is_empty(), closest(key, known)) {
        (true, Some(near)) => format!("unknown section; did you mean `[{near}]`?"),
        (true, None) => format!("unknown section; sections: {}", known.join(", ")),
        (false, Some(near)) => format!("unknown key; did you mean `{near}`?"),
        (false, None) => format!("unknown key; known keys: {}", known.join(", ")),
    })
}

/// The keys serde reads into the struct `T`, as its derive declares them.
fn keys_of<T: for<'de> Deserialize<'de>>() -> &'static [&'static str] {
    let mut keys: &'static [&'static str] = &[];
    let _ = T::deserialize(KeyCapture(&mut keys));
    keys
}

/// A deserializer that only records the field names a struct asks for.
struct KeyCapture<'a>(&'a mut &'static [&'static str]);

impl<'de> de::Deserializer<'de> for KeyCapture<'_> {
    type Error = de::value::Error;

    fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
        Err(de::Error::custom("only a struct's keys are read"))
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        fields: &'static [&'static str],
        _: V,
    ) -> Result<V::Value, Self::Error> {
        *self.0 = fields;
        Err(de::Error::custom("only a struct's keys are read"))
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        option unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier ignored_any
    }
}
