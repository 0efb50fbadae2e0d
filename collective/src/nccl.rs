//! NCCL collectives for the CUDA backend (cudarc's NCCL binding).
//!
//! Host buffers (the `Collective` trait) are staged through device memory:
//! copied to the GPU, reduced by NCCL there, copied back. Buffers already
//! on the GPU (the gradients) are reduced where they are, through
//! [`DeviceCollective`]. No GPU on CI machines: this file is compiled by CI
//! and runs only on GPU hosts (`scripts/gpu/check.sh speed` checks it).

use std::sync::Arc;

use cudarc::driver::{sys::CUdeviceptr, CudaContext, CudaStream, DevicePtr, DevicePtrMut, DeviceSlice, SyncOnDrop};
use cudarc::nccl::{Comm, Id, ReduceOp};

use super::{Collective, CollectiveError, DeviceCollective};

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

    fn on_device(&mut self) -> Option<&mut dyn DeviceCollective> {
        Some(self)
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

impl DeviceCollective for NcclCollective {
    unsafe fn all_reduce_mean_f32(&mut self, send: u64, recv: u64, count: usize) -> Result<(), CollectiveError> {
        let operation = "all-reduce on the device";
        let send = ForeignBuffer {
            address: send,
            count,
            stream: &self.stream,
        };
        let mut recv = ForeignBuffer {
            address: recv,
            count,
            stream: &self.stream,
        };
        self.comm
            .all_reduce(&send, &mut recv, &ReduceOp::Avg)
            .map_err(|error| nccl_error(operation, error))?;
        self.finish(operation)
    }
}

/// Device memory that another library allocated (burn's tensors), as
/// cudarc's NCCL calls take it. The caller orders the work around it: the
/// writes before are synchronised, the stream is after.
struct ForeignBuffer<'a> {
    address: CUdeviceptr,
    count: usize,
    stream: &'a Arc<CudaStream>,
}

impl DeviceSlice<f32> for ForeignBuffer<'_> {
    fn len(&self) -> usize {
        self.count
    }

    fn stream(&self) -> &Arc<CudaStream> {
        self.stream
    }
}

impl DevicePtr<f32> for ForeignBuffer<'_> {
    fn device_ptr<'b>(&'b self, _stream: &'b CudaStream) -> (CUdeviceptr, SyncOnDrop<'b>) {
        (self.address, SyncOnDrop::Sync(None))
    }
}

impl DevicePtrMut<f32> for ForeignBuffer<'_> {
    fn device_ptr_mut<'b>(&'b mut self, _stream: &'b CudaStream) -> (CUdeviceptr, SyncOnDrop<'b>) {
        (self.address, SyncOnDrop::Sync(None))
    }
}
