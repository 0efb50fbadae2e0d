use std::future::Future;
use std::path::Path as FsPath;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use futures_util::TryStreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::azure::MicrosoftAzureBuilder;
use object_store::gcp::GoogleCloudStorageBuilder;
use object_store::http::HttpBuilder;
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::{ClientOptions, ObjectStore, ObjectStoreExt, PutPayload, RetryConfig, WriteMultipart};

use tokio::runtime::Runtime;

use crate::{Location, RetryPolicy, Scheme, StoreError, StoreOptions};

/// Objects larger than this are uploaded in parts.
const MULTIPART_THRESHOLD: usize = 32 << 20;
const PART_SIZE: usize = 16 << 20;

/// One object under a store's prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    /// The name relative to the store's prefix.
    pub name: String,
    pub bytes: u64,
}

/// A prefix in an object store. Clones share the connection; every store
/// shares one I/O runtime.
#[derive(Clone)]
pub struct Store {
    inner: Arc<dyn ObjectStore>,
    runtime: &'static Runtime,
    location: Location,
    retry: RetryPolicy,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Store({})", self.url())
    }
}

impl Store {
    /// Opens the store at `url`; plain paths are resolved against the working directory.
    pub fn open(url: &str, options: &StoreOptions) -> Result<Self, StoreError> {
        let cwd = std::env::current_dir().map_err(|error| StoreError::Open {
            url: url.to_string(),
            detail: format!("no working directory: {error}"),
        })?;
        Self::open_location(Location::parse(url, &cwd)?, options)
    }

    /// The store holding the object at `url`, and the object's name in it
    /// (`s3://bucket/dir/tokenizer.json` -> `s3://bucket/dir`, `tokenizer.json`).
    pub fn open_object(url: &str, options: &StoreOptions) -> Result<(Self, String), StoreError> {
        let cwd = std::env::current_dir().map_err(|error| StoreError::Open {
            url: url.to_string(),
            detail: format!("no working directory: {error}"),
        })?;
        let mut location = Location::parse(url, &cwd)?;
        let (parent, name) = match location.prefix.rsplit_once('/') {
            Some((parent, name)) => (parent.to_string(), name.to_string()),
            None => (String::new(), location.prefix.clone()),
        };
        if name.is_empty() {
            return Err(StoreError::BadUrl {
                url: url.to_string(),
                reason: "it names no object (e.g. s3://bucket/tokenizer.json)".into(),
            });
        }
        location.prefix = parent;
        Ok((Self::open_location(location, options)?, name))
    }

    pub fn open_location(location: Location, options: &StoreOptions) -> Result<Self, StoreError> {
        let open_error = |detail: String| StoreError::Open {
            url: location.url(),
            detail,
        };
        let runtime = io_runtime().map_err(|error| open_error(format!("cannot start the I/O runtime: {error}")))?;
        let inner: Arc<dyn ObjectStore> = match location.scheme {
            // Durable on return, as remote stores are: a checkpoint shard
            // reported written survives a power cut. Deleting the last file
            // of a directory removes the directory.
            Scheme::File => Arc::new(LocalFileSystem::new().with_fsync(true).with_automatic_cleanup(true)),
            Scheme::Memory => Arc::new(InMemory::new()),
            Scheme::S3 => {
                install_tls_provider();
                let s3 = &options.s3;
                let mut builder = AmazonS3Builder::from_env()
                    .with_bucket_name(&location.authority)
                    .with_retry(no_internal_retry())
                    .with_client_options(client_options(s3.endpoint.as_deref()));
                if let Some(endpoint) = &s3.endpoint {
                    builder = builder
                        .with_endpoint(endpoint)
                        .with_allow_http(endpoint.starts_with("http://"));
                }
                if let Some(region) = &s3.region {
                    builder = builder.with_region(region);
                }
                if let Some(key) = &s3.access_key_id {
                    builder = builder.with_access_key_id(key);
                }
                if let Some(secret) = &s3.secret_access_key {
                    builder = builder.with_secret_access_key(secret);
                }
                Arc::new(builder.build().map_err(|error| open_error(error.to_string()))?)
            }
            Scheme::Gcs => {
                install_tls_provider();
                let builder = GoogleCloudStorageBuilder::from_env()
                    .with_bucket_name(&location.authority)
                    .with_retry(no_internal_retry())
                    .with_client_options(client_options(None));
                Arc::new(builder.build().map_err(|error| open_error(error.to_string()))?)
            }
            Scheme::Azure => {
                install_tls_provider();
                let builder = MicrosoftAzureBuilder::from_env()
                    .with_container_name(&location.authority)
                    .with_retry(no_internal_retry())
                    .with_client_options(client_options(None));
                Arc::new(builder.build().map_err(|error| open_error(error.to_string()))?)
            }
            Scheme::Http | Scheme::Https => {
                install_tls_provider();
                let scheme = if location.scheme == Scheme::Http {
                    "http"
                } else {
                    "https"
                };
                let builder = HttpBuilder::new()
                    .with_url(format!("{scheme}://{}", location.authority))
                    .with_retry(no_internal_retry())
                    .with_client_options(client_options(Some(scheme)));
                Arc::new(builder.build().map_err(|error| open_error(error.to_string()))?)
            }
        };
        Ok(Self {
            inner,
            runtime,
            location,
            retry: options.retry,
        })
    }

