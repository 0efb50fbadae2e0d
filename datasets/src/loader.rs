//! The loader: a rank's micro-batches, in step order, from the global
//! sample order to ready tensors. A background thread assembles batches
//! ahead of the trainer (a bounded queue); inside a batch, shards are
//! fetched and images decoded on a thread pool.
//!
//! Bad records never stop a job and are never silently lost: an
//! undecodable image, an empty text or labels outside the class list is
//! counted per source, and its slot takes the next good row of the same
//! source (a function of the data alone, so every run and every world size
//! makes the same choice). A shard that fails its checksum or cannot be
//! read is reported by URL and all its rows count as bad. When the bad
//! rows of a source exceed `max_bad_fraction` of it, the loader fails,
//! naming the source.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use burn::tensor::backend::Backend;
use burn::tensor::{Bool, Int, Tensor, TensorData};
use contract::sample_order::{SampleOrder, SampleOrderError, SampleRef};
use rayon::prelude::*;

use super::dataset::Dataset;
use super::image::{self, Crop};
use super::patch_dropout::PatchDropout;
use super::prompt::PromptTemplates;
use super::shard::Shard;
use super::tokenizer::{TextTokenizer, TokenizerError};
use crate::bad_record::{self, BadRecord, Caption};
use crate::batch::CocaBatch;
use contract::rng::SplitMix64;

