//! Ordinary SQL connections (tokio-postgres) to the source and target, for
//! validation, copy, apply, verification and control state.

use thiserror::Error;
use tokio_postgres::Client;

use crate::config::{Endpoint, SslMode};

#[derive(Debug, Error)]
pub enum DbError {
    #[error("cannot connect to {what} ({addr}): {source}")]
    Connect {
        what: String,
        addr: String,
        source: tokio_postgres::Error,
    },
    #[error(
        "{what}: sslmode=require is not supported for pgshift's SQL connections yet; use prefer or disable"
    )]
    TlsRequired { what: String },
}

/// Connects to `ep` and drives the connection on a background task.
/// `what` names the connection in errors ("source database app").
pub async fn connect(ep: &Endpoint, what: &str) -> Result<Client, DbError> {
    if ep.sslmode == SslMode::Require {
        return Err(DbError::TlsRequired {
            what: what.to_string(),
        });
    }
    let (client, conn) = ep
        .pg_config()
        .connect(tokio_postgres::NoTls)
        .await
        .map_err(|source| DbError::Connect {
            what: what.to_string(),
            addr: ep.display(),
            source,
        })?;
    let label = what.to_string();
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(connection = %label, "connection ended: {e}");
        }
    });
    Ok(client)
}

/// Quotes an identifier for SQL (`"a""b"`).
pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// Quotes a string literal for SQL (`'it''s'`).
pub fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}
