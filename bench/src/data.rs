//! Loader throughput from a dataset's shards (`coca bench data`).

use std::time::Instant;

/// Figures of `coca bench data`.
#[derive(Debug, Clone, PartialEq)]
pub struct DataBenchmark {
    pub samples: usize,
    pub seconds: f64,
    pub threads: usize,
    /// Bytes of shards fetched, the unmeasured first batch's included.
    pub fetched_bytes: u64,
}

impl DataBenchmark {
    pub fn samples_per_second(&self) -> f64 {
        self.samples as f64 / self.seconds
    }

    pub fn per_core(&self) -> f64 {
        self.samples_per_second() / self.threads as f64
    }
}

/// Assembles `batches` training batches of `batch` samples from one dataset
/// (decode, random resized crop, normalise, tokenize) on `threads` threads,
/// after one unmeasured batch that brings the shards into memory.
pub fn bench_data(
    dataset: datasets::dataset::Dataset,
    tokenizer: datasets::tokenizer::TextTokenizer,
    image_size: u32,
    threads: usize,
    batch: usize,
    batches: usize,
) -> Result<DataBenchmark, datasets::loader::LoaderError> {
    use contract::sample_order::{SampleOrder, SourceSize, Streaming};
    use datasets::loader::{BatchAssembler, LoaderConfig, LoaderSource};

    let order = SampleOrder::new(
        0,
        &[SourceSize {
            shard_rows: dataset.index().shards.iter().map(|shard| shard.rows).collect(),
            weight: 1.0,
        }],
        batch,
        Streaming::default(),
    )?;
    let config = LoaderConfig {
        threads,
        ..LoaderConfig::new(image_size, 77)
    };
    let source = LoaderSource {
        dataset,
        templates: datasets::prompt::PromptTemplates::clip80(),
    };
    let mut assembler = BatchAssembler::new(vec![source], order, tokenizer, config, 0, 0, 1)?;
    assembler.assemble(0)?;
    let started = Instant::now();
    for step in 1..=batches as u64 {
        assembler.assemble(step)?;
    }
    let seconds = started.elapsed().as_secs_f64();
    Ok(DataBenchmark {
        samples: batch * batches,
        seconds,
        threads,
        fetched_bytes: assembler.traffic().bytes[0],
    })
}
