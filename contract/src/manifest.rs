//! The job manifest: one TOML file, read and validated once, at the edge.
//! Every error names the field path and what is wrong with it; unknown keys
//! are errors with the closest known key suggested.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::dataset::DatasetKind;
use crate::model::closest;
use crate::sample_order::{self, SampleOrderError};
use crate::{ModelConfig, Preset};

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct ManifestError {
    pub field: String,
    pub message: String,
}

fn error(field: impl Into<String>, message: impl Into<String>) -> ManifestError {
    ManifestError {
        field: field.into(),
        message: message.into(),
    }
}

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
    /// Canonical streams per source (none: the largest count up to 64 the
    /// batch and the shards allow); ranks that divide it read only their
    /// own streams' shards.
    pub streams: Option<usize>,
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
    pub url: String,
    pub kind: DatasetKind,
    pub weight: f64,
    /// For jft: `clip80`, `simple`, or the URL/path of a templates file.
    pub templates: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    Cosine,
    Linear,
    Constant,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum Contrastive {
    Local,
    Full,
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
}

/// `f32`, or `bf16`: mixed precision (matmuls and activations in bf16;
/// parameters, gradients, their all-reduce, AdamW's moments, losses,
/// softmaxes and the logit scale in f32).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    F32,
    Bf16,
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    Cpu,
    Cuda,
    /// burn's wgpu backend: Vulkan (Linux, Windows) or Metal (macOS) GPUs
    /// of any vendor, compiled from the same cubecl kernels as CUDA.
    Wgpu,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum CollectiveKind {
    Tcp,
    Nccl,
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

/// How much time cubecl spends choosing the fastest kernel for a shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum AutotuneLevel {
    Minimal,
    Balanced,
    Extensive,
    Full,
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
}

/// Keys of one table, read once each; what is left over is unknown.
struct Section<'a> {
    path: String,
    table: Option<&'a toml::Table>,
    known: Vec<&'static str>,
}

impl<'a> Section<'a> {
    fn new(path: &str, table: Option<&'a toml::Table>) -> Self {
        Self {
            path: path.to_string(),
            table,
            known: Vec::new(),
        }
    }

    fn field(&self, key: &str) -> String {
        format!("{}.{key}", self.path)
    }

    fn value(&mut self, key: &'static str) -> Option<&'a toml::Value> {
        self.known.push(key);
        self.table.and_then(|table| table.get(key))
    }

    fn typed<T>(
        &mut self,
        key: &'static str,
        what: &str,
        get: impl Fn(&toml::Value) -> Option<T>,
    ) -> Result<Option<T>, ManifestError> {
        match self.value(key) {
            None => Ok(None),
            Some(value) => get(value)
                .map(Some)
                .ok_or_else(|| error(self.field(key), format!("expected {what}, found {}", describe(value)))),
        }
    }

    fn int(&mut self, key: &'static str) -> Result<Option<u64>, ManifestError> {
        let field = self.field(key);
        match self.typed(key, "an integer", |v| v.as_integer())? {
            Some(value) if value < 0 => Err(error(field, format!("{value} is negative"))),
            other => Ok(other.map(|v| v as u64)),
        }
    }

    fn float(&mut self, key: &'static str) -> Result<Option<f64>, ManifestError> {
        self.typed(key, "a number", |v| {
            v.as_float().or_else(|| v.as_integer().map(|i| i as f64))
        })
    }

    fn boolean(&mut self, key: &'static str) -> Result<Option<bool>, ManifestError> {
        self.typed(key, "true or false", |v| v.as_bool())
    }

    fn string(&mut self, key: &'static str) -> Result<Option<String>, ManifestError> {
        self.typed(key, "a string", |v| v.as_str().map(str::to_string))
    }

    fn choice<T: Copy>(&mut self, key: &'static str, choices: &[(&str, T)], default: T) -> Result<T, ManifestError> {
        let field = self.field(key);
        match self.string(key)? {
            None => Ok(default),
            Some(text) => choices
                .iter()
                .find(|(name, _)| *name == text)
                .map(|(_, value)| *value)
                .ok_or_else(|| {
                    let names: Vec<&str> = choices.iter().map(|(name, _)| *name).collect();
                    error(field, format!("`{text}` is not one of {}", names.join(", ")))
                }),
        }
    }

    fn address(&mut self, key: &'static str, default: &str) -> Result<SocketAddr, ManifestError> {
        let field = self.field(key);
        let text = self.string(key)?.unwrap_or_else(|| default.to_string());
        text.parse().map_err(|_| {
            error(
                field,
                format!("`{text}` is not an address (host:port, e.g. 127.0.0.1:7070)"),
            )
        })
    }

    /// Unknown keys are errors, with the closest known key suggested.
    fn finish(self) -> Result<(), ManifestError> {
        let Some(table) = self.table else { return Ok(()) };
        for key in table.keys() {
            if !self.known.contains(&key.as_str()) {
                let message = match closest(key, &self.known) {
                    Some(near) => format!("unknown key; did you mean `{near}`?"),
                    None => format!("unknown key; known keys: {}", self.known.join(", ")),
                };
                return Err(error(self.field(key), message));
            }
        }
        Ok(())
    }
}

fn describe(value: &toml::Value) -> String {
    match value {
        toml::Value::String(text) => format!("the string \"{text}\""),
        toml::Value::Integer(n) => format!("the integer {n}"),
        toml::Value::Float(x) => format!("the number {x}"),
        toml::Value::Boolean(b) => format!("{b}"),
        toml::Value::Datetime(_) => "a date".into(),
        toml::Value::Array(_) => "an array".into(),
        toml::Value::Table(_) => "a table".into(),
    }
}

fn table<'a>(root: &'a toml::Table, key: &str, path: &str) -> Result<Option<&'a toml::Table>, ManifestError> {
    match root.get(key) {
        None => Ok(None),
        Some(toml::Value::Table(table)) => Ok(Some(table)),
        Some(other) => Err(error(path, format!("expected a table, found {}", describe(other)))),
    }
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
    fn apply(&self, root: &mut toml::Table) {
        let mut set = |section: &str, key: &str, value: u64| {
            let entry = root
                .entry(section)
                .or_insert_with(|| toml::Value::Table(Default::default()));
            if let toml::Value::Table(section) = entry {
                if key == "steps" {
                    section.remove("epochs");
                }
                section.insert(key.to_string(), toml::Value::Integer(value as i64));
            }
        };
        if let Some(workers) = self.workers {
            set("cluster", "workers", workers as u64);
        }
        if let Some(steps) = self.steps {
            set("job", "steps", steps);
        }
        if let Some(warmup_steps) = self.warmup_steps {
            set("train", "warmup_steps", warmup_steps);
        }
    }
}

