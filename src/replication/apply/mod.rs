//! The apply engine for one database: decoded pgoutput transactions, in
//! commit order, applied to the target exactly once.
//!
//! Invariants:
//! - Rows and progress are one atomic fact: consecutive source transactions
//!   are grouped into one target transaction that also records where the
//!   last one's commit record ends in a replication origin, as PostgreSQL's
//!   own apply does; a restarted applier skips every transaction whose
//!   commit record starts before that position (`transaction`, `origin`).
//! - Only whole source transactions are committed; a streamed (v2+)
//!   transaction is applied as it arrives into an open target transaction
//!   of its own session, committed (with the origin's progress) at its
//!   Stream Commit (`streamed`).
//! - A net-change batch is exact: it holds only changes whose folding
//!   cannot be seen once the group commits, and every batched statement
//!   affects exactly its rows; when one fails, the group is rolled back and
//!   applied again change by change, which names the change at fault
//!   (`batch`, `batching`).
//! - A cutover marker is reported only once its transaction is committed on
//!   the target; pgshift's own tables are never applied (`markers`).
//! - After any error the applier is unusable: drop it, fix the cause,
//!   connect a new one and stream again from [`Applier::applied_position`].
//!
//! Feeding: the stream decodes pgoutput and hands each message to
//! [`Applier::handle`], then calls [`Applier::flush`] whenever its input is
//! idle, so complete transactions are committed promptly. Apply emits
//! nothing on the source: cutover markers are emitted by
//! [`replication::marker`](super::marker) and only recognised here.
//!
//! The pieces, each owning the part of the applier's state it uses:
//! - `transaction`: the transaction being received and the group it joins;
//!   pipeline rounds, group commit.
//! - `origin`: the replication origin: set-up, position, progress per group.
//! - `statements`: relations resolved on the target; row changes and
//!   TRUNCATE as statements (SQL text in `relation`, the extended-protocol
//!   pipeline in `pipeline`).
//! - `batching`: the group as net changes (the fold is `batch`), and the
//!   exact re-apply when a batched statement fails.
//! - `streamed`: in-progress (v2+) transactions applied as they arrive, each
//!   in its own target session (spilled to a file when none is free).
//! - `markers`: cutover markers recognised in the stream.
//! - `progress`: counters, metrics and committed markers, published per group.
//! - `error`: [`ApplyError`].

mod batch;
mod batching;
mod ddl;
mod error;
mod markers;
mod origin;
mod pipeline;
mod progress;
mod relation;
mod statements;
mod streamed;
mod transaction;

use std::time::Duration;

use tokio::sync::watch;

use self::batching::Batching;
use self::markers::MarkerTable;
use self::origin::{Origin, origin_name};
use self::pipeline::{Pipeline, RoundError};
use self::progress::Progress;
use self::statements::{Relations, RowChange};
use self::streamed::Streamed;
use self::transaction::Transactions;
use super::Lsn;
use super::pgoutput::PgOutputMessage;
use crate::config::Endpoint;
use crate::wire::messages::TxStatus;
use crate::wire::{ConnectOptions, ServerConnection, WireError};

pub use self::ddl::ApplyDdl;
pub use self::error::{ApplyError, SourceTxn};
pub(crate) use self::markers::Marker;
pub use self::markers::wait_for_marker;
pub(crate) use self::origin::OriginError;

/// The replication origin apply commits under for (`migration`, `db`): the
/// other direction's stream drops transactions of it.
pub(crate) fn origin_of(migration: &str, db: &str) -> String {
    origin_name(migration, db)
}
pub use self::progress::ApplyMetrics;
pub(crate) use self::progress::{ApplyProgress, ApplyStats};

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
    /// `client_encoding` of the target session: the encoding text arrives
    /// in (the replication connection asks for UTF8, so pgoutput's names
    /// and values, and DDL events, are UTF-8 whatever the databases'
    /// encoding); None leaves the server default (the database's).
    pub client_encoding: Option<String>,
    /// Fold the row changes of a group into one net change per row, applied
    /// as one statement per table and operation (see `batch`).
    pub net_batching: bool,
    /// The database the changes come from, read only to name its column
    /// definitions exactly in a schema mismatch (pgoutput names only a
    /// domain's base type); None: messages say what the stream says.
    pub source: Option<Endpoint>,
    /// Target sessions for streamed (in-progress) transactions: this many
    /// are applied as they arrive; more open at once are spilled to a
    /// temporary file and applied at their commit.
    pub streamed_sessions: usize,
    /// DDL events of the source's capture, applied in stream order; None:
    /// no capture (a schema change shows up as a mismatch).
    pub ddl: Option<ApplyDdl>,
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
            client_encoding: Some("UTF8".into()),
            net_batching: true,
            source: None,
            streamed_sessions: 4,
            ddl: None,
        }
    }
}

