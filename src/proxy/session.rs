//! One client session: open its backend, greet the client, then relay bytes
//! both ways until either side ends.
//!
//! The relay forwards the original bytes. Per read it scans frame headers
//! ([`Scanner`]) and hands the whole scanned chunk to the other side; it reads only
//! ReadyForQuery and ParameterStatus from the server, the tags of client
//! messages and the bodies of the client's Parse messages (see
//! [`super::moving::unnamed`]). Between requests (after ReadyForQuery 'I'
//! with nothing pending) the session is at a transaction boundary: only
//! there it passes the pause gate and moves to a new route
//! ([`super::moving`]). Idle sessions move as soon as the route is swapped,
//! even with the gate closed.
//!
//! The two directions progress independently: while a chunk waits for the
//! server to take it, the server's messages still flow to the client, and
//! the other way round (a client streaming COPY data while the server sends
//! a NOTICE per row would otherwise wait on a server that waits on the
//! relay). Each direction holds one chunk at a time, so memory stays
//! bounded: a side that does not read stops only its own direction. At
//! transaction boundaries, before the relay acts on its own (gate, move,
//! shutdown), both chunks are written out.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::io::poll_read_buf;

use super::Shared;
use super::backend;
use super::listener::{Authed, reject};
use super::moving::prewarm;
use super::moving::unnamed::Unnamed;
use super::route::Route;
use super::scan::{ScanError, Scanner};
use super::sessions::{BackendRef, NewSession, SessionInfo};
use crate::wire::messages::{self, TxStatus};
use crate::wire::{PgStream, ServerConnection, WireError};

/// Read buffers start at this size and return to it when the session is
/// idle: an idle session holds two small buffers, not the largest burst it
/// ever read (10,000 idle sessions cost 10,000 × both buffers).
const IDLE_READ: usize = 2 * 1024;
/// A read that fills its buffer grows the next one fourfold, up to these.
const CLIENT_READ_MAX: usize = 16 * 1024;
const SERVER_READ_MAX: usize = 64 * 1024;

/// Runs a session to its end.
pub(crate) async fn run(shared: Arc<Shared>, a: Authed) {
    let Authed {
        mut stream,
        leftover,
        params,
        user,
        database,
        peer,
        slot: _slot,
    } = a;
    // New connections are held by a closed gate too, so they start on the
    // route current when it opens.
    if !wait_gate(&shared).await || shared.is_draining() {
        reject(&mut stream, "57P03", "the database system is shutting down").await;
        return;
    }
    let route = shared.router.current();
    let conn = match backend::open(&shared, &route, &params, &user).await {
        Ok(c) => c,
        Err(e) => {
            shared.metrics.error("backend_connect");
            report_connect_error(&mut stream, &route, e).await;
            return;
        }
    };
    let application_name = params
        .iter()
        .find(|(k, _)| k == "application_name")
        .map(|(_, v)| v.clone())
        .unwrap_or_default();
    let (pid, secret) = conn.key.unwrap_or((0, 0));
    let info = shared.sessions.register(NewSession {
        user: user.clone(),
        database,
        application_name,
        peer: Some(peer),
        startup: params.clone(),
        status: conn.status,
        backend: BackendRef {
            route: route.clone(),
            pid,
            secret,
        },
    });
    let _registered = Registered(&shared, info.clone());
    prewarm::on_new_session(&shared, &info);
    if greet(&mut stream, &conn, &info).await.is_err() {
        conn.terminate().await;
        return;
    }
    let max = shared.limits.max_message_size;
    let cbuf = leftover;
    let ServerConnection {
        stream: server,
        reader,
        params: server_params,
        status,
        ..
    } = conn;
    let mut s = Session {
        shared: shared.clone(),
        info,
        user,
        startup: params,
        client: stream,
        server,
        route,
        cbuf,
        sbuf: reader.buf,
        c_out: Outgoing::default(),
        s_out: Outgoing::default(),
        c_read: ReadSize::new(CLIENT_READ_MAX),
        s_read: ReadSize::new(SERVER_READ_MAX),
        cscan: Scanner::new(max),
        sscan: Scanner::new(max),
        st: State::new(status, server_params),
        entered: false,
        requests: 0,
    };
    // The startup's buffers were sized for authentication.
    s.shrink_idle();
    let end = s.relay().await;
    s.finish(end).await;
}

