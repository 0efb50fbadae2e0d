//! The job's kernel cache through a real (file) object store, and the
//! manifest's [gpu] settings reaching cubecl's process-wide configuration.

use std::path::Path;

use contract::manifest::{AutotuneLevel, Gpu};
use cubecl_runtime::config::autotune::AutotuneLevel as CubeclAutotune;
use cubecl_runtime::config::cache::CacheConfig;
use cubecl_runtime::config::{CubeClRuntimeConfig, RuntimeConfig};
use store::{Store, StoreOptions};
use worker::kernels::cache::KernelCache;
use worker::kernels::{KernelError, Kernels};

const TUNED: &str = "autotune/0.10.0/device-0-3-cuda/burn_cubecl-matmul.json.log";
const PTX: &str = "cuda/0.10.0/ptx/chunk0.cbor";

fn write(dir: &Path, name: &str, bytes: &[u8]) {
    let path = dir.join(name);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, bytes).unwrap();
}

fn shared_names(store: &Store) -> Vec<String> {
    store.list("").unwrap().into_iter().map(|o| o.name).collect()
}

#[test]
fn what_one_worker_compiles_the_next_one_starts_with() {
    let shared_dir = tempfile::tempdir().unwrap();
    let shared = Store::open(&shared_dir.path().display().to_string(), &StoreOptions::default())
        .unwrap()
        .at("NVIDIA-H200");

    // The first worker of the job (GPU 3) finds nothing, then compiles and tunes.
    let first = tempfile::tempdir().unwrap();
    let (mut cache, fetched) = KernelCache::fetch(shared.clone(), first.path(), 3).unwrap();
    assert_eq!(fetched, 0);
    write(first.path(), TUNED, b"{\"key\":1}\n");
    write(first.path(), PTX, b"ptx bytes");
    write(first.path(), &format!("{TUNED}.lock"), b"");
    assert_eq!(cache.publish().unwrap(), 2, "the lock file stays local");
    assert_eq!(
        shared_names(&shared),
        [
            "autotune/0.10.0/device-0-any-cuda/burn_cubecl-matmul.json.log",
            "cuda/0.10.0/ptx/chunk0.cbor"
        ]
    );
    assert_eq!(cache.publish().unwrap(), 0, "nothing changed, nothing sent");
    write(first.path(), TUNED, b"{\"key\":1}\n{\"key\":2}\n");
    assert_eq!(cache.publish().unwrap(), 1);

    // A worker on GPU 5, or a restart, starts with all of it, under its own ordinal.
    let second = tempfile::tempdir().unwrap();
    let (mut cache, fetched) = KernelCache::fetch(shared.clone(), second.path(), 5).unwrap();
    assert_eq!(fetched, 2);
    assert_eq!(
        std::fs::read(
            second
                .path()
                .join("autotune/0.10.0/device-0-5-cuda/burn_cubecl-matmul.json.log")
        )
        .unwrap(),
        b"{\"key\":1}\n{\"key\":2}\n"
    );
    assert_eq!(std::fs::read(second.path().join(PTX)).unwrap(), b"ptx bytes");
    assert_eq!(cache.publish().unwrap(), 0, "what was fetched is not sent back");
}

#[test]
fn the_gpu_settings_reach_cubecl_once_with_the_fetched_cache() {
    let shared_dir = tempfile::tempdir().unwrap();
    write(&shared_dir.path().join("NVIDIA-H200"), PTX, b"ptx bytes");
    let gpu = Gpu {
        autotune: AutotuneLevel::Balanced,
        kernel_cache: shared_dir.path().display().to_string(),
        log_compilations: true,
    };
    let kernels = Kernels::prepare(&gpu, &StoreOptions::default(), 0, "NVIDIA H200").unwrap();
    assert_eq!(kernels.fetched, 1);
    assert_eq!(kernels.compiled(), Some(0));

    let config = CubeClRuntimeConfig::get();
    assert!(matches!(config.autotune.level, CubeclAutotune::Balanced));
    let Some(CacheConfig::File(local)) = &config.compilation.cache else {
        panic!("the compilation cache is a directory: {:?}", config.compilation.cache);
    };
    assert!(matches!(&config.autotune.cache, CacheConfig::File(dir) if dir == local));
    assert_eq!(
        std::fs::read(local.join(PTX)).unwrap(),
        b"ptx bytes",
        "cubecl reads what was fetched"
    );

    // cubecl reads its configuration once: a second set-up is refused, not ignored.
    let again = Kernels::prepare(&gpu, &StoreOptions::default(), 0, "NVIDIA H200");
    assert!(matches!(again, Err(KernelError::ConfigAlreadyRead)));
}

#[test]
fn an_unusable_kernel_cache_url_is_an_error_naming_the_field() {
    let gpu = Gpu {
        autotune: AutotuneLevel::Minimal,
        kernel_cache: "ftp://host/kernels".into(),
        log_compilations: false,
    };
    let error = Kernels::prepare(&gpu, &StoreOptions::default(), 0, "NVIDIA H200")
        .err()
        .unwrap();
    assert!(
        matches!(&error, KernelError::Shared { url, .. } if url == "ftp://host/kernels"),
        "{error:?}"
    );
    // The store's own words follow as the cause.
    let said = store::error_chain(&error);
    assert!(said.starts_with("gpu.kernel_cache ftp://host/kernels: "), "{said}");
    assert!(said.contains("ftp"), "{said}");
}