pub struct Applier {
    /// The target connection, statements queued on it.
    pipe: Pipeline,
    opts: ApplyOptions,
    origin: Origin,
    marker_table: MarkerTable,
    rel: Relations,
    tx: Transactions,
    streamed: Streamed,
    batching: Batching,
    progress: Progress,
    stopped: bool,
    /// The target database, for streamed transactions' sessions.
    target: Endpoint,
    /// A streamed transaction's session (see `streamed`): holds no origin
    /// and keeps no messages to re-apply.
    child: bool,
}

impl Applier {
    /// Connects to the target database (`target` must name it), sets up the
    /// replication origin and reads its position.
    pub async fn connect(
        target: &Endpoint,
        opts: ApplyOptions,
        metrics: Option<ApplyMetrics>,
    ) -> Result<Applier, ApplyError> {
        let mut pipe = open_session(target, &opts).await?;
        let database = opts.database.clone();
        let origin_name = origin_name(&opts.migration, &opts.database);
        let origin = Origin::set_up(&mut pipe.conn, origin_name.clone())
            .await
            .map_err(|error| ApplyError::Origin {
                database: database.clone(),
                origin: origin_name.clone(),
                error,
            })?;
        prepare(&mut pipe, &opts, &origin.name).await?;
        let progress = Progress::new(origin.applied, metrics);
        progress.export(&opts.database);
        Ok(Applier::assemble(
            pipe, opts, progress, origin, target, false,
        ))
    }

    /// Drops whatever is queued and rolls back the target transaction in
    /// progress, if any.
    async fn discard_open_transaction(&mut self) -> Result<(), ApplyError> {
        self.pipe.clear();
        if self.pipe.conn.status != TxStatus::Idle {
            let r = self.pipe.conn.simple_query("ROLLBACK").await;
            r.map_err(|source| ApplyError::Connection {
                database: self.opts.database.clone(),
                source: Box::new(source),
            })?;
        }
        Ok(())
    }

    fn assemble(
        pipe: Pipeline,
        opts: ApplyOptions,
        progress: Progress,
        origin: Origin,
        target: &Endpoint,
        child: bool,
    ) -> Applier {
        Applier {
            pipe,
            marker_table: MarkerTable::new(&opts.migration, &opts.database),
            progress,
            origin,
            opts,
            rel: Relations::default(),
            tx: Transactions::default(),
            streamed: Streamed::default(),
            batching: Batching::default(),
            stopped: false,
            target: target.clone(),
            child,
        }
    }

    /// A session for one streamed transaction: set up as apply's own, but
    /// without the origin, which it borrows only to commit.
    async fn connect_child(
        target: &Endpoint,
        opts: &ApplyOptions,
        origin: &Origin,
    ) -> Result<Applier, ApplyError> {
        let mut pipe = open_session(target, opts).await?;
        prepare(&mut pipe, opts, &origin.name).await?;
        let origin = Origin {
            name: origin.name.clone(),
            applied: origin.applied,
        };
        let progress = Progress::new(origin.applied, None);
        Ok(Applier::assemble(
            pipe,
            opts.clone(),
            progress,
            origin,
            target,
            true,
        ))
    }

    /// The replication origin's name.
    pub fn origin(&self) -> &str {
        &self.origin.name
    }

    /// The end of the last applied source transaction's commit record (the
    /// origin's position): stream from here after a restart, report it as
    /// written/flushed to the source, and compute lag from it.
    pub fn applied_position(&self) -> Lsn {
        self.origin.applied
    }

    pub fn stats(&self) -> &ApplyStats {
        &self.progress.stats
    }

