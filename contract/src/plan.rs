//! The job as every rank receives it: each fact a rank needs, derived once
//! by the coordinator from the manifest and the dataset indexes it pinned.
//! It travels in the rendezvous assignment as JSON (`proto`'s
//! `Assignment.plan`); a worker builds everything it trains with from the
//! plan alone and never reads the manifest.

use serde::{Deserialize, Serialize};

use crate::dataset::{Container, DatasetIndex, DatasetKind};
use crate::manifest::{Backend, Checkpoint, CollectiveKind, Data, Eval, Gpu, Manifest, Train};
use crate::sample_order::{SampleOrder, SampleOrderError, SourceSize, Streaming};
use crate::shard_pattern::TarSource;
use crate::stream_layout::{self, Fit, LayoutError, SourceShards, StreamLayout};
use crate::ModelConfig;

/// Everything a rank needs to train its part of the job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobPlan {
    /// `job.name`.
    pub job: String,
    /// `job.seed`: the model's initialisation and the sample order.
    pub seed: u64,
    pub total_steps: u64,
    pub model: ModelConfig,
    /// The URL of tokenizer.json.
    pub tokenizer: String,
    /// The sources in manifest order, each with the index the coordinator pinned.
    pub sources: Vec<PlannedSource>,
    /// How the sample order walks the shards.
    pub streaming: Streaming,
    pub train: Train,
    pub loader: LoaderPlan,
    pub store: StorePlan,
    pub cluster: ClusterPlan,
    pub gpu: Gpu,
    pub checkpoint: Option<Checkpoint>,
    pub eval: Option<Eval>,
}

/// A data source and its pinned index.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlannedSource {
    pub url: String,
    pub kind: DatasetKind,
    pub weight: f64,
    /// For jft: `clip80`, `simple`, or the URL/path of a templates file.
    pub templates: String,
    pub index: DatasetIndex,
}

impl PlannedSource {
    /// Where the shards the index names are: the URL itself, or a tar
    /// source's base (the pattern was checked with the manifest).
    pub fn shards_url(&self) -> String {
        match self.index.container {
            Container::Arrow => self.url.clone(),
            Container::Tar => TarSource::parse(&self.url).map_or_else(|_| self.url.clone(), |tars| tars.base),
        }
    }
}

/// How a worker's loader reads and keeps shards (the manifest's `[data]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoaderPlan {
    pub threads: usize,
    pub prefetch_batches: usize,
    pub max_bad_fraction: f64,
    pub max_image_pixels: u64,
    pub shard_memory_bytes: u64,
    pub fetch_ahead_bytes: u64,
    pub cache_dir: Option<String>,
    pub cache_bytes: u64,
}

/// How every store of the job is reached (data, checkpoints, kernel cache).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorePlan {
    pub s3_endpoint: Option<String>,
    pub s3_region: Option<String>,
}

impl StorePlan {
    pub fn of(data: &Data) -> Self {
        Self {
            s3_endpoint: data.s3_endpoint.clone(),
            s3_region: data.s3_region.clone(),
        }
    }
}

/// What a rank needs of `[cluster]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterPlan {
    pub backend: Backend,
    pub collective: CollectiveKind,
    /// A ring neighbour that has not come within two of these is gone.
    pub heartbeat_timeout_ms: u64,
    /// `cluster.replicas`: model replicas in each CPU worker.
    pub replicas: usize,
}

