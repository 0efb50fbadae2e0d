//! A tar source's index: the shard list, each tar's samples, size and
//! SHA-256 (what exact resume needs), and for jft the class list. Built once
//! by reading every tar (`coca data index`, or the coordinator at a job's
//! first start), kept beside the shards (`<base>/coca-tar-index*.json`),
//! or in the job's directory where the data's store is read-only, and
//! pinned by the coordinator as an Arrow dataset's index is.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use bytes::Bytes;
use contract::dataset::{ClassName, Container, DatasetIndex, DatasetIndexError, DatasetKind, ShardEntry};
use contract::shard_pattern::{PatternError, TarSource};
use store::{Store, StoreError};

use crate::tar_shard::{Label, TarShard};

/// The class list a jft tar source may keep beside its shards.
pub const CLASSES_FILE: &str = "classes.txt";

#[derive(Debug, thiserror::Error)]
pub enum TarIndexError {
    #[error(transparent)]
    Pattern(#[from] PatternError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{url}: cannot list its objects ({detail}); name the shards with a brace pattern, e.g. {url}/{{00000..00099}}.tar")]
    List { url: String, detail: String },
    #[error("{url}: not found, and the source's pattern names it")]
    Missing { url: String },
    #[error("{url}: no .tar shards here")]
    NoShards { url: String },
    #[error("{url}: no tar holds a readable sample; first: {first}")]
    NoSamples { url: String, first: String },
    #[error("{url}: {message}")]
    Classes { url: String, message: String },
    #[error(transparent)]
    Index(#[from] DatasetIndexError),
}

/// How to build an index.
#[derive(Debug, Clone)]
pub struct IndexBuild {
    pub kind: DatasetKind,
    /// For jft: the class list. `None`: `classes.txt` beside the shards,
    /// else the class names the samples hold, sorted.
    pub classes: Option<Vec<ClassName>>,
    /// Tars fetched and read at once.
    pub threads: usize,
}

/// A built index and what building it met.
#[derive(Debug, Clone)]
pub struct IndexReport {
    pub index: DatasetIndex,
    /// Tars without one readable sample, left out of the index: URL and why.
    pub left_out: Vec<(String, String)>,
    /// Tars cut short (their samples before the cut are indexed): URL and where.
    pub truncated: Vec<(String, String)>,
    /// Samples missing their image, caption or class: the loader counts
    /// them as bad records.
    pub incomplete: u64,
}

/// What one tar holds, as far as the index cares.
struct TarSummary {
    name: String,
    bytes: u64,
    sha256: String,
    samples: u64,
    incomplete: u64,
    truncated: Option<String>,
    ids: BTreeSet<i64>,
    names: BTreeSet<String>,
}

impl IndexBuild {
    /// Reads every tar of `source` from `store` (opened at `source.base`);
    /// `progress(done, total)` after each.
    pub fn run(
        &self,
        source: &TarSource,
        store: &Store,
        progress: &(dyn Fn(usize, usize) + Sync),
    ) -> Result<IndexReport, TarIndexError> {
        let names = shard_names(source, store)?;
        let next = AtomicUsize::new(0);
        let done = AtomicUsize::new(0);
        let summaries: Mutex<Vec<Option<Result<TarSummary, StoreError>>>> =
            Mutex::new((0..names.len()).map(|_| None).collect());
        std::thread::scope(|scope| {
            for _ in 0..self.threads.clamp(1, names.len()) {
                scope.spawn(|| loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(name) = names.get(i) else { return };
                    let summary = store.get(name).map(|bytes| summarize(name, bytes, self.kind));
                    let failed = summary.is_err();
                    summaries.lock().expect("summaries")[i] = Some(summary);
                    if failed {
                        // The first failure ends the build: no other tar is fetched.
                        next.store(names.len(), Ordering::Relaxed);
                        return;
                    }
                    progress(done.fetch_add(1, Ordering::Relaxed) + 1, names.len());
                });
            }
        });
        let mut index = DatasetIndex::new(self.kind, Vec::new(), &format!("webdataset tars {}", source.url));
        index.container = Container::Tar;
        let (mut left_out, mut truncated, mut incomplete) = (Vec::new(), Vec::new(), 0);
        let (mut ids, mut class_names) = (BTreeSet::new(), BTreeSet::new());
        for summary in summaries.into_inner().expect("summaries").into_iter().flatten() {
            let summary = summary.map_err(|error| match error {
                StoreError::NotFound { url } => TarIndexError::Missing { url },
                other => other.into(),
            })?;
            let url = store.object_url(&summary.name);
            if let Some(at) = &summary.truncated {
                truncated.push((url.clone(), at.clone()));
                *index.skipped.entry("truncated tar".into()).or_default() += 1;
            }
            if summary.samples == 0 {
                let why = summary.truncated.unwrap_or_else(|| "it holds no sample".into());
                left_out.push((url, why));
                *index.skipped.entry("tar without samples".into()).or_default() += 1;
                continue;
            }
            incomplete += summary.incomplete;
            ids.extend(summary.ids);
            class_names.extend(summary.names);
            index.shards.push(ShardEntry {
                file: summary.name,
                rows: summary.samples,
                bytes: summary.bytes,
                sha256: summary.sha256,
            });
        }
        if index.shards.is_empty() {
            let first = left_out.first().map(|(url, why)| format!("{url}: {why}"));
            return Err(TarIndexError::NoSamples {
                url: source.url.clone(),
                first: first.unwrap_or_default(),
            });
        }
        if self.kind == DatasetKind::Jft {
            index.classes = self.classes(source, store, &ids, class_names)?;
        }
        index.validate(&source.url)?;
        Ok(IndexReport {
            index,
            left_out,
            truncated,
            incomplete,
        })
    }

    fn classes(
        &self,
        source: &TarSource,
        store: &Store,
        ids: &BTreeSet<i64>,
        names: BTreeSet<String>,
    ) -> Result<Vec<ClassName>, TarIndexError> {
        let failed = |message: String| TarIndexError::Classes {
            url: source.url.clone(),
            message,
        };
        if let Some(classes) = &self.classes {
            return Ok(classes.clone());
        }
        match store.get(CLASSES_FILE) {
            Ok(bytes) => {
                let url = store.object_url(CLASSES_FILE);
                return ClassName::parse_list(&String::from_utf8_lossy(&bytes)).map_err(|(line, message)| {
                    failed(match line {
                        Some(line) => format!("{url} line {line}: {message}"),
                        None => format!("{url}: {message}"),
                    })
                });
            }
            Err(StoreError::NotFound { .. }) => {}
            Err(error) => return Err(error.into()),
        }
        if !ids.is_empty() {
            return Err(failed(format!(
                "its samples hold class ids ({} distinct), and no class names are given: put {CLASSES_FILE} \
                 beside the shards (one name per line, in id order), or give data.source.classes \
                 (coca data index --classes)",
                ids.len()
            )));
        }
        if names.is_empty() {
            return Err(failed("no sample holds a class (.cls, or .json with `label`)".into()));
        }
        Ok(names.into_iter().map(|name| ClassName { name, parent: None }).collect())
    }
}

/// A class list (one name per line, `name<TAB>parent` optionally) at `url`.
pub fn read_class_list(url: &str, options: &store::StoreOptions) -> Result<Vec<ClassName>, TarIndexError> {
    let (store, name) = Store::open_object(url, options)?;
    let bytes = store.get(&name)?;
    ClassName::parse_list(&String::from_utf8_lossy(&bytes)).map_err(|(line, message)| TarIndexError::Classes {
        url: url.to_string(),
        message: match line {
            Some(line) => format!("line {line}: {message}"),
            None => message.to_string(),
        },
    })
}

fn summarize(name: &str, bytes: Bytes, kind: DatasetKind) -> TarSummary {
    let sha256 = store::sha256_hex(&bytes);
    let size = bytes.len() as u64;
    let shard = TarShard::parse(bytes);
    let mut summary = TarSummary {
        name: name.to_string(),
        bytes: size,
        sha256,
        samples: shard.len() as u64,
        incomplete: 0,
        truncated: shard.truncated().map(str::to_string),
        ids: BTreeSet::new(),
        names: BTreeSet::new(),
    };
    for sample in shard.samples() {
        if sample.missing(kind == DatasetKind::Align).is_some() {
            summary.incomplete += 1;
        }
        match &sample.label {
            Some(Label::Ids(ids)) => summary.ids.extend(ids),
            Some(Label::Name(name)) => {
                summary.names.insert(name.clone());
            }
            None => {}
        }
    }
    summary
}

/// The tars of `source`: its pattern's names, or every `.tar` under its prefix.
fn shard_names(source: &TarSource, store: &Store) -> Result<Vec<String>, TarIndexError> {
    let names = match source.names()? {
        Some(names) => names,
        None => store
            .list("")
            .map_err(|error| TarIndexError::List {
                url: source.base.trim_end_matches('/').to_string(),
                detail: store::error_chain(&error),
            })?
            .into_iter()
            .map(|object| object.name)
            .filter(|name| name.ends_with(".tar"))
            .collect(),
    };
    if names.is_empty() {
        return Err(TarIndexError::NoShards {
            url: source.url.clone(),
        });
    }
    Ok(names)
}

/// Where a source's index is kept: beside its shards, or in `job_dir`
/// (the job's directory's store) when the data's store is read-only.
pub struct IndexPlace<'a> {
    pub source: &'a TarSource,
    pub data: &'a Store,
    pub job_dir: Option<&'a Store>,
}

