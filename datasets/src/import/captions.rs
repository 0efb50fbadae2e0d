//! A captions file: JSONL (`{"image": "a.jpg", "caption": "..."}` per line)
//! or CSV/TSV with a header (columns `image` and `caption`; also accepted:
//! `file`/`path`/`filepath` and `text`/`title`). Image paths are relative to
//! the captions file. An align dataset.

use std::path::{Path, PathBuf};

use contract::dataset::{ClassName, DatasetKind};

use super::{align_item, ImportError, Importer, Item};

const IMAGE_COLUMNS: [&str; 4] = ["image", "file", "path", "filepath"];
const TEXT_COLUMNS: [&str; 3] = ["caption", "text", "title"];

pub struct Captions {
    path: PathBuf,
    /// (line, image path as written, caption)
    rows: Vec<(u64, String, String)>,
}

impl Captions {
    pub fn open(src: &Path) -> Result<Self, ImportError> {
        let extension = src
            .extension()
            .and_then(|e| e.to_str())
            .unwrap_or_default()
            .to_ascii_lowercase();
        let rows = match extension.as_str() {
            "jsonl" | "json" => read_jsonl(src)?,
            "csv" => read_csv(src, b',')?,
            "tsv" => read_csv(src, b'\t')?,
            _ => return Err(ImportError::file(src, "a captions file ends in .jsonl, .csv or .tsv")),
        };
        if rows.is_empty() {
            return Err(ImportError::file(src, "no captions"));
        }
        Ok(Self {
            path: src.to_path_buf(),
            rows,
        })
    }
}

fn read_jsonl(path: &Path) -> Result<Vec<(u64, String, String)>, ImportError> {
    let text = std::fs::read_to_string(path).map_err(|error| ImportError::io(path, error))?;
    let mut rows = Vec::new();
    for (number, line) in text.lines().enumerate() {
        let number = number as u64 + 1;
        if line.trim().is_empty() {
            continue;
        }
        let value: serde_json::Value = serde_json::from_str(line)
            .map_err(|error| ImportError::line(path, number, format!("not JSON: {error}")))?;
        let field = |names: &[&str], what: &str| {
            names
                .iter()
                .find_map(|name| value.get(name).and_then(|v| v.as_str()))
                .map(str::to_string)
                .ok_or_else(|| {
                    ImportError::line(
                        path,
                        number,
                        format!("no {what} (a string field named {})", names.join(" or ")),
                    )
                })
        };
        rows.push((
            number,
            field(&IMAGE_COLUMNS, "image path")?,
            field(&TEXT_COLUMNS, "caption")?,
        ));
    }
    Ok(rows)
}

fn read_csv(path: &Path, delimiter: u8) -> Result<Vec<(u64, String, String)>, ImportError> {
    let mut reader = csv::ReaderBuilder::new()
        .delimiter(delimiter)
        .from_path(path)
        .map_err(|error| ImportError::file(path, error.to_string()))?;
    let headers = reader
        .headers()
        .map_err(|error| ImportError::line(path, 1, error.to_string()))?
        .clone();
    let column = |names: &[&str], what: &str| {
        headers
            .iter()
            .position(|header| names.contains(&header.trim().to_ascii_lowercase().as_str()))
            .ok_or_else(|| ImportError::line(path, 1, format!("no {what} column (named {})", names.join(" or "))))
    };
    let (image, text) = (column(&IMAGE_COLUMNS, "image")?, column(&TEXT_COLUMNS, "caption")?);
    let mut rows = Vec::new();
    for record in reader.records() {
        let record = record.map_err(|error| {
            let line = error.position().map_or(0, |position| position.line());
            ImportError::line(path, line, error.to_string())
        })?;
        let line = record.position().map_or(0, |position| position.line());
        let get = |i: usize| record.get(i).map(str::to_string).unwrap_or_default();
        rows.push((line, get(image), get(text)));
    }
    Ok(rows)
}

impl Importer for Captions {
    fn kind(&self) -> DatasetKind {
        DatasetKind::Align
    }

    fn classes(&self) -> Vec<ClassName> {
        Vec::new()
    }

    fn total(&self) -> Option<u64> {
        Some(self.rows.len() as u64)
    }

    fn run(&mut self, sink: &mut dyn FnMut(Item) -> Result<(), ImportError>) -> Result<(), ImportError> {
        let base = self.path.parent().unwrap_or(Path::new("."));
        for (line, image_path, caption) in &self.rows {
            let image = std::fs::read(base.join(image_path))
                .map_err(|error| ImportError::line(&self.path, *line, format!("image `{image_path}`: {error}")))?;
            let at = || format!("{}, line {line}", self.path.display());
            sink(align_item(image_path.clone(), image, caption, at))?;
        }
        Ok(())
    }
}
