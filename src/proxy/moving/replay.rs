//! Session state that survives a move to another backend (DESIGN.md
//! "Proxy"): read from the old backend at a transaction boundary, replayed
//! on the new one. Replies to these queries stay in the proxy; only
//! notifications (they belong to the client) are passed on.
//!
//! Replayed: settings changed in the session (`pg_settings` source
//! 'session'), prepared statements (protocol-level ones with their parameter
//! types resolved by name on the new server, SQL `PREPARE` by re-running its
//! text), the unnamed statement (see [`super::unnamed`]) and LISTEN
//! channels. Temporary tables, WITH HOLD cursors and session advisory locks
//! cannot move: the session is refused.

use std::collections::HashSet;

use bytes::{BufMut, Bytes, BytesMut};
use postgres_protocol::message::frontend;
use tokio::io::AsyncWriteExt;

use super::{MoveError, ReplayError, Unmovable};

use crate::db::quote_ident;
use crate::wire::connect::{TextRow, parse_data_row};
use crate::wire::messages;
use crate::wire::{ErrorFields, FrameReader, PgStream, WireError};

/// Text as hex of its UTF-8 bytes, readable whatever the session's
/// client_encoding is.
fn hex(expr: &str) -> String {
    format!("pg_catalog.encode(pg_catalog.convert_to({expr}, 'UTF8'), 'hex')")
}

/// One row per piece of state: (kind, name, value, extra); name and value in [`hex`].
fn capture_sql() -> String {
    format!(
        // Temporary objects: checked only when the session has a temporary
        // schema (neither catalog is indexed by namespace alone).
        "SELECT 'temp', NULL, NULL, NULL WHERE pg_catalog.pg_my_temp_schema() <> 0 \
           AND EXISTS (SELECT 1 FROM pg_catalog.pg_class WHERE relnamespace = pg_catalog.pg_my_temp_schema()) \
         UNION ALL SELECT 'tempfn', NULL, NULL, NULL WHERE pg_catalog.pg_my_temp_schema() <> 0 \
           AND EXISTS (SELECT 1 FROM pg_catalog.pg_proc WHERE pronamespace = pg_catalog.pg_my_temp_schema()) \
         UNION ALL SELECT 'cursor', {cursor}, NULL, NULL FROM pg_catalog.pg_cursors WHERE is_holdable \
         UNION ALL SELECT 'lock', NULL, NULL, NULL WHERE EXISTS (SELECT 1 FROM pg_catalog.pg_locks \
           WHERE locktype = 'advisory' AND pid = pg_catalog.pg_backend_pid()) \
         UNION ALL SELECT 'set', {name}, {setting}, NULL FROM pg_catalog.pg_settings \
           WHERE source = 'session' \
         UNION ALL SELECT 'ident', {sa}, {sa_value}, NULL \
         UNION ALL SELECT 'ident', {role}, {role_value}, NULL \
         UNION ALL SELECT 'listen', {channel}, NULL, NULL FROM pg_catalog.pg_listening_channels() AS c \
         UNION ALL SELECT CASE WHEN from_sql THEN 'sql' ELSE 'parse' END, {name}, {statement}, \
           extract(epoch FROM prepare_time)::text FROM pg_catalog.pg_prepared_statements \
         UNION ALL SELECT 'type', {pname}, {ptype}, u.i::text \
           FROM pg_catalog.pg_prepared_statements p, \
           unnest(p.parameter_types) WITH ORDINALITY AS u(t, i) WHERE NOT p.from_sql",
        cursor = hex("name"),
        sa = hex("'session_authorization'"),
        sa_value = hex("pg_catalog.current_setting('session_authorization')"),
        role = hex("'role'"),
        role_value = hex("pg_catalog.current_setting('role')"),
        name = hex("name"),
        setting = hex("setting"),
        channel = hex("c"),
        statement = hex("statement"),
        pname = hex("p.name"),
        ptype = hex("u.t::text"),
    )
}

/// Decodes a [`hex`] column.
fn unhex(s: &str) -> Option<String> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect();
    String::from_utf8(bytes?).ok()
}