/// Removes the session from the registry when it ends, however it ends,
/// and closes a backend still parked for it.
struct Registered<'a>(&'a Shared, Arc<SessionInfo>);

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        self.0.sessions.remove(self.1.proxy_key.0);
        if let Some((p, _)) = self.1.moving.take_parked() {
            prewarm::discard(self.0, p);
        }
    }
}

/// Waits for the pause gate to be open; false when the proxy is shutting down.
async fn wait_gate(shared: &Shared) -> bool {
    while shared.gate.is_closed() {
        tokio::select! {
            _ = shared.gate.wait_open() => {}
            _ = shared.kill.cancelled() => return false,
        }
    }
    true
}

/// The server's own error (unknown database, …) is relayed as it is; any
/// other failure reaches the client as an incident, its detail (with the
/// server's address) only in the log.
async fn report_connect_error(client: &mut PgStream, route: &Route, e: WireError) {
    match e {
        WireError::Server(fields) => {
            let _ = client.write_all(&fields.to_frame()).await;
            let _ = client.flush().await;
        }
        other => {
            let message = super::incident::report(
                None,
                &format!("pgshift cannot connect to the {} server", route.name),
                &format_args!("{}:{}: {other}", route.host, route.port),
            );
            reject(client, other.sqlstate(), &message).await;
        }
    }
}

/// AuthenticationOk, the server's parameters, the proxy's key, ReadyForQuery.
async fn greet(
    client: &mut PgStream,
    conn: &ServerConnection,
    info: &SessionInfo,
) -> std::io::Result<()> {
    let mut out = BytesMut::with_capacity(512);
    out.extend_from_slice(&messages::auth_ok());
    for (k, v) in &conn.params {
        out.extend_from_slice(&messages::parameter_status(k, v));
    }
    out.extend_from_slice(&messages::backend_key_data(
        info.proxy_key.0,
        info.proxy_key.1,
    ));
    out.extend_from_slice(&messages::ready_for_query(conn.status));
    client.write_all(&out).await?;
    client.flush().await
}

/// Why the relay ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum End {
    /// The client closed its connection (with or without Terminate).
    ClientGone,
    /// The client sent Terminate and the server closed.
    Terminated,
    /// The proxy ended the session after telling the client why.
    Closed,
}

/// What the relay learns from the messages it sees.
pub(super) struct State {
    pub(super) status: TxStatus,
    /// Query / Sync / FunctionCall messages sent whose ReadyForQuery is outstanding.
    pending: u32,
    /// Extended-protocol messages sent since the last Sync.
    unsynced: bool,
    terminated: bool,
    saw_ready: bool,
    /// Server parameters as the client knows them.
    pub(super) params: Vec<(String, String)>,
    /// The client's unnamed prepared statement, which a move carries.
    pub(super) unnamed: Unnamed,
    queries: u64,
    transactions: u64,
    bytes_c2s: u64,
    bytes_s2c: u64,
}

impl State {
    fn new(status: TxStatus, params: Vec<(String, String)>) -> State {
        State {
            status,
            pending: 0,
            unsynced: false,
            terminated: false,
            saw_ready: false,
            params,
            unnamed: Unnamed::default(),
            queries: 0,
            transactions: 0,
            bytes_c2s: 0,
            bytes_s2c: 0,
        }
    }

    fn on_client(&mut self, tag: u8, body: &[u8]) {
        self.unnamed.on_client(tag, body);
        match tag {
            b'Q' => {
                self.pending += 1;
                self.queries += 1;
            }
            b'S' => {
                self.pending += 1;
                self.unsynced = false;
            }
            b'F' => self.pending += 1,
            b'E' => {
                self.queries += 1;
                self.unsynced = true;
            }
            b'P' | b'B' | b'D' | b'C' | b'H' => self.unsynced = true,
            b'X' => self.terminated = true,
            _ => {}
        }
    }

    fn on_server(&mut self, tag: u8, body: &[u8]) {
        self.unnamed.on_server(tag);
        match tag {
            b'Z' => {
                if let Some(s) = body.first().and_then(|b| TxStatus::from_byte(*b)) {
                    self.status = s;
                }
                self.pending = self.pending.saturating_sub(1);
                self.saw_ready = true;
                if self.status == TxStatus::Idle {
                    self.transactions += 1;
                }
            }
            b'S' => {
                if let Ok((k, v)) = messages::parse_parameter_status(body) {
                    set_param(&mut self.params, k, v);
                }
            }
            _ => {}
        }
    }

