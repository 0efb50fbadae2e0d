//! WebDataset tar shards (open_clip's format): files grouped by key (the
//! name up to its first dot), an image (.jpg/.jpeg/.png/.webp) and a text
//! (.txt, or .json with a `caption` or `text` field). An align dataset.
//! `src` is one .tar or a folder of them, read in name order.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use contract::dataset::{ClassName, DatasetKind};

use super::{align_item, files_with_extension, has_image_extension, ImportError, Importer, Item};

pub struct WebDataset {
    tars: Vec<PathBuf>,
}

impl WebDataset {
    pub fn open(src: &Path) -> Result<Self, ImportError> {
        Ok(Self {
            tars: files_with_extension(src, "tar")?,
        })
    }
}

#[derive(Default)]
struct Sample {
    image: Option<Vec<u8>>,
    text: Option<String>,
}

impl Importer for WebDataset {
    fn kind(&self) -> DatasetKind {
        DatasetKind::Align
    }

    fn classes(&self) -> Vec<ClassName> {
        Vec::new()
    }

    fn total(&self) -> Option<u64> {
        None
    }

    fn run(&mut self, sink: &mut dyn FnMut(Item) -> Result<(), ImportError>) -> Result<(), ImportError> {
        for tar_path in &self.tars {
            let file = std::fs::File::open(tar_path).map_err(|error| ImportError::io(tar_path, error))?;
            let mut archive = tar::Archive::new(file);
            let bad_tar = |error: std::io::Error| ImportError::file(tar_path, format!("not a readable tar: {error}"));
            // Samples are contiguous in a WebDataset tar, but keep them by key to be safe with any order.
            let mut samples: BTreeMap<String, Sample> = BTreeMap::new();
            for entry in archive.entries().map_err(bad_tar)? {
                let mut entry = entry.map_err(bad_tar)?;
                if !entry.header().entry_type().is_file() {
                    continue;
                }
                let name = entry.path().map_err(bad_tar)?.to_string_lossy().to_string();
                let Some((key, extension)) = split_key(&name) else {
                    continue;
                };
                let mut bytes = Vec::new();
                entry.read_to_end(&mut bytes).map_err(bad_tar)?;
                let sample = samples.entry(key.to_string()).or_default();
                if has_image_extension(Path::new(&name)) {
                    sample.image = Some(bytes);
                } else if extension == "txt" {
                    sample.text = Some(String::from_utf8_lossy(&bytes).to_string());
                } else if extension == "json" && sample.text.is_none() {
                    let value: serde_json::Value = serde_json::from_slice(&bytes)
                        .map_err(|error| ImportError::file(tar_path, format!("{name}: not JSON: {error}")))?;
                    sample.text = ["caption", "text"]
                        .iter()
                        .find_map(|field| value.get(field).and_then(|v| v.as_str()).map(str::to_string));
                }
            }
            for (key, sample) in samples {
                let at = || format!("{} sample `{key}`", tar_path.display());
                match sample {
                    Sample {
                        image: Some(image),
                        text: Some(text),
                    } => sink(align_item(key.clone(), image, &text, at))?,
                    _ => sink(Item::Skipped {
                        reason: "incomplete sample",
                        at: at(),
                    })?,
                }
            }
        }
        Ok(())
    }
}

/// `dir/000123.jpg` -> (`dir/000123`, `jpg`): the key ends at the first dot of the file name.
fn split_key(name: &str) -> Option<(&str, &str)> {
    let start = name.rfind('/').map_or(0, |slash| slash + 1);
    let dot = start + name[start..].find('.')?;
    Some((&name[..dot], &name[dot + 1..]))
}
