//! One client session: open its backend, greet the client, then relay bytes
//! both ways until either side ends.
//!
//! The relay forwards the original bytes. Per read it scans frame headers
//! ([`Scanner`]) and writes the whole scanned chunk at once; it reads only
//! ReadyForQuery and ParameterStatus from the server and the tags of client
//! messages. Between requests (after ReadyForQuery 'I' with nothing pending)
//! the session is at a transaction boundary: only there it passes the pause
//! gate and moves to a new route — with its state ([`super::replay`]), onto a
//! pre-warmed backend when there is one ([`super::prewarm`]). Idle sessions
//! move as soon as the route is swapped, even with the gate closed.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::io::poll_read_buf;

use super::Shared;
use super::backend;
use super::listener::{Authed, reject};
use super::prewarm;
use super::replay::{self, Link, MoveError, Replayed, SessionState};
use super::route::Route;
use super::scan::{ScanError, Scanner};
use super::sessions::{BackendRef, NewSession, Parked, SessionInfo, Staged};
use crate::wire::messages::{self, TxStatus};
use crate::wire::{FrameReader, PgStream, ServerConnection, WireError};

const CLIENT_READ_RESERVE: usize = 16 * 1024;
const SERVER_READ_RESERVE: usize = 64 * 1024;

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
    let mut cbuf = leftover;
    cbuf.reserve(CLIENT_READ_RESERVE);
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
        cscan: Scanner::new(max),
        sscan: Scanner::new(max),
        st: State::new(status, server_params),
        entered: false,
        stage_checked: None,
        requests: 0,
    };
    let end = s.relay().await;
    s.finish(end).await;
}

