/// Errors name the full URL of the object concerned.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("`{url}` is not a store URL: {reason}")]
    BadUrl { url: String, reason: String },
    #[error("{url}: not found")]
    NotFound { url: String },
    #[error("{url}: bucket `{bucket}` does not exist")]
    NoBucket { bucket: String, url: String },
    #[error("{url}: access denied ({detail}); check the credentials (e.g. AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)")]
    Denied { url: String, detail: String },
    #[error("{url}: {detail}")]
    Failed { url: String, detail: String },
    #[error("{url}: still failing after {attempts} attempts: {detail}")]
    Exhausted { url: String, attempts: u32, detail: String },
    #[error("cannot open the store at {url}: {detail}")]
    Open { url: String, detail: String },
    #[error("local cache {path}: {source}")]
    Cache { path: String, source: std::io::Error },
}

/// An error and the whole chain of its causes, on one line; a cause whose
/// text is already there (some errors repeat their cause) is left out.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut detail = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !detail.contains(&text) {
            detail.push_str(": ");
            detail.push_str(&text);
        }
        source = cause.source();
    }
    detail
}

impl StoreError {
    pub fn is_not_found(&self) -> bool {
        matches!(self, StoreError::NotFound { .. })
    }

    /// The store failed or could not be reached (worth trying again
    /// later, e.g. a server away or a full disk), rather than refusing.
    pub fn is_failure(&self) -> bool {
        matches!(self, StoreError::Failed { .. } | StoreError::Exhausted { .. })
    }
}
