//! Slots seen through ordinary SQL connections: reading a slot's state,
//! dropping it (also when a stale connection still holds it), and cleaning up
//! everything a migration created for one database.

use std::time::{Duration, Instant};

use tokio_postgres::Client;

use super::Lsn;
use super::ParseLsnError;
use super::client::ReplicationError;
use super::names::ReplicationNames;
use super::publication::drop_publication;
use crate::config::Endpoint;
use crate::db::{self, DbError};

/// A row of `pg_replication_slots`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlotState {
    pub name: String,
    pub plugin: Option<String>,
    /// `logical` or `physical`.
    pub slot_type: String,
    pub database: Option<String>,
    pub temporary: bool,
    pub active: bool,
    pub active_pid: Option<i32>,
    /// Oldest WAL the slot still needs.
    pub restart_lsn: Option<Lsn>,
    /// What the consumer confirmed as flushed (logical slots).
    pub confirmed_flush_lsn: Option<Lsn>,
    /// `reserved`, `extended`, `unreserved` or `lost` (None before PostgreSQL 13).
    pub wal_status: Option<String>,
    /// WAL held back by the slot: current WAL position minus `restart_lsn`.
    pub retained_bytes: Option<i64>,
}

/// Reads slot `name`, None if there is no such slot. Run on the source
/// (any database); `retained_bytes` needs a primary (not a standby).
pub async fn slot_state(
    client: &Client,
    name: &str,
) -> Result<Option<SlotState>, ReplicationError> {
    let context = || format!("reading replication slot \"{name}\"");
    let version = crate::pg::Version::of(client)
        .await
        .map_err(|source| ReplicationError::Sql {
            context: context(),
            source,
        })?;
    let row = client
        .query_opt(&crate::pg::slot::slot_state_sql(version), &[&name])
        .await
        .map_err(|source| ReplicationError::Sql {
            context: context(),
            source,
        })?;
    let Some(r) = row else { return Ok(None) };
    let lsn = |i: usize| -> Result<Option<Lsn>, ReplicationError> {
        r.get::<_, Option<String>>(i)
            .map(|s| {
                s.parse()
                    .map_err(|e: ParseLsnError| ReplicationError::Invalid {
                        what: "LSN from pg_replication_slots".into(),
                        message: e.to_string(),
                    })
            })
            .transpose()
    };
    Ok(Some(SlotState {
        name: r.get(0),
        plugin: r.get(1),
        slot_type: r.get(2),
        database: r.get(3),
        temporary: r.get(4),
        active: r.get(5),
        active_pid: r.get(6),
        restart_lsn: lsn(7)?,
        confirmed_flush_lsn: lsn(8)?,
        wal_status: r.get(9),
        retained_bytes: r.get(10),
    }))
}

/// How long [`drop_slot_if_exists`] waits for a terminated holder to let go.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(10);

/// Drops slot `name` if it exists, returning whether it did. A connection
/// still streaming from it (e.g. an earlier pgshift process) is terminated
/// first when `terminate_holder` is set; otherwise such a slot is
/// [`ReplicationError::SlotInUse`].
pub async fn drop_slot_if_exists(
    client: &Client,
    name: &str,
    terminate_holder: bool,
) -> Result<bool, ReplicationError> {
    let sql_err = |source| ReplicationError::Sql {
        context: format!("dropping replication slot \"{name}\""),
        source,
    };
    let deadline = Instant::now() + RELEASE_TIMEOUT;
    loop {
        let Some(state) = slot_state(client, name).await? else {
            return Ok(false);
        };
        match state.active_pid {
            Some(pid) if terminate_holder => {
                client
                    .query("SELECT pg_terminate_backend($1)", &[&pid])
                    .await
                    .map_err(sql_err)?;
            }
            Some(pid) => {
                return Err(ReplicationError::SlotInUse {
                    addr: "source".into(),
                    name: name.to_string(),
                    message: format!("replication slot \"{name}\" is active for PID {pid}"),
                });
            }
            None => match client
                .query("SELECT pg_drop_replication_slot($1)", &[&name])
                .await
            {
                Ok(_) => return Ok(true),
                // Dropped by someone else meanwhile: the goal is reached.
                Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_OBJECT) => {
                    return Ok(false);
                }
                // Picked up again between our look and the drop: look again.
                Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::OBJECT_IN_USE) => {}
                Err(e) => return Err(sql_err(e)),
            },
        }
        if Instant::now() > deadline {
            return Err(ReplicationError::SlotInUse {
                addr: "source".into(),
                name: name.to_string(),
                message: format!("still held after {RELEASE_TIMEOUT:?}"),
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// What [`cleanup`] removed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cleanup {
    pub slot_dropped: bool,
    pub publication_dropped: bool,
    /// The cutover marker table (sources before 14).
    pub marker_table_dropped: bool,
    /// The DDL capture (event triggers, functions, tables).
    pub ddl_capture_removed: bool,
}

/// Drops the slot, publication and marker table of (`migration`,
/// `database`) on the source `endpoint`, if present (used on cancel and
/// after the switch). A connection still streaming from the slot is
/// terminated. Idempotent: a second call, or a database that no longer
/// exists, removes nothing and succeeds. Works on a fenced source: the
/// session is read-write whatever the database's default.
pub async fn cleanup(
    endpoint: &Endpoint,
    migration: &str,
    database: &str,
) -> Result<Cleanup, ReplicationError> {
    let names = ReplicationNames::new(migration, database);
    let what = format!("source database {database} (cleanup)");
    let client = match db::connect(&endpoint.with_dbname(database), &what).await {
        Ok(c) => c,
        // A slot belongs to its database and blocks DROP DATABASE, so a
        // missing database has neither slot nor publication left.
        Err(DbError::Connect { source, .. })
            if source.code() == Some(&tokio_postgres::error::SqlState::INVALID_CATALOG_NAME) =>
        {
            return Ok(Cleanup::default());
        }
        Err(e) => return Err(e.into()),
    };
    client
        .batch_execute("SET default_transaction_read_only = off")
        .await
        .map_err(|source| ReplicationError::Sql {
            context: format!("{what}: making the session read-write"),
            source,
        })?;
    let slot_dropped = drop_slot_if_exists(&client, &names.slot, true).await?;
    let publication_dropped = drop_publication(&client, &names.publication).await?;
    // Before the marker table, whose removal drops the schema once empty.
    let ddl_capture_removed =
        super::ddl::capture::remove(&client, &super::ddl::capture::CaptureNames::new(&names))
            .await?;
    let marker_table_dropped = super::marker::drop_table(&client, &names).await?;
    Ok(Cleanup {
        slot_dropped,
        publication_dropped,
        marker_table_dropped,
        ddl_capture_removed,
    })
}
