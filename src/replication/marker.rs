//! Cutover markers on the source. A marker is committed on the source like
//! any transaction, after every transaction committed before it; once apply
//! has committed the marker's transaction on the target, the target holds
//! all of them. How it travels depends on the source
//! ([`MarkerTransport`]): a transactional logical decoding message where
//! pgoutput delivers them (14+), otherwise a row in a small table pgshift
//! owns on the source, `pgshift.<publication name>`, which is in the
//! migration's publication. Apply reports that table's changes as markers
//! and applies nothing of them; copy, schema dump, sequences, verification
//! and validation leave the `pgshift` schema out.

use tokio_postgres::{Client, Statement};

use super::Lsn;
use super::client::ReplicationError;
use super::names::ReplicationNames;
use crate::config::Endpoint;
use crate::db::quote_ident;
use crate::pg::Version;
use crate::pg::replication::MarkerTransport;

/// The prefix of the logical decoding messages that mark cutover points.
pub(crate) const MARKER_PREFIX: &str = "pgshift";

/// The source schema of pgshift's marker tables; never migrated.
pub(crate) const MARKER_SCHEMA: &str = "pgshift";

/// The marker table's name (in schema `pgshift`) of one (migration,
/// database): one per migration, so two migrations of one database never
/// share (or drop) each other's.
pub fn table_name(names: &ReplicationNames) -> &str {
    &names.publication
}

/// The marker table as `"pgshift"."name"`, for SQL and publication lists.
pub fn qualified_table(names: &ReplicationNames) -> String {
    format!(
        "{}.{}",
        quote_ident(MARKER_SCHEMA),
        quote_ident(table_name(names))
    )
}

fn sql_err(context: String) -> impl FnOnce(tokio_postgres::Error) -> ReplicationError {
    move |source| ReplicationError::Sql { context, source }
}

/// Creates the marker table on a source that needs one (before 14) and
/// returns its qualified name, to be put in the publication; None where
/// markers are logical messages. Idempotent.
pub async fn ensure_table(
    client: &Client,
    names: &ReplicationNames,
) -> Result<Option<String>, ReplicationError> {
    let version = Version::of(client)
        .await
        .map_err(sql_err("reading the source version".into()))?;
    if version.marker_transport() != MarkerTransport::Row {
        return Ok(None);
    }
    let table = qualified_table(names);
    client
        .batch_execute(&format!(
            "CREATE SCHEMA IF NOT EXISTS {schema}; \
             CREATE TABLE IF NOT EXISTS {table} (id text PRIMARY KEY, at timestamptz NOT NULL)",
            schema = quote_ident(MARKER_SCHEMA)
        ))
        .await
        .map_err(sql_err(format!(
            "creating the cutover marker table {table} (PostgreSQL {version} has no logical messages in pgoutput; the source user needs CREATE on the database)"
        )))?;
    Ok(Some(table))
}

/// Drops the marker table, and the `pgshift` schema once nothing else is
/// in it. Returns whether the table existed. The session must be allowed to
/// write (a fenced source's databases default to read-only).
pub(crate) async fn drop_table(
    client: &Client,
    names: &ReplicationNames,
) -> Result<bool, ReplicationError> {
    let table = qualified_table(names);
    let existed = client
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&table])
        .await
        .map_err(sql_err(format!("looking up {table}")))?
        .get::<_, bool>(0);
    if !existed {
        return Ok(false);
    }
    client
        .batch_execute(&format!("DROP TABLE IF EXISTS {table}"))
        .await
        .map_err(sql_err(format!(
            "dropping the cutover marker table {table}"
        )))?;
    // Another migration's marker table (or anything else) keeps the schema.
    let schema = quote_ident(MARKER_SCHEMA);
    match client
        .batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} RESTRICT"))
        .await
    {
        Err(e)
            if e.code()
                != Some(&tokio_postgres::error::SqlState::DEPENDENT_OBJECTS_STILL_EXIST) =>
        {
            Err(sql_err(format!("dropping schema {schema}"))(e))
        }
        _ => Ok(true),
    }
}

/// A marker statement prepared on a source connection, so emitting a
/// marker during the cutover's pause is one round trip.
struct PreparedMarker {
    stmt: Statement,
    transport: MarkerTransport,
}

