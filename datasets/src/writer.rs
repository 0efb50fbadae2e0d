//! Writes a dataset: shards as they fill, the index last, so a dataset
//! that a crash interrupted has no index and is never read as finished.

use bytes::Bytes;
use contract::dataset::{ClassName, DatasetIndex, DatasetKind, ShardEntry, INDEX_FILE};
use store::{Store, StoreError};

use super::shard::{self, Compression, Record, ShardError};

#[derive(Debug, thiserror::Error)]
pub enum WriterError {
    #[error("{url} already holds a dataset; write to another place or delete it first")]
    Exists { url: String },
    #[error("record `{key}`: {message}")]
    BadRecord { key: String, message: String },
    #[error("nothing to write: every record was skipped ({skipped})")]
    Empty { skipped: String },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Shard(#[from] ShardError),
}

pub struct DatasetWriter {
    store: Store,
    index: DatasetIndex,
    shard_rows: usize,
    compression: Compression,
    pending: Vec<Record>,
}

impl DatasetWriter {
    /// Starts a dataset at `store`, which must not hold one already.
    /// `classes` are the label names of a jft dataset (empty for align).
    pub fn create(
        store: Store,
        kind: DatasetKind,
        classes: Vec<ClassName>,
        shard_rows: usize,
        compression: Compression,
        source: &str,
    ) -> Result<Self, WriterError> {
        assert!(shard_rows > 0, "a shard holds at least one row");
        if store.exists(INDEX_FILE)? {
            return Err(WriterError::Exists { url: store.url() });
        }
        Ok(Self {
            store,
            index: DatasetIndex::new(kind, classes, source),
            shard_rows,
            compression,
            pending: Vec::new(),
        })
    }

    pub fn kind(&self) -> DatasetKind {
        self.index.kind
    }

    /// Adds a record; a full shard is written at once.
    pub fn push(&mut self, record: Record) -> Result<(), WriterError> {
        let bad = |message: String| WriterError::BadRecord {
            key: record.key.clone(),
            message,
        };
        if record.content.kind() != self.index.kind {
            return Err(bad(format!(
                "is {}, but the dataset is {}",
                record.content.kind(),
                self.index.kind
            )));
        }
        if let shard::Content::Labels(labels) = &record.content {
            let classes = self.index.classes.len();
            if let Some(label) = labels.iter().find(|&&label| label < 0 || label as usize >= classes) {
                return Err(bad(format!("label {label} is not one of the {classes} classes")));
            }
        }
        self.pending.push(record);
        if self.pending.len() == self.shard_rows {
            self.flush()?;
        }
        Ok(())
    }

    /// Counts a record the importer refused, by reason.
    pub fn skip(&mut self, reason: &str) {
        *self.index.skipped.entry(reason.to_string()).or_default() += 1;
    }

    pub fn rows(&self) -> u64 {
        self.index.rows() + self.pending.len() as u64
    }

    fn flush(&mut self) -> Result<(), WriterError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let bytes = shard::encode(self.index.kind, &self.pending, self.compression)?;
        let file = format!("shard-{:05}.arrow", self.index.shards.len());
        let entry = ShardEntry {
            file: file.clone(),
            rows: self.pending.len() as u64,
            bytes: bytes.len() as u64,
            sha256: store::sha256_hex(&bytes),
        };
        self.store.put(&file, Bytes::from(bytes))?;
        self.index.shards.push(entry);
        self.pending.clear();
        Ok(())
    }

    /// Writes the last shard, then the index; returns the index.
    pub fn finish(mut self) -> Result<DatasetIndex, WriterError> {
        self.flush()?;
        if self.index.shards.is_empty() {
            let skipped: Vec<String> = self.index.skipped.iter().map(|(why, n)| format!("{n} {why}")).collect();
            return Err(WriterError::Empty {
                skipped: if skipped.is_empty() {
                    "no records".into()
                } else {
                    skipped.join(", ")
                },
            });
        }
        self.index
            .validate(&self.store.object_url(INDEX_FILE))
            .expect("the writer builds valid indexes");
        self.store.put(INDEX_FILE, Bytes::from(self.index.to_json()))?;
        Ok(self.index)
    }
}