impl Manifest {
    /// Parses and validates a manifest; `origin` (its path) starts syntax errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self, ManifestError> {
        Self::parse_with(text, origin, &Overrides::default())
    }

    /// [`Manifest::parse`] with a command line's overrides applied.
    pub fn parse_with(text: &str, origin: &str, overrides: &Overrides) -> Result<Self, ManifestError> {
        let mut root: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| error(origin, e.to_string().trim().to_string()))?;
        overrides.apply(&mut root);
        const SECTIONS: [&str; 11] = [
            "job",
            "model",
            "data",
            "train",
            "cluster",
            "checkpoint",
            "eval",
            "gpu",
            "status",
            "auth",
            "recovery",
        ];
        for key in root.keys() {
            if !SECTIONS.contains(&key.as_str()) {
                let message = match closest(key, &SECTIONS) {
                    Some(near) => format!("unknown section; did you mean `[{near}]`?"),
                    None => format!("unknown section; sections: {}", SECTIONS.join(", ")),
                };
                return Err(error(key.as_str(), message));
            }
        }

        let job = Self::job(&root)?;
        let (preset, model) = Self::model(table(&root, "model", "model")?)?;
        let data = Self::data(table(&root, "data", "data")?)?;
        let train = Self::train(&root)?;
        let cluster = Self::cluster(&root)?;
        let checkpoint = Self::checkpoint(&root)?;
        let eval = Self::eval(&root)?;
        let gpu = Self::gpu(&root, &job, checkpoint.as_ref())?;
        let status = Self::status(&root)?;
        let auth = Self::auth(&root)?;
        let recovery = Self::recovery(&root, &cluster)?;

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
            auth,
            recovery,
        };
        manifest.validate()?;
        Ok(manifest)
    }

    fn job(root: &toml::Table) -> Result<Job, ManifestError> {
        let mut section = Section::new("job", table(root, "job", "job")?);
        let name = section.string("name")?;
        let seed = section.int("seed")?.unwrap_or(0);
        let steps = section.int("steps")?;
        let epochs = section.float("epochs")?;
        let dir = section.string("dir")?;
        section.finish()?;
        let name = name.ok_or_else(|| error("job.name", "missing"))?;
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
            return Err(error(
                "job.name",
                format!("`{name}` must be letters, digits, `-` or `_`"),
            ));
        }
        let length = match (steps, epochs) {
            (Some(_), Some(_)) => return Err(error("job.steps", "give job.steps or job.epochs, not both")),
            (None, None) => return Err(error("job.steps", "missing (or give job.epochs)")),
            (Some(0), None) => return Err(error("job.steps", "must be at least 1")),
            (Some(steps), None) => Length::Steps(steps),
            (None, Some(epochs)) if !(epochs > 0.0 && epochs.is_finite()) => {
                return Err(error("job.epochs", format!("{epochs} must be a positive number")))
            }
            (None, Some(epochs)) => Length::Epochs(epochs),
        };
        let dir = dir.unwrap_or_else(|| format!("runs/{name}"));
        Ok(Job {
            name,
            seed,
            length,
            dir,
        })
    }

    fn train(root: &toml::Table) -> Result<Train, ManifestError> {
        let mut section = Section::new("train", table(root, "train", "train")?);
        let global_batch = section.int("global_batch")?;
        let train = Train {
            global_batch: global_batch.unwrap_or(0) as usize,
            learning_rate: section.float("learning_rate")?.unwrap_or(5e-4),
            warmup_steps: section.int("warmup_steps")?.unwrap_or(0),
            schedule: section.choice(
                "schedule",
                &[
                    ("cosine", Schedule::Cosine),
                    ("linear", Schedule::Linear),
                    ("constant", Schedule::Constant),
                ],
                Schedule::Cosine,
            )?,
            end_learning_rate: section.float("end_learning_rate")?.unwrap_or(0.0),
            beta1: section.float("beta1")?.unwrap_or(0.9),
            beta2: section.float("beta2")?.unwrap_or(0.999),
            weight_decay: section.float("weight_decay")?.unwrap_or(0.01),
            eps: section.float("eps")?.unwrap_or(1e-8),
            lambda_con: section.float("lambda_con")?.unwrap_or(1.0),
            lambda_cap: section.float("lambda_cap")?.unwrap_or(2.0),
            contrastive: section.choice(
                "contrastive",
                &[("local", Contrastive::Local), ("full", Contrastive::Full)],
                Contrastive::Local,
            )?,
            // f32 until bf16 has passed its check on a GPU (scripts/gpu/check.sh).
            precision: section.choice(
                "precision",
                &[("f32", Precision::F32), ("bf16", Precision::Bf16)],
                Precision::F32,
            )?,
        };
        section.finish()?;
        if global_batch.is_none() {
            return Err(error("train.global_batch", "missing"));
        }
        Ok(train)
    }

    fn cluster(root: &toml::Table) -> Result<Cluster, ManifestError> {
        let mut section = Section::new("cluster", table(root, "cluster", "cluster")?);
        let workers = section.int("workers")?.unwrap_or(1) as usize;
        let backend = section.choice(
            "backend",
            &[("cpu", Backend::Cpu), ("cuda", Backend::Cuda), ("wgpu", Backend::Wgpu)],
            Backend::Cpu,
        )?;
        // tcp on every backend until NCCL has passed its check on a GPU
        // (scripts/gpu/check.sh); `nccl` is there for CUDA jobs that ask.
        let collective = section.choice(
            "collective",
            &[("tcp", CollectiveKind::Tcp), ("nccl", CollectiveKind::Nccl)],
            CollectiveKind::Tcp,
        )?;
        let coordinator = section.address("coordinator", "127.0.0.1:7070")?;
        let worker_host_text = section.string("worker_host")?.unwrap_or_else(|| "127.0.0.1".into());
        let worker_host = worker_host_text.parse().map_err(|_| {
            error(
                "cluster.worker_host",
                format!("`{worker_host_text}` is not an IP address"),
            )
        })?;
        let cluster = Cluster {
            workers,
            backend,
            collective,
            coordinator,
            worker_host,
            heartbeat_ms: section.int("heartbeat_ms")?.unwrap_or(1000),
            heartbeat_timeout_ms: section.int("heartbeat_timeout_ms")?.unwrap_or(10_000),
            replicas: section.int("replicas")?.unwrap_or(1) as usize,
        };
        section.finish()?;
        Ok(cluster)
    }

    fn checkpoint(root: &toml::Table) -> Result<Option<Checkpoint>, ManifestError> {
        Ok(match table(root, "checkpoint", "checkpoint")? {
            None => None,
            Some(checkpoint) => {
                let mut section = Section::new("checkpoint", Some(checkpoint));
                let url = section.string("url")?;
                let every = section.int("every")?.unwrap_or(100);
                let keep = section.int("keep")?.unwrap_or(3) as usize;
                section.finish()?;
                let url = url.ok_or_else(|| error("checkpoint.url", "missing"))?;
                Some(Checkpoint { url, every, keep })
            }
        })
    }

    fn eval(root: &toml::Table) -> Result<Option<Eval>, ManifestError> {
        Ok(match table(root, "eval", "eval")? {
            None => None,
            Some(eval) => {
                let mut section = Section::new("eval", Some(eval));
                let every = section.int("every")?.unwrap_or(100);
                let zeroshot = section.string("zeroshot")?;
                let retrieval = section.string("retrieval")?;
                let templates = section.string("templates")?.unwrap_or_else(|| "clip80".into());
                let limit = section.int("limit")?.unwrap_or(512);
                section.finish()?;
                Some(Eval {
                    every,
                    zeroshot,
                    retrieval,
                    templates,
                    limit,
                })
            }
        })
    }

    /// `kernel_cache` defaults to a folder beside the checkpoints, else in the job's directory.
    fn gpu(root: &toml::Table, job: &Job, checkpoint: Option<&Checkpoint>) -> Result<Gpu, ManifestError> {
        let mut section = Section::new("gpu", table(root, "gpu", "gpu")?);
        let gpu = Gpu {
            autotune: section.choice(
                "autotune",
                &[
                    ("minimal", AutotuneLevel::Minimal),
                    ("balanced", AutotuneLevel::Balanced),
                    ("extensive", AutotuneLevel::Extensive),
                    ("full", AutotuneLevel::Full),
                ],
                AutotuneLevel::Minimal,
            )?,
            kernel_cache: match section.string("kernel_cache")? {
                Some(url) => url,
                None => {
                    let beside = checkpoint.map_or(job.dir.as_str(), |c| c.url.as_str());
                    format!("{}/kernel-cache", beside.trim_end_matches('/'))
                }
            },
            log_compilations: section.boolean("log_compilations")?.unwrap_or(true),
        };
        section.finish()?;
        if gpu.kernel_cache.is_empty() {
            return Err(error("gpu.kernel_cache", "is empty (the URL of a directory)"));
        }
        Ok(gpu)
    }

    fn status(root: &toml::Table) -> Result<Status, ManifestError> {
        let mut section = Section::new("status", table(root, "status", "status")?);
        let status = Status {
            bind: section.address("bind", "127.0.0.1:7071")?,
        };
        section.finish()?;
        Ok(status)
    }

    fn recovery(root: &toml::Table, cluster: &Cluster) -> Result<Recovery, ManifestError> {
        let mut section = Section::new("recovery", table(root, "recovery", "recovery")?);
        let recovery = Recovery {
            max_restarts: section.int("max_restarts")?.unwrap_or(10).min(u64::from(u32::MAX)) as u32,
            min_workers: section.int("min_workers")?.map_or(cluster.workers, |n| n as usize),
            replacement_timeout_ms: section.int("replacement_timeout_ms")?.unwrap_or(60_000),
        };
        section.finish()?;
        Ok(recovery)
    }

    fn auth(root: &toml::Table) -> Result<Auth, ManifestError> {
        let mut section = Section::new("auth", table(root, "auth", "auth")?);
        let auth = Auth {
            token_env: section.string("token_env")?.unwrap_or_else(|| "COCA_JOB_TOKEN".into()),
            token_file: section.string("token_file")?,
        };
        section.finish()?;
        Ok(auth)
    }

    fn model(model: Option<&toml::Table>) -> Result<(Preset, ModelConfig), ManifestError> {
        let mut overrides = model.cloned().unwrap_or_default();
        let preset = match overrides.remove("preset") {
            None => return Err(error("model.preset", "missing (tiny, bench, base, large or giant)")),
            Some(toml::Value::String(name)) => name
                .parse::<Preset>()
                .map_err(|e| error("model.preset", e.to_string()))?,
            Some(other) => {
                return Err(error(
                    "model.preset",
                    format!("expected a string, found {}", describe(&other)),
                ))
            }
        };
        let config = ModelConfig::resolve(preset, &overrides).map_err(|e| {
            let (field, message) = e.field_and_message();
            error(field, message)
        })?;
        Ok((preset, config))
    }

    fn data(data: Option<&toml::Table>) -> Result<Data, ManifestError> {
        let data = data.ok_or_else(|| error("data", "missing: at least one [[data.source]]"))?;
        let mut section = Section::new("data", Some(data));
        let sources_value = section.value("source");
        let tokenizer = section.string("tokenizer")?;
        let demo = section.string("demo")?;
        let loader_threads = section.int("loader_threads")?.unwrap_or(2) as usize;
        let prefetch_batches = section.int("prefetch_batches")?.unwrap_or(2) as usize;
        let max_bad_fraction = section.float("max_bad_fraction")?.unwrap_or(0.01);
        let streams = section.int("streams")?.map(|n| n as usize);
        let shuffle_window = section.int("shuffle_window")?.unwrap_or(2) as usize;
        let shard_memory_bytes = section.int("shard_memory_bytes")?.unwrap_or(1 << 30);
        let fetch_ahead_bytes = section.int("fetch_ahead_bytes")?.unwrap_or(256 << 20);
        let cache_dir = section.string("cache_dir")?;
        let cache_bytes = section.int("cache_bytes")?.unwrap_or(64 << 30);
        let s3_endpoint = section.string("s3_endpoint")?;
        let s3_region = section.string("s3_region")?;
        section.finish()?;
        let tokenizer = tokenizer.ok_or_else(|| error("data.tokenizer", "missing (the URL of a tokenizer.json)"))?;
        let entries = match sources_value {
            Some(toml::Value::Array(entries)) if !entries.is_empty() => entries,
            Some(toml::Value::Array(_)) | None => {
                return Err(error("data.source", "missing: at least one [[data.source]]"))
            }
            Some(other) => {
                return Err(error(
                    "data.source",
                    format!("expected [[data.source]] tables, found {}", describe(other)),
                ))
            }
        };
        let mut sources = Vec::new();
        for (i, entry) in entries.iter().enumerate() {
            let path = format!("data.source[{i}]");
            let toml::Value::Table(entry) = entry else {
                return Err(error(path, format!("expected a table, found {}", describe(entry))));
            };
            let mut section = Section::new(&path, Some(entry));
            let url = section.string("url")?;
            let kind_text = section.string("kind")?;
            let weight = section.float("weight")?.unwrap_or(1.0);
            let templates = section.string("templates")?;
            section.finish()?;
            let url = url.ok_or_else(|| error(format!("{path}.url"), "missing"))?;
            let kind_text = kind_text.ok_or_else(|| error(format!("{path}.kind"), "missing (align or jft)"))?;
            let kind = match kind_text.as_str() {
                "align" => DatasetKind::Align,
                "jft" => DatasetKind::Jft,
                other => {
                    return Err(error(
                        format!("{path}.kind"),
                        format!("`{other}` is not one of align, jft"),
                    ))
                }
            };
            if !(weight > 0.0 && weight.is_finite()) {
                return Err(error(
                    format!("{path}.weight"),
                    format!("{weight} must be a positive number"),
                ));
            }
            if templates.is_some() && kind == DatasetKind::Align {
                return Err(error(
                    format!("{path}.templates"),
                    "only jft sources use prompt templates",
                ));
            }
            sources.push(Source {
                url,
                kind,
                weight,
                templates: templates.unwrap_or_else(|| "clip80".into()),
            });
        }
        Ok(Data {
            sources,
            tokenizer,
            demo,
            loader_threads,
            prefetch_batches,
            max_bad_fraction,
            streams,
            shuffle_window,
            shard_memory_bytes,
            fetch_ahead_bytes,
            cache_dir,
            cache_bytes,
            s3_endpoint,
            s3_region,
        })
    }

    /// The rules between fields.
    /// The rules between fields, checked once every section is read.
    fn validate(&self) -> Result<(), ManifestError> {
        self.validate_batch()?;
        self.validate_optimizer()?;
        self.validate_data()?;
        self.validate_cluster()?;
        self.validate_checkpoint_and_eval()
    }

    /// The global batch splits between the workers and feeds every source.
    fn validate_batch(&self) -> Result<(), ManifestError> {
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

    fn validate_optimizer(&self) -> Result<(), ManifestError> {
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
        Ok(())
    }

    fn validate_data(&self) -> Result<(), ManifestError> {
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

    fn validate_cluster(&self) -> Result<(), ManifestError> {
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
        if micro_batch % replicas != 0 {
            return Err(error(
                "cluster.replicas",
                format!(
                    "{replicas} does not divide each worker's micro-batch of {micro_batch} (train.global_batch / cluster.workers)"
                ),
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

    fn validate_checkpoint_and_eval(&self) -> Result<(), ManifestError> {
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
