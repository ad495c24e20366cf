//! The extended query protocol spoken directly to the target: named
//! statements parsed with the target column types, rows bound with the
//! TEXT values exactly as pgoutput delivered them, many Bind/Execute pairs
//! sent back to back and answered after one Sync.

use std::sync::Arc;

use bytes::{BufMut, BytesMut};
use tokio::io::AsyncWriteExt;

use crate::replication::Lsn;
use crate::replication::pgoutput::{Tuple, TupleValue};
use crate::wire::messages::TxStatus;
use crate::wire::{ErrorFields, FrameReader, ServerConnection, WireError};

/// What one Execute in the pipeline stands for, to attribute its result.
#[derive(Clone, Debug)]
pub(super) struct Op {
    /// The source transaction's commit LSN (zero for control statements).
    pub commit_lsn: Lsn,
    /// `schema.table`, for row statements.
    pub table: Option<Arc<str>>,
    pub what: &'static str,
    /// The number of rows the statement must affect, when it is checked.
    pub expect_rows: Option<u64>,
}

impl Op {
    pub fn control(what: &'static str) -> Op {
        Op {
            commit_lsn: Lsn::ZERO,
            table: None,
            what,
            expect_rows: None,
        }
    }
}

/// One parameter value.
#[derive(Clone, Copy, Debug)]
pub(super) enum Param<'a> {
    Null,
    Text(&'a [u8]),
    Binary(&'a [u8]),
}

/// Why a pipeline round failed.
#[derive(Debug)]
pub(super) enum RoundError {
    Wire(WireError),
    Server { op: Option<Op>, error: ErrorFields },
    RowCount { op: Op, rows: u64 },
}

pub(super) struct Pipeline {
    pub conn: ServerConnection,
    out: BytesMut,
    ops: Vec<Op>,
}

impl Pipeline {
    pub fn new(conn: ServerConnection) -> Pipeline {
        Pipeline {
            conn,
            out: BytesMut::with_capacity(1 << 20),
            ops: Vec::new(),
        }
    }

    /// Bytes queued and not yet sent.
    pub(crate) fn queued_bytes(&self) -> usize {
        self.out.len()
    }

    pub(crate) fn queued_ops(&self) -> usize {
        self.ops.len()
    }

    /// Queues a Parse of a named statement with the given parameter types.
    pub fn parse(&mut self, name: &str, sql: &str, types: &[u32]) {
        let start = self.begin_message(b'P');
        put_cstr(&mut self.out, name);
        put_cstr(&mut self.out, sql);
        self.out.put_i16(types.len() as i16);
        for t in types {
            self.out.put_u32(*t);
        }
        self.end_message(start);
    }

    /// Queues Bind + Execute of a named statement on the unnamed portal.
    pub fn execute(&mut self, stmt: &str, params: &[Param<'_>], op: Op) {
        let start = self.begin_message(b'B');
        self.out.put_u8(0);
        put_cstr(&mut self.out, stmt);
        if params.iter().any(|p| matches!(p, Param::Binary(_))) {
            self.out.put_i16(params.len() as i16);
            for p in params {
                self.out.put_i16(i16::from(matches!(p, Param::Binary(_))));
            }
        } else {
            self.out.put_i16(0);
        }
        self.out.put_i16(params.len() as i16);
        for p in params {
            match p {
                Param::Null => self.out.put_i32(-1),
                Param::Text(b) | Param::Binary(b) => {
                    self.out.put_i32(b.len() as i32);
                    self.out.extend_from_slice(b);
                }
            }
        }
        self.out.put_i16(0);
        self.end_message(start);
        self.out.extend_from_slice(b"E\0\0\0\x09\0\0\0\0\0");
        self.ops.push(op);
    }

    /// Queues `COPY … FROM STDIN` (`sql`) with `rows` as its data, in text
    /// format: Parse / Bind / Execute of the unnamed statement, then the
    /// data and CopyDone, answered like any statement (its tag counts the
    /// rows). If anything before it fails, the server discards the data
    /// with the rest of the round up to Sync.
    pub fn copy_in<'a>(&mut self, sql: &str, rows: impl Iterator<Item = &'a Tuple>, op: Op) {
        /// CopyData messages of about this size.
        const CHUNK: usize = 64 * 1024;
        self.parse("", sql, &[]);
        let start = self.begin_message(b'B');
        self.out.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0]);
        self.end_message(start);
        self.out.extend_from_slice(b"E\0\0\0\x09\0\0\0\0\0");
        let mut data = self.begin_message(b'd');
        for row in rows {
            for (i, v) in row.0.iter().enumerate() {
                if i > 0 {
                    self.out.put_u8(b'\t');
                }
                match v {
                    TupleValue::Text(b) | TupleValue::Binary(b) => put_copy_text(&mut self.out, b),
                    TupleValue::Null | TupleValue::UnchangedToast => {
                        self.out.extend_from_slice(b"\\N")
                    }
                }
            }
            self.out.put_u8(b'\n');
            if self.out.len() - data > CHUNK {
                self.end_message(data);
                data = self.begin_message(b'd');
            }
        }
        self.end_message(data);
        self.out.extend_from_slice(b"c\0\0\0\x04");
        self.ops.push(op);
    }

    fn begin_message(&mut self, tag: u8) -> usize {
        let start = self.out.len();
        self.out.put_u8(tag);
        self.out.put_i32(0);
        start
    }

    fn end_message(&mut self, start: usize) {
        let len = (self.out.len() - start - 1) as i32;
        self.out[start + 1..start + 5].copy_from_slice(&len.to_be_bytes());
    }

    /// Sends everything queued plus a Sync and reads the answers up to
    /// ReadyForQuery. Writing and reading run together, so a large round
    /// cannot deadlock on full socket buffers.
    pub async fn sync(&mut self) -> Result<TxStatus, RoundError> {
        self.out.extend_from_slice(b"S\0\0\0\x04");
        let data = self.out.split().freeze();
        let ops = std::mem::take(&mut self.ops);
        let (mut rd, mut wr) = tokio::io::split(&mut self.conn.stream);
        let reader = &mut self.conn.reader;
        let write = async {
            wr.write_all(&data).await?;
            wr.flush().await?;
            Ok::<(), WireError>(())
        };
        let (status, failure) = tokio::try_join!(write, read_results(reader, &mut rd, &ops))
            .map(|((), r)| r)
            .map_err(RoundError::Wire)?;
        self.conn.status = status;
        match failure {
            Some(f) => Err(f),
            None => Ok(status),
        }
    }

    /// Drops anything queued (after a failure).
    pub fn clear(&mut self) {
        self.out.clear();
        self.ops.clear();
    }
}

