//! img2dataset's parquet output (`--output_format parquet`): image bytes in
//! a binary column (`jpg`, `png`, `webp` or `image`) and a `caption`
//! column; rows whose download failed (`status` other than `success`, or
//! no image) are skipped and counted. An align dataset.

use std::path::{Path, PathBuf};

use arrow_array::{Array, BinaryArray, LargeBinaryArray, LargeStringArray, RecordBatch, StringArray};
use contract::dataset::{ClassName, DatasetKind};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use super::{align_item, files_with_extension, ImportError, Importer, Item};

pub struct Img2Dataset {
    files: Vec<PathBuf>,
}

impl Img2Dataset {
    pub fn open(src: &Path) -> Result<Self, ImportError> {
        Ok(Self {
            files: files_with_extension(src, "parquet")?,
        })
    }
}

fn strings(batch: &RecordBatch, names: &[&str]) -> Option<Vec<Option<String>>> {
    let column = names.iter().find_map(|name| batch.column_by_name(name))?;
    let any = column.as_any();
    if let Some(array) = any.downcast_ref::<StringArray>() {
        return Some(array.iter().map(|v| v.map(str::to_string)).collect());
    }
    any.downcast_ref::<LargeStringArray>()
        .map(|array| array.iter().map(|v| v.map(str::to_string)).collect())
}

fn binaries(batch: &RecordBatch, names: &[&str]) -> Option<Vec<Option<Vec<u8>>>> {
    let column = names.iter().find_map(|name| batch.column_by_name(name))?;
    let any = column.as_any();
    if let Some(array) = any.downcast_ref::<BinaryArray>() {
        return Some(array.iter().map(|v| v.map(<[u8]>::to_vec)).collect());
    }
    any.downcast_ref::<LargeBinaryArray>()
        .map(|array| array.iter().map(|v| v.map(<[u8]>::to_vec)).collect())
}

impl Importer for Img2Dataset {
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
        for path in &self.files {
            let file = std::fs::File::open(path).map_err(|error| ImportError::io(path, error))?;
            let bad = |error: &dyn std::fmt::Display| ImportError::file(path, format!("not readable parquet: {error}"));
            let reader = ParquetRecordBatchReaderBuilder::try_new(file)
                .map_err(|error| bad(&error))?
                .build()
                .map_err(|error| bad(&error))?;
            let mut row = 0u64;
            for batch in reader {
                let batch = batch.map_err(|error| bad(&error))?;
                let images = binaries(&batch, &["jpg", "png", "webp", "image"]).ok_or_else(|| {
                    ImportError::file(path, "no image column (binary `jpg`, `png`, `webp` or `image`)")
                })?;
                let captions = strings(&batch, &["caption", "text"])
                    .ok_or_else(|| ImportError::file(path, "no caption column (utf8 `caption` or `text`)"))?;
                let keys = strings(&batch, &["key"]);
                let statuses = strings(&batch, &["status"]);
                for i in 0..batch.num_rows() {
                    let at = || format!("{} row {}", path.display(), row + i as u64);
                    let failed = statuses
                        .as_ref()
                        .and_then(|s| s[i].as_deref())
                        .is_some_and(|s| s != "success");
                    let key = keys.as_ref().and_then(|k| k[i].clone()).unwrap_or_else(|| {
                        format!(
                            "{}-{}",
                            path.file_stem().unwrap_or_default().to_string_lossy(),
                            row + i as u64
                        )
                    });
                    match (&images[i], &captions[i]) {
                        (Some(image), Some(caption)) if !failed => sink(align_item(key, image.clone(), caption, at))?,
                        _ => sink(Item::Skipped {
                            reason: "failed download",
                            at: at(),
                        })?,
                    }
                }
                row += batch.num_rows() as u64;
            }
        }
        Ok(())
    }
}
