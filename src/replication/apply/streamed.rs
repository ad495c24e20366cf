//! Streamed (protocol v2+) transactions: a large transaction still in
//! progress on the source arrives in blocks between Stream Start and Stream
//! Stop, interleaved with other transactions, and ends with Stream Commit
//! or Stream Abort.
//!
//! Each streamed transaction is applied as it arrives, into an open target
//! transaction of its own: a connection of a small bounded pool, set up as
//! apply's own (replica role, encoding), holding a child applier that
//! applies the blocks' changes. A change of a subtransaction not seen before
//! opens a SAVEPOINT (each change in a block carries its (sub)transaction's
//! xid); Stream Abort of a subtransaction rolls back to its savepoint, of
//! the whole transaction rolls back. Stream Commit commits the ordinary
//! transactions received before it, then hands the replication origin to
//! the streamed transaction's session, which sets the origin's progress and
//! commits: rows and progress stay one atomic fact, so exactly-once holds
//! (a pgshift killed mid-stream loses the open target transaction with its
//! connection and receives the whole transaction again from the slot).
//!
//! Each such session is driven by a task of its own, fed through a bounded
//! channel: the stream goes on being received and decoded while the target
//! applies the blocks before (a large transaction's rows reach the target
//! while the source is still writing them), and only the block received
//! last is left to apply after the source's commit.
//!
//! When more streamed transactions are open than the pool has connections,
//! the others are spilled to a temporary file (never memory) and applied as
//! one ordinary transaction at Stream Commit; a log line and
//! `pgshift_apply_spilled_transactions_total` say so.
//!
//! Lock waits between sessions (why a second connection cannot deadlock the
//! single task that drives all of them): on the source, two transactions
//! that touch the same row (or unique key, or table by TRUNCATE) wait for
//! each other, so the later one commits after the earlier one ends.
//! - An ordinary transaction received while a streamed one is open
//!   committed first on the source, so it touched nothing the streamed one
//!   still holds: its target group never waits on a streamed session (locks
//!   of a subtransaction rolled back on the source are released on the
//!   target too: its Stream Abort arrives before any later commit).
//! - A streamed block may touch rows an ordinary transaction touched just
//!   before it committed on the source. That transaction may still be in the
//!   main session's open group: the group is committed before every streamed
//!   block is applied, so a streamed session never waits on the main one.
//! - Two streamed transactions cannot hold the same row either; one that
//!   waited for another on the source continues only after that one's
//!   Stream Commit, which is committed on the target first (the stream
//!   waits for its session's commit before anything after it is passed on).
//! - Locks freed on the source by a rolled-back subtransaction or transaction
//!   are freed on the target by the session's own task, in its own order
//!   (a whole transaction's session is dropped, closing its connection):
//!   whoever waits for them there waits for a task that waits for nobody.
//!
//! A streamed transaction still open is not caught up: the applier is not
//! idle until it commits or aborts, so no keepalive position is reported
//! past it and lag counts from the committed position.

use std::collections::HashMap;
use std::io::SeekFrom;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use super::origin::{acquire_origin, release_origin};
use super::pipeline::Op;
use super::progress::{CommittedGroup, OpCounts};
use super::{Applier, ApplyError, Marker};
use crate::replication::Lsn;
use crate::replication::pgoutput::{
    self, Begin, Commit, PgOutputMessage, StreamAbort, StreamCommit, StreamStart,
};
use crate::wire::messages::TxStatus;

/// Streamed transactions open on the source.
#[derive(Default)]
pub(super) struct Streamed {
    /// Applied as they arrive, each in its own target session.
    live: HashMap<u32, Box<LiveTxn>>,
    /// Spilled to a temporary file until Stream Commit (the pool was full).
    spilled: HashMap<u32, Spill>,
    /// The transaction whose block is being received.
    open: Option<u32>,
}

/// A streamed transaction applied into an open target transaction, by a
/// task of its own (see [`run_live`]); dropping it ends the task and closes
/// its session, rolling the transaction back.
struct LiveTxn {
    to: mpsc::Sender<Cmd>,
    task: JoinHandle<Result<(), ApplyError>>,
}

