//! `coca eval` and `coca caption`: what a trained model does, from an
//! export file or a committed checkpoint.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::Subcommand;
use contract::dataset::INDEX_FILE;
use datasets::dataset::Dataset;
use datasets::import::{ImageFolder, ImportOptions};
use datasets::prompt::PromptTemplates;
use model::backend::Cpu;
use model::eval::tasks::{self, Labelled};
use model::generate::{generate, Generation, Strategy};
use model::inference::{self, Loaded};

use super::StoreArgs;

#[derive(Debug, Subcommand)]
pub enum EvalCommand {
    /// Zero-shot classification of a jft dataset, or of a folder of class
    /// folders read in place (ImageNet's layout): top-1/top-5 accuracy,
    /// per-class accuracy and the confusion matrix as a PNG.
    Zeroshot {
        #[command(flatten)]
        model: ModelSource,
        /// The dataset (a path or store URL), or a local folder with one
        /// folder of images per class.
        #[arg(long)]
        data: String,
        /// A class folder's classes: `imagenet1k` (ImageNet-1k's, built in:
        /// folders named by WordNet id, or 1000 folders in class order), or
        /// a class-name file (one per line, in folder order); by default the
        /// folder names.
        #[arg(long, value_name = "imagenet1k|FILE")]
        classes: Option<String>,
        /// Prompt templates: clip80, simple, or a file (one per line, with {}).
        #[arg(long, default_value = "clip80")]
        templates: String,
        /// Draw the confusion matrix (class names, counts, title) into this PNG.
        #[arg(long, value_name = "FILE.png")]
        confusion: Option<PathBuf>,
        #[command(flatten)]
        options: EvalOptions,
    },
    /// Image-to-text and text-to-image recall@1/5/10 on an align dataset.
    Retrieval {
        #[command(flatten)]
        model: ModelSource,
        #[arg(long)]
        data: String,
        #[command(flatten)]
        options: EvalOptions,
    },
    /// BLEU-4 and CIDEr-D of generated captions against the dataset's texts
    /// (align) or its class names in the templates (jft).
    Caption {
        #[command(flatten)]
        model: ModelSource,
        #[arg(long)]
        data: String,
        #[arg(long, default_value = "simple")]
        templates: String,
        #[command(flatten)]
        generation: GenerationArgs,
        #[command(flatten)]
        options: EvalOptions,
    },
}

/// Where the model comes from.
#[derive(Debug, clap::Args)]
pub struct ModelSource {
    /// `coca export`'s file, a checkpoint location (its newest whole step)
    /// or one step directory.
    #[arg(long)]
    checkpoint: String,
    /// `ema`: the step's moving average of the parameters (train.ema_decay).
    #[arg(long, value_enum, default_value = "model")]
    weights: Weights,
    #[command(flatten)]
    pub(super) store: StoreArgs,
}

