//! Where a job starts: every dataset's index read once, checked and pinned,
//! the job plan every rank receives, and the checkpoint it resumes from.
//! Blocking (object store calls): run off the async runtime.

use checkpoint::layout::ResumeFields;
use checkpoint::{CheckpointError, Resume};
use contract::dataset::{Container, DatasetIndex, DatasetKind, INDEX_FILE};
use contract::manifest::{Manifest, Source, SourceFormat};
use contract::plan::{JobPlan, StorePlan};
use contract::sample_order::SampleOrder;
use contract::shard_pattern::{PatternError, TarSource};
use contract::stream_layout::readable_bytes;
use store::{Store, StoreError, StoreOptions};
use webdataset::{IndexBuild, IndexPlace, TarIndexError};

use crate::CoordinatorError;

/// Why a dataset the manifest names cannot be planned with.
#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error("no dataset here (no {INDEX_FILE})")]
    Missing,
    #[error("no dataset here (no {INDEX_FILE}), but .tar files: set format = \"webdataset\" to read them in place")]
    TarsWithoutFormat,
    #[error(transparent)]
    Pattern(#[from] PatternError),
    #[error(transparent)]
    TarIndex(#[from] TarIndexError),
    #[error("{url} is not a tar source's index")]
    NotTarIndex { url: String },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{INDEX_FILE} is not UTF-8")]
    NotUtf8,
    #[error(transparent)]
    Invalid(#[from] contract::dataset::DatasetIndexError),
    #[error("the dataset is {is}, but the manifest says kind = \"{said}\"")]
    Kind { is: DatasetKind, said: DatasetKind },
    #[error("the dataset is {is}; {field} needs a {needs} dataset")]
    EvalKind {
        is: DatasetKind,
        field: &'static str,
        needs: DatasetKind,
    },
}

/// What the coordinator starts a job from.
pub struct JobStart {
    pub plan: JobPlan,
    /// The committed step it resumes from; `None` starts at step 0.
    pub chosen: Option<checkpoint::Chosen>,
}

impl JobStart {
    pub fn read(manifest: &Manifest, resume: &Resume) -> Result<Self, CoordinatorError> {
        let (mut plan, mut order) = JobPlan::new(manifest, read_indexes(manifest)?)?;
        let chosen = match choose_start(manifest, &plan, &order, resume) {
            // A chosen stream count is the job's first start's: a resume keeps it.
            Err(CoordinatorError::Checkpoint(CheckpointError::Changed { was, .. }))
                if manifest.data.streams.is_none()
                    && SampleOrder::described_layout(&was)
                        .is_some_and(|(_, window)| window == plan.streaming.window) =>
            {
                let (streams, _) = SampleOrder::described_layout(&was).expect("matched above");
                tracing::info!("data.streams: {streams}, the count this job's checkpoints were written with");
                (plan, order) = plan.with_streams(streams)?;
                choose_start(manifest, &plan, &order, resume)?
            }
            chosen => chosen?,
        };
        tracing::info!("sample order: {}", order.describe());
        describe_streaming(manifest, &plan, &order);
        if let Some(chosen) = &chosen {
            if chosen.step >= plan.total_steps {
                return Err(CoordinatorError::Complete {
                    url: chosen.url.clone(),
                    step: chosen.step,
                    total: plan.total_steps,
                });
            }
        }
        Ok(Self { plan, chosen })
    }
}

/// How the job's stores are reached.
pub(crate) fn store_options(store: &StorePlan) -> StoreOptions {
    StoreOptions::with_s3(store.s3_endpoint.clone(), store.s3_region.clone())
}

/// Says which stream layout the job reads with and what a worker holds at
/// once under it; warns when shards will be fetched more than once an
/// epoch (a world that does not divide the streams, or re-fetching the
/// manifest accepted).
fn describe_streaming(manifest: &Manifest, plan: &JobPlan, order: &SampleOrder) {
    let workers = manifest.cluster.workers;
    let layout = plan.stream_layout(order, workers);
    let memory = manifest.data.shard_memory_bytes;
    let holds = format!(
        "each of {workers} workers reads {} streams, holding about {} of shards at once (data.shard_memory_bytes = {})",
        layout.streams_per_worker,
        readable_bytes(layout.working_set),
        readable_bytes(memory)
    );
    match manifest.data.streams {
        None => tracing::info!(
            "data.streams: {} chosen: the most that every worker reads on its own and that fit its memory; {holds}",
            layout.streams
        ),
        Some(streams) => tracing::info!("data.streams: {streams}; {holds}"),
    }
    if !layout.local {
        tracing::warn!(
            "{workers} workers do not divide the {} data streams: every worker reads every stream's shards \
             (set data.streams to a multiple of cluster.workers to keep shards local)",
            layout.streams
        );
    }
    if layout.working_set > memory {
        tracing::warn!(
            "a worker's shards do not fit data.shard_memory_bytes: shards will be fetched more than once an epoch"
        );
    }
}

/// The checkpoint the job starts from, after checking that the manifest
/// and the tokenizer still match what wrote it.
fn choose_start(
    manifest: &Manifest,
    plan: &JobPlan,
    order: &SampleOrder,
    resume: &Resume,
) -> Result<Option<checkpoint::Chosen>, CoordinatorError> {
    let options = store_options(&plan.store);
    let root = match (&manifest.checkpoint, resume) {
        (Some(checkpoint), _) => Store::open(&checkpoint.url, &options).map_err(checkpoint::CheckpointError::from)?,
        // --from reads a step wherever it is; without a location there is nothing else to resume.
        (None, Resume::From(url)) => Store::open(url, &options).map_err(checkpoint::CheckpointError::from)?,
        (None, _) => return Ok(None),
    };
    let fields = ResumeFields::of(plan, order);
    let Some(chosen) = checkpoint::choose(&root, &options, resume, &fields)? else {
        return Ok(None);
    };
    let (store, name) =
        Store::open_object(&manifest.data.tokenizer, &options).map_err(checkpoint::CheckpointError::from)?;
    let tokenizer = store::sha256_hex(&store.get(&name).map_err(checkpoint::CheckpointError::from)?);
    if tokenizer != chosen.meta.tokenizer_sha256 {
        return Err(checkpoint::CheckpointError::Changed {
            url: chosen.url,
            field: "data.tokenizer".into(),
            was: format!("a tokenizer with SHA-256 {}", chosen.meta.tokenizer_sha256),
            is: format!("{} with SHA-256 {tokenizer}", manifest.data.tokenizer),
        }
        .into());
    }
    Ok(Some(chosen))
}

/// Every source's index, read once and checked against the manifest.
fn read_indexes(manifest: &Manifest) -> Result<Vec<DatasetIndex>, CoordinatorError> {
    let options = store_options(&StorePlan::of(&manifest.data));
    let mut indexes = Vec::new();
    for (index, source) in manifest.data.sources.iter().enumerate() {
        let failed = |error: IndexError| CoordinatorError::Dataset {
            index,
            url: source.url.clone(),
            source: error,
        };
        let parsed = match source.format {
            SourceFormat::Arrow => read_index(&source.url, &options),
            SourceFormat::Webdataset => tar_index(source, &manifest.job.dir, &options),
        }
        .map_err(failed)?;
        if parsed.kind != source.kind {
            return Err(failed(IndexError::Kind {
                is: parsed.kind,
                said: source.kind,
            }));
        }
        indexes.push(parsed);
    }
    // The [eval] datasets: rank 0 reads them mid-job, so check them now.
    let evals = manifest.eval.iter().flat_map(|eval| {
        [
            ("eval.zeroshot", eval.zeroshot.as_deref(), DatasetKind::Jft),
            ("eval.retrieval", eval.retrieval.as_deref(), DatasetKind::Align),
        ]
    });
    for (field, url, kind) in evals {
        let Some(url) = url else { continue };
        let failed = |error: IndexError| CoordinatorError::Eval {
            field,
            url: url.to_string(),
            source: error,
        };
        let parsed = read_index(url, &options).map_err(failed)?;
        if parsed.kind != kind {
            return Err(failed(IndexError::EvalKind {
                is: parsed.kind,
                field,
                needs: kind,
            }));
        }
    }
    Ok(indexes)
}

/// A dataset's index.json, checked.
fn read_index(url: &str, options: &StoreOptions) -> Result<DatasetIndex, IndexError> {
    let store = Store::open(url, options)?;
    let bytes = store.get(INDEX_FILE).map_err(|e| match e {
        StoreError::NotFound { .. } => {
            let listed = store.list("").unwrap_or_default();
            match listed.iter().any(|object| object.name.ends_with(".tar")) {
                true => IndexError::TarsWithoutFormat,
                false => IndexError::Missing,
            }
        }
        other => other.into(),
    })?;
    let json = String::from_utf8(bytes.to_vec()).map_err(|_| IndexError::NotUtf8)?;
    Ok(DatasetIndex::parse(&json, &store.object_url(INDEX_FILE))?)
}

/// Tars (and the loader's memory) read at once while building an index.
const INDEX_THREADS: usize = 4;

/// A WebDataset source's index: the one kept beside its tars or in the
/// job's directory, else built now by reading every tar once and kept.
fn tar_index(source: &Source, job_dir: &str, options: &StoreOptions) -> Result<DatasetIndex, IndexError> {
    let tars = TarSource::parse(&source.url)?;
    let data = Store::open(&tars.base, options)?;
    let job_dir = Store::open(job_dir, options)?;
    let place = IndexPlace {
        source: &tars,
        data: &data,
        job_dir: Some(&job_dir),
    };
    if let Some((index, url)) = place.read()? {
        if index.container != Container::Tar {
            return Err(IndexError::NotTarIndex { url });
        }
        tracing::info!(
            "{}: {} tars, {} samples (index {url})",
            source.url,
            index.shards.len(),
            index.rows()
        );
        return Ok(index);
    }
    let classes = match &source.classes {
        Some(url) => Some(webdataset::index::read_class_list(url, options)?),
        None => None,
    };
    tracing::info!(
        "{}: no index yet; reading every tar once to build it (`coca data index` builds it ahead)",
        source.url
    );
    let build = IndexBuild {
        kind: source.kind,
        classes,
        threads: INDEX_THREADS,
    };
    let report = build.run(&tars, &data, &|done, total| {
        if done % (total / 10).max(1) == 0 || done == total {
            tracing::info!("{}: indexed {done} of {total} tars", source.url);
        }
    })?;
    for (url, why) in report.left_out.iter().chain(&report.truncated) {
        tracing::warn!("{url}: {why}");
    }
    if report.incomplete > 0 {
        tracing::warn!(
            "{}: {} samples lack their image or {}; the loader counts them as bad records",
            source.url,
            report.incomplete,
            if source.kind == DatasetKind::Align {
                "caption"
            } else {
                "class"
            }
        );
    }
    let url = place.write(&report.index)?;
    tracing::info!(
        "{}: {} tars, {} samples (index written to {url})",
        source.url,
        report.index.shards.len(),
        report.index.rows()
    );
    Ok(report.index)
}