/// Messages queued for a streamed transaction's task: enough for the target
/// to stay busy, little enough to bound memory.
const LIVE_QUEUE: usize = 1024;

/// What the stream asks of a streamed transaction's task, in stream order.
enum Cmd {
    /// A change (or a Relation / Type) of the block.
    Change(PgOutputMessage),
    /// The block ended: apply what it carried now, not at the commit.
    BlockEnd,
    /// A subtransaction was rolled back on the source.
    AbortSub(u32),
    /// Stream Commit: apply the rest and commit with the origin (released
    /// by the main session meanwhile); the reply carries what was applied.
    Commit {
        end_lsn: Lsn,
        commit_time: i64,
        reply: oneshot::Sender<(OpCounts, Vec<String>)>,
    },
}

impl Drop for LiveTxn {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl LiveTxn {
    fn start(apply: Applier, xid: u32) -> LiveTxn {
        let (to, from) = mpsc::channel(LIVE_QUEUE);
        LiveTxn {
            to,
            task: tokio::spawn(run_live(apply, xid, from)),
        }
    }

    /// Queues `cmd`; when the task has ended, returns why.
    async fn send(&mut self, cmd: Cmd) -> Result<(), ApplyError> {
        if self.to.send(cmd).await.is_err() {
            return Err(self.failure().await);
        }
        Ok(())
    }

    /// Why the task ended before it was told to.
    async fn failure(&mut self) -> ApplyError {
        match (&mut self.task).await {
            Ok(Err(e)) => e,
            Ok(Ok(())) => ApplyError::Protocol {
                database: String::new(),
                detail: "a streamed transaction's session ended before its commit".into(),
            },
            Err(e) => ApplyError::Protocol {
                database: String::new(),
                detail: format!("a streamed transaction's session failed: {e}"),
            },
        }
    }

    /// Commits the transaction on its session; returns what it applied.
    async fn commit(
        mut self,
        end_lsn: Lsn,
        commit_time: i64,
    ) -> Result<(OpCounts, Vec<String>), ApplyError> {
        let (reply, answer) = oneshot::channel();
        self.send(Cmd::Commit {
            end_lsn,
            commit_time,
            reply,
        })
        .await?;
        match answer.await {
            Ok(applied) => Ok(applied),
            Err(_) => Err(self.failure().await),
        }
    }
}

/// A streamed transaction's task: applies what the stream passes on, in
/// order, into its session's open transaction. Ends with the commit, with
/// an error, or — when the stream drops it — rolling back.
async fn run_live(
    mut apply: Applier,
    xid: u32,
    mut from: mpsc::Receiver<Cmd>,
) -> Result<(), ApplyError> {
    // Subtransactions with a savepoint, in the order they appeared.
    let mut subxacts: Vec<u32> = Vec::new();
    while let Some(cmd) = from.recv().await {
        match cmd {
            Cmd::Change(msg) => {
                let sub = apply.change_subxact(&msg).filter(|s| *s != xid && *s != 0);
                if let Some(sub) = sub
                    && !subxacts.contains(&sub)
                {
                    // Everything before belongs to the enclosing (sub)transaction.
                    apply.flush_batch().await?;
                    apply.open_group();
                    apply.control(&format!("SAVEPOINT {}", savepoint(sub)), "SAVEPOINT");
                    subxacts.push(sub);
                }
                Box::pin(apply.dispatch(msg)).await?;
            }
            Cmd::BlockEnd => {
                apply.flush_batch().await?;
                apply.round().await?;
            }
            Cmd::AbortSub(subxid) => {
                apply.flush_batch().await?;
                if let Some(i) = subxacts.iter().position(|s| *s == subxid) {
                    let sql = format!("ROLLBACK TO SAVEPOINT {}", savepoint(subxid));
                    apply.control(&sql, "ROLLBACK TO SAVEPOINT");
                    // Later subtransactions were nested in it: gone with it.
                    subxacts.truncate(i);
                }
                apply.round().await?;
            }
            Cmd::Commit {
                end_lsn,
                commit_time,
                reply,
            } => {
                apply.flush_batch().await?;
                apply.round().await?;
                let current = apply.tx.current.as_mut();
                let counts = current.as_ref().map(|c| c.counts).unwrap_or_default();
                let markers = current
                    .map(|c| std::mem::take(&mut c.markers))
                    .unwrap_or_default();
                apply.commit_streamed(end_lsn, commit_time).await?;
                let _ = reply.send((counts, markers));
                return Ok(());
            }
        }
    }
    apply.close().await
}

/// A streamed transaction's messages in a temporary file.
struct Spill {
    file: tokio::fs::File,
    len: u64,
    /// Where each subtransaction's first change starts, to cut it off when
    /// it aborts.
    subxacts: Vec<(u32, u64)>,
    /// Messages that came without their wire bytes (only through
    /// [`Applier::handle`], as tests call it), kept in memory; positions
    /// then count messages.
    decoded: Vec<PgOutputMessage>,
}

impl Streamed {
    /// No streamed transaction is open, applied or spilled.
    pub(super) fn is_empty(&self) -> bool {
        self.live.is_empty() && self.spilled.is_empty() && self.open.is_none()
    }