/// A protocol-level prepared statement: replayed with Parse.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Prepared {
    pub name: String,
    pub query: String,
    /// Parameter type names as the old server prints them (`regtype`).
    pub types: Vec<String>,
}

/// What a session carries from one backend to the next.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct SessionState {
    /// (name, value), in replay order.
    pub settings: Vec<(String, String)>,
    /// SQL `PREPARE` texts to replay, oldest first, each once: for each name
    /// its own statement cut out of the query string it came in (see
    /// [`crate::proxy::sqltext::prepare_replay`]), or that whole string if it
    /// cannot be found there.
    pub sql_texts: Vec<String>,
    /// Names of the statements SQL `PREPARE` created.
    pub sql_names: Vec<String>,
    pub prepared: Vec<Prepared>,
    pub channels: Vec<String>,
    /// Set in the session; replayed last, after every text the proxy sends.
    pub client_encoding: Option<String>,
    /// The unnamed statement; parsed after `client_encoding` is back, as
    /// its text is in the session's encoding.
    pub unnamed: Option<UnnamedStatement>,
}

/// The unnamed prepared statement, as the client parsed it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct UnnamedStatement {
    /// The text as the client sent it (in the session's client_encoding).
    pub query: Bytes,
    /// Parameter type names as the old server resolved them (`regtype`).
    pub types: Vec<String>,
}

impl SessionState {
    pub(crate) fn is_empty(&self) -> bool {
        *self == SessionState::default()
    }
}

/// A backend connection the proxy talks to itself, collecting what it must
/// not swallow.
pub(crate) struct Link<'a> {
    stream: &'a mut PgStream,
    reader: &'a mut FrameReader,
    /// NotificationResponse frames, to pass on to the client.
    pub notifications: BytesMut,
    /// ParameterStatus values the server reported meanwhile.
    pub reported: Vec<(String, String)>,
}

/// The replies up to one ReadyForQuery.
struct Reply {
    rows: Vec<TextRow>,
    error: Option<ErrorFields>,
    /// A ParameterDescription's type OIDs.
    param_types: Option<Vec<u32>>,
}

impl<'a> Link<'a> {
    pub(crate) fn new(stream: &'a mut PgStream, reader: &'a mut FrameReader) -> Link<'a> {
        Link {
            stream,
            reader,
            notifications: BytesMut::new(),
            reported: Vec::new(),
        }
    }

    async fn send(&mut self, out: &[u8]) -> Result<(), WireError> {
        self.stream.write_all(out).await?;
        self.stream.flush().await?;
        Ok(())
    }

    async fn reply(&mut self) -> Result<Reply, WireError> {
        let mut rows = Vec::new();
        let mut error = None;
        let mut param_types = None;
        loop {
            let f = self.reader.read_required(self.stream).await?;
            match f.tag() {
                b'D' => rows.push(parse_data_row(f.body())?),
                b'E' if error.is_none() => error = Some(ErrorFields::parse(&f.bytes)?),
                b'A' => self.notifications.extend_from_slice(&f.bytes),
                b'S' => {
                    let (k, v) = messages::parse_parameter_status(f.body())?;
                    match self.reported.iter_mut().find(|(n, _)| *n == k) {
                        Some(p) => p.1 = v,
                        None => self.reported.push((k, v)),
                    }
                }
                // A replayed text that starts COPY FROM STDIN gets no data.
                b'G' => {
                    let mut body = BytesMut::new();
                    messages::put_cstr(&mut body, "pgshift does not replay COPY");
                    self.send(&messages::message(b'f', &body)).await?;
                }
                b't' => param_types = Some(parse_parameter_description(f.body())?),
                b'Z' => {
                    return Ok(Reply {
                        rows,
                        error,
                        param_types,
                    });
                }
                _ => {}
            }
        }
    }
}

/// A string literal read the same whatever `standard_conforming_strings` is.
fn quote_literal(s: &str) -> String {
    format!("E'{}'", s.replace('\\', "\\\\").replace('\'', "''"))
}

