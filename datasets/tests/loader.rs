//! The loader on real Arrow shards: the demo datasets in a store, read
//! through the global sample order into ready batches.

use std::collections::HashSet;

use bytes::Bytes;
use contract::dataset::{ClassName, DatasetKind};
use contract::sample_order::{SampleOrder, SourceSize, Streaming};
use datasets::dataset::Dataset;
use datasets::demo::{self, DemoSpec};
use datasets::image::Crop;
use datasets::loader::{BatchAssembler, HostBatch, Loader, LoaderConfig, LoaderError, LoaderSource};
use datasets::patch_dropout::PatchDropout;
use datasets::prompt::PromptTemplates;
use datasets::shard::{Compression, Content, Record};
use datasets::tokenizer::TextTokenizer;
use datasets::writer::DatasetWriter;
use store::{Store, StoreOptions};

const SEED: u64 = 11;

fn small_demo() -> Store {
    let root = Store::memory();
    let spec = DemoSpec {
        align_rows: 40,
        jft_rows: 30,
        heldout_rows: 8,
        side: 32,
        shard_rows: 16,
        vocab_size: 300,
        ..DemoSpec::default()
    };
    demo::write(&root, &spec).unwrap();
    root
}

fn tokenizer(root: &Store) -> TextTokenizer {
    let json = root.get(demo::TOKENIZER).unwrap();
    TextTokenizer::from_json(std::str::from_utf8(&json).unwrap(), "tokenizer.json").unwrap()
}

fn sources(root: &Store, names: &[&str]) -> Vec<LoaderSource> {
    names
        .iter()
        .map(|name| LoaderSource {
            dataset: Dataset::open(root.at(name)).unwrap(),
            templates: PromptTemplates::clip80(),
        })
        .collect()
}

fn config() -> LoaderConfig {
    LoaderConfig {
        threads: 2,
        ..LoaderConfig::new(16, 12)
    }
}

fn assembler(root: &Store, batch: usize, rank: usize, world: usize, config: LoaderConfig) -> BatchAssembler {
    let sources = sources(root, &[demo::ALIGN, demo::JFT]);
    let sizes: Vec<SourceSize> = sources
        .iter()
        .map(|source| SourceSize {
            shard_rows: source.dataset.index().shards.iter().map(|shard| shard.rows).collect(),
            weight: 0.5,
        })
        .collect();
    let order = SampleOrder::new(SEED, &sizes, batch, Streaming::default()).unwrap();
    BatchAssembler::new(sources, order, tokenizer(root), config, SEED, rank, world).unwrap()
}

/// Slot `slot` of a batch: its pixels and tokens.
fn slot(batch: &HostBatch, slot: usize) -> (Vec<f32>, Vec<u32>) {
    let pixels = 3 * batch.image_size * batch.image_size;
    (
        batch.images[slot * pixels..(slot + 1) * pixels].to_vec(),
        batch.tokens[slot * batch.context..(slot + 1) * batch.context].to_vec(),
    )
}

/// Slot `slot`'s kept patches (patch dropout).
fn kept(batch: &HostBatch, slot: usize) -> &[u32] {
    let per_image = batch.kept_patches.len() / batch.len();
    &batch.kept_patches[slot * per_image..(slot + 1) * per_image]
}

#[test]
fn rank_batches_partition_the_one_rank_batch_exactly() {
    let root = small_demo();
    // Patch dropout too: each sample keeps the same patches on any world.
    let config = || LoaderConfig {
        patch_dropout: PatchDropout::new(16, 0.5),
        ..config()
    };
    let mut whole = assembler(&root, 8, 0, 1, config());
    let mut ranks: Vec<BatchAssembler> = (0..4).map(|rank| assembler(&root, 8, rank, 4, config())).collect();
    for step in 0..6 {
        let global = whole.assemble(step).unwrap();
        assert_eq!(global.len(), 8);
        // Half of every batch from each source.
        assert_eq!(global.samples.iter().filter(|sample| sample.source == 0).count(), 4);
        for (rank, assembler) in ranks.iter_mut().enumerate() {
            let local = assembler.assemble(step).unwrap();
            for (i, position) in (rank..8).step_by(4).enumerate() {
                assert_eq!(local.samples[i], global.samples[position]);
                assert_eq!(local.texts[i], global.texts[position]);
                assert_eq!(
                    slot(&local, i),
                    slot(&global, position),
                    "step {step} rank {rank} slot {i}"
                );
                assert_eq!(kept(&local, i), kept(&global, position));
                assert_eq!(kept(&local, i).len(), 8);
            }
        }
    }
}