    /// Streamed transactions open on the source.
    pub(super) fn len(&self) -> usize {
        self.live.len() + self.spilled.len()
    }

    /// Inside a block: the block's transaction.
    pub(super) fn in_block(&self) -> Option<u32> {
        self.open
    }
}

impl Applier {
    /// Routes a message inside a streamed block (`raw`: its wire bytes, for
    /// a spill) to the transaction's session or spill file.
    pub(super) async fn stream_message(
        &mut self,
        xid: u32,
        msg: PgOutputMessage,
        raw: Option<Bytes>,
    ) -> Result<(), ApplyError> {
        if let PgOutputMessage::StreamStop = msg {
            self.streamed.open = None;
            if let Some(t) = self.streamed.live.get_mut(&xid) {
                // What the block carried is applied now, not at commit.
                let r = t.send(Cmd::BlockEnd).await;
                return r.map_err(|e| self.named(e));
            }
            return Ok(());
        }
        if let PgOutputMessage::Message(m) = &msg
            && !m.transactional
        {
            return Ok(());
        }
        if matches!(
            msg,
            PgOutputMessage::StreamStart(_)
                | PgOutputMessage::StreamCommit(_)
                | PgOutputMessage::StreamAbort(_)
                | PgOutputMessage::Begin(_)
                | PgOutputMessage::Commit(_)
        ) {
            return Err(self.protocol(format!(
                "{} inside the streamed block of transaction {xid}",
                message_kind(&msg)
            )));
        }
        if matches!(msg, PgOutputMessage::Relation(_) | PgOutputMessage::Type(_)) {
            // Not transactional: the main applier learns them too, as
            // pgoutput does not send them again after the transaction.
            Box::pin(self.dispatch(msg.clone())).await?;
            if !self.streamed.live.contains_key(&xid) {
                return Ok(());
            }
        }
        if let Some(t) = self.streamed.live.get_mut(&xid) {
            let r = t.send(Cmd::Change(msg)).await;
            return r.map_err(|e| self.named(e));
        }
        let sub = self.change_subxact(&msg).filter(|s| *s != xid && *s != 0);
        let Some(spill) = self.streamed.spilled.get_mut(&xid) else {
            return Err(self.protocol(format!("streamed block of unknown transaction {xid}")));
        };
        if let Some(sub) = sub
            && !spill.subxacts.iter().any(|(s, _)| *s == sub)
        {
            spill.subxacts.push((sub, spill.position()));
        }
        let r = spill.append(msg, raw).await;
        r.map_err(|e| self.spill_error(xid, e))
    }

    /// The error of a streamed transaction's session that has ended on one.
    pub(super) async fn streamed_failure(&mut self) -> Result<(), ApplyError> {
        let failed = self
            .streamed
            .live
            .iter()
            .find(|(_, t)| t.task.is_finished())
            .map(|(xid, _)| *xid);
        let Some(mut t) = failed.and_then(|xid| self.streamed.live.remove(&xid)) else {
            return Ok(());
        };
        let e = t.failure().await;
        Err(self.named(e))
    }

