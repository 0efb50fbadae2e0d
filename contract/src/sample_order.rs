//! The global sample order: which samples every rank reads at every step.
//!
//! A pure function of the seed, the sources (their shards' sizes and their
//! mixing weights), the global batch, the step and the rank: nothing but
//! the step cursor is ever stored, so a resumed job, on any number of ranks,
//! reads exactly what an uninterrupted one would have. It keeps shards
//! local, so a source far larger than memory is fetched about once per
//! epoch:
//!
//! - Each global batch holds a fixed count of each source, the weights'
//!   shares of the batch rounded by largest remainder.
//! - Each source's shards are dealt once, in a seeded order, to `streams`
//!   canonical streams, balanced by rows (to within one shard). Stream c
//!   gives `count / streams` samples to every global batch.
//! - A stream cycles through its shards pass after pass: each pass walks
//!   them in a new seeded order, a window of `window` shards at a time,
//!   with the window's rows shuffled together. So every sample appears
//!   exactly once per pass of its stream, a stream needs about `window`
//!   shards at a time, and consecutive passes differ.
//! - Rank r of N, when N divides the stream count, reads streams
//!   [r S/N, (r+1) S/N) and nothing else: it fetches only its shards. For an
//!   N that does not divide it, rank r takes the global batch's positions
//!   r, r + N, ... (every plan is still a partition of the one-rank plan,
//!   but every rank then reads every stream's shards).
//! - Permutations are keyed Feistel networks over the index range (with
//!   cycle walking): O(1) time and memory per lookup whatever the size.

use std::fmt;

/// One sample: a row of a source, and the pass of its stream it is drawn in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SampleRef {
    pub source: usize,
    /// The pass of the sample's stream over its shards (the source's epoch,
    /// to within one shard: streams are balanced by rows).
    pub epoch: u64,
    pub row: u64,
}

/// A source as the order sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct SourceSize {
    /// Rows of each shard, in the index's order.
    pub shard_rows: Vec<u64>,
    /// Relative share of every global batch.
    pub weight: f64,
}

impl SourceSize {
    pub fn samples(&self) -> u64 {
        self.shard_rows.iter().sum()
    }
}

/// How the order walks the shards: the stream count (none: the largest up
/// to 64 the batch and the shards allow; a job's plan always names the one
/// its coordinator chose, `stream_layout`) and `data.shuffle_window`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Streaming {
    pub streams: Option<usize>,
    pub window: usize,
}

impl Default for Streaming {
    fn default() -> Self {
        Self {
            streams: None,
            window: 2,
        }
    }
}

/// The most canonical streams the automatic choice takes.
pub const MAX_AUTO_STREAMS: usize = 64;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SampleOrderError {
    #[error("there are no data sources")]
    NoSources,
    #[error("the global batch must hold at least one sample")]
    EmptyBatch,
    #[error("data source {index} has no samples")]
    EmptySource { index: usize },
    #[error("data source {index}: weight {weight} must be a positive number")]
    BadWeight { index: usize, weight: f64 },
    #[error(
        "data source {index}: weight {weight} gives it no sample of a global batch of {batch}; \
         raise its weight or the batch"
    )]
    StarvedSource { index: usize, weight: f64, batch: usize },
    #[error("{streams} streams do not divide data source {index}'s {count} samples of every global batch")]
    StreamsSplitBatch { streams: usize, index: usize, count: usize },
    #[error("data source {index} has {shards} shards with rows, fewer than its {streams} streams")]
    StreamsOutnumberShards {
        streams: usize,
        index: usize,
        shards: usize,
    },
    #[error("the stream count and the shuffle window must be at least 1")]
    NoStreams,
    #[error("a global batch of {batch} does not split evenly between {world} ranks")]
    Indivisible { batch: usize, world: usize },
    #[error("rank {rank} is outside a world of {world}")]
    RankOutOfRange { rank: usize, world: usize },
}

/// One source's streams: its shards dealt once, and what each stream holds.
#[derive(Debug, Clone)]
struct SourceStreams {
    /// The first row of each shard (and the total at the end).
    shard_starts: Vec<u64>,
    /// Shards of each stream, in dealt order.
    deal: Vec<Vec<usize>>,
    /// Rows of each stream.
    rows: Vec<u64>,
}

