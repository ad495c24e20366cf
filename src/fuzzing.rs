//! Entry points for the fuzz harness (`tests/fuzz`, `bench/fuzz.sh`): one
//! function per kind of untrusted input, each driving the parsers over the
//! bytes the way pgshift meets them. Not an API: hidden from the docs, and
//! nothing else in pgshift calls it.
//!
//! Every function must return (an error is fine) for any input: a panic, a
//! hang or an allocation sized by a length field rather than by the input is
//! a bug in the parser it reached.

use std::sync::OnceLock;

use bytes::Bytes;
use futures_util::FutureExt;

use crate::config::{Config, Endpoint};
use crate::proxy::scan::Scanner;
use crate::replication::client::{ReplicationMessage, parse_copy_data};
use crate::replication::pgoutput::{self, Decoder};
use crate::wire::FrameReader;
use crate::wire::auth::{ScramServer, ScramVerifier, md5_check};
use crate::wire::messages::{self, ErrorFields, StartupPacket, TxStatus};

/// The message size limit the drivers use (`proxy.max_message_size` is
/// configurable; the scanners must honour whatever it is).
pub const MAX_MESSAGE: usize = 64 * 1024;

/// Chunk sizes for feeding a stream scanner, derived from the input itself
/// (so one input is one reproducible run): a read may end anywhere.
fn chunks(data: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut state = data
        .iter()
        .take(8)
        .fold(0x9e37_79b9_u32, |h, &b| h.rotate_left(5) ^ u32::from(b));
    let mut rest = data;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        state = state.wrapping_mul(1_103_515_245).wrapping_add(12_345);
        let n = match state >> 29 {
            0 => rest.len(),
            1 => 1,
            _ => 1 + (state >> 8) as usize % 64,
        }
        .min(rest.len());
        let (head, tail) = rest.split_at(n);
        rest = tail;
        Some(head)
    })
}

/// Runs a stream `scanner` over `data` arriving in pieces, as the relay
/// does: scan what is buffered, forward what it allows, keep the rest.
fn relay(data: &[u8], full: impl Fn(u8) -> bool, mut on_msg: impl FnMut(u8, &[u8])) {
    let mut scanner = Scanner::new(MAX_MESSAGE);
    let mut buf: Vec<u8> = Vec::new();
    for chunk in chunks(data) {
        buf.extend_from_slice(chunk);
        match scanner.scan(&buf, &full, &mut on_msg) {
            Ok(n) => {
                assert!(n <= buf.len(), "scanner forwards more than it was given");
                buf.drain(..n);
            }
            Err(_) => return,
        }
    }
}

/// Client → proxy: the startup packets (SSLRequest, GSSENCRequest,
/// CancelRequest, StartupMessage) and the startup checks, the password
/// messages of md5 and SCRAM authentication, then the relayed stream.
#[doc(hidden)]
pub fn frontend(data: &[u8]) {
    let mut rest = data;
    // The startup phase reads at most a few packets (one SSL and one GSSENC
    // answer, then a StartupMessage or a CancelRequest).
    for _ in 0..3 {
        let before = rest;
        let read = crate::wire::frame::read_startup_packet(&mut rest, 10_000).now_or_never();
        let Some(Ok(body)) = read else {
            rest = before;
            break;
        };
        match StartupPacket::parse(&body) {
            Ok(StartupPacket::Startup { params }) => {
                let _ = crate::proxy::admission::check_startup(&params);
                break;
            }
            Ok(StartupPacket::Ssl | StartupPacket::GssEnc) => {}
            Ok(StartupPacket::Cancel { .. }) | Err(_) => break,
        }
    }
    authentication(rest);
    relay(rest, |_| false, |_, _| {});
}

