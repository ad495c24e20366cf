//! The apply engine for one database: decoded pgoutput transactions, in
//! commit order, applied to the target exactly once.
//!
//! Rows and progress are one atomic fact: consecutive source transactions
//! are grouped into one target transaction that also records where the
//! last one's commit record ends in a replication origin
//! (`pg_replication_origin_xact_setup`), as PostgreSQL's own apply does. A
//! restarted applier reads the origin's position and skips every
//! transaction whose commit record starts before it.
//!
//! Feeding: [`Applier::handle_xlogdata`] (raw XLogData payloads) or
//! [`Applier::handle`] (decoded messages), then [`Applier::flush`] whenever
//! the input is idle, so complete transactions are committed promptly.
//! After any error the applier is unusable: drop it, fix the cause, connect a
//! new one and stream again from [`Applier::applied_position`].

mod batch;
mod pipeline;
mod relation;

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use prometheus::{IntCounterVec, Registry};
use thiserror::Error;
use tokio::sync::{mpsc, watch};

use self::batch::{NetBatch, Offer};
use self::pipeline::{Op, Param, Pipeline, RoundError};
use self::relation::{BatchKind, RelEntry, SourceColumn, SourceNames, StmtKey};
use super::Lsn;
use super::marker::PreparedMarker;
use super::names::ReplicationNames;
use super::pgoutput::{
    Begin, Commit, DecodeError, Decoder, OldKind, PgOutputMessage, Truncate, Tuple, TupleValue,
    TypeInfo,
};
use crate::config::Endpoint;
use crate::db::quote_literal;
use crate::wire::messages::TxStatus;
use crate::wire::{ConnectOptions, ErrorFields, ServerConnection, WireError};

pub use super::marker::MARKER_PREFIX;

#[derive(Debug, Error)]
pub enum ApplyError {
    #[error("apply to target database {database}: {source}")]
    Connection {
        database: String,
        #[source]
        source: Box<WireError>,
    },
    #[error(
        "apply to target database {database}: cannot set up replication origin {origin}: {error}"
    )]
    Origin {
        database: String,
        origin: String,
        error: String,
    },
    #[error("{0}")]
    Decode(#[from] DecodeError),
    #[error("table {table} no longer matches the target: {difference}. Apply is stopped; {remedy}")]
    SchemaMismatch {
        database: String,
        table: String,
        difference: String,
        /// A statement to run on the target, only when certainly right and safe.
        fix: Option<String>,
        /// What to do: run `fix`, or what to change by hand.
        remedy: String,
    },
    #[error(
        "cannot apply the source transaction committed at {commit_lsn} to {table} ({op}) in database {database}: {error}"
    )]
    Row {
        database: String,
        commit_lsn: Lsn,
        table: String,
        op: &'static str,
        error: Box<ErrorFields>,
    },
    #[error(
        "the source transaction committed at {commit_lsn} {op}s a row of {table} in database {database} that the target does not have ({rows} rows matched): the target has diverged"
    )]
    RowNotFound {
        database: String,
        commit_lsn: Lsn,
        table: String,
        op: &'static str,
        rows: u64,
    },
    #[error("apply to target database {database}: unexpected stream: {detail}")]
    Protocol { database: String, detail: String },
    #[error(
        "apply to target database {database} stopped after an earlier error; reconnect to resume"
    )]
    Stopped { database: String },
    /// Internal: a batched statement failed and the group is being applied
    /// again change by change; never returned by the public methods.
    #[doc(hidden)]
    #[error("a batched statement failed; applying the group again change by change")]
    Replay,
}

impl ApplyError {
    /// A failure that may pass by itself (a deadlock, a serialization
    /// failure, a lock or statement timeout, a server shutting down), so
    /// applying the same change again can succeed; every other row or
    /// schema error needs an operator.
    pub fn is_transient(&self) -> bool {
        match self {
            ApplyError::Row { error, .. } => {
                ["40", "53", "55", "57", "58", "08"].contains(&error.code.get(..2).unwrap_or(""))
            }
            ApplyError::SchemaMismatch { .. } | ApplyError::RowNotFound { .. } => false,
            _ => true,
        }
    }
}

/// Options of one database's applier.
#[derive(Clone, Debug)]
pub struct ApplyOptions {
    pub migration: String,
    pub database: String,
    /// Commit the target transaction after this many source transactions
    /// when some of its changes were applied one by one …
    pub max_batch_transactions: usize,
    /// … and after this many when all were folded into net changes.
    pub max_net_batch_transactions: usize,
    /// Send queued statements once this many bytes are queued.
    pub max_round_bytes: usize,
    /// `client_encoding` of the target session (the source's encoding, in
    /// which pgoutput delivers text); None leaves the server default.
    pub client_encoding: Option<String>,
    /// Fold the row changes of a group into one net change per row, applied
    /// as one statement per table and operation (see `batch`).
    pub net_batching: bool,
    /// The database the changes come from, read only to name its column
    /// definitions exactly in a schema mismatch (pgoutput names only a
    /// domain's base type); None: messages say what the stream says.
    pub source: Option<Endpoint>,
}

impl ApplyOptions {
    pub fn new(migration: &str, database: &str) -> ApplyOptions {
        ApplyOptions {
            migration: migration.to_string(),
            database: database.to_string(),
            // Small groups when changes are applied one by one: a row
            // updated by every transaction (a hot counter) grows a version
            // chain within the target transaction. Folded changes update
            // such a row once per group, so those groups may be larger.
            max_batch_transactions: 100,
            max_net_batch_transactions: 1000,
            max_round_bytes: 512 * 1024,
            client_encoding: None,
            net_batching: true,
            source: None,
        }
    }
}

/// A cutover marker whose transaction is committed on the target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Marker {
    pub id: String,
    pub commit_lsn: Lsn,
}

/// Counters of one applier, cumulative since it connected.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ApplyStats {
    pub transactions: u64,
    /// Transactions at or before the origin position, not applied again.
    pub skipped_transactions: u64,
    pub inserts: u64,
    pub updates: u64,
    pub deletes: u64,
    /// Relations truncated.
    pub truncates: u64,
    /// The end of the commit record of the last source transaction
    /// committed on the target (the replication origin's position).
    pub applied_lsn: Lsn,
    /// Source commit time (µs since 2000-01-01) of the oldest transaction
    /// received but not yet committed on the target: how old the lag is.
    pub pending_since: Option<i64>,
}

/// What other tasks (status, lag, cutover) watch.
#[derive(Clone, Debug, Default)]
pub struct ApplyProgress {
    pub stats: ApplyStats,
    /// The most recent committed markers, oldest first (bounded).
    pub markers: Vec<Marker>,
}

const KEPT_MARKERS: usize = 64;

/// Changes held in a net-change batch before it is sent.
const MAX_BATCH_CHANGES: usize = 10_000;

/// Messages of the open group kept for an exact re-apply; beyond this the
/// batch is verified and the rest of the group is applied change by change.
const MAX_REPLAY_BYTES: usize = 64 << 20;

/// The apply metrics, registered once and shared by every database's applier.
#[derive(Clone)]
pub struct ApplyMetrics {
    transactions: IntCounterVec,
    rows: IntCounterVec,
    errors: IntCounterVec,
}

