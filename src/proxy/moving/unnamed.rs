//! The unnamed prepared statement (Parse with an empty name: libpq's
//! PQexecParams and PQprepare(conn, "", …), pgbench -M extended, JDBC below
//! prepareThreshold, tokio-postgres' typed queries) moves with the session:
//! the move re-Parses it on the new backend. Waiting for the client's next
//! Parse instead would not do: a client may Bind the unnamed statement again
//! without parsing it (PQprepare "" then PQexecPrepared ""), and an idle
//! session holding one would never move while the cutover's switch waits.
//!
//! The server does not list it (`pg_prepared_statements` shows named ones
//! only), so the relay follows the client's Parse messages here and keeps the
//! text of the last unnamed Parse the server completed (ParseComplete; a
//! failed or skipped one does not count). A simple Query drops the unnamed
//! statement on the server, and so does a failed Parse or a Close: whether
//! it still exists is asked at the move (Describe), see
//! [`super::replay::capture`].

use std::collections::VecDeque;

use bytes::Bytes;

/// Something the client sent that changes the unnamed statement once the
/// server runs it.
enum Sent {
    /// The `index`-th Parse of request `group` named the unnamed statement.
    Parse { group: u64, index: u32, text: Bytes },
    /// A simple Query (its own request) drops the unnamed statement.
    Query { group: u64 },
}

/// Follows the client's unnamed statement through the relay. Requests
/// ("groups": up to a Sync, a Query or a FunctionCall, each answered by one
/// ReadyForQuery) are counted on both sides, so a ParseComplete is matched
/// to the Parse it answers.
#[derive(Default)]
pub(crate) struct Unnamed {
    /// Requests the client sent.
    sent: u64,
    /// Requests the server answered.
    done: u64,
    /// Parse messages in the client's current request.
    parses_sent: u32,
    /// ParseCompletes in the request the server is answering.
    parses_done: u32,
    /// Sent, not yet answered, in order.
    pending: VecDeque<Sent>,
    /// The text of the last unnamed Parse the server completed, unless a
    /// simple Query has dropped it since.
    last: Option<Bytes>,
}

/// The query text of a Parse message body that names the unnamed statement.
fn unnamed_text(body: &[u8]) -> Option<&[u8]> {
    let (name_end, rest) = body.split_first()?;
    if *name_end != 0 {
        return None;
    }
    let end = rest.iter().position(|b| *b == 0)?;
    Some(&rest[..end])
}

impl Unnamed {
    /// A message the client sent; `body` is the whole body for Parse.
    pub(crate) fn on_client(&mut self, tag: u8, body: &[u8]) {
        match tag {
            b'P' => {
                self.parses_sent += 1;
                if let Some(text) = unnamed_text(body) {
                    self.pending.push_back(Sent::Parse {
                        group: self.sent,
                        index: self.parses_sent,
                        text: Bytes::copy_from_slice(text),
                    });
                }
            }
            b'Q' | b'S' | b'F' => {
                if tag == b'Q' {
                    self.pending.push_back(Sent::Query { group: self.sent });
                }
                self.sent += 1;
                self.parses_sent = 0;
            }
            _ => {}
        }
    }

    /// A message the server sent.
    pub(crate) fn on_server(&mut self, tag: u8) {
        match tag {
            b'1' => {
                self.parses_done += 1;
                let (done, nth) = (self.done, self.parses_done);
                if let Some(Sent::Parse { group, index, .. }) = self.pending.front()
                    && (*group, *index) == (done, nth)
                    && let Some(Sent::Parse { text, .. }) = self.pending.pop_front()
                {
                    self.last = Some(text);
                }
            }
            b'Z' => {
                // What is left of this request was skipped after an error,
                // except a simple Query, which ran.
                while let Some(s) = self.pending.front() {
                    let group = match s {
                        Sent::Parse { group, .. } | Sent::Query { group } => *group,
                    };
                    if group > self.done {
                        break;
                    }
                    if matches!(s, Sent::Query { .. }) {
                        self.last = None;
                    }
                    self.pending.pop_front();
                }
                self.done += 1;
                self.parses_done = 0;
            }
            _ => {}
        }
    }

    /// The text of the unnamed statement the session may hold.
    pub(crate) fn text(&self) -> Option<&Bytes> {
        self.last.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(name: &str, text: &str) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(name.as_bytes());
        b.push(0);
        b.extend_from_slice(text.as_bytes());
        b.extend_from_slice(&[0, 0, 0]);
        b
    }

    fn client(u: &mut Unnamed, msgs: &[(u8, Vec<u8>)]) {
        for (t, b) in msgs {
            u.on_client(*t, b);
        }
    }

    fn server(u: &mut Unnamed, tags: &[u8]) {
        for t in tags {
            u.on_server(*t);
        }
    }

    fn text(u: &Unnamed) -> Option<&[u8]> {
        u.text().map(|b| &b[..])
    }

    #[test]
    fn the_last_completed_unnamed_parse_is_kept() {
        let mut u = Unnamed::default();
        client(
            &mut u,
            &[
                (b'P', parse("", "SELECT 1")),
                (b'B', vec![]),
                (b'E', vec![]),
                (b'S', vec![]),
            ],
        );
        assert_eq!(text(&u), None);
        server(&mut u, b"12CZ");
        assert_eq!(text(&u), Some(&b"SELECT 1"[..]));
        // A named Parse leaves it.
        client(&mut u, &[(b'P', parse("s1", "SELECT 2")), (b'S', vec![])]);
        server(&mut u, b"1Z");
        assert_eq!(text(&u), Some(&b"SELECT 1"[..]));
    }

    #[test]
    fn a_skipped_parse_leaves_the_older_statement() {
        let mut u = Unnamed::default();
        client(&mut u, &[(b'P', parse("", "A")), (b'S', vec![])]);
        server(&mut u, b"1Z");
        // Pipelined: a Bind fails, the Parse after it is skipped; the next
        // request's Parse completes.
        client(
            &mut u,
            &[
                (b'B', vec![]),
                (b'P', parse("", "B")),
                (b'S', vec![]),
                (b'P', parse("x", "X")),
                (b'P', parse("", "C")),
                (b'S', vec![]),
            ],
        );
        server(&mut u, b"EZ");
        assert_eq!(text(&u), Some(&b"A"[..]));
        server(&mut u, b"1");
        assert_eq!(text(&u), Some(&b"A"[..]), "the named Parse completed");
        server(&mut u, b"1Z");
        assert_eq!(text(&u), Some(&b"C"[..]));
    }

    #[test]
    fn a_simple_query_drops_it() {
        let mut u = Unnamed::default();
        client(&mut u, &[(b'P', parse("", "A")), (b'S', vec![])]);
        server(&mut u, b"1Z");
        client(&mut u, &[(b'Q', vec![])]);
        server(&mut u, b"CZ");
        assert_eq!(text(&u), None);
    }

    #[test]
    fn malformed_parse_bodies_are_ignored() {
        assert_eq!(unnamed_text(b""), None);
        assert_eq!(unnamed_text(b"\0no end"), None);
        assert_eq!(unnamed_text(b"n\0SELECT\0"), None);
        assert_eq!(unnamed_text(b"\0SELECT\0\0\0"), Some(&b"SELECT"[..]));
    }
}
