//! What the loader fetches over a real HTTP server that counts the bytes
//! it serves: a dataset of 200 shards, memory for a few of them per rank,
//! one epoch on 1, 2 and 4 ranks. The shard-local order fetches each shard
//! about once per epoch; the stream count chosen for the memory keeps it so,
//! for Arrow shards and for WebDataset tars read in place.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use contract::dataset::DatasetKind;
use contract::sample_order::{SampleOrder, SourceSize, Streaming};
use contract::shard_pattern::TarSource;
use contract::stream_layout::{self, Fit, SourceShards};
use datasets::dataset::Dataset;
use datasets::demo;
use datasets::loader::{BatchAssembler, LoaderConfig, LoaderSource};
use datasets::prompt::PromptTemplates;
use datasets::shard::{Compression, Content, Record};
use datasets::tokenizer::TextTokenizer;
use datasets::writer::DatasetWriter;
use store::{Store, StoreOptions};
use webdataset::{IndexBuild, IndexPlace};

/// Serves the files under `root` over HTTP/1.1 (GET only), counting the body bytes sent.
fn serve(root: PathBuf) -> (String, Arc<AtomicU64>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    let served = Arc::new(AtomicU64::new(0));
    let counter = served.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            let (root, counter) = (root.clone(), counter.clone());
            std::thread::spawn(move || answer(stream, &root, &counter));
        }
    });
    (format!("http://{address}/data"), served)
}

fn answer(stream: std::net::TcpStream, root: &Path, served: &AtomicU64) {
    // Header and body go out at once, not held back waiting for an ACK.
    let _ = stream.set_nodelay(true);
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut writer = stream;
    loop {
        let mut request = String::new();
        if reader.read_line(&mut request).unwrap_or(0) == 0 {
            return;
        }
        // Headers until the blank line.
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                break;
            }
        }
        let path = request
            .split_whitespace()
            .nth(1)
            .unwrap_or("/")
            .trim_start_matches("/data/")
            .to_string();
        let head = request.starts_with("HEAD");
        if !head && !request.starts_with("GET") {
            // Read-only, as a plain web server is.
            let _ =
                writer.write_all(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
            return;
        }
        match std::fs::read(root.join(&path)) {
            Ok(body) => {
                let header = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len());
                writer.write_all(header.as_bytes()).unwrap();
                if !head {
                    writer.write_all(&body).unwrap();
                    served.fetch_add(body.len() as u64, Ordering::SeqCst);
                }
            }
            Err(_) => writer
                .write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
                .unwrap(),
        }
    }
}

/// 200 shards of 4 captioned 16-pixel images.
fn write_dataset(dir: &Path) -> u64 {
    let store = Store::open(dir.to_str().unwrap(), &StoreOptions::default()).unwrap();
    let mut writer = DatasetWriter::create(store, DatasetKind::Align, vec![], 4, Compression::None, "traffic").unwrap();
    for index in 0..800 {
        let sample = demo::captioned(3, index, 16);
        writer
            .push(Record {
                key: sample.key,
                image: sample.png,
                content: Content::Text(sample.text),
            })
            .unwrap();
    }
    let index = writer.finish().unwrap();
    assert_eq!(index.shards.len(), 200);
    index.shards.iter().map(|shard| shard.bytes).sum()
}

/// The demo's tokenizer JSON.
fn tokenizer_json() -> Vec<u8> {
    let tokenizer_root = Store::memory();
    demo::write(
        &tokenizer_root,
        &demo::DemoSpec {
            align_rows: 16,
            jft_rows: 16,
            heldout_rows: 4,
            side: 16,
            shard_rows: 16,
            vocab_size: 300,
            ..demo::DemoSpec::default()
        },
    )
    .unwrap();
    tokenizer_root.get(demo::TOKENIZER).unwrap().to_vec()
}

