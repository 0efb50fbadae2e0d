//! The job token on every worker call: `authorization: Bearer <token>`.
//! Calls without it, or with another job's, are refused and counted. The
//! token itself is never logged or shown.

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

/// The server-side check, as a tonic interceptor.
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
        match presented {
            Some(token) if constant_time_eq(token.as_bytes(), self.token.secret().as_bytes()) => Ok(request),
            Some(_) => {
                self.refused.fetch_add(1, Ordering::Relaxed);
                Err(Status::unauthenticated("the job token does not match this job's"))
            }
            None => {
                self.refused.fetch_add(1, Ordering::Relaxed);
                Err(Status::unauthenticated("no job token (authorization: Bearer ...)"))
            }
        }
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