#[derive(Debug, clap::Args)]
pub struct EvalOptions {
    /// Samples per forward pass.
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// Evaluate the first N samples only.
    #[arg(long)]
    limit: Option<u64>,
    /// Print JSON instead of a summary.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Args)]
pub struct GenerationArgs {
    /// Beam search with N beams (1: greedy).
    #[arg(long, default_value_t = 1)]
    beam: usize,
    /// Tokens generated at most.
    #[arg(long, default_value_t = 32)]
    max_len: usize,
    /// Sample at this temperature instead of searching.
    #[arg(long)]
    temperature: Option<f32>,
    /// Nucleus sampling: the smallest set of tokens reaching this probability.
    #[arg(long, default_value_t = 0.9, requires = "temperature")]
    top_p: f32,
    /// Top-k sampling: only the K most likely tokens; the nucleus of
    /// --top-p is taken among them (--top-p 1: top-k alone).
    #[arg(long, value_name = "K", requires = "temperature")]
    top_k: Option<usize>,
    /// Divide the logit of every token the caption already holds by this
    /// (multiply where negative), as open_clip's repetition_penalty; 1: off.
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f32,
    /// Tokens generated before the caption may end.
    #[arg(long, default_value_t = 0)]
    min_len: usize,
    /// End the caption once this word (one token of the tokenizer) is
    /// generated, kept in it: `--stop .` ends at the first full stop.
    #[arg(long, value_name = "WORD")]
    stop: Option<String>,
    /// Seed of the sampling.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Recompute the whole prefix for every token (no key/value cache).
    #[arg(long)]
    no_cache: bool,
}

impl GenerationArgs {
    fn generation(&self, loaded: &Loaded<Cpu>) -> anyhow::Result<Generation> {
        let strategy = match (self.temperature, self.beam) {
            (Some(temperature), _) => {
                anyhow::ensure!(temperature > 0.0, "--temperature must be above 0");
                anyhow::ensure!(self.top_p > 0.0 && self.top_p <= 1.0, "--top-p must be in (0, 1]");
                anyhow::ensure!(self.top_k != Some(0), "--top-k must be at least 1");
                Strategy::Sample {
                    temperature,
                    top_p: self.top_p,
                    top_k: self.top_k,
                    seed: self.seed,
                }
            }
            (None, 0) => bail!("--beam must be at least 1"),
            (None, 1) => Strategy::Greedy,
            (None, beams) => Strategy::Beam(beams),
        };
        anyhow::ensure!(
            self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite(),
            "--repetition-penalty must be a positive number (1: off)"
        );
        anyhow::ensure!(
            self.min_len <= self.max_len,
            "--min-len {} is more than --max-len {}",
            self.min_len,
            self.max_len
        );
        let stop = match &self.stop {
            Some(word) => Some(
                loaded
                    .tokenizer
                    .single_token(word)
                    .with_context(|| format!("--stop {word:?}"))?,
            ),
            None => None,
        };
        Ok(Generation {
            cache: !self.no_cache,
            repetition_penalty: self.repetition_penalty,
            min_len: self.min_len,
            stop,
            ..Generation::new(
                strategy,
                self.max_len,
                loaded.tokenizer.bos_id(),
                loaded.tokenizer.eos_id(),
            )
        })
    }
}

/// The state of the committed step a checkpoint URL names: a step
/// directory, `step` under a location, or the location's newest step whose
/// shards are all whole (damaged ones are skipped, by name). Read once.
/// With `Weights::Ema`, its parameters are the step's moving average.
pub fn read_step(
    checkpoint: &str,
    step: Option<u64>,
    weights: Weights,
    store: &StoreArgs,
) -> anyhow::Result<checkpoint::NamedState> {
    let mut named = checkpoint::read_named(checkpoint, store.open(checkpoint)?, step)?;
    for skipped in &named.skipped {
        tracing::info!("skipping {skipped}");
    }
    if weights == Weights::Ema {
        let average = checkpoint::ema::read(&named.dir, &named.meta)?.with_context(|| {
            format!(
                "--weights ema: step {} of {checkpoint} holds no moving average (its job had no train.ema_decay)",
                named.meta.step
            )
        })?;
        named.values[..average.len()].copy_from_slice(&average);
    }
    Ok(named)
}

/// Which parameters of a step to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Weights {
    /// The trained parameters.
    Model,
    /// Their exponential moving average (`train.ema_decay`).
    Ema,
}

pub fn load(source: &ModelSource) -> anyhow::Result<Loaded<Cpu>> {
    let device = Default::default();
    let loaded = if source.checkpoint.ends_with(".safetensors") {
        anyhow::ensure!(
            source.weights == Weights::Model,
            "--weights ema reads a checkpoint's moving average; {} is an export (export it with --weights ema)",
            source.checkpoint
        );
        let (store, name) = source.store.open_object(&source.checkpoint)?;
        let bytes = store.get(&name)?;
        inference::from_export::<Cpu>(&bytes, &source.checkpoint, &device)?
    } else {
        let named = read_step(&source.checkpoint, None, source.weights, &source.store)?;
        inference::from_state::<Cpu>(&named.dir, named.meta, &named.values, &device)?
    };
    tracing::info!("model: step {} of {}", loaded.step, loaded.origin);
    Ok(loaded)
}

fn templates(spec: &str, store: &StoreArgs) -> anyhow::Result<PromptTemplates> {
    Ok(PromptTemplates::open(spec, &store.options())?)
}

fn dataset(url: &str, store: &StoreArgs) -> anyhow::Result<Dataset> {
    Ok(Dataset::open(store.open(url)?)?)
}

fn bar(dataset: &Dataset, limit: Option<u64>) -> indicatif::ProgressBar {
    let rows = dataset.index().rows();
    super::data::progress(Some(limit.map_or(rows, |l| l.min(rows))))
}

impl EvalCommand {
    pub fn run(self) -> anyhow::Result<u8> {
        match self {
            EvalCommand::Zeroshot {
                model,
                data,
                classes,
                templates: spec,
                confusion,
                options,
            } => zeroshot(model, data, classes, spec, confusion, options),
            EvalCommand::Retrieval { model, data, options } => retrieval(model, data, options),
            EvalCommand::Caption {
                model,
                data,
                templates: spec,
                generation,
                options,
            } => caption_dataset(model, data, spec, generation, options),
        }?;
        Ok(0)
    }
}