    /// A receiver of progress (stats and committed markers) for other tasks.
    pub fn subscribe(&self) -> watch::Receiver<ApplyProgress> {
        self.progress.subscribe()
    }

    /// Nothing received is still unapplied: no transaction half received,
    /// none waiting to be committed, no streamed (v2) transaction open. Only
    /// then may a keepalive's position be reported as flushed.
    pub(crate) fn is_idle(&self) -> bool {
        self.tx.current.is_none() && self.tx.group.transactions == 0 && self.streamed.is_empty()
    }

    /// Streamed transactions open on the source (applied or spilled).
    pub(crate) fn streamed_open(&self) -> usize {
        self.streamed.len()
    }

    /// Complete transactions received but not yet committed on the target.
    pub(crate) fn has_pending(&self) -> bool {
        self.tx.group.transactions > 0
    }

    /// Applies one decoded message. Messages must come in the order the
    /// server sent them; whole transactions are committed in groups.
    pub async fn handle(&mut self, msg: PgOutputMessage) -> Result<(), ApplyError> {
        self.handle_with_bytes(msg, None).await
    }

    /// [`handle`](Self::handle), with the message's wire bytes: a streamed
    /// transaction that must be spilled is written to its file as such (a
    /// spill without them is kept in memory).
    pub async fn handle_with_bytes(
        &mut self,
        msg: PgOutputMessage,
        raw: Option<bytes::Bytes>,
    ) -> Result<(), ApplyError> {
        self.check_running()?;
        let mut r = match self.streamed.in_block() {
            Some(xid) => self.stream_message(xid, msg, raw).await,
            None => self.dispatch(msg).await,
        };
        if matches!(r, Err(ApplyError::Replay)) {
            r = self.apply_again_exactly().await;
        }
        self.check(r).await
    }

    /// Commits the complete transactions received so far. In the middle of
    /// a transaction that already wrote rows, the group commits with it.
    pub async fn flush(&mut self) -> Result<Lsn, ApplyError> {
        self.check_running()?;
        self.check_streamed().await?;
        if self.tx.current.as_ref().is_some_and(|c| c.statements > 0) {
            return Ok(self.origin.applied);
        }
        let r = self.commit_group_exactly().await;
        self.check(r).await?;
        Ok(self.origin.applied)
    }

    /// A streamed transaction's session that failed stops apply now, not
    /// when its transaction's next block or commit arrives (the stream asks
    /// on every status tick).
    pub(crate) async fn check_streamed(&mut self) -> Result<(), ApplyError> {
        self.check_running()?;
        let r = self.streamed_failure().await;
        self.check(r).await
    }

    /// Commits the open group; when a batched statement failed, applies it
    /// again change by change first.
    async fn commit_group_exactly(&mut self) -> Result<(), ApplyError> {
        match self.commit_group().await {
            Err(ApplyError::Replay) => {
                self.apply_again_exactly().await?;
                self.commit_group().await
            }
            r => r,
        }
    }

    /// Dispatches a message outside the stream's own order (a spilled
    /// transaction read back); a batched statement that failed is applied
    /// again change by change before going on.
    async fn dispatch_exactly(&mut self, msg: PgOutputMessage) -> Result<(), ApplyError> {
        match Box::pin(self.dispatch(msg)).await {
            Err(ApplyError::Replay) => self.apply_again_exactly().await,
            r => r,
        }
    }

    /// Forgets everything not yet committed on the target, for when the
    /// source stream restarts (after losing the source connection): stream
    /// again from the returned position.
    pub async fn restart_stream(&mut self) -> Result<Lsn, ApplyError> {
        self.check_running()?;
        self.pipe.clear();
        // Parses that were queued are gone with the queue: prepare anew.
        self.rel.forget_statements();
        self.tx = Transactions::default();
        self.batching.discard_batch();
        self.reset_batching();
        self.streamed = Streamed::default();
        if self.pipe.conn.status != TxStatus::Idle {
            let r = self.pipe.conn.simple_query("ROLLBACK").await;
            let r = r.map(|_| ()).map_err(|source| ApplyError::Connection {
                database: self.opts.database.clone(),
                source: Box::new(source),
            });
            self.check(r).await?;
        }
        Ok(self.origin.applied)
    }

