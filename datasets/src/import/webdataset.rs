//! WebDataset tar shards (open_clip's format) converted into Arrow shards:
//! samples as `webdataset::TarShard` groups them (an image and a
//! `.txt` or `.json` caption; see that module). An align dataset. `src` is
//! one .tar or a folder of them, read in name order. Tars can also be read
//! in place (a `format = "webdataset"` source), without this copy.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use contract::dataset::{ClassName, DatasetKind};
use webdataset::TarShard;

use super::{align_item, files_with_extension, ImportError, Importer, Item};

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
            let bytes = std::fs::read(tar_path).map_err(|error| ImportError::io(tar_path, error))?;
            // The same grouping and conventions as tars read in place.
            let tar = TarShard::parse(Bytes::from(bytes));
            if let Some(why) = tar.truncated() {
                return Err(ImportError::file(tar_path, format!("not a readable tar: {why}")));
            }
            for (row, sample) in tar.samples().iter().enumerate() {
                let at = || format!("{} sample `{}`", tar_path.display(), sample.key);
                match (tar.image(row), &sample.text) {
                    (Some(image), Some(text)) => sink(align_item(sample.key.clone(), image.to_vec(), text, at))?,
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