/// The password messages, as [`crate::proxy::auth`] reads them.
fn authentication(data: &[u8]) {
    static VERIFIER: OnceLock<ScramVerifier> = OnceLock::new();
    let verifier = VERIFIER
        .get_or_init(|| ScramVerifier::with_salt("pencil", b"0123456789abcdef".to_vec(), 2));
    let mut reader = FrameReader::new(MAX_MESSAGE);
    reader.buf.extend_from_slice(data);
    let mut bodies = Vec::new();
    while bodies.len() < 2 {
        match reader.try_frame() {
            Ok(Some(f)) => bodies.push(f.body().to_vec()),
            _ => break,
        }
    }
    let Some(first) = bodies.first() else { return };
    let _ = md5_check("app", "pencil", [1, 2, 3, 4], first);
    let Ok(client_first) = crate::proxy::auth::sasl_initial_response(first) else {
        return;
    };
    let Ok((server, server_first)) = ScramServer::start(verifier, client_first) else {
        return;
    };
    // The server's nonce is random: spliced into the final message's `r=`,
    // so the proof parsing behind the nonce check is reached too.
    if let Some(last) = bodies.get(1) {
        let nonce = server_first
            .strip_prefix("r=")
            .and_then(|r| r.split(',').next())
            .unwrap_or_default();
        let _ = server.finish(&splice_nonce(last, nonce.as_bytes()));
    }
}

/// `msg` with the value of its first `r=` attribute replaced by `nonce`.
fn splice_nonce(msg: &[u8], nonce: &[u8]) -> Vec<u8> {
    let Some(at) = msg.windows(2).position(|w| w == b"r=") else {
        return msg.to_vec();
    };
    let value = at + 2;
    let end = msg[value..]
        .iter()
        .position(|&c| c == b',')
        .map_or(msg.len(), |n| value + n);
    [&msg[..value], nonce, &msg[end..]].concat()
}

/// What the relay reads in full from the server (`proxy::session`):
/// ReadyForQuery and ParameterStatus.
fn server_reads(tag: u8) -> bool {
    tag == b'Z' || tag == b'S'
}

/// Server → proxy: the relayed stream with the bodies the relay reads, and
/// the messages pgshift's own connections parse (authentication requests'
/// headers, ErrorResponse, ParameterStatus, BackendKeyData, DataRow).
#[doc(hidden)]
pub fn backend(data: &[u8]) {
    relay(data, server_reads, |tag, body| match tag {
        b'Z' => {
            let _ = body.first().and_then(|b| TxStatus::from_byte(*b));
        }
        b'S' => {
            let _ = messages::parse_parameter_status(body);
        }
        _ => {}
    });
    let mut reader = FrameReader::new(MAX_MESSAGE);
    reader.buf.extend_from_slice(data);
    while let Ok(Some(f)) = reader.try_frame() {
        match f.tag() {
            b'E' | b'N' => {
                if let Ok(e) = ErrorFields::parse(&f.bytes) {
                    let _ = (e.to_string(), e.is_fatal(), e.to_notice());
                }
            }
            b'S' => {
                let _ = messages::parse_parameter_status(f.body());
            }
            b'K' => {
                let _ = messages::parse_backend_key(f.body());
            }
            b'D' => {
                let _ = crate::wire::connect::parse_data_row(f.body());
            }
            b'd' => copy_data_frame(&f.bytes),
            _ => {}
        }
    }
}

/// One CopyData frame of a replication stream (XLogData or keepalive), and
/// the pgoutput message an XLogData carries.
fn copy_data_frame(frame: &Bytes) {
    if let Ok(ReplicationMessage::XLogData { data, .. }) = parse_copy_data(frame) {
        let _ = pgoutput::decode(data.clone(), false);
        let _ = pgoutput::decode(data, true);
    }
}

/// The body of a CopyData message on a replication connection.
#[doc(hidden)]
pub fn copy_data(body: &[u8]) {
    copy_data_frame(&messages::message(b'd', body));
}

/// A sequence of pgoutput messages, each prefixed by its length (u16, big
/// endian; the rest of the input is the last message), decoded in order as
/// a stream does (Stream Start/Stop switch the xid-carrying format); every
/// message is also decoded alone in both formats.
#[doc(hidden)]
pub fn pgoutput(data: &[u8]) {
    let data = Bytes::copy_from_slice(data);
    let mut decoder = Decoder::new();
    let mut at = 0;
    while at < data.len() {
        let (start, end) = match data.get(at..at + 2) {
            Some(&[hi, lo]) => {
                let start = at + 2;
                (
                    start,
                    (start + usize::from(u16::from_be_bytes([hi, lo]))).min(data.len()),
                )
            }
            _ => (at, data.len()),
        };
        let msg = data.slice(start..end);
        let _ = decoder.decode(msg.clone());
        let _ = pgoutput::decode(msg.clone(), !decoder.in_stream());
        at = end.max(at + 1);
    }
}

