//! WebDataset tars read in place: tars written in webdataset's and
//! img2dataset's conventions (`{key}.png` + `{key}.txt` / `.json` / `.cls`
//! per sample, in a row), indexed once, then read by the loader exactly as
//! the same samples in Arrow shards are; broken samples and tars are
//! counted and named.

use bytes::Bytes;
use contract::dataset::{ClassName, Container, DatasetIndex, DatasetKind};
use contract::sample_order::{SampleOrder, SourceSize, Streaming};
use contract::shard_pattern::TarSource;
use datasets::dataset::Dataset;
use datasets::demo::{self, DemoSpec};
use datasets::loader::{BatchAssembler, LoaderConfig, LoaderError, LoaderSource};
use datasets::prompt::PromptTemplates;
use datasets::tokenizer::TextTokenizer;
use store::{Store, StoreOptions};
use webdataset::{IndexBuild, IndexPlace};

const SEED: u64 = 17;

/// A tar of `files` (name, contents), in order.
fn tar_of(files: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for (name, data) in files {
        let mut header = tar::Header::new_ustar();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        builder.append_data(&mut header, name, data.as_slice()).unwrap();
    }
    builder.into_inner().unwrap()
}

/// Each Arrow shard of `dataset` as a tar of the same samples in the same
/// order (`{key}.png` with `{key}.txt`, or `{key}.cls` of label ids, as
/// webdataset writes them), into `out` as `{00000..}.tar`; a jft dataset's
/// classes go beside as classes.txt. Returns the brace pattern.
fn tars_of(dataset: &Dataset, out: &Store) -> String {
    let index = dataset.index();
    for shard in 0..index.shards.len() {
        let decoded = dataset.shard(shard).unwrap();
        let mut files = Vec::new();
        for row in 0..decoded.rows() {
            let record = decoded.record(row);
            files.push((format!("{}.png", record.key), record.image.to_vec()));
            match (&record.text, &record.labels) {
                (Some(text), _) => files.push((format!("{}.txt", record.key), text.as_bytes().to_vec())),
                (_, Some(labels)) => {
                    let ids: Vec<String> = labels.iter().map(i32::to_string).collect();
                    files.push((format!("{}.cls", record.key), ids.join(" ").into_bytes()));
                }
                _ => unreachable!("a record has a text or labels"),
            }
        }
        out.put(&format!("{shard:05}.tar"), Bytes::from(tar_of(&files)))
            .unwrap();
    }
    if index.kind == DatasetKind::Jft {
        let lines: Vec<String> = index
            .classes
            .iter()
            .map(|class| format!("{}\t{}", class.name, class.parent.clone().unwrap_or_default()))
            .collect();
        out.put("classes.txt", Bytes::from(lines.join("\n"))).unwrap();
    }
    format!("{{00000..{:05}}}.tar", index.shards.len() - 1)
}

fn build(kind: DatasetKind, url: &str, store: &Store) -> webdataset::IndexReport {
    let build = IndexBuild {
        kind,
        classes: None,
        threads: 2,
    };
    build.run(&TarSource::parse(url).unwrap(), store, &|_, _| {}).unwrap()
}