#[derive(Debug, Clone)]
pub struct SampleOrder {
    seed: u64,
    sources: Vec<SourceSize>,
    /// Samples of each source in every global batch.
    counts: Vec<usize>,
    batch: usize,
    streams: usize,
    window: usize,
    dealt: Vec<SourceStreams>,
}

/// Samples of each source in every global batch of `batch`.
pub fn counts_per_batch(weights: &[f64], batch: usize) -> Result<Vec<usize>, SampleOrderError> {
    if weights.is_empty() {
        return Err(SampleOrderError::NoSources);
    }
    if batch == 0 {
        return Err(SampleOrderError::EmptyBatch);
    }
    for (index, &weight) in weights.iter().enumerate() {
        if !(weight.is_finite() && weight > 0.0) {
            return Err(SampleOrderError::BadWeight { index, weight });
        }
    }
    let counts = largest_remainder(weights, batch);
    if let Some(index) = counts.iter().position(|&count| count == 0) {
        return Err(SampleOrderError::StarvedSource {
            index,
            weight: weights[index],
            batch,
        });
    }
    Ok(counts)
}

/// Whether `streams` streams can serve batches of `counts`: each stream
/// gives every batch the same number of each source's samples.
pub fn check_streams(streams: usize, counts: &[usize]) -> Result<(), SampleOrderError> {
    if streams == 0 {
        return Err(SampleOrderError::NoStreams);
    }
    match counts.iter().position(|&count| count % streams != 0) {
        Some(index) => Err(SampleOrderError::StreamsSplitBatch {
            streams,
            index,
            count: counts[index],
        }),
        None => Ok(()),
    }
}

impl SampleOrder {
    pub fn new(
        seed: u64,
        sources: &[SourceSize],
        batch: usize,
        streaming: Streaming,
    ) -> Result<Self, SampleOrderError> {
        let weights: Vec<f64> = sources.iter().map(|source| source.weight).collect();
        let counts = counts_per_batch(&weights, batch)?;
        if let Some(index) = sources.iter().position(|source| source.samples() == 0) {
            return Err(SampleOrderError::EmptySource { index });
        }
        if streaming.window == 0 {
            return Err(SampleOrderError::NoStreams);
        }
        // Shards without rows hold nothing to deal.
        let filled = |source: &SourceSize| source.shard_rows.iter().filter(|&&rows| rows > 0).count();
        let fewest_shards = sources.iter().map(filled).min().unwrap_or(1);
        let streams = match streaming.streams {
            Some(streams) => streams,
            None => (1..=MAX_AUTO_STREAMS.min(fewest_shards))
                .rev()
                .find(|&streams| check_streams(streams, &counts).is_ok())
                .unwrap_or(1),
        };
        check_streams(streams, &counts)?;
        if let Some(index) = sources.iter().position(|s| filled(s) < streams) {
            return Err(SampleOrderError::StreamsOutnumberShards {
                streams,
                index,
                shards: filled(&sources[index]),
            });
        }
        let dealt = sources
            .iter()
            .enumerate()
            .map(|(index, source)| deal(source, streams, key(seed, &[DEAL, index as u64])))
            .collect();
        Ok(Self {
            seed,
            sources: sources.to_vec(),
            counts,
            batch,
            streams,
            window: streaming.window,
            dealt,
        })
    }

    /// Samples drawn from each source in the first `step` steps.
    pub fn samples_after(&self, step: u64) -> Vec<u64> {
        self.counts.iter().map(|&count| step * count as u64).collect()
    }

    /// Epochs of each source completed in the first `step` steps (fractional).
    pub fn epochs_after(&self, step: u64) -> Vec<f64> {
        self.samples_after(step)
            .iter()
            .zip(&self.sources)
            .map(|(&samples, size)| samples as f64 / size.samples() as f64)
            .collect()
    }

    /// Samples of each source in every global batch.
    pub fn counts_per_batch(&self) -> &[usize] {
        &self.counts
    }

    pub fn global_batch(&self) -> usize {
        self.batch
    }

    /// The canonical stream count (every source has this many streams).
    pub fn streams(&self) -> usize {
        self.streams
    }

