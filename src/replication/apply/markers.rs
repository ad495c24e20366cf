//! Recognising cutover markers in the stream. A marker arrives as a
//! transactional logical message (prefix [`MARKER_PREFIX`]) or, on sources
//! without them in pgoutput, as a row of the migration's marker table in
//! schema `pgshift` (see [`replication::marker`](crate::replication::marker),
//! which also emits them). Either way it belongs to its transaction and is
//! reported only once that transaction is committed on the target; nothing
//! of pgshift's own tables is ever applied.

use std::time::Duration;

use tokio::sync::watch;

use super::progress::ApplyProgress;
use super::statements::RowChange;
use super::{Applier, ApplyError};
use crate::replication::Lsn;
use crate::replication::marker::{self, MARKER_PREFIX};
use crate::replication::names::ReplicationNames;
use crate::replication::pgoutput::{LogicalMessage, TupleValue};

/// A cutover marker whose transaction is committed on the target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Marker {
    pub id: String,
    pub commit_lsn: Lsn,
}

/// This migration's marker table on the source (schema `pgshift`), for
/// sources whose pgoutput has no logical messages.
pub(super) struct MarkerTable(String);

impl MarkerTable {
    pub(super) fn new(migration: &str, database: &str) -> MarkerTable {
        let names = ReplicationNames::new(migration, database);
        MarkerTable(marker::table_name(&names).to_string())
    }
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

impl Applier {
    /// A logical message: a transactional one with pgshift's prefix is a
    /// marker of the transaction; every other message is ignored.
    pub(super) fn message(&mut self, m: LogicalMessage) -> Result<(), ApplyError> {
        if m.transactional && m.prefix == MARKER_PREFIX {
            let cur = self
                .tx
                .current
                .as_mut()
                .ok_or_else(|| ApplyError::Protocol {
                    database: self.opts.database.clone(),
                    detail: "transactional message outside a transaction".into(),
                })?;
            cur.markers
                .push(String::from_utf8_lossy(&m.content).into_owned());
        }
        Ok(())
    }

    /// A change of pgshift's own tables on the source (schema `pgshift`),
    /// which is never applied: an insert or update of the marker table is
    /// a marker of the transaction. Returns whether the change was one.
    pub(super) fn own_row(&mut self, oid: u32, change: &RowChange) -> Result<bool, ApplyError> {
        let entry = self
            .rel
            .map
            .get(&oid)
            .ok_or_else(|| self.protocol(format!("change for unknown relation {oid}")))?;
        if !marker::is_pgshift_relation(&entry.source.namespace) {
            return Ok(false);
        }
        let new = match change {
            RowChange::Insert(new) | RowChange::Update(_, new) => new,
            RowChange::Delete(_) => return Ok(true),
        };
        if entry.source.name != self.marker_table.0 {
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
        if let Some(cur) = self.tx.current.as_mut() {
            cur.markers.push(id);
        }
        Ok(true)
    }
}
