//! The checkpoint layout every part agrees on: step directories, shard
//! files, `meta.json` (written by rank 0) and `COMMITTED` (written last, by
//! the coordinator), and the manifest fields a resume must keep.
//!
//! ```text
//! <checkpoint url>/step-00001200/
//!     rank-00000-of-00004.safetensors   # a contiguous range of the flattened state
//!     meta.json
//!     COMMITTED
//! ```
//!
//! The flattened state is three sections of equal layout, one after the
//! other: the parameters, AdamW's first moments, AdamW's second moments,
//! each tensor in module visiting order. Rank r of N holds elements
//! `[r*T/N, (r+1)*T/N)` of it, so a checkpoint resumes on any world size.

use serde::{Deserialize, Serialize};

use contract::plan::JobPlan;
use contract::sample_order::SampleOrder;

pub const META: &str = "meta.json";
pub const COMMITTED: &str = "COMMITTED";
/// The tokenizer the step was trained with (rank 0 copies it), so a step
/// serves evaluation on its own.
pub const TOKENIZER: &str = "tokenizer.json";
/// The parameters' moving average, when the job keeps one (rank 0 writes it).
pub const EMA: &str = "ema.safetensors";
pub const FORMAT: &str = "coca-checkpoint";
pub const VERSION: u32 = 1;
/// The three sections of the flattened state, in order; tensor names in
/// the shard files are `<section>.<module path>`.
pub const SECTIONS: [&str; 3] = ["param", "adamw.m1", "adamw.m2"];

pub fn step_dir(step: u64) -> String {
    format!("step-{step:08}")
}

/// The step a directory name stands for, if it is a step directory.
pub fn parse_step_dir(name: &str) -> Option<u64> {
    let digits = name.trim_end_matches('/').strip_prefix("step-")?;
    (digits.len() == 8 && digits.bytes().all(|b| b.is_ascii_digit()))
        .then(|| digits.parse().ok())
        .flatten()
}

pub fn shard_file(rank: usize, world: usize) -> String {
    format!("rank-{rank:05}-of-{world:05}.safetensors")
}

/// Rank `rank`'s range of a flattened state of `total` elements.
pub fn shard_range(total: u64, rank: usize, world: usize) -> (u64, u64) {
    let at = |r: usize| (u128::from(total) * r as u128 / world as u128) as u64;
    (at(rank), at(rank + 1))
}

/// One tensor of the flattened state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorEntry {
    /// Module path, e.g. `image_encoder.blocks.3.attn.q.weight`.
    pub path: String,
    pub shape: Vec<usize>,
    pub dtype: String,
    /// Where the tensor starts within each section.
    pub offset: u64,
    /// Whether AdamW holds moments for it (a parameter of a head switched
    /// off never got a gradient; its moment sections hold zeros).
    pub optimizer_state: bool,
}

impl TensorEntry {
    pub fn len(&self) -> u64 {
        self.shape.iter().product::<usize>() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A shard file and the range of the flattened state it holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardRange {
    pub file: String,
    pub start: u64,
    pub end: u64,
}

/// `meta.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Meta {
    pub format: String,
    pub version: u32,
    pub step: u64,
    pub world_size: usize,
    /// AdamW's step count (its bias correction).
    pub optimizer_steps: u64,
    /// Per source: samples drawn so far (the data cursor), and the epochs
    /// that makes. The sample order is a function of (seed, step), so the
    /// step alone resumes it; these say where each source stands.
    pub source_samples: Vec<u64>,
    pub source_epochs: Vec<f64>,
    /// Every random draw is a counter-based function of the seed and the
    /// step/sample it serves; there is no other generator state.
    pub rng: RngState,
    pub resume: ResumeFields,
    pub tokenizer_sha256: String,
    pub software: String,
    /// Elements per section.
    pub section_len: u64,
    pub tensors: Vec<TensorEntry>,
    pub shards: Vec<ShardRange>,
    /// The step's EMA file, when the job keeps one (`train.ema_decay`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ema: Option<crate::ema::EmaRecord>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RngState {
    pub seed: u64,
    pub scheme: String,
}

/// `COMMITTED`: the shards the coordinator saw reported durable.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Committed {
    pub step: u64,
    pub committed_at: f64,
    pub shards: Vec<ShardRecord>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardRecord {
    pub file: String,
    pub bytes: u64,
    pub sha256: String,
}

impl ShardRecord {
    /// Whether a shard read back is the one committed: its size, then its
    /// SHA-256 (`sha256` of the bytes read).
    pub fn check(&self, bytes: u64, sha256: &str) -> Result<(), String> {
        if bytes != self.bytes {
            return Err(format!("{bytes} bytes, {} were committed (truncated?)", self.bytes));
        }
        if sha256 != self.sha256 {
            return Err(format!(
                "checksum mismatch: SHA-256 {sha256}, {} was committed",
                self.sha256
            ));
        }
        Ok(())
    }
}

/// The manifest fields a resumed job must keep: changing them would make
/// the saved state or the data plan mean something else. (Steps, the
/// schedule's end, checkpoint cadence and the worker count may change.)
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ResumeFields {
    /// The model configuration, as JSON.
    pub model: String,
    /// Each source's `url kind weight templates`.
    pub sources: Vec<String>,
    /// Each source's pinned index fingerprint (its contents).
    pub datasets: Vec<String>,
    pub seed: u64,
    pub global_batch: usize,
    /// How the sample order walks the shards (`SampleOrder::describe`);
    /// empty in checkpoints of the uniform order before it.
    #[serde(default)]
    pub order: String,
    /// Where the weights of an imported checkpoint (`coca import`) came
    /// from. An import binds only the model: a job started from it brings
    /// its own data, seed and batch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub imported: Option<String>,
    /// train.ema_decay: a step holds the moving average it kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ema_decay: Option<f64>,
}

impl ResumeFields {
    /// The fields of `plan`, whose sample order is `order`.
    pub fn of(plan: &JobPlan, order: &SampleOrder) -> Self {
        Self {
            model: serde_json::to_string(&plan.model).expect("the model config serializes"),
            sources: plan
                .sources
                .iter()
                .map(|s| format!("{} {} {} {}", s.url, s.kind, s.weight, s.templates))
                .collect(),
            datasets: plan
                .sources
                .iter()
                .map(|s| format!("{:016x}", s.index.fingerprint()))
                .collect(),
            seed: plan.seed,
            global_batch: plan.train.global_batch,
            order: order.describe(),
            imported: None,
            ema_decay: plan.train.ema_decay,
        }
    }

