//! The control schema `pgshift` in the target URL's database: the migration's
//! persisted state, one row per database, and cutover attempts. It lives
//! outside every migrated database, so overwriting one never loses it.

use serde::Serialize;
use thiserror::Error;
use tokio_postgres::Client;

use std::collections::BTreeMap;

use super::state::{DatabasePhase, State, Substate};
use crate::config::Endpoint;
use crate::cutover::fence::FenceRecord;
use crate::db::{self, DbError};

#[derive(Debug, Error)]
pub enum ControlError {
    #[error("control schema: {0}")]
    Connect(#[from] DbError),
    #[error("control schema on {addr}: {source}")]
    Sql {
        addr: String,
        source: tokio_postgres::Error,
    },
    #[error(
        "another pgshift process is already running migration `{0}` (it holds the control lock on the target); stop it first"
    )]
    Locked(String),
    #[error(
        "fleet.member_id `{0}` is in use by another running pgshift of this migration; give every member its own (unset, it is the host name and the proxy port)"
    )]
    MemberInUse(String),
    #[error("control schema holds an invalid value: {0}")]
    Corrupt(#[from] super::state::UnknownName),
}

const SCHEMA_SQL: &str = r#"
CREATE SCHEMA IF NOT EXISTS pgshift;
CREATE TABLE IF NOT EXISTS pgshift.migration (
    name        text PRIMARY KEY,
    state       text NOT NULL,
    substate    text NOT NULL,
    reason      text,
    mode        text NOT NULL,
    switched    boolean NOT NULL DEFAULT false,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS pgshift.database (
    migration        text NOT NULL,
    database         text NOT NULL,
    phase            text NOT NULL,
    consistent_point pg_lsn,
    copy_restarts    integer NOT NULL DEFAULT 0,
    last_error       text,
    updated_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (migration, database)
);
CREATE TABLE IF NOT EXISTS pgshift.cutover_attempt (
    migration   text NOT NULL,
    id          text NOT NULL,
    started_at  timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz,
    outcome     text,
    reason      text,
    report      jsonb,
    PRIMARY KEY (migration, id)
);
CREATE TABLE IF NOT EXISTS pgshift.event (
    id        bigserial PRIMARY KEY,
    migration text NOT NULL,
    at        timestamptz NOT NULL DEFAULT now(),
    state     text NOT NULL,
    substate  text NOT NULL,
    message   text
);
CREATE TABLE IF NOT EXISTS pgshift.member (
    migration      text NOT NULL,
    id             text NOT NULL,
    role           text NOT NULL,
    leader         boolean NOT NULL DEFAULT false,
    version        text NOT NULL,
    proxy_addr     text,
    admin_addr     text,
    started_at     timestamptz NOT NULL,
    heartbeat_at   timestamptz NOT NULL DEFAULT now(),
    backend_pid    integer NOT NULL,
    backend_start  timestamptz NOT NULL,
    sessions       integer NOT NULL DEFAULT 0,
    in_transaction integer NOT NULL DEFAULT 0,
    route          text NOT NULL DEFAULT 'source',
    paused         boolean NOT NULL DEFAULT false,
    PRIMARY KEY (migration, id)
);
CREATE TABLE IF NOT EXISTS pgshift.fleet_step (
    migration text PRIMARY KEY,
    attempt   text NOT NULL,
    seq       integer NOT NULL,
    step      text NOT NULL,
    at        timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS pgshift.fleet_ack (
    migration text NOT NULL,
    attempt   text NOT NULL,
    member    text NOT NULL,
    step      text NOT NULL,
    detail    jsonb NOT NULL,
    at        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (migration, attempt, member, step)
);
CREATE TABLE IF NOT EXISTS pgshift.rollback_window (
    migration      text PRIMARY KEY,
    -- Each database's reverse slot position (created before the switch).
    reverse_points jsonb NOT NULL,
    opened_at      timestamptz,
    -- The cutover's fence on the source, lifted by a rollback.
    source_fence   jsonb,
    -- A rollback's fence on the target, until its target is guarded again.
    target_fence   jsonb,
    closed_at      timestamptz,
    closed_reason  text
);
CREATE TABLE IF NOT EXISTS pgshift.fleet_request (
    id          bigserial PRIMARY KEY,
    migration   text NOT NULL,
    member      text NOT NULL,
    command     jsonb NOT NULL,
    at          timestamptz NOT NULL DEFAULT now(),
    answer      jsonb,
    answered_at timestamptz
);
"#;

/// Creates the control schema if needed (concurrent first starts serialise
/// on a transaction-level advisory lock).
pub(crate) async fn ensure_schema(client: &Client) -> Result<(), tokio_postgres::Error> {
    client
        .batch_execute(&format!(
            "BEGIN; SET LOCAL client_min_messages = warning; SELECT pg_advisory_xact_lock(hashtext('pgshift:schema')::bigint); {SCHEMA_SQL} COMMIT;"
        ))
        .await
}

/// The persisted migration row.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MigrationRow {
    pub state: State,
    pub substate: Substate,
    pub reason: Option<String>,
    pub switched: bool,
}

/// The persisted row of one database.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DatabaseRow {
    pub database: String,
    pub phase: DatabasePhase,
    pub consistent_point: Option<String>,
    pub copy_restarts: i32,
    pub last_error: Option<String>,
}