/// A simple-query string, as `proxy::replay` cuts a PREPARE out of one.
#[doc(hidden)]
pub fn sqltext(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let stmts = crate::sqltext::statements(&text);
    for s in &stmts {
        assert!(!s.is_empty(), "an empty statement was returned");
    }
    for name in ["a", "A", "s1", "Mixed\"q", ""] {
        let _ = crate::proxy::sqltext::prepare_replay(&text, name);
    }
    // Names as the text spells them after PREPARE.
    for s in stmts.iter().take(4) {
        if let Some(name) = s.split_whitespace().nth(1) {
            let _ = crate::proxy::sqltext::prepare_replay(&text, name);
        }
    }
}

/// The statement of `query` (a `current_query()` string) that fired the
/// `nth` (0-based) `ddl_command_end` event trigger with `TG_TAG = tag` in
/// it; None when no statement of the string has that tag (the command ran
/// inside a DO block or a function).
#[doc(hidden)]
pub fn ddl_pick(query: &str, tag: &str, nth: usize) -> Option<String> {
    crate::sqltext::pick_statement(query, tag, nth).map(str::to_string)
}

/// DDL replication's query strings: picking a command out of a string by
/// tag, and classifying the statements.
#[doc(hidden)]
pub fn ddl(data: &[u8]) {
    // The bytes as a DDL event from the stream: a capture table row's JSON,
    // a signed logical message, a bytea's text form.
    use crate::replication::ddl;
    if let Ok(ev) = ddl::read_event(data) {
        let _ = ddl::plan(&ev, &ev.objects, &crate::filter::TableFilter::default(), 18);
    }
    let _ = ddl::read_signed(data, Some(&[7u8; 32]));
    let _ = ddl::decode_bytea_text(data);
    let text = String::from_utf8_lossy(data);
    for s in crate::sqltext::statements(&text) {
        assert!(!s.is_empty(), "an empty statement was returned");
        let _ = crate::sqltext::runs_outside_transaction(s);
        let _ = crate::sqltext::is_enum_add_value(s);
        if let Some(tag) = crate::sqltext::ddl_command_tag(s) {
            assert!(
                crate::sqltext::command_tag_matches(s, &tag),
                "a statement does not match its own tag"
            );
        }
    }
    for tag in [
        "ALTER TABLE",
        "CREATE TABLE",
        "CREATE TABLE AS",
        "SELECT INTO",
        "CREATE FUNCTION",
        "GRANT",
        "COMMENT",
    ] {
        for nth in 0..3 {
            if let Some(s) = ddl_pick(&text, tag, nth) {
                assert!(
                    text.contains(&s),
                    "a picked statement is not part of the query"
                );
                assert!(
                    crate::sqltext::command_tag_matches(&s, tag),
                    "a picked statement does not have the tag"
                );
            }
        }
    }
}

/// Values the config's `${VAR}` references find.
fn env(name: &str) -> Option<String> {
    match name {
        "PW" => Some("p@ss:w/o?r#d%".into()),
        "USER" => Some("app".into()),
        "HOST" => Some("db.example.com".into()),
        "PORT" => Some("5432".into()),
        "EMPTY" => Some(String::new()),
        "SPACE" => Some("a b'c\\".into()),
        _ => None,
    }
}

/// A config file's text: TOML into a resolved [`Config`] (`${VAR}`
/// expansion, connection strings, durations, sizes, windows, checks); the
/// text alone also goes through the expansion and the value parsers.
#[doc(hidden)]
pub fn config(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    if let Ok(c) = Config::from_toml(&text, &env) {
        let _ = (c.source.display(), c.target.display(), c.source.pg_config());
    }
    let _ = crate::config::expand("x", &text, &env);
    let _ = crate::config::expand_conn("x", &text, &env);
    let _ = Endpoint::parse("x", &text);
    for line in text.lines().take(8) {
        let value = line.split_once('=').map_or(line, |(_, v)| v).trim();
        let value = value.trim_matches('"');
        let _ = crate::config::parse_duration(value);
        let _ = crate::config::parse_bytes(value);
        let _ = crate::config::window::parse_all(&[value.to_string()]);
        let _ = crate::config::expand_conn("x", value, &env);
        let _ = Endpoint::parse("x", value);
    }
}