/// One epoch of `order` on each of `world` ranks with `shard_memory_bytes`:
/// the bytes the server sent, checked against the loaders' own count, and
/// the largest peak of shard memory a rank reached. `ahead`: memory leaves
/// room to fetch the coming steps' shards with the first step's.
fn one_epoch(
    dataset: &Dataset,
    order: &SampleOrder,
    world: usize,
    shard_memory_bytes: u64,
    ahead: bool,
    served: &AtomicU64,
) -> (u64, u64) {
    let json = tokenizer_json();
    let tokenizer = || TextTokenizer::from_json(std::str::from_utf8(&json).unwrap(), "tokenizer.json").unwrap();
    let batch = 16;
    let before = served.load(Ordering::SeqCst);
    let (mut counted, mut peak) = (0, 0);
    for rank in 0..world {
        let config = LoaderConfig {
            threads: 1,
            shard_memory_bytes,
            ..LoaderConfig::new(16, 12)
        };
        let sources = vec![LoaderSource {
            dataset: dataset.clone(),
            templates: PromptTemplates::clip80(),
        }];
        let mut assembler = BatchAssembler::new(sources, order.clone(), tokenizer(), config, 5, rank, world).unwrap();
        for step in 0..800 / batch as u64 {
            let samples = assembler.assemble(step).unwrap().samples;
            assert_eq!(samples.len(), batch / world);
            if step == 0 && ahead {
                // The coming steps' shards came with the first step's.
                let mut first: Vec<usize> = samples.iter().map(|s| dataset.locate(s.row).0).collect();
                first.sort();
                first.dedup();
                assert!(
                    assembler.traffic().shards[0] > first.len() as u64,
                    "nothing fetched ahead"
                );
            }
        }
        let traffic = assembler.traffic();
        counted += traffic.bytes[0];
        peak = peak.max(traffic.peak_memory_bytes);
    }
    let fetched = served.load(Ordering::SeqCst) - before;
    // The loader's own count (what the coordinator shows) is the server's.
    assert_eq!(counted, fetched);
    (fetched, peak)
}

#[test]
fn one_epoch_fetches_each_shard_about_once_on_every_world_size() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let dataset_bytes = write_dataset(&data);
    let (url, served) = serve(data.clone());
    let store = Store::open(&url, &StoreOptions::default()).unwrap();
    let dataset = Dataset::open(store).unwrap();
    let largest = dataset.index().shards.iter().map(|shard| shard.bytes).max().unwrap();
    let sizes = [SourceSize {
        shard_rows: dataset.index().shards.iter().map(|shard| shard.rows).collect(),
        weight: 1.0,
    }];
    let streaming = Streaming {
        streams: Some(4),
        window: 1,
    };
    let order = SampleOrder::new(5, &sizes, 16, streaming).unwrap();
    let mut ratios = Vec::new();
    for world in [1, 2, 4] {
        // Memory for 6 of the 200 shards.
        let (fetched, peak) = one_epoch(&dataset, &order, world, 6 * largest, true, &served);
        let ratio = fetched as f64 / dataset_bytes as f64;
        ratios.push((
            world,
            ratio,
            format!("peak memory {:.1} shards", peak as f64 / largest as f64),
        ));
        assert!(
            ratio <= 1.1,
            "{world} ranks fetched {ratio:.2}x the dataset's bytes in one epoch"
        );
    }
    eprintln!("bytes fetched in one epoch / dataset bytes, by ranks: {ratios:?}");
}

/// The trial in small: memory for about 5 shards per worker, 2
/// workers, the default shuffle window and no data.streams. The layout the
/// coordinator chooses keeps one epoch's traffic to the dataset's bytes;
/// the count chosen before (the most the batch allows, 16) fetched shards
/// again and again.
#[test]
fn the_chosen_stream_count_fetches_each_shard_once_in_tight_memory() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let dataset_bytes = write_dataset(&data);
    let (url, served) = serve(data.clone());
    let dataset = Dataset::open(Store::open(&url, &StoreOptions::default()).unwrap()).unwrap();
    let shards = &dataset.index().shards;
    let largest = shards.iter().map(|shard| shard.bytes).max().unwrap();
    let memory = 5 * largest;
    let source = SourceShards {
        per_batch: 16,
        shards: shards.len(),
        mean_bytes: dataset_bytes / shards.len() as u64,
        largest_bytes: largest,
    };
    let fit = Fit {
        workers: 2,
        window: 2,
        shard_memory_bytes: memory,
    };
    let chosen = stream_layout::choose(&[source], fit).unwrap();
    assert_eq!((chosen.streams, chosen.streams_per_worker), (4, 2));
    let sizes = [SourceSize {
        shard_rows: shards.iter().map(|shard| shard.rows).collect(),
        weight: 1.0,
    }];
    let order_of = |streams: usize| {
        let streaming = Streaming {
            streams: Some(streams),
            window: 2,
        };
        SampleOrder::new(5, &sizes, 16, streaming).unwrap()
    };
    let (fetched, peak) = one_epoch(&dataset, &order_of(chosen.streams), 2, memory, false, &served);
    let ratio = fetched as f64 / dataset_bytes as f64;
    let (before, _) = one_epoch(&dataset, &order_of(16), 2, memory, false, &served);
    let before = before as f64 / dataset_bytes as f64;
    eprintln!(
        "one epoch on 2 workers with memory for 5 shards: {} streams (chosen) fetch {ratio:.3}x the dataset's bytes \
         (peak {:.1} shards), 16 streams {before:.2}x",
        chosen.streams,
        peak as f64 / largest as f64
    );
    assert!(
        ratio <= 1.05,
        "the chosen layout fetched {ratio:.3}x the dataset's bytes"
    );
    assert!(
        before > 1.5,
        "the test tells layouts apart: 16 streams fetched {before:.2}x"
    );
}

