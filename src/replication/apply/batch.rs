//! Net-change batching: the row changes of a group of source transactions,
//! folded per table and key into one net change per row, then applied as
//! one statement per table and operation (inserts by `COPY`, updates and
//! deletes by `unnest` of one array per column) instead of one statement
//! per change.
//!
//! Why it is exact: the group commits as one target transaction, so only
//! its end state is ever visible; rows of a table are independent when the
//! replica identity is the table's only unique constraint and no trigger
//! fires in replica mode (the applier checks both before a table is
//! batched); and every batched statement must affect exactly as many rows
//! as it carries. Anything else — a key change, an insert over a pending
//! row, a value sent in binary — is not folded: the applier flushes the
//! batch and applies that change on its own, so order is kept. When a
//! batched statement fails, the applier rolls the group back and applies
//! it again change by change, which reports the exact transaction and row.

use std::collections::HashMap;

use bytes::{BufMut, Bytes, BytesMut};

use crate::replication::pgoutput::{Tuple, TupleValue};

/// One row's net change within the batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Net {
    /// The row did not exist before the batch: the full new row.
    Insert(Tuple),
    /// The row existed: its full new values (key unchanged).
    Update(Tuple),
    /// The row existed and is gone: its key values (others ignored).
    Delete(Tuple),
}

/// A change offered to the batch. Update tuples may hold unchanged-TOAST
/// markers, filled from a pending row of the same key when there is one.
#[derive(Clone, Debug)]
pub(super) enum Offer {
    Insert(Tuple),
    Update(Tuple),
    Delete(Tuple),
}

/// The pending rows of one table, in first-touch order.
#[derive(Default)]
pub(super) struct TableBatch {
    pub oid: u32,
    rows: Vec<Net>,
    by_key: HashMap<Vec<Bytes>, usize>,
}

impl TableBatch {
    /// The pending rows grouped by statement: deletes, updates, inserts.
    /// Keys are distinct within a batch, so the order between them does not
    /// matter; deletes go first so that a key deleted and another inserted
    /// never meet in the unique index.
    pub fn split(self) -> (Vec<Tuple>, Vec<Tuple>, Vec<Tuple>) {
        let (mut d, mut u, mut i) = (Vec::new(), Vec::new(), Vec::new());
        for r in self.rows {
            match r {
                Net::Delete(t) => d.push(t),
                Net::Update(t) => u.push(t),
                Net::Insert(t) => i.push(t),
            }
        }
        (d, u, i)
    }
}

#[derive(Default)]
pub(super) struct NetBatch {
    tables: Vec<TableBatch>,
    index: HashMap<u32, usize>,
    /// Changes offered and taken (before folding).
    pub changes: usize,
    /// Bytes of values held.
    pub bytes: usize,
}

impl NetBatch {
    pub fn is_empty(&self) -> bool {
        self.changes == 0
    }

    /// Takes everything pending, leaving the batch empty.
    pub fn take(&mut self) -> Vec<TableBatch> {
        self.index.clear();
        self.changes = 0;
        self.bytes = 0;
        std::mem::take(&mut self.tables)
    }