    /// Whether `world` ranks each read only their own streams.
    pub fn is_local_for(&self, world: usize) -> bool {
        world > 0 && self.streams % world == 0
    }

    /// The shards of each source that stream `stream` holds.
    pub fn stream_shards(&self, source: usize, stream: usize) -> &[usize] {
        &self.dealt[source].deal[stream]
    }

    /// How the order is built, for a checkpoint's resume fields: a job may
    /// resume only under the same order.
    pub fn describe(&self) -> String {
        format!("shard-local v1, {} streams, window {}", self.streams, self.window)
    }

    /// The streams and window of an order [`describe`](Self::describe) wrote.
    pub fn described_layout(described: &str) -> Option<(usize, usize)> {
        let rest = described.strip_prefix("shard-local v1, ")?;
        let (streams, window) = rest.split_once(" streams, window ")?;
        Some((streams.parse().ok()?, window.parse().ok()?))
    }

    /// The whole global batch of `step`: each source's samples in turn,
    /// each stream's in turn within a source.
    pub fn step_samples(&self, step: u64) -> Vec<SampleRef> {
        (0..self.counts.len())
            .flat_map(|source| self.source_samples(step, source, 0..self.streams))
            .collect()
    }

    /// The sample at `position` (0..global batch) of global step `step`.
    pub fn sample(&self, step: u64, position: usize) -> SampleRef {
        assert!(
            position < self.batch,
            "position {position} is outside a batch of {}",
            self.batch
        );
        let mut position = position;
        let mut source = 0;
        while position >= self.counts[source] {
            position -= self.counts[source];
            source += 1;
        }
        let per_stream = self.counts[source] / self.streams;
        let stream = position / per_stream;
        let index = step * per_stream as u64 + (position % per_stream) as u64;
        self.stream_sample(source, stream, index)
    }

    /// Rank `rank` of `world`'s micro-batch at `step`: its own streams'
    /// samples when `world` divides the stream count, otherwise positions
    /// rank, rank + world, ... of the global batch.
    pub fn micro_batch(&self, step: u64, rank: usize, world: usize) -> Result<Vec<SampleRef>, SampleOrderError> {
        if world == 0 || self.batch % world != 0 {
            return Err(SampleOrderError::Indivisible {
                batch: self.batch,
                world,
            });
        }
        if rank >= world {
            return Err(SampleOrderError::RankOutOfRange { rank, world });
        }
        if self.is_local_for(world) {
            let share = self.streams / world;
            let streams = rank * share..(rank + 1) * share;
            return Ok((0..self.counts.len())
                .flat_map(|source| self.source_samples(step, source, streams.clone()))
                .collect());
        }
        let whole = self.step_samples(step);
        Ok(whole.into_iter().skip(rank).step_by(world).collect())
    }

    /// Source `source`'s samples of `step` from `streams`, stream by stream.
    fn source_samples(&self, step: u64, source: usize, streams: std::ops::Range<usize>) -> Vec<SampleRef> {
        let per_stream = (self.counts[source] / self.streams) as u64;
        let mut samples = Vec::with_capacity(streams.len() * per_stream as usize);
        for stream in streams {
            let first = step * per_stream;
            let mut pass = None;
            for index in first..first + per_stream {
                samples.push(self.stream_sample_in(source, stream, index, &mut pass));
            }
        }
        samples
    }

    /// Draw `index` of stream `stream` of source `source`.
    fn stream_sample(&self, source: usize, stream: usize, index: u64) -> SampleRef {
        self.stream_sample_in(source, stream, index, &mut None)
    }

    /// [`SampleOrder::stream_sample`], reusing (or filling) `pass`, the
    /// layout of the pass the draw falls in.
    fn stream_sample_in(&self, source: usize, stream: usize, index: u64, pass: &mut Option<Pass>) -> SampleRef {
        let dealt = &self.dealt[source];
        let rows = dealt.rows[stream];
        let (number, offset) = (index / rows, index % rows);
        if pass.as_ref().is_none_or(|p| p.number != number) {
            *pass = Some(self.pass(source, stream, number));
        }
        let pass = pass.as_ref().expect("filled above");
        // The window the offset falls in, then its shuffled place there.
        let window = pass.window_starts.partition_point(|&start| start <= offset) - 1;
        let (start, end) = (pass.window_starts[window], pass.window_starts[window + 1]);
        let shuffle = Permutation::new(
            end - start,
            key(
                self.seed,
                &[WINDOW, source as u64, stream as u64, number, window as u64],
            ),
        );
        let place = start + shuffle.apply(offset - start);
        // The shard of the pass holding that place, and the row in it.
        let slot = pass.shard_starts.partition_point(|&start| start <= place) - 1;
        let shard = pass.shards[slot];
        let row = dealt.shard_starts[shard] + (place - pass.shard_starts[slot]);
        SampleRef {
            source,
            epoch: number,
            row,
        }
    }