    /// The first field that differs, named as in the manifest, with both values.
    pub fn check(&self, now: &ResumeFields) -> Result<(), (String, String, String)> {
        let differ = |field: &str, was: String, is: String| Err((field.to_string(), was, is));
        if self.model != now.model {
            // Name the first model field that differs.
            let parse = |json: &str| serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(json);
            if let (Ok(was), Ok(is)) = (parse(&self.model), parse(&now.model)) {
                if let Some((key, value)) = was.iter().find(|(key, value)| is.get(*key) != Some(value)) {
                    let is = is.get(key).map_or("nothing".into(), |v| v.to_string());
                    return differ(&format!("model.{key}"), value.to_string(), is);
                }
            }
            return differ("model", self.model.clone(), now.model.clone());
        }
        if self.imported.is_some() {
            return Ok(());
        }
        if self.sources.len() != now.sources.len() {
            return differ(
                "data.source",
                format!("{} sources", self.sources.len()),
                format!("{} sources", now.sources.len()),
            );
        }
        for (i, (was, is)) in self.sources.iter().zip(&now.sources).enumerate() {
            if was != is {
                return differ(&format!("data.source[{i}]"), was.clone(), is.clone());
            }
        }
        for (i, (was, is)) in self.datasets.iter().zip(&now.datasets).enumerate() {
            if was != is {
                return differ(
                    &format!("data.source[{i}] (the dataset's contents)"),
                    format!("index fingerprint {was}"),
                    format!("index fingerprint {is}"),
                );
            }
        }
        if self.seed != now.seed {
            return differ("job.seed", self.seed.to_string(), now.seed.to_string());
        }
        if self.ema_decay != now.ema_decay {
            let decay = |decay: Option<f64>| decay.map_or("none".to_string(), |d| d.to_string());
            return differ("train.ema_decay", decay(self.ema_decay), decay(now.ema_decay));
        }
        if self.global_batch != now.global_batch {
            return differ(
                "train.global_batch",
                self.global_batch.to_string(),
                now.global_batch.to_string(),
            );
        }
        if self.order != now.order {
            let was = if self.order.is_empty() {
                "the uniform sample order of earlier coca releases".to_string()
            } else {
                self.order.clone()
            };
            return differ("data.streams (the sample order)", was, now.order.clone());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_import_binds_only_the_model() {
        let job = ResumeFields {
            model: r#"{"embed_dim":32}"#.into(),
            sources: vec!["data/a imagefolder 1 ".into()],
            datasets: vec!["00ff".into()],
            seed: 7,
            global_batch: 64,
            order: "shard-local v1, 4 streams, window 2".into(),
            imported: None,
            ema_decay: None,
        };
        let import = ResumeFields {
            model: job.model.clone(),
            imported: Some("open_clip w.safetensors".into()),
            ..ResumeFields::default()
        };
        assert_eq!(import.check(&job), Ok(()));
        let other_model = ResumeFields {
            model: r#"{"embed_dim":64}"#.into(),
            ..job.clone()
        };
        assert_eq!(import.check(&other_model).unwrap_err().0, "model.embed_dim");
        // A job's own checkpoint binds its data too.
        let again = ResumeFields { seed: 8, ..job.clone() };
        assert_eq!(job.check(&again).unwrap_err().0, "job.seed");
    }

    #[test]
    fn step_directories_round_trip_and_ranges_cover_the_state() {
        assert_eq!(step_dir(1200), "step-00001200");
        assert_eq!(parse_step_dir("step-00001200/"), Some(1200));
        assert_eq!(parse_step_dir("step-12"), None);
        assert_eq!(parse_step_dir("steps-00001200"), None);
        for world in 1..8 {
            let mut next = 0;
            for rank in 0..world {
                let (start, end) = shard_range(1001, rank, world);
                assert_eq!(start, next);
                next = end;
            }
            assert_eq!(next, 1001);
        }
    }
}