/// A connection to the control schema, holding the migration's lock.
pub struct ControlStore {
    client: Client,
    addr: String,
    migration: String,
    /// [`ControlStore::save`]'s statement, prepared once: the cutover's
    /// point of no return is then one round trip.
    save_stmt: tokio::sync::OnceCell<tokio_postgres::Statement>,
}

/// Saves the row and its event; once switched, the commit also tells the
/// fleet's members (`pgshift_fleet`, `<migration>:switched`): the decision
/// reaches them with its own commit.
const SAVE_SQL: &str = "WITH up AS (
   INSERT INTO pgshift.migration (name, state, substate, reason, mode, switched)
   VALUES ($1, $2, $3, $4, $5, $6)
   ON CONFLICT (name) DO UPDATE SET state = $2, substate = $3, reason = $4,
     mode = $5, switched = $6, updated_at = now()
   RETURNING 1),
 ev AS (
   INSERT INTO pgshift.event (migration, state, substate, message)
   SELECT $1, $2, $3, $4 FROM up RETURNING 1)
 SELECT pg_notify('pgshift_fleet', $1 || ':switched') FROM ev WHERE $6";

impl ControlStore {
    /// Connects, creates the schema if needed and takes the migration's
    /// session-level advisory lock (released when pgshift's connection ends,
    /// also when pgshift is killed).
    pub async fn open(target: &Endpoint, migration: &str) -> Result<ControlStore, ControlError> {
        let client = db::connect(target, "target control database").await?;
        // The state must survive a crash whatever the server's default:
        // "switched" is the point of no return, and its flush also makes
        // durable everything applied and written to the target before it.
        client
            .batch_execute("SET synchronous_commit = on")
            .await
            .map_err(|source| ControlError::Sql {
                addr: target.display(),
                source,
            })?;
        let store = ControlStore {
            client,
            addr: target.display(),
            migration: migration.to_string(),
            save_stmt: tokio::sync::OnceCell::new(),
        };
        let locked: bool = store
            .client
            .query_one(
                "SELECT pg_try_advisory_lock(hashtext('pgshift:' || $1::text)::bigint)",
                &[&migration],
            )
            .await
            .map_err(|e| store.sql(e))?
            .get(0);
        if !locked {
            return Err(ControlError::Locked(migration.to_string()));
        }
        ensure_schema(&store.client)
            .await
            .map_err(|e| store.sql(e))?;
        Ok(store)
    }

