//! What can go wrong in setting up, caching or counting kernels.

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("cubecl's configuration was read before the job's [gpu] settings could be applied")]
    ConfigAlreadyRead,
    #[error("another logger is installed, so kernel compilations cannot be counted")]
    LoggerTaken,
    #[error("gpu.kernel_cache {url}")]
    Shared {
        url: String,
        #[source]
        source: store::StoreError,
    },
    #[error("gpu.kernel_cache {url}: `{name}` is not a cache file's name")]
    FileName { url: String, name: String },
    #[error("the kernel cache's local copy {path}")]
    Local {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("a rehearsal step")]
    Rehearsal(#[source] collective::CollectiveError),
    #[error("{0}")]
    Device(String),
}