impl ApplyMetrics {
    pub fn register(reg: &Registry) -> ApplyMetrics {
        use crate::admin::metrics::int_counter_vec;
        ApplyMetrics {
            transactions: int_counter_vec(
                reg,
                "pgshift_apply_transactions_total",
                "Source transactions committed on the target",
                &["database"],
            ),
            rows: int_counter_vec(
                reg,
                "pgshift_apply_rows_total",
                "Row changes applied to the target, by operation (truncate counts relations)",
                &["database", "op"],
            ),
            errors: int_counter_vec(
                reg,
                "pgshift_apply_errors_total",
                "Errors that stopped apply",
                &["database"],
            ),
        }
    }
}

/// The replication origin of a migration's database on the target: a valid
/// identifier of at most 63 bytes; names that had to be cleaned or shortened
/// get a hash of the original so two databases never share an origin.
pub fn origin_name(migration: &str, db: &str) -> String {
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

/// Emits a transactional cutover marker on the source database of `names`
/// (see [`marker`](super::marker) for how it travels); returns its LSN.
/// When apply reports a [`Marker`] with this id, every transaction committed
/// on the source before it is committed on the target.
pub async fn emit_marker(
    source: &tokio_postgres::Client,
    names: &ReplicationNames,
    id: &str,
) -> Result<Lsn, tokio_postgres::Error> {
    let prepared = prepare_marker(source, names).await?;
    emit_marker_with(source, &prepared, id).await
}

/// Prepares [`emit_marker_with`]'s statement on `source`, so emitting the
/// marker during the cutover's pause is one round trip.
pub async fn prepare_marker(
    source: &tokio_postgres::Client,
    names: &ReplicationNames,
) -> Result<PreparedMarker, tokio_postgres::Error> {
    super::marker::prepare(source, names).await
}

/// [`emit_marker`] with a statement from [`prepare_marker`] on `source`.
pub async fn emit_marker_with(
    source: &tokio_postgres::Client,
    prepared: &PreparedMarker,
    id: &str,
) -> Result<Lsn, tokio_postgres::Error> {
    super::marker::emit(source, prepared, id).await
}

/// Waits until the marker `id` is committed on the target, or `timeout`.
pub async fn wait_for_marker(
    progress: &mut watch::Receiver<ApplyProgress>,
    id: &str,
    timeout: Duration,
) -> Option<Marker> {
    let found = |p: &ApplyProgress| p.markers.iter().find(|m| m.id == id).cloned();
    tokio::time::timeout(timeout, async {
        loop {
            if let Some(m) = found(&progress.borrow_and_update()) {
                return Some(m);
            }
            if progress.changed().await.is_err() {
                return found(&progress.borrow());
            }
        }
    })
    .await
    .ok()
    .flatten()
}

/// Row operation counts of a transaction or group.
#[derive(Clone, Copy, Debug, Default)]
struct OpCounts {
    inserts: u64,
    updates: u64,
    deletes: u64,
    truncates: u64,
}

impl OpCounts {
    fn add(&mut self, o: OpCounts) {
        self.inserts += o.inserts;
        self.updates += o.updates;
        self.deletes += o.deletes;
        self.truncates += o.truncates;
    }
}

/// The source transaction being received.
struct Current {
    commit_lsn: Lsn,
    commit_time: i64,
    skip: bool,
    markers: Vec<String>,
    counts: OpCounts,
    /// Statements of this transaction already queued or sent.
    statements: usize,
}

/// Complete source transactions applied in the open target transaction.
#[derive(Default)]
struct Group {
    open: bool,
    transactions: u64,
    statements: usize,
    /// Row changes applied one by one (not folded).
    single_rows: usize,
    /// The last complete transaction's commit record end and commit time.
    last_commit: Option<(Lsn, i64)>,
    /// The last complete transaction's commit LSN, for errors.
    last_commit_lsn: Lsn,
    markers: Vec<Marker>,
    counts: OpCounts,
}

const STMT_BEGIN: &str = "pgshift_begin";
const STMT_COMMIT: &str = "pgshift_commit";
const STMT_ORIGIN: &str = "pgshift_origin";
const STMT_XID: &str = "pgshift_xid";

pub struct Applier {
    pipe: Pipeline,
    opts: ApplyOptions,
    origin: String,
    /// This migration's marker table on the source (schema `pgshift`), for
    /// sources whose pgoutput has no logical messages.
    marker_table: String,
    decoder: Decoder,
    relations: HashMap<u32, RelEntry>,
    types: HashMap<u32, TypeInfo>,
    /// The origin's committed position.
    applied: Lsn,
    current: Option<Current>,
    /// Streamed (v2) transactions by top-level xid, until Stream Commit.
    streams: HashMap<u32, Vec<PgOutputMessage>>,
    stream_xid: Option<u32>,
    group: Group,
    stats: ApplyStats,
    progress: watch::Sender<ApplyProgress>,
    metrics: Option<ApplyMetrics>,
    next_statement: u64,
    stopped: bool,
    /// Row changes of the open group not yet sent, folded per row.
    batch: NetBatch,
    /// The open group's messages, to apply it again change by change when
    /// a batched statement fails.
    replay: Vec<PgOutputMessage>,
    replay_bytes: usize,
    /// Skipped transactions counted since the group started (a re-apply
    /// counts them again).
    group_skipped: u64,
    /// The rest of the open group is applied change by change.
    exact: bool,
    /// Batched statements were sent whose round has not succeeded yet.
    batch_unverified: bool,
    /// `replay` up to here belongs to transactions already in the group.
    replay_group_end: usize,
}

impl Applier {
    /// Connects to the target database (`target` must name it), sets up the
    /// replication origin and reads its position.
    pub async fn connect(
        target: &Endpoint,
        opts: ApplyOptions,
        metrics: Option<ApplyMetrics>,
    ) -> Result<Applier, ApplyError> {
        let database = opts.database.clone();
        let conn_err = |source: WireError| ApplyError::Connection {
            database: database.clone(),
            source: Box::new(source),
        };
        let mut startup = vec![
            ("user".to_string(), target.user.clone()),
            ("database".to_string(), target.dbname.clone()),
            ("application_name".to_string(), "pgshift apply".to_string()),
        ];
        if let Some(enc) = &opts.client_encoding {
            startup.push(("client_encoding".to_string(), enc.clone()));
        }
        let conn = ServerConnection::connect(
            &ConnectOptions::for_endpoint(target),
            &startup,
            target.password.as_ref().map(|p| p.expose()),
        )
        .await
        .map_err(conn_err)?;
        let origin = origin_name(&opts.migration, &opts.database);
        let mut pipe = Pipeline::new(conn);
        // Replica role: no user triggers or FK checks fire for replayed rows.
        // Commits do not wait for the WAL flush (as native subscriptions do):
        // only `durable_position()` — flushed origin progress — is ever
        // reported to the source. A cutover needs no flush here either: it
        // persists "switched" synchronously on the same target server
        // before any client runs there, which flushes the WAL through every
        // group applied before it.
        pipe.conn
            .simple_query("SET session_replication_role = replica; SET synchronous_commit = off")
            .await
            .map_err(conn_err)?;
        let applied = setup_origin(&mut pipe.conn, &origin)
            .await
            .map_err(|error| ApplyError::Origin {
                database: database.clone(),
                origin: origin.clone(),
                error,
            })?;
        pipe.parse(STMT_BEGIN, "BEGIN", &[]);
        pipe.parse(STMT_COMMIT, "COMMIT", &[]);
        // pg_lsn, timestamptz
        pipe.parse(
            STMT_ORIGIN,
            "SELECT pg_replication_origin_xact_setup($1, $2)",
            &[3220, 1184],
        );
        pipe.parse(STMT_XID, "SELECT pg_current_xact_id()", &[]);
        match pipe.sync().await {
            Ok(_) => {}
            Err(RoundError::Wire(e)) => return Err(conn_err(e)),
            Err(e) => {
                return Err(ApplyError::Origin {
                    database,
                    origin,
                    error: format!("{e:?}"),
                });
            }
        }
        let stats = ApplyStats {
            applied_lsn: applied,
            ..Default::default()
        };
        let (progress, _) = watch::channel(ApplyProgress {
            stats: stats.clone(),
            markers: Vec::new(),
        });
        let names = ReplicationNames::new(&opts.migration, &opts.database);
        let marker_table = super::marker::table_name(&names).to_string();
        Ok(Applier {
            pipe,
            opts,
            origin,
            marker_table,
            decoder: Decoder::new(),
            relations: HashMap::new(),
            types: HashMap::new(),
            applied,
            current: None,
            streams: HashMap::new(),
            stream_xid: None,
            group: Group::default(),
            stats,
            progress,
            metrics,
            next_statement: 0,
            stopped: false,
            batch: NetBatch::default(),
            replay: Vec::new(),
            replay_bytes: 0,
            group_skipped: 0,
            exact: false,
            batch_unverified: false,
            replay_group_end: 0,
        })
    }

    /// The replication origin's name.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// The end of the last applied source transaction's commit record (the
    /// origin's position): stream from here after a restart, report it as
    /// written/flushed to the source, and compute lag from it.
    pub fn applied_position(&self) -> Lsn {
        self.applied
    }

    pub fn stats(&self) -> &ApplyStats {
        &self.stats
    }

    /// A receiver of progress (stats and committed markers) for other tasks.
    pub fn subscribe(&self) -> watch::Receiver<ApplyProgress> {
        self.progress.subscribe()
    }

    /// Nothing received is still unapplied: no transaction half received,
    /// none waiting to be committed, no streamed (v2) transaction open. Only
    /// then may a keepalive's position be reported as flushed.
    pub fn is_idle(&self) -> bool {
        self.current.is_none()
            && self.group.transactions == 0
            && self.streams.is_empty()
            && self.stream_xid.is_none()
    }

    /// The origin position that is flushed to disk on the target: the only
    /// position that may be reported to the source as flushed. Queried on the
    /// target; call it between groups (when nothing is pending).
    pub async fn durable_position(&mut self) -> Result<Lsn, ApplyError> {
        if self.group.open || self.has_pending() {
            return Err(self.protocol("durable_position called with a target transaction open"));
        }
        let sql = format!(
            "SELECT coalesce(pg_replication_origin_progress({}, true), '0/0')::text",
            crate::db::quote_literal(&self.origin)
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
            .map_err(|e: String| self.protocol(format!("origin progress: {e}")))
    }

    /// Complete transactions received but not yet committed on the target.
    pub fn has_pending(&self) -> bool {
        self.group.transactions > 0
    }

    /// Decodes and applies one XLogData payload.
    pub async fn handle_xlogdata(&mut self, data: Bytes) -> Result<(), ApplyError> {
        let msg = self.decoder.decode(data)?;
        self.handle(msg).await
    }

    /// Applies XLogData payloads from a channel until it closes, committing
    /// whenever the channel runs empty, so a caught-up stream is applied at
    /// once while a backlog is applied in groups. Progress is seen through
    /// [`subscribe`](Self::subscribe) (e.g. by the task sending standby
    /// status updates).
    pub async fn apply_channel(
        &mut self,
        rx: &mut mpsc::Receiver<Bytes>,
    ) -> Result<(), ApplyError> {
        loop {
            let data = match rx.try_recv() {
                Ok(d) => d,
                Err(mpsc::error::TryRecvError::Empty) => {
                    self.flush().await?;
                    match rx.recv().await {
                        Some(d) => d,
                        None => break,
                    }
                }
                Err(mpsc::error::TryRecvError::Disconnected) => break,
            };
            // A transaction starting with nothing behind it: commit the
            // complete ones first rather than hold them while it arrives.
            if data.first() == Some(&b'B') && rx.is_empty() && !self.decoder.in_stream() {
                self.flush().await?;
            }
            self.handle_xlogdata(data).await?;
        }
        self.flush().await.map(|_| ())
    }

    /// Applies one decoded message. Messages must come in the order the
    /// server sent them; whole transactions are committed in groups.
    pub async fn handle(&mut self, msg: PgOutputMessage) -> Result<(), ApplyError> {
        if self.stopped {
            return Err(ApplyError::Stopped {
                database: self.opts.database.clone(),
            });
        }
        let mut r = self.dispatch(msg).await;
        if matches!(r, Err(ApplyError::Replay)) {
            r = self.apply_again_exactly().await;
        }
        self.check(r).await
    }

    /// Commits the complete transactions received so far. In the middle of
    /// a transaction that already wrote rows, the group commits with it.
    pub async fn flush(&mut self) -> Result<Lsn, ApplyError> {
        if self.stopped {
            return Err(ApplyError::Stopped {
                database: self.opts.database.clone(),
            });
        }
        if self.current.as_ref().is_some_and(|c| c.statements > 0) {
            return Ok(self.applied);
        }
        let mut r = self.commit_group().await;
        if matches!(r, Err(ApplyError::Replay)) {
            r = match self.apply_again_exactly().await {
                Ok(()) => self.commit_group().await,
                Err(e) => Err(e),
            };
        }
        self.check(r).await?;
        Ok(self.applied)
    }

    /// Forgets everything not yet committed on the target, for when the
    /// source stream restarts (after losing the source connection): stream
    /// again from the returned position.
    pub async fn restart_stream(&mut self) -> Result<Lsn, ApplyError> {
        if self.stopped {
            return Err(ApplyError::Stopped {
                database: self.opts.database.clone(),
            });
        }
        self.pipe.clear();
        // Parses that were queued are gone with the queue: prepare anew.
        for r in self.relations.values_mut() {
            r.statements.clear();
            r.batch_statements.clear();
        }
        self.group = Group::default();
        self.current = None;
        self.batch = NetBatch::default();
        self.batch_unverified = false;
        self.reset_batching();
        self.streams.clear();
        self.stream_xid = None;
        self.decoder = Decoder::new();
        if self.pipe.conn.status != TxStatus::Idle {
            let r = self.pipe.conn.simple_query("ROLLBACK").await;
            let r = r.map(|_| ()).map_err(|source| ApplyError::Connection {
                database: self.opts.database.clone(),
                source: Box::new(source),
            });
            self.check(r).await?;
        }
        Ok(self.applied)
    }

    /// On error: roll back the open target transaction, count, stop.
    async fn check<T>(&mut self, r: Result<T, ApplyError>) -> Result<T, ApplyError> {
        if r.is_err() {
            self.stopped = true;
            self.pipe.clear();
            if self.pipe.conn.status != TxStatus::Idle {
                // The connection may be gone: do not wait on it for long.
                let rollback = self.pipe.conn.simple_query("ROLLBACK");
                let _ = tokio::time::timeout(Duration::from_secs(5), rollback).await;
            }
            if let Some(m) = &self.metrics {
                m.errors.with_label_values(&[&self.opts.database]).inc();
            }
        }
        r
    }

    fn protocol(&self, detail: impl Into<String>) -> ApplyError {
        ApplyError::Protocol {
            database: self.opts.database.clone(),
            detail: detail.into(),
        }
    }

    async fn dispatch(&mut self, msg: PgOutputMessage) -> Result<(), ApplyError> {
        if let Some(xid) = self.stream_xid {
            match msg {
                PgOutputMessage::StreamStop => {
                    self.stream_xid = None;
                }
                PgOutputMessage::Message(m) if !m.transactional => {}
                other => self.streams.entry(xid).or_default().push(other),
            }
            return Ok(());
        }
        self.record(&msg).await?;
        match msg {
            PgOutputMessage::Begin(b) => self.begin(b),
            PgOutputMessage::Commit(c) => self.commit(c).await,
            PgOutputMessage::Origin(_) => Ok(()),
            PgOutputMessage::Relation(r) => {
                let changed = self.relations.get(&r.oid).is_none_or(|e| {
                    e.source.columns != r.columns
                        || e.source.name != r.name
                        || e.source.namespace != r.namespace
                        || e.source.replica_identity != r.replica_identity
                });
                if changed {
                    if !self.exact && self.relations.contains_key(&r.oid) {
                        // A re-apply would need the old layout: verify what
                        // is batched and apply the rest of the group exactly.
                        self.flush_batch();
                        self.round().await?;
                        self.stop_batching_for_group();
                    }
                    self.relations.insert(r.oid, RelEntry::new(r));
                }
                Ok(())
            }
            PgOutputMessage::Type(t) => {
                self.types.insert(t.oid, t);
                Ok(())
            }
            PgOutputMessage::Insert(i) => self.row(i.relation, RowChange::Insert(i.new)).await,
            PgOutputMessage::Update(u) => {
                self.row(u.relation, RowChange::Update(u.old, u.new)).await
            }
            PgOutputMessage::Delete(d) => self.row(d.relation, RowChange::Delete(d.old)).await,
            PgOutputMessage::Truncate(t) => self.truncate(t).await,
            PgOutputMessage::Message(m) => {
                if m.transactional && m.prefix == MARKER_PREFIX {
                    let cur = self.current.as_mut().ok_or_else(|| ApplyError::Protocol {
                        database: self.opts.database.clone(),
                        detail: "transactional message outside a transaction".into(),
                    })?;
                    cur.markers
                        .push(String::from_utf8_lossy(&m.content).into_owned());
                }
                Ok(())
            }
            PgOutputMessage::StreamStart(s) => {
                if s.first_segment {
                    self.streams.insert(s.xid, Vec::new());
                } else if !self.streams.contains_key(&s.xid) {
                    // Applying the rest of a transaction would apply part of it.
                    return Err(self.protocol(format!(
                        "streamed transaction {} continues without its first segment",
                        s.xid
                    )));
                }
                self.stream_xid = Some(s.xid);
                Ok(())
            }
            PgOutputMessage::StreamStop => Err(self.protocol("Stream Stop outside a stream")),
            PgOutputMessage::StreamAbort(a) => {
                if a.xid == a.subxid {
                    self.streams.remove(&a.xid);
                } else if let Some(buf) = self.streams.get_mut(&a.xid) {
                    // Everything from the subtransaction's first change on belongs to it.
                    if let Some(pos) = buf.iter().position(|m| change_xid(m) == Some(a.subxid)) {
                        buf.truncate(pos);
                    }
                }
                Ok(())
            }
            PgOutputMessage::StreamCommit(c) => {
                let msgs = match self.streams.remove(&c.xid) {
                    Some(m) => m,
                    None if c.commit_lsn < self.applied => Vec::new(),
                    None => {
                        return Err(self.protocol(format!(
                            "Stream Commit of transaction {} that was never streamed",
                            c.xid
                        )));
                    }
                };
                // As an ordinary transaction (and recorded as one, so that
                // a re-apply of the group needs no stream state).
                let begin = PgOutputMessage::Begin(Begin {
                    final_lsn: c.commit_lsn,
                    commit_time: c.commit_time,
                    xid: c.xid,
                });
                let commit = PgOutputMessage::Commit(Commit {
                    flags: c.flags,
                    commit_lsn: c.commit_lsn,
                    end_lsn: c.end_lsn,
                    commit_time: c.commit_time,
                });
                for m in std::iter::once(begin)
                    .chain(msgs)
                    .chain(std::iter::once(commit))
                {
                    Box::pin(self.dispatch(m)).await?;
                }
                Ok(())
            }
        }
    }

    fn begin(&mut self, b: Begin) -> Result<(), ApplyError> {
        if self.current.is_some() {
            return Err(self.protocol("Begin inside a transaction"));
        }
        let done = self
            .group
            .last_commit
            .map_or(self.applied, |(l, _)| l.max(self.applied));
        // Progress is the end of a commit record; the next transaction's
        // commit record may start exactly there, so the test is strict.
        let skip = b.final_lsn < done;
        if !skip && self.stats.pending_since.is_none() {
            self.stats.pending_since = Some(b.commit_time);
        }
        self.current = Some(Current {
            commit_lsn: b.final_lsn,
            commit_time: b.commit_time,
            skip,
            markers: Vec::new(),
            counts: OpCounts::default(),
            statements: 0,
        });
        Ok(())
    }

    async fn commit(&mut self, c: Commit) -> Result<(), ApplyError> {
        let cur = self
            .current
            .take()
            .ok_or_else(|| self.protocol("Commit outside a transaction"))?;
        if cur.commit_lsn != c.commit_lsn {
            return Err(self.protocol(format!(
                "Commit at {} does not match its Begin ({})",
                c.commit_lsn, cur.commit_lsn
            )));
        }
        if cur.skip {
            self.stats.skipped_transactions += 1;
            self.group_skipped += 1;
            return Ok(());
        }
        self.replay_group_end = self.replay.len();
        let g = &mut self.group;
        g.transactions += 1;
        g.last_commit = Some((c.end_lsn, c.commit_time));
        g.last_commit_lsn = c.commit_lsn;
        g.counts.add(cur.counts);
        g.markers.extend(cur.markers.into_iter().map(|id| Marker {
            id,
            commit_lsn: c.commit_lsn,
        }));
        let limit = if g.single_rows > 0 {
            self.opts.max_batch_transactions
        } else {
            self.opts
                .max_net_batch_transactions
                .max(self.opts.max_batch_transactions)
        };
        if g.transactions as usize >= limit
            || self.pipe.queued_bytes() + self.batch.bytes >= self.opts.max_round_bytes
        {
            self.commit_group().await?;
        }
        Ok(())
    }

    /// The open source transaction, unless it is skipped.
    fn applying(&mut self) -> Result<Option<Lsn>, ApplyError> {
        match &self.current {
            None => Err(self.protocol("row change outside a transaction")),
            Some(c) if c.skip => Ok(None),
            Some(c) => Ok(Some(c.commit_lsn)),
        }
    }

    fn open_group(&mut self) {
        if !self.group.open {
            self.pipe.execute(STMT_BEGIN, &[], Op::control("BEGIN"));
            self.group.open = true;
        }
    }

    /// Sends what is queued, keeping the target transaction open.
    async fn round(&mut self) -> Result<(), ApplyError> {
        if self.pipe.queued_ops() == 0 && self.pipe.queued_bytes() == 0 {
            return Ok(());
        }
        self.sync().await.map(|_| ())
    }

    /// One pipeline round. A failure in a round that carried batched
    /// statements is answered by applying the group again change by change
    /// ([`ApplyError::Replay`]), which finds the exact change at fault.
    async fn sync(&mut self) -> Result<TxStatus, ApplyError> {
        match self.pipe.sync().await {
            Ok(status) => {
                self.batch_unverified = false;
                Ok(status)
            }
            Err(RoundError::Wire(e)) => Err(self.round_error(RoundError::Wire(e))),
            Err(_) if self.batch_unverified => Err(ApplyError::Replay),
            Err(e) => Err(self.round_error(e)),
        }
    }

    fn round_error(&self, e: RoundError) -> ApplyError {
        let database = self.opts.database.clone();
        match e {
            RoundError::Wire(source) => ApplyError::Connection {
                database,
                source: Box::new(source),
            },
            RoundError::Server { op, error } => match op {
                Some(op) if op.table.is_some() => ApplyError::Row {
                    database,
                    commit_lsn: op.commit_lsn,
                    table: op.table.as_deref().unwrap_or_default().to_string(),
                    op: op.what,
                    error: Box::new(error),
                },
                other => ApplyError::Row {
                    database,
                    commit_lsn: self.group.last_commit_lsn,
                    table: "-".into(),
                    op: other.map_or("statement", |o| o.what),
                    error: Box::new(error),
                },
            },
            RoundError::RowCount { op, rows } => ApplyError::RowNotFound {
                database,
                commit_lsn: op.commit_lsn,
                table: op.table.as_deref().unwrap_or_default().to_string(),
                op: op.what,
                rows,
            },
        }
    }

    /// Commits the open group with its origin progress.
    async fn commit_group(&mut self) -> Result<(), ApplyError> {
        let Some((lsn, time)) = self.group.last_commit else {
            return Ok(());
        };
        self.flush_batch();
        self.open_group();
        if self.group.statements == 0 {
            // A transaction without an xid writes no commit record, and so no
            // origin progress: assign one.
            self.pipe.execute(STMT_XID, &[], Op::control("assign xid"));
        }
        // Row counts are checked before COMMIT is sent.
        self.round().await?;
        let lsn_text = lsn.to_string();
        let time_text = pg_timestamp(time);
        self.pipe.execute(
            STMT_ORIGIN,
            &[
                Param::Text(lsn_text.as_bytes()),
                Param::Text(time_text.as_bytes()),
            ],
            Op::control("pg_replication_origin_xact_setup"),
        );
        self.pipe.execute(STMT_COMMIT, &[], Op::control("COMMIT"));
        let status = self.sync().await?;
        if status != TxStatus::Idle {
            return Err(self.protocol(format!(
                "target still in a transaction ({status:?}) after COMMIT"
            )));
        }
        self.committed(lsn);
        Ok(())
    }

    /// Records a committed group: position, counters, metrics, markers.
    fn committed(&mut self, lsn: Lsn) {
        let g = std::mem::take(&mut self.group);
        self.reset_batching();
        self.applied = lsn;
        let s = &mut self.stats;
        s.applied_lsn = lsn;
        // What is still pending now is at most the transaction in progress.
        s.pending_since = self
            .current
            .as_ref()
            .filter(|c| !c.skip)
            .map(|c| c.commit_time);
        s.transactions += g.transactions;
        s.inserts += g.counts.inserts;
        s.updates += g.counts.updates;
        s.deletes += g.counts.deletes;
        s.truncates += g.counts.truncates;
        if let Some(m) = &self.metrics {
            let db = self.opts.database.as_str();
            m.transactions
                .with_label_values(&[db])
                .inc_by(g.transactions);
            for (op, n) in [
                ("insert", g.counts.inserts),
                ("update", g.counts.updates),
                ("delete", g.counts.deletes),
                ("truncate", g.counts.truncates),
            ] {
                if n > 0 {
                    m.rows.with_label_values(&[db, op]).inc_by(n);
                }
            }
        }
        let stats = self.stats.clone();
        self.progress.send_modify(|p| {
            p.stats = stats;
            p.markers.extend(g.markers);
            let excess = p.markers.len().saturating_sub(KEPT_MARKERS);
            p.markers.drain(..excess);
        });
    }

    /// Makes sure the relation's target side is known and matches.
    async fn ensure_target(&mut self, oid: u32) -> Result<(), ApplyError> {
        let entry = self
            .relations
            .get(&oid)
            .ok_or_else(|| self.protocol(format!("change for unknown relation {oid}")))?;
        if entry.target.is_some() {
            return Ok(());
        }
        let catalog = entry.catalog_query();
        let type_query = source_type_query(entry);
        // The catalog is read on the same connection: send what is queued first.
        self.round().await?;
        let conn_err = |source: WireError| ApplyError::Connection {
            database: self.opts.database.clone(),
            source: Box::new(source),
        };
        let rows = self
            .pipe
            .conn
            .simple_query(&catalog)
            .await
            .map_err(conn_err)?;
        let names = self
            .pipe
            .conn
            .simple_query(&type_query)
            .await
            .map_err(conn_err)?;
        let names = SourceNames {
            builtin: names
                .into_iter()
                .map(|r| r.into_iter().next().flatten())
                .collect(),
            ..Default::default()
        };
        let batchable = if self.opts.net_batching {
            let q = self.relations[&oid].batchable_query();
            let rows = self.pipe.conn.simple_query(&q).await.map_err(conn_err)?;
            rows.first().and_then(|r| r.first().cloned().flatten()) == Some("true".into())
        } else {
            false
        };
        let entry = &self.relations[&oid];
        let mismatch = match entry.resolve(&rows, &self.types, &names) {
            Ok(mut t) => {
                t.batchable = batchable;
                let entry = self.relations.get_mut(&oid).expect("checked above");
                entry.target = Some(t);
                entry.batch_statements.clear();
                entry.statements.clear();
                return Ok(());
            }
            Err(m) => m,
        };
        // Name the source columns exactly (a domain's name, defaults) when
        // the source catalog can be read; the first answer stands otherwise.
        let mismatch = match self.source_columns(oid).await {
            Some(columns) => {
                let names = SourceNames { columns, ..names };
                entry
                    .resolve(&rows, &self.types, &names)
                    .err()
                    .unwrap_or(mismatch)
            }
            None => mismatch,
        };
        let database = self.opts.database.clone();
        Err(ApplyError::SchemaMismatch {
            remedy: match &mismatch.fix {
                // The stream retries a stopped apply, so it resumes by
                // itself once the target matches.
                Some(sql) => format!(
                    "run on the target database {database}: {sql} Apply retries and resumes once the target matches"
                ),
                None => format!(
                    "{} (database {database}); apply retries and resumes once the target matches",
                    mismatch.manual
                ),
            },
            database,
            table: entry.display.to_string(),
            difference: mismatch.difference,
            fix: mismatch.fix,
        })
    }

    /// The source catalog's definitions of a relation's columns, or None
    /// when no source is configured or it cannot be read (they only
    /// improve a message).
    async fn source_columns(&self, oid: u32) -> Option<HashMap<String, SourceColumn>> {
        let source = self.opts.source.as_ref()?;
        let query = self.relations.get(&oid)?.source_columns_query();
        let startup = [
            ("user".to_string(), source.user.clone()),
            ("database".to_string(), source.dbname.clone()),
            ("application_name".to_string(), "pgshift apply".to_string()),
        ];
        let read = async {
            let mut conn = ServerConnection::connect(
                &ConnectOptions::for_endpoint(source),
                &startup,
                source.password.as_ref().map(|p| p.expose()),
            )
            .await
            .ok()?;
            conn.simple_query("SET search_path = pg_catalog")
                .await
                .ok()?;
            conn.simple_query(&query).await.ok()
        };
        // An unreachable source must not hold up the error it would improve.
        let rows = tokio::time::timeout(Duration::from_secs(10), read)
            .await
            .ok()??;
        Some(SourceColumn::from_rows(&rows))
    }

    /// The named statement for a shape, queuing its Parse on first use.
    fn statement(&mut self, oid: u32, key: StmtKey) -> String {
        let entry = self.relations.get_mut(&oid).expect("resolved");
        if let Some(name) = entry.statements.get(&key) {
            return name.clone();
        }
        self.next_statement += 1;
        let name = format!("pgshift_s{}", self.next_statement);
        let (sql, types) = entry.statement_sql(&key);
        self.pipe.parse(&name, &sql, &types);
        entry.statements.insert(key, name.clone());
        name
    }

    async fn row(&mut self, oid: u32, change: RowChange) -> Result<(), ApplyError> {
        let Some(commit_lsn) = self.applying()? else {
            return Ok(());
        };
        if self.own_row(oid, &change)? {
            return Ok(());
        }
        self.ensure_target(oid).await?;
        let Some(change) = self.batch_row(oid, change).await? else {
            return Ok(());
        };
        // Applied on its own, after everything batched before it.
        self.flush_batch();
        let entry = &self.relations[&oid];
        let ncols = entry.source.columns.len();
        let table = entry.display.clone();
        let bad_width = |t: &Tuple| t.0.len() != ncols;
        let (key, params, what, expect): (StmtKey, Vec<Param<'_>>, &'static str, u64);
        match &change {
            RowChange::Insert(new) => {
                if bad_width(new) || new.0.contains(&TupleValue::UnchangedToast) {
                    return Err(self.protocol(format!("malformed Insert for {table}")));
                }
                key = StmtKey::Insert;
                params = new.0.iter().map(param).collect();
                what = "insert";
                expect = 1;
            }
            RowChange::Update(old, new) => {
                let old_tuple = old.as_ref().map(|(_, t)| t);
                if bad_width(new) || old_tuple.is_some_and(bad_width) {
                    return Err(self.protocol(format!("malformed Update for {table}")));
                }
                // Unchanged TOAST values stay as they are; without an old key
                // tuple the key did not change, so it is not set either (an
                // identity column GENERATED ALWAYS could not be).
                let keep_key = old.is_none() && !entry.full_identity();
                let mut set: Vec<bool> = new
                    .0
                    .iter()
                    .zip(&entry.source.columns)
                    .map(|(v, c)| *v != TupleValue::UnchangedToast && !(keep_key && c.key))
                    .collect();
                if !set.iter().any(|s| *s) {
                    // Only key columns: set them to themselves (the row must still exist).
                    set = new
                        .0
                        .iter()
                        .map(|v| *v != TupleValue::UnchangedToast)
                        .collect();
                }
                let (by, by_values) = self.locate(oid, old_tuple, Some(new))?;
                let mut p: Vec<Param<'_>> = new
                    .0
                    .iter()
                    .zip(&set)
                    .filter(|(_, s)| **s)
                    .map(|(v, _)| param(v))
                    .collect();
                p.extend(by_values);
                key = StmtKey::Update { set, by };
                params = p;
                what = "update";
                expect = 1;
            }
            RowChange::Delete(old) => {
                if bad_width(old) {
                    return Err(self.protocol(format!("malformed Delete for {table}")));
                }
                let (by, by_values) = self.locate(oid, Some(old), None)?;
                key = StmtKey::Delete { by };
                params = by_values;
                what = "delete";
                expect = 1;
            }
        }
        let stmt = self.statement(oid, key);
        self.open_group();
        self.pipe.execute(
            &stmt,
            &params,
            Op {
                commit_lsn,
                table: Some(table),
                what,
                expect_rows: Some(expect),
            },
        );
        self.group.statements += 1;
        self.group.single_rows += 1;
        if let Some(c) = self.current.as_mut() {
            c.statements += 1;
            match what {
                "insert" => c.counts.inserts += 1,
                "update" => c.counts.updates += 1,
                _ => c.counts.deletes += 1,
            }
        }
        if self.pipe.queued_bytes() >= self.opts.max_round_bytes {
            self.round().await?;
        }
        Ok(())
    }

    /// Which columns find the old row and their values. DEFAULT / USING
    /// INDEX: the key columns, from the old key tuple when the key changed,
    /// else from the new row. FULL: every old value that was sent.
    fn locate<'a>(
        &self,
        oid: u32,
        old: Option<&'a Tuple>,
        new: Option<&'a Tuple>,
    ) -> Result<(Vec<bool>, Vec<Param<'a>>), ApplyError> {
        let entry = &self.relations[&oid];
        let source = old
            .or(new)
            .ok_or_else(|| self.protocol("no tuple to find a row by"))?;
        let by: Vec<bool> = if entry.full_identity() && old.is_some() {
            source
                .0
                .iter()
                .map(|v| *v != TupleValue::UnchangedToast)
                .collect()
        } else {
            entry.key_mask()
        };
        if !by.iter().any(|b| *b) {
            return Err(self.protocol(format!(
                "{} has no replica identity columns to find rows by",
                entry.display
            )));
        }
        let mut values = Vec::new();
        for (i, v) in source.0.iter().enumerate().filter(|(i, _)| by[*i]) {
            if *v == TupleValue::UnchangedToast {
                return Err(self.protocol(format!(
                    "key column {} of {} was not sent (unchanged TOAST)",
                    entry.source.columns[i].name, entry.display
                )));
            }
            values.push(param(v));
        }
        Ok((by, values))
    }

    /// Folds a row change into the net-change batch when its table and
    /// shape allow; hands it back otherwise (to be applied on its own).
    async fn batch_row(
        &mut self,
        oid: u32,
        change: RowChange,
    ) -> Result<Option<RowChange>, ApplyError> {
        let entry = &self.relations[&oid];
        if self.exact
            || !self.opts.net_batching
            || !entry.target.as_ref().is_some_and(|t| t.batchable)
        {
            return Ok(Some(change));
        }
        let kind = match &change {
            RowChange::Insert(_) => BatchKind::Insert,
            RowChange::Update(..) => BatchKind::Update,
            RowChange::Delete(_) => BatchKind::Delete,
        };
        let key = entry.batch_key();
        let has_non_key = entry.source.columns.iter().any(|c| !c.key);
        let (offer, old) = match change {
            RowChange::Insert(new) => (Offer::Insert(new), None),
            RowChange::Update(old, new) => {
                // A changed key is applied on its own (it moves a row).
                let moved = old
                    .as_ref()
                    .is_some_and(|(_, o)| !same_key(o, &new, &key) || !key.iter().any(|k| *k));
                if moved || !has_non_key {
                    return Ok(Some(RowChange::Update(old, new)));
                }
                (Offer::Update(new), old)
            }
            RowChange::Delete(old) => (Offer::Delete(old), None),
        };
        let offer = match self.batch.offer(oid, &key, offer) {
            Ok(()) => None,
            Err(offer) if !self.batch.is_empty() => {
                // It cannot be folded into what is pending: send that first.
                self.flush_batch();
                self.batch.offer(oid, &key, offer).err()
            }
            Err(offer) => Some(offer),
        };
        if let Some(offer) = offer {
            return Ok(Some(match offer {
                Offer::Insert(t) => RowChange::Insert(t),
                Offer::Update(t) => RowChange::Update(old, t),
                Offer::Delete(t) => RowChange::Delete(t),
            }));
        }
        self.group.statements += 1;
        if let Some(c) = self.current.as_mut() {
            c.statements += 1;
            match kind {
                BatchKind::Insert => c.counts.inserts += 1,
                BatchKind::Update => c.counts.updates += 1,
                BatchKind::Delete => c.counts.deletes += 1,
            }
        }
        if self.batch.changes >= MAX_BATCH_CHANGES || self.batch.bytes >= self.opts.max_round_bytes
        {
            self.flush_batch();
            self.round().await?;
        }
        Ok(None)
    }

    /// Queues the statements of the net-change batch (one per table and
    /// operation), each checked to affect exactly its number of rows.
    fn flush_batch(&mut self) {
        if self.batch.is_empty() {
            return;
        }
        self.open_group();
        for tb in self.batch.take() {
            let oid = tb.oid;
            let entry = &self.relations[&oid];
            let table = entry.display.clone();
            let ncols = entry.source.columns.len();
            let key_cols: Vec<usize> = (0..ncols)
                .filter(|i| entry.source.columns[*i].key)
                .collect();
            let (deletes, updates, inserts) = tb.split();
            for (kind, rows, what) in [
                (BatchKind::Delete, deletes, "delete"),
                (BatchKind::Update, updates, "update"),
                (BatchKind::Insert, inserts, "insert"),
            ] {
                if rows.is_empty() {
                    continue;
                }
                let stmt = self.batch_statement(oid, kind);
                let cols: Vec<usize> = match kind {
                    BatchKind::Delete => key_cols.clone(),
                    _ => (0..ncols).collect(),
                };
                let arrays: Vec<Bytes> = cols
                    .iter()
                    .map(|c| batch::text_array(rows.iter().map(|r| &r.0[*c])))
                    .collect();
                let params: Vec<Param<'_>> = arrays.iter().map(|a| Param::Binary(a)).collect();
                self.pipe.execute(
                    &stmt,
                    &params,
                    Op {
                        commit_lsn: Lsn::ZERO,
                        table: Some(table.clone()),
                        what,
                        expect_rows: Some(rows.len() as u64),
                    },
                );
            }
        }
        self.batch_unverified = true;
    }

    /// The named statement of a batch kind, queuing its Parse on first use.
    fn batch_statement(&mut self, oid: u32, kind: BatchKind) -> String {
        let entry = self.relations.get_mut(&oid).expect("resolved");
        if let Some(name) = entry.batch_statements.get(&kind) {
            return name.clone();
        }
        self.next_statement += 1;
        let name = format!("pgshift_b{}", self.next_statement);
        let (sql, types) = entry.batch_sql(kind);
        self.pipe.parse(&name, &sql, &types);
        entry.batch_statements.insert(kind, name.clone());
        name
    }

    /// Records a message of the open group for a possible re-apply.
    async fn record(&mut self, msg: &PgOutputMessage) -> Result<(), ApplyError> {
        if self.exact
            || !self.opts.net_batching
            || matches!(
                msg,
                PgOutputMessage::StreamStart(_)
                    | PgOutputMessage::StreamStop
                    | PgOutputMessage::StreamAbort(_)
                    | PgOutputMessage::StreamCommit(_)
            )
        {
            return Ok(());
        }
        self.replay_bytes += message_size(msg);
        self.replay.push(msg.clone());
        if self.replay_bytes > MAX_REPLAY_BYTES {
            // Too much to keep: verify what is batched, then go on exactly.
            self.flush_batch();
            self.round().await?;
            self.stop_batching_for_group();
        }
        Ok(())
    }

    /// The rest of the open group is applied change by change.
    fn stop_batching_for_group(&mut self) {
        self.exact = true;
        self.replay = Vec::new();
        self.replay_bytes = 0;
        self.replay_group_end = 0;
    }

    /// After a group commit: keep only what belongs to the transaction
    /// still being received; batching resumes once a group starts clean.
    fn reset_batching(&mut self) {
        self.group_skipped = 0;
        if self.exact || self.current.is_none() {
            self.replay.clear();
            self.replay_bytes = 0;
            if self.current.is_none() {
                self.exact = false;
            }
        } else {
            self.replay
                .drain(..self.replay_group_end.min(self.replay.len()));
            self.replay_bytes = self.replay.iter().map(message_size).sum();
        }
        self.replay_group_end = 0;
    }

    /// A batched statement failed: rolls the group back and applies its
    /// messages again change by change, so that the failure (if it is one)
    /// is reported with its transaction, table and row.
    async fn apply_again_exactly(&mut self) -> Result<(), ApplyError> {
        let msgs = std::mem::take(&mut self.replay);
        self.replay_bytes = 0;
        self.replay_group_end = 0;
        self.pipe.clear();
        if self.pipe.conn.status != TxStatus::Idle {
            let r = self.pipe.conn.simple_query("ROLLBACK").await;
            r.map_err(|source| ApplyError::Connection {
                database: self.opts.database.clone(),
                source: Box::new(source),
            })?;
        }
        // Statements parsed after the failure were never prepared.
        for r in self.relations.values_mut() {
            r.statements.clear();
            r.batch_statements.clear();
        }
        self.stats.skipped_transactions -= self.group_skipped;
        self.group_skipped = 0;
        self.group = Group::default();
        self.current = None;
        self.batch = NetBatch::default();
        self.batch_unverified = false;
        self.exact = true;
        tracing::info!(
            database = %self.opts.database,
            messages = msgs.len(),
            "a batched statement failed; applying the group again change by change"
        );
        for m in msgs {
            Box::pin(self.dispatch(m)).await?;
        }
        Ok(())
    }

    /// A change of pgshift's own tables on the source (schema `pgshift`),
    /// which is never applied: an insert or update of the marker table is
    /// a marker of the transaction. Returns whether the change was one.
    fn own_row(&mut self, oid: u32, change: &RowChange) -> Result<bool, ApplyError> {
        let entry = self
            .relations
            .get(&oid)
            .ok_or_else(|| self.protocol(format!("change for unknown relation {oid}")))?;
        if !super::marker::is_pgshift_relation(&entry.source.namespace) {
            return Ok(false);
        }
        let new = match change {
            RowChange::Insert(new) | RowChange::Update(_, new) => new,
            RowChange::Delete(_) => return Ok(true),
        };
        if entry.source.name != self.marker_table {
            return Ok(true);
        }
        let id = entry
            .source
            .columns
            .iter()
            .position(|c| c.name == "id")
            .and_then(|i| new.0.get(i));
        let Some(TupleValue::Text(id)) = id else {
            return Err(self.protocol(format!(
                "a change of the marker table {} without its id",
                entry.display
            )));
        };
        let id = String::from_utf8_lossy(id).into_owned();
        if let Some(cur) = self.current.as_mut() {
            cur.markers.push(id);
        }
        Ok(true)
    }

    async fn truncate(&mut self, mut t: Truncate) -> Result<(), ApplyError> {
        let Some(commit_lsn) = self.applying()? else {
            return Ok(());
        };
        // pgshift's own tables on the source are not on the target.
        t.relations.retain(|oid| {
            self.relations
                .get(oid)
                .is_none_or(|e| !super::marker::is_pgshift_relation(&e.source.namespace))
        });
        let mut names = Vec::new();
        for oid in &t.relations {
            self.ensure_target(*oid).await?;
            let e = &self.relations[oid];
            let only = e.target.as_ref().is_some_and(|t| t.relkind != 'p');
            names.push(format!("{}{}", if only { "ONLY " } else { "" }, e.quoted));
        }
        if names.is_empty() {
            return Ok(());
        }
        self.flush_batch();
        let sql = format!(
            "TRUNCATE {}{}{}",
            names.join(", "),
            if t.restart_identity {
                " RESTART IDENTITY"
            } else {
                ""
            },
            if t.cascade { " CASCADE" } else { "" }
        );
        let table: std::sync::Arc<str> = t
            .relations
            .iter()
            .map(|o| self.relations[o].display.to_string())
            .collect::<Vec<_>>()
            .join(", ")
            .into();
        self.open_group();
        self.pipe.parse("", &sql, &[]);
        self.pipe.execute(
            "",
            &[],
            Op {
                commit_lsn,
                table: Some(table),
                what: "truncate",
                expect_rows: None,
            },
        );
        self.group.statements += 1;
        if let Some(c) = self.current.as_mut() {
            c.statements += 1;
            c.counts.truncates += t.relations.len() as u64;
        }
        Ok(())
    }
}

/// Whether an update's old key tuple has the same key values as its new row.
fn same_key(old: &Tuple, new: &Tuple, key: &[bool]) -> bool {
    old.0.len() == new.0.len()
        && old
            .0
            .iter()
            .zip(&new.0)
            .zip(key)
            .all(|((o, n), k)| !*k || o == n)
}

/// Roughly the memory a recorded message holds.
fn message_size(m: &PgOutputMessage) -> usize {
    let tuple = |t: &Tuple| -> usize {
        t.0.iter()
            .map(|v| match v {
                TupleValue::Text(b) | TupleValue::Binary(b) => b.len() + 16,
                _ => 16,
            })
            .sum()
    };
    64 + match m {
        PgOutputMessage::Insert(i) => tuple(&i.new),
        PgOutputMessage::Update(u) => tuple(&u.new) + u.old.as_ref().map_or(0, |(_, t)| tuple(t)),
        PgOutputMessage::Delete(d) => tuple(&d.old),
        _ => 0,
    }
}

enum RowChange {
    Insert(Tuple),
    Update(Option<(OldKind, Tuple)>, Tuple),
    Delete(Tuple),
}

fn param(v: &TupleValue) -> Param<'_> {
    match v {
        TupleValue::Null | TupleValue::UnchangedToast => Param::Null,
        TupleValue::Text(b) => Param::Text(b),
        TupleValue::Binary(b) => Param::Binary(b),
    }
}