#[test]
fn batches_are_reproducible_and_texts_follow_the_source_kind() {
    let root = small_demo();
    let first = assembler(&root, 8, 0, 1, config()).assemble(3).unwrap();
    let again = assembler(&root, 8, 0, 1, config()).assemble(3).unwrap();
    assert_eq!(first, again);
    let tokenizer = tokenizer(&root);
    for (i, sample) in first.samples.iter().enumerate() {
        let text = &first.texts[i];
        if sample.source == 0 {
            assert!(
                text.starts_with("a ") && (text.contains("above") || text.contains("below") || text.contains(" of ")),
                "{text}"
            );
        } else {
            // A colour-shape class and its parent shape, in a CLIP template.
            assert!(demo::SHAPES.iter().any(|shape| text.contains(shape)), "{text}");
            assert!(text.contains(", "), "{text}");
        }
        let (pixels, tokens) = slot(&first, i);
        assert_eq!(tokens[0], tokenizer.bos_id());
        assert!(tokens.contains(&tokenizer.eos_id()));
        assert!(pixels.iter().all(|value| value.is_finite()));
    }
    // Another seed crops differently (training crops are random).
    let mut other = config();
    other.crop = Crop::Centre;
    let centred = assembler(&root, 8, 0, 1, other).assemble(3).unwrap();
    assert_eq!(centred.samples, first.samples);
    assert_ne!(centred.images, first.images);
}

#[test]
fn the_prefetching_loader_matches_the_assembler_and_resumes_at_any_step() {
    let root = small_demo();
    let mut direct = assembler(&root, 8, 1, 2, config());
    let expected: Vec<HostBatch> = (0..7).map(|step| direct.assemble(step).unwrap()).collect();
    let mut loader = Loader::start(assembler(&root, 8, 1, 2, config()), 0).unwrap();
    for batch in &expected {
        assert_eq!(&loader.next_batch().unwrap(), batch);
    }
    let mut resumed = Loader::start(assembler(&root, 8, 1, 2, config()), 4).unwrap();
    for batch in &expected[4..] {
        assert_eq!(&resumed.next_batch().unwrap(), batch);
    }
    // A tiny shard memory evicts constantly and reads the same.
    let mut starved = config();
    starved.shard_memory_bytes = 1;
    let mut small = assembler(&root, 8, 1, 2, starved);
    for (step, batch) in expected.iter().enumerate() {
        assert_eq!(&small.assemble(step as u64).unwrap(), batch);
    }
}

/// An align dataset of `rows` demo samples where `broken` rows are damaged.
fn dataset_with_bad_rows(store: &Store, rows: u64, broken: &[(u64, &str)]) {
    let mut writer =
        DatasetWriter::create(store.clone(), DatasetKind::Align, vec![], 8, Compression::None, "test").unwrap();
    for index in 0..rows {
        let sample = demo::captioned(1, index, 32);
        let mut record = Record {
            key: sample.key,
            image: sample.png,
            content: Content::Text(sample.text),
        };
        match broken.iter().find(|(row, _)| *row == index).map(|(_, how)| *how) {
            Some("image") => record.image = b"\x89PNG but not really".to_vec(),
            Some("text") => record.content = Content::Text("   ".into()),
            _ => {}
        }
        writer.push(record).unwrap();
    }
    writer.finish().unwrap();
}

fn align_assembler(root: &Store, data: &Store, batch: usize, config: LoaderConfig) -> BatchAssembler {
    let dataset = Dataset::open(data.clone()).unwrap();
    let order = SampleOrder::new(
        SEED,
        &[SourceSize {
            shard_rows: dataset.index().shards.iter().map(|shard| shard.rows).collect(),
            weight: 1.0,
        }],
        batch,
        Streaming::default(),
    )
    .unwrap();
    let sources = vec![LoaderSource {
        dataset,
        templates: PromptTemplates::clip80(),
    }];
    BatchAssembler::new(sources, order, tokenizer(root), config, SEED, 0, 1).unwrap()
}

#[test]
fn bad_records_are_replaced_counted_and_named() {
    let root = small_demo();
    let data = Store::memory();
    dataset_with_bad_rows(&data, 32, &[(3, "image"), (17, "text")]);
    let mut tolerant = config();
    tolerant.max_bad_fraction = 0.1;
    let mut assembler = align_assembler(&root, &data, 8, tolerant.clone());
    // One epoch: every row is met once.
    let mut rows = Vec::new();
    for step in 0..4 {
        let batch = assembler.assemble(step).unwrap();
        assert_eq!(batch.len(), 8);
        assert!(batch.texts.iter().all(|text| !text.trim().is_empty()));
        rows.extend(batch.samples.iter().map(|sample| sample.row));
    }
    assert!(!rows.contains(&3) && !rows.contains(&17), "bad rows are never served");
    // Their slots went to the next rows: 4 and 18 appear twice.
    assert_eq!(rows.iter().filter(|&&row| row == 4).count(), 2);
    assert_eq!(rows.iter().filter(|&&row| row == 18).count(), 2);
    let report = assembler.bad_records();
    let source = &report.sources[0];
    assert_eq!(source.bad_rows, 2);
    assert_eq!(source.by_reason.get("undecodable image"), Some(&1));
    assert_eq!(source.by_reason.get("empty text"), Some(&1));
    // The same data gives the same replacements.
    let mut again = align_assembler(&root, &data, 8, tolerant);
    let replay: Vec<u64> = (0..4)
        .flat_map(|step| again.assemble(step).unwrap().samples.into_iter().map(|s| s.row))
        .collect();
    assert_eq!(replay, rows);

    // With the default 1% allowance, two bad rows of 32 fail the job, naming the source.
    let mut strict = align_assembler(&root, &data, 8, config());
    let error = (0..4)
        .find_map(|step| strict.assemble(step).err())
        .expect("too many bad rows");
    let message = error.to_string();
    assert!(matches!(error, LoaderError::TooManyBad { .. }));
    assert!(message.starts_with("data source 0 (memory://):"), "{message}");
    assert!(message.contains("shard-0000"), "{message}");
}