/// One data source of a job: a dataset and, for jft, its prompt templates.
#[derive(Debug, Clone)]
pub struct LoaderSource {
    pub dataset: Dataset,
    pub templates: PromptTemplates,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LoaderConfig {
    pub image_size: u32,
    /// Tokens per text, `<bos>` and `<eos>` included.
    pub context: usize,
    pub crop: Crop,
    /// Threads that fetch and decode.
    pub threads: usize,
    /// Batches assembled ahead of the trainer.
    pub prefetch_batches: usize,
    /// Decoded shards kept in memory, by their stored size.
    pub shard_memory_bytes: u64,
    /// Shards the coming steps need are fetched ahead, up to this many
    /// bytes not yet in memory (with the step's own, in parallel).
    pub fetch_ahead_bytes: u64,
    /// A source with more bad rows than this share of it fails the job.
    pub max_bad_fraction: f64,
    /// An image claiming more pixels is a bad record, never allocated.
    pub max_image_pixels: u64,
    /// Training's patch dropout: the patches each sample keeps.
    pub patch_dropout: Option<PatchDropout>,
}

impl LoaderConfig {
    pub fn new(image_size: u32, context: usize) -> Self {
        Self {
            image_size,
            context,
            crop: Crop::training(),
            threads: std::thread::available_parallelism().map_or(2, |n| n.get()),
            prefetch_batches: 2,
            shard_memory_bytes: 1 << 30,
            fetch_ahead_bytes: 256 << 20,
            max_bad_fraction: 0.01,
            max_image_pixels: contract::manifest::MAX_IMAGE_PIXELS,
            patch_dropout: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    #[error(transparent)]
    Order(#[from] SampleOrderError),
    #[error(
        "data source {source_index} ({url}): {bad} of {rows} rows are bad, more than the allowed {fraction}; \
         first problems: {examples}"
    )]
    TooManyBad {
        source_index: usize,
        url: String,
        bad: u64,
        rows: u64,
        fraction: f64,
        examples: String,
    },
    #[error("tokenizer: {0}")]
    Tokenizer(#[from] TokenizerError),
    #[error("cannot start the loader's threads: {0}")]
    Threads(String),
    #[error("the loader stopped")]
    Stopped,
}

/// A rank's micro-batch, on the host.
#[derive(Debug, Clone, PartialEq)]
pub struct HostBatch {
    pub step: u64,
    /// The rows read, one per slot (bad rows already replaced).
    pub samples: Vec<SampleRef>,
    /// The text of every slot, as tokenized.
    pub texts: Vec<String>,
    /// [batch, 3, size, size], normalised.
    pub images: Vec<f32>,
    /// [batch, context], right-padded.
    pub tokens: Vec<u32>,
    /// [batch, kept]: the patches each image keeps (patch dropout); empty: all.
    pub kept_patches: Vec<u32>,
    pub image_size: usize,
    pub context: usize,
    pub pad_id: u32,
}

impl HostBatch {
    pub fn len(&self) -> usize {
        self.samples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    pub fn to_device<B: Backend>(&self, device: &B::Device) -> CocaBatch<B> {
        let batch = self.len();
        let shape = [batch, self.context];
        let tokens: Vec<i32> = self.tokens.iter().map(|&id| id as i32).collect();
        let padding: Vec<bool> = self.tokens.iter().map(|&id| id == self.pad_id).collect();
        CocaBatch {
            images: Tensor::from_data(
                TensorData::new(self.images.clone(), [batch, 3, self.image_size, self.image_size]),
                device,
            ),
            tokens: Tensor::<B, 2, Int>::from_data(TensorData::new(tokens, shape), device),
            padding: Tensor::<B, 2, Bool>::from_bool(TensorData::new(padding, shape), device),
            kept_patches: (!self.kept_patches.is_empty()).then(|| {
                let kept: Vec<i32> = self.kept_patches.iter().map(|&p| p as i32).collect();
                let per_image = kept.len() / batch;
                Tensor::<B, 2, Int>::from_data(TensorData::new(kept, [batch, per_image]), device)
            }),
        }
    }
}

/// Bad records met so far, per source.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BadRecords {
    pub sources: Vec<SourceBadRecords>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct SourceBadRecords {
    pub url: String,
    /// Encounters by reason (a bad row met twice counts twice).
    pub by_reason: BTreeMap<String, u64>,
    /// Distinct bad rows, failed shards' rows included.
    pub bad_rows: u64,
    /// Shards that could not be used: URL and why.
    pub failed_shards: Vec<(String, String)>,
}

/// What a rank has fetched from each source's store so far.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Traffic {
    /// Shards fetched, per source (a shard fetched twice counts twice).
    pub shards: Vec<u64>,
    /// Their bytes, per source.
    pub bytes: Vec<u64>,
    /// The most bytes of shards held in memory at once.
    pub peak_memory_bytes: u64,
}

impl BadRecords {
    pub fn total(&self) -> u64 {
        self.sources
            .iter()
            .map(|source| source.by_reason.values().sum::<u64>())
            .sum()
    }
}

/// Assembles micro-batches synchronously; [`Loader`] runs one ahead of the trainer.
pub struct BatchAssembler {
    sources: Vec<LoaderSource>,
    order: SampleOrder,
    tokenizer: TextTokenizer,
    config: LoaderConfig,
    seed: u64,
    rank: usize,
    world: usize,
    pool: rayon::ThreadPool,
    shards: ShardMemory,
    bad: Arc<Mutex<BadState>>,
    traffic: Arc<Mutex<Traffic>>,
    /// The coming steps and the shard of each of their samples.
    upcoming: VecDeque<(u64, Vec<(usize, usize)>)>,
}

#[derive(Debug, Default)]
struct BadState {
    report: BadRecords,
    rows: Vec<HashSet<u64>>,
    failed: HashMap<(usize, usize), String>,
    examples: Vec<Vec<String>>,
}

/// Decoded shards, least recently used out first.
struct ShardMemory {
    limit: u64,
    used: u64,
    shards: HashMap<(usize, usize), (Arc<Shard>, u64)>,
    recency: VecDeque<(usize, usize)>,
}

enum Outcome {
    Ready { tokens: Vec<u32>, text: String },
    Bad { reason: BadRecord, detail: String },
}

impl BatchAssembler {
    pub fn new(
        sources: Vec<LoaderSource>,
        order: SampleOrder,
        tokenizer: TextTokenizer,
        config: LoaderConfig,
        seed: u64,
        rank: usize,
        world: usize,
    ) -> Result<Self, LoaderError> {
        // Checks rank and world once, here.
        order.micro_batch(0, rank, world)?;
        let sources_count = sources.len();
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(config.threads.max(1))
            .thread_name(|i| format!("coca-loader-{i}"))
            .build()
            .map_err(|error| LoaderError::Threads(error.to_string()))?;
        let bad = BadState {
            report: BadRecords {
                sources: sources
                    .iter()
                    .map(|source| SourceBadRecords {
                        url: source.dataset.url(),
                        ..Default::default()
                    })
                    .collect(),
            },
            rows: vec![HashSet::new(); sources.len()],
            examples: vec![Vec::new(); sources.len()],
            failed: HashMap::new(),
        };
        Ok(Self {
            shards: ShardMemory {
                limit: config.shard_memory_bytes,
                used: 0,
                shards: HashMap::new(),
                recency: VecDeque::new(),
            },
            sources,
            order,
            tokenizer,
            config,
            seed,
            rank,
            world,
            pool,
            bad: Arc::new(Mutex::new(bad)),
            traffic: Arc::new(Mutex::new(Traffic {
                shards: vec![0; sources_count],
                bytes: vec![0; sources_count],
                peak_memory_bytes: 0,
            })),
            upcoming: VecDeque::new(),
        })
    }

    /// What this rank has fetched so far.
    pub fn traffic(&self) -> Traffic {
        self.traffic.lock().expect("traffic").clone()
    }

    pub fn bad_records(&self) -> BadRecords {
        self.bad.lock().expect("bad-record state").report.clone()
    }

    /// This rank's micro-batch of global step `step`.
    pub fn assemble(&mut self, step: u64) -> Result<HostBatch, LoaderError> {
        let mut slots = self.order.micro_batch(step, self.rank, self.world)?;
        let batch = slots.len();
        let (size, context) = (self.config.image_size as usize, self.config.context);
        let mut images = vec![0.0f32; batch * 3 * size * size];
        let mut tokens = vec![0u32; batch * context];
        let mut texts = vec![String::new(); batch];
        let pixels = 3 * size * size;
        let mut pending: Vec<usize> = (0..batch).collect();
        let ahead = self.shards_ahead(step);
        while !pending.is_empty() {
            self.load_shards(pending.iter().map(|&slot| slots[slot]), &ahead)?;
            // Each pending slot's pixels are written in place, in parallel.
            let outcomes: Vec<Outcome> = {
                let this = &*self;
                let mut work: Vec<(SampleRef, &mut [f32])> = Vec::with_capacity(pending.len());
                let mut chunks = images.chunks_mut(pixels).enumerate();
                for &slot in &pending {
                    let (_, chunk) = chunks.find(|(i, _)| *i == slot).expect("pending slots are in order");
                    work.push((slots[slot], chunk));
                }
                this.pool.install(|| {
                    work.into_par_iter()
                        .map(|(sample, chunk)| this.prepare(sample, chunk))
                        .collect()
                })
            };
            let mut retry = Vec::new();
            for (slot, outcome) in pending.into_iter().zip(outcomes) {
                match outcome {
                    Outcome::Ready { tokens: ids, text } => {
                        tokens[slot * context..(slot + 1) * context].copy_from_slice(&ids);
                        texts[slot] = text;
                    }
                    Outcome::Bad { reason, detail } => {
                        self.count_bad(slots[slot], reason, detail)?;
                        let sample = &mut slots[slot];
                        let rows = self.sources[sample.source].dataset.index().rows();
                        sample.row = (sample.row + 1) % rows;
                        retry.push(slot);
                    }
                }
            }
            pending = retry;
        }
        // Drawn from each sample's own key, after bad rows were replaced.
        let kept_patches = match self.config.patch_dropout {
            Some(dropout) => slots
                .iter()
                .flat_map(|&sample| dropout.kept_patches(self.seed ^ sample_key(0x9a7c, sample)))
                .collect(),
            None => Vec::new(),
        };
        Ok(HostBatch {
            step,
            samples: slots,
            texts,
            images,
            tokens,
            kept_patches,
            image_size: size,
            context,
            pad_id: self.tokenizer.pad_id(),
        })
    }

    /// The shards the steps after `step` need, in the order they are first
    /// needed, as far as `fetch_ahead_bytes` of them (not yet in memory;
    /// at least one) and half the memory allow; at most 64 steps ahead.
    fn shards_ahead(&mut self, step: u64) -> Vec<(usize, usize)> {
        self.look_ahead(step);
        let (budget, room) = (self.config.fetch_ahead_bytes, self.config.shard_memory_bytes / 2);
        let (mut ahead, mut new_bytes, mut all_bytes) = (Vec::new(), 0, 0);
        for key in self.upcoming.iter().flat_map(|(_, keys)| keys.iter().copied()) {
            if ahead.contains(&key) {
                continue;
            }
            let bytes = self.sources[key.0].dataset.index().shards[key.1].bytes;
            let fetch = if self.shards.contains(&key) { 0 } else { bytes };
            // At least one shard ahead, however large.
            let over_budget = new_bytes > 0 && new_bytes + fetch > budget;
            if over_budget || all_bytes + bytes > room {
                return ahead;
            }
            new_bytes += fetch;
            all_bytes += bytes;
            ahead.push(key);
        }
        ahead
    }

    /// Brings `upcoming` to steps `step + 1 ..= step + 64`: each step's plan
    /// is worked out once, when it comes into view, not again every step.
    fn look_ahead(&mut self, step: u64) {
        while self.upcoming.front().is_some_and(|(next, _)| *next <= step) {
            self.upcoming.pop_front();
        }
        if self.upcoming.front().is_some_and(|(next, _)| *next != step + 1) {
            self.upcoming.clear();
        }
        let mut next = self.upcoming.back().map_or(step + 1, |(last, _)| last + 1);
        while next <= step + 64 {
            let Ok(samples) = self.order.micro_batch(next, self.rank, self.world) else {
                break;
            };
            let keys = samples
                .iter()
                .map(|sample| (sample.source, self.sources[sample.source].dataset.locate(sample.row).0))
                .collect();
            self.upcoming.push_back((next, keys));
            next += 1;
        }
    }

    /// Fetches (in parallel) the shards `samples` need that are not in
    /// memory, and those of `ahead` (the coming steps') with them; neither
    /// is evicted to make room for the other.
    fn load_shards(
        &mut self,
        samples: impl Iterator<Item = SampleRef>,
        ahead: &[(usize, usize)],
    ) -> Result<(), LoaderError> {
        let mut needed: Vec<(usize, usize)> = samples
            .map(|sample| (sample.source, self.sources[sample.source].dataset.locate(sample.row).0))
            .chain(ahead.iter().copied())
            .collect();
        needed.sort_unstable();
        needed.dedup();
        for key in &needed {
            self.shards.touch(*key);
        }
        let missing: Vec<(usize, usize)> = {
            let bad = self.bad.lock().expect("bad-record state");
            needed
                .iter()
                .copied()
                .filter(|key| !self.shards.contains(key) && !bad.failed.contains_key(key))
                .collect()
        };
        let incoming = missing
            .iter()
            .map(|&(source, shard)| self.sources[source].dataset.index().shards[shard].bytes)
            .sum();
        self.shards.make_room(&needed, incoming);
        let sources = &self.sources;
        let fetched: Vec<_> = self.pool.install(|| {
            missing
                .par_iter()
                .map(|&(source, shard)| ((source, shard), sources[source].dataset.shard(shard)))
                .collect()
        });
        for ((source, shard), result) in fetched {
            let dataset = &self.sources[source].dataset;
            let bytes = dataset.index().shards[shard].bytes;
            {
                let mut traffic = self.traffic.lock().expect("traffic");
                traffic.shards[source] += 1;
                traffic.bytes[source] += bytes;
            }
            match result {
                Ok(decoded) => self.shards.insert((source, shard), decoded, bytes),
                Err(error) => self.fail_shard(source, shard, error.to_string())?,
            }
        }
        let mut traffic = self.traffic.lock().expect("traffic");
        traffic.peak_memory_bytes = traffic.peak_memory_bytes.max(self.shards.used);
        Ok(())
    }

    fn fail_shard(&self, source: usize, shard: usize, message: String) -> Result<(), LoaderError> {
        let dataset = &self.sources[source].dataset;
        let mut bad = self.bad.lock().expect("bad-record state");
        bad.failed.insert((source, shard), message.clone());
        let report = &mut bad.report.sources[source];
        report.failed_shards.push((dataset.shard_url(shard), message.clone()));
        report.bad_rows += dataset.index().shards[shard].rows;
        bad.examples[source].push(message);
        drop(bad);
        self.check_fraction(source)
    }

    fn count_bad(&self, sample: SampleRef, reason: BadRecord, detail: String) -> Result<(), LoaderError> {
        let mut bad = self.bad.lock().expect("bad-record state");
        let state = &mut *bad;
        *state.report.sources[sample.source]
            .by_reason
            .entry(reason.name().to_string())
            .or_default() += 1;
        let (shard, _) = self.sources[sample.source].dataset.locate(sample.row);
        let in_failed_shard = state.failed.contains_key(&(sample.source, shard));
        if !in_failed_shard && state.rows[sample.source].insert(sample.row) {
            state.report.sources[sample.source].bad_rows += 1;
            if state.examples[sample.source].len() < 3 {
                state.examples[sample.source].push(detail);
            }
        }
        drop(bad);
        self.check_fraction(sample.source)
    }

    fn check_fraction(&self, source: usize) -> Result<(), LoaderError> {
        let bad = self.bad.lock().expect("bad-record state");
        let rows = self.sources[source].dataset.index().rows();
        let bad_rows = bad.report.sources[source].bad_rows;
        if bad_rows as f64 > self.config.max_bad_fraction * rows as f64 || bad_rows >= rows {
            return Err(LoaderError::TooManyBad {
                source_index: source,
                url: self.sources[source].dataset.url(),
                bad: bad_rows,
                rows,
                fraction: self.config.max_bad_fraction,
                examples: bad.examples[source].join("; "),
            });
        }
        Ok(())
    }

    /// Decodes, augments (into `pixels`) and tokenizes one sample.
    fn prepare(&self, sample: SampleRef, pixels: &mut [f32]) -> Outcome {
        let source = &self.sources[sample.source];
        let dataset = &source.dataset;
        let (shard, row) = dataset.locate(sample.row);
        let Some(decoded) = self.shards.get(&(sample.source, shard)) else {
            return Outcome::Bad {
                reason: BadRecord::FailedShard,
                detail: format!("{} is unusable", dataset.shard_url(shard)),
            };
        };
        let record = decoded.record(row);
        let at = || format!("{} row {row} (key `{}`)", dataset.shard_url(shard), record.key);
        let text = match bad_record::caption(&record, dataset.index()) {
            Ok(Caption::Text(text)) => text.to_string(),
            Ok(Caption::Classes(names)) => source.templates.caption(&names, self.seed, sample_key(0x7e3a, sample)),
            Err((reason, detail)) => {
                return Outcome::Bad {
                    reason,
                    detail: format!("{}: {detail}", at()),
                }
            }
        };
        let decoded_image = match image::decode_within(record.image, self.config.max_image_pixels) {
            Ok(decoded_image) => decoded_image,
            Err(error) => {
                return Outcome::Bad {
                    reason: BadRecord::UndecodableImage,
                    detail: format!("{}: {error}", at()),
                }
            }
        };
        let crop_seed = self.seed ^ sample_key(0xc409, sample);
        image::prepare_into(
            &decoded_image,
            self.config.image_size,
            self.config.crop,
            crop_seed,
            pixels,
        );
        match self.tokenizer.encode(&text, self.config.context) {
            Ok(tokens) => Outcome::Ready { tokens, text },
            Err(error) => Outcome::Bad {
                reason: BadRecord::UntokenizableText,
                detail: format!("{}: {error}", at()),
            },
        }
    }
}

/// A stable per-sample key: the same source, epoch and row give the same
/// draws wherever and whenever the sample is read.
fn sample_key(tag: u64, sample: SampleRef) -> u64 {
    let mut rng = SplitMix64::new(tag);
    let mut key = rng.next_u64();
    for part in [sample.source as u64, sample.epoch, sample.row] {
        key = SplitMix64::new(key ^ part).next_u64();
    }
    key
}

impl ShardMemory {
    fn get(&self, key: &(usize, usize)) -> Option<&Shard> {
        self.shards.get(key).map(|(shard, _)| shard.as_ref())
    }

    fn contains(&self, key: &(usize, usize)) -> bool {
        self.shards.contains_key(key)
    }

    fn touch(&mut self, key: (usize, usize)) {
        if self.shards.contains_key(&key) {
            self.recency.retain(|other| *other != key);
            self.recency.push_back(key);
        }
    }

    /// Evicts least recently used shards, except those in `keep` (the
    /// batch in hand needs them), until `incoming` more bytes fit.
    fn make_room(&mut self, keep: &[(usize, usize)], incoming: u64) {
        let mut kept = VecDeque::new();
        while self.used + incoming > self.limit {
            let Some(old) = self.recency.pop_front() else { break };
            if keep.contains(&old) {
                kept.push_back(old);
                continue;
            }
            if let Some((_, bytes)) = self.shards.remove(&old) {
                self.used -= bytes;
            }
        }
        kept.extend(self.recency.drain(..));
        self.recency = kept;
    }

    fn insert(&mut self, key: (usize, usize), shard: Shard, bytes: u64) {
        self.used += bytes;
        self.shards.insert(key, (Arc::new(shard), bytes));
        self.recency.push_back(key);
    }
}

/// Runs a [`BatchAssembler`] on its own thread, `prefetch_batches` ahead.
pub struct Loader {
    batches: Receiver<Result<HostBatch, LoaderError>>,
    bad: Arc<Mutex<BadState>>,
    traffic: Arc<Mutex<Traffic>>,
    thread: Option<JoinHandle<()>>,
    waited: Duration,
}

impl Loader {
    /// Starts assembling batches from `start_step` on.
    pub fn start(mut assembler: BatchAssembler, start_step: u64) -> Result<Self, LoaderError> {
        let (sender, batches) = sync_channel(assembler.config.prefetch_batches.max(1));
        let bad = assembler.bad.clone();
        let traffic = assembler.traffic.clone();
        let thread = std::thread::Builder::new()
            .name("coca-loader".into())
            .spawn(move || {
                for step in start_step.. {
                    let result = assembler.assemble(step);
                    let failed = result.is_err();
                    // The receiver gone means the job is done with us.
                    if sender.send(result).is_err() || failed {
                        return;
                    }
                }
            })
            .map_err(|error| LoaderError::Threads(error.to_string()))?;
        Ok(Self {
            batches,
            bad,
            traffic,
            thread: Some(thread),
            waited: Duration::ZERO,
        })
    }

    /// The next micro-batch; blocks while it is not ready.
    pub fn next_batch(&mut self) -> Result<HostBatch, LoaderError> {
        let started = Instant::now();
        let batch = self.batches.recv().map_err(|_| LoaderError::Stopped)?;
        self.waited += started.elapsed();
        batch
    }

    /// Time the trainer spent waiting for data, in all.
    pub fn waited(&self) -> Duration {
        self.waited
    }

    pub fn bad_records(&self) -> BadRecords {
        self.bad.lock().expect("bad-record state").report.clone()
    }

    /// What this rank has fetched so far.
    pub fn traffic(&self) -> Traffic {
        self.traffic.lock().expect("traffic").clone()
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        // Closing the queue ends the thread at its next send.
        let (_, closed) = sync_channel(0);
        drop(std::mem::replace(&mut self.batches, closed));
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
