//! Applying a group as net changes (see [`batch`](super::batch) for the
//! fold and why it is exact), and again change by change when a batched
//! statement fails: the group's messages are kept until it commits, so the
//! failure is reported with its transaction, table and row. A group whose
//! messages grow too large, or whose relation layout changes, verifies what
//! is batched and applies the rest of itself change by change.

use bytes::Bytes;

use super::batch::{self, NetBatch, Offer};
use super::pipeline::{Op, Param, RoundError};
use super::relation::BatchKind;
use super::statements::RowChange;
use super::{Applier, ApplyError};
use crate::replication::Lsn;
use crate::replication::pgoutput::{PgOutputMessage, Tuple, TupleValue};

/// Changes held in a net-change batch before it is sent.
const MAX_BATCH_CHANGES: usize = 10_000;

/// Messages of the open group kept for an exact re-apply; beyond this the
/// batch is verified and the rest of the group is applied change by change.
const MAX_REPLAY_BYTES: usize = 64 << 20;

/// The open group's net changes and what is kept to apply it again.
#[derive(Default)]
pub(super) struct Batching {
    /// Row changes of the open group not yet sent, folded per row.
    pub(super) batch: NetBatch,
    /// Batched statements were sent whose round has not succeeded yet.
    pub(super) unverified: bool,
    /// The open group's messages, to apply it again change by change when
    /// a batched statement fails.
    replay: Vec<PgOutputMessage>,
    replay_bytes: usize,
    /// Skipped transactions counted since the group started (a re-apply
    /// counts them again).
    pub(super) group_skipped: u64,
    /// The rest of the open group is applied change by change.
    exact: bool,
    /// `replay` up to here belongs to transactions already in the group.
    group_end: usize,
}

impl Batching {
    /// A transaction joined the group: what is recorded so far is the group's.
    pub(super) fn transaction_complete(&mut self) {
        self.group_end = self.replay.len();
    }

    /// Forgets the open group's batch (its statements are gone with the
    /// pipeline's queue).
    pub(super) fn discard_batch(&mut self) {
        self.batch = NetBatch::default();
        self.unverified = false;
    }

    /// The rest of the open group is applied change by change.
    pub(super) fn exact(&self) -> bool {
        self.exact
    }
}