fn query(sql: &str) -> Result<BytesMut, WireError> {
    let mut out = BytesMut::new();
    frontend::query(sql, &mut out)?;
    Ok(out)
}

/// Reads the session's state from its (idle) backend; `user` is the one the
/// session logged in as (new backends log in as it too), `unnamed` the text
/// of the unnamed statement it may hold.
pub(crate) async fn capture(
    link: &mut Link<'_>,
    user: &str,
    unnamed: Option<&Bytes>,
) -> Result<SessionState, MoveError> {
    let old = |e: WireError| MoveError::OldBackend(e);
    // Asked before the capture query, which (a simple Query) drops it.
    let mut out = BytesMut::new();
    if unnamed.is_some() {
        out.extend_from_slice(&describe_unnamed());
    }
    out.extend_from_slice(&query(&capture_sql()).map_err(old)?);
    link.send(&out).await.map_err(old)?;
    // No unnamed statement: an error (it does not exist) or no description.
    let types = match unnamed {
        Some(_) => link.reply().await.map_err(old)?.param_types,
        None => None,
    };
    let reply = link.reply().await.map_err(old)?;
    if let Some(e) = reply.error {
        return Err(MoveError::OldBackend(WireError::Server(e)));
    }
    let mut st = from_rows(reply.rows, user)?;
    if let (Some(text), Some(oids)) = (unnamed, types) {
        st.unnamed = Some(keep_unnamed(link, text, &oids).await?);
    }
    Ok(st)
}

/// Describe of the unnamed statement, and Sync.
fn describe_unnamed() -> BytesMut {
    let mut out = BytesMut::new();
    out.extend_from_slice(&messages::message(b'D', b"S\0"));
    frontend::sync(&mut out);
    out
}

/// Parse of the unnamed statement from raw text, and Sync.
fn parse_unnamed(query: &[u8], types: &[u32]) -> BytesMut {
    let mut body = BytesMut::with_capacity(query.len() + 4 + 4 * types.len());
    body.put_u8(0);
    body.extend_from_slice(query);
    body.put_u8(0);
    // A ParameterDescription holds at most i16::MAX types.
    body.put_i16(types.len() as i16);
    for t in types {
        body.put_u32(*t);
    }
    let mut out = BytesMut::from(&messages::message(b'P', &body)[..]);
    frontend::sync(&mut out);
    out
}