    /// At a transaction boundary: nothing outstanding, no transaction open.
    fn at_boundary(&self) -> bool {
        self.pending == 0 && !self.unsynced && self.status == TxStatus::Idle
    }
}

pub(super) fn set_param(params: &mut Vec<(String, String)>, k: String, v: String) {
    match params.iter_mut().find(|(n, _)| *n == k) {
        Some(p) => p.1 = v,
        None => params.push((k, v)),
    }
}

/// The messages whose bodies the relay reads from the client: Parse, for
/// the unnamed statement.
fn client_reads(tag: u8) -> bool {
    tag == b'P'
}

/// The messages whose bodies the relay reads from the server.
fn server_reads(tag: u8) -> bool {
    tag == b'Z' || tag == b'S'
}

/// The relay's side of a session; the move ([`super::moving`]) works on
/// the same fields at transaction boundaries.
pub(super) struct Session {
    pub(super) shared: Arc<Shared>,
    pub(super) info: Arc<SessionInfo>,
    pub(super) user: String,
    pub(super) startup: Vec<(String, String)>,
    pub(super) client: PgStream,
    pub(super) server: PgStream,
    pub(super) route: Arc<Route>,
    cbuf: BytesMut,
    pub(super) sbuf: BytesMut,
    /// The scanned head of `cbuf` not yet written to the server.
    c_out: Outgoing,
    /// The scanned head of `sbuf` not yet written to the client. The move
    /// works on `sbuf` only when this is empty ([`Session::flush_out`]).
    s_out: Outgoing,
    c_read: ReadSize,
    s_read: ReadSize,
    cscan: Scanner,
    pub(super) sscan: Scanner,
    pub(super) st: State,
    /// Counted by the gate as inside a transaction.
    pub(super) entered: bool,
    /// Requests the session has run; a staged move records the count its
    /// state was read at (see [`super::moving::MoveState`]).
    pub(super) requests: u64,
}

/// How much one direction reads at a time.
struct ReadSize {
    want: usize,
    max: usize,
    /// Room in the buffer when the last read was polled.
    room: usize,
}

impl ReadSize {
    fn new(max: usize) -> ReadSize {
        ReadSize {
            want: IDLE_READ,
            max,
            room: 0,
        }
    }

    /// Makes room in `buf` for the next read.
    fn reserve(&mut self, buf: &mut BytesMut) {
        if buf.capacity() - buf.len() < self.want / 4 {
            buf.reserve(self.want);
        }
        self.room = buf.capacity() - buf.len();
    }

    /// A read of `n` bytes came in: one that filled the room asks for more.
    fn read(&mut self, n: usize) {
        if n >= self.room {
            self.want = (self.want * 4).min(self.max);
        }
    }

    /// Back to the idle size: `buf` (empty) is let go if it grew.
    fn shrink(&mut self, buf: &mut BytesMut) {
        self.want = IDLE_READ;
        if buf.is_empty() && buf.capacity() > IDLE_READ {
            *buf = BytesMut::new();
        }
    }
}

/// One direction's chunk on its way out: the head of its buffer.
#[derive(Default)]
struct Outgoing {
    /// Bytes at the head of the buffer still to write.
    len: usize,
    /// Written, not yet flushed (TLS buffers inside the stream).
    unflushed: bool,
}

impl Outgoing {
    /// Nothing waits to go out: the direction may read again.
    fn idle(&self) -> bool {
        self.len == 0 && !self.unflushed
    }