    fn sql(&self, source: tokio_postgres::Error) -> ControlError {
        ControlError::Sql {
            addr: self.addr.clone(),
            source,
        }
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The persisted state, or None for a migration never started.
    pub async fn load(&self) -> Result<Option<MigrationRow>, ControlError> {
        let row = self
            .client
            .query_opt(
                "SELECT state, substate, reason, switched FROM pgshift.migration WHERE name = $1",
                &[&self.migration],
            )
            .await
            .map_err(|e| self.sql(e))?;
        let Some(r) = row else { return Ok(None) };
        let state: String = r.get(0);
        let substate: String = r.get(1);
        Ok(Some(MigrationRow {
            state: state.parse()?,
            substate: substate.parse()?,
            reason: r.get(2),
            switched: r.get(3),
        }))
    }

    /// Persists the state and appends it to the event history, in one transaction.
    pub(crate) async fn save(&self, row: &MigrationRow, mode: &str) -> Result<(), ControlError> {
        let (state, substate) = (row.state.as_str(), row.substate.as_str());
        let stmt = self
            .save_stmt
            .get_or_try_init(|| self.client.prepare(SAVE_SQL))
            .await
            .map_err(|e| self.sql(e))?;
        self.client
            .execute(
                stmt,
                &[
                    &self.migration,
                    &state,
                    &substate,
                    &row.reason,
                    &mode,
                    &row.switched,
                ],
            )
            .await
            .map_err(|e| self.sql(e))?;
        Ok(())
    }

    pub async fn databases(&self) -> Result<Vec<DatabaseRow>, ControlError> {
        let rows = self
            .client
            .query(
                "SELECT database, phase, consistent_point::text, copy_restarts, last_error
                 FROM pgshift.database WHERE migration = $1 ORDER BY database",
                &[&self.migration],
            )
            .await
            .map_err(|e| self.sql(e))?;
        rows.iter()
            .map(|r| {
                let phase: String = r.get(1);
                Ok(DatabaseRow {
                    database: r.get(0),
                    phase: phase.parse()?,
                    consistent_point: r.get(2),
                    copy_restarts: r.get(3),
                    last_error: r.get(4),
                })
            })
            .collect()
    }

    pub(crate) async fn save_database(&self, row: &DatabaseRow) -> Result<(), ControlError> {
        self.client
            .execute(
                "INSERT INTO pgshift.database (migration, database, phase, consistent_point, copy_restarts, last_error)
                 VALUES ($1, $2, $3, $4::text::pg_lsn, $5, $6)
                 ON CONFLICT (migration, database) DO UPDATE SET phase = $3, consistent_point = $4::text::pg_lsn,
                   copy_restarts = $5, last_error = $6, updated_at = now()",
                &[
                    &self.migration,
                    &row.database,
                    &row.phase.as_str(),
                    &row.consistent_point,
                    &row.copy_restarts,
                    &row.last_error,
                ],
            )
            .await
            .map_err(|e| self.sql(e))?;
        Ok(())
    }

    /// Records a cutover attempt's outcome and report.
    pub(crate) async fn save_cutover_attempt(
        &self,
        id: &str,
        outcome: &str,
        reason: Option<&str>,
        report: &serde_json::Value,
    ) -> Result<(), ControlError> {
        let report = report.to_string();
        self.client
            .execute(
                // Fleet members holding their gates for this attempt wait
                // for its outcome: told at once.
                "WITH a AS (
                   INSERT INTO pgshift.cutover_attempt (migration, id, finished_at, outcome, reason, report)
                   VALUES ($1, $2, now(), $3, $4, $5::text::jsonb)
                   ON CONFLICT (migration, id) DO UPDATE SET finished_at = now(), outcome = $3, reason = $4, report = $5::text::jsonb
                   RETURNING 1)
                 SELECT pg_notify('pgshift_fleet', $1 || ':attempt') FROM a",
                &[&self.migration, &id, &outcome, &reason, &report],
            )
            .await
            .map_err(|e| self.sql(e))?;
        Ok(())
    }