    /// A fresh in-memory store (tests; clones share its contents).
    pub fn memory() -> Self {
        Self::open_location(
            Location {
                scheme: Scheme::Memory,
                authority: String::new(),
                prefix: String::new(),
            },
            &StoreOptions::default(),
        )
        .expect("an in-memory store always opens")
    }

    /// This store with another backend, for tests that inject failures.
    pub fn with_backend(&self, inner: Arc<dyn ObjectStore>) -> Self {
        Self { inner, ..self.clone() }
    }

    pub fn with_retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// The same backend, one prefix further down.
    pub fn at(&self, name: &str) -> Self {
        Self {
            location: self.location.join(name),
            ..self.clone()
        }
    }

    pub fn location(&self) -> &Location {
        &self.location
    }

    /// The store's own URL, canonical (`file:///abs`, `s3://bucket/prefix`).
    pub fn url(&self) -> String {
        self.location.url()
    }

    /// The URL of object `name`, for messages.
    pub fn object_url(&self, name: &str) -> String {
        self.location.join(name).url()
    }

    /// The local directory of a `file://` store.
    pub fn local_dir(&self) -> Option<&FsPath> {
        (self.location.scheme == Scheme::File).then(|| FsPath::new(&self.location.prefix))
    }

    fn path(&self, name: &str) -> Path {
        let joined = self.location.join(name);
        Path::from(joined.prefix.trim_start_matches('/'))
    }

    pub fn get(&self, name: &str) -> Result<Bytes, StoreError> {
        let path = self.path(name);
        self.run(name, || async {
            let result = self.inner.get(&path).await?;
            result.bytes().await
        })
    }

    /// Writes `bytes` as object `name`, all or nothing: readers see the
    /// old object or the whole new one.
    pub fn put(&self, name: &str, bytes: Bytes) -> Result<(), StoreError> {
        let path = self.path(name);
        // A local file is written whole (to a temporary name, then renamed);
        // parts only help remote stores.
        if bytes.len() <= MULTIPART_THRESHOLD || self.location.scheme == Scheme::File {
            return self.run(name, || async {
                self.inner
                    .put(&path, PutPayload::from_bytes(bytes.clone()))
                    .await
                    .map(|_| ())
            });
        }
        self.run(name, || async {
            let upload = self.inner.put_multipart(&path).await?;
            let mut writer = WriteMultipart::new_with_chunk_size(upload, PART_SIZE);
            for chunk in bytes.chunks(PART_SIZE) {
                writer.wait_for_capacity(4).await?;
                writer.write(chunk);
            }
            writer.finish().await.map(|_| ())
        })
    }

    /// Whether object `name` exists.
    pub fn exists(&self, name: &str) -> Result<bool, StoreError> {
        let path = self.path(name);
        match self.run(name, || async { self.inner.head(&path).await }) {
            Ok(_) => Ok(true),
            Err(StoreError::NotFound { .. }) => Ok(false),
            Err(error) => Err(error),
        }
    }