    /// Pass `number` of a stream: its shards in this pass's order, where
    /// each starts in the pass, and where each window starts.
    fn pass(&self, source: usize, stream: usize, number: u64) -> Pass {
        let dealt = &self.dealt[source];
        let held = &dealt.deal[stream];
        let order = Permutation::new(
            held.len() as u64,
            key(self.seed, &[PASS, source as u64, stream as u64, number]),
        );
        let shards: Vec<usize> = (0..held.len() as u64).map(|i| held[order.apply(i) as usize]).collect();
        let mut shard_starts = Vec::with_capacity(shards.len() + 1);
        let mut at = 0;
        for &shard in &shards {
            shard_starts.push(at);
            at += dealt.shard_starts[shard + 1] - dealt.shard_starts[shard];
        }
        shard_starts.push(at);
        let window_starts = shard_starts
            .iter()
            .copied()
            .step_by(self.window)
            .chain(std::iter::once(at));
        let mut window_starts: Vec<u64> = window_starts.collect();
        window_starts.dedup();
        Pass {
            number,
            shards,
            shard_starts,
            window_starts,
        }
    }
}

/// One pass of a stream, laid out.
struct Pass {
    number: u64,
    shards: Vec<usize>,
    /// Where each shard starts in the pass, and the pass's rows at the end.
    shard_starts: Vec<u64>,
    /// Where each window starts, and the pass's rows at the end.
    window_starts: Vec<u64>,
}

/// Domain tags, so the keys of different draws never meet.
const DEAL: u64 = 1;
const PASS: u64 = 2;
const WINDOW: u64 = 3;

/// A permutation key for `parts` under `seed`.
fn key(seed: u64, parts: &[u64]) -> u64 {
    parts.iter().fold(mix(seed ^ 0x5eed_0f_5a3b1e), |key, &part| {
        mix(key ^ mix(part.wrapping_add(0x9e37_79b9)))
    })
}

/// Deals a source's shards, in a seeded order, to `streams` streams: each
/// shard to the stream with the fewest rows so far (the lowest on a tie),
/// so streams differ by at most one shard's rows.
fn deal(source: &SourceSize, streams: usize, key: u64) -> SourceStreams {
    let shards = source.shard_rows.len();
    let order = Permutation::new(shards as u64, key);
    let mut deal = vec![Vec::new(); streams];
    let mut rows = vec![0u64; streams];
    for i in 0..shards as u64 {
        let shard = order.apply(i) as usize;
        if source.shard_rows[shard] == 0 {
            continue;
        }
        let stream = (0..streams).min_by_key(|&s| (rows[s], s)).expect("at least one stream");
        deal[stream].push(shard);
        rows[stream] += source.shard_rows[shard];
    }
    let mut shard_starts = Vec::with_capacity(shards + 1);
    let mut at = 0;
    for &rows in &source.shard_rows {
        shard_starts.push(at);
        at += rows;
    }
    shard_starts.push(at);
    SourceStreams {
        shard_starts,
        deal,
        rows,
    }
}

/// Splits `total` in proportion to `weights`: floors first, then the
/// largest remainders get one more (ties to the earlier source).
fn largest_remainder(weights: &[f64], total: usize) -> Vec<usize> {
    let sum: f64 = weights.iter().sum();
    let shares: Vec<f64> = weights.iter().map(|weight| weight / sum * total as f64).collect();
    let mut counts: Vec<usize> = shares.iter().map(|share| share.floor() as usize).collect();
    let mut left = total - counts.iter().sum::<usize>();
    let mut order: Vec<usize> = (0..weights.len()).collect();
    order.sort_by(|&a, &b| {
        (shares[b] - shares[b].floor())
            .total_cmp(&(shares[a] - shares[a].floor()))
            .then(a.cmp(&b))
    });
    for index in order {
        if left == 0 {
            break;
        }
        counts[index] += 1;
        left -= 1;
    }
    counts
}

