//! Importers: datasets in the formats people have, turned into coca's
//! Arrow shards. Each reads its source, says what kind of dataset it makes
//! (and its classes), then hands over records one by one. Broken structure
//! (a bad line, a missing file) is an error naming the file and line;
//! a record whose image is not a recognised JPEG/PNG/WebP, or whose text is
//! empty, is skipped and counted in the index.

mod captions;
mod idx;
mod imagefolder;
mod img2dataset;
mod webdataset;

use std::path::{Path, PathBuf};

use contract::dataset::{ClassName, DatasetKind};

use super::shard::Record;
use super::writer::{DatasetWriter, WriterError};

pub use captions::Captions;
pub use idx::Idx;
pub use imagefolder::ImageFolder;
pub use img2dataset::Img2Dataset;
pub use webdataset::WebDataset;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImportFormat {
    ImageFolder,
    Captions,
    WebDataset,
    Img2Dataset,
    Idx,
}

impl std::fmt::Display for ImportFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ImportFormat::ImageFolder => "imagefolder",
            ImportFormat::Captions => "captions",
            ImportFormat::WebDataset => "webdataset",
            ImportFormat::Img2Dataset => "img2dataset",
            ImportFormat::Idx => "idx",
        })
    }
}

impl std::str::FromStr for ImportFormat {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Ok(match text {
            "imagefolder" => ImportFormat::ImageFolder,
            "captions" => ImportFormat::Captions,
            "webdataset" => ImportFormat::WebDataset,
            "img2dataset" => ImportFormat::Img2Dataset,
            "idx" => ImportFormat::Idx,
            other => {
                return Err(format!(
                    "unknown format `{other}`; use imagefolder, captions, webdataset, img2dataset or idx"
                ))
            }
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("{path}: {message}")]
    File { path: String, message: String },
    #[error("{path}, line {line}: {message}")]
    Line { path: String, line: u64, message: String },
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error(transparent)]
    Write(#[from] WriterError),
    /// The import's record limit was reached (never leaves [`import`]).
    #[error("the record limit was reached")]
    LimitReached,
}

impl ImportError {
    fn file(path: &Path, message: impl Into<String>) -> Self {
        ImportError::File {
            path: path.display().to_string(),
            message: message.into(),
        }
    }

    fn line(path: &Path, line: u64, message: impl Into<String>) -> Self {
        ImportError::Line {
            path: path.display().to_string(),
            line,
            message: message.into(),
        }
    }

    pub fn io(path: &Path, source: std::io::Error) -> Self {
        ImportError::Io {
            path: path.display().to_string(),
            source,
        }
    }
}

/// What an importer hands over.
pub enum Item {
    Record(Record),
    /// A record left out, with the reason (counted in the index) and where it was.
    Skipped {
        reason: &'static str,
        at: String,
    },
}

pub trait Importer {
    fn kind(&self) -> DatasetKind;
    /// Class names by label (jft).
    fn classes(&self) -> Vec<ClassName>;
    /// Records to expect, when known up front (for the progress bar).
    fn total(&self) -> Option<u64>;
    /// Hands every record to `sink`, in a deterministic order.
    fn run(&mut self, sink: &mut dyn FnMut(Item) -> Result<(), ImportError>) -> Result<(), ImportError>;
}

/// Options some formats take.
#[derive(Debug, Clone, Default)]
pub struct ImportOptions {
    /// A class-name list, one per line (idx; optional for imagefolder).
    pub classes: Option<PathBuf>,
    /// Stop after this many records (a hint for the progress bar here;
    /// [`import`] enforces it).
    pub limit: Option<u64>,
}

pub fn open(format: ImportFormat, src: &Path, options: &ImportOptions) -> Result<Box<dyn Importer>, ImportError> {
    Ok(match format {
        ImportFormat::ImageFolder => Box::new(ImageFolder::open(src, options)?),
        ImportFormat::Captions => Box::new(Captions::open(src)?),
        ImportFormat::WebDataset => Box::new(WebDataset::open(src)?),
        ImportFormat::Img2Dataset => Box::new(Img2Dataset::open(src)?),
        ImportFormat::Idx => Box::new(Idx::open(src, options)?),
    })
}

/// Whether `bytes` start like an image coca can decode.
fn is_image(bytes: &[u8]) -> bool {
    matches!(
        image::guess_format(bytes),
        Ok(image::ImageFormat::Jpeg | image::ImageFormat::Png | image::ImageFormat::WebP)
    )
}

/// File extensions taken as images.
fn has_image_extension(path: &Path) -> bool {
    path.extension()
        .and_then(|extension| extension.to_str())
        .is_some_and(|extension| matches!(extension.to_ascii_lowercase().as_str(), "jpg" | "jpeg" | "png" | "webp"))
}

/// An ALIGN record, or the reason it is skipped.
fn align_item(key: String, image: Vec<u8>, text: &str, at: impl FnOnce() -> String) -> Item {
    let text = text.trim();
    if text.is_empty() {
        return Item::Skipped {
            reason: "empty text",
            at: at(),
        };
    }
    if !is_image(&image) {
        return Item::Skipped {
            reason: "unrecognised image",
            at: at(),
        };
    }
    Item::Record(Record {
        key,
        image,
        content: super::shard::Content::Text(text.to_string()),
    })
}

/// Reads a class-name list ([`ClassName::parse_list`]).
fn read_classes(path: &Path) -> Result<Vec<ClassName>, ImportError> {
    let text = std::fs::read_to_string(path).map_err(|error| ImportError::io(path, error))?;
    ClassName::parse_list(&text).map_err(|(line, message)| match line {
        Some(line) => ImportError::line(path, line, message),
        None => ImportError::file(path, message),
    })
}

/// Files under `dir` (or `src` itself, when a file) ending in `extension`, sorted.
fn files_with_extension(src: &Path, extension: &str) -> Result<Vec<PathBuf>, ImportError> {
    if src.is_file() {
        return Ok(vec![src.to_path_buf()]);
    }
    let entries = std::fs::read_dir(src).map_err(|error| ImportError::io(src, error))?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .filter(|path| path.extension().is_some_and(|e| e == extension))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(ImportError::file(src, format!("no .{extension} files here")));
    }
    Ok(files)
}

/// What an import did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ImportSummary {
    pub rows: u64,
    pub skipped: u64,
    /// Where the first few skipped records were, and why.
    pub first_skips: Vec<String>,
}

/// Runs `importer` into `writer` (which it finishes, index last), up to
/// `limit` records; `progress` hears the number of records handled so far.
pub fn import(
    importer: &mut dyn Importer,
    mut writer: DatasetWriter,
    limit: Option<u64>,
    progress: &mut dyn FnMut(u64),
) -> Result<(contract::dataset::DatasetIndex, ImportSummary), ImportError> {
    let mut summary = ImportSummary::default();
    let result = importer.run(&mut |item| {
        if limit.is_some_and(|limit| summary.rows + summary.skipped >= limit) {
            return Err(ImportError::LimitReached);
        }
        match item {
            Item::Record(record) => {
                writer.push(record)?;
                summary.rows += 1;
            }
            Item::Skipped { reason, at } => {
                writer.skip(reason);
                summary.skipped += 1;
                if summary.first_skips.len() < 5 {
                    summary.first_skips.push(format!("{at}: {reason}"));
                }
            }
        }
        progress(summary.rows + summary.skipped);
        Ok(())
    });
    match result {
        Ok(()) | Err(ImportError::LimitReached) => Ok((writer.finish()?, summary)),
        Err(error) => Err(error),
    }
}
