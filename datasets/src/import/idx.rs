//! The MNIST family's IDX files (optionally gzipped): an images file of
//! u8 [count, rows, cols] and a labels file of u8 [count], plus a class-name
//! list. Images become grayscale PNGs.

use std::io::{Cursor, Read};
use std::path::{Path, PathBuf};

use contract::dataset::{ClassName, DatasetKind};
use image::{GrayImage, ImageFormat};

use super::{read_classes, ImportError, ImportOptions, Importer, Item};
use crate::shard::{Content, Record};

pub struct Idx {
    images_path: PathBuf,
    images: Vec<u8>,
    labels: Vec<u8>,
    rows: usize,
    cols: usize,
    classes: Vec<ClassName>,
    count: usize,
}

impl Idx {
    /// `src` is the images file; the labels file is its sibling with
    /// `images-idx3` replaced by `labels-idx1`.
    pub fn open(src: &Path, options: &ImportOptions) -> Result<Self, ImportError> {
        let name = src.file_name().and_then(|name| name.to_str()).unwrap_or_default();
        if !name.contains("images-idx3") {
            return Err(ImportError::file(
                src,
                "expected an IDX images file (named like train-images-idx3-ubyte[.gz])",
            ));
        }
        let labels_path = src.with_file_name(name.replace("images-idx3", "labels-idx1"));
        let Some(classes_path) = &options.classes else {
            return Err(ImportError::file(
                src,
                "the idx format needs --classes FILE (one class name per line)",
            ));
        };
        let classes = read_classes(classes_path)?;
        let images = read_maybe_gzipped(src)?;
        let labels = read_maybe_gzipped(&labels_path)?;
        let image_dims = header(&images, src, 0x0803, 3)?;
        let label_dims = header(&labels, &labels_path, 0x0801, 1)?;
        let (count, rows, cols) = (image_dims[0], image_dims[1], image_dims[2]);
        if label_dims[0] != count {
            return Err(ImportError::file(
                &labels_path,
                format!("{} labels, but {} holds {count} images", label_dims[0], src.display()),
            ));
        }
        let expected = 16 + count * rows * cols;
        if images.len() < expected {
            return Err(ImportError::file(
                src,
                format!("truncated: {} bytes, the header promises {expected}", images.len()),
            ));
        }
        if labels.len() < 8 + count {
            return Err(ImportError::file(
                &labels_path,
                format!("truncated: {} bytes, expected {}", labels.len(), 8 + count),
            ));
        }
        if let Some((i, label)) = labels[8..8 + count]
            .iter()
            .enumerate()
            .find(|(_, &l)| l as usize >= classes.len())
        {
            return Err(ImportError::file(
                &labels_path,
                format!(
                    "record {i}: label {label}, but {} lists {} classes",
                    classes_path.display(),
                    classes.len()
                ),
            ));
        }
        let count = options.limit.map_or(count, |limit| count.min(limit as usize));
        Ok(Self {
            images_path: src.to_path_buf(),
            images,
            labels,
            rows,
            cols,
            classes,
            count,
        })
    }
}

fn read_maybe_gzipped(path: &Path) -> Result<Vec<u8>, ImportError> {
    let bytes = std::fs::read(path).map_err(|error| ImportError::io(path, error))?;
    if !bytes.starts_with(&[0x1f, 0x8b]) {
        return Ok(bytes);
    }
    let mut plain = Vec::new();
    flate2::read::GzDecoder::new(bytes.as_slice())
        .read_to_end(&mut plain)
        .map_err(|error| ImportError::file(path, format!("bad gzip data: {error}")))?;
    Ok(plain)
}

/// The dimensions of an IDX file of u8 with `dims` dimensions.
fn header(bytes: &[u8], path: &Path, magic: u32, dims: usize) -> Result<Vec<usize>, ImportError> {
    let word = |i: usize| {
        bytes
            .get(i * 4..i * 4 + 4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    };
    match word(0) {
        Some(found) if found == magic => {}
        Some(found) => {
            return Err(ImportError::file(
                path,
                format!("magic number {found:#010x}, expected {magic:#010x} (u8 data, {dims} dimensions)"),
            ))
        }
        None => return Err(ImportError::file(path, "too short for an IDX header")),
    }
    (1..=dims)
        .map(|i| {
            word(i)
                .map(|d| d as usize)
                .ok_or_else(|| ImportError::file(path, "too short for an IDX header"))
        })
        .collect()
}

impl Importer for Idx {
    fn kind(&self) -> DatasetKind {
        DatasetKind::Jft
    }

    fn classes(&self) -> Vec<ClassName> {
        self.classes.clone()
    }

    fn total(&self) -> Option<u64> {
        Some(self.count as u64)
    }

    fn run(&mut self, sink: &mut dyn FnMut(Item) -> Result<(), ImportError>) -> Result<(), ImportError> {
        let pixels = self.rows * self.cols;
        for i in 0..self.count {
            let start = 16 + i * pixels;
            let image = GrayImage::from_raw(
                self.cols as u32,
                self.rows as u32,
                self.images[start..start + pixels].to_vec(),
            )
            .expect("the slice holds rows x cols bytes");
            let mut png = Cursor::new(Vec::new());
            image
                .write_to(&mut png, ImageFormat::Png)
                .map_err(|error| ImportError::file(&self.images_path, format!("record {i}: {error}")))?;
            sink(Item::Record(Record {
                key: format!("{i:08}"),
                image: png.into_inner(),
                content: Content::Labels(vec![i32::from(self.labels[8 + i])]),
            }))?;
        }
        Ok(())
    }
}
