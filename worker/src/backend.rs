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