/// Prepares the marker statement for the source behind `source` (a
/// connection to the migrated database `names` belongs to).
async fn prepare(
    source: &Client,
    names: &ReplicationNames,
) -> Result<PreparedMarker, tokio_postgres::Error> {
    let transport = Version::of(source).await?.marker_transport();
    let sql = match transport {
        MarkerTransport::LogicalMessage => {
            "SELECT pg_logical_emit_message(true, $1, $2)::text".to_string()
        }
        // The id is the key: emitting an id again updates the row, which
        // apply reports as the marker all the same.
        MarkerTransport::Row => format!(
            "INSERT INTO {} (id, at) VALUES ($1, clock_timestamp()) \
             ON CONFLICT (id) DO UPDATE SET at = excluded.at \
             RETURNING pg_current_wal_insert_lsn()::text",
            qualified_table(names)
        ),
    };
    Ok(PreparedMarker {
        stmt: source.prepare(&sql).await?,
        transport,
    })
}

/// Emits marker `id` with a statement from [`prepare`] on `source`;
/// returns its LSN (for a row marker, where its transaction's WAL was when
/// the row was written).
async fn emit(
    source: &Client,
    marker: &PreparedMarker,
    id: &str,
) -> Result<Lsn, tokio_postgres::Error> {
    let lsn: String = match marker.transport {
        MarkerTransport::LogicalMessage => source
            .query_one(&marker.stmt, &[&MARKER_PREFIX, &id])
            .await?
            .get(0),
        MarkerTransport::Row => emit_row(source, &marker.stmt, id).await?,
    };
    Ok(lsn.parse().unwrap_or(Lsn::ZERO))
}

/// A source connection for the markers of the migration's database `names`
/// belongs to, with the marker statement prepared. It must write through
/// the fence, and its commit is flushed at once so the walsender sends it
/// without waiting for the WAL writer (the source may run with
/// synchronous_commit = off).
pub struct MarkerConnection {
    client: Client,
    marker: PreparedMarker,
}

impl MarkerConnection {
    pub async fn connect(
        source_db: &Endpoint,
        names: &ReplicationNames,
    ) -> Result<MarkerConnection, ReplicationError> {
        let client = crate::db::connect(source_db, "source (marker)").await?;
        client
            .batch_execute(
                "SET default_transaction_read_only = off; SET synchronous_commit = on; SET application_name = 'pgshift-marker'",
            )
            .await
            .map_err(sql_err("setting up the marker session".into()))?;
        let marker = prepare(&client, names)
            .await
            .map_err(sql_err("preparing the marker statement".into()))?;
        Ok(MarkerConnection { client, marker })
    }

    /// Emits marker `id`; returns its LSN (for a row marker, where its
    /// transaction's WAL was when the row was written).
    pub async fn emit(&self, id: &str) -> Result<Lsn, tokio_postgres::Error> {
        emit(&self.client, &self.marker, id).await
    }
}

/// The row in its own transaction, sent as one pipelined round trip. The
/// transaction is READ WRITE whatever the fence made the database's default,
/// and commits synchronously: the walsender sends only flushed WAL, and the
/// fence's own asynchronous commit is flushed with it.
async fn emit_row(
    source: &Client,
    stmt: &Statement,
    id: &str,
) -> Result<String, tokio_postgres::Error> {
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&id];
    // join3 polls in order, so the three are sent in order.
    let (begin, row, commit) = futures_util::future::join3(
        source.batch_execute("BEGIN READ WRITE; SET LOCAL synchronous_commit = on"),
        source.query_one(stmt, &params),
        source.batch_execute("COMMIT"),
    )
    .await;
    begin?;
    // A failed INSERT turned the COMMIT into a rollback: its error counts.
    let row = row?;
    commit?;
    Ok(row.get(0))
}

/// Whether a relation streamed from the source is pgshift's own (schema
/// `pgshift`): never applied to the target.
pub(crate) fn is_pgshift_relation(namespace: &str) -> bool {
    namespace == MARKER_SCHEMA
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marker_table_is_per_migration_and_quoted() {
        let a = ReplicationNames::new("m1", "app");
        let b = ReplicationNames::new("m2", "app");
        assert_ne!(table_name(&a), table_name(&b));
        assert_eq!(
            qualified_table(&a),
            format!("\"pgshift\".\"{}\"", a.publication)
        );
        assert!(is_pgshift_relation("pgshift"));
        assert!(!is_pgshift_relation("public"));
    }
}