/// The cause, where there is one, follows as the error's source.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("{count} pinned indexes for {sources} data sources")]
    Indexes { count: usize, sources: usize },
    #[error("data.streams")]
    Order(#[from] SampleOrderError),
    #[error(transparent)]
    Layout(#[from] LayoutError),
    #[error("not a job plan of this coca release")]
    Json(#[from] serde_json::Error),
}

impl JobPlan {
    /// The plan of `manifest` over `indexes` (one per `data.source`, as
    /// pinned), with the sample order it implies.
    pub fn new(manifest: &Manifest, indexes: Vec<DatasetIndex>) -> Result<(Self, SampleOrder), PlanError> {
        let data = &manifest.data;
        if indexes.len() != data.sources.len() {
            return Err(PlanError::Indexes {
                count: indexes.len(),
                sources: data.sources.len(),
            });
        }
        let sources = data
            .sources
            .iter()
            .zip(indexes)
            .map(|(source, index)| PlannedSource {
                url: source.url.clone(),
                kind: source.kind,
                weight: source.weight,
                templates: source.templates.clone(),
                index,
            })
            .collect();
        let mut plan = Self {
            job: manifest.job.name.clone(),
            seed: manifest.job.seed,
            total_steps: 0,
            model: manifest.model.clone(),
            tokenizer: data.tokenizer.clone(),
            sources,
            streaming: Streaming {
                streams: data.streams,
                window: data.shuffle_window,
            },
            train: manifest.train.clone(),
            loader: LoaderPlan {
                threads: data.loader_threads,
                prefetch_batches: data.prefetch_batches,
                max_bad_fraction: data.max_bad_fraction,
                max_image_pixels: data.max_image_pixels,
                shard_memory_bytes: data.shard_memory_bytes,
                fetch_ahead_bytes: data.fetch_ahead_bytes,
                cache_dir: data.cache_dir.clone(),
                cache_bytes: data.cache_bytes,
            },
            store: StorePlan::of(data),
            cluster: ClusterPlan {
                backend: manifest.cluster.backend,
                collective: manifest.cluster.collective,
                heartbeat_timeout_ms: manifest.cluster.heartbeat_timeout_ms,
                replicas: manifest.cluster.replicas,
            },
            gpu: manifest.gpu.clone(),
            checkpoint: manifest.checkpoint.clone(),
            eval: manifest.eval.clone(),
        };
        // A manifest's own stream count is checked as written first.
        let mut order = plan.sample_order()?;
        let shards = plan.source_shards(order.counts_per_batch());
        let fit = Fit {
            workers: manifest.cluster.workers,
            window: data.shuffle_window,
            shard_memory_bytes: data.shard_memory_bytes,
        };
        let layout = match (data.streams, data.accept_refetching) {
            (Some(_), true) => None,
            (Some(streams), false) => Some(stream_layout::check(streams, &shards, fit)?),
            (None, false) => Some(stream_layout::choose(&shards, fit)?),
            (None, true) => stream_layout::choose(&shards, fit)
                .ok()
                .or_else(|| stream_layout::smallest(&shards, fit)),
        };
        if let Some(layout) = layout.filter(|layout| data.streams != Some(layout.streams)) {
            plan.streaming.streams = Some(layout.streams);
            order = plan.sample_order()?;
        }
        plan.total_steps = manifest.total_steps(plan.sources[0].index.rows(), order.counts_per_batch()[0]);
        Ok((plan, order))
    }

    /// What the stream layout weighs of each source: its share of a batch
    /// (`counts`, the order's) and its shards.
    fn source_shards(&self, counts: &[usize]) -> Vec<SourceShards> {
        self.sources
            .iter()
            .zip(counts)
            .map(|(source, &per_batch)| {
                let shards = &source.index.shards;
                let filled = shards.iter().filter(|shard| shard.rows > 0).count();
                let bytes: u64 = shards.iter().map(|shard| shard.bytes).sum();
                SourceShards {
                    per_batch,
                    shards: filled,
                    mean_bytes: bytes / shards.len().max(1) as u64,
                    largest_bytes: shards.iter().map(|shard| shard.bytes).max().unwrap_or(0),
                }
            })
            .collect()
    }

    /// What each of `workers` workers holds at once under this plan's streams.
    pub fn stream_layout(&self, order: &SampleOrder, workers: usize) -> StreamLayout {
        let shards = self.source_shards(order.counts_per_batch());
        StreamLayout::of(order.streams(), workers, self.streaming.window, &shards)
    }

    /// This plan with `streams` streams (a resumed job keeps those its
    /// checkpoint was written with), and its order.
    pub fn with_streams(mut self, streams: usize) -> Result<(Self, SampleOrder), PlanError> {
        self.streaming.streams = Some(streams);
        let order = self.sample_order()?;
        Ok((self, order))
    }

    /// The job's global sample order: its seed, mix, global batch and
    /// streaming over the pinned indexes.
    pub fn sample_order(&self) -> Result<SampleOrder, SampleOrderError> {
        let sizes: Vec<SourceSize> = self
            .sources
            .iter()
            .map(|source| SourceSize {
                shard_rows: source.index.shards.iter().map(|shard| shard.rows).collect(),
                weight: source.weight,
            })
            .collect();
        SampleOrder::new(self.seed, &sizes, self.train.global_batch, self.streaming)
    }

    /// The replicas each worker of a world of `world` runs (see [`Manifest::replicas_for`]).
    pub fn replicas_for(&self, world: usize) -> usize {
        crate::manifest::replicas_for(self.cluster.replicas, self.train.global_batch, world)
    }

    /// The plan's wire form.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a job plan serializes")
    }

    pub fn from_json(json: &str) -> Result<Self, PlanError> {
        Ok(serde_json::from_str(json)?)
    }
}
