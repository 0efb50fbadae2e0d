//! The job token on every worker call, both sides of it: the worker's
//! [`Bearer`] adds `authorization: Bearer <token>`, the coordinator's
//! [`Guard`] refuses and counts calls without it or with another job's.
//! The token itself is never logged or shown.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tonic::{Request, Status};

/// The job's token; `Debug` hides it.
#[derive(Clone)]
pub struct Token(Arc<str>);

impl Token {
    pub fn new(secret: &str) -> Self {
        Self(secret.into())
    }

    pub fn secret(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(<hidden>)")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("the job token holds characters that cannot travel in a header")]
    NotAHeader,
}

/// The client side: adds the job token to every call, as a tonic interceptor.
#[derive(Clone)]
pub struct Bearer(tonic::metadata::MetadataValue<tonic::metadata::Ascii>);

impl Bearer {
    pub fn new(token: &Token) -> Result<Self, AuthError> {
        format!("Bearer {}", token.secret())
            .parse()
            .map(Self)
            .map_err(|_| AuthError::NotAHeader)
    }
}

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        request.metadata_mut().insert("authorization", self.0.clone());
        Ok(request)
    }
}

/// The server side: checks the job token, as a tonic interceptor.
#[derive(Clone)]
pub struct Guard {
    token: Token,
    pub refused: Arc<AtomicU64>,
}

impl Guard {
    pub fn new(token: Token) -> Self {
        Self {
            token,
            refused: Arc::new(AtomicU64::new(0)),
        }
    }

    pub fn check(&self, request: Request<()>) -> Result<Request<()>, Status> {
        let presented = request
            .metadata()
            .get("authorization")
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "));
        match self.accepts(presented) {
            Ok(()) => Ok(request),
            Err(message) => Err(Status::unauthenticated(message)),
        }
    }

    /// Whether `presented` is the job's token; a refusal is counted.
    pub fn accepts(&self, presented: Option<&str>) -> Result<(), &'static str> {
        match presented {
            Some(token) if constant_time_eq(token.as_bytes(), self.token.secret().as_bytes()) => Ok(()),
            Some(_) => {
                self.refused.fetch_add(1, Ordering::Relaxed);
                Err("the job token does not match this job's")
            }
            None => {
                self.refused.fetch_add(1, Ordering::Relaxed);
                Err("no job token (authorization: Bearer ...)")
            }
        }
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
