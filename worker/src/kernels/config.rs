//! The cubecl runtime configuration a CUDA worker runs with: the manifest's
//! `[gpu]` section, set once in the process before the first kernel, so that
//! no `cubecl.toml` in the working directory or environment variable changes
//! what a job does.

use std::path::Path;
use std::sync::Arc;

use contract::manifest::{AutotuneLevel, Gpu};
use cubecl_common::config::logger::LogCrateLevel;
use cubecl_runtime::config::autotune::AutotuneLevel as CubeclAutotune;
use cubecl_runtime::config::cache::CacheConfig;
use cubecl_runtime::config::compilation::CompilationLogLevel;
use cubecl_runtime::config::{CubeClRuntimeConfig, RuntimeConfig};

use super::error::KernelError;

/// cubecl's configuration for `gpu`, with compiled kernels and autotune
/// results kept under `cache_dir`.
pub fn runtime_config(gpu: &Gpu, cache_dir: &Path) -> CubeClRuntimeConfig {
    let mut config = CubeClRuntimeConfig::default();
    config.autotune.level = match gpu.autotune {
        AutotuneLevel::Minimal => CubeclAutotune::Minimal,
        AutotuneLevel::Balanced => CubeclAutotune::Balanced,
        AutotuneLevel::Extensive => CubeclAutotune::Extensive,
        AutotuneLevel::Full => CubeclAutotune::Full,
    };
    config.autotune.cache = CacheConfig::File(cache_dir.to_path_buf());
    config.compilation.cache = Some(CacheConfig::File(cache_dir.to_path_buf()));
    if gpu.log_compilations {
        // Each compilation becomes a `log` record, which `Compilations` counts.
        config.compilation.logger.level = CompilationLogLevel::Basic;
        config.compilation.logger.log = Some(LogCrateLevel::Info);
    }
    config
}

/// Makes `config` the process's cubecl configuration. cubecl reads its
/// configuration once, on first use, and never again: this must run before
/// the first tensor is made on a cubecl device.
pub fn install(config: CubeClRuntimeConfig) -> Result<(), KernelError> {
    let mut slot = CubeClRuntimeConfig::storage().lock();
    if slot.is_some() {
        return Err(KernelError::ConfigAlreadyRead);
    }
    *slot = Some(Arc::new(config));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gpu(autotune: AutotuneLevel, log_compilations: bool) -> Gpu {
        Gpu {
            autotune,
            kernel_cache: "unused".into(),
            log_compilations,
        }
    }

    #[test]
    fn the_manifest_settings_become_cubecl_settings() {
        let dir = Path::new("/tmp/kernels");
        let config = runtime_config(&gpu(AutotuneLevel::Extensive, true), dir);
        assert!(matches!(config.autotune.level, CubeclAutotune::Extensive));
        assert!(matches!(&config.autotune.cache, CacheConfig::File(path) if path == dir));
        assert!(matches!(&config.compilation.cache, Some(CacheConfig::File(path)) if path == dir));
        assert!(matches!(config.compilation.logger.level, CompilationLogLevel::Basic));
        assert_eq!(config.compilation.logger.log, Some(LogCrateLevel::Info));
        // Nothing printed by cubecl itself: the worker reports the counts.
        assert!(!config.compilation.logger.stderr && !config.compilation.logger.stdout);

        let quiet = runtime_config(&gpu(AutotuneLevel::Minimal, false), dir);
        assert!(matches!(quiet.autotune.level, CubeclAutotune::Minimal));
        assert!(matches!(quiet.compilation.logger.level, CompilationLogLevel::Disabled));
        assert_eq!(quiet.compilation.logger.log, None);
    }
}