    fn check_running(&self) -> Result<(), ApplyError> {
        if self.stopped {
            return Err(ApplyError::Stopped {
                database: self.opts.database.clone(),
            });
        }
        Ok(())
    }

    /// On error: roll back the open target transaction, count, stop.
    async fn check<T>(&mut self, r: Result<T, ApplyError>) -> Result<T, ApplyError> {
        if r.is_err() {
            self.stopped = true;
            // Streamed transactions' sessions close, rolling back.
            self.streamed = Streamed::default();
            self.pipe.clear();
            if self.pipe.conn.status != TxStatus::Idle {
                // The connection may be gone: do not wait on it for long.
                let rollback = self.pipe.conn.simple_query("ROLLBACK");
                let _ = tokio::time::timeout(Duration::from_secs(5), rollback).await;
            }
            self.progress.error(&self.opts.database);
        }
        r
    }

    fn protocol(&self, detail: impl Into<String>) -> ApplyError {
        ApplyError::Protocol {
            database: self.opts.database.clone(),
            detail: detail.into(),
        }
    }

    /// Routes one message to the piece that handles it.
    async fn dispatch(&mut self, msg: PgOutputMessage) -> Result<(), ApplyError> {
        self.record(&msg).await?;
        match msg {
            PgOutputMessage::Begin(b) => self.begin(b),
            PgOutputMessage::Commit(c) => self.commit(c).await,
            PgOutputMessage::Origin(_) => Ok(()),
            PgOutputMessage::Relation(r) => self.relation(r).await,
            PgOutputMessage::Type(t) => {
                self.rel.types.insert(t.oid, t);
                Ok(())
            }
            PgOutputMessage::Insert(i) => self.row(i.relation, RowChange::Insert(i.new)).await,
            PgOutputMessage::Update(u) => {
                self.row(u.relation, RowChange::Update(u.old, u.new)).await
            }
            PgOutputMessage::Delete(d) => self.row(d.relation, RowChange::Delete(d.old)).await,
            PgOutputMessage::Truncate(t) => self.truncate(t).await,
            PgOutputMessage::Message(m) => {
                if self.ddl_message(&m).await? {
                    return Ok(());
                }
                self.message(m)
            }
            PgOutputMessage::StreamStart(s) => self.stream_start(s).await,
            PgOutputMessage::StreamStop => Err(self.protocol("Stream Stop outside a stream")),
            PgOutputMessage::StreamAbort(a) => self.stream_abort(a).await,
            PgOutputMessage::StreamCommit(c) => self.stream_commit(c).await,
        }
    }
}

/// A target session set up for apply: replica role (no user triggers or FK
/// checks fire for replayed rows), the source's encoding, and commits that
/// do not wait for the WAL flush (as native subscriptions do): only
/// `durable_position()` — flushed origin progress — is ever reported to the
/// source. A cutover needs no flush here either: it persists "switched"
/// synchronously on the same target server before any client runs there,
/// which flushes the WAL through every group applied before it.
async fn open_session(target: &Endpoint, opts: &ApplyOptions) -> Result<Pipeline, ApplyError> {
    let conn_err = |source: WireError| ApplyError::Connection {
        database: opts.database.clone(),
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
    let mut conn = ServerConnection::connect(
        &ConnectOptions::for_endpoint(target),
        &startup,
        target.password.as_ref().map(|p| p.expose()),
    )
    .await
    .map_err(conn_err)?;
    conn.simple_query(
        "SET session_replication_role = replica; SET synchronous_commit = off; SET default_transaction_read_only = off",
    )
        .await
        .map_err(conn_err)?;
    Ok(Pipeline::new(conn))
}

/// Prepares the statements every group needs on a new session.
async fn prepare(pipe: &mut Pipeline, opts: &ApplyOptions, origin: &str) -> Result<(), ApplyError> {
    Transactions::prepare(pipe);
    Origin::prepare(pipe);
    match pipe.sync().await {
        Ok(_) => Ok(()),
        Err(RoundError::Wire(source)) => Err(ApplyError::Connection {
            database: opts.database.clone(),
            source: Box::new(source),
        }),
        Err(e) => Err(ApplyError::Origin {
            database: opts.database.clone(),
            origin: origin.to_string(),
            error: OriginError::Prepare(format!("{e:?}")),
        }),
    }
}
