//! coca's collectives between the ranks of a data-parallel job, burn-free:
//! the [`Collective`] trait (what training needs and nothing more), the TCP
//! ring ([`tcp`]), NCCL on CUDA builds (`nccl`), and ranks as threads or
//! processes on loopback ([`loopback`]) for tests and benchmarks.

pub mod error;
pub mod loopback;
#[cfg(feature = "cuda")]
pub mod nccl;
pub mod replicas;
pub mod tcp;

pub use error::CollectiveError;

use std::ops::Range;

/// Rank `rank`'s segment of a buffer of `len` values split between `world`
/// ranks: contiguous, in rank order, lengths differing by at most one (the
/// first `len % world` segments hold one more). What a reduce-scatter
/// leaves each rank and an all-gather of segments collects.
pub fn segment(len: usize, rank: usize, world: usize) -> Range<usize> {
    let (base, extra) = (len / world, len % world);
    let start = rank * base + rank.min(extra);
    start..start + base + usize::from(rank < extra)
}

/// The world of one rank: every operation is the identity.
#[derive(Debug, Clone, Copy, Default)]
pub struct Solo;

impl Collective for Solo {
    fn rank(&self) -> usize {
        0
    }

    fn world_size(&self) -> usize {
        1
    }

    fn all_reduce_sum(&mut self, _buffer: &mut [f32]) -> Result<(), CollectiveError> {
        Ok(())
    }

    fn all_gather(&mut self, local: &[f32]) -> Result<Vec<f32>, CollectiveError> {
        Ok(local.to_vec())
    }

    fn broadcast(&mut self, _buffer: &mut [f32], _root: usize) -> Result<(), CollectiveError> {
        Ok(())
    }
}

/// Ends a collective's blocking operations from another thread: the one in
/// progress and every later one fail at once. A job that regroups while a
/// peer hangs (alive, but silent) does not wait out the timeout.
pub type Interrupt = std::sync::Arc<dyn Fn() + Send + Sync>;

/// All ranks call the same operations in the same order with buffers of the
/// same length; every call returns within the implementation's timeout,
/// with an error naming the peer when one is lost.
pub trait Collective {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;

    /// Element-wise sum over all ranks, in place. Every rank ends with the
    /// bit-identical result.
    fn all_reduce_sum(&mut self, buffer: &mut [f32]) -> Result<(), CollectiveError>;

    /// Element-wise mean over all ranks, in place.
    fn all_reduce_mean(&mut self, buffer: &mut [f32]) -> Result<(), CollectiveError> {
        self.all_reduce_sum(buffer)?;
        let scale = 1.0 / self.world_size() as f32;
        buffer.iter_mut().for_each(|value| *value *= scale);
        Ok(())
    }

    /// Element-wise sum over all ranks of this rank's [`segment`] of
    /// `buffer`, left in that segment; the rest of `buffer` is unspecified
    /// afterwards. What a sharded optimizer needs of the gradient: half an
    /// all-reduce's traffic on a ring.
    fn reduce_scatter_sum(&mut self, buffer: &mut [f32]) -> Result<(), CollectiveError> {
        self.all_reduce_sum(buffer)
    }

    /// Every rank's [`segment`] of `buffer`, copied into every rank's
    /// `buffer` (each rank's own segment is what it sends).
    fn all_gather_segments(&mut self, buffer: &mut [f32]) -> Result<(), CollectiveError> {
        let (rank, world) = (self.rank(), self.world_size());
        // Segments differ by at most one value: pad each to the longest.
        let longest = segment(buffer.len(), 0, world).len();
        let mut local = buffer[segment(buffer.len(), rank, world)].to_vec();
        local.resize(longest, 0.0);
        let gathered = self.all_gather(&local)?;
        for (owner, padded) in gathered.chunks_exact(longest.max(1)).enumerate().take(world) {
            let range = segment(buffer.len(), owner, world);
            let len = range.len();
            buffer[range].copy_from_slice(&padded[..len]);
        }
        Ok(())
    }

    /// Every rank's `local` buffer, concatenated in rank order.
    fn all_gather(&mut self, local: &[f32]) -> Result<Vec<f32>, CollectiveError>;

    /// `root`'s buffer, copied into every rank's.
    fn broadcast(&mut self, buffer: &mut [f32], root: usize) -> Result<(), CollectiveError>;

    /// Returns once every rank has called it.
    fn barrier(&mut self) -> Result<(), CollectiveError> {
        self.all_reduce_sum(&mut [0.0]).map(|_| ())
    }

    /// A way to end this collective's operations from another thread, where
    /// it has one.
    fn interrupt(&self) -> Option<Interrupt> {
        None
    }

    /// The same collective on buffers in the memory of the device it was
    /// opened on (NCCL on a CUDA build), where it can reach them.
    fn on_device(&mut self) -> Option<&mut dyn DeviceCollective> {
        None
    }
}

/// A collective's operations on device memory: a GPU's gradients reduced
/// where they are, not staged through host memory.
pub trait DeviceCollective {
    /// Element-wise mean over all ranks of the `count` f32 values at device
    /// address `send`, written to device address `recv` (the same address
    /// for in place); the result is there when this returns.
    ///
    /// # Safety
    /// Both addresses hold `count` f32 values in the memory of this
    /// collective's device, allocated for as long as the call lasts, and
    /// every write to `send` was finished before the call (its stream
    /// synchronised).
    unsafe fn all_reduce_mean_f32(&mut self, send: u64, recv: u64, count: usize) -> Result<(), CollectiveError>;
}

/// One rank standing in for rank 0 of a world of `world`, where every other
/// rank holds what it holds: the shapes and the work of a rank of that
/// world, without its peers. `coca kernels warm` compiles a job's kernels
/// with it before the job's workers start.
#[derive(Debug, Clone, Copy)]
pub struct Rehearsal {
    pub world: usize,
}

impl Collective for Rehearsal {
    fn rank(&self) -> usize {
        0
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&mut self, buffer: &mut [f32]) -> Result<(), CollectiveError> {
        let world = self.world as f32;
        buffer.iter_mut().for_each(|value| *value *= world);
        Ok(())
    }

    fn all_gather(&mut self, local: &[f32]) -> Result<Vec<f32>, CollectiveError> {
        Ok(local.repeat(self.world))
    }

    fn broadcast(&mut self, _buffer: &mut [f32], _root: usize) -> Result<(), CollectiveError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rehearsal_acts_as_a_world_of_equal_ranks() {
        let mut rehearsal = Rehearsal { world: 3 };
        assert_eq!(
            rehearsal.all_gather(&[1.0, 2.0]).unwrap(),
            [1.0, 2.0, 1.0, 2.0, 1.0, 2.0]
        );
        let mut buffer = [1.5, -2.0];
        rehearsal.all_reduce_mean(&mut buffer).unwrap();
        assert_eq!(buffer, [1.5, -2.0]);
        rehearsal.all_reduce_sum(&mut buffer).unwrap();
        assert_eq!(buffer, [4.5, -6.0]);
    }
}