    pub(super) async fn stream_start(&mut self, s: StreamStart) -> Result<(), ApplyError> {
        if let Some(open) = self.streamed.open {
            return Err(self.protocol(format!(
                "Stream Start of transaction {} inside the block of {open}",
                s.xid
            )));
        }
        let known =
            self.streamed.live.contains_key(&s.xid) || self.streamed.spilled.contains_key(&s.xid);
        if s.first_segment && known {
            return Err(self.protocol(format!("streamed transaction {} started twice", s.xid)));
        }
        if !s.first_segment && !known {
            // Applying the rest of a transaction would apply part of it.
            return Err(self.protocol(format!(
                "streamed transaction {} continues without its first segment",
                s.xid
            )));
        }
        if s.first_segment {
            self.open_streamed(s.xid).await?;
        }
        if self.streamed.live.contains_key(&s.xid) {
            // A streamed session never waits on the main one (see above).
            self.commit_group_exactly().await?;
        }
        self.streamed.open = Some(s.xid);
        Ok(())
    }

    /// A new streamed transaction: a session of its own while the pool has
    /// one and the target lets it connect, else a spill file.
    async fn open_streamed(&mut self, xid: u32) -> Result<(), ApplyError> {
        if self.streamed.live.len() < self.opts.streamed_sessions {
            match Applier::connect_child(&self.target, &self.opts, &self.origin).await {
                Ok(mut apply) => {
                    apply.begin(Begin {
                        // Unknown until Stream Commit, which decides whether
                        // the transaction is applied or skipped.
                        final_lsn: Lsn(u64::MAX),
                        commit_time: 0,
                        xid,
                    })?;
                    self.streamed
                        .live
                        .insert(xid, Box::new(LiveTxn::start(apply, xid)));
                    return Ok(());
                }
                // E.g. no connection slot left (sessions moving at a
                // cutover take them): the main session is enough.
                Err(e) => tracing::warn!(
                    database = %self.opts.database,
                    xid,
                    "cannot open a target session for a streamed transaction ({e}): it is spilled to a temporary file and applied at its commit"
                ),
            }
        } else {
            tracing::info!(
                database = %self.opts.database,
                xid,
                open = self.streamed.len(),
                sessions = self.opts.streamed_sessions,
                "more streamed transactions are open than apply has sessions for: this one is spilled to a temporary file and applied at its commit"
            );
        }
        self.progress.spilled(&self.opts.database);
        let file = tempfile::tempfile().map_err(|e| self.spill_error(xid, e))?;
        self.streamed.spilled.insert(
            xid,
            Spill {
                file: tokio::fs::File::from_std(file),
                len: 0,
                subxacts: Vec::new(),
                decoded: Vec::new(),
            },
        );
        Ok(())
    }

    pub(super) async fn stream_abort(&mut self, a: StreamAbort) -> Result<(), ApplyError> {
        if let Some(spill) = self.streamed.spilled.get_mut(&a.xid) {
            if a.xid == a.subxid {
                self.streamed.spilled.remove(&a.xid);
            } else if let Some(i) = spill.subxacts.iter().position(|(s, _)| *s == a.subxid) {
                let at = spill.subxacts[i].1;
                spill.subxacts.truncate(i);
                let r = spill.truncate(at).await;
                r.map_err(|e| self.spill_error(a.xid, e))?;
            }
            return Ok(());
        }
        if a.xid == a.subxid {
            // Its task ends and its session closes, rolling back.
            self.streamed.live.remove(&a.xid);
            return Ok(());
        }
        let Some(t) = self.streamed.live.get_mut(&a.xid) else {
            // Aborted before any block of it arrived.
            return Ok(());
        };
        let r = t.send(Cmd::AbortSub(a.subxid)).await;
        r.map_err(|e| self.named(e))
    }