    /// Writes what it can of `buf`'s head to `w` without waiting. Ready(Ok)
    /// when the chunk is out and flushed.
    fn poll_send(
        &mut self,
        w: &mut PgStream,
        buf: &mut BytesMut,
        cx: &mut Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        while self.len > 0 {
            match Pin::new(&mut *w).poll_write(cx, &buf[..self.len]) {
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
                }
                Poll::Ready(Ok(k)) => {
                    buf.advance(k);
                    self.len -= k;
                    self.unflushed = true;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        if self.unflushed {
            std::task::ready!(Pin::new(&mut *w).poll_flush(cx))?;
            self.unflushed = false;
        }
        Poll::Ready(Ok(()))
    }
}

/// What woke the relay loop.
enum Event {
    Client(std::io::Result<usize>),
    Server(std::io::Result<usize>),
    /// Writing to the client failed.
    ClientWrite,
    /// Writing to the server failed.
    ServerWrite,
    Wake,
}

impl Session {
    async fn relay(&mut self) -> End {
        let info = self.info.clone();
        // Which direction is read first; alternates so a side that always
        // has data cannot starve the other.
        let mut server_first = true;
        loop {
            if self.c_out.idle() {
                self.c_read.reserve(&mut self.cbuf);
            }
            if self.s_out.idle() {
                self.s_read.reserve(&mut self.sbuf);
            }
            server_first = !server_first;
            let event = std::future::poll_fn(|cx| {
                // First, so a session whose sockets always have data still
                // sees shutdown and termination.
                if info.wake.poll(cx).is_ready() {
                    return Poll::Ready(Event::Wake);
                }
                // Chunks on their way out, each on its own: one side not
                // reading holds up only the direction toward it.
                if let Poll::Ready(Err(_)) =
                    self.c_out.poll_send(&mut self.server, &mut self.cbuf, cx)
                {
                    return Poll::Ready(Event::ServerWrite);
                }
                if let Poll::Ready(Err(_)) =
                    self.s_out.poll_send(&mut self.client, &mut self.sbuf, cx)
                {
                    return Poll::Ready(Event::ClientWrite);
                }
                // A direction reads again once its last chunk is out.
                let (c_idle, s_idle) = (self.c_out.idle(), self.s_out.idle());
                let mut server = |cx: &mut Context<'_>| {
                    if !s_idle {
                        return Poll::Pending;
                    }
                    poll_read_buf(Pin::new(&mut self.server), cx, &mut self.sbuf).map(Event::Server)
                };
                let mut client = |cx: &mut Context<'_>| {
                    if !c_idle {
                        return Poll::Pending;
                    }
                    poll_read_buf(Pin::new(&mut self.client), cx, &mut self.cbuf).map(Event::Client)
                };
                let first = if server_first { server(cx) } else { client(cx) };
                if first.is_ready() {
                    return first;
                }
                if server_first { client(cx) } else { server(cx) }
            })
            .await;
            let end = match event {
                Event::Client(Ok(0) | Err(_)) => Some(self.client_gone().await),
                Event::Client(Ok(n)) => {
                    self.c_read.read(n);
                    self.on_client_data().await
                }
                Event::Server(Ok(0) | Err(_)) => Some(self.server_lost().await),
                Event::Server(Ok(n)) => {
                    self.s_read.read(n);
                    self.on_server_data().await
                }
                Event::ClientWrite => Some(self.client_gone().await),
                Event::ServerWrite => Some(self.server_lost().await),
                Event::Wake => self.on_wake().await,
            };
            if let Some(end) = end {
                return end;
            }
        }
    }

    /// Between transactions: read buffers back to their idle size (those
    /// holding bytes stay as they are).
    fn shrink_idle(&mut self) {
        if self.c_out.idle() {
            self.c_read.shrink(&mut self.cbuf);
        }
        if self.s_out.idle() {
            self.s_read.shrink(&mut self.sbuf);
        }
    }

    /// Writes out both directions' chunks, before the relay acts on its own
    /// (the gate, a move, closing the session) on a quiet session.
    async fn flush_out(&mut self) -> Option<End> {
        let (c, s) = (&mut self.c_out, &mut self.s_out);
        let (server, client) = (&mut self.server, &mut self.client);
        let (cbuf, sbuf) = (&mut self.cbuf, &mut self.sbuf);
        let r = std::future::poll_fn(|cx| {
            let to_server = c.poll_send(server, cbuf, cx);
            if let Poll::Ready(Err(_)) = to_server {
                return Poll::Ready(Err(Event::ServerWrite));
            }
            let to_client = s.poll_send(client, sbuf, cx);
            if let Poll::Ready(Err(_)) = to_client {
                return Poll::Ready(Err(Event::ClientWrite));
            }
            if to_server.is_ready() && to_client.is_ready() {
                Poll::Ready(Ok(()))
            } else {
                Poll::Pending
            }
        })
        .await;
        match r {
            Ok(()) => None,
            Err(Event::ServerWrite) => Some(self.server_lost().await),
            Err(_) => Some(self.client_gone().await),
        }
    }