/// Reads one round's answers, matching CommandComplete / ErrorResponse to
/// the queued operations in order; returns the first failure.
async fn read_results<R: tokio::io::AsyncRead + Unpin>(
    reader: &mut FrameReader,
    rd: &mut R,
    ops: &[Op],
) -> Result<(TxStatus, Option<RoundError>), WireError> {
    let mut next = 0usize;
    let mut failure = None;
    loop {
        let f = reader.read_required(rd).await?;
        match f.tag() {
            b'C' => {
                if let Some(op) = ops.get(next) {
                    let rows = affected_rows(f.body());
                    if let Some(want) = op.expect_rows
                        && rows != Some(want)
                        && failure.is_none()
                    {
                        failure = Some(RoundError::RowCount {
                            op: op.clone(),
                            rows: rows.unwrap_or(0),
                        });
                    }
                }
                next += 1;
            }
            b'E' => {
                let error = ErrorFields::parse(&f.bytes)?;
                if failure.is_none() {
                    failure = Some(RoundError::Server {
                        op: ops.get(next).cloned(),
                        error,
                    });
                }
            }
            b'Z' => {
                let status = f
                    .body()
                    .first()
                    .and_then(|b| TxStatus::from_byte(*b))
                    .ok_or_else(|| WireError::Protocol("bad ReadyForQuery".into()))?;
                return Ok((status, failure));
            }
            // ParseComplete, BindComplete, DataRow, notices, parameter status.
            _ => {}
        }
    }
}

/// The row count at the end of a CommandComplete tag (`UPDATE 3`, `INSERT 0 1`).
fn affected_rows(body: &[u8]) -> Option<u64> {
    let tag = body.strip_suffix(b"\0").unwrap_or(body);
    let last = tag.rsplit(|b| *b == b' ').next()?;
    std::str::from_utf8(last).ok()?.parse().ok()
}

/// A value in COPY's text format: backslash, newline, carriage return and
/// tab escaped (so no line can read as the end-of-data marker either).
fn put_copy_text(out: &mut BytesMut, v: &[u8]) {
    let mut from = 0;
    for (i, b) in v.iter().enumerate() {
        let escaped = match b {
            b'\\' => b'\\',
            b'\n' => b'n',
            b'\r' => b'r',
            b'\t' => b't',
            _ => continue,
        };
        out.extend_from_slice(&v[from..i]);
        out.put_u8(b'\\');
        out.put_u8(escaped);
        from = i + 1;
    }
    out.extend_from_slice(&v[from..]);
}

fn put_cstr(out: &mut BytesMut, s: &str) {
    out.extend_from_slice(s.as_bytes());
    out.put_u8(0);
}

#[cfg(test)]
mod tests {
    use super::{affected_rows, put_copy_text};

    #[test]
    fn copy_text_escapes_what_would_end_a_field_or_a_line() {
        let mut out = bytes::BytesMut::new();
        put_copy_text(&mut out, b"a\tb\nc\\d\re \\.");
        assert_eq!(&out[..], b"a\\tb\\nc\\\\d\\re \\\\.");
        let mut out = bytes::BytesMut::new();
        put_copy_text(&mut out, "plain é".as_bytes());
        assert_eq!(&out[..], "plain é".as_bytes());
    }

    #[test]
    fn row_counts_from_command_tags() {
        assert_eq!(affected_rows(b"INSERT 0 1\0"), Some(1));
        assert_eq!(affected_rows(b"UPDATE 0\0"), Some(0));
        assert_eq!(affected_rows(b"DELETE 12\0"), Some(12));
        assert_eq!(affected_rows(b"TRUNCATE TABLE\0"), None);
        assert_eq!(affected_rows(b"COPY 10000\0"), Some(10000));
        assert_eq!(affected_rows(b""), None);
    }
}