#[test]
fn a_damaged_shard_is_skipped_by_name_and_its_rows_replaced() {
    let root = small_demo();
    let dir = tempfile::tempdir().unwrap();
    let data = Store::open(&dir.path().display().to_string(), &StoreOptions::default()).unwrap();
    dataset_with_bad_rows(&data, 64, &[]);
    // Flip a byte of shard 2 (rows 16..24).
    let path = dir.path().join("shard-00002.arrow");
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[100] ^= 0xff;
    std::fs::write(&path, bytes).unwrap();
    let mut tolerant = config();
    tolerant.max_bad_fraction = 0.2;
    let mut assembler = align_assembler(&root, &data, 16, tolerant);
    let served: HashSet<u64> = (0..4)
        .flat_map(|step| assembler.assemble(step).unwrap().samples.into_iter().map(|s| s.row))
        .collect();
    assert!(served.iter().all(|row| !(16..24).contains(row)), "{served:?}");
    let report = assembler.bad_records();
    let failed = &report.sources[0].failed_shards;
    assert_eq!(failed.len(), 1, "reported once: {failed:?}");
    assert_eq!(
        failed[0].0,
        format!("file://{}/shard-00002.arrow", dir.path().display())
    );
    assert!(failed[0].1.contains("checksum mismatch"), "{}", failed[0].1);
    assert_eq!(report.sources[0].bad_rows, 8);
    // 8 of 64 rows is more than the default 1%.
    let mut strict = align_assembler(&root, &data, 16, config());
    let message = (0..4).find_map(|step| strict.assemble(step).err()).unwrap().to_string();
    assert!(
        message.contains("8 of 64 rows are bad") && message.contains("checksum mismatch"),
        "{message}"
    );
}

#[test]
fn datasets_refuse_overwrites_and_unfinished_imports_are_not_datasets() {
    let store = Store::memory();
    let mut writer = DatasetWriter::create(
        store.clone(),
        DatasetKind::Jft,
        vec![ClassName {
            name: "a".into(),
            parent: None,
        }],
        2,
        Compression::Lz4,
        "test",
    )
    .unwrap();
    for i in 0..3 {
        writer
            .push(Record {
                key: format!("{i}"),
                image: vec![1],
                content: Content::Labels(vec![0]),
            })
            .unwrap();
    }
    let bad_label = Record {
        key: "x".into(),
        image: vec![1],
        content: Content::Labels(vec![1]),
    };
    assert_eq!(
        writer.push(bad_label).unwrap_err().to_string(),
        "record `x`: label 1 is not one of the 1 classes"
    );
    // One shard is written, but no index yet: not a dataset.
    assert!(store.exists("shard-00000.arrow").unwrap());
    let error = Dataset::open(store.clone()).unwrap_err().to_string();
    assert_eq!(
        error,
        "memory://: no dataset here (no index.json; an unfinished import has none)"
    );
    let index = writer.finish().unwrap();
    assert_eq!(index.rows(), 3);
    assert_eq!(Dataset::open(store.clone()).unwrap().index(), &index);
    let again = DatasetWriter::create(store.clone(), DatasetKind::Jft, vec![], 2, Compression::None, "test");
    assert_eq!(
        again.err().unwrap().to_string(),
        "memory:// already holds a dataset; write to another place or delete it first"
    );
    // A truncated index names itself.
    store
        .put("index.json", Bytes::from_static(b"{\"format\": \"coca-dat"))
        .unwrap();
    let error = Dataset::open(store).unwrap_err().to_string();
    assert!(
        error.starts_with("memory:///index.json: not a dataset index:"),
        "{error}"
    );
}

#[test]
fn a_local_cache_serves_shards_the_store_no_longer_has() {
    let root = small_demo();
    let dir = tempfile::tempdir().unwrap();
    let cache = store::LocalCache::new(dir.path(), 1 << 20).unwrap();
    let dataset = Dataset::open(root.at(demo::ALIGN)).unwrap().with_cache(cache);
    let first = dataset.shard(0).unwrap();
    let sha = &dataset.index().shards[0].sha256;
    assert!(dir.path().join(sha).exists());
    root.at(demo::ALIGN).delete("shard-00000.arrow").unwrap();
    let again = dataset.shard(0).unwrap();
    assert_eq!(again.record(3), first.record(3));
    // Without the cache the object is gone.
    let uncached = Dataset::open(root.at(demo::ALIGN)).unwrap();
    assert!(uncached
        .shard(0)
        .unwrap_err()
        .to_string()
        .ends_with("shard-00000.arrow: not found"));
}