    /// Shared state changed: shutdown, a route swap or the gate opening.
    async fn on_wake(&mut self) -> Option<End> {
        if self.shared.kill.is_cancelled() {
            return Some(self.close_for_shutdown().await);
        }
        if let Some(message) = self.info.kill_message() {
            self.fatal("57P01", &message).await;
            return Some(End::Closed);
        }
        if self.entered {
            // Busy: drain and route are looked at again at the boundary.
            return None;
        }
        if let Some(end) = self.flush_out().await {
            return Some(end);
        }
        if self.shared.is_draining() {
            return Some(self.close_for_shutdown().await);
        }
        if let Some(end) = self.move_if_rerouted().await {
            return Some(end);
        }
        self.stage_move().await
    }

    /// Forwards what the client sent; at a boundary it first passes the gate.
    async fn on_client_data(&mut self) -> Option<End> {
        if !self.entered {
            // The rest of the last response goes out first: the request may
            // wait at the gate or move to another backend.
            if let Some(end) = self.flush_out().await {
                return Some(end);
            }
            if let Some(end) = self.begin_request().await {
                return Some(end);
            }
        }
        let st = &mut self.st;
        let n = match self.cscan.scan(&self.cbuf, client_reads, |tag, body| {
            st.on_client(tag, body)
        }) {
            Ok(n) => n,
            Err(e) => return Some(self.client_protocol_error(e).await),
        };
        // Written by the relay loop, while the server's messages keep flowing.
        self.c_out.len = n;
        self.st.bytes_c2s += n as u64;
        None
    }