    /// Folds a change into the batch, or hands it back when it cannot be
    /// folded into what is pending (the caller flushes and retries, or
    /// applies it on its own). `key` marks the replica identity columns;
    /// none: the table has no key, only inserts are taken.
    pub(crate) fn offer(&mut self, oid: u32, key: &[bool], change: Offer) -> Result<(), Offer> {
        let tuple = match &change {
            Offer::Insert(t) | Offer::Update(t) | Offer::Delete(t) => t,
        };
        if tuple.0.len() != key.len() || tuple.0.iter().any(|v| matches!(v, TupleValue::Binary(_)))
        {
            return Err(change);
        }
        let keyed = key.iter().any(|k| *k);
        let key_values = if keyed {
            match key_of(tuple, key) {
                Some(k) => Some(k),
                None => return Err(change),
            }
        } else if matches!(change, Offer::Insert(_)) {
            None
        } else {
            return Err(change);
        };
        let size: usize = tuple.0.iter().map(value_len).sum();
        let t = match self.index.get(&oid) {
            Some(i) => *i,
            None => {
                self.tables.push(TableBatch {
                    oid,
                    ..Default::default()
                });
                self.index.insert(oid, self.tables.len() - 1);
                self.tables.len() - 1
            }
        };
        let table = &mut self.tables[t];
        let pending = key_values
            .as_ref()
            .and_then(|k| table.by_key.get(k).copied());
        let net = match (pending.map(|p| &table.rows[p]), change) {
            (None, Offer::Insert(new)) => Net::Insert(new),
            (None, Offer::Update(new)) if !has_unchanged(&new) => Net::Update(new),
            (None, Offer::Delete(old)) => Net::Delete(old),
            (Some(Net::Insert(prev)), Offer::Update(new)) => Net::Insert(fill(new, prev)),
            (Some(Net::Update(prev)), Offer::Update(new)) => Net::Update(fill(new, prev)),
            (Some(Net::Update(_)), Offer::Delete(old)) => Net::Delete(old),
            (_, change) => {
                if table.rows.is_empty() {
                    self.tables.pop();
                    self.index.remove(&oid);
                }
                return Err(change);
            }
        };
        match pending {
            Some(p) => table.rows[p] = net,
            None => {
                table.rows.push(net);
                if let Some(k) = key_values {
                    table.by_key.insert(k, table.rows.len() - 1);
                }
            }
        }
        self.changes += 1;
        self.bytes += size;
        Ok(())
    }
}

fn value_len(v: &TupleValue) -> usize {
    match v {
        TupleValue::Text(b) | TupleValue::Binary(b) => b.len() + 4,
        _ => 4,
    }
}

/// The key values of a tuple; None when one is missing (NULL, unsent).
fn key_of(t: &Tuple, key: &[bool]) -> Option<Vec<Bytes>> {
    t.0.iter()
        .zip(key)
        .filter(|(_, k)| **k)
        .map(|(v, _)| match v {
            TupleValue::Text(b) => Some(b.clone()),
            _ => None,
        })
        .collect()
}

fn has_unchanged(t: &Tuple) -> bool {
    t.0.contains(&TupleValue::UnchangedToast)
}

/// A new tuple with its unchanged-TOAST values taken from the pending row.
fn fill(mut new: Tuple, prev: &Tuple) -> Tuple {
    for (v, p) in new.0.iter_mut().zip(&prev.0) {
        if *v == TupleValue::UnchangedToast {
            *v = p.clone();
        }
    }
    new
}

