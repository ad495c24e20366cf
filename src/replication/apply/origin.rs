//! The replication origin on the target: where apply is, as one fact with
//! the rows. Each committed group sets the origin's progress in its own
//! transaction (`pg_replication_origin_xact_setup`), as PostgreSQL's own
//! apply does; a restarted applier reads the position back and skips every
//! transaction whose commit record starts before it.

use std::time::Duration;

use thiserror::Error;

use super::pipeline::{Op, Param, Pipeline};
use super::{Applier, ApplyError};
use crate::db::quote_literal;
use crate::replication::Lsn;
use crate::replication::ParseLsnError;
use crate::wire::{ServerConnection, WireError};

/// Why the replication origin could not be set up on the target.
#[derive(Debug, Error)]
pub enum OriginError {
    #[error(transparent)]
    Wire(#[from] WireError),
    /// The origin's position was not an LSN.
    #[error(transparent)]
    Position(#[from] ParseLsnError),
    /// The statements a group needs could not be prepared.
    #[error("{0}")]
    Prepare(String),
}

const STMT_ORIGIN: &str = "pgshift_origin";

/// The origin's name and its committed position.
pub(super) struct Origin {
    pub(super) name: String,
    /// The origin's committed position.
    pub(super) applied: Lsn,
}

/// The replication origin of a migration's database on the target: a valid
/// identifier of at most 63 bytes; names that had to be cleaned or shortened
/// get a hash of the original so two databases never share an origin.
pub(super) fn origin_name(migration: &str, db: &str) -> String {
    let clean = |s: &str| -> String {
        s.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '_'
                }
            })
            .collect()
    };
    let name = format!("pgshift_{}_{}", clean(migration), clean(db));
    let exact = format!("pgshift_{migration}_{db}");
    if name == exact && name.len() <= 63 {
        return name;
    }
    // FNV-1a: stable across versions and platforms.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in migration.bytes().chain([0]).chain(db.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    let mut short: String = name.chars().take(54).collect();
    short.push_str(&format!("_{:08x}", h as u32));
    short
}

impl Origin {
    /// Creates the origin if needed, binds it to this session and reads its
    /// position.
    pub(super) async fn set_up(
        conn: &mut ServerConnection,
        name: String,
    ) -> Result<Origin, OriginError> {
        let applied = setup_origin(conn, &name).await?;
        Ok(Origin { name, applied })
    }

    /// Queues the Parse of the statement that sets a group's progress.
    pub(super) fn prepare(pipe: &mut Pipeline) {
        // pg_lsn, timestamptz
        pipe.parse(
            STMT_ORIGIN,
            "SELECT pg_replication_origin_xact_setup($1, $2)",
            &[3220, 1184],
        );
    }

    /// Queues the open group's progress: the end of its last commit record
    /// and that transaction's commit time.
    pub(super) fn queue_progress(pipe: &mut Pipeline, lsn: Lsn, time: i64) {
        let lsn_text = lsn.to_string();
        let time_text = pg_timestamp(time);
        pipe.execute(
            STMT_ORIGIN,
            &[
                Param::Text(lsn_text.as_bytes()),
                Param::Text(time_text.as_bytes()),
            ],
            Op::control("pg_replication_origin_xact_setup"),
        );
    }
}

impl Applier {
    pub(super) fn origin_error(&self, error: OriginError) -> ApplyError {
        ApplyError::Origin {
            database: self.opts.database.clone(),
            origin: self.origin.name.clone(),
            error,
        }
    }

    /// The origin position that is flushed to disk on the target: the only
    /// position that may be reported to the source as flushed. Queried on the
    /// target; call it between groups (when nothing is pending).
    pub(crate) async fn durable_position(&mut self) -> Result<Lsn, ApplyError> {
        if self.tx.group.open || self.has_pending() {
            return Err(self.protocol("durable_position called with a target transaction open"));
        }
        let sql = format!(
            "SELECT coalesce(pg_replication_origin_progress({}, true), '0/0')::text",
            quote_literal(&self.origin.name)
        );
        let rows = self
            .pipe
            .conn
            .simple_query(&sql)
            .await
            .map_err(|e| ApplyError::Connection {
                database: self.opts.database.clone(),
                source: Box::new(e),
            })?;
        let text = rows
            .first()
            .and_then(|r| r.first().cloned().flatten())
            .unwrap_or_else(|| "0/0".into());
        text.parse()
            .map_err(|e: ParseLsnError| self.protocol(format!("origin progress: {e}")))
    }
}

/// A PostgreSQL timestamp (µs since 2000-01-01) as timestamptz text.
fn pg_timestamp(micros: i64) -> String {
    let unix = micros.saturating_add(crate::replication::pgoutput::PG_EPOCH_OFFSET_MICROS);
    match chrono::DateTime::from_timestamp_micros(unix) {
        Some(t) => t.format("%Y-%m-%d %H:%M:%S%.6f+00").to_string(),
        None => "now".into(),
    }
}

async fn setup_origin(conn: &mut ServerConnection, origin: &str) -> Result<Lsn, OriginError> {
    let lit = quote_literal(origin);
    conn.simple_query(&format!(
        "SELECT pg_replication_origin_create({lit}) WHERE pg_replication_origin_oid({lit}) IS NULL"
    ))
    .await?;
    acquire_origin(conn, origin).await?;
    let rows = conn
        .simple_query(&format!(
            "SELECT pg_replication_origin_progress({lit}, true)"
        ))
        .await?;
    match rows.first().and_then(|r| r.first().cloned().flatten()) {
        Some(s) => Ok(s.parse()?),
        None => Ok(Lsn::ZERO),
    }
}

/// Binds the origin to this session (one session at a time may hold it).
pub(super) async fn acquire_origin(
    conn: &mut ServerConnection,
    origin: &str,
) -> Result<(), OriginError> {
    let lit = quote_literal(origin);
    // A previous applier's backend may still hold the origin for a moment.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match conn
            .simple_query(&format!(
                "SELECT pg_replication_origin_session_setup({lit})"
            ))
            .await
        {
            Ok(_) => break,
            Err(WireError::Server(e))
                if e.code == "55006" && tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Unbinds the origin from this session, for another session to take it.
pub(super) async fn release_origin(
    conn: &mut ServerConnection,
    _origin: &str,
) -> Result<(), OriginError> {
    conn.simple_query("SELECT pg_replication_origin_session_reset()")
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origin_names_are_valid_and_distinct() {
        assert_eq!(origin_name("mig1", "app"), "pgshift_mig1_app");
        let a = origin_name("my-mig", "app");
        let b = origin_name("my-mig", "App");
        assert!(a.starts_with("pgshift_my_mig_app_"));
        assert_ne!(a, b);
        let long = origin_name(&"m".repeat(40), &"d".repeat(63));
        assert!(long.len() <= 63, "{long}");
        assert!(long.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'));
        assert_ne!(long, origin_name(&"m".repeat(40), &"d".repeat(62)));
    }

    #[test]
    fn commit_times_render_as_timestamptz() {
        assert_eq!(pg_timestamp(0), "2000-01-01 00:00:00.000000+00");
        assert_eq!(pg_timestamp(1_500_000), "2000-01-01 00:00:01.500000+00");
    }
}
