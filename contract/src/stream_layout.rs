//! How many canonical streams the sample order deals each source's shards
//! to (`data.streams`). A worker reading S of them holds about S x
//! shuffle_window shards of each source at once, plus one fetched ahead;
//! when that is more than `data.shard_memory_bytes`, its loader evicts
//! shards it needs again and fetches them over and over (114x a dataset's
//! bytes in one epoch was seen). So the layout is chosen, or checked,
//! against the memory at the job's world size.

use crate::sample_order::{check_streams, MAX_AUTO_STREAMS};

/// A source as the layout sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct SourceShards {
    /// Its samples in every global batch.
    pub per_batch: usize,
    /// Its shards that hold rows.
    pub shards: usize,
    pub mean_bytes: u64,
    pub largest_bytes: u64,
}

/// What one worker holds at once under a stream count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamLayout {
    pub streams: usize,
    /// The streams each worker reads: its own when the world divides the
    /// count, every one otherwise.
    pub streams_per_worker: usize,
    /// Whether each worker reads only its own streams' shards.
    pub local: bool,
    /// Bytes of shards a worker holds at once: its streams' windows of every
    /// source, and the largest shard fetched ahead.
    pub working_set: u64,
}

impl StreamLayout {
    pub fn of(streams: usize, workers: usize, window: usize, sources: &[SourceShards]) -> Self {
        let local = workers > 0 && streams % workers == 0;
        let streams_per_worker = if local { streams / workers } else { streams };
        let windows: u64 = sources
            .iter()
            .map(|source| {
                // A stream of few shards never holds more than it has.
                let window = window.min(source.shards.div_ceil(streams.max(1))) as u64;
                streams_per_worker as u64 * window * source.mean_bytes
            })
            .sum();
        let ahead = sources.iter().map(|source| source.largest_bytes).max().unwrap_or(0);
        Self {
            streams,
            streams_per_worker,
            local,
            working_set: windows + ahead,
        }
    }
}

/// The memory settings a layout must fit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fit {
    pub workers: usize,
    pub window: usize,
    pub shard_memory_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LayoutError {
    #[error(
        "data.streams: {streams} streams make each of {workers} workers hold about {} of shards at once ({} streams x \
         data.shuffle_window = {window} shards of each source, and one fetched ahead), more than \
         data.shard_memory_bytes = {}: shards would be fetched again and again. {}, or set \
         data.accept_refetching = true",
        readable_bytes(layout.working_set),
        layout.streams_per_worker,
        readable_bytes(*memory),
        advice(*fitting, layout.working_set)
    )]
    TooLarge {
        streams: usize,
        workers: usize,
        window: usize,
        layout: StreamLayout,
        memory: u64,
        /// The most streams that would fit, if any.
        fitting: Option<usize>,
    },
    #[error(
        "data.shard_memory_bytes: {} cannot hold what a worker reads at once under any stream layout: at least {} (one stream's \
         data.shuffle_window = {window} shards of each source, and one fetched ahead). Raise it to at least \
         that, lower data.shuffle_window, or set data.accept_refetching = true",
        readable_bytes(*memory),
        readable_bytes(*smallest)
    )]
    NothingFits { memory: u64, smallest: u64, window: usize },
}

fn advice(fitting: Option<usize>, working_set: u64) -> String {
    let memory = format!(
        "raise data.shard_memory_bytes to at least {}",
        readable_bytes(working_set)
    );
    match fitting {
        Some(streams) => format!("Set data.streams = {streams} (the most that fit) or {memory}"),
        None => format!("No stream count fits: {memory}"),
    }
}

/// A size as people read it, rounded up: a size said to be needed is never short.
pub fn readable_bytes(bytes: u64) -> String {
    match bytes {
        b if b >= 10 << 20 => format!("{} MB", b.div_ceil(1 << 20)),
        b if b >= 10 << 10 => format!("{} KB", b.div_ceil(1 << 10)),
        b => format!("{b} bytes"),
    }
}

/// The stream counts the sources can be dealt to: each divides every
/// source's share of the batch, none outnumbers a source's shards, at most
/// [`MAX_AUTO_STREAMS`]; largest first.
fn candidates(sources: &[SourceShards]) -> Vec<usize> {
    let counts: Vec<usize> = sources.iter().map(|source| source.per_batch).collect();
    let fewest_shards = sources.iter().map(|source| source.shards).min().unwrap_or(1);
    (1..=MAX_AUTO_STREAMS.min(fewest_shards))
        .rev()
        .filter(|&streams| check_streams(streams, &counts).is_ok())
        .collect()
}

