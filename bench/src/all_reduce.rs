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

/// Averages an f32 tensor of `bytes` on CUDA device `ordinal` the way
/// training averages its gradients (`model::train::gradients::reduce_mean`:
/// NCCL on the tensor's GPU memory), `warmup + iterations` times; every
/// rank must call it with the same arguments.
#[cfg(feature = "cuda")]
pub fn bench_device_reduce_mean(
    collective: &mut dyn Collective,
    bytes: usize,
    warmup: usize,
    iterations: usize,
    ordinal: usize,
) -> Result<AllReduceBenchmark, CollectiveError> {
    use burn::tensor::Tensor;
    use model::backend::Cuda;
    use model::train::gradients::{reduce_mean, DEFAULT_BUCKET_BYTES};

    let device = model::backend::device::<Cuda>(ordinal).map_err(CollectiveError::Setup)?;
    let len = bytes / size_of::<f32>();
    let mut tensor = Tensor::<Cuda, 1>::ones([len], &device);
    if collective.on_device().is_none() || device_memory(&tensor)?.is_none() {
        return Err(CollectiveError::Setup(
            "this collective does not reach the tensor's GPU memory".into(),
        ));
    }
    let mut times = Vec::with_capacity(iterations);
    for index in 0..warmup + iterations {
        collective.barrier()?;
        let start = std::time::Instant::now();
        tensor = reduce_mean(tensor, collective, DEFAULT_BUCKET_BYTES)?;
        if index >= warmup {
            times.push(start.elapsed());
        }
    }
    Ok(AllReduceBenchmark {
        bytes: len * size_of::<f32>(),
        world: collective.world_size(),
        times,
    })
}

/// Checks that NCCL's results land where `CudaMemory` says a tensor is:
/// `0, 1, .., len - 1` sent into a tensor of zeros, `bucket` values at a
/// time (a mean of ranks that all sent the same values is those values),
/// then read back through burn. Gives the number of buckets.
#[cfg(feature = "cuda")]
pub fn check_device_results_land(
    collective: &mut dyn Collective,
    len: usize,
    bucket: usize,
    ordinal: usize,
) -> Result<usize, CollectiveError> {
    use burn::tensor::{Int, Tensor};
    use model::backend::Cuda;

    let failed = |message: String| CollectiveError::Device {
        operation: "check where results land",
        message,
    };
    let device = model::backend::device::<Cuda>(ordinal).map_err(CollectiveError::Setup)?;
    let sent = Tensor::<Cuda, 1, Int>::arange(0..len as i64, &device).float();
    let received = Tensor::<Cuda, 1>::zeros([len], &device);
    let (Some(from), Some(into)) = (device_memory(&sent)?, device_memory(&received)?) else {
        return Err(failed("the tensors are not in CUDA memory".into()));
    };
    let on_device = collective
        .on_device()
        .ok_or_else(|| failed("the collective does not reach GPU memory".into()))?;
    let mut buckets = 0;
    for start in (0..len).step_by(bucket.max(1)) {
        // SAFETY: both tensors hold `len` f32 values on this device, kept
        // allocated by `from` and `into`, their writes finished.
        unsafe { on_device.all_reduce_mean_f32(from.address(start), into.address(start), bucket.min(len - start))? };
        buckets += 1;
    }
    drop((from, into));
    let values = received
        .into_data()
        .into_vec::<f32>()
        .map_err(|e| failed(format!("{e:?}")))?;
    match values.iter().enumerate().find(|&(index, &value)| value != index as f32) {
        None => Ok(buckets),
        Some((index, value)) => Err(failed(format!("value {index} reads {value}, {index} was sent"))),
    }
}

#[cfg(feature = "cuda")]
fn device_memory<B: burn::tensor::backend::Backend>(
    tensor: &burn::tensor::Tensor<B, 1>,
) -> Result<Option<model::cuda_memory::CudaMemory>, CollectiveError> {
    model::cuda_memory::CudaMemory::of(tensor).map_err(|message| CollectiveError::Device {
        operation: "reach a tensor's GPU memory",
        message,
    })
}