    pub(super) async fn stream_commit(&mut self, c: StreamCommit) -> Result<(), ApplyError> {
        if let Some(spill) = self.streamed.spilled.remove(&c.xid) {
            return self.apply_spill(c, spill).await;
        }
        let Some(t) = self.streamed.live.remove(&c.xid) else {
            if c.commit_lsn < self.origin.applied {
                self.progress.stats.skipped_transactions += 1;
                return Ok(());
            }
            return Err(self.protocol(format!(
                "Stream Commit of transaction {} that was never streamed",
                c.xid
            )));
        };
        // Ordinary transactions received before it committed before it.
        self.commit_group_exactly().await?;
        if c.commit_lsn < self.origin.applied {
            // Already applied before a restart: its session rolls back.
            self.progress.stats.skipped_transactions += 1;
            return Ok(());
        }
        // The origin may be bound to one session at a time: lend it to the
        // streamed session for its commit, then take it back.
        release_origin(&mut self.pipe.conn, &self.origin.name)
            .await
            .map_err(|e| self.origin_error(e))?;
        let (counts, markers) = t
            .commit(c.end_lsn, c.commit_time)
            .await
            .map_err(|e| self.named(e))?;
        acquire_origin(&mut self.pipe.conn, &self.origin.name)
            .await
            .map_err(|e| self.origin_error(e))?;
        self.streamed_committed(c, counts, markers);
        Ok(())
    }

    /// Records a streamed transaction committed on the target.
    fn streamed_committed(&mut self, c: StreamCommit, counts: OpCounts, markers: Vec<String>) {
        self.origin.applied = c.end_lsn;
        self.progress.committed(
            &self.opts.database,
            CommittedGroup {
                lsn: c.end_lsn,
                pending_since: None,
                transactions: 1,
                counts,
                markers: markers
                    .into_iter()
                    .map(|id| Marker {
                        id,
                        commit_lsn: c.commit_lsn,
                    })
                    .collect(),
            },
        );
    }

    /// A spilled transaction, read back and applied as one ordinary
    /// transaction (and recorded as one, so that a re-apply of the group
    /// needs no stream state).
    async fn apply_spill(&mut self, c: StreamCommit, spill: Spill) -> Result<(), ApplyError> {
        let xid = c.xid;
        let begin = PgOutputMessage::Begin(Begin {
            final_lsn: c.commit_lsn,
            commit_time: c.commit_time,
            xid,
        });
        self.dispatch_exactly(begin).await?;
        let Spill {
            file, len, decoded, ..
        } = spill;
        for m in decoded {
            self.dispatch_exactly(m).await?;
        }
        let mut file = file;
        file.seek(SeekFrom::Start(0))
            .await
            .map_err(|e| self.spill_error(xid, e))?;
        let mut reader = BufReader::new(file);
        let mut at = 0u64;
        while at < len {
            let n = reader
                .read_u32()
                .await
                .map_err(|e| self.spill_error(xid, e))?;
            let mut buf = BytesMut::zeroed(n as usize);
            reader
                .read_exact(&mut buf)
                .await
                .map_err(|e| self.spill_error(xid, e))?;
            at += 4 + u64::from(n);
            let m = pgoutput::decode(buf.freeze(), true)
                .map_err(|e| self.protocol(format!("spilled transaction {xid}: {e}")))?;
            self.dispatch_exactly(m).await?;
        }
        let commit = PgOutputMessage::Commit(Commit {
            flags: c.flags,
            commit_lsn: c.commit_lsn,
            end_lsn: c.end_lsn,
            commit_time: c.commit_time,
        });
        self.dispatch_exactly(commit).await
    }

    /// Queues a control statement (SAVEPOINT …) on the unnamed statement.
    pub(super) fn control(&mut self, sql: &str, what: &'static str) {
        self.pipe.parse("", sql, &[]);
        self.pipe.execute("", &[], Op::control(what));
    }

