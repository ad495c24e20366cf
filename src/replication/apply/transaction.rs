//! Source transactions grouped into target transactions. Consecutive
//! complete source transactions share one target transaction, which commits
//! with the origin progress of the last of them; a transaction at or before
//! the origin position is skipped whole. Statements are sent in pipeline
//! rounds, and every row count is checked before COMMIT is sent.

use super::origin::Origin;
use super::pipeline::{Op, Pipeline, RoundError};
use super::progress::{CommittedGroup, OpCounts};
use super::{Applier, ApplyError, Marker, SourceTxn};
use crate::replication::Lsn;
use crate::replication::pgoutput::{Begin, Commit};
use crate::wire::messages::TxStatus;

const STMT_BEGIN: &str = "pgshift_begin";
pub(super) const STMT_COMMIT: &str = "pgshift_commit";
const STMT_XID: &str = "pgshift_xid";

/// The source transaction being received.
pub(super) struct Current {
    /// The commit LSN; unknown (`Lsn(u64::MAX)`) for a streamed transaction
    /// still in progress.
    pub(super) commit_lsn: Lsn,
    pub(super) xid: u32,
    pub(super) commit_time: i64,
    pub(super) skip: bool,
    pub(super) markers: Vec<String>,
    pub(super) counts: OpCounts,
    /// Statements of this transaction already queued or sent.
    pub(super) statements: usize,
    /// It ran DDL on the target: the group commits with it.
    pub(super) ddl: bool,
    /// What its DDL command being received dropped (its `drop` event).
    pub(super) dropped: Vec<crate::replication::ddl::DdlObject>,
}

/// Complete source transactions applied in the open target transaction.
#[derive(Default)]
pub(super) struct Group {
    pub(super) open: bool,
    pub(super) transactions: u64,
    pub(super) statements: usize,
    /// Row changes applied one by one (not folded).
    pub(super) single_rows: usize,
    /// The last complete transaction's commit record end and commit time.
    pub(super) last_commit: Option<(Lsn, i64)>,
    /// The last complete transaction's commit LSN, for errors.
    pub(super) last_commit_lsn: Lsn,
    pub(super) markers: Vec<Marker>,
    pub(super) counts: OpCounts,
}

/// The transaction being received and the group it will join.
#[derive(Default)]
pub(super) struct Transactions {
    pub(super) current: Option<Current>,
    pub(super) group: Group,
}

impl Transactions {
    /// Queues the Parse of the control statements of a group.
    pub(super) fn prepare(pipe: &mut Pipeline) {
        pipe.parse(STMT_BEGIN, "BEGIN", &[]);
        pipe.parse(STMT_COMMIT, "COMMIT", &[]);
        // txid_current(): also on servers before 13 (reverse apply writes
        // to the source, of any supported version).
        pipe.parse(STMT_XID, "SELECT txid_current()", &[]);
    }

    /// A statement of the open source transaction was queued.
    pub(super) fn statement_queued(&mut self) {
        self.group.statements += 1;
        if let Some(c) = self.current.as_mut() {
            c.statements += 1;
        }
    }

    /// The open source transaction's counts.
    pub(super) fn counts(&mut self) -> Option<&mut OpCounts> {
        self.current.as_mut().map(|c| &mut c.counts)
    }
}

impl Applier {
    pub(super) fn begin(&mut self, b: Begin) -> Result<(), ApplyError> {
        if self.tx.current.is_some() {
            return Err(self.protocol("Begin inside a transaction"));
        }
        let applied = self.origin.applied;
        let done = self
            .tx
            .group
            .last_commit
            .map_or(applied, |(l, _)| l.max(applied));
        // Progress is the end of a commit record; the next transaction's
        // commit record may start exactly there, so the test is strict.
        let skip = b.final_lsn < done;
        if !skip && self.progress.stats.pending_since.is_none() {
            self.progress.stats.pending_since = Some(b.commit_time);
        }
        self.tx.current = Some(Current {
            commit_lsn: b.final_lsn,
            xid: b.xid,
            commit_time: b.commit_time,
            skip,
            markers: Vec::new(),
            counts: OpCounts::default(),
            statements: 0,
            ddl: false,
            dropped: Vec::new(),
        });
        Ok(())
    }

