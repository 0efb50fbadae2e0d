//! NCCL collectives for the CUDA backend (cudarc's NCCL binding).
//!
//! This implements the host-buffer `Collective` trait by staging through
//! device memory: each call copies the buffer to the GPU, runs the NCCL
//! collective there, and copies the result back. Gradients live on the GPU
//! already, so the copies are overhead a device-buffer path would remove;
//! it is measured where a GPU is lent, not here (no GPU on CI machines, so
//! this file is compiled by CI but runs only on GPU hosts).

use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaStream};
use cudarc::nccl::{Comm, Id, ReduceOp};

use super::{Collective, CollectiveError};

/// Bytes in an NCCL unique id; it travels between processes as bytes.
const UNIQUE_ID_BYTES: usize = 128;

pub struct NcclCollective {
    comm: Comm,
    stream: Arc<CudaStream>,
}

fn nccl_error(operation: &'static str, error: impl std::fmt::Debug) -> CollectiveError {
    CollectiveError::Device {
        operation,
        message: format!("{error:?}"),
    }
}

impl NcclCollective {
    /// A new unique id, as bytes to hand to the other ranks.
    pub fn unique_id() -> Result<Vec<u8>, CollectiveError> {
        let id = Id::new().map_err(|error| nccl_error("create the NCCL id", error))?;
        Ok(id.internal().iter().map(|&c| c as u8).collect())
    }

    /// Joins the communicator of unique id `id` (bytes from [`Self::unique_id`])
    /// as `rank` of `world`, on GPU `device`.
    pub fn new(device: usize, rank: usize, world: usize, id: &[u8]) -> Result<Self, CollectiveError> {
        if id.len() != UNIQUE_ID_BYTES {
            return Err(CollectiveError::Setup(format!(
                "an NCCL unique id has {UNIQUE_ID_BYTES} bytes, this one {}",
                id.len()
            )));
        }
        let mut internal = [0 as std::ffi::c_char; UNIQUE_ID_BYTES];
        internal
            .iter_mut()
            .zip(id)
            .for_each(|(c, &b)| *c = b as std::ffi::c_char);
        let context = CudaContext::new(device).map_err(|error| nccl_error("open the GPU", error))?;
        let stream = context.default_stream();
        let comm = Comm::from_rank(stream.clone(), rank, world, Id::uninit(internal))
            .map_err(|error| nccl_error("join the NCCL communicator", error))?;
        Ok(Self { comm, stream })
    }

    fn finish(&self, operation: &'static str) -> Result<(), CollectiveError> {
        self.stream.synchronize().map_err(|error| nccl_error(operation, error))
    }
}

impl Collective for NcclCollective {
    fn rank(&self) -> usize {
        self.comm.rank()
    }

    fn world_size(&self) -> usize {
        self.comm.world_size()
    }

    fn all_reduce_sum(&mut self, buffer: &mut [f32]) -> Result<(), CollectiveError> {
        let operation = "all-reduce";
        let mut device = self
            .stream
            .clone_htod(buffer)
            .map_err(|error| nccl_error(operation, error))?;
        self.comm
            .all_reduce_in_place(&mut device, &ReduceOp::Sum)
            .map_err(|error| nccl_error(operation, error))?;
        self.stream
            .memcpy_dtoh(&device, buffer)
            .map_err(|error| nccl_error(operation, error))?;
        self.finish(operation)
    }

    fn all_gather(&mut self, local: &[f32]) -> Result<Vec<f32>, CollectiveError> {
        let operation = "all-gather";
        let source = self
            .stream
            .clone_htod(local)
            .map_err(|error| nccl_error(operation, error))?;
        let mut gathered = self
            .stream
            .alloc_zeros::<f32>(local.len() * self.world_size())
            .map_err(|error| nccl_error(operation, error))?;
        self.comm
            .all_gather(&source, &mut gathered)
            .map_err(|error| nccl_error(operation, error))?;
        let values = self
            .stream
            .clone_dtoh(&gathered)
            .map_err(|error| nccl_error(operation, error))?;
        self.finish(operation)?;
        Ok(values)
    }

    fn broadcast(&mut self, buffer: &mut [f32], root: usize) -> Result<(), CollectiveError> {
        let operation = "broadcast";
        if root >= self.world_size() {
            return Err(CollectiveError::Setup(format!(
                "broadcast root {root} is outside a world of {}",
                self.world_size()
            )));
        }
        let mut device = self
            .stream
            .clone_htod(buffer)
            .map_err(|error| nccl_error(operation, error))?;
        self.comm
            .broadcast_in_place(&mut device, root as i32)
            .map_err(|error| nccl_error(operation, error))?;
        self.stream
            .memcpy_dtoh(&device, buffer)
            .map_err(|error| nccl_error(operation, error))?;
        self.finish(operation)
    }
}
