//! The job plan: derived once from a manifest and the pinned indexes, and
//! read back by a worker as the very values the coordinator derived.

use contract::dataset::{ClassName, DatasetIndex, DatasetKind, ShardEntry};
use contract::manifest::{Manifest, Overrides};
use contract::plan::{JobPlan, PlanError};

const DEMO: &str = include_str!("../../deploy/local/demo.toml");

fn index(kind: DatasetKind, shards: u64, rows: u64) -> DatasetIndex {
    let classes = match kind {
        DatasetKind::Jft => vec![ClassName {
            name: "cat".into(),
            parent: None,
        }],
        DatasetKind::Align => Vec::new(),
    };
    let mut index = DatasetIndex::new(kind, classes, "test");
    index.shards = (0..shards)
        .map(|i| ShardEntry {
            file: format!("shard-{i:05}.arrow"),
            rows,
            bytes: 1000 + i,
            sha256: format!("{i:064x}"),
        })
        .collect();
    index
}

fn indexes() -> Vec<DatasetIndex> {
    vec![index(DatasetKind::Align, 8, 100), index(DatasetKind::Jft, 4, 250)]
}

#[test]
fn the_plan_carries_the_manifest_and_the_pinned_indexes() {
    // Learning rate and weights that decimal text does not hold exactly.
    let text =
        DEMO.replace("learning_rate = 1e-3", "learning_rate = 3.3e-4")
            .replacen("weight = 0.5", "weight = 0.3", 1);
    let overrides = Overrides {
        steps: Some(40),
        ..Overrides::default()
    };
    let manifest = Manifest::parse_with(&text, "demo.toml", &overrides).unwrap();
    let (plan, order) = JobPlan::new(&manifest, indexes()).unwrap();
    assert_eq!((plan.job.as_str(), plan.seed, plan.total_steps), ("demo", 0, 40));
    assert_eq!(plan.train, manifest.train);
    assert_eq!(plan.model, manifest.model);
    assert_eq!(plan.sources[1].index, indexes()[1]);
    assert_eq!(plan.sources[0].weight, 0.3);
    assert_eq!(plan.sample_order().unwrap().describe(), order.describe());
    // The wire form reads back to the same values, bit for bit.
    let read = JobPlan::from_json(&plan.to_json()).unwrap();
    assert_eq!(read, plan);
    assert_eq!(read.train.learning_rate.to_bits(), 3.3e-4f64.to_bits());
}

#[test]
fn a_plan_in_epochs_counts_the_first_sources_batches() {
    let text = DEMO.replace("steps = 300", "epochs = 2.0");
    let manifest = Manifest::parse(&text, "demo.toml").unwrap();
    let (plan, order) = JobPlan::new(&manifest, indexes()).unwrap();
    // 800 align rows, 16 of them in each batch of 32: 2 epochs are 100 steps.
    assert_eq!(order.counts_per_batch(), [16, 16]);
    assert_eq!(plan.total_steps, 100);
}

#[test]
fn a_plan_that_does_not_fit_is_refused_by_name() {
    let manifest = Manifest::parse(DEMO, "demo.toml").unwrap();
    let error = JobPlan::new(&manifest, indexes()[..1].to_vec()).unwrap_err();
    assert!(matches!(error, PlanError::Indexes { count: 1, sources: 2 }), "{error}");

    let streams = Manifest::parse(
        &DEMO.replace("loader_threads = 1", "loader_threads = 1\nstreams = 16"),
        "demo.toml",
    )
    .unwrap();
    let error = JobPlan::new(&streams, indexes()).unwrap_err();
    assert!(matches!(error, PlanError::Order(_)), "{error}");
    let source = std::error::Error::source(&error).unwrap().to_string();
    assert!(source.contains("16"), "{source}");

    // A field this release does not know (a newer coordinator's) is named, not ignored.
    let (plan, _) = JobPlan::new(&manifest, indexes()).unwrap();
    let newer = plan.to_json().replacen("{", "{\"ema_decay\":0.999,", 1);
    let error = JobPlan::from_json(&newer).unwrap_err();
    let source = std::error::Error::source(&error).unwrap().to_string();
    assert!(source.contains("unknown field `ema_decay`"), "{source}");
}

/// Shards of about 1000 bytes (`index`): the align source has 8, the jft 4,
/// 16 samples of each in a batch of 32.
fn with_data(data: &str) -> Manifest {
    let text = DEMO.replace("loader_threads = 1", &format!("loader_threads = 1\n{data}"));
    Manifest::parse(&text, "demo.toml").unwrap()
}

#[test]
fn the_stream_count_is_chosen_to_fit_each_workers_shard_memory() {
    // Plenty of memory: the most streams the batch and the jft source's 4 shards allow.
    let (plan, order) = JobPlan::new(&with_data(""), indexes()).unwrap();
    assert_eq!((plan.streaming.streams, order.streams()), (Some(4), 4));
    // 2 workers, 2 streams each: 2 x (1 align + 1 jft shard of window) + 1 ahead = 5 shards.
    // 2 workers, 2 streams each: 2 align shards of window each, 1 jft (a stream holds only 1), 1 ahead.
    assert_eq!(plan.stream_layout(&order, 2).working_set, 2 * (2 * 1003 + 1001) + 1007);
    // Memory for 6 shards: one stream each (2 align and 2 jft shards of window, 1 ahead: 5015 bytes).
    let (plan, order) = JobPlan::new(&with_data("shard_memory_bytes = 6000"), indexes()).unwrap();
    assert_eq!(order.streams(), 2);
    assert_eq!(plan.stream_layout(&order, 2).streams_per_worker, 1);
    assert_eq!(order.describe(), "shard-local v1, 2 streams, window 2");
    // A resumed job keeps its checkpoint's count.
    let (plan, order) = plan.with_streams(4).unwrap();
    assert_eq!((plan.streaming.streams, order.streams()), (Some(4), 4));
}

#[test]
fn a_stream_layout_that_cannot_fit_is_refused_naming_the_fields() {
    let error = JobPlan::new(&with_data("streams = 4\nshard_memory_bytes = 6000"), indexes()).unwrap_err();
    let message = error.to_string();
    assert!(
        message.starts_with(
            "data.streams: 4 streams make each of 2 workers hold about 7021 bytes of shards at once (2 streams x"
        ) && message.contains("Set data.streams = 2 (the most that fit)")
            && message.ends_with("or set data.accept_refetching = true"),
        "{message}"
    );
    let error = JobPlan::new(&with_data("shard_memory_bytes = 2000"), indexes()).unwrap_err();
    assert!(
        error.to_string().starts_with(
            "data.shard_memory_bytes: 2000 bytes cannot hold what a worker reads at once under any stream layout: \
             at least 5015 bytes"
        ),
        "{error}"
    );
    // Accepted: as written, or the layout holding the least.
    let (_, order) = JobPlan::new(
        &with_data("streams = 4\nshard_memory_bytes = 6000\naccept_refetching = true"),
        indexes(),
    )
    .unwrap();
    assert_eq!(order.streams(), 4);
    let (_, order) = JobPlan::new(
        &with_data("shard_memory_bytes = 2000\naccept_refetching = true"),
        indexes(),
    )
    .unwrap();
    assert_eq!(order.streams(), 2);
}