/// SplitMix64's finaliser: a fast, well-mixing bijection on u64.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A keyed bijection on 0..n: a balanced Feistel network over the smallest
/// even number of bits covering n, cycle-walking until the result falls
/// inside the range (fewer than 4 rounds of walking expected, since the
/// network's domain is less than 4n).
#[derive(Debug, Clone, Copy)]
pub struct Permutation {
    n: u64,
    half_bits: u32,
    key: u64,
}

const ROUNDS: u64 = 6;

impl Permutation {
    pub fn new(n: u64, key: u64) -> Self {
        assert!(n > 0, "a permutation of nothing");
        let bits = 64 - (n - 1).leading_zeros().min(63);
        Self {
            n,
            half_bits: bits.div_ceil(2).max(1),
            key,
        }
    }

    pub fn apply(&self, index: u64) -> u64 {
        assert!(index < self.n, "index {index} outside 0..{}", self.n);
        let mut value = self.forward(index);
        while value >= self.n {
            value = self.forward(value);
        }
        value
    }

    /// The inverse of `apply`.
    pub fn invert(&self, value: u64) -> u64 {
        assert!(value < self.n, "value {value} outside 0..{}", self.n);
        let mut index = self.backward(value);
        while index >= self.n {
            index = self.backward(index);
        }
        index
    }

    fn mask(&self) -> u64 {
        (1u64 << self.half_bits) - 1
    }

    fn round(&self, round: u64, half: u64) -> u64 {
        mix(half ^ mix(self.key ^ round)) & self.mask()
    }

    fn forward(&self, value: u64) -> u64 {
        let (mut left, mut right) = (value >> self.half_bits, value & self.mask());
        for round in 0..ROUNDS {
            (left, right) = (right, left ^ self.round(round, right));
        }
        (left << self.half_bits) | right
    }

    fn backward(&self, value: u64) -> u64 {
        let (mut left, mut right) = (value >> self.half_bits, value & self.mask());
        for round in (0..ROUNDS).rev() {
            (left, right) = (right ^ self.round(round, left), left);
        }
        (left << self.half_bits) | right
    }
}

