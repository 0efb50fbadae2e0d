//! One sub-folder per class (`src/cat/001.jpg`): a jft dataset whose
//! classes are the folder names, sorted ('_' read as a space), unless a
//! class list (`name<TAB>parent` lines, in folder order) names them, or
//! ImageNet-1k's classes ([`ImageFolder::imagenet1k`]).

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
        let folders = class_folders(src)?;
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
        Self::with_files(src, classes, folders.into_iter().enumerate(), options.limit)
    }

    /// ImageNet-1k's 1000 classes (OpenAI's names) for a folder in its
    /// usual layout: each folder named by its class's WordNet id (any
    /// subset of them, as a validation set split by class), or exactly
    /// 1000 folders of any names, in class-index order.
    pub fn imagenet1k(src: &Path, limit: Option<u64>) -> Result<Self, ImportError> {
        let known = crate::imagenet::classes();
        let folders = class_folders(src)?;
        let name = |folder: &Path| folder.file_name().unwrap_or_default().to_string_lossy().to_string();
        let by_id: Result<Vec<(usize, PathBuf)>, PathBuf> = folders
            .iter()
            .map(
                |folder| match known.binary_search_by(|(id, _)| (*id).cmp(name(folder).as_str())) {
                    Ok(label) => Ok((label, folder.clone())),
                    Err(_) => Err(folder.clone()),
                },
            )
            .collect();
        let labelled = match by_id {
            Ok(labelled) => labelled,
            Err(_) if folders.len() == known.len() => folders.into_iter().enumerate().collect(),
            Err(folder) => {
                return Err(ImportError::file(
                    &folder,
                    format!(
                        "not an ImageNet WordNet id (like n01440764), and {} holds {} class folders, not 1000",
                        src.display(),
                        folders.len()
                    ),
                ))
            }
        };
        let classes = known
            .iter()
            .map(|(_, name)| ClassName {
                name: name.to_string(),
                parent: None,
            })
            .collect();
        Self::with_files(src, classes, labelled.into_iter(), limit)
    }

    fn with_files(
        src: &Path,
        classes: Vec<ClassName>,
        labelled: impl Iterator<Item = (usize, PathBuf)>,
        limit: Option<u64>,
    ) -> Result<Self, ImportError> {
        let mut files = Vec::new();
        for (label, folder) in labelled {
            let entries = std::fs::read_dir(&folder).map_err(|error| ImportError::io(&folder, error))?;
            let mut images: Vec<PathBuf> = entries
                .filter_map(Result::ok)
                .map(|entry| entry.path())
                .filter(|path| path.is_file() && has_image_extension(path))
                .collect();
            images.sort();
            files.extend(images.into_iter().map(|path| (label, path)));
        }
        if let Some(limit) = limit {
            files.truncate(limit as usize);
        }
        Ok(Self {
            classes,
            files,
            src: src.to_path_buf(),
        })
    }

    /// (label, image file), by class then file name.
    pub fn files(&self) -> &[(usize, PathBuf)] {
        &self.files
    }
}

/// The class folders under `src`, sorted.
fn class_folders(src: &Path) -> Result<Vec<PathBuf>, ImportError> {
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
    Ok(folders)
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
