//! The job manifest: one TOML file, read and validated once, at the edge.
//! serde reads it (`file.rs`); every error names the file, the field path,
//! the line and column, and what is wrong; unknown keys are errors with the
//! closest known key suggested.

mod choice;
mod error;
mod file;

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

pub use self::choice::{AutotuneLevel, Backend, CollectiveKind, Contrastive, Precision, Schedule, SourceFormat};
pub use self::error::{Location, ManifestError};
use self::file::{
    CheckpointFile, ClusterFile, DataFile, EvalFile, GpuFile, JobFile, ManifestFile, SourceFile, TrainFile,
};
use crate::dataset::DatasetKind;
use crate::sample_order::{self, SampleOrderError};
use crate::shard_pattern::TarSource;
use crate::{ModelConfig, Preset};

#[derive(Debug, Clone, PartialEq)]
pub struct Manifest {
    pub job: Job,
    pub preset: Preset,
    pub model: ModelConfig,
    pub data: Data,
    pub train: Train,
    pub cluster: Cluster,
    pub checkpoint: Option<Checkpoint>,
    pub eval: Option<Eval>,
    pub gpu: Gpu,
    pub status: Status,
    pub logging: Logging,
    pub auth: Auth,
    pub recovery: Recovery,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    pub name: String,
    pub seed: u64,
    pub length: Length,
    /// Where the coordinator keeps its journal.
    pub dir: String,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Length {
    Steps(u64),
    /// Passes over the first data source.
    Epochs(f64),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Data {
    pub sources: Vec<Source>,
    /// URL of tokenizer.json.
    pub tokenizer: String,
    /// When set, `coca launch` writes the demo datasets here if they are missing.
    pub demo: Option<String>,
    pub loader_threads: usize,
    pub prefetch_batches: usize,
    pub max_bad_fraction: f64,
    /// The most pixels an image may claim: a larger one is a bad record,
    /// refused before its pixels are allocated.
    pub max_image_pixels: u64,
    /// Canonical streams per source (none: chosen at the job's first start,
    /// the most that every worker reads locally and that fit its
    /// shard_memory_bytes); ranks that divide it read only their own
    /// streams' shards.
    pub streams: Option<usize>,
    /// Run a layout whose working set does not fit shard_memory_bytes
    /// (shards are then fetched more than once an epoch).
    pub accept_refetching: bool,
    /// Shards a stream shuffles together.
    pub shuffle_window: usize,
    /// Decoded shards a worker keeps in memory.
    pub shard_memory_bytes: u64,
    /// Bytes of shards fetched ahead of the step that needs them.
    pub fetch_ahead_bytes: u64,
    /// A local directory where workers keep the shards they fetch (none:
    /// nothing is kept on disk), and its size limit.
    pub cache_dir: Option<String>,
    pub cache_bytes: u64,
    pub s3_endpoint: Option<String>,
    pub s3_region: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Source {
    /// Arrow: the dataset's prefix. WebDataset: a prefix of tars, one tar,
    /// or a brace pattern (`s3://b/laion/{00000..41407}.tar`).
    pub url: String,
    pub kind: DatasetKind,
    /// Default: webdataset when the URL has braces or ends in `.tar`.
    pub format: SourceFormat,
    /// A jft webdataset source's class list (one name per line), used
    /// when its index is built; `None`: classes.txt beside the tars, else
    /// the class names the samples hold, sorted.
    pub classes: Option<String>,
    pub weight: f64,
    /// For jft: `clip80`, `simple`, or the URL/path of a templates file.
    pub templates: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Train {
    pub global_batch: usize,
    pub learning_rate: f64,
    pub warmup_steps: u64,
    pub schedule: Schedule,
    /// The rate the decay ends at.
    pub end_learning_rate: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub weight_decay: f64,
    pub eps: f64,
    pub lambda_con: f64,
    pub lambda_cap: f64,
    pub contrastive: Contrastive,
    /// What the towers compute in. Checkpoints are f32 either way, so a
    /// job may resume in the other precision.
    pub precision: Precision,
    /// Chunks each rank's share of the global batch is processed in (the
    /// contrastive negatives still span the whole global batch): memory for
    /// one chunk's activations. Not a resume field.
    pub accumulation: usize,
    /// Clips the global gradient's L2 norm to this, after the all-reduce.
    pub grad_clip_norm: Option<f64>,
    /// The share of each image's patches training drops (FLIP); 0: none.
    pub patch_dropout: f64,
    /// AdamW's moments sharded between the ranks (ZeRO stage 2): each
    /// holds 1/N of them. Checkpoints are the same either way, so a job may
    /// resume with the other setting.
    pub shard_optimizer: bool,
    /// The towers' blocks computed again in the backward pass instead of
    /// their activations kept: the same gradients, activations for one
    /// block at a time. Not a resume field.
    pub activation_checkpointing: bool,
    /// The image tower (encoder, poolers, projection) frozen, but its last
    /// `lock_image_unlocked_groups` groups (stem, each block, head), as
    /// open_clip's `--lock-image`. Not a resume field.
    pub lock_image: bool,
    pub lock_image_unlocked_groups: usize,
    /// The text tower (embeddings, unimodal decoder, projection) frozen, but
    /// its last `lock_text_unlocked_groups` groups.
    pub lock_text: bool,
    pub lock_text_unlocked_groups: usize,
    /// Layer-wise learning-rate decay of each tower's groups (1: off).
    pub image_layer_decay: f64,
    pub text_layer_decay: f64,
    /// An exponential moving average of the parameters, kept with this
    /// decay on every rank and stored in checkpoints (a resume field).
    pub ema_decay: Option<f64>,
}

impl Train {
    /// The learning rate of step `step` (0-based) of `steps`: linear warmup,
    /// then the schedule's decay to `end_learning_rate` at the last step.
    pub fn learning_rate_at(&self, step: u64, steps: u64) -> f64 {
        let peak = self.learning_rate;
        if step < self.warmup_steps {
            return peak * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let span = steps.saturating_sub(self.warmup_steps).max(1) as f64;
        let progress = ((step - self.warmup_steps) as f64 / span).min(1.0);
        let end = self.end_learning_rate;
        match self.schedule {
            Schedule::Constant => peak,
            Schedule::Linear => peak + (end - peak) * progress,
            Schedule::Cosine => end + (peak - end) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Cluster {
    pub workers: usize,
    pub backend: Backend,
    pub collective: CollectiveKind,
    /// The coordinator's gRPC address.
    pub coordinator: SocketAddr,
    /// The host workers bind their collective listeners on (port chosen by the system).
    pub worker_host: std::net::IpAddr,
    pub heartbeat_ms: u64,
    pub heartbeat_timeout_ms: u64,
    /// Model replicas inside each CPU worker, a thread each, splitting its
    /// micro-batch (1: none). Each holds the whole model, its gradients and
    /// AdamW's state. The count takes part in the order of the arithmetic:
    /// runs are bit-identical for the same count.
    pub replicas: usize,
}

impl Manifest {
    /// The replicas each worker of a world of `world` runs:
    /// `cluster.replicas`, or, after the world shrank to one whose
    /// micro-batch that count does not divide, its largest divisor below it.
    pub fn replicas_for(&self, world: usize) -> usize {
        replicas_for(self.cluster.replicas, self.train.global_batch, world)
    }
}

/// `replicas` per worker, or, where the micro-batch of `global_batch` over
/// `world` workers is not divisible by it, its largest divisor below it.
pub fn replicas_for(replicas: usize, global_batch: usize, world: usize) -> usize {
    let micro_batch = global_batch / world.max(1);
    let most = replicas.clamp(1, micro_batch.max(1));
    (1..=most).rev().find(|n| micro_batch % n == 0).unwrap_or(1)
}

/// How GPU workers (cuda, wgpu) compile and tune their kernels (ignored on the CPU backend).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Gpu {
    /// Defaults to minimal: the first step of a fresh job then takes seconds
    /// of tuning instead of minutes.
    pub autotune: AutotuneLevel,
    /// Where the job's compiled kernels and autotune results are kept, so
    /// that every worker after the first, and every restart, starts warm.
    pub kernel_cache: String,
    /// Count the kernels compiled in each step and log them.
    pub log_compilations: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Checkpoint {
    pub url: String,
    pub every: u64,
    pub keep: usize,
    /// How long a rank retries a save whose store fails (an S3 server
    /// away, a full disk) before it fails the job, naming the store.
    pub save_retry_seconds: u64,
}

/// Evaluation on held-out data during training, by rank 0.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Eval {
    pub every: u64,
    /// A jft dataset for zero-shot classification.
    pub zeroshot: Option<String>,
    /// An align dataset for image-text retrieval.
    pub retrieval: Option<String>,
    /// Prompt templates of the zero-shot classes.
    pub templates: String,
    /// Samples per evaluation (the first ones of each dataset).
    pub limit: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Status {
    pub bind: SocketAddr,
    /// Serve /status, /metrics and the page without the job token when
    /// bound beyond loopback (on loopback they never ask for it).
    pub public: bool,
}

impl Status {
    /// Whether reads must present the job token.
    pub fn needs_token(&self) -> bool {
        !self.bind.ip().is_loopback() && !self.public
    }
}

/// What the coordinator logs besides the journal and metrics.jsonl.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Logging {
    /// Where TensorBoard event files go (a path or store URL): one run
    /// per job, continued across resumes.
    pub tensorboard: Option<String>,
}

/// What the coordinator may do when a worker is lost: rewind to the newest
/// committed checkpoint and go on, at most `max_restarts` times.
#[derive(Debug, Clone, PartialEq)]
pub struct Recovery {
    /// Recoveries allowed over the job's life (coordinator restarts count);
    /// 0 fails the job at the first loss, naming the lost worker.
    pub max_restarts: u32,
    /// The fewest workers the job may go on with when no replacement comes
    /// (defaults to cluster.workers: wait for one).
    pub min_workers: usize,
    /// How long a recovery waits for replacements before it goes on with
    /// fewer workers (at least `min_workers`).
    pub replacement_timeout_ms: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Auth {
    /// The environment variable holding the job token.
    pub token_env: String,
    /// Or a file holding it (takes precedence when set).
    pub token_file: Option<String>,
    /// The coordinator's gRPC over TLS, when set.
    pub tls: Option<Tls>,
}

/// The coordinator's certificate and key (PEM files), and the CA
/// certificate workers started by `coca launch` verify it against.
#[derive(Debug, Clone, PartialEq)]
pub struct Tls {
    pub cert: String,
    pub key: String,
    /// Default: the certificate itself (self-signed).
    pub ca: String,
}

/// Manifest fields a command line may set for one run, applied before validation.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
#[cfg_attr(feature = "clap", derive(clap::Args))]
pub struct Overrides {
    /// Override cluster.workers (e.g. with Slurm's $SLURM_NTASKS).
    #[cfg_attr(feature = "clap", arg(long))]
    pub workers: Option<usize>,
    /// Override job.steps (the job's length in steps; it replaces job.epochs).
    #[cfg_attr(feature = "clap", arg(long))]
    pub steps: Option<u64>,
    /// Override train.warmup_steps (a short trial of a long job needs a shorter warm-up).
    #[cfg_attr(feature = "clap", arg(long))]
    pub warmup_steps: Option<u64>,
}

impl Overrides {
    /// Sets the fields the command line gives; returns their paths, whose
    /// values the file does not hold.
    fn apply(&self, file: &mut ManifestFile) -> Vec<&'static str> {
        let mut set = Vec::new();
        if let Some(workers) = self.workers {
            file.cluster.workers = Some(workers);
            set.push("cluster.workers");
        }
        if let Some(steps) = self.steps {
            file.job.steps = Some(steps);
            file.job.epochs = None;
            set.push("job.steps");
        }
        if let Some(warmup_steps) = self.warmup_steps {
            file.train.warmup_steps = Some(warmup_steps);
            set.push("train.warmup_steps");
        }
        set
    }
}

/// A field and what is wrong with it, before the error is placed in the file.
struct Invalid {
    field: String,
    message: String,
}

/// The most pixels an image may have by default: what PIL refuses as a
/// decompression bomb (twice `Image.MAX_IMAGE_PIXELS`).
pub const MAX_IMAGE_PIXELS: u64 = 178_956_970;

fn error(field: impl Into<String>, message: impl Into<String>) -> Invalid {
    Invalid {
        field: field.into(),
        message: message.into(),
    }
}

fn address(field: &str, text: Option<String>, default: &str) -> Result<SocketAddr, Invalid> {
    let text = text.unwrap_or_else(|| default.to_string());
    text.parse().map_err(|_| {
        error(
            field,
            format!("`{text}` is not an address (host:port, e.g. 127.0.0.1:7070)"),
        )
    })
}

impl Manifest {
    /// Parses and validates a manifest; `origin` (its path) starts every error.
    pub fn parse(text: &str, origin: &str) -> Result<Self, ManifestError> {
        Self::parse_with(text, origin, &Overrides::default())
    }

    /// [`Manifest::parse`] with a command line's overrides applied.
    pub fn parse_with(text: &str, origin: &str, overrides: &Overrides) -> Result<Self, ManifestError> {
        let mut file = ManifestFile::read(text).map_err(|read| ManifestError {
            origin: origin.to_string(),
            field: read.field,
            message: read.message,
            location: read.span.map(|span| Location::at(text, span.start)),
        })?;
        let from_command_line = overrides.apply(&mut file);
        Self::from_file(file).map_err(|Invalid { field, message }| ManifestError {
            origin: origin.to_string(),
            location: (!from_command_line.contains(&field.as_str()))
                .then(|| Location::of_field(text, &field))
                .flatten(),
            field,
            message,
        })
    }

    /// The defaults, the checks of single fields, then the rules between fields.
    fn from_file(file: ManifestFile) -> Result<Self, Invalid> {
        let job = Self::job(file.job)?;
        let (preset, model) = Self::model(file.model)?;
        let data = Self::data(file.data)?;
        let train = Self::train(file.train)?;
        let cluster = Self::cluster(file.cluster)?;
        let checkpoint = file.checkpoint.map(Self::checkpoint).transpose()?;
        let eval = file.eval.map(Self::eval);
        let gpu = Self::gpu(file.gpu, &job, checkpoint.as_ref())?;
        let status = Status {
            bind: address("status.bind", file.status.bind, "127.0.0.1:7071")?,
            public: file.status.public.unwrap_or(false),
        };
        if file
            .logging
            .tensorboard
            .as_deref()
            .is_some_and(|url| url.trim().is_empty())
        {
            return Err(error("logging.tensorboard", "is empty (a directory path or store URL)"));
        }
        let logging = Logging {
            tensorboard: file.logging.tensorboard,
        };
        let tls = match (file.auth.tls_cert, file.auth.tls_key, file.auth.tls_ca) {
            (None, None, None) => None,
            (Some(cert), Some(key), ca) => Some(Tls {
                ca: ca.unwrap_or_else(|| cert.clone()),
                cert,
                key,
            }),
            (None, _, _) => {
                return Err(error(
                    "auth.tls_cert",
                    "missing (auth.tls_key and auth.tls_ca go with it)",
                ))
            }
            (Some(_), None, _) => return Err(error("auth.tls_key", "missing (auth.tls_cert needs its private key)")),
        };
        let auth = Auth {
            token_env: file.auth.token_env.unwrap_or_else(|| "COCA_JOB_TOKEN".into()),
            token_file: file.auth.token_file,
            tls,
        };
        let recovery = Recovery {
            max_restarts: file.recovery.max_restarts.unwrap_or(10),
            min_workers: file.recovery.min_workers.unwrap_or(cluster.workers),
            replacement_timeout_ms: file.recovery.replacement_timeout_ms.unwrap_or(60_000),
        };
        let manifest = Self {
            job,
            preset,
            model,
            data,
            train,
            cluster,
            checkpoint,
            eval,
            gpu,
            status,
            logging,
            auth,
            recovery,
        };
        manifest.validate()?;
        Ok(manifest)
    }

    fn job(job: JobFile) -> Result<Job, Invalid> {
        let name = job.name.ok_or_else(|| error("job.name", "missing"))?;
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
            return Err(error(
                "job.name",
                format!("`{name}` must be letters, digits, `-` or `_`"),
            ));
        }
        let length = match (job.steps, job.epochs) {
            (Some(_), Some(_)) => return Err(error("job.steps", "give job.steps or job.epochs, not both")),
            (None, None) => return Err(error("job.steps", "missing (or give job.epochs)")),
            (Some(0), None) => return Err(error("job.steps", "must be at least 1")),
            (Some(steps), None) => Length::Steps(steps),
            (None, Some(epochs)) if !(epochs > 0.0 && epochs.is_finite()) => {
                return Err(error("job.epochs", format!("{epochs} must be a positive number")))
            }
            (None, Some(epochs)) => Length::Epochs(epochs),
        };
        let dir = job.dir.unwrap_or_else(|| format!("runs/{name}"));
        Ok(Job {
            name,
            seed: job.seed.unwrap_or(0),
            length,
            dir,
        })
    }

    fn train(train: TrainFile) -> Result<Train, Invalid> {
        Ok(Train {
            global_batch: train
                .global_batch
                .ok_or_else(|| error("train.global_batch", "missing"))?,
            learning_rate: train.learning_rate.unwrap_or(5e-4),
            warmup_steps: train.warmup_steps.unwrap_or(0),
            schedule: train.schedule.unwrap_or(Schedule::Cosine),
            end_learning_rate: train.end_learning_rate.unwrap_or(0.0),
            beta1: train.beta1.unwrap_or(0.9),
            beta2: train.beta2.unwrap_or(0.999),
            weight_decay: train.weight_decay.unwrap_or(0.01),
            eps: train.eps.unwrap_or(1e-8),
            lambda_con: train.lambda_con.unwrap_or(1.0),
            lambda_cap: train.lambda_cap.unwrap_or(2.0),
            contrastive: train.contrastive.unwrap_or(Contrastive::Local),
            // f32 until bf16 has passed its check on a GPU (scripts/gpu/check.sh).
            precision: train.precision.unwrap_or(Precision::F32),
            accumulation: train.accumulation.unwrap_or(1),
            grad_clip_norm: train.grad_clip_norm,
            patch_dropout: train.patch_dropout.unwrap_or(0.0),
            shard_optimizer: train.shard_optimizer.unwrap_or(false),
            activation_checkpointing: train.activation_checkpointing.unwrap_or(false),
            lock_image: train.lock_image.unwrap_or(false),
            lock_image_unlocked_groups: train.lock_image_unlocked_groups.unwrap_or(0),
            lock_text: train.lock_text.unwrap_or(false),
            lock_text_unlocked_groups: train.lock_text_unlocked_groups.unwrap_or(0),
            image_layer_decay: train.image_layer_decay.unwrap_or(1.0),
            text_layer_decay: train.text_layer_decay.unwrap_or(1.0),
            ema_decay: train.ema_decay,
        })
    }

    fn cluster(cluster: ClusterFile) -> Result<Cluster, Invalid> {
        let worker_host = cluster.worker_host.unwrap_or_else(|| "127.0.0.1".into());
        Ok(Cluster {
            workers: cluster.workers.unwrap_or(1),
            backend: cluster.backend.unwrap_or(Backend::Cpu),
            // tcp on every backend until NCCL has passed its check on a GPU
            // (scripts/gpu/check.sh); `nccl` is there for CUDA jobs that ask.
            collective: cluster.collective.unwrap_or(CollectiveKind::Tcp),
            coordinator: address("cluster.coordinator", cluster.coordinator, "127.0.0.1:7070")?,
            worker_host: worker_host
                .parse()
                .map_err(|_| error("cluster.worker_host", format!("`{worker_host}` is not an IP address")))?,
            heartbeat_ms: cluster.heartbeat_ms.unwrap_or(1000),
            heartbeat_timeout_ms: cluster.heartbeat_timeout_ms.unwrap_or(10_000),
            replicas: cluster.replicas.unwrap_or(1),
        })
    }

    fn checkpoint(checkpoint: CheckpointFile) -> Result<Checkpoint, Invalid> {
        Ok(Checkpoint {
            url: checkpoint.url.ok_or_else(|| error("checkpoint.url", "missing"))?,
            every: checkpoint.every.unwrap_or(100),
            keep: checkpoint.keep.unwrap_or(3),
            save_retry_seconds: checkpoint.save_retry_seconds.unwrap_or(300),
        })
    }

    fn eval(eval: EvalFile) -> Eval {
        Eval {
            every: eval.every.unwrap_or(100),
            zeroshot: eval.zeroshot,
            retrieval: eval.retrieval,
            templates: eval.templates.unwrap_or_else(|| "clip80".into()),
            limit: eval.limit.unwrap_or(512),
        }
    }

    /// `kernel_cache` defaults to a folder beside the checkpoints, else in the job's directory.
    fn gpu(gpu: GpuFile, job: &Job, checkpoint: Option<&Checkpoint>) -> Result<Gpu, Invalid> {
        let kernel_cache = gpu.kernel_cache.unwrap_or_else(|| {
            let beside = checkpoint.map_or(job.dir.as_str(), |c| c.url.as_str());
            format!("{}/kernel-cache", beside.trim_end_matches('/'))
        });
        if kernel_cache.is_empty() {
            return Err(error("gpu.kernel_cache", "is empty (the URL of a directory)"));
        }
        Ok(Gpu {
            autotune: gpu.autotune.unwrap_or(AutotuneLevel::Minimal),
            kernel_cache,
            log_compilations: gpu.log_compilations.unwrap_or(true),
        })
    }

    fn model(model: Option<toml::Table>) -> Result<(Preset, ModelConfig), Invalid> {
        let mut overrides = model.unwrap_or_default();
        let preset = match overrides.remove("preset") {
            None => return Err(error("model.preset", "missing (tiny, bench, base, large or giant)")),
            Some(toml::Value::String(name)) => name
                .parse::<Preset>()
                .map_err(|e| error("model.preset", e.to_string()))?,
            Some(other) => {
                return Err(error(
                    "model.preset",
                    format!("expected a preset's name, found {other}"),
                ))
            }
        };
        let config = ModelConfig::resolve(preset, &overrides).map_err(|e| {
            let (field, message) = e.field_and_message();
            error(field, message)
        })?;
        Ok((preset, config))
    }

    fn data(data: DataFile) -> Result<Data, Invalid> {
        let sources = match data.source {
            Some(sources) if !sources.is_empty() => sources,
            _ => return Err(error("data.source", "missing: at least one [[data.source]]")),
        };
        let tokenizer = data
            .tokenizer
            .ok_or_else(|| error("data.tokenizer", "missing (the URL of a tokenizer.json)"))?;
        let sources = sources
            .into_iter()
            .enumerate()
            .map(|(i, source)| Self::source(i, source))
            .collect::<Result<_, _>>()?;
        Ok(Data {
            sources,
            tokenizer,
            demo: data.demo,
            loader_threads: data.loader_threads.unwrap_or(2),
            prefetch_batches: data.prefetch_batches.unwrap_or(2),
            max_bad_fraction: data.max_bad_fraction.unwrap_or(0.01),
            max_image_pixels: data.max_image_pixels.unwrap_or(MAX_IMAGE_PIXELS),
            streams: data.streams,
            accept_refetching: data.accept_refetching.unwrap_or(false),
            shuffle_window: data.shuffle_window.unwrap_or(2),
            shard_memory_bytes: data.shard_memory_bytes.unwrap_or(1 << 30),
            fetch_ahead_bytes: data.fetch_ahead_bytes.unwrap_or(256 << 20),
            cache_dir: data.cache_dir,
            cache_bytes: data.cache_bytes.unwrap_or(64 << 30),
            s3_endpoint: data.s3_endpoint,
            s3_region: data.s3_region,
        })
    }

    fn source(i: usize, source: SourceFile) -> Result<Source, Invalid> {
        let path = format!("data.source[{i}]");
        let url = source.url.ok_or_else(|| error(format!("{path}.url"), "missing"))?;
        let kind = source
            .kind
            .ok_or_else(|| error(format!("{path}.kind"), "missing (align or jft)"))?;
        let weight = source.weight.unwrap_or(1.0);
        if !(weight > 0.0 && weight.is_finite()) {
            return Err(error(
                format!("{path}.weight"),
                format!("{weight} must be a positive number"),
            ));
        }
        if source.templates.is_some() && kind == DatasetKind::Align {
            return Err(error(
                format!("{path}.templates"),
                "only jft sources use prompt templates",
            ));
        }
        let format = source.format.unwrap_or_else(|| {
            let tars = url.contains('{') || url.trim_end_matches('/').ends_with(".tar");
            if tars {
                SourceFormat::Webdataset
            } else {
                SourceFormat::Arrow
            }
        });
        if format == SourceFormat::Webdataset {
            TarSource::parse(&url).map_err(|e| error(format!("{path}.url"), e.to_string()))?;
        }
        if source.classes.is_some() && (format, kind) != (SourceFormat::Webdataset, DatasetKind::Jft) {
            return Err(error(
                format!("{path}.classes"),
                "only jft webdataset sources take a class list (an Arrow dataset's index has its classes)",
            ));
        }
        Ok(Source {
            url,
            kind,
            format,
            classes: source.classes,
            weight,
            templates: source.templates.unwrap_or_else(|| "clip80".into()),
        })
    }
    /// The rules between fields, checked once every section is read.
    fn validate(&self) -> Result<(), Invalid> {
        self.validate_batch()?;
        self.validate_optimizer()?;
        self.validate_data()?;
        self.validate_cluster()?;
        self.validate_checkpoint_and_eval()
    }

    /// The global batch splits between the workers and feeds every source.
    fn validate_batch(&self) -> Result<(), Invalid> {
        let train = &self.train;
        let cluster = &self.cluster;
        if cluster.workers == 0 {
            return Err(error("cluster.workers", "must be at least 1"));
        }
        if train.global_batch == 0 {
            return Err(error("train.global_batch", "must be at least 1"));
        }
        if train.global_batch % cluster.workers != 0 {
            return Err(error(
                "train.global_batch",
                format!(
                    "{} is not divisible by cluster.workers = {}",
                    train.global_batch, cluster.workers
                ),
            ));
        }
        let recovery = &self.recovery;
        if recovery.min_workers == 0 || recovery.min_workers > cluster.workers {
            return Err(error(
                "recovery.min_workers",
                format!(
                    "{} must be between 1 and cluster.workers = {}",
                    recovery.min_workers, cluster.workers
                ),
            ));
        }
        let weights: Vec<f64> = self.data.sources.iter().map(|s| s.weight).collect();
        let counts = sample_order::counts_per_batch(&weights, train.global_batch)
            .map_err(|e| error("data.source", e.to_string()))?;
        if let Some(streams) = self.data.streams {
            sample_order::check_streams(streams, &counts).map_err(|e| {
                let message = match e {
                    SampleOrderError::NoStreams => "must be at least 1".to_string(),
                    other => other.to_string(),
                };
                error("data.streams", message)
            })?;
        }
        Ok(())
    }

    fn validate_optimizer(&self) -> Result<(), Invalid> {
        let train = &self.train;
        if !(train.learning_rate > 0.0) {
            return Err(error(
                "train.learning_rate",
                format!("{} must be positive", train.learning_rate),
            ));
        }
        if !(0.0..train.learning_rate).contains(&train.end_learning_rate)
            && train.end_learning_rate != train.learning_rate
        {
            return Err(error(
                "train.end_learning_rate",
                format!(
                    "{} must be between 0 and train.learning_rate = {}",
                    train.end_learning_rate, train.learning_rate
                ),
            ));
        }
        if let Length::Steps(steps) = self.job.length {
            if train.warmup_steps >= steps {
                return Err(error(
                    "train.warmup_steps",
                    format!("{} must be less than job.steps = {steps}", train.warmup_steps),
                ));
            }
        }
        for (field, value) in [("train.beta1", train.beta1), ("train.beta2", train.beta2)] {
            if !(0.0..1.0).contains(&value) {
                return Err(error(field, format!("{value} must be in [0, 1)")));
            }
        }
        if !(train.eps > 0.0) {
            return Err(error("train.eps", format!("{} must be positive", train.eps)));
        }
        for (field, value) in [
            ("train.weight_decay", train.weight_decay),
            ("train.lambda_con", train.lambda_con),
            ("train.lambda_cap", train.lambda_cap),
        ] {
            if !(value >= 0.0 && value.is_finite()) {
                return Err(error(field, format!("{value} must be zero or positive")));
            }
        }
        if train.lambda_con == 0.0 && train.lambda_cap == 0.0 {
            return Err(error(
                "train.lambda_cap",
                "train.lambda_con and train.lambda_cap are both 0: nothing to learn",
            ));
        }
        if !(0.0..1.0).contains(&train.patch_dropout) {
            return Err(error(
                "train.patch_dropout",
                format!(
                    "{} must be in [0, 1): the share of patches dropped",
                    train.patch_dropout
                ),
            ));
        }
        if let Some(norm) = train.grad_clip_norm.filter(|norm| !(*norm > 0.0 && norm.is_finite())) {
            return Err(error(
                "train.grad_clip_norm",
                format!("{norm} must be a positive number"),
            ));
        }
        if let Some(decay) = train.ema_decay.filter(|decay| !(*decay > 0.0 && *decay < 1.0)) {
            return Err(error("train.ema_decay", format!("{decay} must be in (0, 1)")));
        }
        self.validate_towers()
    }

    /// Locking and layer decay: each tower has its blocks + 2 groups (stem,
    /// blocks, head).
    fn validate_towers(&self) -> Result<(), Invalid> {
        let train = &self.train;
        for (tower, locked, unlocked, decay, blocks) in [
            (
                "image",
                train.lock_image,
                train.lock_image_unlocked_groups,
                train.image_layer_decay,
                self.model.vision_layers,
            ),
            (
                "text",
                train.lock_text,
                train.lock_text_unlocked_groups,
                train.text_layer_decay,
                self.model.unimodal_layers,
            ),
        ] {
            let groups = blocks + 2;
            if unlocked > 0 && !locked {
                return Err(error(
                    &format!("train.lock_{tower}_unlocked_groups"),
                    format!("{unlocked} needs train.lock_{tower} = true"),
                ));
            }
            if unlocked >= groups {
                return Err(error(
                    &format!("train.lock_{tower}_unlocked_groups"),
                    format!(
                        "{unlocked} leaves nothing locked: the {tower} tower has {groups} groups (its stem, {blocks} blocks, its head)"
                    ),
                ));
            }
            if !(decay > 0.0 && decay <= 1.0) {
                return Err(error(
                    &format!("train.{tower}_layer_decay"),
                    format!("{decay} must be in (0, 1] (1: off)"),
                ));
            }
        }
        Ok(())
    }

    fn validate_data(&self) -> Result<(), Invalid> {
        if self.data.max_image_pixels == 0 {
            return Err(error("data.max_image_pixels", "must be at least 1"));
        }
        if !(0.0..=1.0).contains(&self.data.max_bad_fraction) {
            return Err(error(
                "data.max_bad_fraction",
                format!("{} must be in [0, 1]", self.data.max_bad_fraction),
            ));
        }
        if self.data.loader_threads == 0 {
            return Err(error("data.loader_threads", "must be at least 1"));
        }
        if self.data.shuffle_window == 0 {
            return Err(error("data.shuffle_window", "must be at least 1 shard"));
        }
        if self.data.shard_memory_bytes == 0 {
            return Err(error("data.shard_memory_bytes", "must be at least 1"));
        }
        Ok(())
    }

    fn validate_cluster(&self) -> Result<(), Invalid> {
        let cluster = &self.cluster;
        if cluster.collective == CollectiveKind::Nccl && cluster.backend != Backend::Cuda {
            return Err(error("cluster.collective", "nccl needs cluster.backend = \"cuda\""));
        }
        if cluster.heartbeat_ms == 0 {
            return Err(error("cluster.heartbeat_ms", "must be at least 1"));
        }
        let (replicas, micro_batch) = (cluster.replicas, self.train.global_batch / cluster.workers);
        if replicas == 0 {
            return Err(error("cluster.replicas", "must be at least 1"));
        }
        if replicas > 1 && cluster.backend != Backend::Cpu {
            return Err(error(
                "cluster.replicas",
                "replicas are for the cpu backend (a GPU runs one)",
            ));
        }
        if replicas > 1 && self.train.shard_optimizer {
            return Err(error(
                "cluster.replicas",
                format!(
                    "{replicas} replicas with train.shard_optimizer: sharding saves device memory, replicas are a \
                     CPU worker's threads; use one of them"
                ),
            ));
        }
        if micro_batch % replicas != 0 {
            return Err(error(
                "cluster.replicas",
                format!(
                    "{replicas} does not divide each worker's micro-batch of {micro_batch} (train.global_batch / cluster.workers)"
                ),
            ));
        }
        // Chunks may differ by a row (a shrunken world's larger share need not split evenly).
        let rows = micro_batch / replicas;
        let accumulation = self.train.accumulation;
        if accumulation == 0 || accumulation > rows {
            let per = if replicas > 1 { "replica" } else { "worker" };
            return Err(error(
                "train.accumulation",
                format!("{accumulation} must be between 1 and the {rows} samples each {per} steps on"),
            ));
        }
        if cluster.heartbeat_timeout_ms < 2 * cluster.heartbeat_ms {
            return Err(error(
                "cluster.heartbeat_timeout_ms",
                format!(
                    "{} must be at least twice cluster.heartbeat_ms = {}",
                    cluster.heartbeat_timeout_ms, cluster.heartbeat_ms
                ),
            ));
        }
        if self.status.bind == cluster.coordinator && self.status.bind.port() != 0 {
            return Err(error(
                "status.bind",
                format!("{} is also cluster.coordinator", self.status.bind),
            ));
        }
        Ok(())
    }

    fn validate_checkpoint_and_eval(&self) -> Result<(), Invalid> {
        if let Some(checkpoint) = &self.checkpoint {
            if checkpoint.every == 0 {
                return Err(error("checkpoint.every", "must be at least 1"));
            }
            if checkpoint.keep == 0 {
                return Err(error("checkpoint.keep", "must be at least 1"));
            }
        }
        if let Some(eval) = &self.eval {
            if eval.every == 0 {
                return Err(error("eval.every", "must be at least 1"));
            }
            if eval.limit == 0 {
                return Err(error("eval.limit", "must be at least 1"));
            }
            if eval.zeroshot.is_none() && eval.retrieval.is_none() {
                return Err(error(
                    "eval",
                    "names no dataset: set zeroshot (a jft dataset) and/or retrieval (an align dataset)",
                ));
            }
        }
        Ok(())
    }

    /// Total steps, given the first source's row count (for `epochs`).
    pub fn total_steps(&self, first_source_rows: u64, first_source_per_batch: usize) -> u64 {
        match self.job.length {
            Length::Steps(steps) => steps,
            Length::Epochs(epochs) => ((epochs * first_source_rows as f64) / first_source_per_batch as f64)
                .ceil()
                .max(1.0) as u64,
        }
    }
}
