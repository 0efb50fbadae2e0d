//! The job's kernel cache: cubecl's compiled kernels and autotune results,
//! kept in the job's object store so that compilation and tuning happen once
//! per job, not once per worker and again on every restart.
//!
//! cubecl keeps both caches as files under one local directory. A worker
//! fetches the shared copy into that directory before its first kernel and
//! publishes what changed after its first step and at its end. cubecl's cache
//! files skip damaged entries when read, so a file copied while cubecl
//! appends to it is safe; the last writer of a file wins.
//!
//! Autotune results sit under a folder named after the device's ordinal
//! (`device-0-3-cuda`); in the shared copy it reads `device-0-any-cuda`, so a
//! worker on GPU 3 uses what a worker on GPU 0 tuned. Callers keep GPU models
//! apart by opening the store at a folder named after the model.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use store::Store;

use super::error::KernelError;

/// The shared copy's name for any device ordinal.
const ANY_DEVICE: &str = "any";

pub struct KernelCache {
    shared: Store,
    local: PathBuf,
    device: usize,
    /// SHA-256 of each local file as last fetched or published, by local name.
    known: BTreeMap<String, String>,
}

fn local_failed(path: &Path) -> impl FnOnce(std::io::Error) -> KernelError {
    let path = path.display().to_string();
    move |source| KernelError::Local { path, source }
}

impl KernelCache {
    /// Copies the shared cache into `local` (created if missing) for device
    /// ordinal `device`; returns the cache and the number of files fetched.
    pub fn fetch(shared: Store, local: &Path, device: usize) -> Result<(Self, usize), KernelError> {
        let shared_failed = |source| KernelError::Shared {
            url: shared.url(),
            source,
        };
        let mut known = BTreeMap::new();
        for object in shared.list("").map_err(shared_failed)? {
            let name = local_name(&object.name, device).ok_or_else(|| KernelError::FileName {
                url: shared.url(),
                name: object.name.clone(),
            })?;
            let bytes = shared.get(&object.name).map_err(shared_failed)?;
            let path = local.join(&name);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).map_err(local_failed(parent))?;
            }
            std::fs::write(&path, &bytes).map_err(local_failed(&path))?;
            known.insert(name, store::sha256_hex(&bytes));
        }
        let fetched = known.len();
        std::fs::create_dir_all(local).map_err(local_failed(local))?;
        Ok((
            Self {
                shared,
                local: local.to_path_buf(),
                device,
                known,
            },
            fetched,
        ))
    }

    /// Uploads every local file that is new or changed since it was fetched
    /// or last published; returns how many.
    pub fn publish(&mut self) -> Result<usize, KernelError> {
        let mut files = Vec::new();
        walk(&self.local, &mut files).map_err(local_failed(&self.local))?;
        let mut published = 0;
        for path in files {
            let Some(name) = path
                .strip_prefix(&self.local)
                .ok()
                .and_then(|relative| relative.to_str())
                .map(|relative| relative.replace(std::path::MAIN_SEPARATOR, "/"))
            else {
                continue;
            };
            // cubecl's lock files say who writes now, which means nothing elsewhere.
            if name.ends_with(".lock") {
                continue;
            }
            let bytes = std::fs::read(&path).map_err(local_failed(&path))?;
            let sha256 = store::sha256_hex(&bytes);
            if self.known.get(&name) == Some(&sha256) {
                continue;
            }
            self.shared
                .put(&shared_name(&name, self.device), bytes.into())
                .map_err(|source| KernelError::Shared {
                    url: self.shared.url(),
                    source,
                })?;
            self.known.insert(name, sha256);
            published += 1;
        }
        Ok(published)
    }
}

fn walk(dir: &Path, files: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            walk(&entry.path(), files)?;
        } else {
            files.push(entry.path());
        }
    }
    Ok(())
}

/// The shared name of a local cache file: the device ordinal made `any`.
fn shared_name(local: &str, device: usize) -> String {
    map_device_folders(local, &device.to_string(), ANY_DEVICE)
}

/// The local name of a shared cache file for device ordinal `device`, or
/// None for a name that could leave the cache directory.
fn local_name(shared: &str, device: usize) -> Option<String> {
    let safe = !shared.is_empty()
        && !shared.starts_with('/')
        && shared
            .split('/')
            .all(|part| !part.is_empty() && part != "." && part != "..");
    safe.then(|| map_device_folders(shared, ANY_DEVICE, &device.to_string()))
}

/// Rewrites the ordinal of every `device-<type>-<ordinal>-<runtime>` folder.
fn map_device_folders(name: &str, from: &str, to: &str) -> String {
    name.split('/')
        .map(|part| {
            let fields: Vec<&str> = part.splitn(4, '-').collect();
            match fields.as_slice() {
                ["device", kind, ordinal, runtime] if *ordinal == from && kind.parse::<u16>().is_ok() => {
                    format!("device-{kind}-{to}-{runtime}")
                }
                _ => part.to_string(),
            }
        })
        .collect::<Vec<_>>()
        .join("/")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_ordinals_are_shared_as_any_and_come_back_as_the_readers() {
        let tuned = "autotune/0.10.0/device-0-3-cuda/burn_cubecl-matmul.json.log";
        assert_eq!(
            shared_name(tuned, 3),
            "autotune/0.10.0/device-0-any-cuda/burn_cubecl-matmul.json.log"
        );
        assert_eq!(
            local_name(&shared_name(tuned, 3), 5).as_deref(),
            Some("autotune/0.10.0/device-0-5-cuda/burn_cubecl-matmul.json.log")
        );
        // Another device's folder, and names that only look alike, stay as they are.
        assert_eq!(
            shared_name("autotune/0.10.0/device-0-2-cuda/x", 3),
            "autotune/0.10.0/device-0-2-cuda/x"
        );
        assert_eq!(
            shared_name("cuda/0.10.0/ptx/chunk0.cbor", 0),
            "cuda/0.10.0/ptx/chunk0.cbor"
        );
        assert_eq!(shared_name("device-x-0-cuda/a", 0), "device-x-0-cuda/a");
    }

    #[test]
    fn names_that_leave_the_cache_directory_are_refused() {
        for name in ["../escape", "a/../../b", "/etc/passwd", "a//b", ""] {
            assert_eq!(local_name(name, 0), None, "{name}");
        }
        assert_eq!(local_name("cuda/ptx/toc", 0).as_deref(), Some("cuda/ptx/toc"));
    }
}
