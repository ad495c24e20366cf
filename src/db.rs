//! Ordinary SQL connections (tokio-postgres) to the source and target, for
//! validation, copy, apply, verification and control state.

use thiserror::Error;
use tokio_postgres::Client;

use crate::config::{Endpoint, SslMode};

pub(crate) mod tls;

#[derive(Debug, Error)]
pub enum DbError {
    #[error("cannot connect to {what} ({addr}): {}", describe_chain(.source))]
    Connect {
        what: String,
        addr: String,
        source: tokio_postgres::Error,
    },
    #[error("cannot connect to {what} ({addr}): {message}")]
    TlsConfig {
        what: String,
        addr: String,
        message: String,
    },
}

/// Connects to `ep` (TLS per its sslmode/sslrootcert) and drives the
/// connection on a background task. `what` names the connection in errors
/// ("source database app").
pub async fn connect(ep: &Endpoint, what: &str) -> Result<Client, DbError> {
    connect_with(ep, what, None).await
}

/// [`connect`], handing the server's notifications (LISTEN) to `notify`
/// as (channel, payload).
pub(crate) async fn connect_listening(
    ep: &Endpoint,
    what: &str,
    notify: tokio::sync::mpsc::UnboundedSender<(String, String)>,
) -> Result<Client, DbError> {
    connect_with(ep, what, Some(notify)).await
}

async fn connect_with(
    ep: &Endpoint,
    what: &str,
    notify: Option<tokio::sync::mpsc::UnboundedSender<(String, String)>>,
) -> Result<Client, DbError> {
    let config =
        match ep.sslmode {
            // Never used for a handshake: tokio-postgres is told sslmode=disable.
            SslMode::Disable => crate::wire::tls::client_config_no_verify(),
            mode => crate::wire::tls::client_config_for(mode, ep.sslrootcert.as_deref()).map_err(
                |e| DbError::TlsConfig {
                    what: what.to_string(),
                    addr: ep.display(),
                    message: e.to_string(),
                },
            )?,
        };
    let (client, conn) = ep
        .pg_config()
        .connect(tls::MakeRustlsConnect::new(config))
        .await
        .map_err(|source| DbError::Connect {
            what: what.to_string(),
            addr: ep.display(),
            source,
        })?;
    tokio::spawn(drive(conn, what.to_string(), notify));
    Ok(client)
}

/// Drives a connection until it ends, logging the server's notices under
/// the connection's `label`: at DEBUG, WARNINGs at WARN. (Awaiting the
/// connection itself would log every NOTICE at INFO, e.g. each
/// `DROP … IF EXISTS` that found nothing.)
pub(crate) async fn drive<S, T>(
    mut conn: tokio_postgres::Connection<S, T>,
    label: String,
    notify: Option<tokio::sync::mpsc::UnboundedSender<(String, String)>>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use futures_util::StreamExt;
    let mut messages = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
    while let Some(message) = messages.next().await {
        match message {
            Ok(tokio_postgres::AsyncMessage::Notice(n)) => {
                if notice_is_warning(n.parsed_severity(), n.severity()) {
                    tracing::warn!(connection = %label, "{}: {}", n.severity(), n.message());
                } else {
                    tracing::debug!(connection = %label, "{}: {}", n.severity(), n.message());
                }
            }
            Ok(tokio_postgres::AsyncMessage::Notification(n)) => {
                if let Some(tx) = &notify {
                    let _ = tx.send((n.channel().to_string(), n.payload().to_string()));
                }
            }
            Ok(_) => {}
            Err(e) => {
                tracing::debug!(connection = %label, "connection ended: {e}");
                return;
            }
        }
    }
}

/// Whether a notice deserves WARN: WARNING (or worse). Servers before 9.6
/// send only the localized severity, so the text is the fallback.
fn notice_is_warning(parsed: Option<tokio_postgres::error::Severity>, text: &str) -> bool {
    use tokio_postgres::error::Severity;
    match parsed {
        Some(Severity::Warning | Severity::Error | Severity::Fatal | Severity::Panic) => true,
        Some(_) => false,
        None => matches!(text, "WARNING" | "ERROR" | "FATAL" | "PANIC"),
    }
}

/// Quotes an identifier for SQL (`"a""b"`).
pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// Quotes a string literal for SQL (`'it''s'`).
pub(crate) fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// A one-line description of a tokio-postgres error, including the server's
/// message and SQLSTATE when there is one (its Display alone says only "db error").
pub fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(d) => {
            let mut s = format!(
                "{}: {} (SQLSTATE {})",
                d.severity(),
                d.message(),
                d.code().code()
            );
            if let Some(detail) = d.detail() {
                s.push_str(&format!(" DETAIL: {detail}"));
            }
            s
        }
        None => e.to_string(),
    }
}

/// [`describe`], followed by the causes tokio-postgres keeps out of its own
/// message ("error performing TLS handshake: invalid peer certificate: …").
fn describe_chain(e: &tokio_postgres::Error) -> String {
    let mut s = describe(e);
    if e.as_db_error().is_some() {
        return s;
    }
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        let text = c.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        cause = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_postgres::error::Severity;

    #[test]
    fn warnings_are_told_from_notices() {
        assert!(notice_is_warning(Some(Severity::Warning), "WARNUNG"));
        assert!(!notice_is_warning(Some(Severity::Notice), "NOTICE"));
        assert!(!notice_is_warning(Some(Severity::Info), "INFO"));
        // Before 9.6 only the (possibly localized) text is sent.
        assert!(notice_is_warning(None, "WARNING"));
        assert!(!notice_is_warning(None, "NOTICE"));
    }
}