fn demo_root() -> Store {
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

fn assembler(root: &Store, datasets: Vec<Dataset>, rank: usize, world: usize, config: LoaderConfig) -> BatchAssembler {
    let sizes: Vec<SourceSize> = datasets
        .iter()
        .map(|dataset| SourceSize {
            shard_rows: dataset.index().shards.iter().map(|shard| shard.rows).collect(),
            weight: 0.5,
        })
        .collect();
    let order = SampleOrder::new(SEED, &sizes, 8, Streaming::default()).unwrap();
    let sources = datasets
        .into_iter()
        .map(|dataset| LoaderSource {
            dataset,
            templates: PromptTemplates::clip80(),
        })
        .collect();
    BatchAssembler::new(sources, order, tokenizer(root), config, SEED, rank, world).unwrap()
}

fn config() -> LoaderConfig {
    LoaderConfig {
        threads: 2,
        ..LoaderConfig::new(16, 12)
    }
}

#[test]
fn tars_read_in_place_give_the_batches_their_arrow_shards_give() {
    let root = demo_root();
    let arrow: Vec<Dataset> = [demo::ALIGN, demo::JFT]
        .iter()
        .map(|name| Dataset::open(root.at(name)).unwrap())
        .collect();
    let mut tars = Vec::new();
    for dataset in &arrow {
        let kind = dataset.index().kind;
        let store = root.at(&format!("tars/{kind}"));
        let pattern = tars_of(dataset, &store);
        let report = build(kind, &format!("tars/{kind}/{pattern}"), &store);
        let index = &report.index;
        assert_eq!(index.container, Container::Tar);
        assert_eq!((report.incomplete, report.truncated.len()), (0, 0));
        // The same shards: the same rows each, so the same sample order.
        let rows = |index: &DatasetIndex| index.shards.iter().map(|shard| shard.rows).collect::<Vec<_>>();
        assert_eq!(rows(index), rows(dataset.index()));
        // The jft class list came from classes.txt beside the tars.
        assert_eq!(index.classes, dataset.index().classes);
        let reparsed = DatasetIndex::parse(&index.to_json(), "x").unwrap();
        assert_eq!(reparsed.fingerprint(), index.fingerprint());
        tars.push(Dataset::with_index(store, report.index));
    }
    for (rank, world) in [(0, 1), (1, 2)] {
        let mut from_arrow = assembler(&root, arrow.clone(), rank, world, config());
        let mut from_tars = assembler(&root, tars.clone(), rank, world, config());
        for step in 0..12 {
            let (a, b) = (from_arrow.assemble(step).unwrap(), from_tars.assemble(step).unwrap());
            assert_eq!(a, b, "step {step}, rank {rank} of {world}");
        }
        assert_eq!(from_tars.bad_records().total(), 0);
    }
}

#[test]
fn jft_tars_name_their_classes_or_give_ids_with_a_class_list() {
    let store = Store::memory();
    let image = demo::captioned(1, 0, 16).png;
    let sample = |key: &str, extension: &str, label: &str| {
        vec![
            (format!("{key}.jpg"), image.clone()),
            (format!("{key}.{extension}"), label.as_bytes().to_vec()),
        ]
    };
    let named: Vec<_> = [
        sample("a", "cls", "tabby cat"),
        sample("b", "json", r#"{"label": "dog"}"#),
        sample("c", "cls", "tabby cat"),
    ]
    .concat();
    store.put("named.tar", Bytes::from(tar_of(&named))).unwrap();
    // Without a list, the names held, sorted.
    let report = build(DatasetKind::Jft, "named.tar", &store);
    let names: Vec<&str> = report.index.classes.iter().map(|class| class.name.as_str()).collect();
    assert_eq!(names, ["dog", "tabby cat"]);
    let dataset = Dataset::with_index(store.clone(), report.index);
    let shard = dataset.shard(0).unwrap();
    let labels: Vec<Vec<i32>> = (0..3).map(|row| shard.record(row).labels.unwrap()).collect();
    assert_eq!(labels, [vec![1], vec![0], vec![1]]);

    // Ids need a list: refused by name without one, taken from the build's.
    let ids: Vec<_> = [sample("a", "cls", "2"), sample("b", "json", r#"{"label": 0}"#)].concat();
    store.put("ids.tar", Bytes::from(tar_of(&ids))).unwrap();
    let source = TarSource::parse("ids.tar").unwrap();
    let without = IndexBuild {
        kind: DatasetKind::Jft,
        classes: None,
        threads: 1,
    };
    let error = without.run(&source, &store, &|_, _| {}).unwrap_err().to_string();
    assert!(
        error.starts_with(
            "ids.tar: its samples hold class ids (2 distinct), and no class names are given: put classes.txt"
        ),
        "{error}"
    );
    let classes = ["zero", "one", "two"].map(|name| ClassName {
        name: name.into(),
        parent: None,
    });
    let with = IndexBuild {
        classes: Some(classes.to_vec()),
        ..without
    };
    let index = with.run(&source, &store, &|_, _| {}).unwrap().index;
    let shard = Dataset::with_index(store, index).shard(0).unwrap();
    assert_eq!(shard.record(0).labels, Some(vec![2]));
    assert_eq!(shard.record(1).labels, Some(vec![0]));
}

/// An img2dataset output folder: `{shard}.tar` (each sample a `.jpg`, a
/// `.txt` and a `.json`), `{shard}_stats.json` and `{shard}.parquet`
/// beside. One tar has a sample without its caption and one without its
/// image; one is cut short; one is replaced after indexing.
#[test]
fn broken_samples_and_tars_of_an_img2dataset_folder_are_counted_and_named() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().to_str().unwrap(), &StoreOptions::default()).unwrap();
    let mut row = 0u64;
    let mut shard_files = |samples: usize, drop: &[(usize, &str)]| {
        let mut files = Vec::new();
        for i in 0..samples {
            let sample = demo::captioned(2, row, 32);
            let key = format!("{row:09}");
            row += 1;
            let json = serde_json::json!({"key": key, "caption": sample.text, "status": "success"});
            let mut parts = vec![
                (format!("{key}.jpg"), sample.png),
                (format!("{key}.txt"), sample.text.into_bytes()),
                (format!("{key}.json"), json.to_string().into_bytes()),
            ];
            match drop.iter().find(|(at, _)| *at == i).map(|(_, what)| *what) {
                Some("caption") => {
                    parts.remove(1);
                    parts[1].1 = br#"{"status": "success"}"#.to_vec();
                }
                Some("image") => {
                    parts.remove(0);
                }
                _ => {}
            }
            files.extend(parts);
        }
        tar_of(&files)
    };
    let tars = [
        shard_files(10, &[]),
        shard_files(10, &[(3, "caption"), (7, "image")]),
        shard_files(10, &[]),
        shard_files(10, &[]),
    ];
    for (i, tar) in tars.iter().enumerate() {
        let bytes = if i == 2 {
            tar[..tar.len() / 2].to_vec()
        } else {
            tar.clone()
        };
        store.put(&format!("{i:05}.tar"), Bytes::from(bytes)).unwrap();
        store
            .put(
                &format!("{i:05}_stats.json"),
                Bytes::from_static(b"{\"successes\": 10}"),
            )
            .unwrap();
        store
            .put(&format!("{i:05}.parquet"), Bytes::from_static(b"PAR1"))
            .unwrap();
    }
    // A prefix: every .tar under it, nothing else.
    let url = dir.path().to_str().unwrap().to_string();
    let report = build(DatasetKind::Align, &url, &store);
    let index = &report.index;
    let files: Vec<&str> = index.shards.iter().map(|shard| shard.file.as_str()).collect();
    assert_eq!(files, ["00000.tar", "00001.tar", "00002.tar", "00003.tar"]);
    assert_eq!(report.incomplete, 2);
    assert_eq!(report.truncated.len(), 1);
    assert!(report.truncated[0].0.ends_with("00002.tar"), "{:?}", report.truncated);
    let cut_rows = index.shards[2].rows;
    assert!((1..10).contains(&cut_rows), "{cut_rows} samples before the cut");
    assert_eq!(index.skipped.get("truncated tar"), Some(&1));

    // Kept beside the tars; read back the same.
    let source = TarSource::parse(&url).unwrap();
    let place = IndexPlace {
        source: &source,
        data: &store,
        job_dir: None,
    };
    let written = place.write(index).unwrap();
    assert!(written.ends_with("/coca-tar-index.json"), "{written}");
    assert_eq!(place.read().unwrap().unwrap().0, *index);

    // The last tar replaced after indexing: its checksum fails.
    store.put("00003.tar", Bytes::from(tars[0].clone())).unwrap();

    let root = demo_root();
    let dataset = Dataset::with_index(store.clone(), index.clone());
    let rows = index.rows();
    let epoch = |max_bad_fraction: f64| -> Result<datasets::loader::BadRecords, LoaderError> {
        let config = LoaderConfig {
            max_bad_fraction,
            ..config()
        };
        let sizes = [SourceSize {
            shard_rows: index.shards.iter().map(|shard| shard.rows).collect(),
            weight: 1.0,
        }];
        let order = SampleOrder::new(SEED, &sizes, 4, Streaming::default()).unwrap();
        let sources = vec![LoaderSource {
            dataset: dataset.clone(),
            templates: PromptTemplates::clip80(),
        }];
        let mut assembler = BatchAssembler::new(sources, order, tokenizer(&root), config, SEED, 0, 1).unwrap();
        // Two epochs' steps: every row is read.
        for step in 0..2 * rows.div_ceil(4) {
            assembler.assemble(step)?;
        }
        Ok(assembler.bad_records())
    };
    let bad = epoch(0.5).unwrap();
    let source = &bad.sources[0];
    // 2 incomplete samples and the replaced tar's 10 rows.
    assert_eq!(source.bad_rows, 12, "{source:?}");
    assert!(source.by_reason["incomplete sample"] >= 2, "{:?}", source.by_reason);
    assert_eq!(source.failed_shards.len(), 1);
    let (failed_url, why) = &source.failed_shards[0];
    assert!(failed_url.ends_with("00003.tar"), "{failed_url}");
    assert!(why.contains("checksum mismatch"), "{why}");

    let error = epoch(0.01).unwrap_err().to_string();
    assert!(error.contains("rows are bad, more than the allowed 0.01"), "{error}");
    assert!(
        error.contains("00001.tar row 3 (key `000000013`): no caption file")
            || error.contains("00001.tar row 7 (key `000000017`): no image file")
            || error.contains("00003.tar: checksum mismatch"),
        "{error}"
    );
}
