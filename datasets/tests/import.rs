//! Every importer round-trips a small fixture built here, and every kind of
//! bad input is an error naming the file (and line).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use contract::dataset::{DatasetIndex, DatasetKind};
use datasets::dataset::Dataset;
use datasets::demo;
use datasets::import::{self, ImportFormat, ImportOptions, ImportSummary};
use datasets::shard::Compression;
use datasets::writer::DatasetWriter;
use store::Store;

fn png(index: u64) -> Vec<u8> {
    demo::labelled(3, index, 16).png
}

fn run(
    format: ImportFormat,
    src: &Path,
    options: &ImportOptions,
) -> Result<(Store, DatasetIndex, ImportSummary), String> {
    let mut importer = import::open(format, src, options).map_err(|e| e.to_string())?;
    let store = Store::memory();
    let writer = DatasetWriter::create(
        store.clone(),
        importer.kind(),
        importer.classes(),
        2,
        Compression::None,
        "test",
    )
    .map_err(|e| e.to_string())?;
    let mut seen = 0;
    let (index, summary) =
        import::import(importer.as_mut(), writer, options.limit, &mut |n| seen = n).map_err(|e| e.to_string())?;
    assert_eq!(seen, summary.rows + summary.skipped);
    Ok((store, index, summary))
}

/// (key, image, text or labels) of every stored record, in order.
fn records(store: &Store) -> Vec<(String, Vec<u8>, String)> {
    let dataset = Dataset::open(store.clone()).unwrap();
    let mut out = Vec::new();
    for shard in 0..dataset.index().shards.len() {
        let decoded = dataset.shard(shard).unwrap();
        for row in 0..decoded.rows() {
            let record = decoded.record(row);
            let content = match (record.text, record.labels) {
                (Some(text), _) => text.to_string(),
                (None, Some(labels)) => format!("{labels:?}"),
                _ => unreachable!(),
            };
            out.push((record.key.to_string(), record.image.to_vec(), content));
        }
    }
    out
}

fn write(path: &Path, bytes: &[u8]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn imagefolder_makes_one_class_per_folder() {
    let dir = tempfile::tempdir().unwrap();
    write(&dir.path().join("cat/b.png"), &png(1));
    write(&dir.path().join("cat/a.png"), &png(0));
    write(&dir.path().join("polar_bear/c.png"), &png(2));
    write(&dir.path().join("polar_bear/notes.txt"), b"not an image, not looked at");
    write(&dir.path().join("polar_bear/broken.jpg"), b"garbage");
    let (store, index, summary) = run(ImportFormat::ImageFolder, dir.path(), &ImportOptions::default()).unwrap();
    assert_eq!(index.kind, DatasetKind::Jft);
    let names: Vec<&str> = index.classes.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["cat", "polar bear"]);
    assert_eq!(index.skipped.get("unrecognised image"), Some(&1));
    assert_eq!(
        summary.first_skips,
        [format!(
            "{}: unrecognised image",
            dir.path().join("polar_bear/broken.jpg").display()
        )]
    );
    let stored = records(&store);
    let expected = [
        ("cat/a.png", png(0), "[0]"),
        ("cat/b.png", png(1), "[0]"),
        ("polar_bear/c.png", png(2), "[1]"),
    ];
    assert_eq!(stored.len(), 3);
    for ((key, image, labels), (want_key, want_image, want_labels)) in stored.iter().zip(expected) {
        assert_eq!(
            (key.as_str(), image, labels.as_str()),
            (want_key, &want_image, want_labels)
        );
    }
    // A class list with parents names the folders, in order, and must match their count.
    let classes = dir.path().join("classes.txt");
    write(&classes, b"cat\tanimal\npolar bear\tanimal\n");
    let options = ImportOptions {
        classes: Some(classes.clone()),
        limit: None,
    };
    let (_, index, _) = run(ImportFormat::ImageFolder, dir.path(), &options).unwrap();
    assert_eq!(index.class_names(1).unwrap(), ["polar bear", "animal"]);
    write(&classes, b"cat\n");
    let error = run(ImportFormat::ImageFolder, dir.path(), &options).unwrap_err();
    assert_eq!(
        error,
        format!(
            "{}: 1 class names for 2 folders in {}",
            classes.display(),
            dir.path().display()
        )
    );
    let empty = tempfile::tempdir().unwrap();
    let error = run(ImportFormat::ImageFolder, empty.path(), &ImportOptions::default()).unwrap_err();
    assert!(
        error.ends_with("no class folders here (expected src/<class>/<image>)"),
        "{error}"
    );
}

