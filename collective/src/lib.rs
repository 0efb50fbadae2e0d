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