    /// A cutover attempt that never finished (pgshift stopped inside it):
    /// its id and the report it persisted (with `fence` once the fence was planned).
    pub(crate) async fn unfinished_cutover(
        &self,
    ) -> Result<Option<(String, serde_json::Value)>, ControlError> {
        let row = self
            .client
            .query_opt(
                "SELECT id, report::text FROM pgshift.cutover_attempt
                 WHERE migration = $1 AND outcome = 'running' ORDER BY started_at DESC LIMIT 1",
                &[&self.migration],
            )
            .await
            .map_err(|e| self.sql(e))?;
        Ok(row.map(|r| {
            let report: Option<String> = r.get(1);
            let report = report
                .and_then(|f| serde_json::from_str(&f).ok())
                .unwrap_or(serde_json::Value::Null);
            (r.get(0), report)
        }))
    }

    /// The last cutover attempt's report, if any.
    pub async fn last_cutover_attempt(&self) -> Result<Option<serde_json::Value>, ControlError> {
        self.last_attempt(false).await
    }

    /// The last rollback attempt's report, if any.
    pub async fn last_rollback_attempt(&self) -> Result<Option<serde_json::Value>, ControlError> {
        self.last_attempt(true).await
    }

    async fn last_attempt(
        &self,
        rollback: bool,
    ) -> Result<Option<serde_json::Value>, ControlError> {
        let row = self
            .client
            .query_opt(
                "SELECT report::text FROM pgshift.cutover_attempt
                 WHERE migration = $1 AND (id LIKE 'rollback-%') = $2
                 ORDER BY started_at DESC LIMIT 1",
                &[&self.migration, &rollback],
            )
            .await
            .map_err(|e| self.sql(e))?;
        Ok(row
            .and_then(|r| r.get::<_, Option<String>>(0))
            .and_then(|s| serde_json::from_str(&s).ok()))
    }
}

/// The rollback window as persisted (`pgshift.rollback_window`).
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct WindowRow {
    /// Database → reverse slot position on the target.
    pub reverse_points: BTreeMap<String, String>,
    /// Unix seconds.
    pub opened_at: Option<f64>,
    pub source_fence: Option<FenceRecord>,
    pub target_fence: Option<FenceRecord>,
    pub closed_at: Option<f64>,
    pub closed_reason: Option<String>,
}

impl WindowRow {
    /// Clients run on the target and a rollback can bring them back.
    pub fn is_open(&self) -> bool {
        self.opened_at.is_some() && self.closed_at.is_none()
    }
}

impl ControlStore {
    /// The rollback window's row, if a cutover prepared one.
    pub(crate) async fn window(&self) -> Result<Option<WindowRow>, ControlError> {
        let row = self
            .client
            .query_opt(
                "SELECT reverse_points::text, extract(epoch FROM opened_at)::float8,
                        source_fence::text, target_fence::text,
                        extract(epoch FROM closed_at)::float8, closed_reason
                 FROM pgshift.rollback_window WHERE migration = $1",
                &[&self.migration],
            )
            .await
            .map_err(|e| self.sql(e))?;
        let Some(r) = row else { return Ok(None) };
        let json = |i: usize| -> Option<String> { r.get(i) };
        Ok(Some(WindowRow {
            reverse_points: json(0)
                .and_then(|s| serde_json::from_str(&s).ok())
                .unwrap_or_default(),
            opened_at: r.get(1),
            source_fence: json(2).and_then(|s| serde_json::from_str(&s).ok()),
            target_fence: json(3).and_then(|s| serde_json::from_str(&s).ok()),
            closed_at: r.get(4),
            closed_reason: r.get(5),
        }))
    }

