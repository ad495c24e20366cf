//! Dropping the transactions the other direction of a migration applied.
//!
//! Forward apply commits on the target under its replication origin, and
//! reverse apply (after a cutover) on the source under its own: each side's
//! stream would send those transactions straight back. pgoutput tells a
//! transaction's origin in an Origin message right after its Begin (or after
//! the first Stream Start of a streamed one) on every version; the
//! walsender's own `origin` option (16+) would also drop transactions of
//! origins that are not pgshift's (a source that is itself a subscriber), so
//! pgshift filters by the one origin name it must not see again.
//!
//! Relation and Type messages are not part of a transaction (pgoutput sends
//! each once per walsender): those of a dropped transaction are passed on,
//! outside any transaction, so later transactions find their relations.

use std::collections::HashSet;

use bytes::Bytes;

use super::pgoutput::PgOutputMessage;

type Item = (PgOutputMessage, Option<Bytes>);

/// What apply gets of the stream when transactions of origin `skip` are dropped.
pub(crate) struct OriginFilter {
    skip: String,
    /// A Begin (or first Stream Start) waiting for the message after it,
    /// which says whether the transaction has the origin to drop.
    held: Option<Item>,
    /// Inside a dropped (not streamed) transaction.
    dropping: bool,
    /// Streamed transactions being dropped, and the one whose block is open.
    dropped_xids: HashSet<u32>,
    in_dropped_block: Option<u32>,
    /// Transactions dropped so far.
    pub(crate) dropped: u64,
}

impl OriginFilter {
    pub(crate) fn new(skip: impl Into<String>) -> OriginFilter {
        OriginFilter {
            skip: skip.into(),
            held: None,
            dropping: false,
            dropped_xids: HashSet::new(),
            in_dropped_block: None,
            dropped: 0,
        }
    }

    /// Inside a transaction apply has not seen (held or being dropped): a
    /// keepalive's end must not count as applied now.
    pub(crate) fn busy(&self) -> bool {
        self.held.is_some() || self.dropping || self.in_dropped_block.is_some()
    }

