//! Reads a dataset: its index, and shards verified against it.

use contract::dataset::{Container, DatasetIndex, DatasetIndexError, INDEX_FILE};
use store::{LocalCache, Store, StoreError};

use super::shard::{Shard, ShardError};

#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    #[error("{url}: no dataset here (no {INDEX_FILE}; an unfinished import has none)")]
    Missing { url: String },
    #[error("{url}: index is not UTF-8")]
    IndexEncoding { url: String },
    #[error(transparent)]
    Index(#[from] DatasetIndexError),
    #[error("{url}: checksum mismatch (index says {expected}, the object hashes to {actual}); the shard is damaged or was replaced")]
    Checksum {
        url: String,
        expected: String,
        actual: String,
    },
    #[error("{url}: {rows} rows, but the index says {expected}")]
    RowCount { url: String, rows: usize, expected: u64 },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Shard(#[from] ShardError),
}

/// A dataset whose index has been read and validated.
#[derive(Debug, Clone)]
pub struct Dataset {
    store: Store,
    index: DatasetIndex,
    starts: Vec<u64>,
    cache: Option<LocalCache>,
}

impl Dataset {
    pub fn open(store: Store) -> Result<Self, DatasetError> {
        let url = store.object_url(INDEX_FILE);
        let bytes = store.get(INDEX_FILE).map_err(|error| match error {
            StoreError::NotFound { .. } => DatasetError::Missing { url: store.url() },
            other => DatasetError::Store(other),
        })?;
        let json = std::str::from_utf8(&bytes).map_err(|_| DatasetError::IndexEncoding { url: url.clone() })?;
        Ok(Self::with_index(store, DatasetIndex::parse(json, &url)?))
    }

    /// A dataset with an index read (and pinned) elsewhere; `store` holds
    /// the shards the index names (a tar source's base).
    pub fn with_index(store: Store, index: DatasetIndex) -> Self {
        let starts = index.shard_starts();
        Self {
            store,
            index,
            starts,
            cache: None,
        }
    }

    /// Keeps fetched shards in a local directory too.
    pub fn with_cache(mut self, cache: LocalCache) -> Self {
        self.cache = Some(cache);
        self
    }

    pub fn index(&self) -> &DatasetIndex {
        &self.index
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn url(&self) -> String {
        self.store.url()
    }

    pub fn shard_url(&self, shard: usize) -> String {
        self.store.object_url(&self.index.shards[shard].file)
    }

    /// The shard holding global row `row`, and the row inside it.
    pub fn locate(&self, row: u64) -> (usize, usize) {
        let (shard, local) = DatasetIndex::locate(&self.starts, row);
        (shard, local as usize)
    }

    /// Fetches shard `shard`, verifies its checksum and row count, decodes it.
    pub fn shard(&self, shard: usize) -> Result<Shard, DatasetError> {
        let entry = &self.index.shards[shard];
        let url = self.shard_url(shard);
        let cached = self.cache.as_ref().and_then(|cache| cache.get(&entry.sha256));
        let bytes = match cached {
            Some(bytes) => bytes,
            None => {
                let bytes = self.store.get(&entry.file)?;
                let actual = store::sha256_hex(&bytes);
                if actual != entry.sha256 {
                    return Err(DatasetError::Checksum {
                        url,
                        expected: entry.sha256.clone(),
                        actual,
                    });
                }
                if let Some(cache) = &self.cache {
                    cache.insert(&entry.sha256, &bytes)?;
                }
                bytes
            }
        };
        let decoded = match self.index.container {
            Container::Arrow => Shard::decode(bytes, self.index.kind, &url)?,
            Container::Tar => Shard::from_tar(bytes, &self.index),
        };
        if decoded.rows() as u64 != entry.rows {
            return Err(DatasetError::RowCount {
                url,
                rows: decoded.rows(),
                expected: entry.rows,
            });
        }
        Ok(decoded)
    }
}