    /// Before a cutover's switch: where each database's reverse slot starts.
    /// The window is not open until [`ControlStore::open_window`].
    pub(crate) async fn prepare_window(
        &self,
        points: &BTreeMap<String, String>,
    ) -> Result<(), ControlError> {
        let points = serde_json::to_string(points).unwrap_or_default();
        self.client
            .execute(
                "INSERT INTO pgshift.rollback_window (migration, reverse_points)
                 VALUES ($1, $2::text::jsonb)
                 ON CONFLICT (migration) DO UPDATE SET reverse_points = $2::text::jsonb,
                   opened_at = NULL, source_fence = NULL, target_fence = NULL,
                   closed_at = NULL, closed_reason = NULL",
                &[&self.migration, &points],
            )
            .await
            .map_err(|e| self.sql(e))?;
        Ok(())
    }

    /// The cutover's point of no return with a way back: "switched" and the
    /// open window (with the source's fence, which a rollback lifts), in one
    /// synchronous transaction.
    pub(crate) async fn switch_with_window(
        &self,
        row: &MigrationRow,
        mode: &str,
        source_fence: &FenceRecord,
    ) -> Result<(), ControlError> {
        let fence = serde_json::to_string(source_fence).unwrap_or_default();
        self.with_state(
            "UPDATE pgshift.rollback_window SET opened_at = now(), source_fence = $2::text::jsonb,
               target_fence = NULL, closed_at = NULL, closed_reason = NULL
             WHERE migration = $1",
            &fence,
            row,
            mode,
        )
        .await
    }

    /// `sql` (with the migration and `value` as $1, $2) and the state's
    /// save, in one transaction.
    async fn with_state(
        &self,
        sql: &str,
        value: &str,
        row: &MigrationRow,
        mode: &str,
    ) -> Result<(), ControlError> {
        self.client
            .batch_execute("BEGIN")
            .await
            .map_err(|e| self.sql(e))?;
        let r = async {
            self.client
                .execute(sql, &[&self.migration, &value])
                .await
                .map_err(|e| self.sql(e))?;
            self.save(row, mode).await?;
            self.client
                .batch_execute("COMMIT")
                .await
                .map_err(|e| self.sql(e))
        }
        .await;
        if r.is_err() {
            let _ = self.client.batch_execute("ROLLBACK").await;
        }
        r
    }

    /// A rollback's point of no return: "switched" back to false with the
    /// target's fence recorded (the rollback guards the target again and
    /// lifts it), the window closed, in one synchronous transaction.
    pub(crate) async fn switch_back(
        &self,
        row: &MigrationRow,
        mode: &str,
        target_fence: &FenceRecord,
    ) -> Result<(), ControlError> {
        let fence = serde_json::to_string(target_fence).unwrap_or_default();
        self.with_state(
            "UPDATE pgshift.rollback_window SET target_fence = $2::text::jsonb,
               closed_at = now(), closed_reason = 'rolled back'
             WHERE migration = $1",
            &fence,
            row,
            mode,
        )
        .await
    }

    /// The target's fence after a rollback is gone (the target is guarded).
    pub(crate) async fn clear_target_fence(&self) -> Result<(), ControlError> {
        self.client
            .execute(
                "UPDATE pgshift.rollback_window SET target_fence = NULL WHERE migration = $1",
                &[&self.migration],
            )
            .await
            .map_err(|e| self.sql(e))?;
        Ok(())
    }

    /// Ends the window (`complete`, or its automatic end), saying why.
    pub(crate) async fn close_window(&self, reason: &str) -> Result<(), ControlError> {
        self.client
            .execute(
                "UPDATE pgshift.rollback_window SET closed_at = now(), closed_reason = $2
                 WHERE migration = $1 AND closed_at IS NULL",
                &[&self.migration, &reason],
            )
            .await
            .map_err(|e| self.sql(e))?;
        Ok(())
    }

    /// An attempt that prepared reverse slots but never switched leaves no window.
    pub(crate) async fn forget_window(&self) -> Result<(), ControlError> {
        self.client
            .execute(
                "DELETE FROM pgshift.rollback_window WHERE migration = $1 AND opened_at IS NULL",
                &[&self.migration],
            )
            .await
            .map_err(|e| self.sql(e))?;
        Ok(())
    }
}
