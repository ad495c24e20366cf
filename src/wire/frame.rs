//! Framing by the 5-byte header (tag + int32 length), keeping the original
//! bytes so forwarded traffic is never re-encoded.

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

use super::WireError;

/// One message with its header: `bytes` is exactly what was on the wire.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    pub bytes: Bytes,
}

impl Frame {
    pub fn tag(&self) -> u8 {
        self.bytes[0]
    }
    /// The payload after the 5-byte header.
    pub fn body(&self) -> &[u8] {
        &self.bytes[5..]
    }
    pub fn len(&self) -> usize {
        self.bytes.len()
    }
    pub fn is_empty(&self) -> bool {
        self.bytes.len() <= 5
    }
}

/// Reads frames from a byte stream with a buffer, enforcing a size limit.
pub struct FrameReader {
    pub buf: BytesMut,
    pub max: usize,
}

impl FrameReader {
    pub fn new(max: usize) -> Self {
        FrameReader {
            buf: BytesMut::with_capacity(16 * 1024),
            max,
        }
    }

    /// Splits one complete frame off the buffer, if there is one.
    pub(crate) fn try_frame(&mut self) -> Result<Option<Frame>, WireError> {
        if self.buf.len() < 5 {
            return Ok(None);
        }
        let len = i32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]);
        if len < 4 {
            return Err(WireError::Protocol(format!(
                "invalid message length {len} for message type {:?}",
                self.buf[0] as char
            )));
        }
        let total = len as usize + 1;
        if total > self.max {
            return Err(WireError::TooLarge {
                len: total,
                max: self.max,
            });
        }
        if self.buf.len() < total {
            self.buf.reserve(total - self.buf.len());
            return Ok(None);
        }
        Ok(Some(Frame {
            bytes: self.buf.split_to(total).freeze(),
        }))
    }

    /// Reads until one frame is complete. `Ok(None)`: clean EOF between frames.
    pub async fn read<R: AsyncRead + Unpin>(
        &mut self,
        r: &mut R,
    ) -> Result<Option<Frame>, WireError> {
        loop {
            if let Some(f) = self.try_frame()? {
                return Ok(Some(f));
            }
            if self.buf.capacity() - self.buf.len() < 4096 {
                self.buf.reserve(16 * 1024);
            }
            let n = r.read_buf(&mut self.buf).await?;
            if n == 0 {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(WireError::Closed)
                };
            }
        }
    }

    /// Like [`read`](Self::read) but EOF is an error.
    pub(crate) async fn read_required<R: AsyncRead + Unpin>(
        &mut self,
        r: &mut R,
    ) -> Result<Frame, WireError> {
        self.read(r).await?.ok_or(WireError::Closed)
    }

    /// Fills the buffer with whatever the socket has (at least one byte). Returns false on EOF.
    pub async fn fill<R: AsyncRead + Unpin>(&mut self, r: &mut R) -> Result<bool, WireError> {
        if self.buf.capacity() - self.buf.len() < 4096 {
            self.buf.reserve(64 * 1024);
        }
        Ok(r.read_buf(&mut self.buf).await? > 0)
    }
}

/// Reads an untagged startup-phase packet (length-prefixed, no tag byte).
pub(crate) async fn read_startup_packet<R: AsyncRead + Unpin>(
    r: &mut R,
    max: usize,
) -> Result<Bytes, WireError> {
    let mut len_buf = [0u8; 4];
    r.read_exact(&mut len_buf).await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            WireError::Closed
        } else {
            WireError::Io(e)
        }
    })?;
    let len = i32::from_be_bytes(len_buf);
    if !(8..=max as i32).contains(&len) {
        return Err(WireError::Protocol(format!(
            "invalid startup packet length {len}"
        )));
    }
    let mut body = vec![0u8; len as usize - 4];
    r.read_exact(&mut body).await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            WireError::Closed
        } else {
            WireError::Io(e)
        }
    })?;
    Ok(Bytes::from(body))
}

/// Reads a NUL-terminated string from a message body.
pub(crate) fn get_cstr(buf: &mut &[u8]) -> Result<String, WireError> {
    let end = buf
        .iter()
        .position(|&b| b == 0)
        .ok_or_else(|| WireError::Protocol("missing string terminator".into()))?;
    let s = String::from_utf8_lossy(&buf[..end]).into_owned();
    buf.advance(end + 1);
    Ok(s)
}

/// Reads a big-endian int32 from a message body.
pub(crate) fn get_i32(buf: &mut &[u8]) -> Result<i32, WireError> {
    if buf.len() < 4 {
        return Err(WireError::Protocol("message too short".into()));
    }
    Ok(buf.get_i32())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_split_and_join() {
        let data: &[u8] = b"Z\0\0\0\x05IQ\0\0\0\x0bselect\0";
        let mut r = data;
        let mut fr = FrameReader::new(1 << 20);
        let a = fr.read(&mut r).await.unwrap().unwrap();
        assert_eq!(a.tag(), b'Z');
        assert_eq!(a.body(), b"I");
        let b = fr.read(&mut r).await.unwrap().unwrap();
        assert_eq!(b.tag(), b'Q');
        assert_eq!(b.body(), b"select\0");
        assert!(fr.read(&mut r).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn rejects_bad_lengths() {
        let mut fr = FrameReader::new(100);
        let mut r: &[u8] = b"Q\0\0\x10\0";
        assert!(matches!(
            fr.read(&mut r).await,
            Err(WireError::TooLarge { .. })
        ));
        let mut fr = FrameReader::new(100);
        let mut r: &[u8] = b"Q\0\0\0\x02";
        assert!(matches!(fr.read(&mut r).await, Err(WireError::Protocol(_))));
        let mut fr = FrameReader::new(100);
        let mut r: &[u8] = b"Q\0\0\0\x09ab";
        assert!(matches!(fr.read(&mut r).await, Err(WireError::Closed)));
    }
}
