use std::fs;
use std::path::{Path, PathBuf};

use bytes::Bytes;

use crate::StoreError;

/// A local directory of objects keyed by their SHA-256, bounded in size:
/// readers of remote datasets keep recent shards here rather than fetch
/// them again. Content addressing makes a stale entry impossible.
#[derive(Debug, Clone)]
pub struct LocalCache {
    dir: PathBuf,
    limit_bytes: u64,
}

impl LocalCache {
    pub fn new(dir: impl Into<PathBuf>, limit_bytes: u64) -> Result<Self, StoreError> {
        let dir = dir.into();
        fs::create_dir_all(&dir).map_err(|source| cache_error(&dir, source))?;
        Ok(Self { dir, limit_bytes })
    }

    /// The cached object with this checksum, if any (and intact).
    pub fn get(&self, sha256: &str) -> Option<Bytes> {
        let path = self.dir.join(sha256);
        let bytes = fs::read(&path).ok()?;
        if crate::sha256_hex(&bytes) != sha256 {
            let _ = fs::remove_file(&path);
            return None;
        }
        Some(Bytes::from(bytes))
    }

    /// Keeps `bytes` under `sha256`, then evicts the least recently written
    /// entries beyond the size limit.
    pub fn insert(&self, sha256: &str, bytes: &[u8]) -> Result<(), StoreError> {
        if bytes.len() as u64 > self.limit_bytes {
            return Ok(());
        }
        let temporary = self.dir.join(format!(".{sha256}.partial"));
        fs::write(&temporary, bytes).map_err(|source| cache_error(&temporary, source))?;
        let path = self.dir.join(sha256);
        fs::rename(&temporary, &path).map_err(|source| cache_error(&path, source))?;
        self.evict()
    }

    fn evict(&self) -> Result<(), StoreError> {
        let entries = fs::read_dir(&self.dir).map_err(|source| cache_error(&self.dir, source))?;
        let mut files: Vec<(std::time::SystemTime, u64, PathBuf)> = entries
            .filter_map(Result::ok)
            .filter(|entry| !entry.file_name().to_string_lossy().starts_with('.'))
            .filter_map(|entry| {
                let meta = entry.metadata().ok()?;
                Some((meta.modified().ok()?, meta.len(), entry.path()))
            })
            .collect();
        files.sort();
        let mut total: u64 = files.iter().map(|(_, len, _)| len).sum();
        for (_, len, path) in files {
            if total <= self.limit_bytes {
                break;
            }
            fs::remove_file(&path).map_err(|source| cache_error(&path, source))?;
            total -= len;
        }
        Ok(())
    }
}

fn cache_error(path: &Path, source: std::io::Error) -> StoreError {
    StoreError::Cache {
        path: path.display().to_string(),
        source,
    }
}