impl Applier {
    /// Folds a row change into the net-change batch when its table and
    /// shape allow; hands it back otherwise (to be applied on its own).
    pub(super) async fn batch_row(
        &mut self,
        oid: u32,
        change: RowChange,
    ) -> Result<Option<RowChange>, ApplyError> {
        let entry = &self.rel.map[&oid];
        if self.batching.exact
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
        let offer = match self.batching.batch.offer(oid, &key, offer) {
            Ok(()) => None,
            Err(offer) if !self.batching.batch.is_empty() => {
                // It cannot be folded into what is pending: send that first.
                self.flush_batch().await?;
                self.batching.batch.offer(oid, &key, offer).err()
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
        self.tx.statement_queued();
        if let Some(c) = self.tx.counts() {
            match kind {
                BatchKind::Insert => c.inserts += 1,
                BatchKind::Update => c.updates += 1,
                BatchKind::Delete => c.deletes += 1,
            }
        }
        if self.batching.batch.changes >= MAX_BATCH_CHANGES
            || self.batching.batch.bytes >= self.opts.max_round_bytes
        {
            self.flush_batch().await?;
            self.round().await?;
        }
        Ok(None)
    }

    /// Queues the statements of the net-change batch (one per table and
    /// operation), each checked to affect exactly its number of rows; a
    /// streamed transaction's session sends them at once (see
    /// `flush_streamed_batch`).
    pub(super) async fn flush_batch(&mut self) -> Result<(), ApplyError> {
        if self.batching.batch.is_empty() {
            return Ok(());
        }
        if self.child {
            return self.flush_streamed_batch().await;
        }
        self.queue_batch();
        Ok(())
    }

    /// A streamed transaction's session keeps no messages to apply its
    /// transaction again, so its batch runs in a round of its own under a
    /// savepoint: when a batched statement fails, the batch is rolled back
    /// and its rows are applied one by one, which names the row at fault.
    async fn flush_streamed_batch(&mut self) -> Result<(), ApplyError> {
        // What is queued before the batch is verified on its own.
        self.round().await?;
        self.open_group();
        self.control("SAVEPOINT pgshift_batch", "SAVEPOINT");
        let kept = self.queue_batch();
        self.control("RELEASE SAVEPOINT pgshift_batch", "RELEASE SAVEPOINT");
        match self.pipe.sync().await {
            Ok(_) => {
                self.batching.unverified = false;
                Ok(())
            }
            Err(RoundError::Wire(e)) => Err(self.round_error(RoundError::Wire(e))),
            Err(_) => {
                self.batching.unverified = false;
                let r = self
                    .pipe
                    .conn
                    .simple_query(
                        "ROLLBACK TO SAVEPOINT pgshift_batch; RELEASE SAVEPOINT pgshift_batch",
                    )
                    .await;
                r.map_err(|e| self.round_error(RoundError::Wire(e)))?;
                tracing::info!(
                    database = %self.opts.database,
                    "a batched statement of a streamed transaction failed; applying its rows one by one"
                );
                self.apply_rows_exactly(kept).await
            }
        }
    }

    /// Applies a batch's net changes one by one (they are counted already).
    async fn apply_rows_exactly(&mut self, kept: Vec<KeptRows>) -> Result<(), ApplyError> {
        let counts = self.tx.current.as_ref().map(|c| c.counts);
        let exact = std::mem::replace(&mut self.batching.exact, true);
        let mut r = Ok(());
        'rows: for k in kept {
            let changes = k
                .deletes
                .into_iter()
                .map(RowChange::Delete)
                .chain(k.updates.into_iter().map(|t| RowChange::Update(None, t)))
                .chain(k.inserts.into_iter().map(RowChange::Insert));
            for change in changes {
                r = Box::pin(self.row(k.oid, change)).await;
                if r.is_err() {
                    break 'rows;
                }
            }
        }
        if r.is_ok() {
            r = self.round().await;
        }
        self.batching.exact = exact;
        if let (Some(c), Some(counts)) = (self.tx.current.as_mut(), counts) {
            c.counts = counts;
        }
        r
    }

    /// Queues the batch's statements; returns its rows.
    fn queue_batch(&mut self) -> Vec<KeptRows> {
        let mut kept = Vec::new();
        self.open_group();
        for tb in self.batching.batch.take() {
            let oid = tb.oid;
            let entry = &self.rel.map[&oid];
            let table = entry.display.clone();
            let ncols = entry.source.columns.len();
            let key_cols: Vec<usize> = (0..ncols)
                .filter(|i| entry.source.columns[*i].key)
                .collect();
            let (deletes, updates, inserts) = tb.split();
            for (kind, rows, what) in [
                (BatchKind::Delete, &deletes, "delete"),
                (BatchKind::Update, &updates, "update"),
                (BatchKind::Insert, &inserts, "insert"),
            ] {
                if rows.is_empty() {
                    continue;
                }
                let op = Op {
                    commit_lsn: Lsn::ZERO,
                    table: Some(table.clone()),
                    what,
                    expect_rows: Some(rows.len() as u64),
                };
                if kind == BatchKind::Insert {
                    // COPY: each value through its type's input function,
                    // as the cast in the INSERT would, without building and
                    // taking apart an array per column (~1.6× less target
                    // CPU per row).
                    let (sql, _) = self.rel.map[&oid].batch_sql(kind);
                    self.pipe.copy_in(&sql, rows.iter(), op);
                    continue;
                }
                let stmt = self.rel.batch_statement(&mut self.pipe, oid, kind);
                let cols: Vec<usize> = match kind {
                    BatchKind::Delete => key_cols.clone(),
                    _ => (0..ncols).collect(),
                };
                let arrays: Vec<Bytes> = cols
                    .iter()
                    .map(|c| batch::text_array(rows.iter().map(|r| &r.0[*c])))
                    .collect();
                let params: Vec<Param<'_>> = arrays.iter().map(|a| Param::Binary(a)).collect();
                self.pipe.execute(&stmt, &params, op);
            }
            if self.child {
                kept.push(KeptRows {
                    oid,
                    deletes,
                    updates,
                    inserts,
                });
            }
        }
        self.batching.unverified = true;
        kept
    }

    /// Records a message of the open group for a possible re-apply.
    pub(super) async fn record(&mut self, msg: &PgOutputMessage) -> Result<(), ApplyError> {
        if self.batching.exact
            || self.child
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
        self.batching.replay_bytes += message_size(msg);
        self.batching.replay.push(msg.clone());
        if self.batching.replay_bytes > MAX_REPLAY_BYTES {
            // Too much to keep: verify what is batched, then go on exactly.
            self.flush_batch().await?;
            self.round().await?;
            self.stop_batching_for_group();
        }
        Ok(())
    }

    /// The rest of the open group is applied change by change.
    pub(super) fn stop_batching_for_group(&mut self) {
        let b = &mut self.batching;
        b.exact = true;
        b.replay = Vec::new();
        b.replay_bytes = 0;
        b.group_end = 0;
    }

    /// After a group commit: keep only what belongs to the transaction
    /// still being received; batching resumes once a group starts clean.
    pub(super) fn reset_batching(&mut self) {
        let receiving = self.tx.current.is_some();
        let b = &mut self.batching;
        b.group_skipped = 0;
        if b.exact || !receiving {
            b.replay.clear();
            b.replay_bytes = 0;
            if !receiving {
                b.exact = false;
            }
        } else {
            b.replay.drain(..b.group_end.min(b.replay.len()));
            b.replay_bytes = b.replay.iter().map(message_size).sum();
        }
        b.group_end = 0;
    }

    /// A batched statement failed: rolls the group back and applies its
    /// messages again change by change, so that the failure (if it is one)
    /// is reported with its transaction, table and row.
    pub(super) async fn apply_again_exactly(&mut self) -> Result<(), ApplyError> {
        let msgs = std::mem::take(&mut self.batching.replay);
        self.batching.replay_bytes = 0;
        self.batching.group_end = 0;
        self.discard_open_transaction().await?;
        // Statements parsed after the failure were never prepared.
        self.rel.forget_statements();
        self.progress.stats.skipped_transactions -= self.batching.group_skipped;
        self.batching.group_skipped = 0;
        self.tx = Default::default();
        self.batching.discard_batch();
        self.batching.exact = true;
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
}

/// A batch's rows of one table, kept by a streamed transaction's session
/// until its round succeeds.
struct KeptRows {
    oid: u32,
    deletes: Vec<Tuple>,
    updates: Vec<Tuple>,
    inserts: Vec<Tuple>,
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