fn zeroshot(
    model: ModelSource,
    data: String,
    classes: Option<String>,
    spec: String,
    confusion: Option<PathBuf>,
    options: EvalOptions,
) -> anyhow::Result<()> {
    let loaded = load(&model)?;
    // A local folder that is no coca dataset is read in place, as class folders.
    let local = Path::new(&data);
    let folder = (local.is_dir() && !local.join(INDEX_FILE).exists())
        .then(|| match classes.as_deref() {
            Some("imagenet1k") => ImageFolder::imagenet1k(local, options.limit),
            classes => {
                let options = ImportOptions {
                    classes: classes.map(PathBuf::from),
                    limit: options.limit,
                };
                ImageFolder::open(local, &options)
            }
        })
        .transpose()
        .with_context(|| format!("--data {data}"))?;
    anyhow::ensure!(
        folder.is_some() || classes.is_none(),
        "--classes names the classes of a folder of class folders; {data} is a dataset with its own"
    );
    let opened;
    let source = match &folder {
        Some(folder) => Labelled::Folder(folder),
        None => {
            opened = dataset(&data, &model.store)?;
            Labelled::Dataset(&opened)
        }
    };
    let templates = templates(&spec, &model.store)?;
    let bar = super::data::progress(Some(source.total(options.limit)));
    let report = tasks::zero_shot(&loaded, source, &templates, options.batch, options.limit, &|n| {
        bar.set_position(n)
    })?;
    bar.finish_and_clear();
    if let Some(path) = &confusion {
        let names: Vec<String> = report.per_class.iter().map(|c| c.class.clone()).collect();
        let title = format!(
            "zero-shot top-1 {:.1}% | {data} | step {}",
            100.0 * report.top1,
            loaded.step
        );
        super::confusion::save(&super::confusion::draw(&report.confusion, &names, &title), path)?;
    }
    if options.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "zero-shot on {data}: {} samples, {} classes, {} templates",
            report.samples, report.classes, report.templates
        );
        println!("top-1 {:.2}%  top-5 {:.2}%", 100.0 * report.top1, 100.0 * report.top5);
        for class in &report.per_class {
            println!(
                "  {:<24} {:>6.2}% ({}/{})",
                class.class,
                100.0 * class.correct as f64 / class.total.max(1) as f64,
                class.correct,
                class.total
            );
        }
        if let Some(path) = &confusion {
            println!("confusion matrix: {}", path.display());
        }
    }
    Ok(())
}

fn retrieval(model: ModelSource, data: String, options: EvalOptions) -> anyhow::Result<()> {
    let loaded = load(&model)?;
    let dataset = dataset(&data, &model.store)?;
    let bar = bar(&dataset, options.limit);
    let report = tasks::retrieval(&loaded, &dataset, options.batch, options.limit, &|n| {
        bar.set_position(n)
    })?;
    bar.finish_and_clear();
    if options.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        let [i1, i5, i10] = report.image_to_text.map(|r| 100.0 * r);
        let [t1, t5, t10] = report.text_to_image.map(|r| 100.0 * r);
        println!("retrieval on {data}: {} image-text pairs", report.samples);
        println!("image -> text  R@1 {i1:.2}%  R@5 {i5:.2}%  R@10 {i10:.2}%");
        println!("text -> image  R@1 {t1:.2}%  R@5 {t5:.2}%  R@10 {t10:.2}%");
    }
    Ok(())
}

fn caption_dataset(
    model: ModelSource,
    data: String,
    spec: String,
    generation: GenerationArgs,
    options: EvalOptions,
) -> anyhow::Result<()> {
    let loaded = load(&model)?;
    let dataset = dataset(&data, &model.store)?;
    let templates = templates(&spec, &model.store)?;
    let generation = generation.generation(&loaded)?;
    let bar = bar(&dataset, options.limit);
    let report = tasks::captioning(&loaded, &dataset, &generation, &templates, options.limit, &|n| {
        bar.set_position(n)
    })?;
    bar.finish_and_clear();
    if options.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("captioning on {data}: {} images", report.samples);
        println!("BLEU-4 {:.4}  CIDEr-D {:.4}", report.bleu4, report.cider_d);
        for sample in report.captions.iter().take(5) {
            println!("  {}: {}", sample.key, sample.caption);
        }
    }
    Ok(())
}

/// `coca caption`: captions for image files.
/// An image file, decoded; errors name the file.
pub fn read_image(path: &std::path::Path) -> anyhow::Result<datasets::image::RgbImage> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    datasets::image::decode(&bytes).with_context(|| format!("{}", path.display()))
}

pub fn caption(
    source: &ModelSource,
    images: &[PathBuf],
    generation: &GenerationArgs,
    json: bool,
) -> anyhow::Result<u8> {
    let loaded = load(source)?;
    let generation = generation.generation(&loaded)?;
    let device = Default::default();
    let mut results = Vec::new();
    for path in images {
        let picture = read_image(path)?;
        let batch = inference::image_batch::<Cpu>(&[picture], loaded.config.image_size as u32, &device);
        let tokens = loaded.model.caption_image_tokens(batch);
        let ids = generate(&loaded.model, tokens, &generation);
        let caption = loaded.tokenizer.decode(&ids)?.trim().to_string();
        if json {
            results.push(serde_json::json!({"image": path.display().to_string(), "caption": caption}));
        } else {
            println!("{}: {caption}", path.display());
        }
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&results)?);
    }
    Ok(0)
}