    /// A child applier's commit: the origin (released by the main session)
    /// is bound here, its progress set, the transaction committed, the
    /// origin released again and the session closed.
    async fn commit_streamed(mut self, end_lsn: Lsn, commit_time: i64) -> Result<(), ApplyError> {
        acquire_origin(&mut self.pipe.conn, &self.origin.name)
            .await
            .map_err(|e| self.origin_error(e))?;
        super::origin::Origin::queue_progress(&mut self.pipe, end_lsn, commit_time);
        self.pipe
            .execute(super::transaction::STMT_COMMIT, &[], Op::control("COMMIT"));
        self.tx.group.last_commit_lsn = Lsn::ZERO;
        let status = self.sync().await?;
        if status != TxStatus::Idle {
            return Err(self.protocol(format!(
                "streamed session still in a transaction ({status:?}) after COMMIT"
            )));
        }
        release_origin(&mut self.pipe.conn, &self.origin.name)
            .await
            .map_err(|e| self.origin_error(e))?;
        Ok(())
    }

    /// Rolls a child applier's transaction back and closes its session.
    async fn close(mut self) -> Result<(), ApplyError> {
        self.discard_open_transaction().await?;
        Ok(())
    }

    /// A streamed session's error, named with this stream's database where
    /// the session could not name it.
    fn named(&self, e: ApplyError) -> ApplyError {
        match e {
            ApplyError::Protocol { database, detail } if database.is_empty() => {
                ApplyError::Protocol {
                    database: self.opts.database.clone(),
                    detail,
                }
            }
            e => e,
        }
    }

    fn spill_error(&self, xid: u32, e: std::io::Error) -> ApplyError {
        ApplyError::Spill {
            database: self.opts.database.clone(),
            xid,
            source: e,
        }
    }
}

impl Spill {
    /// Where the next message goes: a byte offset in the file, or a count
    /// of messages kept in memory.
    fn position(&self) -> u64 {
        self.len + self.decoded.len() as u64
    }

    async fn append(&mut self, msg: PgOutputMessage, raw: Option<Bytes>) -> std::io::Result<()> {
        match raw {
            Some(raw) if self.decoded.is_empty() => {
                let n = u32::try_from(raw.len()).map_err(std::io::Error::other)?;
                self.file.seek(SeekFrom::Start(self.len)).await?;
                self.file.write_u32(n).await?;
                self.file.write_all(&raw).await?;
                self.len += 4 + u64::from(n);
            }
            _ if self.len == 0 => self.decoded.push(msg),
            _ => {
                return Err(std::io::Error::other(
                    "a message without its wire bytes after spilled ones",
                ));
            }
        }
        Ok(())
    }

    async fn truncate(&mut self, at: u64) -> std::io::Result<()> {
        if !self.decoded.is_empty() {
            self.decoded.truncate(at as usize);
            return Ok(());
        }
        self.file.flush().await?;
        self.file.set_len(at).await?;
        self.len = at;
        Ok(())
    }
}

/// The savepoint of a subtransaction.
fn savepoint(subxid: u32) -> String {
    format!("pgshift_sub_{subxid}")
}

fn message_kind(m: &PgOutputMessage) -> &'static str {
    match m {
        PgOutputMessage::Begin(_) => "Begin",
        PgOutputMessage::Commit(_) => "Commit",
        PgOutputMessage::StreamStart(_) => "Stream Start",
        PgOutputMessage::StreamCommit(_) => "Stream Commit",
        PgOutputMessage::StreamAbort(_) => "Stream Abort",
        _ => "message",
    }
}

/// The xid a change inside a streamed block carries.
impl Applier {
    /// The (sub)transaction a streamed change belongs to. pgoutput names a
    /// streamed logical message by its top-level transaction, so a DDL
    /// event carries its own (a rollback to a savepoint undoes it too).
    fn change_subxact(&self, m: &PgOutputMessage) -> Option<u32> {
        if let (PgOutputMessage::Message(msg), Some(d)) = (m, &self.opts.ddl)
            && let Some(sub) = crate::replication::ddl::event_subxact(&d.names.prefix, msg)
        {
            return Some(sub);
        }
        change_xid(m)
    }
}

fn change_xid(m: &PgOutputMessage) -> Option<u32> {
    match m {
        PgOutputMessage::Insert(x) => x.xid,
        PgOutputMessage::Update(x) => x.xid,
        PgOutputMessage::Delete(x) => x.xid,
        PgOutputMessage::Truncate(x) => x.xid,
        PgOutputMessage::Message(x) => x.xid,
        _ => None,
    }
}