    /// The messages apply gets for `msg`, in order (none, one or two).
    pub(crate) fn pass(&mut self, msg: PgOutputMessage, raw: Option<Bytes>) -> Vec<Item> {
        if let Some(held) = self.held.take() {
            if let PgOutputMessage::Origin(o) = &msg
                && o.name == self.skip
            {
                match held.0 {
                    PgOutputMessage::StreamStart(s) => {
                        self.dropped_xids.insert(s.xid);
                        self.in_dropped_block = Some(s.xid);
                    }
                    _ => self.dropping = true,
                }
                return Vec::new();
            }
            let mut out = vec![held];
            out.extend(self.pass(msg, raw));
            return out;
        }
        if self.dropping {
            return match msg {
                PgOutputMessage::Commit(_) => {
                    self.dropping = false;
                    self.dropped += 1;
                    Vec::new()
                }
                PgOutputMessage::Relation(_) | PgOutputMessage::Type(_) => vec![(msg, raw)],
                _ => Vec::new(),
            };
        }
        if self.in_dropped_block.is_some() {
            return match msg {
                PgOutputMessage::StreamStop => {
                    self.in_dropped_block = None;
                    Vec::new()
                }
                // Outside any transaction for apply: no xid.
                PgOutputMessage::Relation(mut r) => {
                    r.xid = None;
                    vec![(PgOutputMessage::Relation(r), None)]
                }
                PgOutputMessage::Type(mut t) => {
                    t.xid = None;
                    vec![(PgOutputMessage::Type(t), None)]
                }
                _ => Vec::new(),
            };
        }
        match &msg {
            PgOutputMessage::Begin(_) => {
                self.held = Some((msg, raw));
                Vec::new()
            }
            PgOutputMessage::StreamStart(s) if self.dropped_xids.contains(&s.xid) => {
                self.in_dropped_block = Some(s.xid);
                Vec::new()
            }
            PgOutputMessage::StreamStart(s) if s.first_segment => {
                self.held = Some((msg, raw));
                Vec::new()
            }
            PgOutputMessage::StreamCommit(c) if self.dropped_xids.remove(&c.xid) => {
                self.dropped += 1;
                Vec::new()
            }
            PgOutputMessage::StreamAbort(a) if self.dropped_xids.contains(&a.xid) => {
                if a.xid == a.subxid {
                    self.dropped_xids.remove(&a.xid);
                }
                Vec::new()
            }
            _ => vec![(msg, raw)],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replication::Lsn;
    use crate::replication::pgoutput::{
        Begin, Commit, Origin, Relation, ReplicaIdentity, StreamAbort, StreamCommit, StreamStart,
    };

    fn begin() -> PgOutputMessage {
        PgOutputMessage::Begin(Begin {
            final_lsn: Lsn(10),
            commit_time: 0,
            xid: 7,
        })
    }
    fn commit() -> PgOutputMessage {
        PgOutputMessage::Commit(Commit {
            flags: 0,
            commit_lsn: Lsn(10),
            end_lsn: Lsn(11),
            commit_time: 0,
        })
    }
    fn origin(name: &str) -> PgOutputMessage {
        PgOutputMessage::Origin(Origin {
            commit_lsn: Lsn(5),
            name: name.into(),
        })
    }
    fn relation(xid: Option<u32>) -> PgOutputMessage {
        PgOutputMessage::Relation(Relation {
            xid,
            oid: 42,
            namespace: "public".into(),
            name: "t".into(),
            replica_identity: ReplicaIdentity::Default,
            columns: vec![],
        })
    }
    fn start(xid: u32, first: bool) -> PgOutputMessage {
        PgOutputMessage::StreamStart(StreamStart {
            xid,
            first_segment: first,
        })
    }

    fn run(f: &mut OriginFilter, msgs: Vec<PgOutputMessage>) -> Vec<PgOutputMessage> {
        msgs.into_iter()
            .flat_map(|m| f.pass(m, None))
            .map(|(m, _)| m)
            .collect()
    }

    #[test]
    fn drops_only_the_named_origin_and_keeps_relations() {
        let mut f = OriginFilter::new("pgshift_back");
        let out = run(
            &mut f,
            vec![begin(), origin("pgshift_back"), relation(None), commit()],
        );
        assert_eq!(out, vec![relation(None)]);
        assert_eq!(f.dropped, 1);
        assert!(!f.busy());
        // Another origin and no origin pass whole.
        let other = vec![begin(), origin("elsewhere"), relation(None), commit()];
        assert_eq!(run(&mut f, other.clone()), other);
        let plain = vec![begin(), relation(None), commit()];
        assert_eq!(run(&mut f, plain.clone()), plain);
    }

    #[test]
    fn drops_every_block_of_a_streamed_transaction() {
        let mut f = OriginFilter::new("pgshift_back");
        let out = run(
            &mut f,
            vec![
                start(9, true),
                origin("pgshift_back"),
                relation(Some(9)),
                PgOutputMessage::StreamStop,
                start(9, false),
                PgOutputMessage::StreamStop,
                PgOutputMessage::StreamAbort(StreamAbort { xid: 9, subxid: 10 }),
                PgOutputMessage::StreamCommit(StreamCommit {
                    xid: 9,
                    flags: 0,
                    commit_lsn: Lsn(20),
                    end_lsn: Lsn(21),
                    commit_time: 0,
                }),
            ],
        );
        assert_eq!(out, vec![relation(None)]);
        assert_eq!(f.dropped, 1);
        // A streamed transaction of no origin passes whole.
        let kept = vec![
            start(11, true),
            relation(Some(11)),
            PgOutputMessage::StreamStop,
        ];
        assert_eq!(run(&mut f, kept.clone()), kept);
        assert!(!f.busy());
    }
}