/// The xid a change inside a streamed block carries.
fn change_xid(m: &PgOutputMessage) -> Option<u32> {
    match m {
        PgOutputMessage::Insert(x) => x.xid,
        PgOutputMessage::Update(x) => x.xid,
        PgOutputMessage::Delete(x) => x.xid,
        PgOutputMessage::Truncate(x) => x.xid,
        PgOutputMessage::Relation(x) => x.xid,
        PgOutputMessage::Type(x) => x.xid,
        PgOutputMessage::Message(x) => x.xid,
        _ => None,
    }
}

/// A query naming each source column's built-in type (by `format_type` on
/// the target: built-in OIDs are the same on every server), NULL for a user
/// type (its OID is the source's own).
fn source_type_query(entry: &RelEntry) -> String {
    let items: Vec<String> = entry
        .source
        .columns
        .iter()
        .enumerate()
        .map(|(i, c)| {
            if c.type_oid < relation::FIRST_NORMAL_OID {
                format!("({i}, format_type({}, {}))", c.type_oid, c.type_modifier)
            } else {
                format!("({i}, NULL)")
            }
        })
        .collect();
    if items.is_empty() {
        return "SELECT NULL WHERE false".into();
    }
    format!(
        "SELECT n FROM (VALUES {}) v(i, n) ORDER BY i",
        items.join(", ")
    )
}

/// A PostgreSQL timestamp (µs since 2000-01-01) as timestamptz text.
fn pg_timestamp(micros: i64) -> String {
    let unix = micros.saturating_add(super::pgoutput::PG_EPOCH_OFFSET_MICROS);
    match chrono::DateTime::from_timestamp_micros(unix) {
        Some(t) => t.format("%Y-%m-%d %H:%M:%S%.6f+00").to_string(),
        None => "now".into(),
    }
}

async fn setup_origin(conn: &mut ServerConnection, origin: &str) -> Result<Lsn, String> {
    let lit = quote_literal(origin);
    conn.simple_query(&format!(
        "SELECT pg_replication_origin_create({lit}) WHERE pg_replication_origin_oid({lit}) IS NULL"
    ))
    .await
    .map_err(|e| e.to_string())?;
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
            Err(e) => return Err(e.to_string()),
        }
    }
    let rows = conn
        .simple_query(&format!(
            "SELECT pg_replication_origin_progress({lit}, true)"
        ))
        .await
        .map_err(|e| e.to_string())?;
    match rows.first().and_then(|r| r.first().cloned().flatten()) {
        Some(s) => s.parse().map_err(|e: String| e),
        None => Ok(Lsn::ZERO),
    }
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
