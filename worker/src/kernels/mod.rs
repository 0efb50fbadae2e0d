//! GPU kernels: how cubecl compiles and tunes them for a job (`config`),
//! the job's shared cache of both (`cache`), counting compilations so
//! that a worker can say what its first steps spent their time on
//! (`compilations`), the wgpu backend's adapters (`adapter`), and what can
//! go wrong in any of them (`error`).

pub mod adapter;
pub mod cache;
pub mod compilations;
pub mod config;
mod error;
pub mod warm;

use contract::manifest::Gpu;
use store::{Store, StoreOptions};

use self::cache::KernelCache;
use self::compilations::Compilations;
pub use self::error::KernelError;

/// A GPU worker's kernel set-up, made before its first kernel.
pub struct Kernels {
    /// None when the shared cache could not be read: the job runs, cold.
    cache: Option<KernelCache>,
    compilations: Option<&'static Compilations>,
    /// Where cubecl keeps this process's copy of the caches.
    _local: tempfile::TempDir,
    /// Files the shared cache held at start.
    pub fetched: usize,
    /// When the set-up began: the worker's start, as far as its GPU goes.
    pub prepared_at: std::time::Instant,
    /// Compilations counted when the last step ended.
    compiled_before: u64,
}

impl Kernels {
    /// [`Kernels::prepare`] for CUDA device `device`, named as its driver
    /// names it: what a CUDA worker and `coca bench step --backend cuda`
    /// both do before their first kernel. Returns the device's name too.
    #[cfg(feature = "cuda")]
    pub fn prepare_cuda(gpu: &Gpu, options: &StoreOptions, device: usize) -> Result<(Self, String), KernelError> {
        let prepared_at = std::time::Instant::now();
        let local = local_dir()?;
        // The driver's own cache of the machine code it makes from cubecl's
        // PTX lives in the job's kernel cache too, so a warm start skips that
        // step as well. The driver reads these at its first call, which the
        // device's name is.
        std::env::set_var("CUDA_CACHE_PATH", local.path().join(DRIVER_CACHE));
        std::env::set_var("CUDA_CACHE_MAXSIZE", DRIVER_CACHE_BYTES.to_string());
        let name = model::backend::cuda_device_name(device).map_err(KernelError::Device)?;
        let kernels = Self::prepare_in(local, prepared_at, gpu, options, device, &name)?;
        kernels.log_prepared(gpu, &format!("{name} (device {device})"));
        Ok((kernels, name))
    }

    /// [`Kernels::prepare`] for wgpu adapter `ordinal`: what a wgpu worker
    /// and `coca bench step --backend wgpu` do before their first kernel.
    /// Returns the adapter too.
    pub fn prepare_wgpu(
        gpu: &Gpu,
        options: &StoreOptions,
        ordinal: usize,
    ) -> Result<(Self, adapter::WgpuAdapter), KernelError> {
        let prepared_at = std::time::Instant::now();
        let local = local_dir()?;
        // Mesa's Vulkan drivers (RADV, ANV, lavapipe) keep what they compile
        // from SPIR-V on disk: in the job's kernel cache, like CUDA's. Read
        // when the device opens, after this.
        std::env::set_var("MESA_SHADER_CACHE_DIR", local.path().join(DRIVER_CACHE));
        std::env::set_var("MESA_SHADER_CACHE_MAX_SIZE", DRIVER_CACHE_BYTES.to_string());
        let adapter = adapter::wgpu_adapter(ordinal)?;
        // cubecl names its autotune folders after the device's place among adapters of its type.
        let place = usize::from(cubecl_common::device::Device::to_id(&adapter.device).index_id);
        let kernels = Self::prepare_in(local, prepared_at, gpu, options, place, &adapter.name)?;
        kernels.log_prepared(
            gpu,
            &format!("{} ({}, wgpu device {ordinal})", adapter.name, adapter.api),
        );
        Ok((kernels, adapter))
    }

    fn log_prepared(&self, gpu: &Gpu, device: &str) {
        tracing::info!(
            "{device}, autotune {:?}; kernel cache {}: {} files in {:.1} s",
            gpu.autotune,
            gpu.kernel_cache,
            self.fetched,
            self.prepared_at.elapsed().as_secs_f64()
        );
    }

