use crate::RetryPolicy;

/// How a store is reached: what the manifest (or a command's flags) says
/// about credentials and retries. Anything left unset comes from the usual
/// environment of each cloud (AWS_*, GOOGLE_*, AZURE_*). Transient errors
/// (connection failures, timeouts, server errors) are retried; missing
/// objects and denied access are not.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StoreOptions {
    pub s3: S3Options,
    pub retry: RetryPolicy,
}

#[derive(Clone, Default, PartialEq)]
pub struct S3Options {
    /// e.g. `http://127.0.0.1:8333` for an S3-compatible server; plain
    /// http is allowed only when the endpoint says so.
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
}

impl StoreOptions {
    /// Default retries, with an S3 endpoint and region where given.
    pub fn with_s3(endpoint: Option<String>, region: Option<String>) -> Self {
        Self {
            s3: S3Options {
                endpoint,
                region,
                ..Default::default()
            },
            ..Default::default()
        }
    }
}

// Secrets never reach a log line.
impl std::fmt::Debug for S3Options {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Options")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("access_key_id", &self.access_key_id.as_ref().map(|_| "<set>"))
            .field("secret_access_key", &self.secret_access_key.as_ref().map(|_| "<set>"))
            .finish()
    }
}
