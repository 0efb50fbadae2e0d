//! One sub-folder per class (`src/cat/001.jpg`): a jft dataset whose
//! classes are the folder names, sorted ('_' read as a space), unless a
//! class list (`name<TAB>parent` lines, in folder order) names them.

use std::path::{Path, PathBuf};

use contract::dataset::{ClassName, DatasetKind};

use super::{has_image_extension, is_image, read_classes, ImportError, ImportOptions, Importer, Item};
use crate::shard::{Content, Record};

pub struct ImageFolder {
    classes: Vec<ClassName>,
    /// (label, file), by class then file name.
    files: Vec<(usize, PathBuf)>,
    src: PathBuf,
}

impl ImageFolder {
    pub fn open(src: &Path, options: &ImportOptions) -> Result<Self, ImportError> {
        let entries = std::fs::read_dir(src).map_err(|error| ImportError::io(src, error))?;
        let mut folders: Vec<PathBuf> = entries
            .filter_map(Result::ok)
            .map(|entry| entry.path())
            .filter(|path| path.is_dir())
            .collect();
        folders.sort();
        if folders.is_empty() {
            return Err(ImportError::file(
                src,
                "no class folders here (expected src/<class>/<image>)",
            ));
        }
        let classes = match &options.classes {
            Some(path) => {
                let classes = read_classes(path)?;
                if classes.len() != folders.len() {
                    return Err(ImportError::file(
                        path,
                        format!(
                            "{} class names for {} folders in {}",
                            classes.len(),
                            folders.len(),
                            src.display()
                        ),
                    ));
                }
                classes
            }
            None => folders
                .iter()
                .map(|folder| ClassName {
                    name: folder
                        .file_name()
                        .unwrap_or_default()
                        .to_string_lossy()
                        .replace('_', " "),
                    parent: None,
                })
                .collect(),
        };
        let mut files = Vec::new();
        for (label, folder) in folders.iter().enumerate() {
            let entries = std::fs::read_dir(folder).map_err(|error| ImportError::io(folder, error))?;
            let mut images: Vec<PathBuf> = entries
                .filter_map(Result::ok)
                .map(|entry| entry.path())
                .filter(|path| path.is_file() && has_image_extension(path))
                .collect();
            images.sort();
            files.extend(images.into_iter().map(|path| (label, path)));
        }
        if let Some(limit) = options.limit {
            files.truncate(limit as usize);
        }
        Ok(Self {
            classes,
            files,
            src: src.to_path_buf(),
        })
    }
}

impl Importer for ImageFolder {
    fn kind(&self) -> DatasetKind {
        DatasetKind::Jft
    }

    fn classes(&self) -> Vec<ClassName> {
        self.classes.clone()
    }

    fn total(&self) -> Option<u64> {
        Some(self.files.len() as u64)
    }

    fn run(&mut self, sink: &mut dyn FnMut(Item) -> Result<(), ImportError>) -> Result<(), ImportError> {
        for (label, path) in &self.files {
            let image = std::fs::read(path).map_err(|error| ImportError::io(path, error))?;
            let key = path
                .strip_prefix(&self.src)
                .unwrap_or(path)
                .to_string_lossy()
                .to_string();
            if !is_image(&image) {
                sink(Item::Skipped {
                    reason: "unrecognised image",
                    at: path.display().to_string(),
                })?;
                continue;
            }
            sink(Item::Record(Record {
                key,
                image,
                content: Content::Labels(vec![*label as i32]),
            }))?;
        }
        Ok(())
    }
}