/// PostgreSQL's binary array format for a one-dimensional `text[]` of the
/// given values (NULL for Null), element type `text`.
pub(super) fn text_array<'a>(values: impl ExactSizeIterator<Item = &'a TupleValue>) -> Bytes {
    const TEXT_OID: u32 = 25;
    let n = values.len();
    let mut out = BytesMut::with_capacity(20 + n * 16);
    out.put_i32(1);
    let flags_at = out.len();
    out.put_i32(0);
    out.put_u32(TEXT_OID);
    out.put_i32(n as i32);
    out.put_i32(1);
    let mut nulls = false;
    for v in values {
        match v {
            TupleValue::Text(b) | TupleValue::Binary(b) => {
                out.put_i32(b.len() as i32);
                out.extend_from_slice(b);
            }
            TupleValue::Null | TupleValue::UnchangedToast => {
                nulls = true;
                out.put_i32(-1);
            }
        }
    }
    if nulls {
        out[flags_at..flags_at + 4].copy_from_slice(&1i32.to_be_bytes());
    }
    out.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(vals: &[Option<&str>]) -> Tuple {
        Tuple(
            vals.iter()
                .map(|v| match v {
                    Some("~") => TupleValue::UnchangedToast,
                    Some(s) => TupleValue::Text(Bytes::copy_from_slice(s.as_bytes())),
                    None => TupleValue::Null,
                })
                .collect(),
        )
    }

    const KEY: &[bool] = &[true, false, false];

    fn rows(b: &mut NetBatch) -> Vec<(u32, Vec<Net>)> {
        b.take().into_iter().map(|t| (t.oid, t.rows)).collect()
    }

    #[test]
    fn changes_to_one_row_fold_into_its_net_change() {
        let mut b = NetBatch::default();
        b.offer(1, KEY, Offer::Insert(t(&[Some("1"), Some("a"), Some("x")])))
            .unwrap();
        b.offer(1, KEY, Offer::Update(t(&[Some("1"), Some("b"), Some("~")])))
            .unwrap();
        b.offer(1, KEY, Offer::Update(t(&[Some("2"), Some("c"), None])))
            .unwrap();
        b.offer(1, KEY, Offer::Update(t(&[Some("2"), Some("d"), Some("y")])))
            .unwrap();
        b.offer(1, KEY, Offer::Update(t(&[Some("3"), Some("e"), None])))
            .unwrap();
        b.offer(1, KEY, Offer::Delete(t(&[Some("3"), None, None])))
            .unwrap();
        b.offer(2, &[false, false], Offer::Insert(t(&[Some("h"), None])))
            .unwrap();
        b.offer(2, &[false, false], Offer::Insert(t(&[Some("h"), None])))
            .unwrap();
        assert_eq!(b.changes, 8);
        assert_eq!(
            rows(&mut b),
            vec![
                (
                    1,
                    vec![
                        // The unchanged TOAST value came from the pending insert.
                        Net::Insert(t(&[Some("1"), Some("b"), Some("x")])),
                        Net::Update(t(&[Some("2"), Some("d"), Some("y")])),
                        Net::Delete(t(&[Some("3"), None, None])),
                    ]
                ),
                (
                    2,
                    vec![
                        Net::Insert(t(&[Some("h"), None])),
                        Net::Insert(t(&[Some("h"), None]))
                    ]
                ),
            ]
        );
        assert!(b.is_empty());
    }

    #[test]
    fn what_cannot_be_folded_is_handed_back() {
        let mut b = NetBatch::default();
        let row = |k: &str| t(&[Some(k), Some("v"), None]);
        b.offer(1, KEY, Offer::Insert(row("1"))).unwrap();
        // A second insert of a pending key, a delete of a pending insert.
        assert!(b.offer(1, KEY, Offer::Insert(row("1"))).is_err());
        assert!(b.offer(1, KEY, Offer::Delete(row("1"))).is_err());
        b.offer(1, KEY, Offer::Delete(row("2"))).unwrap();
        // A re-insert, an update of a deleted row.
        assert!(b.offer(1, KEY, Offer::Insert(row("2"))).is_err());
        assert!(b.offer(1, KEY, Offer::Update(row("2"))).is_err());
        // Unsent TOAST value with nothing pending to take it from; NULL key;
        // binary values; updates of a table without a key.
        assert!(
            b.offer(1, KEY, Offer::Update(t(&[Some("9"), Some("~"), None])))
                .is_err()
        );
        assert!(
            b.offer(1, KEY, Offer::Insert(t(&[None, None, None])))
                .is_err()
        );
        let bin = Tuple(vec![
            TupleValue::Text(Bytes::from_static(b"5")),
            TupleValue::Binary(Bytes::from_static(b"\x01")),
            TupleValue::Null,
        ]);
        assert!(b.offer(1, KEY, Offer::Insert(bin)).is_err());
        assert!(
            b.offer(3, &[false], Offer::Update(t(&[Some("x")])))
                .is_err()
        );
        // Refusals leave no trace (no empty table entry either).
        assert_eq!(b.changes, 2);
        assert!(!b.index.contains_key(&3));
        assert_eq!(rows(&mut b).len(), 1);
    }

    #[test]
    fn text_arrays_use_the_binary_array_format() {
        let vals = [
            TupleValue::Text(Bytes::from_static(b"ab")),
            TupleValue::Null,
        ];
        let a = text_array(vals.iter());
        assert_eq!(
            &a[..],
            &[
                0, 0, 0, 1, // one dimension
                0, 0, 0, 1, // has NULLs
                0, 0, 0, 25, // text
                0, 0, 0, 2, 0, 0, 0, 1, // 2 elements from index 1
                0, 0, 0, 2, b'a', b'b', // "ab"
                255, 255, 255, 255, // NULL
            ][..]
        );
    }
}
