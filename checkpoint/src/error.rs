//! One error type for every checkpoint operation.

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("{url}: this checkpoint does not fit the model: {message}")]
    Mismatch { url: String, message: String },
    #[error("{url}: {message}")]
    Damaged { url: String, message: String },
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error("{source} (tried for {seconds} s: checkpoint.save_retry_seconds)")]
    StoreGaveUp { seconds: u64, source: store::StoreError },
    #[error(
        "{url} was written with {field} = {was}; this manifest has {is}. A resume must keep {field}: \
         put it back, or start a new job (another checkpoint.url, or --fresh on an empty one)"
    )]
    Changed {
        url: String,
        field: String,
        was: String,
        is: String,
    },
    #[error(
        "--fresh: {url} already holds committed step {step}; resume it (drop --fresh) or use another checkpoint.url"
    )]
    NotFresh { url: String, step: u64 },
    #[error("{0}")]
    Other(String),
}
