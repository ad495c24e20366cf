//! What apply tells the rest of the process: counters, metrics and the
//! committed markers, published once per committed group (never for work
//! that is not committed on the target).

use prometheus::{IntCounterVec, Registry};
use tokio::sync::watch;

use super::markers::Marker;
use crate::replication::Lsn;

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

/// The apply metrics, registered once and shared by every database's applier.
#[derive(Clone)]
pub struct ApplyMetrics {
    transactions: IntCounterVec,
    rows: IntCounterVec,
    errors: IntCounterVec,
    spilled: IntCounterVec,
}

impl ApplyMetrics {
    pub fn register(reg: &Registry) -> ApplyMetrics {
        ApplyMetrics::register_as(reg, "pgshift", "")
    }

    /// Under another prefix, help texts led by `about` (the reverse direction).
    pub fn register_as(reg: &Registry, prefix: &str, about: &str) -> ApplyMetrics {
        use crate::telemetry::metrics::int_counter_vec;
        let name = |suffix: &str| format!("{prefix}_{suffix}");
        let help = |text: &str| format!("{about}{text}");
        ApplyMetrics {
            transactions: int_counter_vec(
                reg,
                &name("apply_transactions_total"),
                &help("Source transactions committed on the target"),
                &["database"],
            ),
            rows: int_counter_vec(
                reg,
                &name("apply_rows_total"),
                &help(
                    "Row changes applied to the target, by operation (truncate counts relations)",
                ),
                &["database", "op"],
            ),
            errors: int_counter_vec(
                reg,
                &name("apply_errors_total"),
                &help("Errors that stopped apply"),
                &["database"],
            ),
            spilled: int_counter_vec(
                reg,
                &name("apply_spilled_transactions_total"),
                &help(
                    "Streamed transactions spilled to a temporary file and applied at their commit, because every streamed apply session was busy",
                ),
                &["database"],
            ),
        }
    }
}

/// Row operation counts of a transaction or group.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct OpCounts {
    pub(super) inserts: u64,
    pub(super) updates: u64,
    pub(super) deletes: u64,
    pub(super) truncates: u64,
}

impl OpCounts {
    pub(super) fn add(&mut self, o: OpCounts) {
        self.inserts += o.inserts;
        self.updates += o.updates;
        self.deletes += o.deletes;
        self.truncates += o.truncates;
    }
}

/// One applier's counters and the channel and metrics they are published on.
pub(super) struct Progress {
    pub(super) stats: ApplyStats,
    sender: watch::Sender<ApplyProgress>,
    metrics: Option<ApplyMetrics>,
}

/// A committed group, as [`Progress::committed`] records it.
pub(super) struct CommittedGroup {
    /// The origin position the group committed.
    pub(super) lsn: Lsn,
    /// Commit time of the transaction still being received, if any.
    pub(super) pending_since: Option<i64>,
    pub(super) transactions: u64,
    pub(super) counts: OpCounts,
    pub(super) markers: Vec<Marker>,
}

impl Progress {
    pub(super) fn new(applied: Lsn, metrics: Option<ApplyMetrics>) -> Progress {
        let stats = ApplyStats {
            applied_lsn: applied,
            ..Default::default()
        };
        let (sender, _) = watch::channel(ApplyProgress {
            stats: stats.clone(),
            markers: Vec::new(),
        });
        Progress {
            stats,
            sender,
            metrics,
        }
    }

    pub(super) fn subscribe(&self) -> watch::Receiver<ApplyProgress> {
        self.sender.subscribe()
    }

    /// An error stopped apply.
    pub(super) fn error(&self, database: &str) {
        if let Some(m) = &self.metrics {
            m.errors.with_label_values(&[database]).inc();
        }
    }

    /// Exports the counters that may stay at 0 for long (spills), so a rate
    /// or an alert on them works before the first one.
    pub(super) fn export(&self, database: &str) {
        if let Some(m) = &self.metrics {
            m.spilled.with_label_values(&[database]);
        }
    }

    /// A streamed transaction is spilled to a file (no session was free).
    pub(super) fn spilled(&self, database: &str) {
        if let Some(m) = &self.metrics {
            m.spilled.with_label_values(&[database]).inc();
        }
    }

    /// Records a committed group: position, counters, metrics, markers.
    pub(super) fn committed(&mut self, database: &str, g: CommittedGroup) {
        let s = &mut self.stats;
        s.applied_lsn = g.lsn;
        s.pending_since = g.pending_since;
        s.transactions += g.transactions;
        s.inserts += g.counts.inserts;
        s.updates += g.counts.updates;
        s.deletes += g.counts.deletes;
        s.truncates += g.counts.truncates;
        if let Some(m) = &self.metrics {
            m.transactions
                .with_label_values(&[database])
                .inc_by(g.transactions);
            for (op, n) in [
                ("insert", g.counts.inserts),
                ("update", g.counts.updates),
                ("delete", g.counts.deletes),
                ("truncate", g.counts.truncates),
            ] {
                if n > 0 {
                    m.rows.with_label_values(&[database, op]).inc_by(n);
                }
            }
        }
        let stats = self.stats.clone();
        self.sender.send_modify(|p| {
            p.stats = stats;
            p.markers.extend(g.markers);
            let excess = p.markers.len().saturating_sub(KEPT_MARKERS);
            p.markers.drain(..excess);
        });
    }
}
