//! PostgreSQL wire protocol: framing, the few messages pgshift must read or
//! write itself, authentication (both sides), TLS streams, and connecting to a
//! server. Shared by the proxy and the replication client.

// `WireError::Server` carries the server's whole ErrorResponse so it can be
// relayed verbatim; errors are rare, so their size costs nothing that matters.
#![allow(clippy::result_large_err)]

pub(crate) mod auth;
pub(crate) mod connect;
pub(crate) mod frame;
pub mod messages;
pub(crate) mod stream;
pub(crate) mod tls;

pub use connect::{ConnectOptions, ServerConnection};
pub(crate) use frame::{Frame, FrameReader};
pub(crate) use messages::ErrorFields;
pub(crate) use stream::PgStream;

use thiserror::Error;

/// Errors of the wire layer.
#[derive(Debug, Error)]
pub enum WireError {
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    #[error("connection closed by peer")]
    Closed,
    #[error("protocol violation: {0}")]
    Protocol(String),
    #[error("message of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
    #[error("authentication failed: {0}")]
    Auth(String),
    /// The server answered with an ErrorResponse; the raw frame can be relayed as is.
    #[error("server error: {0}")]
    Server(ErrorFields),
    #[error("TLS error: {0}")]
    Tls(String),
    #[error("timed out: {0}")]
    Timeout(String),
}

impl WireError {
    /// The SQLSTATE a client should see for this error.
    pub fn sqlstate(&self) -> &str {
        match self {
            WireError::Server(f) => f.code.as_str(),
            WireError::Auth(_) => "28P01",
            WireError::TooLarge { .. } | WireError::Protocol(_) => "08P01",
            WireError::Timeout(_) | WireError::Io(_) | WireError::Closed | WireError::Tls(_) => {
                "08006"
            }
        }
    }
}