/// The same 800 samples as 200 WebDataset tars (`{key}.png`, `{key}.txt`).
fn write_tars(dir: &Path) -> u64 {
    std::fs::create_dir_all(dir).unwrap();
    let mut bytes = 0;
    for shard in 0..200 {
        let mut builder = tar::Builder::new(Vec::new());
        for index in shard * 4..shard * 4 + 4 {
            let sample = demo::captioned(3, index, 16);
            for (extension, data) in [("png", sample.png), ("txt", sample.text.into_bytes())] {
                let mut header = tar::Header::new_ustar();
                header.set_size(data.len() as u64);
                header.set_mode(0o644);
                header.set_cksum();
                builder
                    .append_data(&mut header, format!("{}.{extension}", sample.key), data.as_slice())
                    .unwrap();
            }
        }
        let tar = builder.into_inner().unwrap();
        bytes += tar.len() as u64;
        std::fs::write(dir.join(format!("{shard:05}.tar")), tar).unwrap();
    }
    bytes
}

/// Tars over HTTP as webdataset users serve them: the index built through
/// the server from a brace pattern (HTTP lists nothing), kept in the job's
/// directory (the server takes no writes); one epoch on 2 workers in tight
/// memory fetches each tar about once.
#[test]
fn a_tar_source_over_http_fetches_each_tar_once_an_epoch() {
    let dir = tempfile::tempdir().unwrap();
    let tar_bytes = write_tars(&dir.path().join("data"));
    let (url, served) = serve(dir.path().join("data"));
    let source = TarSource::parse(&format!("{url}/{{00000..00199}}.tar")).unwrap();
    let store = Store::open(&source.base, &StoreOptions::default()).unwrap();
    let build = IndexBuild {
        kind: DatasetKind::Align,
        classes: None,
        threads: 4,
    };
    let index = build.run(&source, &store, &|_, _| {}).unwrap().index;
    assert_eq!(served.load(Ordering::SeqCst), tar_bytes, "indexing reads each tar once");
    assert_eq!(index.rows(), 800);
    let job_dir = Store::open(dir.path().join("job").to_str().unwrap(), &StoreOptions::default()).unwrap();
    let place = IndexPlace {
        source: &source,
        data: &store,
        job_dir: Some(&job_dir),
    };
    let written = place.write(&index).unwrap();
    assert!(written.contains("/job/data-indexes/"), "{written}");
    assert_eq!(place.read().unwrap().unwrap(), (index.clone(), written));

    let dataset = Dataset::with_index(store, index);
    let shards = &dataset.index().shards;
    let largest = shards.iter().map(|shard| shard.bytes).max().unwrap();
    let memory = 5 * largest;
    let fit = Fit {
        workers: 2,
        window: 2,
        shard_memory_bytes: memory,
    };
    let layout = SourceShards {
        per_batch: 16,
        shards: shards.len(),
        mean_bytes: tar_bytes / shards.len() as u64,
        largest_bytes: largest,
    };
    let chosen = stream_layout::choose(&[layout], fit).unwrap();
    let sizes = [SourceSize {
        shard_rows: shards.iter().map(|shard| shard.rows).collect(),
        weight: 1.0,
    }];
    let streaming = Streaming {
        streams: Some(chosen.streams),
        window: 2,
    };
    let order = SampleOrder::new(5, &sizes, 16, streaming).unwrap();
    let (fetched, peak) = one_epoch(&dataset, &order, 2, memory, false, &served);
    let ratio = fetched as f64 / tar_bytes as f64;
    eprintln!(
        "one epoch of 200 tars on 2 workers with memory for 5: {} streams fetch {ratio:.3}x the tars' bytes (peak {:.1} tars)",
        chosen.streams,
        peak as f64 / largest as f64
    );
    assert!(ratio <= 1.05, "{ratio:.3}x the tars' bytes in one epoch");
}