    pub(super) async fn commit(&mut self, c: Commit) -> Result<(), ApplyError> {
        let cur = self
            .tx
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
            self.progress.stats.skipped_transactions += 1;
            self.batching.group_skipped += 1;
            return Ok(());
        }
        self.batching.transaction_complete();
        let g = &mut self.tx.group;
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
        // After DDL the next transaction may use what it made (an enum
        // value added, which must be committed first).
        if cur.ddl
            || g.transactions as usize >= limit
            || self.pipe.queued_bytes() + self.batching.batch.bytes >= self.opts.max_round_bytes
        {
            self.commit_group().await?;
        }
        Ok(())
    }

    /// The open source transaction, unless it is skipped.
    pub(super) fn applying(&mut self) -> Result<Option<Lsn>, ApplyError> {
        match &self.tx.current {
            None => Err(self.protocol("row change outside a transaction")),
            Some(c) if c.skip => Ok(None),
            Some(c) => Ok(Some(c.commit_lsn)),
        }
    }

    pub(super) fn open_group(&mut self) {
        if !self.tx.group.open {
            self.pipe.execute(STMT_BEGIN, &[], Op::control("BEGIN"));
            self.tx.group.open = true;
        }
    }

    /// Sends what is queued, keeping the target transaction open.
    pub(super) async fn round(&mut self) -> Result<(), ApplyError> {
        if self.pipe.queued_ops() == 0 && self.pipe.queued_bytes() == 0 {
            return Ok(());
        }
        self.sync().await.map(|_| ())
    }

    /// One pipeline round. A failure in a round that carried batched
    /// statements is answered by applying the group again change by change
    /// ([`ApplyError::Replay`]), which finds the exact change at fault.
    pub(super) async fn sync(&mut self) -> Result<TxStatus, ApplyError> {
        match self.pipe.sync().await {
            Ok(status) => {
                self.batching.unverified = false;
                Ok(status)
            }
            Err(RoundError::Wire(e)) => Err(self.round_error(RoundError::Wire(e))),
            // A streamed transaction's session keeps no messages to re-apply.
            Err(_) if self.batching.unverified && !self.child => Err(ApplyError::Replay),
            Err(e) => Err(self.round_error(e)),
        }
    }

    /// Names the source transaction of a change that carried `commit_lsn`.
    fn source_txn(&self, commit_lsn: Lsn) -> SourceTxn {
        match &self.tx.current {
            Some(c) if commit_lsn == Lsn(u64::MAX) => SourceTxn::InProgress { xid: c.xid },
            _ => SourceTxn::Committed(commit_lsn),
        }
    }

    pub(super) fn round_error(&self, e: RoundError) -> ApplyError {
        let database = self.opts.database.clone();
        match e {
            RoundError::Wire(source) => ApplyError::Connection {
                database,
                source: Box::new(source),
            },
            RoundError::Server { op, error } => match op {
                Some(op) if op.table.is_some() => ApplyError::Row {
                    database,
                    transaction: self.source_txn(op.commit_lsn),
                    table: op.table.as_deref().unwrap_or_default().to_string(),
                    op: op.what,
                    error: Box::new(error),
                },
                other => ApplyError::Row {
                    database,
                    transaction: self.source_txn(self.tx.group.last_commit_lsn),
                    table: "-".into(),
                    op: other.map_or("statement", |o| o.what),
                    error: Box::new(error),
                },
            },
            RoundError::RowCount { op, rows } => ApplyError::RowNotFound {
                database,
                transaction: self.source_txn(op.commit_lsn),
                table: op.table.as_deref().unwrap_or_default().to_string(),
                op: op.what,
                rows,
            },
        }
    }

    /// Commits the open group with its origin progress.
    pub(super) async fn commit_group(&mut self) -> Result<(), ApplyError> {
        let Some((lsn, time)) = self.tx.group.last_commit else {
            return Ok(());
        };
        self.flush_batch().await?;
        self.open_group();
        if self.tx.group.statements == 0 {
            // A transaction without an xid writes no commit record, and so no
            // origin progress: assign one.
            self.pipe.execute(STMT_XID, &[], Op::control("assign xid"));
        }
        // Row counts are checked before COMMIT is sent.
        self.round().await?;
        Origin::queue_progress(&mut self.pipe, lsn, time);
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
        let g = std::mem::take(&mut self.tx.group);
        self.reset_batching();
        self.origin.applied = lsn;
        // What is still pending now is at most the transaction in progress.
        let pending_since = self
            .tx
            .current
            .as_ref()
            .filter(|c| !c.skip)
            .map(|c| c.commit_time);
        self.progress.committed(
            &self.opts.database,
            CommittedGroup {
                lsn,
                pending_since,
                transactions: g.transactions,
                counts: g.counts,
                markers: g.markers,
            },
        );
    }
}
