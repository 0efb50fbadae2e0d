//! The evaluations a trained model is judged by, over a coca dataset:
//! zero-shot classification (JFT-style), image-text retrieval (ALIGN-style)
//! and captioning (BLEU-4, CIDEr-D).

use burn::tensor::backend::Backend;
use burn::tensor::Tensor;
use contract::dataset::DatasetKind;
use serde::Serialize;

use super::bleu::corpus_bleu;
use super::cider::cider_d;
use super::ranking::{rank, recall_at_k};
use crate::generate::{generate, Generation};
use crate::inference::{image_batch, text_batch, Loaded};
use datasets::dataset::Dataset;
use datasets::image::{self, RgbImage};
use datasets::import::{ImageFolder, ImportError, Importer};
use datasets::prompt::PromptTemplates;

#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error(transparent)]
    Dataset(#[from] datasets::dataset::DatasetError),
    #[error(transparent)]
    Tokenizer(#[from] datasets::tokenizer::TokenizerError),
    #[error(transparent)]
    Folder(#[from] datasets::import::ImportError),
    #[error("{url}: no images to evaluate")]
    NoImages { url: String },
    #[error("{url} is a{} dataset; {task} needs a{} one", article(*.found), article(*.wanted))]
    Kind {
        url: String,
        task: &'static str,
        found: DatasetKind,
        wanted: DatasetKind,
    },
}

fn article(kind: DatasetKind) -> String {
    match kind {
        DatasetKind::Align => "n align".into(),
        DatasetKind::Jft => " jft".into(),
    }
}

/// One evaluated sample of a dataset.
pub struct Sample {
    pub key: String,
    pub image: RgbImage,
    pub text: Option<String>,
    pub labels: Vec<usize>,
}

/// Visits the dataset's samples in order, `batch` at a time, up to `limit`;
/// undecodable images are skipped and counted. Returns the skipped count.
/// [`for_each_batch`] over an image folder's files, read in place.
fn for_each_file_batch(
    folder: &ImageFolder,
    batch: usize,
    limit: Option<u64>,
    mut visit: impl FnMut(Vec<Sample>) -> Result<(), EvalError>,
) -> Result<u64, EvalError> {
    let total = Labelled::Folder(folder).total(limit) as usize;
    let mut skipped = 0u64;
    let mut pending = Vec::new();
    for (label, path) in &folder.files()[..total] {
        let bytes = std::fs::read(path).map_err(|error| ImportError::io(path, error))?;
        let Ok(picture) = image::decode(&bytes) else {
            skipped += 1;
            continue;
        };
        pending.push(Sample {
            key: path.display().to_string(),
            image: picture,
            text: None,
            labels: vec![*label],
        });
        if pending.len() == batch {
            visit(std::mem::take(&mut pending))?;
        }
    }
    if !pending.is_empty() {
        visit(pending)?;
    }
    Ok(skipped)
}

pub fn for_each_batch(
    dataset: &Dataset,
    batch: usize,
    limit: Option<u64>,
    mut visit: impl FnMut(Vec<Sample>) -> Result<(), EvalError>,
) -> Result<u64, EvalError> {
    let total = limit.map_or(dataset.index().rows(), |l| l.min(dataset.index().rows()));
    let mut seen = 0u64;
    let mut skipped = 0u64;
    let mut pending = Vec::new();
    for shard in 0..dataset.index().shards.len() {
        if seen >= total {
            break;
        }
        let decoded = dataset.shard(shard)?;
        for row in 0..decoded.rows() {
            if seen >= total {
                break;
            }
            seen += 1;
            let record = decoded.record(row);
            let Ok(picture) = image::decode(record.image) else {
                skipped += 1;
                continue;
            };
            pending.push(Sample {
                key: record.key.to_string(),
                image: picture,
                text: record.text.map(str::to_string),
                labels: record
                    .labels
                    .unwrap_or_default()
                    .into_iter()
                    .filter_map(|l| usize::try_from(l).ok())
                    .collect(),
            });
            if pending.len() == batch {
                visit(std::mem::take(&mut pending))?;
            }
        }
    }
    if !pending.is_empty() {
        visit(pending)?;
    }
    Ok(skipped)
}

fn rows<B: Backend>(tensor: Tensor<B, 2>) -> Vec<Vec<f32>> {
    let [_, width] = tensor.dims();
    let values: Vec<f32> = tensor.into_data().convert::<f32>().into_vec().expect("f32 values");
    values.chunks(width.max(1)).map(<[f32]>::to_vec).collect()
}

fn check_kind(dataset: &Dataset, task: &'static str, wanted: DatasetKind) -> Result<(), EvalError> {
    let found = dataset.index().kind;
    if found != wanted {
        return Err(EvalError::Kind {
            url: dataset.url(),
            task,
            found,
            wanted,
        });
    }
    Ok(())
}

#[derive(Debug, Clone, Serialize)]
pub struct ClassAccuracy {
    pub class: String,
    pub correct: u64,
    pub total: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ZeroShot {
    pub samples: u64,
    pub skipped: u64,
    pub classes: usize,
    pub templates: usize,
    pub top1: f64,
    pub top5: f64,
    pub per_class: Vec<ClassAccuracy>,
    /// confusion[true class][predicted class]
    pub confusion: Vec<Vec<u64>>,
}

/// Class embeddings: the normalised mean of the normalised text embeddings
/// of every template filled with the class name (prompt ensembling).
pub fn class_embeddings<B: Backend>(
    loaded: &Loaded<B>,
    names: &[String],
    templates: &PromptTemplates,
) -> Result<Tensor<B, 2>, EvalError> {
    let device = loaded.model.text_embedding.token.val().device();
    let mut classes = Vec::new();
    for name in names {
        let texts: Vec<String> = templates
            .templates()
            .iter()
            .map(|t| t.replacen("{}", name, 1))
            .collect();
        let (tokens, padding) = text_batch::<B>(&loaded.tokenizer, &texts, loaded.config.context_length, &device)?;
        let mean = loaded.model.embed_texts(tokens, padding).mean_dim(0);
        let norm = mean.clone().square().sum_dim(1).sqrt().clamp_min(1e-12);
        classes.push(mean / norm);
    }
    Ok(Tensor::cat(classes, 0))
}

/// Labelled images to classify.
pub enum Labelled<'a> {
    /// A jft dataset.
    Dataset(&'a Dataset),
    /// A folder of class folders, its images read in place.
    Folder(&'a ImageFolder),
}

impl Labelled<'_> {
    /// Images to classify, at most `limit`.
    pub fn total(&self, limit: Option<u64>) -> u64 {
        let all = match self {
            Labelled::Dataset(dataset) => dataset.index().rows(),
            Labelled::Folder(folder) => folder.files().len() as u64,
        };
        limit.map_or(all, |limit| limit.min(all))
    }
}

pub fn zero_shot<B: Backend>(
    loaded: &Loaded<B>,
    source: Labelled,
    templates: &PromptTemplates,
    batch: usize,
    limit: Option<u64>,
    progress: &dyn Fn(u64),
) -> Result<ZeroShot, EvalError> {
    let names: Vec<String> = match source {
        Labelled::Dataset(dataset) => {
            check_kind(dataset, "zero-shot classification", DatasetKind::Jft)?;
            let index = dataset.index();
            (0..index.classes.len())
                .map(|c| {
                    index
                        .class_names(c)
                        .and_then(|n| n.first().map(|s| s.to_string()))
                        .unwrap_or_default()
                })
                .collect()
        }
        Labelled::Folder(folder) => folder.classes().into_iter().map(|class| class.name).collect(),
    };
    let classes = class_embeddings(loaded, &names, templates)?;
    let device = classes.device();
    let mut confusion = vec![vec![0u64; names.len()]; names.len()];
    let (mut samples, mut top1, mut top5) = (0u64, 0u64, 0u64);
    let classify = |batch: Vec<Sample>| {
        let images: Vec<RgbImage> = batch.iter().map(|s| s.image.clone()).collect();
        let embedded = loaded
            .model
            .embed_images(image_batch::<B>(&images, loaded.config.image_size as u32, &device));
        for (sample, scores) in batch.iter().zip(rows(embedded.matmul(classes.clone().transpose()))) {
            let Some(&label) = sample.labels.first().filter(|&&l| l < names.len()) else {
                continue;
            };
            let predicted = (0..scores.len())
                .max_by(|&a, &b| scores[a].total_cmp(&scores[b]).then(b.cmp(&a)))
                .unwrap_or(0);
            let place = rank(&scores, label);
            top1 += u64::from(place <= 1);
            top5 += u64::from(place <= 5);
            confusion[label][predicted] += 1;
            samples += 1;
        }
        progress(samples);
        Ok(())
    };
    let skipped = match source {
        Labelled::Dataset(dataset) => for_each_batch(dataset, batch, limit, classify)?,
        Labelled::Folder(folder) => for_each_file_batch(folder, batch, limit, classify)?,
    };
    let per_class = names
        .iter()
        .enumerate()
        .map(|(c, name)| ClassAccuracy {
            class: name.clone(),
            correct: confusion[c][c],
            total: confusion[c].iter().sum(),
        })
        .collect();
    let share = |hits: u64| hits as f64 / samples.max(1) as f64;
    Ok(ZeroShot {
        samples,
        skipped,
        classes: names.len(),
        templates: templates.len(),
        top1: share(top1),
        top5: share(top5),
        per_class,
        confusion,
    })
}

#[derive(Debug, Clone, Serialize)]
pub struct Retrieval {
    pub samples: u64,
    pub skipped: u64,
    /// Recall@1, @5, @10 of each image's own text among all texts.
    pub image_to_text: [f64; 3],
    /// Recall@1, @5, @10 of each text's own image among all images.
    pub text_to_image: [f64; 3],
}

pub fn retrieval<B: Backend>(
    loaded: &Loaded<B>,
    dataset: &Dataset,
    batch: usize,
    limit: Option<u64>,
    progress: &dyn Fn(u64),
) -> Result<Retrieval, EvalError> {
    check_kind(dataset, "retrieval", DatasetKind::Align)?;
    let device = loaded.model.text_embedding.token.val().device();
    let mut images = Vec::new();
    let mut texts = Vec::new();
    let mut samples = 0u64;
    let skipped = for_each_batch(dataset, batch, limit, |batch| {
        let pictures: Vec<RgbImage> = batch.iter().map(|s| s.image.clone()).collect();
        let captions: Vec<String> = batch.iter().map(|s| s.text.clone().unwrap_or_default()).collect();
        images.push(
            loaded
                .model
                .embed_images(image_batch::<B>(&pictures, loaded.config.image_size as u32, &device)),
        );
        let (tokens, padding) = text_batch::<B>(&loaded.tokenizer, &captions, loaded.config.context_length, &device)?;
        texts.push(loaded.model.embed_texts(tokens, padding));
        samples += batch.len() as u64;
        progress(samples);
        Ok(())
    })?;
    if images.is_empty() {
        return Err(EvalError::NoImages {
            url: dataset.url().to_string(),
        });
    }
    let (images, texts) = (Tensor::cat(images, 0), Tensor::cat(texts, 0));
    let image_to_text = rows(images.clone().matmul(texts.clone().transpose()));
    let text_to_image = rows(texts.matmul(images.transpose()));
    let right: Vec<Vec<usize>> = (0..samples as usize).map(|i| vec![i]).collect();
    let recalls = |scores: &[Vec<f32>]| [1, 5, 10].map(|k| recall_at_k(scores, &right, k));
    Ok(Retrieval {
        samples,
        skipped,
        image_to_text: recalls(&image_to_text),
        text_to_image: recalls(&text_to_image),
    })
}

#[derive(Debug, Clone, Serialize)]
pub struct CaptionSample {
    pub key: String,
    pub caption: String,
    pub references: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Captioning {
    pub samples: u64,
    pub skipped: u64,
    pub bleu4: f64,
    pub cider_d: f64,
    pub captions: Vec<CaptionSample>,
}

/// Captions every image and scores them against the dataset's texts (an
/// align dataset) or its class names in `templates` (a jft dataset).
pub fn captioning<B: Backend>(
    loaded: &Loaded<B>,
    dataset: &Dataset,
    generation: &Generation,
    templates: &PromptTemplates,
    limit: Option<u64>,
    progress: &dyn Fn(u64),
) -> Result<Captioning, EvalError> {
    let device = loaded.model.text_embedding.token.val().device();
    let index = dataset.index();
    let mut captions = Vec::new();
    let skipped = for_each_batch(dataset, 8, limit, |batch| {
        let pictures: Vec<RgbImage> = batch.iter().map(|s| s.image.clone()).collect();
        let image_tokens =
            loaded
                .model
                .caption_image_tokens(image_batch::<B>(&pictures, loaded.config.image_size as u32, &device));
        for (row, sample) in batch.into_iter().enumerate() {
            let ids = generate(&loaded.model, image_tokens.clone().narrow(0, row, 1), generation);
            let caption = loaded.tokenizer.decode(&ids)?.trim().to_string();
            let references = match &sample.text {
                Some(text) => vec![text.clone()],
                None => sample
                    .labels
                    .iter()
                    .filter_map(|&l| index.class_names(l).and_then(|n| n.first().map(|s| s.to_string())))
                    .flat_map(|name| templates.templates().iter().map(move |t| t.replacen("{}", &name, 1)))
                    .collect(),
            };
            captions.push(CaptionSample {
                key: sample.key,
                caption,
                references,
            });
        }
        progress(captions.len() as u64);
        Ok(())
    })?;
    let candidates: Vec<String> = captions.iter().map(|c| c.caption.clone()).collect();
    let references: Vec<Vec<String>> = captions.iter().map(|c| c.references.clone()).collect();
    Ok(Captioning {
        samples: captions.len() as u64,
        skipped,
        bleu4: corpus_bleu(&candidates, &references).score,
        cider_d: cider_d(&candidates, &references).0,
        captions,
    })
}
