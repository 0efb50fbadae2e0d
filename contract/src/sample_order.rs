//! The global sample order: which samples every rank reads at every step.
//!
//! A pure function of the seed, the sources (their sizes and mixing
//! weights), the global batch, the step and the rank: nothing but the step
//! cursor is ever stored, so a resumed job, on any number of ranks, reads
//! exactly what an uninterrupted one would have.
//!
//! - Each global batch holds a fixed count of each source, the weights'
//!   shares of the batch rounded by largest remainder.
//! - Source k's draws form one endless stream: draw t is sample
//!   `permutation(seed, k, epoch)(t mod n_k)` of epoch `t / n_k`, so every
//!   sample of a source appears exactly once per epoch of that source, and
//!   sources of different sizes cycle independently.
//! - A permutation is a keyed Feistel network over the index range (with
//!   cycle walking), so a lookup takes O(1) time and memory whatever the
//!   source size.
//! - Rank r of N takes the global batch's positions r, r + N, r + 2N, ...:
//!   the N plans partition the one-rank plan, and every rank gets the mix.

use std::fmt;

use crate::dataset::DatasetIndex;
use crate::manifest::Manifest;

/// One sample: a row of a source, and the source's epoch it is drawn in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SampleRef {
    pub source: usize,
    pub epoch: u64,
    pub row: u64,
}

/// A source as the order sees it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SourceSize {
    /// Rows in the source.
    pub samples: u64,
    /// Relative share of every global batch.
    pub weight: f64,
}

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
    #[error("a global batch of {batch} does not split evenly between {world} ranks")]
    Indivisible { batch: usize, world: usize },
    #[error("rank {rank} is outside a world of {world}")]
    RankOutOfRange { rank: usize, world: usize },
}

#[derive(Debug, Clone)]
pub struct SampleOrder {
    seed: u64,
    sources: Vec<SourceSize>,
    /// Samples of each source in every global batch.
    counts: Vec<usize>,
    batch: usize,
}

impl SampleOrder {
    pub fn new(seed: u64, sources: &[SourceSize], batch: usize) -> Result<Self, SampleOrderError> {
        if sources.is_empty() {
            return Err(SampleOrderError::NoSources);
        }
        if batch == 0 {
            return Err(SampleOrderError::EmptyBatch);
        }
        for (source, size) in sources.iter().enumerate() {
            if size.samples == 0 {
                return Err(SampleOrderError::EmptySource { index: source });
            }
            if !(size.weight.is_finite() && size.weight > 0.0) {
                return Err(SampleOrderError::BadWeight {
                    index: source,
                    weight: size.weight,
                });
            }
        }
        let weights: Vec<f64> = sources.iter().map(|size| size.weight).collect();
        let counts = largest_remainder(&weights, batch);
        if let Some(source) = counts.iter().position(|&count| count == 0) {
            return Err(SampleOrderError::StarvedSource {
                index: source,
                weight: sources[source].weight,
                batch,
            });
        }
        Ok(Self {
            seed,
            sources: sources.to_vec(),
            counts,
            batch,
        })
    }

    /// The order of a job: its seed, mix and global batch over the pinned
    /// indexes of its sources (one per `data.source`, in order).
    pub fn for_job(manifest: &Manifest, indexes: &[DatasetIndex]) -> Result<Self, SampleOrderError> {
        let sizes: Vec<SourceSize> = indexes
            .iter()
            .zip(&manifest.data.sources)
            .map(|(index, source)| SourceSize {
                samples: index.rows(),
                weight: source.weight,
            })
            .collect();
        Self::new(manifest.job.seed, &sizes, manifest.train.global_batch)
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
            .map(|(&samples, size)| samples as f64 / size.samples as f64)
            .collect()
    }

    /// Samples of each source in every global batch.
    pub fn counts_per_batch(&self) -> &[usize] {
        &self.counts
    }

    pub fn global_batch(&self) -> usize {
        self.batch
    }

