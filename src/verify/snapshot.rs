//! A snapshot held open on one database of one server, so a verification
//! after the switch can read both sides as they were at the switch point.
//!
//! Taking it is split in two: [`HeldSnapshot::connect`] opens and prepares
//! the session (the slow part, before the pause), and
//! [`SnapshotConnection::export`] begins the transaction and exports its
//! snapshot in one round trip (the part inside the pause). The snapshot
//! stays importable while the [`HeldSnapshot`] lives: its transaction is
//! what keeps it valid.

use tokio_postgres::{Client, SimpleQueryMessage};

use super::{VerifyError, sql_err};
use crate::config::Endpoint;
use crate::db;
use crate::pg::Version;

/// The transaction and the export, one simple query: one round trip.
const EXPORT: &str = "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SELECT pg_export_snapshot()";

/// A prepared session, ready to export a snapshot ([`Self::export`]).
pub struct SnapshotConnection {
    client: Client,
    endpoint: Endpoint,
    database: String,
    version: Version,
}

/// A REPEATABLE READ transaction on one database whose snapshot is exported.
/// Dropping it (or [`HeldSnapshot::release`]) ends the transaction, after
/// which the snapshot can no longer be imported.
pub struct HeldSnapshot {
    client: Client,
    endpoint: Endpoint,
    database: String,
    version: Version,
    id: String,
}

/// Settings that keep a session alive however long it is held: the server's
/// or the role's timeouts would otherwise end the transaction (and with it
/// the snapshot) while a verification still needs it.
pub(super) fn keep_alive_settings(version: Version) -> &'static str {
    if version.at_least(17) {
        "SET statement_timeout = 0; SET idle_in_transaction_session_timeout = 0; \
         SET transaction_timeout = 0"
    } else {
        "SET statement_timeout = 0; SET idle_in_transaction_session_timeout = 0"
    }
}

impl HeldSnapshot {
    /// Opens and prepares a session on `db` of `endpoint`; no transaction yet.
    pub async fn connect(endpoint: &Endpoint, db: &str) -> Result<SnapshotConnection, VerifyError> {
        let endpoint = endpoint.with_dbname(db);
        let client = db::connect(&endpoint, &format!("snapshot on database {db}")).await?;
        let version = Version::of(&client)
            .await
            .map_err(sql_err(format!("reading the server's version ({db})")))?;
        client
            .batch_execute(keep_alive_settings(version))
            .await
            .map_err(sql_err(format!("preparing the snapshot session on {db}")))?;
        Ok(SnapshotConnection {
            client,
            endpoint,
            database: db.to_string(),
            version,
        })
    }

    /// [`HeldSnapshot::connect`] and [`SnapshotConnection::export`] at once.
    pub async fn take(endpoint: &Endpoint, db: &str) -> Result<HeldSnapshot, VerifyError> {
        HeldSnapshot::connect(endpoint, db).await?.export().await
    }

    /// The exported snapshot's id (for `SET TRANSACTION SNAPSHOT`).
    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn database(&self) -> &str {
        &self.database
    }

    pub fn version(&self) -> Version {
        self.version
    }

    /// The server and database, for connections that import the snapshot.
    pub(super) fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// Ends the transaction (the snapshot can no longer be imported).
    pub async fn release(self) -> Result<(), VerifyError> {
        self.client
            .batch_execute("ROLLBACK")
            .await
            .map_err(sql_err(format!(
                "releasing the snapshot on {}",
                self.database
            )))
    }
}

impl SnapshotConnection {
    /// Begins the REPEATABLE READ transaction and exports its snapshot: one
    /// round trip.
    pub async fn export(self) -> Result<HeldSnapshot, VerifyError> {
        let what = format!("exporting a snapshot on {}", self.database);
        let messages = self
            .client
            .simple_query(EXPORT)
            .await
            .map_err(sql_err(what.clone()))?;
        let id = messages
            .iter()
            .find_map(|m| match m {
                SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
                _ => None,
            })
            .ok_or_else(|| VerifyError::Snapshot {
                what,
                message: "pg_export_snapshot() returned no id".into(),
            })?;
        Ok(HeldSnapshot {
            client: self.client,
            endpoint: self.endpoint,
            database: self.database,
            version: self.version,
            id,
        })
    }

    pub fn database(&self) -> &str {
        &self.database
    }
}

/// Exports a snapshot on both sides at once: what runs inside the pause.
pub async fn export_pair(
    source: SnapshotConnection,
    target: SnapshotConnection,
) -> Result<(HeldSnapshot, HeldSnapshot), VerifyError> {
    tokio::try_join!(source.export(), target.export())
}
