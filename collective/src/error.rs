use std::io;
use std::net::SocketAddr;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum CollectiveError {
    #[error("cannot listen on {address}: {source}")]
    Listen { address: SocketAddr, source: io::Error },
    #[error("cannot reach rank {peer} at {address} within {timeout:?}: {source}")]
    Connect {
        peer: usize,
        address: SocketAddr,
        timeout: Duration,
        source: io::Error,
    },
    #[error("rank {peer} ({address}) did not answer within {timeout:?} during {operation}")]
    Timeout {
        peer: usize,
        address: SocketAddr,
        timeout: Duration,
        operation: &'static str,
    },
    #[error("lost rank {peer} ({address}) during {operation}: {source}")]
    PeerLost {
        peer: usize,
        address: SocketAddr,
        operation: &'static str,
        source: io::Error,
    },
    #[error("rank {peer} ({address}) broke the protocol during {operation}: {message}")]
    Protocol {
        peer: usize,
        address: SocketAddr,
        operation: &'static str,
        message: String,
    },
    #[error("device collective failed during {operation}: {message}")]
    Device { operation: &'static str, message: String },
    #[error("invalid collective setup: {0}")]
    Setup(String),
}
