//! Streamed (protocol v2) transactions: a large transaction still in
//! progress on the source arrives in blocks between Stream Start and Stream
//! Stop, interleaved with other transactions. Its messages are buffered here
//! by top-level xid and applied as one ordinary transaction at Stream
//! Commit; Stream Abort drops the transaction or the aborted subtransaction.

use std::collections::HashMap;

use super::{Applier, ApplyError};
use crate::replication::pgoutput::{
    Begin, Commit, PgOutputMessage, StreamAbort, StreamCommit, StreamStart,
};

/// Streamed transactions until Stream Commit.
#[derive(Default)]
pub(super) struct Streamed {
    /// Buffered messages by top-level xid.
    by_xid: HashMap<u32, Vec<PgOutputMessage>>,
    /// The transaction whose block is being received.
    open: Option<u32>,
}

impl Streamed {
    /// No streamed transaction is open or buffered.
    pub(super) fn is_empty(&self) -> bool {
        self.by_xid.is_empty() && self.open.is_none()
    }

    /// Inside a block, buffers `msg` (or ends the block at Stream Stop);
    /// outside one, hands it back.
    pub(super) fn buffer(&mut self, msg: PgOutputMessage) -> Option<PgOutputMessage> {
        let Some(xid) = self.open else {
            return Some(msg);
        };
        match msg {
            PgOutputMessage::StreamStop => {
                self.open = None;
            }
            PgOutputMessage::Message(m) if !m.transactional => {}
            other => self.by_xid.entry(xid).or_default().push(other),
        }
        None
    }
}

impl Applier {
    pub(super) fn stream_start(&mut self, s: StreamStart) -> Result<(), ApplyError> {
        if s.first_segment {
            self.streamed.by_xid.insert(s.xid, Vec::new());
        } else if !self.streamed.by_xid.contains_key(&s.xid) {
            // Applying the rest of a transaction would apply part of it.
            return Err(self.protocol(format!(
                "streamed transaction {} continues without its first segment",
                s.xid
            )));
        }
        self.streamed.open = Some(s.xid);
        Ok(())
    }

    pub(super) fn stream_abort(&mut self, a: StreamAbort) {
        if a.xid == a.subxid {
            self.streamed.by_xid.remove(&a.xid);
        } else if let Some(buf) = self.streamed.by_xid.get_mut(&a.xid) {
            // Everything from the subtransaction's first change on belongs to it.
            if let Some(pos) = buf.iter().position(|m| change_xid(m) == Some(a.subxid)) {
                buf.truncate(pos);
            }
        }
    }

    pub(super) async fn stream_commit(&mut self, c: StreamCommit) -> Result<(), ApplyError> {
        let msgs = match self.streamed.by_xid.remove(&c.xid) {
            Some(m) => m,
            None if c.commit_lsn < self.origin.applied => Vec::new(),
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