impl IndexPlace<'_> {
    /// The index's name in the job's directory: one per source URL.
    fn job_dir_name(&self) -> String {
        format!("data-indexes/{:016x}.json", contract::rng::fnv1a(&self.source.url))
    }

    /// The index kept for this source, and its URL; `None` if there is none yet.
    pub fn read(&self) -> Result<Option<(DatasetIndex, String)>, TarIndexError> {
        let beside = (self.data, self.source.index_name());
        let places = std::iter::once(beside).chain(self.job_dir.map(|dir| (dir, self.job_dir_name())));
        for (store, name) in places {
            match store.get(&name) {
                Ok(bytes) => {
                    let url = store.object_url(&name);
                    let index = DatasetIndex::parse(&String::from_utf8_lossy(&bytes), &url)?;
                    return Ok(Some((index, url)));
                }
                Err(StoreError::NotFound { .. }) => continue,
                Err(error) => return Err(error.into()),
            }
        }
        Ok(None)
    }

    /// Writes `index` beside the shards, else (a store that refuses it)
    /// in the job's directory; returns its URL.
    pub fn write(&self, index: &DatasetIndex) -> Result<String, TarIndexError> {
        let json = Bytes::from(index.to_json());
        let name = self.source.index_name();
        match (self.data.put(&name, json.clone()), self.job_dir) {
            (Ok(()), _) => Ok(self.data.object_url(&name)),
            (Err(error), None) => Err(error.into()),
            (Err(_), Some(dir)) => {
                let name = self.job_dir_name();
                dir.put(&name, json)?;
                Ok(dir.object_url(&name))
            }
        }
    }
}