#[test]
fn captions_files_in_jsonl_and_csv() {
    let dir = tempfile::tempdir().unwrap();
    write(&dir.path().join("img/0.png"), &png(0));
    write(&dir.path().join("img/1.png"), &png(1));
    let jsonl = dir.path().join("captions.jsonl");
    write(
        &jsonl,
        b"{\"image\": \"img/0.png\", \"caption\": \"a red thing\"}\n\n{\"file\": \"img/1.png\", \"text\": \"  \"}\n",
    );
    let (store, index, summary) = run(ImportFormat::Captions, &jsonl, &ImportOptions::default()).unwrap();
    assert_eq!(index.kind, DatasetKind::Align);
    assert_eq!(
        records(&store),
        [("img/0.png".to_string(), png(0), "a red thing".to_string())]
    );
    assert_eq!(
        summary.first_skips,
        [format!("{}, line 3: empty text", jsonl.display())]
    );

    let csv = dir.path().join("captions.csv");
    write(
        &csv,
        b"Image,Caption\nimg/1.png,\"a blue thing, small\"\nimg/0.png,a red thing\n",
    );
    let (store, _, _) = run(ImportFormat::Captions, &csv, &ImportOptions::default()).unwrap();
    let texts: Vec<String> = records(&store).into_iter().map(|r| r.2).collect();
    assert_eq!(texts, ["a blue thing, small", "a red thing"]);

    let cases: [(&str, &[u8], String); 4] = [
        (
            "bad.jsonl",
            b"{\"image\": \"img/0.png\", \"caption\": \"x\"}\n{not json\n",
            "line 2: not JSON".into(),
        ),
        (
            "nofield.jsonl",
            b"{\"image\": \"img/0.png\"}\n",
            "line 1: no caption (a string field named caption or text or title)".into(),
        ),
        (
            "missing.jsonl",
            b"{\"image\": \"img/9.png\", \"caption\": \"x\"}\n",
            "line 1: image `img/9.png`: No such file".into(),
        ),
        (
            "nocolumn.csv",
            b"path,words\nimg/0.png,x\n",
            "line 1: no caption column (named caption or text or title)".into(),
        ),
    ];
    for (name, content, message) in cases {
        let path = dir.path().join(name);
        write(&path, content);
        let error = run(ImportFormat::Captions, &path, &ImportOptions::default()).unwrap_err();
        assert!(error.starts_with(&format!("{}, {message}", path.display())), "{error}");
    }
}