    /// The sample at `position` (0..global batch) of global step `step`.
    /// Positions hold source 0's samples first, then source 1's, ...
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
        let samples = self.sources[source].samples;
        let draw = step * self.counts[source] as u64 + position as u64;
        let (epoch, offset) = (draw / samples, draw % samples);
        let permutation = Permutation::new(samples, self.key(source, epoch));
        SampleRef {
            source,
            epoch,
            row: permutation.apply(offset),
        }
    }

    /// The whole global batch of `step`, in position order.
    pub fn step_samples(&self, step: u64) -> Vec<SampleRef> {
        (0..self.batch).map(|position| self.sample(step, position)).collect()
    }

    /// Rank `rank` of `world`'s micro-batch at `step`: positions rank,
    /// rank + world, rank + 2 world, ... of the global batch.
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
        Ok((rank..self.batch)
            .step_by(world)
            .map(|position| self.sample(step, position))
            .collect())
    }

    fn key(&self, source: usize, epoch: u64) -> u64 {
        mix(mix(self.seed ^ 0x5eed_0f_5a3b1e) ^ mix(source as u64 + 1) ^ mix(epoch.wrapping_add(0x9e37_79b9)))
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
    use std::collections::{HashMap, HashSet};

    fn sizes(list: &[(u64, f64)]) -> Vec<SourceSize> {
        list.iter()
            .map(|&(samples, weight)| SourceSize { samples, weight })
            .collect()
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
                .map(|&weight| SourceSize { samples: 100, weight })
                .collect();
            let order = SampleOrder::new(1, &sources, batch).unwrap();
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
        let order = SampleOrder::new(9, &sizes(&[(10, 1.0), (7, 1.0)]), 4).unwrap();
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
        let order = SampleOrder::new(5, &sizes(&[(1000, 0.5), (333, 0.3), (77, 0.2)]), 840).unwrap();
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
        let uninterrupted = SampleOrder::new(11, &sources, 8).unwrap();
        let run: Vec<Vec<SampleRef>> = (0..30).map(|step| uninterrupted.step_samples(step)).collect();
        for resume_at in [0, 1, 13, 29] {
            let resumed = SampleOrder::new(11, &sources, 8).unwrap();
            for step in resume_at..30 {
                assert_eq!(resumed.step_samples(step), run[step as usize]);
            }
        }
        // Another seed is another order.
        let other = SampleOrder::new(12, &sources, 8).unwrap();
        assert_ne!(other.step_samples(0), run[0]);
    }

    #[test]
    fn bad_plans_are_clear_errors() {
        assert_eq!(SampleOrder::new(0, &[], 8).unwrap_err(), SampleOrderError::NoSources);
        assert_eq!(
            SampleOrder::new(0, &sizes(&[(5, 1.0)]), 0).unwrap_err(),
            SampleOrderError::EmptyBatch
        );
        assert_eq!(
            SampleOrder::new(0, &sizes(&[(5, 1.0), (0, 1.0)]), 8)
                .unwrap_err()
                .to_string(),
            "data source 1 has no samples"
        );
        assert_eq!(
            SampleOrder::new(0, &sizes(&[(5, -1.0)]), 8).unwrap_err().to_string(),
            "data source 0: weight -1 must be a positive number"
        );
        assert_eq!(
            SampleOrder::new(0, &sizes(&[(5, 1.0), (5, 0.01)]), 8)
                .unwrap_err()
                .to_string(),
            "data source 1: weight 0.01 gives it no sample of a global batch of 8; raise its weight or the batch"
        );
        let order = SampleOrder::new(0, &sizes(&[(5, 1.0)]), 8).unwrap();
        assert_eq!(
            order.micro_batch(0, 0, 3).unwrap_err().to_string(),
            "a global batch of 8 does not split evenly between 3 ranks"
        );
        assert_eq!(
            order.micro_batch(0, 4, 4).unwrap_err().to_string(),
            "rank 4 is outside a world of 4"
        );
    }
}