/// Removes the session from the registry when it ends, however it ends,
/// and closes a backend still parked for it.
struct Registered<'a>(&'a Shared, Arc<SessionInfo>);

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        self.0.sessions.remove(self.1.proxy_key.0);
        if let Some(p) = self.1.take_parked() {
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
enum End {
    /// The client closed its connection (with or without Terminate).
    ClientGone,
    /// The client sent Terminate and the server closed.
    Terminated,
    /// The proxy ended the session after telling the client why.
    Closed,
}

/// What the relay learns from the messages it sees.
struct State {
    status: TxStatus,
    /// Query / Sync / FunctionCall messages sent whose ReadyForQuery is outstanding.
    pending: u32,
    /// Extended-protocol messages sent since the last Sync.
    unsynced: bool,
    terminated: bool,
    saw_ready: bool,
    /// Server parameters as the client knows them.
    params: Vec<(String, String)>,
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
            queries: 0,
            transactions: 0,
            bytes_c2s: 0,
            bytes_s2c: 0,
        }
    }

    fn on_client(&mut self, tag: u8) {
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

fn set_param(params: &mut Vec<(String, String)>, k: String, v: String) {
    match params.iter_mut().find(|(n, _)| *n == k) {
        Some(p) => p.1 = v,
        None => params.push((k, v)),
    }
}

/// The messages whose bodies the relay reads from the server.
fn server_reads(tag: u8) -> bool {
    tag == b'Z' || tag == b'S'
}

struct Session {
    shared: Arc<Shared>,
    info: Arc<SessionInfo>,
    user: String,
    startup: Vec<(String, String)>,
    client: PgStream,
    server: PgStream,
    route: Arc<Route>,
    cbuf: BytesMut,
    sbuf: BytesMut,
    cscan: Scanner,
    sscan: Scanner,
    st: State,
    /// Counted by the gate as inside a transaction.
    entered: bool,
    /// The pre-warm route this session checked its staged move for while
    /// held by the gate (since it last ran a request).
    stage_checked: Option<Arc<Route>>,
    /// Requests the session has run; a staged state records the count it
    /// was read at (see [`Staged::at_request`]).
    requests: u64,
}

fn reserve(buf: &mut BytesMut, amount: usize) {
    if buf.capacity() - buf.len() < amount / 4 {
        buf.reserve(amount);
    }
}

/// What woke the relay loop.
enum Event {
    Client(std::io::Result<usize>),
    Server(std::io::Result<usize>),
    Wake,
}

impl Session {
    async fn relay(&mut self) -> End {
        let info = self.info.clone();
        // Which direction is polled first; alternates so a side that always
        // has data cannot starve the other.
        let mut server_first = true;
        loop {
            reserve(&mut self.cbuf, CLIENT_READ_RESERVE);
            reserve(&mut self.sbuf, SERVER_READ_RESERVE);
            server_first = !server_first;
            let event = std::future::poll_fn(|cx| {
                // First, so a session whose sockets always have data still
                // sees shutdown and termination.
                if info.wake.poll(cx).is_ready() {
                    return Poll::Ready(Event::Wake);
                }
                let mut server = |cx: &mut Context<'_>| {
                    poll_read_buf(Pin::new(&mut self.server), cx, &mut self.sbuf).map(Event::Server)
                };
                let mut client = |cx: &mut Context<'_>| {
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
                Event::Client(Ok(_)) => self.on_client_data().await,
                Event::Server(Ok(0) | Err(_)) => Some(self.server_lost().await),
                Event::Server(Ok(_)) => self.on_server_data().await,
                Event::Wake => self.on_wake().await,
            };
            if let Some(end) = end {
                return end;
            }
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
        if !self.entered
            && let Some(end) = self.begin_request().await
        {
            return Some(end);
        }
        let st = &mut self.st;
        let n = match self
            .cscan
            .scan(&self.cbuf, |_| false, |tag, _| st.on_client(tag))
        {
            Ok(n) => n,
            Err(e) => return Some(self.client_protocol_error(e).await),
        };
        if n > 0 {
            if write_chunk(&mut self.server, &self.cbuf[..n])
                .await
                .is_err()
            {
                return Some(self.server_lost().await);
            }
            self.cbuf.advance(n);
            self.st.bytes_c2s += n as u64;
        }
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
        if n > 0 {
            if write_chunk(&mut self.client, &self.sbuf[..n])
                .await
                .is_err()
            {
                return Some(self.client_gone().await);
            }
            self.sbuf.advance(n);
        }
        if left {
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
        self.stage_checked = None;
        if !self.shared.router.is_current(&self.route)
            && let Err(e) = self.move_backend().await
        {
            return Some(self.move_failed(e).await);
        }
        None
    }

    /// Moves the cost of a move out of the cutover's pause. While a cutover
    /// pre-warms a backend for this session, the idle session replays its
    /// state there ahead of time, and reads it again (replaying only what
    /// changed) each time it is idle after a request, until the gate holds
    /// it. A state read while idle stays the session's state until it runs
    /// its next request, so the switch then only swaps backends — and a
    /// session the gate holds reads nothing in the pause unless it ran a
    /// request since. A failure leaves the move to the switch, which starts
    /// over and reports it.
    async fn stage_move(&mut self) -> Option<End> {
        if self.entered || self.shared.is_draining() || !self.shared.router.is_current(&self.route)
        {
            return None;
        }
        let target = {
            let guard = self.shared.prewarm.load();
            guard.as_ref()?.clone()
        };
        // Staged (or tried, while held) since the session last ran a request.
        if self
            .stage_checked
            .as_ref()
            .is_some_and(|r| Arc::ptr_eq(r, &target))
        {
            return None;
        }
        let held = self.shared.gate.is_closed();
        if self.info.is_staging() {
            // Its state is being replayed in the background (see below): a
            // held session waits for that, an active one looks again later.
            if !held {
                return None;
            }
            self.await_staging().await;
        }
        // Flagged before the backend is taken out, so pre-warming never sees
        // this session as settled meanwhile.
        self.info.set_staging(true);
        let Some(mut p) = self.info.take_parked() else {
            self.staging_done();
            return None;
        };
        if !Arc::ptr_eq(&p.route, &target) || (!held && p.stage_failed) {
            prewarm::park(&self.shared, &self.info, p);
            self.staging_done();
            return None;
        }
        // Tried once per hold, also when it fails; while active, once per
        // request (a failed replay is left to the switch).
        self.stage_checked = Some(target);
        let started = Instant::now();
        let limit = self.move_limit();
        // Read on the old backend: the client's next request waits for this.
        let state = match tokio::time::timeout(limit, self.capture()).await {
            Ok(Ok(state)) => state,
            Ok(Err(e)) => {
                p.stage_failed = true;
                prewarm::park(&self.shared, &self.info, p);
                self.staging_done();
                return self.not_staged(e).await;
            }
            Err(_) => {
                // Cut off mid-query: the old backend's replies are out of step.
                prewarm::discard(&self.shared, p);
                self.staging_done();
                return Some(self.move_failed(MoveError::Timeout(limit)).await);
            }
        };
        let requests = self.requests;
        let Some(state) = still_staged(&mut p, state, requests) else {
            prewarm::park(&self.shared, &self.info, p);
            self.staging_done();
            return None;
        };
        // Replayed on the new backend, which the client does not wait for
        // while the gate is open: a session's first replay (its prepared
        // statements parsed on a cold backend) can take tens of ms.
        let (shared, info) = (self.shared.clone(), self.info.clone());
        let replay = async move {
            match tokio::time::timeout(limit, replay_onto(&mut p, state, requests)).await {
                Ok(Ok(())) => {
                    tracing::debug!(
                        session = info.id,
                        held,
                        ms = format!("{:.2}", started.elapsed().as_secs_f64() * 1000.0),
                        "session move staged"
                    );
                    prewarm::park(&shared, &info, p);
                }
                Ok(Err((e, touched))) => {
                    tracing::debug!(session = info.id, "move not staged: {e}");
                    if touched {
                        // Partly replayed: of no use, the switch opens another.
                        prewarm::discard(&shared, p);
                    } else {
                        p.stage_failed = true;
                        prewarm::park(&shared, &info, p);
                    }
                }
                Err(_) => prewarm::discard(&shared, p),
            }
            info.set_staging(false);
            shared.sessions.note_changed();
            // A request the session ran meanwhile made this state stale:
            // the idle session reads it again now, not in the pause.
            info.wake.notify();
        };
        if held {
            replay.await;
        } else {
            tokio::spawn(replay);
        }
        None
    }

    /// A state that could not be read for staging: the old backend broke or
    /// is out of step (as a move would fail), or it cannot move or replay
    /// (the switch reports it).
    async fn not_staged(&mut self, e: MoveError) -> Option<End> {
        match e {
            MoveError::OldBackend(ref w) if !matches!(w, WireError::Server(_)) => {
                Some(self.move_failed(e).await)
            }
            e => {
                tracing::debug!(session = self.info.id, "move not staged: {e}");
                None
            }
        }
    }

    /// Waits for this session's background replay (bounded like a move).
    async fn await_staging(&self) {
        let info = &self.info;
        self.shared
            .sessions
            .wait_changed_until(self.move_limit(), || !info.is_staging())
            .await;
    }

    /// Reads the session's state and makes `p` hold it: nothing to do when
    /// it already holds this state, else replayed.
    /// The error says whether `p`'s backend was touched (then it is of no use).
    async fn stage_on(&mut self, p: &mut Parked) -> Result<(), (MoveError, bool)> {
        let state = self.capture().await.map_err(|e| (e, false))?;
        match still_staged(p, state, self.requests) {
            None => Ok(()),
            Some(state) => replay_onto(p, state, self.requests).await,
        }
    }

    /// Ends what `set_staging(true)` began; waiters on "nobody is staging"
    /// (pre-warming, the cutover's quiet moment) look again.
    fn staging_done(&self) {
        self.info.set_staging(false);
        self.shared.sessions.note_changed();
    }

    fn leave(&mut self) {
        self.entered = false;
        self.info.set_busy(false);
        self.shared.gate.leave();
    }

    /// An idle session moves as soon as the route changes, also while the gate
    /// is closed (the cutover's switch waits for it); with the gate open it
    /// counts as busy meanwhile.
    async fn move_if_rerouted(&mut self) -> Option<End> {
        if self.shared.router.is_current(&self.route) || self.shared.is_draining() {
            return None;
        }
        let counted = self.shared.gate.try_enter();
        if counted {
            self.entered = true;
            self.info.set_busy(true);
        }
        let r = self.move_backend().await;
        if counted {
            self.leave();
        }
        match r {
            Ok(()) => None,
            Err(e) => Some(self.move_failed(e).await),
        }
    }

    /// The session cannot move: the client is told why and must reconnect.
    async fn move_failed(&mut self, e: MoveError) -> End {
        let m = &self.shared.metrics;
        m.session_moves.with_label_values(&["dropped"]).inc();
        if matches!(e, MoveError::NewBackend(_)) {
            m.error("backend_connect");
        }
        self.shared.moves_failed.fetch_add(1, Ordering::Relaxed);
        let route = self.shared.router.current();
        let message = match &e {
            // What the session holds is the client's own business: named.
            MoveError::Unmovable(_) => {
                tracing::warn!(session = self.info.id, from = %self.route.name, to = %route.name, "cannot move session: {e}");
                format!(
                    "terminating connection: pgshift cannot move this session to the {} server: {e}; reconnect to continue",
                    route.name
                )
            }
            _ => super::incident::report(
                Some(self.info.id),
                &format!(
                    "terminating connection: pgshift cannot move this session to the {} server; reconnect to continue",
                    route.name
                ),
                &format_args!("from the {} server: {e}", self.route.name),
            ),
        };
        self.fatal("57P01", &message).await;
        End::Closed
    }

    /// How long one move may take before the session is given up.
    fn move_limit(&self) -> Duration {
        self.shared.limits.connect_timeout * 2
    }

    /// Moves the session to a backend on the current route: reads its state
    /// from the old backend, takes the pre-warmed backend (or opens one),
    /// replays the state there, tells the client about parameters that
    /// differ, and closes the old backend. Only at a transaction boundary.
    async fn move_backend(&mut self) -> Result<(), MoveError> {
        let started = Instant::now();
        let route = self.shared.router.current();
        let limit = self.move_limit();
        let (conn, replayed) = tokio::time::timeout(limit, self.capture_and_replay(&route))
            .await
            .map_err(|_| MoveError::Timeout(limit))??;
        self.adopt(conn, replayed, route)
            .await
            .map_err(|e| MoveError::NewBackend(e.into()))?;
        let m = &self.shared.metrics;
        m.session_moves.with_label_values(&["moved"]).inc();
        m.session_move_seconds
            .observe(started.elapsed().as_secs_f64());
        tracing::debug!(
            session = self.info.id,
            ms = format!("{:.2}", started.elapsed().as_secs_f64() * 1000.0),
            "session move done"
        );
        self.shared.sessions.note_changed();
        Ok(())
    }

    async fn capture_and_replay(
        &mut self,
        route: &Arc<Route>,
    ) -> Result<(ServerConnection, Replayed), MoveError> {
        if self.info.is_staging() {
            self.await_staging().await;
        }
        if let Some(mut p) = self.info.take_parked() {
            if *p.route == **route {
                let staged = match p.staged.as_ref() {
                    // Read while the session was idle, and it ran no request
                    // since: its state is the one replayed.
                    Some(st) if st.at_request == self.requests => {
                        self.settle_server().await.map_err(MoveError::OldBackend)?;
                        Ok(())
                    }
                    _ => self.stage_on(&mut p).await,
                };
                match staged {
                    Ok(()) => {
                        self.shared.metrics.prewarm("used");
                        let r = p.staged.take().map(|st| st.replayed);
                        return Ok((p.conn, r.unwrap_or_default()));
                    }
                    // A parked backend may have died while it waited.
                    Err((MoveError::NewBackend(e), _)) => {
                        tracing::info!(
                            session = self.info.id,
                            "pre-warmed backend unusable ({e}); opening another"
                        );
                        self.shared.metrics.prewarm("failed");
                        prewarm::discard(&self.shared, p);
                    }
                    Err((e, _)) => {
                        prewarm::discard(&self.shared, p);
                        return Err(e);
                    }
                }
            } else {
                prewarm::discard(&self.shared, p);
            }
        }
        let state = self.capture().await?;
        let mut conn = backend::open(&self.shared, route, &self.startup, &self.user)
            .await
            .map_err(MoveError::NewBackend)?;
        let r = restore_on(&mut conn, &state).await?;
        Ok((conn, r))
    }

    /// Reads the session state from the old backend; notifications that
    /// arrive meanwhile go to the client.
    async fn capture(&mut self) -> Result<SessionState, MoveError> {
        self.settle_server().await.map_err(MoveError::OldBackend)?;
        let mut reader = FrameReader {
            buf: std::mem::take(&mut self.sbuf),
            max: self.shared.limits.max_message_size,
        };
        let mut link = Link::new(&mut self.server, &mut reader);
        let state = replay::capture(&mut link, &self.user).await;
        let notes = std::mem::take(&mut link.notifications);
        self.sbuf = reader.buf;
        if !notes.is_empty() {
            write_chunk(&mut self.client, &notes)
                .await
                .map_err(|e| MoveError::OldBackend(e.into()))?;
        }
        state
    }

    /// Forwards the rest of a server message the relay passed on in part, so
    /// the proxy's own queries start on a message boundary.
    async fn settle_server(&mut self) -> Result<(), WireError> {
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

    /// Switches the relay to `conn` and closes the old backend.
    async fn adopt(
        &mut self,
        conn: ServerConnection,
        replayed: Replayed,
        route: Arc<Route>,
    ) -> std::io::Result<()> {
        let mut params = conn.params.clone();
        for (k, v) in replayed.reported {
            set_param(&mut params, k, v);
        }
        let mut out = BytesMut::new();
        for (k, v) in &params {
            if !self.st.params.iter().any(|(n, old)| n == k && old == v) {
                out.extend_from_slice(&messages::parameter_status(k, v));
            }
        }
        out.extend_from_slice(&replayed.notifications);
        if !out.is_empty() {
            write_chunk(&mut self.client, &out).await?;
        }
        for (k, v) in params {
            set_param(&mut self.st.params, k, v);
        }
        let (pid, secret) = conn.key.unwrap_or((0, 0));
        self.info.set_backend(BackendRef {
            route: route.clone(),
            pid,
            secret,
        });
        let old = std::mem::replace(&mut self.server, conn.stream);
        tokio::spawn(retire(self.shared.clone(), old));
        self.sbuf = conn.reader.buf;
        self.sscan = Scanner::new(self.shared.limits.max_message_size);
        tracing::debug!(
            session = self.info.id,
            from = %self.route.name,
            to = %route.name,
            "session moved to a new backend"
        );
        self.route = route;
        self.st.status = conn.status;
        self.stage_checked = None;
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

    /// Sends a FATAL error to the client if that does not cut a message in two.
    async fn fatal(&mut self, code: &str, message: &str) {
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
        if end != End::Terminated && self.cscan.at_boundary() && !self.st.terminated {
            // Tell the server goodbye instead of an abrupt EOF.
            let _ = self.server.write_all(&messages::message(b'X', &[])).await;
        }
        let _ = self.server.shutdown().await;
        tracing::debug!(session = self.info.id, ?end, "session ended");
    }
}

async fn write_chunk(w: &mut PgStream, data: &[u8]) -> std::io::Result<()> {
    w.write_all(data).await?;
    w.flush().await
}

/// Returns a backend to a clean session (before replaying another state).
async fn reset_on(conn: &mut ServerConnection) -> Result<(), MoveError> {
    let mut link = Link::new(&mut conn.stream, &mut conn.reader);
    replay::reset(&mut link).await
}

/// Replays `state` on a new backend.
async fn restore_on(
    conn: &mut ServerConnection,
    state: &SessionState,
) -> Result<Replayed, MoveError> {
    let encoding = conn
        .params
        .iter()
        .find(|(k, _)| k == "client_encoding")
        .map(|(_, v)| v.as_str());
    let mut link = Link::new(&mut conn.stream, &mut conn.reader);
    replay::restore(&mut link, state, encoding).await
}

/// Replays `state` on `p`'s backend (on a clean session when an older state
/// was replayed there before) and records it as read at request `at_request`.
/// The error says whether the backend was touched (then it is of no use).
async fn replay_onto(
    p: &mut Parked,
    state: SessionState,
    at_request: u64,
) -> Result<(), (MoveError, bool)> {
    let mut earlier = Replayed::default();
    if let Some(old) = p.staged.take() {
        earlier = old.replayed;
        reset_on(&mut p.conn).await.map_err(|e| (e, true))?;
    }
    let r = restore_on(&mut p.conn, &state)
        .await
        .map_err(|e| (e, true))?;
    earlier.merge(r);
    p.staged = Some(Staged {
        state,
        replayed: earlier,
        at_request,
    });
    Ok(())
}

/// Records `state`, just read while the session was idle at request
/// `at_request`, as still the one `p` holds; returns it when it is not (it
/// must be replayed).
fn still_staged(p: &mut Parked, state: SessionState, at_request: u64) -> Option<SessionState> {
    match p.staged.as_mut() {
        Some(st) if st.state == state => {
            st.at_request = at_request;
            None
        }
        _ => Some(state),
    }
}

/// Closes a backend the session moved away from, once the gate is open: a
/// server process exiting takes CPU the paused sessions' moves are waiting
/// for (on a small machine, milliseconds of the pause).
async fn retire(shared: Arc<Shared>, old: PgStream) {
    tokio::select! {
        _ = shared.gate.opened() => {}
        _ = shared.kill.cancelled() => {}
    }
    terminate(old).await;
}

async fn terminate(mut old: PgStream) {
    let _ = old.write_all(&messages::message(b'X', &[])).await;
    let _ = old.shutdown().await;
}
