//! Streaming frame scanner for the relay: walks 5-byte headers over whatever
//! bytes a read returned and says how many may be forwarded now. A message
//! larger than the buffer is forwarded in pieces as it arrives (never held
//! whole); only the few messages the proxy must read are waited for in full.

use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub(crate) enum ScanError {
    #[error("invalid message length {len} for message type {tag:?}")]
    BadLength { tag: char, len: i32 },
    #[error("message of {len} bytes exceeds the limit of {max} bytes (proxy.max_message_size)")]
    TooLarge { len: usize, max: usize },
}

/// Scanner state for one direction.
#[derive(Debug)]
pub(crate) struct Scanner {
    /// Bytes of the current message not yet seen (it was forwarded in part).
    remaining: usize,
    max: usize,
}

impl Scanner {
    pub fn new(max: usize) -> Scanner {
        Scanner { remaining: 0, max }
    }

    /// True when everything forwarded so far ends on a message boundary, so
    /// the proxy may inject a message of its own.
    pub(crate) fn at_boundary(&self) -> bool {
        self.remaining == 0
    }

    /// Scans `buf` (which starts where the last forwarded byte ended) and
    /// returns how many leading bytes may be forwarded. `on_msg` sees every
    /// message header once: the tag and, when `full(tag)`, the whole body.
    /// A trailing partial header (or partial `full` message) stays unforwarded.
    pub(crate) fn scan(
        &mut self,
        buf: &[u8],
        full: impl Fn(u8) -> bool,
        mut on_msg: impl FnMut(u8, &[u8]),
    ) -> Result<usize, ScanError> {
        let mut p = 0usize;
        if self.remaining > 0 {
            let k = self.remaining.min(buf.len());
            self.remaining -= k;
            if self.remaining > 0 {
                return Ok(k);
            }
            p = k;
        }
        while buf.len() - p >= 5 {
            let tag = buf[p];
            let len = i32::from_be_bytes([buf[p + 1], buf[p + 2], buf[p + 3], buf[p + 4]]);
            if len < 4 {
                return Err(ScanError::BadLength {
                    tag: tag as char,
                    len,
                });
            }
            let total = len as usize + 1;
            if total > self.max {
                return Err(ScanError::TooLarge {
                    len: total,
                    max: self.max,
                });
            }
            let avail = buf.len() - p;
            if full(tag) {
                if avail < total {
                    return Ok(p);
                }
                on_msg(tag, &buf[p + 5..p + total]);
                p += total;
            } else {
                on_msg(tag, &[]);
                if avail < total {
                    self.remaining = total - avail;
                    return Ok(buf.len());
                }
                p += total;
            }
        }
        Ok(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        v.extend_from_slice(&(body.len() as i32 + 4).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn forwards_whole_messages_and_keeps_partial_header() {
        let mut s = Scanner::new(1 << 20);
        let mut b = msg(b'D', b"abc");
        b.extend(msg(b'Z', b"I"));
        b.extend_from_slice(b"C\0\0");
        let mut seen = vec![];
        let n = s
            .scan(&b, |t| t == b'Z', |t, body| seen.push((t, body.to_vec())))
            .unwrap();
        assert_eq!(n, b.len() - 3);
        assert_eq!(seen, vec![(b'D', vec![]), (b'Z', b"I".to_vec())]);
        assert!(s.at_boundary());
    }

    #[test]
    fn streams_large_message_in_pieces() {
        let mut s = Scanner::new(1 << 20);
        let big = msg(b'D', &vec![7u8; 1000]);
        let mut count = 0;
        assert_eq!(
            s.scan(&big[..100], |_| false, |_, _| count += 1).unwrap(),
            100
        );
        assert!(!s.at_boundary());
        assert_eq!(
            s.scan(&big[100..600], |_| false, |_, _| count += 1)
                .unwrap(),
            500
        );
        let mut tail = big[600..].to_vec();
        tail.extend(msg(b'Z', b"T"));
        let mut z = None;
        let n = s
            .scan(
                &tail,
                |t| t == b'Z',
                |t, b| {
                    count += 1;
                    if t == b'Z' {
                        z = Some(b[0]);
                    }
                },
            )
            .unwrap();
        assert_eq!(n, tail.len());
        assert_eq!((count, z), (2, Some(b'T')));
    }

    #[test]
    fn waits_for_full_messages_it_must_read() {
        let mut s = Scanner::new(1 << 20);
        let z = msg(b'S', b"a\0b\0");
        assert_eq!(s.scan(&z[..7], |t| t == b'S', |_, _| {}).unwrap(), 0);
        assert_eq!(s.scan(&z, |t| t == b'S', |_, _| {}).unwrap(), z.len());
    }

    #[test]
    fn rejects_bad_and_oversized_lengths() {
        let mut s = Scanner::new(100);
        assert!(matches!(
            s.scan(b"Q\0\0\0\x02", |_| false, |_, _| {}),
            Err(ScanError::BadLength { .. })
        ));
        assert!(matches!(
            s.scan(b"Q\x7f\0\0\0", |_| false, |_, _| {}),
            Err(ScanError::TooLarge { .. })
        ));
        assert!(matches!(
            s.scan(b"Q\xff\xff\xff\xff", |_| false, |_, _| {}),
            Err(ScanError::BadLength { .. })
        ));
    }
}
