//! Command-line parsing and dispatch.

mod bench;
mod confusion;
mod data;
mod embed;
mod eval;
mod export;
mod import;
mod job;
mod kernels;
mod model;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use contract::manifest::Overrides;
use contract::{ModelConfig, Preset};

#[derive(Debug, Parser)]
#[command(
    name = "coca",
    version,
    about = "Pretrain CoCa (Contrastive Captioners) across many machines"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Describe a model configuration.
    #[command(subcommand)]
    Model(model::ModelCommand),
    /// Measure performance.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// GPU kernels: fill a job's kernel cache before its workers start.
    #[command(subcommand)]
    Kernels(kernels::KernelsCommand),
    /// Build, import and inspect datasets; train a tokenizer.
    #[command(subcommand)]
    Data(data::DataCommand),
    /// Evaluate a trained model: zero-shot classification, retrieval, captioning.
    #[command(subcommand)]
    Eval(eval::EvalCommand),
    /// Caption image files with a trained model.
    Caption {
        #[command(flatten)]
        model: eval::ModelSource,
        /// Image files (JPEG, PNG, WebP).
        #[arg(required = true)]
        images: Vec<std::path::PathBuf>,
        #[command(flatten)]
        generation: eval::GenerationArgs,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Bring in another project's checkpoint as a committed checkpoint.
    #[command(subcommand)]
    Import(import::ImportCommand),
    /// Write L2-normalised image or text embeddings (the contrastive head) to a safetensors file.
    Embed {
        #[command(flatten)]
        model: eval::ModelSource,
        /// Image files (JPEG, PNG, WebP): one row each, in this order.
        #[arg(long, num_args = 1.., required_unless_present = "texts", conflicts_with = "texts")]
        images: Vec<std::path::PathBuf>,
        /// A text file: one row per line, in order.
        #[arg(long)]
        texts: Option<std::path::PathBuf>,
        /// Where to write (a path or store URL).
        #[arg(long)]
        out: String,
        /// Inputs per forward pass.
        #[arg(long, default_value_t = 64)]
        batch: usize,
    },
    /// Write a committed checkpoint's parameters to one safetensors file.
    Export {
        /// The checkpoint location (checkpoint.url) or one step directory in it.
        #[arg(long)]
        checkpoint: String,
        /// The step (default: the newest committed one).
        #[arg(long)]
        step: Option<u64>,
        /// Where to write (a path or store URL).
        #[arg(long)]
        out: String,
        /// coca's own names, or open_clip's state dict.
        #[arg(long, value_enum, default_value = "coca")]
        format: export::ExportFormat,
        /// `ema`: the step's moving average of the parameters (train.ema_decay).
        #[arg(long, value_enum, default_value = "model")]
        weights: eval::Weights,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Run a job on this machine: the coordinator and its workers as local processes.
    Launch {
        /// The job manifest (TOML).
        manifest: std::path::PathBuf,
        #[command(flatten)]
        overrides: Overrides,
        /// Keep the status endpoint up this many seconds after the job ends.
        #[arg(long, default_value_t = 0)]
        linger: u64,
        #[command(flatten)]
        resume: ResumeArgs,
    },
    /// Run a job's coordinator alone (clusters start workers separately).
    Coordinator {
        manifest: std::path::PathBuf,
        #[command(flatten)]
        overrides: Overrides,
        #[command(flatten)]
        resume: ResumeArgs,
    },
    /// Run one worker of a job.
    Worker {
        /// The coordinator's gRPC URL (default: from Slurm's or Kubernetes' environment).
        #[arg(long)]
        coordinator: Option<String>,
        /// The address this worker's collective listener binds and advertises
        /// (default: the local address of the route to the coordinator).
        #[arg(long)]
        listen: Option<std::net::IpAddr>,
        /// The environment variable holding the job token.
        #[arg(long, env = "COCA_TOKEN_ENV", default_value = "COCA_JOB_TOKEN")]
        token_env: String,
        /// The CA certificate (PEM) an https:// coordinator's certificate is
        /// verified against (its auth.tls_ca).
        #[arg(long, env = "COCA_CA_FILE")]
        ca: Option<std::path::PathBuf>,
        /// Seconds to keep trying to reach the coordinator.
        #[arg(long, default_value_t = 60)]
        connect_timeout: u64,
        /// The GPU ordinal for the cuda and wgpu backends (default: the only
        /// visible GPU, else SLURM_LOCALID, else 0).
        #[arg(long)]
        device: Option<usize>,
        /// CPU cores this worker may use (default: those available to the
        /// process); `coca launch` gives each local worker its share.
        #[arg(long)]
        cores: Option<usize>,
    },
    /// Show a job's status from its status endpoint.
    Status {
        /// e.g. http://127.0.0.1:7071
        url: String,
        /// The environment variable holding the job token, sent when set (an
        /// endpoint bound beyond loopback asks for it).
        #[arg(long, env = "COCA_TOKEN_ENV", default_value = "COCA_JOB_TOKEN")]
        token_env: String,
        /// For an https:// endpoint: the CA certificate (PEM) that signed its certificate.
        #[arg(long, env = "COCA_CA_FILE")]
        ca: Option<std::path::PathBuf>,
        /// The raw JSON.
        #[arg(long)]
        json: bool,
        /// Refresh every 2 s until the job ends.
        #[arg(long)]
        watch: bool,
    },
}

impl Cli {
    /// Runs the command; the result is the process exit code.
    pub fn run(self) -> anyhow::Result<u8> {
        match self.command {
            Command::Model(command) => command.run().map(|()| 0),
            Command::Bench(command) => command.run().map(|()| 0),
            Command::Kernels(command) => command.run().map(|()| 0),
            Command::Data(command) => command.run().map(|()| 0),
            Command::Eval(command) => command.run(),
            Command::Caption {
                model,
                images,
                generation,
                json,
            } => eval::caption(&model, &images, &generation, json),
            Command::Import(command) => command.run(),
            Command::Embed {
                model,
                images,
                texts,
                out,
                batch,
            } => embed::embed(&model, &images, texts.as_deref(), &out, batch),
            Command::Export {
                checkpoint,
                step,
                out,
                format,
                weights,
                store,
            } => export::export(&checkpoint, step, &out, format, weights, &store),
            Command::Launch {
                manifest,
                overrides,
                linger,
                resume,
            } => job::launch(&manifest, &overrides, linger, resume.resume()),
            Command::Coordinator {
                manifest,
                overrides,
                resume,
            } => job::coordinator(&manifest, &overrides, resume.resume()),
            Command::Worker {
                coordinator,
                listen,
                token_env,
                ca,
                connect_timeout,
                device,
                cores,
            } => job::worker(
                coordinator.as_deref(),
                listen,
                &token_env,
                ca,
                connect_timeout,
                device,
                cores,
            ),
            Command::Status {
                url,
                token_env,
                ca,
                json,
                watch,
            } => job::status(&url, &token_env, ca.as_deref(), json, watch),
        }
    }
}

/// Where a job starts: by default from the newest committed checkpoint
/// under checkpoint.url, when there is one.
#[derive(Debug, clap::Args)]
struct ResumeArgs {
    /// Start from step 0; refused when checkpoint.url holds a committed step.
    #[arg(long, conflicts_with = "from")]
    fresh: bool,
    /// Resume from this committed step directory (e.g. runs/demo/checkpoints/step-00000100).
    #[arg(long, value_name = "URL")]
    from: Option<String>,
}

impl ResumeArgs {
    fn resume(self) -> coordinator::Resume {
        match (self.fresh, self.from) {
            (true, _) => coordinator::Resume::Fresh,
            (false, Some(url)) => coordinator::Resume::From(url),
            (false, None) => coordinator::Resume::Latest,
        }
    }
}

/// How to reach S3-compatible stores; credentials come from the usual
/// AWS_* environment variables.
#[derive(Debug, clap::Args)]
struct StoreArgs {
    /// S3 endpoint, for S3-compatible servers (e.g. http://127.0.0.1:8333).
    #[arg(long, env = "AWS_ENDPOINT_URL")]
    s3_endpoint: Option<String>,
    /// S3 region.
    #[arg(long, env = "AWS_REGION")]
    s3_region: Option<String>,
}

/// A preset plus `--set key=value` overrides, as the manifest's `[model]` table has them.
#[derive(Debug, clap::Args)]
struct ModelArgs {
    /// Model preset: tiny, bench, base, large, giant, coca_vit_b_32 or coca_vit_l_14.
    #[arg(long, default_value = "base")]
    preset: Preset,
    /// Override a model field, e.g. `--set vocab_size=32000` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
}

impl ModelArgs {
    fn resolve(&self) -> anyhow::Result<ModelConfig> {
        let mut table = toml::Table::new();
        for assignment in &self.overrides {
            let Some((key, value)) = assignment.split_once('=') else {
                bail!("--set {assignment}: expected KEY=VALUE");
            };
            let key = key.trim();
            table.insert(key.to_string(), parse_value(value.trim()));
        }
        ModelConfig::resolve(self.preset, &table).context("invalid model configuration")
    }
}

/// A TOML value (`32000`, `true`, `1e-6`), or the text itself as a string
/// (so `--set pooler_layout=shared` needs no quotes).
fn parse_value(text: &str) -> toml::Value {
    format!("value = {text}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut table| table.remove("value"))
        .unwrap_or_else(|| toml::Value::String(text.to_string()))
}
