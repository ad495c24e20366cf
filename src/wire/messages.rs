//! The messages pgshift itself builds or reads. Everything else is forwarded as
//! raw bytes.

use std::fmt;

use bytes::{BufMut, Bytes, BytesMut};

use super::WireError;
use super::frame::{get_cstr, get_i32};

const PROTOCOL_3_0: i32 = 196_608;
const SSL_REQUEST: i32 = 80_877_103;
const GSSENC_REQUEST: i32 = 80_877_104;
const CANCEL_REQUEST: i32 = 80_877_102;

/// Transaction status from ReadyForQuery.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum TxStatus {
    Idle,
    InTransaction,
    Failed,
}

impl TxStatus {
    pub(crate) fn from_byte(b: u8) -> Option<TxStatus> {
        match b {
            b'I' => Some(TxStatus::Idle),
            b'T' => Some(TxStatus::InTransaction),
            b'E' => Some(TxStatus::Failed),
            _ => None,
        }
    }
    pub fn byte(self) -> u8 {
        match self {
            TxStatus::Idle => b'I',
            TxStatus::InTransaction => b'T',
            TxStatus::Failed => b'E',
        }
    }
}

/// What the first packet of a connection asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum StartupPacket {
    Ssl,
    GssEnc,
    Cancel { pid: i32, secret: i32 },
    Startup { params: Vec<(String, String)> },
}

impl StartupPacket {
    /// Parses the body of an untagged startup packet (after the length).
    pub fn parse(body: &[u8]) -> Result<StartupPacket, WireError> {
        let mut b = body;
        let code = get_i32(&mut b)?;
        match code {
            SSL_REQUEST => Ok(StartupPacket::Ssl),
            GSSENC_REQUEST => Ok(StartupPacket::GssEnc),
            CANCEL_REQUEST => {
                let pid = get_i32(&mut b)?;
                let secret = get_i32(&mut b)?;
                Ok(StartupPacket::Cancel { pid, secret })
            }
            PROTOCOL_3_0 => {
                let mut params = Vec::new();
                loop {
                    if b.is_empty() {
                        return Err(WireError::Protocol("startup packet not terminated".into()));
                    }
                    if b[0] == 0 {
                        break;
                    }
                    let k = get_cstr(&mut b)?;
                    let v = get_cstr(&mut b)?;
                    params.push((k, v));
                }
                Ok(StartupPacket::Startup { params })
            }
            other => {
                let (major, minor) = (other >> 16, other & 0xffff);
                Err(WireError::Protocol(format!(
                    "unsupported frontend protocol {major}.{minor}: server supports 3.0"
                )))
            }
        }
    }
}

/// Builds a StartupMessage packet.
pub fn startup_message(params: &[(String, String)]) -> Bytes {
    let mut body = BytesMut::new();
    body.put_i32(PROTOCOL_3_0);
    for (k, v) in params {
        put_cstr(&mut body, k);
        put_cstr(&mut body, v);
    }
    body.put_u8(0);
    let mut out = BytesMut::with_capacity(body.len() + 4);
    out.put_i32(body.len() as i32 + 4);
    out.extend_from_slice(&body);
    out.freeze()
}

/// Builds a CancelRequest packet.
pub(crate) fn cancel_request(pid: i32, secret: i32) -> Bytes {
    let mut out = BytesMut::with_capacity(16);
    out.put_i32(16);
    out.put_i32(CANCEL_REQUEST);
    out.put_i32(pid);
    out.put_i32(secret);
    out.freeze()
}

pub(crate) fn put_cstr(buf: &mut BytesMut, s: &str) {
    buf.extend_from_slice(s.as_bytes());
    buf.put_u8(0);
}

/// A tagged message from a tag and a body.
pub fn message(tag: u8, body: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(body.len() + 5);
    out.put_u8(tag);
    out.put_i32(body.len() as i32 + 4);
    out.extend_from_slice(body);
    out.freeze()
}

pub(crate) fn ready_for_query(status: TxStatus) -> Bytes {
    message(b'Z', &[status.byte()])
}

pub(crate) fn auth_ok() -> Bytes {
    message(b'R', &0i32.to_be_bytes())
}

pub(crate) fn auth_md5(salt: [u8; 4]) -> Bytes {
    let mut b = BytesMut::new();
    b.put_i32(5);
    b.extend_from_slice(&salt);
    message(b'R', &b)
}

pub(crate) fn auth_sasl(mechanisms: &[&str]) -> Bytes {
    let mut b = BytesMut::new();
    b.put_i32(10);
    for m in mechanisms {
        put_cstr(&mut b, m);
    }
    b.put_u8(0);
    message(b'R', &b)
}

pub(crate) fn auth_sasl_continue(data: &[u8]) -> Bytes {
    let mut b = BytesMut::new();
    b.put_i32(11);
    b.extend_from_slice(data);
    message(b'R', &b)
}

pub(crate) fn auth_sasl_final(data: &[u8]) -> Bytes {
    let mut b = BytesMut::new();
    b.put_i32(12);
    b.extend_from_slice(data);
    message(b'R', &b)
}

pub(crate) fn parameter_status(name: &str, value: &str) -> Bytes {
    let mut b = BytesMut::new();
    put_cstr(&mut b, name);
    put_cstr(&mut b, value);
    message(b'S', &b)
}

