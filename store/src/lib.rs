//! coca's object storage: every dataset, tokenizer and checkpoint lives
//! behind a URL (`file://`, a plain path, `memory://`, `s3://`, `gs://`,
//! `az://`, `http(s)://`). One parser turns a URL into a [`Store`]: a
//! prefix in an object store, read and written by relative names, with
//! transient errors retried and, for readers that ask, a local cache.
//!
//! The API is blocking: one process-wide async runtime drives object_store,
//! so data loaders and command-line tools call it from plain threads. Do
//! not call it from inside an async task. Transient errors back off through
//! the `retry` crate, as the worker's connection to the coordinator and the
//! collective ring do.

mod cache;
mod error;
mod location;
mod options;
mod store;

pub use bytes::Bytes;
pub use cache::LocalCache;
pub use error::{error_chain, StoreError};
pub use location::{Location, Scheme};
pub use options::{S3Options, StoreOptions};
pub use retry::RetryPolicy;
pub use store::{ObjectInfo, Store};

/// Hex SHA-256 of `bytes`: the checksum an index records for every object.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(bytes).iter().map(|byte| format!("{byte:02x}")).collect()
}
