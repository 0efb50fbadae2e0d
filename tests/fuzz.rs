//! Mutation fuzzing on stable Rust: every parser a user's bytes reach is fed
//! real inputs with bits flipped, bytes replaced, inserted and cut, and
//! truncated, from a seeded generator. Each must return (no panic) and, on
//! bad input, an error that says something, and none may hang (the
//! slowest case is reported; one past a minute fails). `COCA_FUZZ_CASES=N`
//! runs N cases per target instead of CI's few hundred (`cargo test
//! --release --test fuzz` for long runs).

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::{Duration, Instant};

use contract::rng::SplitMix64;

/// Cases per target: CI's default, or `COCA_FUZZ_CASES`.
fn cases() -> u64 {
    std::env::var("COCA_FUZZ_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(300)
}

/// `seed` changed in one to four ways, drawn by `random`.
fn mutate(seed: &[u8], random: &mut SplitMix64) -> Vec<u8> {
    let mut bytes = seed.to_vec();
    let below = |random: &mut SplitMix64, n: usize| (random.next_u64() % n.max(1) as u64) as usize;
    for _ in 0..1 + below(random, 4) {
        let at = below(random, bytes.len());
        match below(random, 6) {
            0 if !bytes.is_empty() => bytes[at] ^= 1 << below(random, 8),
            1 if !bytes.is_empty() => bytes[at] = [0x00, 0xff, 0x7f, 0x80, b'"', b'\n'][below(random, 6)],
            2 => {
                let count = 1 + below(random, 16);
                let insert: Vec<u8> = (0..count).map(|_| random.next_u64() as u8).collect();
                bytes.splice(at..at, insert);
            }
            3 if !bytes.is_empty() => {
                let end = (at + 1 + below(random, 64)).min(bytes.len());
                bytes.drain(at..end);
            }
            4 => bytes.truncate(at),
            _ if !bytes.is_empty() => {
                // A run copied elsewhere: repeated headers and lengths.
                let end = (at + 1 + below(random, 32)).min(bytes.len());
                let run = bytes[at..end].to_vec();
                let to = below(random, bytes.len());
                bytes.splice(to..to, run);
            }
            _ => {}
        }
    }
    bytes
}

/// Runs `parse` on `cases()` mutations of each seed; a panic fails the
/// test naming the target, the seed input and the case (to replay it).
fn fuzz(target: &str, seeds: &[Vec<u8>], parse: impl Fn(&[u8]) -> Result<(), String>) {
    let mut errors = 0u64;
    let mut slowest = Duration::ZERO;
    for (index, seed) in seeds.iter().enumerate() {
        if let Err(error) = parse(seed) {
            panic!("{target}: seed {index} is not valid to begin with: {error}");
        }
        for case in 0..cases() {
            let mut random = SplitMix64::new(case ^ (index as u64) << 32);
            let input = mutate(seed, &mut random);
            let started = Instant::now();
            let outcome = catch_unwind(AssertUnwindSafe(|| parse(&input)));
            let took = started.elapsed();
            slowest = slowest.max(took);
            assert!(
                took < Duration::from_secs(60),
                "{target}: seed {index}, case {case} ran {took:?}: a hang"
            );
            match outcome {
                Ok(Ok(())) => {}
                Ok(Err(message)) => {
                    assert!(
                        !message.trim().is_empty(),
                        "{target}: an empty error (seed {index}, case {case})"
                    );
                    errors += 1;
                }
                Err(_) => panic!(
                    "{target}: panicked on seed {index}, case {case} ({} bytes)",
                    input.len()
                ),
            }
        }
    }
    eprintln!(
        "{target}: {} cases, {errors} refused with an error, slowest {slowest:?}",
        cases() * seeds.len() as u64
    );
}

#[test]
fn the_manifest_parser() {
    let demo = include_str!("../deploy/local/demo.toml").as_bytes().to_vec();
    fuzz("manifest", &[demo], |bytes| {
        let text = String::from_utf8_lossy(bytes);
        match contract::manifest::Manifest::parse(&text, "fuzz.toml") {
            Ok(_) => Ok(()),
            Err(error) => {
                let message = error.to_string();
                // Every refusal names the file.
                assert!(message.contains("fuzz.toml"), "{message}");
                Err(message)
            }
        }
    });
}

/// The demo's jft and align datasets, written to memory: their index.json
/// and first shard.
fn demo_dataset(kind: &str) -> (Vec<u8>, Vec<u8>) {
    let root = store::Store::open("memory://fuzz-demo", &store::StoreOptions::default()).unwrap();
    let spec = datasets::demo::DemoSpec {
        align_rows: 24,
        jft_rows: 24,
        heldout_rows: 8,
        side: 16,
        shard_rows: 8,
        vocab_size: 300,
        ..datasets::demo::DemoSpec::default()
    };
    datasets::demo::write(&root, &spec).unwrap();
    let dataset = root.at(kind);
    let index = dataset.get(contract::dataset::INDEX_FILE).unwrap().to_vec();
    let parsed = contract::dataset::DatasetIndex::parse(&String::from_utf8_lossy(&index), "index.json").unwrap();
    let shard = dataset.get(&parsed.shards[0].file).unwrap().to_vec();
    (index, shard)
}

#[test]
fn dataset_indexes_and_arrow_shards() {
    let (jft_index, jft_shard) = demo_dataset("jft");
    let (align_index, align_shard) = demo_dataset("align");
    fuzz("dataset index", &[jft_index, align_index], |bytes| {
        contract::dataset::DatasetIndex::parse(&String::from_utf8_lossy(bytes), "index.json")
            .map(|_| ())
            .map_err(|error| error.to_string())
    });
    for (kind, shard) in [
        (contract::dataset::DatasetKind::Jft, jft_shard),
        (contract::dataset::DatasetKind::Align, align_shard),
    ] {
        fuzz(&format!("{kind} shard"), &[shard], |bytes| {
            let shard = datasets::shard::Shard::decode(bytes.to_vec().into(), kind, "shard.arrow")
                .map_err(|error| error.to_string())?;
            // Every record of a shard that decodes can be read.
            for row in 0..shard.rows() {
                let record = shard.record(row);
                let _ = (record.key.len(), record.image.len(), record.text, record.labels);
            }
            Ok(())
        });
    }
}

#[test]
fn checkpoint_metadata_and_shards() {
    use checkpoint::layout::{Meta, TensorEntry};
    let entries = vec![
        TensorEntry {
            path: "a.weight".into(),
            shape: vec![3, 4],
            dtype: "F32".into(),
            offset: 0,
            optimizer_state: true,
        },
        TensorEntry {
            path: "b.bias".into(),
            shape: vec![5],
            dtype: "F32".into(),
            offset: 12,
            optimizer_state: true,
        },
    ];
    let section_len = 17u64;
    let range = (5, 40);
    let shard = checkpoint::shard::encode(&entries, section_len, range, 3, |out| {
        for (i, chunk) in out.chunks_exact_mut(4).enumerate() {
            chunk.copy_from_slice(&(i as f32 * 0.5).to_le_bytes());
        }
    });
    let by_path: std::collections::HashMap<&str, &TensorEntry> = entries.iter().map(|t| (t.path.as_str(), t)).collect();
    fuzz("checkpoint shard", &[shard], |bytes| {
        let mut values = vec![0f32; 3 * section_len as usize];
        checkpoint::shard::decode_into(bytes, range, &by_path, section_len, &mut values)
    });
    let meta = serde_json::json!({
        "format": "coca-checkpoint", "version": 1, "step": 3, "world_size": 2, "optimizer_steps": 3,
        "source_samples": [12], "source_epochs": [0.5],
        "rng": {"seed": 0, "scheme": "counter-based"},
        "resume": {"model": "{}", "sources": [], "datasets": [], "seed": 0, "global_batch": 4},
        "tokenizer_sha256": "00", "software": "coca", "section_len": 17,
        "tensors": entries, "shards": [{"file": "rank-00000-of-00001.safetensors", "start": 0, "end": 51}]
    });
    fuzz("checkpoint meta.json", &[serde_json::to_vec(&meta).unwrap()], |bytes| {
        serde_json::from_slice::<Meta>(bytes)
            .map(|_| ())
            .map_err(|error| error.to_string())
    });
}

const OPEN_CLIP: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/open_clip");

#[test]
fn image_decoding() {
    let picture = image::RgbImage::from_fn(24, 16, |x, y| image::Rgb([x as u8 * 10, y as u8 * 15, 128]));
    let encoded = |format| {
        let mut bytes = Vec::new();
        picture.write_to(&mut std::io::Cursor::new(&mut bytes), format).unwrap();
        bytes
    };
    // Real photos (open_clip's fixture) and small encodings of each format.
    let seeds = [
        encoded(image::ImageFormat::Png),
        encoded(image::ImageFormat::Jpeg),
        encoded(image::ImageFormat::WebP),
        std::fs::read(format!("{OPEN_CLIP}/photo-0.jpg")).unwrap(),
    ];
    fuzz("image", &seeds, |bytes| {
        datasets::image::decode(bytes)
            .map(|_| ())
            .map_err(|error| error.to_string())
    });
}

#[test]
fn the_tokenizer_on_any_text() {
    let tokenizer = datasets::tokenizer::TextTokenizer::clip().unwrap();
    let long = "a photo of a dog. ".repeat(2000);
    let seeds = [
        "a photo of a red circle".as_bytes().to_vec(),
        "ünïcödé 漢字 🙂 \u{202e}right-to-left".as_bytes().to_vec(),
        long.into_bytes(),
    ];
    fuzz("tokenizer", &seeds, |bytes| {
        let ids = tokenizer
            .encode(&String::from_utf8_lossy(bytes), 77)
            .map_err(|error| error.to_string())?;
        assert_eq!(ids.len(), 77, "a context's worth of ids, whatever the text");
        Ok(())
    });
}

/// WebDataset tars as the loader and the index builder read them in place:
/// whatever the bytes, samples come out or the tar counts as cut short,
/// and every record reads.
#[test]
fn webdataset_tars() {
    let image = std::fs::read(format!("{OPEN_CLIP}/photo-2.png")).unwrap();
    let mut builder = tar::Builder::new(Vec::new());
    let files: [(&str, &[u8]); 7] = [
        ("s/000.png", &image),
        ("s/000.txt", b"a caption"),
        ("s/000.cls", b"1 2"),
        ("s/001.jpg", &image),
        ("s/001.json", br#"{"caption": "from json", "label": "cat"}"#),
        ("s/002.webp", &image),
        ("s/002.cls", b"dog"),
    ];
    for (name, data) in files {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        builder.append_data(&mut header, name, data).unwrap();
    }
    let seed = builder.into_inner().unwrap();
    let store = store::Store::open("memory://fuzz-tars", &store::StoreOptions::default()).unwrap();
    let source = contract::shard_pattern::TarSource::parse("0.tar").unwrap();
    for kind in [
        contract::dataset::DatasetKind::Align,
        contract::dataset::DatasetKind::Jft,
    ] {
        let classes = ["cat", "dog", "bird"].map(|name| contract::dataset::ClassName {
            name: name.into(),
            parent: None,
        });
        let build = webdataset::IndexBuild {
            kind,
            classes: Some(classes.to_vec()),
            threads: 1,
        };
        fuzz(&format!("{kind} tar"), &[seed.clone()], |bytes| {
            store.put("0.tar", bytes.to_vec().into()).unwrap();
            let index = build
                .run(&source, &store, &|_, _| {})
                .map_err(|error| error.to_string())?
                .index;
            let shard = datasets::shard::Shard::from_tar(bytes.to_vec().into(), &index);
            assert_eq!(
                shard.rows() as u64,
                index.rows(),
                "the index counts what the loader reads"
            );
            for row in 0..shard.rows() {
                let record = shard.record(row);
                let _ = (
                    record.key.len(),
                    record.image.len(),
                    record.text,
                    record.labels,
                    record.problem,
                );
            }
            Ok(())
        });
    }
}

/// open_clip's state dicts at `coca import open-clip`: the safetensors
/// header (where lengths, shapes and offsets are) mutated in front of the
/// fixture's tensor data, and the model JSON.
#[test]
fn open_clip_state_dicts_and_configs() {
    let weights = std::fs::read(format!("{OPEN_CLIP}/open_clip.safetensors")).unwrap();
    let header_len = u64::from_le_bytes(weights[..8].try_into().unwrap()) as usize;
    let (header, data) = weights.split_at(8 + header_len);
    let config_json = std::fs::read_to_string(format!("{OPEN_CLIP}/config.json")).unwrap();
    let config = model::open_clip::config_from_json(&config_json, "config.json").unwrap();
    fuzz("open_clip safetensors", &[header.to_vec()], |bytes| {
        let file = [bytes, data].concat();
        model::open_clip::import::<model::backend::Cpu>(&config, &file, "open_clip.safetensors", &Default::default())
            .map(|_| ())
            .map_err(|error| error.to_string())
    });
    fuzz("open_clip model JSON", &[config_json.into_bytes()], |bytes| {
        model::open_clip::config_from_json(&String::from_utf8_lossy(bytes), "config.json")
            .map(|_| ())
            .map_err(|error| error.to_string())
    });
}