    /// Every object under `name` (recursively), sorted by name.
    pub fn list(&self, name: &str) -> Result<Vec<ObjectInfo>, StoreError> {
        let path = self.path(name);
        let prefix = self.path("");
        let mut objects: Result<Vec<ObjectInfo>, StoreError> = self.run(name, || async {
            let metas: Vec<_> = self.inner.list(Some(&path)).try_collect().await?;
            Ok(metas
                .into_iter()
                .map(|meta| ObjectInfo {
                    name: meta
                        .location
                        .prefix_match(&prefix)
                        .map(|parts| {
                            parts
                                .map(|part| part.as_ref().to_string())
                                .collect::<Vec<_>>()
                                .join("/")
                        })
                        .unwrap_or_else(|| meta.location.to_string()),
                    bytes: meta.size,
                })
                .collect())
        });
        match &mut objects {
            Ok(list) => list.sort_by(|a, b| a.name.cmp(&b.name)),
            // A missing directory holds nothing.
            Err(StoreError::NotFound { .. }) => return Ok(Vec::new()),
            Err(_) => {}
        }
        objects
    }

    pub fn delete(&self, name: &str) -> Result<(), StoreError> {
        let path = self.path(name);
        match self.run(name, || async { self.inner.delete(&path).await }) {
            Err(StoreError::NotFound { .. }) => Ok(()),
            other => other,
        }
    }

    /// Runs `operation` on the store's runtime, retrying transient errors.
    fn run<T, F, Fut>(&self, name: &str, operation: F) -> Result<T, StoreError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = object_store::Result<T>>,
    {
        let url = || self.object_url(name);
        let classify = |error: object_store::Error| {
            let detail = crate::error_chain(&error);
            match error {
                object_store::Error::NotFound { .. } if detail.contains("NoSuchBucket") => {
                    Failure::Final(StoreError::NoBucket {
                        bucket: self.location.authority.clone(),
                        url: url(),
                    })
                }
                object_store::Error::NotFound { .. } => Failure::Final(StoreError::NotFound { url: url() }),
                object_store::Error::PermissionDenied { .. } | object_store::Error::Unauthenticated { .. } => {
                    Failure::Final(StoreError::Denied {
                        url: url(),
                        detail: server_error(&detail),
                    })
                }
                object_store::Error::Generic { .. } | object_store::Error::JoinError { .. } => {
                    Failure::Transient(detail)
                }
                _ => Failure::Final(StoreError::Failed { url: url(), detail }),
            }
        };
        let attempts = retry::retry(
            &self.retry,
            None,
            |failure| matches!(failure, Failure::Transient(_)),
            || async { operation().await.map_err(classify) },
        );
        self.runtime.block_on(attempts).map_err(|gave_up| match gave_up.error {
            Failure::Final(error) => error,
            Failure::Transient(detail) => StoreError::Exhausted {
                url: url(),
                attempts: gave_up.attempts,
                detail,
            },
        })
    }
}

/// The process's one I/O runtime: every store's calls run on it, behind
/// the blocking API (two threads: object stores wait on the network, not the CPU).
fn io_runtime() -> Result<&'static Runtime, String> {
    static RUNTIME: OnceLock<Result<Runtime, String>> = OnceLock::new();
    RUNTIME
        .get_or_init(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .thread_name("coca-store")
                .enable_all()
                .build()
                .map_err(|error| error.to_string())
        })
        .as_ref()
        .map_err(Clone::clone)
}

/// An object store error, as the retry loop sees it.
enum Failure {
    Transient(String),
    Final(StoreError),
}

/// The code and message of an S3-style XML error body, or the detail as it is.
fn server_error(detail: &str) -> String {
    let tag = |name: &str| {
        let start = detail.find(&format!("<{name}>"))? + name.len() + 2;
        let end = start + detail[start..].find(&format!("</{name}>"))?;
        Some(detail[start..end].to_string())
    };
    match (tag("Code"), tag("Message")) {
        (Some(code), Some(message)) => format!("{code}: {message}"),
        (Some(code), None) => code,
        _ => detail.to_string(),
    }
}

/// Retries happen in [`Store::run`], uniformly for every store.
fn no_internal_retry() -> RetryConfig {
    RetryConfig {
        max_retries: 0,
        ..RetryConfig::default()
    }
}

fn client_options(endpoint: Option<&str>) -> ClientOptions {
    ClientOptions::new()
        .with_connect_timeout(Duration::from_secs(10))
        .with_timeout(Duration::from_secs(300))
        .with_allow_http(endpoint.is_some_and(|endpoint| endpoint.starts_with("http")))
}

/// rustls needs one process-wide crypto provider; ours is ring.
fn install_tls_provider() {
    // Fails only when a provider is already installed, which is as good.
    let _ = rustls::crypto::ring::default_provider().install_default();
}
