//! Where a CUDA tensor's values lie in GPU memory, so that NCCL reduces
//! them in place. burn keeps the address behind its fusion layer and
//! cubecl's memory pool; this reaches it the way cubecl's own collectives
//! do. Compiled with the `cuda` feature; runs only where a GPU is.

use std::any::Any;

use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor, TensorPrimitive};
use burn_cubecl::cubecl::cuda::CudaRuntime;
use burn_cubecl::fusion::FusionCubeRuntime;
use burn_cubecl::CubeBackend;
use burn_fusion::FusionTensor;

/// The float tensors of coca's CUDA backend (`burn::backend::Cuda`, any
/// float precision: the primitive does not depend on it).
type CudaFusionTensor = FusionTensor<FusionCubeRuntime<CudaRuntime>>;

/// The f32 values of a contiguous CUDA tensor: their device address, kept
/// allocated while this lives, and every write to them finished.
pub struct CudaMemory {
    address: u64,
    count: usize,
    /// cubecl's hold on the allocation (its memory pool reuses it once dropped).
    _allocation: Box<dyn Any>,
}

impl CudaMemory {
    /// `tensor`'s memory when it is a contiguous f32 tensor of the CUDA
    /// backend; `None` on other backends. Waits for the work writing it.
    pub fn of<B: Backend>(tensor: &Tensor<B, 1>) -> Result<Option<Self>, String> {
        let TensorPrimitive::Float(primitive) = tensor.clone().into_primitive() else {
            return Ok(None);
        };
        let Ok(fusion) = (Box::new(primitive) as Box<dyn Any>).downcast::<CudaFusionTensor>() else {
            return Ok(None);
        };
        // `tensor` still holds the fused tensor, so resolving this clone
        // leaves its buffer registered with fusion: later operations on
        // `tensor` read what NCCL writes there.
        let client = fusion.client.clone();
        let cube = client.resolve_tensor_float::<CubeBackend<CudaRuntime, f32, i32, u8>>(*fusion);
        if cube.dtype != DType::F32 || !cube.is_contiguous() {
            return Err(format!(
                "a {:?} tensor{} cannot be reduced in place",
                cube.dtype,
                if cube.is_contiguous() { "" } else { " with strides" }
            ));
        }
        burn_cubecl::cubecl::future::block_on(cube.client.sync()).map_err(|e| format!("{e:?}"))?;
        let allocation = cube
            .client
            .get_resource(cube.handle.clone())
            .map_err(|e| format!("{e:?}"))?;
        Ok(Some(Self {
            address: allocation.resource().ptr,
            count: cube.meta.shape().num_elements(),
            _allocation: Box::new(allocation),
        }))
    }

    /// The device address of value `offset`.
    pub fn address(&self, offset: usize) -> u64 {
        debug_assert!(offset <= self.count);
        self.address + (offset * size_of::<f32>()) as u64
    }
}
