//! All-reduce bandwidth between ranks (`coca bench allreduce`).

use std::time::Duration;

use collective::{Collective, CollectiveError};

/// Timings of repeated all-reduces of one buffer.
#[derive(Debug, Clone)]
pub struct AllReduceBenchmark {
    pub bytes: usize,
    pub world: usize,
    /// Wall time of each measured all-reduce.
    pub times: Vec<Duration>,
}

impl AllReduceBenchmark {
    pub fn median(&self) -> Duration {
        crate::median(self.times.clone())
    }
}

/// (algorithm, bus) bandwidth in bytes per second of an all-reduce of
/// `bytes` over `world` ranks taking `time`. Bus bandwidth is what
/// nccl-tests reports: algorithm bandwidth (size over time) times
/// 2 (n - 1) / n, the share of the buffer each rank sends and receives,
/// comparable across world sizes.
pub fn all_reduce_bandwidth(bytes: usize, world: usize, time: Duration) -> (f64, f64) {
    let algorithm = bytes as f64 / time.as_secs_f64();
    let n = world as f64;
    (algorithm, algorithm * 2.0 * (n - 1.0) / n)
}

/// All-reduces a buffer of `bytes` (f32) `warmup + iterations` times; every
/// rank must call it with the same arguments.
pub fn bench_all_reduce(
    collective: &mut dyn Collective,
    bytes: usize,
    warmup: usize,
    iterations: usize,
) -> Result<AllReduceBenchmark, CollectiveError> {
    let mut buffer = vec![1.0f32; bytes / size_of::<f32>()];
    let mut times = Vec::with_capacity(iterations);
    for index in 0..warmup + iterations {
        collective.barrier()?;
        let start = std::time::Instant::now();
        collective.all_reduce_sum(&mut buffer)?;
        if index >= warmup {
            times.push(start.elapsed());
        }
    }
    Ok(AllReduceBenchmark {
        bytes: buffer.len() * size_of::<f32>(),
        world: collective.world_size(),
        times,
    })
}

/// This machine's single-threaded memcpy bandwidth (bytes per second) on a
/// buffer of `bytes`: the ceiling for moving data between processes.
pub fn memcpy_bandwidth(bytes: usize, iterations: usize) -> f64 {
    let source = vec![1u8; bytes];
    let mut target = vec![0u8; bytes];
    target.copy_from_slice(&source);
    let mut times: Vec<Duration> = (0..iterations.max(1))
        .map(|_| {
            let start = std::time::Instant::now();
            target.copy_from_slice(std::hint::black_box(&source));
            std::hint::black_box(&target);
            start.elapsed()
        })
        .collect();
    times.sort();
    bytes as f64 / times[times.len() / 2].as_secs_f64()
}