    /// Forwards what the server sent and notes transaction boundaries.
    async fn on_server_data(&mut self) -> Option<End> {
        let st = &mut self.st;
        st.saw_ready = false;
        let n = match self.sscan.scan(&self.sbuf, server_reads, |tag, body| {
            st.on_server(tag, body)
        }) {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(
                    session = self.info.id,
                    "server sent an invalid message: {e}"
                );
                self.shared.metrics.error("protocol");
                self.fatal("08P01", &format!("invalid message from the server: {e}"))
                    .await;
                return Some(End::Closed);
            }
        };
        // Bookkeeping before the client sees ReadyForQuery, so whoever the
        // client tells next (a test, the cutover) already sees the new state.
        let mut left = false;
        self.st.bytes_s2c += n as u64;
        if self.st.saw_ready {
            self.info.set_tx_status(self.st.status);
            self.flush_metrics();
            if self.entered && self.st.at_boundary() {
                self.leave();
                left = true;
            }
        }
        self.s_out.len = n;
        if left {
            // At the boundary the relay may act on its own: the response
            // reaches the client first.
            if let Some(end) = self.flush_out().await {
                return Some(end);
            }
            self.shrink_idle();
            if self.shared.is_draining() {
                return Some(self.close_for_shutdown().await);
            }
            if !self.shared.router.is_current(&self.route) {
                return self.move_if_rerouted().await;
            }
            return self.stage_move().await;
        }
        None
    }

    /// Passes the gate (waiting while it is closed) and, if the route
    /// changed meanwhile, moves to a backend on the new route.
    async fn begin_request(&mut self) -> Option<End> {
        loop {
            if self.shared.is_draining() {
                return Some(self.close_for_shutdown().await);
            }
            if self.shared.gate.try_enter() {
                break;
            }
            // Held: a route swap moves the session while it waits, so the
            // gate opens onto a ready backend.
            if let Some(end) = self.stage_move().await {
                return Some(end);
            }
            let info = self.info.clone();
            tokio::select! {
                _ = self.shared.gate.wait_open() => {}
                _ = std::future::poll_fn(|cx| info.wake.poll(cx)) => {
                    if self.shared.kill.is_cancelled() {
                        return Some(self.close_for_shutdown().await);
                    }
                    if let Some(message) = self.info.kill_message() {
                        self.fatal("57P01", &message).await;
                        return Some(End::Closed);
                    }
                    if let Some(end) = self.move_if_rerouted().await {
                        return Some(end);
                    }
                }
            }
        }
        self.entered = true;
        self.info.set_busy(true);
        // A state staged before this request may not be the session's any
        // more: the next idle moment (or the switch) reads it again.
        self.requests += 1;
        if !self.shared.router.is_current(&self.route)
            && let Err(e) = self.move_backend().await
        {
            return Some(self.move_failed(e).await);
        }
        None
    }

    pub(super) fn leave(&mut self) {
        self.entered = false;
        self.info.set_busy(false);
        self.shared.gate.leave();
    }

    /// Forwards the rest of a server message the relay passed on in part, so
    /// the proxy's own queries start on a message boundary.
    pub(super) async fn settle_server(&mut self) -> Result<(), WireError> {
        while !self.sscan.at_boundary() {
            if self.sbuf.is_empty() && self.server.read_buf(&mut self.sbuf).await? == 0 {
                return Err(WireError::Closed);
            }
            let st = &mut self.st;
            let n = self
                .sscan
                .scan(&self.sbuf, server_reads, |tag, body| {
                    st.on_server(tag, body)
                })
                .map_err(|e| WireError::Protocol(e.to_string()))?;
            write_chunk(&mut self.client, &self.sbuf[..n]).await?;
            self.sbuf.advance(n);
        }
        Ok(())
    }

    async fn client_gone(&mut self) -> End {
        if !self.cscan.at_boundary() || !self.cbuf.is_empty() {
            self.shared.metrics.error("client_lost");
        }
        End::ClientGone
    }

    async fn server_lost(&mut self) -> End {
        if self.st.terminated {
            return End::Terminated;
        }
        self.shared.metrics.error("server_lost");
        tracing::warn!(session = self.info.id, route = %self.route.name, "server connection lost");
        self.fatal(
            "08006",
            &format!(
                "the {} server closed the connection unexpectedly",
                self.route.name
            ),
        )
        .await;
        End::Closed
    }

    async fn client_protocol_error(&mut self, e: ScanError) -> End {
        let kind = match e {
            ScanError::TooLarge { .. } => "too_large",
            ScanError::BadLength { .. } => "protocol",
        };
        self.shared.metrics.error(kind);
        tracing::info!(session = self.info.id, "closing session: client sent {e}");
        self.fatal("08P01", &e.to_string()).await;
        End::Closed
    }

    async fn close_for_shutdown(&mut self) -> End {
        self.fatal(
            "57P01",
            "terminating connection due to administrator command (pgshift is shutting down)",
        )
        .await;
        End::Closed
    }

    /// Sends a FATAL error to the client if that does not cut a message in
    /// two (after what the relay still had for the client).
    pub(super) async fn fatal(&mut self, code: &str, message: &str) {
        if !self.s_out.idle() {
            let (s, client, sbuf) = (&mut self.s_out, &mut self.client, &mut self.sbuf);
            if std::future::poll_fn(|cx| s.poll_send(client, sbuf, cx))
                .await
                .is_err()
            {
                return;
            }
        }
        if self.sscan.at_boundary() {
            let frame = crate::wire::ErrorFields::new("FATAL", code, message).to_frame();
            let _ = write_chunk(&mut self.client, &frame).await;
        }
    }

    fn flush_metrics(&mut self) {
        let m = &self.shared.metrics;
        let st = &mut self.st;
        if st.queries > 0 {
            m.queries_total.inc_by(std::mem::take(&mut st.queries));
        }
        if st.transactions > 0 {
            m.transactions_total
                .inc_by(std::mem::take(&mut st.transactions));
        }
        if st.bytes_c2s > 0 {
            m.bytes_client_to_server
                .inc_by(std::mem::take(&mut st.bytes_c2s));
        }
        if st.bytes_s2c > 0 {
            m.bytes_server_to_client
                .inc_by(std::mem::take(&mut st.bytes_s2c));
        }
    }

    async fn finish(mut self, end: End) {
        if self.entered {
            self.leave();
        }
        self.flush_metrics();
        let _ = self.client.shutdown().await;
        // Not after a chunk written in part: the server would read the
        // Terminate as the rest of a message.
        if end != End::Terminated
            && self.cscan.at_boundary()
            && self.c_out.idle()
            && !self.st.terminated
        {
            // Tell the server goodbye instead of an abrupt EOF.
            let _ = self.server.write_all(&messages::message(b'X', &[])).await;
        }
        let _ = self.server.shutdown().await;
        tracing::debug!(session = self.info.id, ?end, "session ended");
    }
}

pub(super) async fn write_chunk(w: &mut PgStream, data: &[u8]) -> std::io::Result<()> {
    w.write_all(data).await?;
    w.flush().await
}
