//! The burn backends coca runs on.

use burn::backend::Autodiff;

/// CPU: tests, CI, laptops.
pub type Cpu = burn::backend::Flex;
/// CPU with gradients, for training.
pub type CpuTrain = Autodiff<Cpu>;

/// CUDA: clusters. Compiled with the `cuda` feature; runs where a GPU exists.
#[cfg(feature = "cuda")]
pub type Cuda = burn::backend::Cuda;
#[cfg(feature = "cuda")]
pub type CudaTrain = Autodiff<Cuda>;

/// wgpu: Vulkan (Linux, Windows) or Metal (macOS) GPUs of any vendor.
pub type Wgpu = burn::backend::Wgpu;
pub type WgpuTrain = Autodiff<Wgpu>;

/// Device `ordinal` of backend `B` (a GPU's index; the CPU backend has one).
pub fn device<B: burn::tensor::backend::Backend>(ordinal: usize) -> Result<B::Device, String> {
    use burn::tensor::backend::Device as _;
    let mut id = B::Device::default().to_id();
    id.index_id = u16::try_from(ordinal).map_err(|_| format!("device {ordinal} does not exist"))?;
    Ok(B::Device::from_id(id))
}

/// The name of CUDA device `ordinal` (`NVIDIA H200`), as the driver gives it.
#[cfg(feature = "cuda")]
pub fn cuda_device_name(ordinal: usize) -> Result<String, String> {
    use cudarc::driver::result;
    let ordinal = std::ffi::c_int::try_from(ordinal).map_err(|_| format!("device {ordinal} does not exist"))?;
    result::init()
        .and_then(|()| result::device::get(ordinal))
        .and_then(result::device::get_name)
        .map_err(|e| format!("CUDA device {ordinal}: {e}"))
}