/// Every layout the sources can be dealt to under `fit`, most streams first.
fn layouts(sources: &[SourceShards], fit: Fit) -> Vec<StreamLayout> {
    candidates(sources)
        .into_iter()
        .map(|streams| StreamLayout::of(streams, fit.workers, fit.window, sources))
        .collect()
}

impl Fit {
    fn holds(&self, layout: &StreamLayout) -> bool {
        layout.working_set <= self.shard_memory_bytes
    }
}

/// The layout for a manifest without `data.streams`: the most streams
/// (more shards mixed in every batch) that every worker reads locally and
/// that fit its memory; a layout that fits without locality when no local
/// one can.
pub fn choose(sources: &[SourceShards], fit: Fit) -> Result<StreamLayout, LayoutError> {
    let fitting: Vec<StreamLayout> = layouts(sources, fit)
        .into_iter()
        .filter(|layout| fit.holds(layout))
        .collect();
    fitting
        .iter()
        .find(|layout| layout.local)
        .or_else(|| fitting.first())
        .copied()
        .ok_or_else(|| LayoutError::NothingFits {
            memory: fit.shard_memory_bytes,
            smallest: smallest(sources, fit).map_or(0, |layout| layout.working_set),
            window: fit.window,
        })
}

/// With re-fetching accepted: the layout holding the least at once.
pub fn smallest(sources: &[SourceShards], fit: Fit) -> Option<StreamLayout> {
    layouts(sources, fit)
        .into_iter()
        .min_by_key(|layout| (layout.working_set, std::cmp::Reverse(layout.streams)))
}

/// Checks a manifest's own `data.streams` against the memory.
pub fn check(streams: usize, sources: &[SourceShards], fit: Fit) -> Result<StreamLayout, LayoutError> {
    let layout = StreamLayout::of(streams, fit.workers, fit.window, sources);
    if fit.holds(&layout) {
        return Ok(layout);
    }
    let fitting = choose(sources, fit).ok().map(|layout| layout.streams);
    Err(LayoutError::TooLarge {
        streams,
        workers: fit.workers,
        window: fit.window,
        layout,
        memory: fit.shard_memory_bytes,
        fitting,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The trial: 240 shards of about 148 KB, 32 samples a batch.
    fn fashion() -> Vec<SourceShards> {
        vec![SourceShards {
            per_batch: 32,
            shards: 240,
            mean_bytes: 148_000,
            largest_bytes: 150_000,
        }]
    }

    fn fit(workers: usize, shard_memory_bytes: u64) -> Fit {
        Fit {
            workers,
            window: 2,
            shard_memory_bytes,
        }
    }

    #[test]
    fn the_choice_is_the_most_local_streams_that_fit() {
        // Memory for 4 shards on 2 workers: 1 stream each (2 shards of window, 1 ahead).
        let chosen = choose(&fashion(), fit(2, 600_000)).unwrap();
        assert_eq!((chosen.streams, chosen.streams_per_worker), (2, 1));
        assert_eq!(chosen.working_set, 2 * 148_000 + 150_000);
        // Plenty of memory: the old default, the most streams the batch allows.
        assert_eq!(choose(&fashion(), fit(2, 1 << 30)).unwrap().streams, 32);
        // 3 workers divide none of 32's divisors: every worker reads every stream.
        let chosen = choose(&fashion(), fit(3, 1 << 30)).unwrap();
        assert_eq!((chosen.streams, chosen.streams_per_worker), (32, 32));
        let chosen = choose(&fashion(), fit(3, 600_000)).unwrap();
        assert_eq!((chosen.streams, chosen.streams_per_worker), (1, 1));
    }

    #[test]
    fn a_layout_that_cannot_fit_is_refused_naming_what_would() {
        let error = check(32, &fashion(), fit(2, 600_000)).unwrap_err();
        assert_eq!(
            error.to_string(),
            "data.streams: 32 streams make each of 2 workers hold about 4772 KB of shards at once (16 streams x \
             data.shuffle_window = 2 shards of each source, and one fetched ahead), more than \
             data.shard_memory_bytes = 586 KB: shards would be fetched again and again. Set data.streams = 2 \
             (the most that fit) or raise data.shard_memory_bytes to at least 4772 KB, or set \
             data.accept_refetching = true"
        );
        assert_eq!(check(2, &fashion(), fit(2, 600_000)).unwrap().streams, 2);
        let error = choose(&fashion(), fit(2, 300_000)).unwrap_err();
        assert_eq!(
            error,
            LayoutError::NothingFits {
                memory: 300_000,
                smallest: 446_000,
                window: 2
            }
        );
        assert_eq!(smallest(&fashion(), fit(2, 300_000)).unwrap().streams, 2);
    }
}
