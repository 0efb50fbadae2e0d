//! Command-line parsing and dispatch.

mod bench;
mod data;
mod model;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use proto::{ModelConfig, Preset};

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
    /// Build, import and inspect datasets; train a tokenizer.
    #[command(subcommand)]
    Data(data::DataCommand),
}

impl Cli {
    pub fn run(self) -> anyhow::Result<()> {
        match self.command {
            Command::Model(command) => command.run(),
            Command::Bench(command) => command.run(),
            Command::Data(command) => command.run(),
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
    /// Model preset: tiny, bench, base, large or giant.
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