pub(crate) fn backend_key_data(pid: i32, secret: i32) -> Bytes {
    let mut b = BytesMut::new();
    b.put_i32(pid);
    b.put_i32(secret);
    message(b'K', &b)
}

/// Parses a ParameterStatus body.
pub(crate) fn parse_parameter_status(body: &[u8]) -> Result<(String, String), WireError> {
    let mut b = body;
    Ok((get_cstr(&mut b)?, get_cstr(&mut b)?))
}

/// Parses a BackendKeyData body.
pub(crate) fn parse_backend_key(body: &[u8]) -> Result<(i32, i32), WireError> {
    let mut b = body;
    Ok((get_i32(&mut b)?, get_i32(&mut b)?))
}

/// The fields of an ErrorResponse or NoticeResponse.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ErrorFields {
    pub severity: String,
    pub code: String,
    pub message: String,
    pub detail: Option<String>,
    pub hint: Option<String>,
    /// The original frame, when parsed from the wire (relay it unchanged).
    pub raw: Option<Bytes>,
}

impl fmt::Display for ErrorFields {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {} (SQLSTATE {})",
            self.severity, self.message, self.code
        )?;
        if let Some(d) = &self.detail {
            write!(f, " DETAIL: {d}")?;
        }
        Ok(())
    }
}

impl ErrorFields {
    pub fn new(severity: &str, code: &str, message: impl Into<String>) -> Self {
        ErrorFields {
            severity: severity.into(),
            code: code.into(),
            message: message.into(),
            ..Default::default()
        }
    }

    pub fn with_detail(mut self, d: impl Into<String>) -> Self {
        self.detail = Some(d.into());
        self
    }

    pub fn with_hint(mut self, h: impl Into<String>) -> Self {
        self.hint = Some(h.into());
        self
    }

    /// Parses an ErrorResponse / NoticeResponse frame.
    pub fn parse(frame: &[u8]) -> Result<ErrorFields, WireError> {
        if frame.len() < 5 {
            return Err(WireError::Protocol("short error message".into()));
        }
        let mut b = &frame[5..];
        let mut e = ErrorFields {
            raw: Some(Bytes::copy_from_slice(frame)),
            ..Default::default()
        };
        while let Some(&t) = b.first() {
            if t == 0 {
                break;
            }
            b = &b[1..];
            let v = get_cstr(&mut b)?;
            match t {
                b'V' => e.severity = v,
                b'S' if e.severity.is_empty() => e.severity = v,
                b'C' => e.code = v,
                b'M' => e.message = v,
                b'D' => e.detail = Some(v),
                b'H' => e.hint = Some(v),
                _ => {}
            }
        }
        Ok(e)
    }

    /// Encodes as an ErrorResponse (or returns the original bytes).
    pub(crate) fn to_frame(&self) -> Bytes {
        if let Some(r) = &self.raw {
            return r.clone();
        }
        self.encode(b'E')
    }

    /// Encodes as a NoticeResponse.
    pub(crate) fn to_notice(&self) -> Bytes {
        self.encode(b'N')
    }

    fn encode(&self, tag: u8) -> Bytes {
        let mut b = BytesMut::new();
        for (t, v) in [
            (b'S', &self.severity),
            (b'V', &self.severity),
            (b'C', &self.code),
            (b'M', &self.message),
        ] {
            b.put_u8(t);
            put_cstr(&mut b, v);
        }
        if let Some(d) = &self.detail {
            b.put_u8(b'D');
            put_cstr(&mut b, d);
        }
        if let Some(h) = &self.hint {
            b.put_u8(b'H');
            put_cstr(&mut b, h);
        }
        b.put_u8(0);
        message(tag, &b)
    }

    /// Is this fatal for the connection (FATAL or PANIC)?
    pub(crate) fn is_fatal(&self) -> bool {
        matches!(self.severity.as_str(), "FATAL" | "PANIC")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn startup_round_trip() {
        let p = vec![
            ("user".to_string(), "app".to_string()),
            ("database".to_string(), "db".to_string()),
        ];
        let pkt = startup_message(&p);
        assert_eq!(
            i32::from_be_bytes([pkt[0], pkt[1], pkt[2], pkt[3]]) as usize,
            pkt.len()
        );
        assert_eq!(
            StartupPacket::parse(&pkt[4..]).unwrap(),
            StartupPacket::Startup { params: p }
        );
        let c = cancel_request(7, 9);
        assert_eq!(
            StartupPacket::parse(&c[4..]).unwrap(),
            StartupPacket::Cancel { pid: 7, secret: 9 }
        );
    }

    #[test]
    fn garbage_startup_is_an_error() {
        assert!(StartupPacket::parse(b"\x00\x01").is_err());
        assert!(StartupPacket::parse(b"\x12\x34\x56\x78").is_err());
        // Protocol 3.0 with unterminated params.
        assert!(StartupPacket::parse(b"\x00\x03\x00\x00user\0app").is_err());
    }

    #[test]
    fn error_round_trip() {
        let e = ErrorFields::new(
            "FATAL",
            "28P01",
            "password authentication failed for user \"x\"",
        )
        .with_detail("d");
        let f = e.to_frame();
        let p = ErrorFields::parse(&f).unwrap();
        assert_eq!(p.code, "28P01");
        assert_eq!(p.severity, "FATAL");
        assert_eq!(p.detail.as_deref(), Some("d"));
        assert!(p.is_fatal());
    }
}