fn tar_with(path: &Path, files: &[(&str, Vec<u8>)]) {
    let mut builder = tar::Builder::new(std::fs::File::create(path).unwrap());
    for (name, bytes) in files {
        let mut header = tar::Header::new_gnu();
        header.set_size(bytes.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        builder.append_data(&mut header, name, bytes.as_slice()).unwrap();
    }
    builder.finish().unwrap();
}

#[test]
fn webdataset_tars_group_files_by_key() {
    let dir = tempfile::tempdir().unwrap();
    tar_with(
        &dir.path().join("000000.tar"),
        &[
            ("s/000.png", png(0)),
            ("s/000.txt", b"a caption".to_vec()),
            ("s/001.png", png(1)),
            ("s/001.json", br#"{"caption": "from json", "url": "x"}"#.to_vec()),
            ("s/002.txt", b"text without an image".to_vec()),
        ],
    );
    tar_with(
        &dir.path().join("000001.tar"),
        &[
            ("003.webp.txt", b"odd".to_vec()),
            ("004.jpg", png(4)),
            ("004.txt", b"png bytes named jpg".to_vec()),
        ],
    );
    let (store, _, summary) = run(ImportFormat::WebDataset, dir.path(), &ImportOptions::default()).unwrap();
    let stored: Vec<(String, String)> = records(&store).into_iter().map(|r| (r.0, r.2)).collect();
    assert_eq!(
        stored,
        [
            ("s/000".to_string(), "a caption".to_string()),
            ("s/001".to_string(), "from json".to_string()),
            ("004".to_string(), "png bytes named jpg".to_string()),
        ]
    );
    assert_eq!(summary.skipped, 2, "{:?}", summary.first_skips);
    write(
        &dir.path().join("broken/x.tar"),
        b"this is not a tar archive, though it is long enough to hold a header block? no.",
    );
    let error = run(
        ImportFormat::WebDataset,
        &dir.path().join("broken"),
        &ImportOptions::default(),
    )
    .unwrap_err();
    assert!(
        error.starts_with(&dir.path().join("broken/x.tar").display().to_string()),
        "{error}"
    );
}

#[test]
fn img2dataset_parquet_skips_failed_downloads() {
    use arrow_array::{ArrayRef, BinaryArray, RecordBatch, StringArray};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("00000.parquet");
    let batch = RecordBatch::try_from_iter([
        (
            "key",
            Arc::new(StringArray::from(vec!["000", "001", "002"])) as ArrayRef,
        ),
        (
            "caption",
            Arc::new(StringArray::from(vec![Some("first"), Some("second"), None])) as ArrayRef,
        ),
        (
            "status",
            Arc::new(StringArray::from(vec!["success", "failed_to_download", "success"])) as ArrayRef,
        ),
        (
            "jpg",
            Arc::new(BinaryArray::from(vec![
                Some(png(0).as_slice()),
                None,
                Some(png(2).as_slice()),
            ])) as ArrayRef,
        ),
    ])
    .unwrap();
    let mut writer =
        parquet::arrow::ArrowWriter::try_new(std::fs::File::create(&path).unwrap(), batch.schema(), None).unwrap();
    writer.write(&batch).unwrap();
    writer.close().unwrap();
    let (store, index, summary) = run(ImportFormat::Img2Dataset, dir.path(), &ImportOptions::default()).unwrap();
    assert_eq!(records(&store), [("000".to_string(), png(0), "first".to_string())]);
    assert_eq!(index.skipped.get("failed download"), Some(&2));
    assert_eq!(summary.skipped, 2);
    let not_parquet = dir.path().join("bad/x.parquet");
    write(&not_parquet, b"nope");
    let error = run(ImportFormat::Img2Dataset, &not_parquet, &ImportOptions::default()).unwrap_err();
    assert!(
        error.starts_with(&format!("{}: not readable parquet", not_parquet.display())),
        "{error}"
    );
}

fn idx_files(dir: &Path, images: &[[u8; 4]], labels: &[u8]) -> PathBuf {
    let mut image_bytes = vec![0, 0, 8, 3];
    for dim in [images.len() as u32, 2, 2] {
        image_bytes.extend(dim.to_be_bytes());
    }
    image_bytes.extend(images.iter().flatten());
    let mut label_bytes = vec![0, 0, 8, 1];
    label_bytes.extend((labels.len() as u32).to_be_bytes());
    label_bytes.extend(labels);
    let images_path = dir.join("train-images-idx3-ubyte.gz");
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&image_bytes).unwrap();
    write(&images_path, &gz.finish().unwrap());
    write(&dir.join("train-labels-idx1-ubyte.gz"), &label_bytes);
    images_path
}

#[test]
fn idx_files_become_labelled_grayscale_pngs() {
    let dir = tempfile::tempdir().unwrap();
    let classes = dir.path().join("classes.txt");
    write(&classes, b"# fashion\nT-shirt/top\nTrouser\n");
    let images = idx_files(
        dir.path(),
        &[[0, 50, 100, 150], [255, 0, 255, 0], [1, 2, 3, 4]],
        &[1, 0, 1],
    );
    let options = ImportOptions {
        classes: Some(classes.clone()),
        limit: Some(2),
    };
    let (store, index, _) = run(ImportFormat::Idx, &images, &options).unwrap();
    assert_eq!(index.classes[0].name, "T-shirt/top");
    let stored = records(&store);
    assert_eq!(stored.len(), 2, "the limit holds");
    let first = image::load_from_memory(&stored[0].1).unwrap().to_luma8();
    assert_eq!(first.as_raw(), &vec![0, 50, 100, 150]);
    assert_eq!((stored[0].2.as_str(), stored[1].2.as_str()), ("[1]", "[0]"));

    let labels = dir.path().join("train-labels-idx1-ubyte.gz");
    let no_classes = run(ImportFormat::Idx, &images, &ImportOptions::default()).unwrap_err();
    assert!(
        no_classes.ends_with("the idx format needs --classes FILE (one class name per line)"),
        "{no_classes}"
    );
    idx_files(dir.path(), &[[0; 4], [0; 4]], &[1, 0, 1]);
    let mismatch = run(ImportFormat::Idx, &images, &options).unwrap_err();
    assert_eq!(
        mismatch,
        format!(
            "{}: 3 labels, but {} holds 2 images",
            labels.display(),
            images.display()
        )
    );
    idx_files(dir.path(), &[[0; 4]], &[7]);
    let out_of_range = run(ImportFormat::Idx, &images, &options).unwrap_err();
    assert_eq!(
        out_of_range,
        format!(
            "{}: record 0: label 7, but {} lists 2 classes",
            labels.display(),
            classes.display()
        )
    );
    write(&labels, b"\x00\x00\x08\x03rest");
    let magic = run(ImportFormat::Idx, &images, &options).unwrap_err();
    assert!(
        magic.contains("magic number 0x00000803, expected 0x00000801"),
        "{magic}"
    );
}
