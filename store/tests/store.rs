//! The store on real local files and in memory, retries against a backend
//! that fails on purpose, and the local cache.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream::BoxStream;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore, PutMultipartOptions,
    PutOptions, PutPayload, PutResult,
};
use store::{LocalCache, RetryPolicy, Store, StoreError, StoreOptions};

#[test]
fn files_round_trip_under_a_prefix_and_list_sorted() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("{}/data/set", dir.path().display());
    let store = Store::open(&url, &StoreOptions::default()).unwrap();
    assert_eq!(store.url(), format!("file://{url}"));
    store.put("b/shard-1.arrow", Bytes::from_static(b"two")).unwrap();
    store.put("a.json", Bytes::from_static(b"one")).unwrap();
    assert_eq!(std::fs::read(dir.path().join("data/set/a.json")).unwrap(), b"one");
    assert_eq!(store.get("b/shard-1.arrow").unwrap(), Bytes::from_static(b"two"));
    let names: Vec<(String, u64)> = store.list("").unwrap().into_iter().map(|o| (o.name, o.bytes)).collect();
    assert_eq!(names, [("a.json".to_string(), 3), ("b/shard-1.arrow".to_string(), 3)]);
    assert!(store.exists("a.json").unwrap());
    store.delete("a.json").unwrap();
    assert!(!store.exists("a.json").unwrap());
    // A sub-store shares the backend.
    assert_eq!(store.at("b").get("shard-1.arrow").unwrap(), Bytes::from_static(b"two"));
}

#[test]
fn a_missing_object_is_not_found_with_its_url_and_a_missing_directory_lists_empty() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(
        &dir.path().join("nothing").display().to_string(),
        &StoreOptions::default(),
    )
    .unwrap();
    let error = store.get("index.json").unwrap_err();
    assert!(error.is_not_found());
    assert_eq!(
        error.to_string(),
        format!("file://{}/nothing/index.json: not found", dir.path().display())
    );
    assert!(store.list("").unwrap().is_empty());
}

#[test]
fn large_objects_go_up_in_parts_and_come_back_whole() {
    // Parts on a remote-like store; a file is written whole.
    let dir = tempfile::tempdir().unwrap();
    let big: Vec<u8> = (0..40u32 << 20).map(|i| (i % 251) as u8).collect();
    for url in ["memory://big".to_string(), dir.path().display().to_string()] {
        let store = Store::open(&url, &StoreOptions::default()).unwrap();
        store.put("big.bin", Bytes::from(big.clone())).unwrap();
        assert_eq!(store.get("big.bin").unwrap().as_ref(), big.as_slice(), "{url}");
    }
}

#[test]
fn memory_stores_are_shared_by_clones() {
    let store = Store::memory();
    let clone = store.clone();
    store.put("x", Bytes::from_static(b"1")).unwrap();
    assert_eq!(clone.get("x").unwrap(), Bytes::from_static(b"1"));
    assert_eq!(
        Store::open("memory://", &StoreOptions::default())
            .unwrap()
            .list("")
            .unwrap(),
        vec![]
    );
}

/// Fails the first `failures` reads with a transient error, as a network would.
#[derive(Debug)]
struct Flaky {
    inner: InMemory,
    failures: u32,
    calls: AtomicU32,
}

impl std::fmt::Display for Flaky {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Flaky")
    }
}

#[async_trait::async_trait]
impl ObjectStore for Flaky {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        self.inner.put_opts(location, payload, opts).await
    }
    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        self.inner.put_multipart_opts(location, opts).await
    }
    async fn get_opts(&self, location: &Path, options: GetOptions) -> object_store::Result<GetResult> {
        if self.calls.fetch_add(1, Ordering::SeqCst) < self.failures {
            return Err(object_store::Error::Generic {
                store: "Flaky",
                source: "connection reset by peer".into(),
            });
        }
        self.inner.get_opts(location, options).await
    }
    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<Path>>,
    ) -> BoxStream<'static, object_store::Result<Path>> {
        self.inner.delete_stream(locations)
    }
    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.inner.list(prefix)
    }
    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }
    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> object_store::Result<()> {
        self.inner.copy_opts(from, to, options).await
    }
}

fn flaky_store(failures: u32) -> (Store, Arc<Flaky>) {
    let flaky = Arc::new(Flaky {
        inner: InMemory::new(),
        failures,
        calls: AtomicU32::new(0),
    });
    let store = Store::memory().with_backend(flaky.clone()).with_retry(RetryPolicy {
        attempts: 4,
        first_delay: Duration::from_millis(1),
        max_delay: Duration::from_millis(4),
    });
    store.put("shard", Bytes::from_static(b"data")).unwrap();
    (store, flaky)
}

#[test]
fn transient_errors_are_retried_until_the_attempts_run_out() {
    let (store, flaky) = flaky_store(3);
    assert_eq!(store.get("shard").unwrap(), Bytes::from_static(b"data"));
    assert_eq!(flaky.calls.load(Ordering::SeqCst), 4);

    let (store, flaky) = flaky_store(10);
    let error = store.get("shard").unwrap_err();
    assert!(matches!(error, StoreError::Exhausted { attempts: 4, .. }), "{error}");
    assert!(error.to_string().contains("connection reset by peer"), "{error}");
    assert_eq!(flaky.calls.load(Ordering::SeqCst), 4);
}

#[test]
fn backoff_doubles_up_to_its_limit() {
    let policy = RetryPolicy {
        attempts: 10,
        first_delay: Duration::from_millis(100),
        max_delay: Duration::from_millis(500),
    };
    let delays: Vec<u128> = (1..=6).map(|attempt| policy.delay(attempt).as_millis()).collect();
    assert_eq!(delays, [0, 100, 200, 400, 500, 500]);
}

#[test]
fn the_cache_is_content_addressed_and_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let cache = LocalCache::new(dir.path(), 250).unwrap();
    let objects: Vec<Vec<u8>> = (0..3u8).map(|i| vec![i; 100]).collect();
    let sums: Vec<String> = objects.iter().map(|bytes| store::sha256_hex(bytes)).collect();
    for (bytes, sum) in objects.iter().zip(&sums) {
        cache.insert(sum, bytes).unwrap();
        // Distinct modification times order the eviction.
        std::thread::sleep(Duration::from_millis(20));
    }
    // 300 bytes do not fit in 250: the oldest went.
    assert_eq!(cache.get(&sums[0]), None);
    assert_eq!(cache.get(&sums[2]).unwrap().as_ref(), objects[2].as_slice());
    // A damaged entry is dropped, not served.
    std::fs::write(dir.path().join(&sums[1]), b"garbage").unwrap();
    assert_eq!(cache.get(&sums[1]), None);
    assert!(!dir.path().join(&sums[1]).exists());
}

#[test]
fn an_object_url_opens_its_parent_store_and_names_the_object() {
    let options = StoreOptions::default();
    let (store, name) = Store::open_object("/data/demo/tokenizer.json", &options).unwrap();
    assert_eq!(
        (store.url().as_str(), name.as_str()),
        ("file:///data/demo", "tokenizer.json")
    );
    let (store, name) = Store::open_object("s3://bucket/tokenizer.json", &options).unwrap();
    assert_eq!((store.url().as_str(), name.as_str()), ("s3://bucket", "tokenizer.json"));
    let error = Store::open_object("s3://bucket/", &options).unwrap_err().to_string();
    assert!(error.contains("names no object"), "{error}");
}