fn parse_parameter_description(body: &[u8]) -> Result<Vec<u32>, WireError> {
    let bad = || WireError::Protocol("invalid ParameterDescription".into());
    let (n, rest) = body.split_at_checked(2).ok_or_else(bad)?;
    let n = i16::from_be_bytes([n[0], n[1]]);
    let n = usize::try_from(n).map_err(|_| bad())?;
    if rest.len() != 4 * n {
        return Err(bad());
    }
    Ok(rest
        .chunks_exact(4)
        .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

/// Reads the names of the unnamed statement's parameter types and parses it
/// again on the old backend (the capture query dropped it there, and the
/// session may stay: staging reads the state ahead of the switch). Same
/// text, same types: the same statement.
async fn keep_unnamed(
    link: &mut Link<'_>,
    text: &Bytes,
    oids: &[u32],
) -> Result<UnnamedStatement, MoveError> {
    let old = |e: WireError| MoveError::OldBackend(e);
    let mut out = BytesMut::new();
    if !oids.is_empty() {
        let list: Vec<String> = oids.iter().map(u32::to_string).collect();
        let sql = format!(
            "SELECT {} FROM unnest('{{{}}}'::pg_catalog.oid[]) WITH ORDINALITY AS u(t, i) ORDER BY i",
            hex("u.t::pg_catalog.regtype::text"),
            list.join(",")
        );
        out.extend_from_slice(&query(&sql).map_err(old)?);
    }
    out.extend_from_slice(&parse_unnamed(text, oids));
    link.send(&out).await.map_err(old)?;
    let mut types = Vec::new();
    if !oids.is_empty() {
        let r = link.reply().await.map_err(old)?;
        if let Some(e) = r.error {
            return Err(old(WireError::Server(e)));
        }
        for row in r.rows {
            let name = row.into_iter().next().flatten().and_then(|h| unhex(&h));
            types.push(name.ok_or_else(|| {
                MoveError::OldBackend(WireError::Protocol(
                    "unreadable parameter type of the unnamed statement".into(),
                ))
            })?);
        }
    }
    if let Some(e) = link.reply().await.map_err(old)?.error {
        return Err(old(WireError::Server(e)));
    }
    if types.len() != oids.len() {
        return Err(old(WireError::Protocol(
            "parameter types of the unnamed statement went missing".into(),
        )));
    }
    Ok(UnnamedStatement {
        query: text.clone(),
        types,
    })
}

/// Settings never replayed: they belong to a transaction.
fn skipped_setting(name: &str) -> bool {
    name.starts_with("transaction_")
}

/// `SET SESSION AUTHORIZATION` and `SET ROLE` (pg_settings does not show
/// them): replayed last, in this order, as they change who runs the rest;
/// only when they differ from a fresh login as `user`.
fn identity(name: &str, value: &str, user: &str) -> Option<usize> {
    match name {
        "session_authorization" if value != user => Some(0),
        "role" if value != "none" => Some(1),
        _ => None,
    }
}

fn from_rows(rows: Vec<TextRow>, user: &str) -> Result<SessionState, MoveError> {
    let mut st = SessionState::default();
    let mut unmovable = Unmovable::default();
    let mut sql: Vec<(f64, String, String)> = Vec::new();
    let mut types: Vec<(String, usize, String)> = Vec::new();
    let mut idents = Vec::new();
    for row in rows {
        let raw = |i: usize| row.get(i).cloned().flatten().unwrap_or_default();
        let decoded = [1, 2].map(|i| unhex(&raw(i)));
        let [Some(name), Some(value)] = decoded else {
            return Err(MoveError::OldBackend(WireError::Protocol(
                "undecodable session state row".into(),
            )));
        };
        let col = |i: usize| match i {
            1 => name.clone(),
            2 => value.clone(),
            _ => raw(i),
        };
        match raw(0).as_str() {
            "temp" => unmovable.temp_tables = true,
            "tempfn" => unmovable.temp_functions = true,
            "lock" => unmovable.advisory_locks = true,
            "cursor" => unmovable.cursors.push(col(1)),
            "set" if skipped_setting(&col(1)) => {}
            "set" if col(1) == "client_encoding" => st.client_encoding = Some(col(2)),
            "ident" => {
                if let Some(order) = identity(&col(1), &col(2), user) {
                    idents.push((order, col(1), col(2)));
                }
            }
            "set" => st.settings.push((col(1), col(2))),
            "listen" => st.channels.push(col(1)),
            "sql" => sql.push((col(3).parse().unwrap_or(0.0), col(1), col(2))),
            "parse" => st.prepared.push(Prepared {
                name: col(1),
                query: col(2),
                types: Vec::new(),
            }),
            "type" => types.push((col(1), col(3).parse().unwrap_or(0), col(2))),
            other => {
                return Err(MoveError::OldBackend(WireError::Protocol(format!(
                    "unexpected session state row {other:?}"
                ))));
            }
        }
    }
    if !unmovable.is_empty() {
        return Err(MoveError::Unmovable(unmovable));
    }
    idents.sort();
    st.settings
        .extend(idents.into_iter().map(|(_, name, value)| (name, value)));
    types.sort_by_key(|(_, i, _)| *i);
    for (name, _, t) in types {
        if let Some(p) = st.prepared.iter_mut().find(|p| p.name == name) {
            p.types.push(t);
        }
    }
    sql.sort_by(|a, b| a.0.total_cmp(&b.0));
    for (_, name, text) in sql {
        // The query string may hold other statements (`DEALLOCATE a;
        // PREPARE b …`): only this name's PREPARE (after the settings
        // before it) is replayed, or the whole string, once, when it
        // cannot be found there.
        let stmt = crate::proxy::sqltext::prepare_replay(&text, &name).unwrap_or(text);
        if !st.sql_texts.contains(&stmt) {
            st.sql_texts.push(stmt);
        }
        st.sql_names.push(name);
    }
    Ok(st)
}

/// What replaying left for the client.
#[derive(Default)]
pub(crate) struct Replayed {
    pub notifications: BytesMut,
    /// ParameterStatus values the new server reported while replaying.
    pub reported: Vec<(String, String)>,
}

impl Replayed {
    /// `later` happened after `self` on the same backend: its notifications
    /// follow, its reported values win.
    pub(crate) fn merge(&mut self, later: Replayed) {
        self.notifications.extend_from_slice(&later.notifications);
        for (k, v) in later.reported {
            match self.reported.iter_mut().find(|(n, _)| *n == k) {
                Some(p) => p.1 = v,
                None => self.reported.push((k, v)),
            }
        }
    }
}

/// Returns a backend to a fresh session's state (`DISCARD ALL`), so a
/// state can be replayed there again.
pub(crate) async fn reset(link: &mut Link<'_>) -> Result<(), MoveError> {
    link.send(&query("DISCARD ALL").map_err(wire)?)
        .await
        .map_err(wire)?;
    match link.reply().await.map_err(wire)?.error {
        Some(e) => Err(server_error("DISCARD ALL", e)),
        None => Ok(()),
    }
}

/// Replays `st` on a fresh backend. Server errors become
/// [`MoveError::Replay`]; a broken connection is [`MoveError::NewBackend`]
/// (the caller may retry on another connection).
/// `client_encoding` is the new backend's, as it reported at startup: the
/// proxy's own texts go in UTF-8, the session's encoding is put back last.
pub(crate) async fn restore(
    link: &mut Link<'_>,
    st: &SessionState,
    client_encoding: Option<&str>,
) -> Result<Replayed, MoveError> {
    if !st.is_empty() {
        let utf8 = client_encoding.is_some_and(|e| e.eq_ignore_ascii_case("UTF8"));
        let oids = settings_and_types(link, st, !utf8).await?;
        let last = match &st.client_encoding {
            Some(v) => Some(set_config_sql(&[("client_encoding".into(), v.clone())])),
            None if !utf8 => Some("RESET client_encoding".into()),
            None => None,
        };
        statements_and_channels(link, st, &oids, last).await?;
        if let Some(u) = &st.unnamed {
            // Last: a simple Query would drop it.
            link.send(&parse_unnamed(&u.query, &type_oids(&u.types, &oids)))
                .await
                .map_err(wire)?;
            if let Some(e) = link.reply().await.map_err(wire)?.error {
                return Err(server_error("preparing the unnamed statement", e));
            }
        }
    }
    Ok(Replayed {
        notifications: std::mem::take(&mut link.notifications),
        reported: std::mem::take(&mut link.reported),
    })
}

fn wire(e: WireError) -> MoveError {
    match e {
        WireError::Server(error) => MoveError::Replay(ReplayError::Server {
            step: "replaying",
            error,
        }),
        other => MoveError::NewBackend(other),
    }
}

fn server_error(step: &'static str, error: ErrorFields) -> MoveError {
    MoveError::Replay(ReplayError::Server { step, error })
}

/// Distinct parameter type names of the protocol-level statements.
fn type_names(st: &SessionState) -> Vec<&str> {
    let mut seen = HashSet::new();
    st.prepared
        .iter()
        .flat_map(|p| p.types.iter())
        .chain(st.unnamed.iter().flat_map(|u| u.types.iter()))
        .map(String::as_str)
        .filter(|t| *t != "-" && seen.insert(*t))
        .collect()
}

/// Round trip 1: UTF-8 for what follows (if needed), the settings, then the
/// OIDs of the parameter types on this server (resolved by name, under the
/// replayed search_path).
async fn settings_and_types(
    link: &mut Link<'_>,
    st: &SessionState,
    to_utf8: bool,
) -> Result<Vec<(String, u32)>, MoveError> {
    let names = type_names(st);
    let mut out = BytesMut::new();
    if to_utf8 {
        out.extend_from_slice(&query("SET client_encoding = 'UTF8'").map_err(wire)?);
    }
    if !st.settings.is_empty() {
        out.extend_from_slice(&query(&set_config_sql(&st.settings)).map_err(wire)?);
    }
    if !names.is_empty() {
        let list: Vec<String> = names.iter().map(|n| quote_literal(n)).collect();
        let sql = format!(
            "SELECT pg_catalog.to_regtype(n)::oid FROM unnest(ARRAY[{}]::text[]) \
             WITH ORDINALITY AS u(n, i) ORDER BY i",
            list.join(", ")
        );
        out.extend_from_slice(&query(&sql).map_err(wire)?);
    }
    if out.is_empty() {
        return Ok(Vec::new());
    }
    link.send(&out).await.map_err(wire)?;
    if to_utf8 && let Some(e) = link.reply().await.map_err(wire)?.error {
        return Err(server_error("setting client_encoding", e));
    }
    if !st.settings.is_empty() {
        let r = link.reply().await.map_err(wire)?;
        if let Some(e) = r.error {
            return Err(server_error("restoring session settings", e));
        }
    }
    if names.is_empty() {
        return Ok(Vec::new());
    }
    let r = link.reply().await.map_err(wire)?;
    if let Some(e) = r.error {
        return Err(server_error("resolving parameter types", e));
    }
    let mut oids = Vec::new();
    for (name, row) in names.iter().zip(r.rows) {
        let oid = row
            .first()
            .cloned()
            .flatten()
            .and_then(|o| o.parse::<u32>().ok())
            .ok_or_else(|| MoveError::Replay(ReplayError::MissingType(name.to_string())))?;
        oids.push((name.to_string(), oid));
    }
    Ok(oids)
}

/// Type names as OIDs on the new server (0, unspecified, for `-`).
fn type_oids(names: &[String], oids: &[(String, u32)]) -> Vec<u32> {
    names
        .iter()
        .map(|t| oids.iter().find(|(n, _)| n == t).map_or(0, |(_, o)| *o))
        .collect()
}

fn set_config_sql(settings: &[(String, String)]) -> String {
    let calls: Vec<String> = settings
        .iter()
        .map(|(k, v)| {
            format!(
                "pg_catalog.set_config({}, {}, false)",
                quote_literal(k),
                quote_literal(v)
            )
        })
        .collect();
    format!("SELECT {}", calls.join(", "))
}

/// The replies expected in round trip 2, in order.
enum Expect {
    Parse,
    Guard,
    SqlText,
    Verify,
    Listen,
    Encoding,
}

/// Round trip 2: Parse for protocol-level statements; the SQL PREPARE texts
/// (read-only and rolled back, so a text holding more than a PREPARE changes
/// nothing but the prepared statements); the
/// LISTENs; when SQL texts ran, which statements now exist; and `last`
/// (the session's client_encoding).
async fn statements_and_channels(
    link: &mut Link<'_>,
    st: &SessionState,
    oids: &[(String, u32)],
    last: Option<String>,
) -> Result<(), MoveError> {
    let mut out = BytesMut::new();
    let mut expect = Vec::new();
    if !st.prepared.is_empty() {
        for p in &st.prepared {
            let types = type_oids(&p.types, oids);
            frontend::parse(&p.name, &p.query, types, &mut out)
                .map_err(|e| MoveError::NewBackend(e.into()))?;
        }
        frontend::sync(&mut out);
        expect.push(Expect::Parse);
    }
    if !st.sql_texts.is_empty() {
        out.extend_from_slice(
            &query("SELECT pg_catalog.set_config('default_transaction_read_only', 'on', false)")
                .map_err(wire)?,
        );
        expect.push(Expect::Guard);
        // Each text runs in a savepoint that is rolled back: the statements
        // it prepared stay (PREPARE is not transactional), anything else it
        // did (a SET the session has changed since, …) is undone.
        let mut texts = vec!["BEGIN READ ONLY"];
        for t in &st.sql_texts {
            texts.extend([
                "SAVEPOINT pgshift_replay",
                t,
                "ROLLBACK TO SAVEPOINT pgshift_replay",
            ]);
        }
        texts.push("ROLLBACK");
        for t in texts {
            out.extend_from_slice(&query(t).map_err(wire)?);
            // Judged by which statements exist afterwards, not by errors.
            expect.push(Expect::SqlText);
        }
        let restore = match st
            .settings
            .iter()
            .find(|(k, _)| k == "default_transaction_read_only")
        {
            Some((_, v)) => set_config_sql(&[("default_transaction_read_only".into(), v.clone())]),
            None => "RESET default_transaction_read_only".into(),
        };
        out.extend_from_slice(&query(&restore).map_err(wire)?);
        expect.push(Expect::Guard);
        out.extend_from_slice(
            &query("SELECT name FROM pg_catalog.pg_prepared_statements").map_err(wire)?,
        );
        expect.push(Expect::Verify);
    }
    if !st.channels.is_empty() {
        let listens: Vec<String> = st
            .channels
            .iter()
            .map(|c| format!("LISTEN {}", quote_ident(c)))
            .collect();
        out.extend_from_slice(&query(&listens.join("; ")).map_err(wire)?);
        expect.push(Expect::Listen);
    }
    if let Some(sql) = last {
        out.extend_from_slice(&query(&sql).map_err(wire)?);
        expect.push(Expect::Encoding);
    }
    if expect.is_empty() {
        return Ok(());
    }
    link.send(&out).await.map_err(wire)?;
    // Every reply is read (the connection stays in step) before judging.
    let mut first_error = None;
    let mut sql_errors = Vec::new();
    let mut present = None;
    for e in expect {
        let r = link.reply().await.map_err(wire)?;
        match (e, r.error) {
            (Expect::SqlText, Some(err)) => sql_errors.push(err),
            (Expect::Verify, None) => {
                present = Some(
                    r.rows
                        .into_iter()
                        .filter_map(|row| row.into_iter().next().flatten())
                        .collect::<Vec<_>>(),
                )
            }
            (Expect::Parse, Some(err)) => {
                first_error.get_or_insert(server_error("preparing statements", err));
            }
            (Expect::Listen, Some(err)) => {
                first_error.get_or_insert(server_error("LISTEN", err));
            }
            (Expect::Encoding, Some(err)) => {
                first_error.get_or_insert(server_error("restoring client_encoding", err));
            }
            (_, Some(err)) => {
                first_error.get_or_insert(server_error("replaying PREPARE", err));
            }
            (_, None) => {}
        }
    }
    if let Some(e) = first_error {
        return Err(e);
    }
    if let Some(present) = present {
        check_sql_statements(link, st, &present, sql_errors).await?;
    }
    Ok(())
}

/// Every statement SQL PREPARE had made must exist again; ones a multi-
/// statement text re-created that the session had deallocated are dropped.
async fn check_sql_statements(
    link: &mut Link<'_>,
    st: &SessionState,
    present: &[String],
    errors: Vec<ErrorFields>,
) -> Result<(), MoveError> {
    if let Some(missing) = st.sql_names.iter().find(|n| !present.contains(n)) {
        return Err(MoveError::Replay(ReplayError::NotRecreated {
            name: missing.clone(),
            error: errors.into_iter().next(),
        }));
    }
    let extra: Vec<String> = present
        .iter()
        .filter(|n| !st.sql_names.contains(n) && !st.prepared.iter().any(|p| &p.name == *n))
        .map(|n| format!("DEALLOCATE {}", quote_ident(n)))
        .collect();
    if extra.is_empty() {
        return Ok(());
    }
    link.send(&query(&extra.join("; ")).map_err(wire)?)
        .await
        .map_err(wire)?;
    match link.reply().await.map_err(wire)?.error {
        Some(e) => Err(server_error("DEALLOCATE", e)),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn login_rows(rows: Vec<TextRow>) -> Result<SessionState, MoveError> {
        from_rows(rows, "login")
    }

    /// A capture row: name and value hex-encoded as the query sends them.
    fn row(v: &[Option<&str>]) -> TextRow {
        v.iter()
            .enumerate()
            .map(|(i, x)| match (i, x) {
                (1 | 2, Some(t)) => Some(t.bytes().map(|b| format!("{b:02x}")).collect()),
                _ => x.map(String::from),
            })
            .collect()
    }

    #[test]
    fn rows_become_state_in_replay_order() {
        let st = login_rows(vec![
            row(&[Some("ident"), Some("role"), Some("app"), None]),
            row(&[Some("set"), Some("search_path"), Some("s2, public"), None]),
            row(&[Some("set"), Some("transaction_isolation"), Some("x"), None]),
            row(&[Some("set"), Some("client_encoding"), Some("LATIN1"), None]),
            row(&[Some("listen"), Some("grüße"), None, None]),
            row(&[
                Some("ident"),
                Some("session_authorization"),
                Some("u"),
                None,
            ]),
            row(&[Some("listen"), Some("ch"), None, None]),
            row(&[
                Some("sql"),
                Some("b"),
                Some("PREPARE a AS SELECT 1; PREPARE b AS SELECT 2"),
                Some("2.5"),
            ]),
            row(&[
                Some("sql"),
                Some("a"),
                Some("PREPARE a AS SELECT 1; PREPARE b AS SELECT 2"),
                Some("2.5"),
            ]),
            row(&[
                Some("sql"),
                Some("z"),
                Some("PREPARE z AS SELECT 0"),
                Some("1.0"),
            ]),
            row(&[Some("parse"), Some("s1"), Some("SELECT $1, $2"), Some("3")]),
            row(&[Some("type"), Some("s1"), Some("mood"), Some("2")]),
            row(&[Some("type"), Some("s1"), Some("integer"), Some("1")]),
        ])
        .unwrap();
        assert_eq!(
            st.settings,
            vec![
                ("search_path".to_string(), "s2, public".to_string()),
                ("session_authorization".to_string(), "u".to_string()),
                ("role".to_string(), "app".to_string()),
            ]
        );
        assert_eq!(st.channels, vec!["grüße", "ch"]);
        assert_eq!(st.client_encoding.as_deref(), Some("LATIN1"));
        assert_eq!(
            st.sql_texts,
            vec![
                "PREPARE z AS SELECT 0",
                "PREPARE b AS SELECT 2",
                "PREPARE a AS SELECT 1"
            ]
        );
        assert_eq!(st.sql_names.len(), 3);
        assert_eq!(st.prepared[0].types, vec!["integer", "mood"]);
        assert_eq!(type_names(&st), vec!["integer", "mood"]);
    }

    #[test]
    fn identity_replayed_only_when_changed() {
        let st = login_rows(vec![
            row(&[
                Some("ident"),
                Some("session_authorization"),
                Some("login"),
                None,
            ]),
            row(&[Some("ident"), Some("role"), Some("none"), None]),
        ])
        .unwrap();
        assert!(st.is_empty());
    }

    #[test]
    fn unmovable_state_is_named() {
        let e = login_rows(vec![
            row(&[Some("temp"), None, None, None]),
            row(&[Some("cursor"), Some("c1"), None, None]),
            row(&[Some("lock"), None, None, None]),
        ])
        .unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("temporary tables"), "{msg}");
        assert!(msg.contains("WITH HOLD cursors (c1)"), "{msg}");
        assert!(msg.contains("advisory locks"), "{msg}");
    }

    #[test]
    fn bad_hex_is_an_error_not_a_panic() {
        assert_eq!(unhex("c3bc").as_deref(), Some("ü"));
        for bad in ["c", "zz", "ff", "c3"] {
            assert_eq!(unhex(bad), None, "{bad}");
        }
        let e = login_rows(vec![vec![
            Some("set".into()),
            Some("zz".into()),
            None,
            None,
        ]]);
        assert!(e.is_err());
    }

    #[test]
    fn settings_use_set_config_with_literals() {
        let sql = set_config_sql(&[("search_path".into(), r#""$user", it's \x"#.into())]);
        assert_eq!(
            sql,
            r#"SELECT pg_catalog.set_config(E'search_path', E'"$user", it''s \\x', false)"#
        );
    }
}