impl fmt::Display for SampleRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "source {} row {} (epoch {})", self.source, self.row, self.epoch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{HashMap, HashSet, VecDeque};

    /// Sources of one shard each.
    fn sizes(list: &[(u64, f64)]) -> Vec<SourceSize> {
        list.iter()
            .map(|&(samples, weight)| SourceSize {
                shard_rows: vec![samples],
                weight,
            })
            .collect()
    }

    fn order(seed: u64, sources: &[SourceSize], batch: usize) -> SampleOrder {
        SampleOrder::new(seed, sources, batch, Streaming::default()).unwrap()
    }

    /// The shard of `source` holding `row`.
    fn shard_of(order: &SampleOrder, source: usize, row: u64) -> usize {
        order.dealt[source].shard_starts.partition_point(|&start| start <= row) - 1
    }

    /// A source of `shards` shards of 20..60 rows.
    fn sharded(shards: usize, weight: f64) -> SourceSize {
        SourceSize {
            shard_rows: (0..shards as u64).map(|i| 20 + (i * 37) % 41).collect(),
            weight,
        }
    }

    #[test]
    fn permutations_are_bijections_on_every_range() {
        for n in [1u64, 2, 3, 4, 5, 7, 8, 9, 255, 256, 257, 1000, 4097] {
            for key in [0, 1, 0xdead_beef] {
                let permutation = Permutation::new(n, key);
                let image: HashSet<u64> = (0..n).map(|i| permutation.apply(i)).collect();
                assert_eq!(image.len() as u64, n, "n {n}, key {key}");
                assert!(image.iter().all(|&v| v < n));
                assert!((0..n).all(|i| permutation.invert(permutation.apply(i)) == i));
            }
        }
        // Different keys give different orders.
        let (a, b) = (Permutation::new(1000, 1), Permutation::new(1000, 2));
        assert!((0..1000).filter(|&i| a.apply(i) != b.apply(i)).count() > 900);
    }

    #[test]
    fn five_billion_indices_permute_in_constant_memory() {
        let n = 5_000_000_000u64;
        let permutation = Permutation::new(n, 42);
        // The whole state is three words, whatever n.
        assert_eq!(std::mem::size_of::<Permutation>(), 24);
        let mut seen = HashSet::new();
        let mut state = 7u64;
        for _ in 0..200_000 {
            state = mix(state);
            let index = state % n;
            let value = permutation.apply(index);
            assert!(value < n);
            // Inverting proves injectivity, hence bijectivity on a finite set.
            assert_eq!(permutation.invert(value), index);
            seen.insert(value);
        }
        // Spread over the range, not clustered: every tenth of it is hit.
        let tenths: HashSet<u64> = seen.iter().map(|v| v / (n / 10)).collect();
        assert_eq!(tenths.len(), 10);
        // Consecutive indices land far apart.
        let jumps = (0..1000u64)
            .filter(|&i| permutation.apply(i).abs_diff(permutation.apply(i + 1)) > n / 1000)
            .count();
        assert!(jumps > 900);
    }

    #[test]
    fn batches_mix_sources_by_largest_remainder() {
        let cases: [(&[f64], usize, &[usize]); 5] = [
            (&[0.5, 0.5], 4096, &[2048, 2048]),
            (&[1.0, 1.0, 1.0], 10, &[4, 3, 3]),
            (&[2.0, 1.0], 10, &[7, 3]),
            (&[0.7, 0.2, 0.1], 9, &[6, 2, 1]),
            (&[1.0], 7, &[7]),
        ];
        for (weights, batch, expected) in cases {
            let sources: Vec<SourceSize> = weights
                .iter()
                .map(|&weight| SourceSize {
                    shard_rows: vec![100],
                    weight,
                })
                .collect();
            let order = order(1, &sources, batch);
            assert_eq!(order.counts_per_batch(), expected, "weights {weights:?}, batch {batch}");
            let batch_samples = order.step_samples(3);
            for (source, &count) in expected.iter().enumerate() {
                assert_eq!(
                    batch_samples.iter().filter(|sample| sample.source == source).count(),
                    count
                );
            }
        }
    }

    #[test]
    fn every_sample_appears_once_per_epoch_of_its_source() {
        // Sources of different sizes cycle independently.
        let order = order(9, &sizes(&[(10, 1.0), (7, 1.0)]), 4);
        let mut per_epoch: HashMap<(usize, u64), Vec<u64>> = HashMap::new();
        for step in 0..70 {
            for sample in order.step_samples(step) {
                per_epoch
                    .entry((sample.source, sample.epoch))
                    .or_default()
                    .push(sample.row);
            }
        }
        // 70 steps x 2 draws = 140 draws per source: 14 epochs of 10, 20 of 7.
        for ((source, epoch), mut rows) in per_epoch {
            rows.sort();
            let n = [10, 7][source];
            assert_eq!(rows, (0..n).collect::<Vec<u64>>(), "source {source}, epoch {epoch}");
        }
        // Epochs are shuffled differently.
        let first: Vec<u64> = (0..5).map(|step| order.sample(step, 0).row).collect();
        let second: Vec<u64> = (5..10).map(|step| order.sample(step, 0).row).collect();
        assert_ne!(first, second);
    }

    #[test]
    fn rank_plans_partition_the_one_rank_plan() {
        let order = order(5, &sizes(&[(1000, 0.5), (333, 0.3), (77, 0.2)]), 840);
        for step in [0, 1, 17, 1_000_000] {
            let whole = order.micro_batch(step, 0, 1).unwrap();
            assert_eq!(whole, order.step_samples(step));
            for world in 1..=8 {
                if 840 % world != 0 {
                    continue;
                }
                let mut union: Vec<SampleRef> = (0..world)
                    .flat_map(|rank| order.micro_batch(step, rank, world).unwrap())
                    .collect();
                let mut expected = whole.clone();
                union.sort();
                expected.sort();
                assert_eq!(union, expected, "step {step}, world {world}");
                // Every rank gets the mix.
                let micro = order.micro_batch(step, world - 1, world).unwrap();
                assert!((0..3).all(|source| micro.iter().any(|sample| sample.source == source)));
            }
        }
    }

    #[test]
    fn the_order_is_a_pure_function_of_the_step() {
        // Resuming at any step gives the remaining order of an uninterrupted run.
        let sources = sizes(&[(50, 1.0), (20, 3.0)]);
        let uninterrupted = order(11, &sources, 8);
        let run: Vec<Vec<SampleRef>> = (0..30).map(|step| uninterrupted.step_samples(step)).collect();
        for resume_at in [0, 1, 13, 29] {
            let resumed = order(11, &sources, 8);
            for step in resume_at..30 {
                assert_eq!(resumed.step_samples(step), run[step as usize]);
            }
        }
        // Another seed is another order.
        let other = order(12, &sources, 8);
        assert_ne!(other.step_samples(0), run[0]);
    }

    #[test]
    fn bad_plans_are_clear_errors() {
        let new = |sources: &[SourceSize], batch, streams| {
            let streaming = Streaming {
                streams,
                ..Streaming::default()
            };
            SampleOrder::new(0, sources, batch, streaming).unwrap_err().to_string()
        };
        assert_eq!(new(&[], 8, None), "there are no data sources");
        assert_eq!(
            new(&sizes(&[(5, 1.0)]), 0, None),
            "the global batch must hold at least one sample"
        );
        assert_eq!(
            new(&sizes(&[(5, 1.0), (0, 1.0)]), 8, None),
            "data source 1 has no samples"
        );
        assert_eq!(
            new(&sizes(&[(5, -1.0)]), 8, None),
            "data source 0: weight -1 must be a positive number"
        );
        assert_eq!(
            new(&sizes(&[(5, 1.0), (5, 0.01)]), 8, None),
            "data source 1: weight 0.01 gives it no sample of a global batch of 8; raise its weight or the batch"
        );
        assert_eq!(
            new(&[sharded(12, 3.0), sharded(12, 1.0)], 32, Some(12)),
            "12 streams do not divide data source 1's 8 samples of every global batch"
        );
        assert_eq!(
            new(&[sharded(8, 1.0), sharded(3, 1.0)], 8, Some(4)),
            "data source 1 has 3 shards with rows, fewer than its 4 streams"
        );
        let order = order(0, &sizes(&[(5, 1.0)]), 8);
        assert_eq!(
            order.micro_batch(0, 0, 3).unwrap_err().to_string(),
            "a global batch of 8 does not split evenly between 3 ranks"
        );
        assert_eq!(
            order.micro_batch(0, 4, 4).unwrap_err().to_string(),
            "rank 4 is outside a world of 4"
        );
    }

    #[test]
    fn the_automatic_stream_count_is_the_largest_the_batch_and_the_shards_allow() {
        // Counts 48 and 16: 16 streams split both, but the second source has 12 shards.
        let sources = [sharded(100, 3.0), sharded(12, 1.0)];
        assert_eq!(order(1, &sources, 64).streams(), 8);
        let sources = [sharded(100, 3.0), sharded(40, 1.0)];
        assert_eq!(order(1, &sources, 64).streams(), 16);
        // Up to 64, whatever the shards.
        assert_eq!(order(1, &[sharded(500, 1.0)], 4096).streams(), MAX_AUTO_STREAMS);
        // Streams are balanced by rows to within one shard.
        let order = order(1, &[sharded(100, 1.0)], 64);
        let rows: Vec<u64> = (0..order.streams()).map(|s| order.dealt[0].rows[s]).collect();
        let (least, most) = (rows.iter().min().unwrap(), rows.iter().max().unwrap());
        assert!(most - least <= 60, "{rows:?}");
    }

    #[test]
    fn ranks_read_only_their_streams_and_partition_the_one_rank_plan() {
        let sources = [sharded(48, 1.0), sharded(24, 1.0)];
        let streaming = Streaming {
            streams: Some(8),
            window: 3,
        };
        let order = SampleOrder::new(3, &sources, 96, streaming).unwrap();
        for step in [0, 1, 17, 100_000] {
            let whole = order.micro_batch(step, 0, 1).unwrap();
            assert_eq!(whole, order.step_samples(step));
            for world in [1, 2, 3, 4, 6, 8] {
                let plans: Vec<Vec<SampleRef>> = (0..world)
                    .map(|rank| order.micro_batch(step, rank, world).unwrap())
                    .collect();
                let mut union: Vec<SampleRef> = plans.concat();
                let mut expected = whole.clone();
                union.sort();
                expected.sort();
                assert_eq!(union, expected, "step {step}, world {world}");
                for (rank, plan) in plans.iter().enumerate() {
                    assert_eq!(plan.len(), 96 / world);
                    assert!((0..2).all(|source| plan.iter().any(|sample| sample.source == source)));
                    if order.is_local_for(world) {
                        // Only the shards of the rank's own streams.
                        let share = 8 / world;
                        let own = |source: usize| -> Vec<usize> {
                            (rank * share..(rank + 1) * share)
                                .flat_map(|stream| order.stream_shards(source, stream).to_vec())
                                .collect()
                        };
                        for sample in plan {
                            assert!(
                                own(sample.source).contains(&shard_of(&order, sample.source, sample.row)),
                                "world {world} rank {rank}"
                            );
                        }
                    }
                }
            }
        }
        assert!(!order.is_local_for(3) && order.is_local_for(4));
    }

    #[test]
    fn every_sample_appears_once_per_pass_of_its_stream_a_window_at_a_time() {
        let sources = [sharded(40, 1.0)];
        let streaming = Streaming {
            streams: Some(4),
            window: 2,
        };
        let order = SampleOrder::new(5, &sources, 8, streaming).unwrap();
        let starts = &order.dealt[0].shard_starts;
        let stream_rows = order.dealt[0].rows.clone();
        let steps = 3 * stream_rows.iter().max().unwrap() / 2 + 2;
        let mut per_pass: HashMap<(usize, u64), Vec<u64>> = HashMap::new();
        let mut shards_at_once = 0;
        for step in 0..steps {
            let mut touched = HashSet::new();
            for stream in 0..4 {
                let samples = order.source_samples(step, 0, stream..stream + 1);
                for sample in &samples {
                    per_pass.entry((stream, sample.epoch)).or_default().push(sample.row);
                    touched.insert(shard_of(&order, 0, sample.row));
                }
            }
            shards_at_once = shards_at_once.max(touched.len());
        }
        for stream in 0..4 {
            let mut held: Vec<u64> = order
                .stream_shards(0, stream)
                .iter()
                .flat_map(|&shard| starts[shard]..starts[shard + 1])
                .collect();
            held.sort();
            // The first pass of every stream is complete; it holds each of its rows once.
            let mut rows = per_pass[&(stream, 0)].clone();
            rows.sort();
            assert_eq!(rows, held, "stream {stream}");
            // Passes are shuffled differently.
            assert_ne!(per_pass[&(stream, 0)][..8], per_pass[&(stream, 1)][..8]);
        }
        // Each step's 2 draws per stream fall in at most a window's 2 shards, or at
        // a window's edge 3: never spread over the stream's 10 shards.
        assert!(shards_at_once <= 4 * 3, "{shards_at_once}");
    }

    #[test]
    fn a_rank_with_a_few_shards_of_memory_fetches_each_shard_about_once_per_epoch() {
        // 200 shards, memory for 6 of them per rank: the loader's situation.
        let sources = [sharded(200, 1.0)];
        let streaming = Streaming {
            streams: Some(4),
            window: 1,
        };
        let order = SampleOrder::new(7, &sources, 16, streaming).unwrap();
        let epoch_steps = sources[0].samples() / 16;
        for world in [1, 2, 4] {
            let mut fetches = 0;
            for rank in 0..world {
                let mut memory: VecDeque<usize> = VecDeque::new();
                for step in 0..epoch_steps {
                    for sample in order.micro_batch(step, rank, world).unwrap() {
                        let shard = shard_of(&order, 0, sample.row);
                        if let Some(at) = memory.iter().position(|&s| s == shard) {
                            memory.remove(at);
                        } else {
                            fetches += 1;
                            if memory.len() == 6 {
                                memory.pop_front();
                            }
                        }
                        memory.push_back(shard);
                    }
                }
            }
            assert!(
                fetches as f64 <= 1.1 * 200.0,
                "world {world}: {fetches} fetches of 200 shards"
            );
        }
    }
}