    /// Fetches the job's kernel cache for GPU model `device_name`, points
    /// cubecl at it with the manifest's settings, and starts counting
    /// compilations if asked to.
    pub fn prepare(gpu: &Gpu, options: &StoreOptions, device: usize, device_name: &str) -> Result<Self, KernelError> {
        let prepared_at = std::time::Instant::now();
        Self::prepare_in(local_dir()?, prepared_at, gpu, options, device, device_name)
    }

    fn prepare_in(
        local: tempfile::TempDir,
        prepared_at: std::time::Instant,
        gpu: &Gpu,
        options: &StoreOptions,
        device: usize,
        device_name: &str,
    ) -> Result<Self, KernelError> {
        let shared = Store::open(&gpu.kernel_cache, options)
            .map_err(|source| KernelError::Shared {
                url: gpu.kernel_cache.clone(),
                source,
            })?
            .at(&folder_name(device_name));
        // A cache that cannot be read costs time, not the job.
        let (cache, fetched) = match KernelCache::fetch(shared, local.path(), device) {
            Ok((cache, fetched)) => (Some(cache), fetched),
            Err(error) => {
                tracing::warn!("{error}; compiling every kernel afresh");
                (None, 0)
            }
        };
        config::install(config::runtime_config(gpu, local.path()))?;
        let compilations = gpu.log_compilations.then(Compilations::install).transpose()?;
        Ok(Self {
            cache,
            compilations,
            _local: local,
            fetched,
            prepared_at,
            compiled_before: 0,
        })
    }

    /// Logs what the step just done compiled: always after the run's first
    /// step, then only when a step compiles (steady steps compile nothing; a
    /// kernel specialised on a value that changes every step shows here).
    /// Rank 0 shares the cache after the first step.
    pub fn after_step(&mut self, rank: usize, step: u64, first: bool, seconds: f64) {
        let now = self.compiled();
        let count = now.map_or("not counted".to_string(), |now| {
            format!("{} compiled", now - self.compiled_before)
        });
        if first {
            tracing::info!(
                "rank {rank}: first step in {seconds:.1} s, {:.1} s after the kernel set-up (kernels: {count})",
                self.prepared_at.elapsed().as_secs_f64()
            );
            if rank == 0 {
                self.publish();
            }
        } else if now.is_some_and(|now| now > self.compiled_before) {
            tracing::info!("rank {rank}: step {step}: kernels {count} in {seconds:.1} s");
        }
        self.compiled_before = now.unwrap_or(0);
    }

    /// Kernels compiled so far, when counted.
    pub fn compiled(&self) -> Option<u64> {
        self.compilations.map(Compilations::total)
    }

    /// Shares what this worker compiled and tuned; returns how many files.
    /// A failure is reported, not fatal.
    pub fn publish(&mut self) -> usize {
        match self.cache.as_mut().map(KernelCache::publish) {
            Some(Ok(files)) => {
                if files > 0 {
                    tracing::info!("kernel cache: {files} files shared");
                }
                files
            }
            Some(Err(error)) => {
                tracing::warn!("{error}");
                0
            }
            None => 0,
        }
    }
}

/// The driver's compiled-kernel cache, a folder of the local cache.
const DRIVER_CACHE: &str = "driver";
/// At most this much of it (the drivers' defaults are smaller: CUDA's 256 MiB).
const DRIVER_CACHE_BYTES: u64 = 4 << 30;

/// This process's copy of the kernel cache, where cubecl and the driver keep theirs.
fn local_dir() -> Result<tempfile::TempDir, KernelError> {
    tempfile::Builder::new()
        .prefix("coca-kernels-")
        .tempdir()
        .map_err(|source| KernelError::Local {
            path: std::env::temp_dir().display().to_string(),
            source,
        })
}

/// A folder name for a GPU model (`NVIDIA H200` -> `NVIDIA-H200`): kernels
/// compiled or tuned for one model are not used on another.
pub fn folder_name(device_name: &str) -> String {
    let name: String = device_name
        .trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '_' {
                c
            } else {
                '-'
            }
        })
        .collect();
    if name.chars().all(|c| c == '.') {
        "unnamed-device".into()
    } else {
        name
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpu_models_name_their_folders() {
        assert_eq!(folder_name("NVIDIA H200"), "NVIDIA-H200");
        assert_eq!(folder_name("NVIDIA A100-SXM4-80GB"), "NVIDIA-A100-SXM4-80GB");
        assert_eq!(folder_name(" ../x/ "), "..-x-");
        assert_eq!(folder_name(""), "unnamed-device");
        assert_eq!(folder_name(".."), "unnamed-device");
    }
}
