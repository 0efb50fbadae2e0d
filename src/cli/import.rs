//! `coca import open-clip`: an open_clip CoCa state dict as a committed
//! checkpoint (step 0, a fresh optimizer, the tokenizer included) that
//! `coca launch --from`, `coca eval`, `coca caption` and `coca embed` take.

use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use checkpoint::layout::ResumeFields;
use clap::Subcommand;
use contract::{ModelConfig, Preset};
use datasets::clip_tokenizer::clip_tokenizer_json;
use datasets::tokenizer::TextTokenizer;
use model::backend::CpuTrain;
use model::open_clip;

use super::StoreArgs;

#[derive(Debug, Subcommand)]
pub enum ImportCommand {
    /// An open_clip CoCa checkpoint (its state dict as safetensors).
    ///
    /// A PyTorch pickle (.pt/.bin) converts with one line of Python:
    /// `torch.load(...)` then `safetensors.torch.save_file(...)` (README).
    OpenClip {
        /// The state dict (a path or store URL).
        #[arg(long)]
        weights: String,
        /// open_clip's model name (coca_ViT-B-32, coca_ViT-L-14) or its
        /// model JSON (a path or store URL).
        #[arg(long)]
        config: String,
        /// The checkpoint location to write step 0 to; must hold no committed step.
        #[arg(long)]
        out: String,
        /// A tokenizer.json instead of CLIP's BPE (for models not trained on CLIP's vocabulary).
        #[arg(long)]
        tokenizer: Option<String>,
        #[command(flatten)]
        store: StoreArgs,
    },
}

impl ImportCommand {
    pub fn run(self) -> anyhow::Result<u8> {
        match self {
            ImportCommand::OpenClip {
                weights,
                config,
                out,
                tokenizer,
                store,
            } => import_open_clip(&weights, &config, &out, tokenizer.as_deref(), &store),
        }
    }
}

/// An object's bytes, as the store holds them (no copy: the weights may be gigabytes).
fn read(url: &str, store: &StoreArgs) -> anyhow::Result<bytes::Bytes> {
    let (objects, name) = store.open_object(url)?;
    Ok(objects.get(&name).with_context(|| format!("cannot read {url}"))?)
}

fn import_open_clip(
    weights: &str,
    config_name: &str,
    out: &str,
    tokenizer: Option<&str>,
    store: &StoreArgs,
) -> anyhow::Result<u8> {
    let started = Instant::now();
    let config = match open_clip::named_config(config_name) {
        Some(config) => config,
        None => {
            let json = String::from_utf8(
                read(config_name, store)
                    .with_context(|| {
                        let known: Vec<&str> = open_clip::NAMED_CONFIGS.iter().map(|(name, _)| *name).collect();
                        format!(
                            "--config {config_name}: neither a known name ({}) nor a readable file",
                            known.join(", ")
                        )
                    })?
                    .to_vec(),
            )
            .with_context(|| format!("{config_name}: not UTF-8"))?;
            open_clip::config_from_json(&json, config_name)?
        }
    };
    let (tokenizer_json, tokenizer_origin) = match tokenizer {
        Some(url) => (
            String::from_utf8(read(url, store)?.to_vec()).with_context(|| format!("{url}: not UTF-8"))?,
            url.to_string(),
        ),
        None => (clip_tokenizer_json(), "CLIP's BPE tokenizer".to_string()),
    };
    let tokens = TextTokenizer::from_json(&tokenizer_json, &tokenizer_origin)?.vocab_size();
    if tokens > config.vocab_size {
        bail!(
            "{tokenizer_origin} has {tokens} tokens, more than the model's vocabulary ({}); \
             give --tokenizer a tokenizer.json of at most {} tokens",
            config.vocab_size,
            config.vocab_size
        );
    }
    let root = store.open(out)?;
    if let Some(step) = checkpoint::steps(&root)?.0.first() {
        bail!("--out {out} already holds committed step {step}; import into an empty location");
    }
    let bytes = read(weights, store)?;
    let read_seconds = started.elapsed().as_secs_f64();
    let model = open_clip::import::<CpuTrain>(&config, &bytes, weights, &Default::default())?;
    drop(bytes);
    let mapped_seconds = started.elapsed().as_secs_f64();
    let resume = ResumeFields {
        model: serde_json::to_string(&config)?,
        imported: Some(format!("open_clip state dict {weights}")),
        ..ResumeFields::default()
    };
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs_f64();
    let step = model::state::write_initial(&root, &model, resume, &tokenizer_json, now)?;
    let counts = config.param_counts();
    println!(
        "imported {weights}: {} parameters ({config_name}) in {:.1} s (read {read_seconds:.1} s, mapped {:.1} s, written {:.1} s) -> {step}",
        counts.total(),
        started.elapsed().as_secs_f64(),
        mapped_seconds - read_seconds,
        started.elapsed().as_secs_f64() - mapped_seconds,
    );
    println!(
        "train on from it: `coca launch MANIFEST --from {step}` with data.tokenizer = \"{step}/tokenizer.json\" and\n{}",
        model_table(&config)?
    );
    Ok(0)
}

/// The manifest's `[model]` table that gives `config`.
fn model_table(config: &ModelConfig) -> anyhow::Result<String> {
    Ok(
        match Preset::ALL.into_iter().find(|preset| preset.config() == *config) {
            Some(preset) => format!("[model]\npreset = \"{preset}\""),
            None => format!("[model]\npreset = \"tiny\"\n{}", toml::to_string(config)?),
        },
    )
}
