//! `coca data`: build, import, inspect datasets, and train a tokenizer.

use std::path::PathBuf;

use anyhow::{bail, Context};
use bytes::Bytes;
use clap::Subcommand;
use contract::dataset::{Container, DatasetKind};
use contract::shard_pattern::TarSource;
use datasets::bad_record::{self, BadRecord, Caption};
use datasets::dataset::{Dataset, DatasetError};
use datasets::demo::{self, DemoSpec};
use datasets::import::{self, ImportFormat, ImportOptions};
use datasets::prompt::PromptTemplates;
use datasets::shard::Compression;
use datasets::tokenizer::TextTokenizer;
use datasets::writer::DatasetWriter;
use datasets::{corpus, image as pixels};
use image::{imageops, RgbImage};
use indicatif::{ProgressBar, ProgressStyle};
use store::{Store, StoreOptions};
use webdataset::{IndexBuild, IndexPlace};

use super::StoreArgs;

#[derive(Debug, Subcommand)]
pub enum DataCommand {
    /// Write the demo datasets (coloured shapes: align captions, jft
    /// classes, a held-out jft split) and a tokenizer trained on them.
    Demo {
        /// Where: a path or a store URL (s3://bucket/prefix, ...).
        #[arg(long)]
        out: String,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long, default_value_t = DemoSpec::default().align_rows)]
        align_rows: u64,
        #[arg(long, default_value_t = DemoSpec::default().jft_rows)]
        jft_rows: u64,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Import a dataset from another format into Arrow shards.
    Import(ImportArgs),
    /// Describe a dataset, verify every shard, count bad records, and write
    /// a contact sheet of a few samples.
    Inspect {
        url: String,
        /// The contact sheet (PNG); the samples' texts are printed by number.
        #[arg(long, default_value = "contact-sheet.png")]
        sheet: PathBuf,
        #[arg(long, default_value_t = 16)]
        samples: usize,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Build the index of WebDataset tar shards read in place (every tar
    /// read once: samples, size, SHA-256), beside the tars; a job then
    /// starts without building it. The URL is a prefix of tars, one tar,
    /// or a brace pattern (`s3://b/laion/{00000..41407}.tar`).
    Index {
        url: String,
        #[arg(long, value_enum, default_value_t = KindArg::Align)]
        kind: KindArg,
        /// jft: the class names, one per line in id order (default:
        /// classes.txt beside the tars, else the names the samples hold).
        #[arg(long)]
        classes: Option<String>,
        /// Tars fetched and read at once (each is held in memory).
        #[arg(long, default_value_t = 4)]
        threads: usize,
        /// The job's directory (its `job.dir`): where the index goes when
        /// the tars' store is read-only (http).
        #[arg(long)]
        job_dir: Option<String>,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Train a byte-level BPE on the datasets' texts (and class names in
    /// prompt templates) and write tokenizer.json.
    Tokenizer {
        /// Dataset URLs (repeatable).
        #[arg(long = "data", required = true)]
        data: Vec<String>,
        #[arg(long, default_value_t = 32000)]
        vocab_size: usize,
        /// Where tokenizer.json goes (an object URL or a path).
        #[arg(long)]
        out: String,
        /// Templates for jft class names: clip80, simple, or a file of templates.
        #[arg(long, default_value = "clip80")]
        templates: String,
        #[command(flatten)]
        store: StoreArgs,
    },
}

#[derive(Debug, clap::Args)]
pub struct ImportArgs {
    /// imagefolder, captions, webdataset, img2dataset or idx.
    #[arg(long)]
    pub format: ImportFormat,
    /// The source: a folder, a captions file, a tar/parquet file or a
    /// folder of them, or an IDX images file.
    #[arg(long)]
    pub src: PathBuf,
    #[arg(long)]
    pub out: String,
    /// Rows per shard.
    #[arg(long, default_value_t = 4096)]
    pub shard_rows: usize,
    /// Class names, one per line (`name<TAB>parent` for a parent name);
    /// needed by idx, optional for imagefolder.
    #[arg(long)]
    pub classes: Option<PathBuf>,
    /// Import only the first N records.
    #[arg(long)]
    pub limit: Option<u64>,
    #[arg(long, value_enum, default_value_t = CompressionArg::None)]
    pub compression: CompressionArg,
    #[command(flatten)]
    pub store: StoreArgs,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum KindArg {
    Align,
    Jft,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum CompressionArg {
    None,
    Lz4,
}

impl DataCommand {
    pub fn run(self) -> anyhow::Result<()> {
        match self {
            DataCommand::Demo {
                out,
                seed,
                align_rows,
                jft_rows,
                store,
            } => demo(out, seed, align_rows, jft_rows, store),
            DataCommand::Import(args) => import(args),
            DataCommand::Inspect {
                url,
                sheet,
                samples,
                store,
            } => inspect(open_any(&url, &store)?, &sheet, samples),
            DataCommand::Index {
                url,
                kind,
                classes,
                threads,
                job_dir,
                store,
            } => index(&url, kind, classes, threads, job_dir, &store),
            DataCommand::Tokenizer {
                data,
                vocab_size,
                out,
                templates,
                store,
            } => tokenizer(data, vocab_size, out, templates, store),
        }
    }
}

fn demo(out: String, seed: u64, align_rows: u64, jft_rows: u64, store: StoreArgs) -> anyhow::Result<()> {
    let root = store.open(&out)?;
    let spec = DemoSpec {
        seed,
        align_rows,
        jft_rows,
        ..DemoSpec::default()
    };
    demo::write(&root, &spec).with_context(|| format!("writing the demo datasets to {}", root.url()))?;
    for name in [demo::ALIGN, demo::JFT, demo::HELDOUT] {
        let dataset = Dataset::open(root.at(name))?;
        println!(
            "{}  {} rows ({})",
            dataset.url(),
            dataset.index().rows(),
            dataset.index().kind
        );
    }
    println!("{}", root.object_url(demo::TOKENIZER));
    Ok(())
}

fn import(args: ImportArgs) -> anyhow::Result<()> {
    let ImportArgs {
        format,
        src,
        out,
        shard_rows,
        classes,
        limit,
        compression,
        store,
    } = args;
    if shard_rows == 0 {
        bail!("--shard-rows must be at least 1");
    }
    let target = store.open(&out)?;
    let options = ImportOptions { classes, limit };
    let mut importer = import::open(format, &src, &options)?;
    let compression = match compression {
        CompressionArg::None => Compression::None,
        CompressionArg::Lz4 => Compression::Lz4,
    };
    let source = format!("coca data import --format {format} --src {}", src.display());
    let writer = DatasetWriter::create(
        target.clone(),
        importer.kind(),
        importer.classes(),
        shard_rows,
        compression,
        &source,
    )?;
    let bar = progress(importer.total());
    let (index, summary) = import::import(importer.as_mut(), writer, limit, &mut |n| bar.set_position(n))?;
    bar.finish_and_clear();
    println!(
        "{}: {} rows in {} shards ({}), {} skipped",
        target.url(),
        summary.rows,
        index.shards.len(),
        index.kind,
        summary.skipped
    );
    for skip in &summary.first_skips {
        println!("  skipped {skip}");
    }
    Ok(())
}

fn tokenizer(
    data: Vec<String>,
    vocab_size: usize,
    out: String,
    templates: String,
    store: StoreArgs,
) -> anyhow::Result<()> {
    let templates = match templates.as_str() {
        "clip80" => PromptTemplates::clip80(),
        "simple" => PromptTemplates::simple(),
        path => {
            let text = std::fs::read_to_string(path).with_context(|| format!("reading templates {path}"))?;
            PromptTemplates::parse(&text, path)?
        }
    };
    let mut texts = Vec::new();
    for url in &data {
        let dataset = Dataset::open(store.open(url)?)?;
        texts.extend(corpus::texts(&dataset, &templates)?);
    }
    let tokenizer = TextTokenizer::train(texts.iter(), vocab_size)?;
    let (target, name) = store.open_object(&out)?;
    target.put(&name, Bytes::from(tokenizer.to_json()))?;
    println!(
        "{}: {} tokens, trained on {} texts",
        target.object_url(&name),
        tokenizer.vocab_size(),
        texts.len()
    );
    Ok(())
}

fn index(
    url: &str,
    kind: KindArg,
    classes: Option<String>,
    threads: usize,
    job_dir: Option<String>,
    store: &StoreArgs,
) -> anyhow::Result<()> {
    let kind = match kind {
        KindArg::Align => DatasetKind::Align,
        KindArg::Jft => DatasetKind::Jft,
    };
    let tars = TarSource::parse(url)?;
    let data = store.open(&tars.base)?;
    let job_dir = job_dir.map(|dir| store.open(&dir)).transpose()?;
    let classes = match (&classes, kind) {
        (Some(_), DatasetKind::Align) => anyhow::bail!("--classes: an align source has captions, not classes"),
        (Some(url), DatasetKind::Jft) => Some(webdataset::index::read_class_list(url, &store.options())?),
        (None, _) => None,
    };
    let build = IndexBuild { kind, classes, threads };
    let bar = progress_of(Some(0), "tars");
    let report = build.run(&tars, &data, &|done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    })?;
    bar.finish_and_clear();
    let place = IndexPlace {
        source: &tars,
        data: &data,
        job_dir: job_dir.as_ref(),
    };
    let written = place.write(&report.index)?;
    let index = &report.index;
    let bytes: u64 = index.shards.iter().map(|shard| shard.bytes).sum();
    println!(
        "{} tars, {} samples, {:.1} MB: {written}",
        index.shards.len(),
        index.rows(),
        bytes as f64 / 1e6
    );
    if kind == DatasetKind::Jft {
        println!("{} classes", index.classes.len());
    }
    for (url, why) in &report.truncated {
        println!("truncated: {url}: {why} (the samples before the cut are indexed)");
    }
    for (url, why) in &report.left_out {
        println!("left out: {url}: {why}");
    }
    if report.incomplete > 0 {
        println!(
            "incomplete: {} samples lack their image or {} (training counts them as bad records)",
            report.incomplete,
            if kind == DatasetKind::Align { "caption" } else { "class" }
        );
    }
    Ok(())
}

pub(super) fn progress(total: Option<u64>) -> ProgressBar {
    progress_of(total, "records")
}

/// A progress bar counting `unit`s, hidden off the terminal.
fn progress_of(total: Option<u64>, unit: &str) -> ProgressBar {
    let bar = match total {
        Some(total) => ProgressBar::new(total).with_style(
            ProgressStyle::with_template(&format!("{{bar:40}} {{pos}}/{{len}} {unit}, {{per_sec}}, eta {{eta}}"))
                .expect("a valid template"),
        ),
        None => ProgressBar::new_spinner().with_style(
            ProgressStyle::with_template(&format!("{{spinner}} {{pos}} {unit}, {{per_sec}}"))
                .expect("a valid template"),
        ),
    };
    // Off the terminal (CI logs), no redraws.
    if !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    bar
}

/// The dataset at `url`: Arrow shards with their index.json, else
/// WebDataset tars with the index kept for them (built now, in memory, if
/// there is none).
pub(super) fn open_any(url: &str, store: &StoreArgs) -> anyhow::Result<Dataset> {
    let tars = TarSource::parse(url)?;
    let data = store.open(&tars.base)?;
    let place = IndexPlace {
        source: &tars,
        data: &data,
        job_dir: None,
    };
    if tars.pattern.is_none() {
        match Dataset::open(data.clone()) {
            // A prefix of tars, or nothing: the Arrow error says what is missing.
            Err(missing @ DatasetError::Missing { .. }) => {
                let tars_here = data.list("")?.iter().any(|object| object.name.ends_with(".tar"));
                if !tars_here {
                    return Err(missing.into());
                }
            }
            arrow => return Ok(arrow?),
        }
    }
    let index = match place.read()? {
        Some((index, _)) => index,
        None => {
            eprintln!(
                "{url}: no index.json and no tar index; indexing its tars (as align; `coca data index` keeps one)"
            );
            let build = IndexBuild {
                kind: DatasetKind::Align,
                classes: None,
                threads: 4,
            };
            build.run(&tars, &data, &|_, _| {})?.index
        }
    };
    Ok(Dataset::with_index(data, index))
}

fn inspect(dataset: Dataset, sheet: &std::path::Path, samples: usize) -> anyhow::Result<()> {
    let index = dataset.index();
    let bytes: u64 = index.shards.iter().map(|shard| shard.bytes).sum();
    println!("dataset   {}", dataset.url());
    println!("kind      {}", index.kind);
    println!("rows      {}", index.rows());
    println!(
        "shards    {} ({:.1} MiB)",
        index.shards.len(),
        bytes as f64 / (1 << 20) as f64
    );
    match index.container {
        Container::Arrow => {
            let schema = datasets::shard::schema(index.kind);
            let columns: Vec<String> = schema
                .fields()
                .iter()
                .map(|f| format!("{}: {}", f.name(), f.data_type()))
                .collect();
            println!("schema    {}", columns.join(", "));
        }
        Container::Tar => println!("format    WebDataset tars, read in place"),
    }
    println!("source    {}", index.source);
    if index.kind == DatasetKind::Jft {
        let names: Vec<String> = (0..index.classes.len())
            .map(|label| index.class_names(label).expect("label in range").join(", "))
            .collect();
        let shown = names.iter().take(20).cloned().collect::<Vec<_>>().join(" | ");
        let more = names.len().saturating_sub(20);
        println!(
            "classes   {} : {shown}{}",
            names.len(),
            if more > 0 {
                format!(" | ... {more} more")
            } else {
                String::new()
            }
        );
    }
    let noted = match index.container {
        Container::Arrow => "skipped at import",
        Container::Tar => "met when indexed",
    };
    for (reason, count) in &index.skipped {
        println!("{noted}: {count} {reason}");
    }

    let Verified {
        bad,
        failed_shards,
        shown,
    } = verify(&dataset, samples);
    let bad_total: u64 = bad.values().sum();
    println!(
        "bad       {bad_total} records{}",
        if bad.is_empty() {
            String::new()
        } else {
            format!(" ({bad:?})")
        }
    );
    for failure in &failed_shards {
        println!("FAILED    {failure}");
    }
    if !shown.is_empty() {
        write_sheet(sheet, &shown)?;
        println!("sheet     {} ({} samples):", sheet.display(), shown.len());
        for (number, (_, text)) in shown.iter().enumerate() {
            println!("  {:>2}  {text}", number + 1);
        }
    }
    if !failed_shards.is_empty() {
        bail!(
            "{} of {} shards failed verification",
            failed_shards.len(),
            index.shards.len()
        );
    }
    Ok(())
}

/// What reading every record of a dataset found.
struct Verified {
    bad: std::collections::BTreeMap<&'static str, u64>,
    failed_shards: Vec<String>,
    /// The first `samples` good records, decoded, with their captions.
    shown: Vec<(RgbImage, String)>,
}

/// Reads every shard and checks every record as the loader would.
fn verify(dataset: &Dataset, samples: usize) -> Verified {
    let index = dataset.index();
    let bar = progress(Some(index.rows()));
    let mut bad: std::collections::BTreeMap<&'static str, u64> = Default::default();
    let mut failed_shards = Vec::new();
    let mut shown = Vec::new();
    let mut seen = 0;
    for shard in 0..index.shards.len() {
        let decoded = match dataset.shard(shard) {
            Ok(decoded) => decoded,
            Err(error) => {
                failed_shards.push(error.to_string());
                seen += index.shards[shard].rows;
                bar.set_position(seen);
                continue;
            }
        };
        for row in 0..decoded.rows() {
            let record = decoded.record(row);
            let text = match bad_record::caption(&record, index) {
                Ok(Caption::Text(text)) => text.to_string(),
                Ok(Caption::Classes(names)) => names.join("; "),
                Err((reason, _)) => {
                    *bad.entry(reason.name()).or_default() += 1;
                    continue;
                }
            };
            match pixels::decode(record.image) {
                Ok(image) if shown.len() < samples => shown.push((image, text)),
                Ok(_) => {}
                Err(_) => *bad.entry(BadRecord::UndecodableImage.name()).or_default() += 1,
            }
        }
        seen += decoded.rows() as u64;
        bar.set_position(seen);
    }
    bar.finish_and_clear();
    Verified {
        bad,
        failed_shards,
        shown,
    }
}

/// A grid of thumbnails, numbered left to right, top to bottom.
fn write_sheet(path: &std::path::Path, samples: &[(RgbImage, String)]) -> anyhow::Result<()> {
    const CELL: u32 = 128;
    const GAP: u32 = 4;
    let columns = (samples.len() as f64).sqrt().ceil() as u32;
    let rows = (samples.len() as u32).div_ceil(columns);
    let mut sheet = RgbImage::from_pixel(
        columns * (CELL + GAP) + GAP,
        rows * (CELL + GAP) + GAP,
        image::Rgb([40, 40, 40]),
    );
    for (i, (image, _)) in samples.iter().enumerate() {
        let thumbnail = imageops::resize(image, CELL, CELL, imageops::FilterType::Triangle);
        let (x, y) = (
            (i as u32 % columns) * (CELL + GAP) + GAP,
            (i as u32 / columns) * (CELL + GAP) + GAP,
        );
        imageops::overlay(&mut sheet, &thumbnail, i64::from(x), i64::from(y));
    }
    sheet
        .save(path)
        .with_context(|| format!("writing the contact sheet {}", path.display()))?;
    Ok(())
}

impl StoreArgs {
    /// The store at `url` (a store URL or a path).
    pub fn open(&self, url: &str) -> anyhow::Result<Store> {
        Ok(Store::open(url, &self.options())?)
    }

    /// The store holding the object at `url`, and the object's name in it.
    pub fn open_object(&self, url: &str) -> anyhow::Result<(Store, String)> {
        Ok(Store::open_object(url, &self.options())?)
    }

    pub(super) fn options(&self) -> StoreOptions {
        StoreOptions::with_s3(self.s3_endpoint.clone(), self.s3_region.clone())
    }
}
