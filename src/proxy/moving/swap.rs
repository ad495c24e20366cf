//! The move itself, at a transaction boundary: the session's state is read
//! from the old backend, replayed on the new one (or found already staged
//! there, see [`super::stage`]), the client hears about parameters that
//! differ, and the relay adopts the new backend. A session that cannot move
//! is told why and closed.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::replay::{self, Link, Replayed, SessionState};
use super::stage::{replay_onto, restore_on, still_staged};
use super::{MoveError, Parked, Staged, prewarm};
use crate::proxy::Shared;
use crate::proxy::backend;
use crate::proxy::incident;
use crate::proxy::route::Route;
use crate::proxy::scan::Scanner;
use crate::proxy::session::{End, Session, set_param, write_chunk};
use crate::proxy::sessions::BackendRef;
use crate::wire::messages;
use crate::wire::{FrameReader, PgStream, ServerConnection};

impl Session {
    /// An idle session moves as soon as the route changes, also while the gate
    /// is closed (the cutover's switch waits for it); with the gate open it
    /// counts as busy meanwhile.
    pub(in crate::proxy) async fn move_if_rerouted(&mut self) -> Option<End> {
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
    pub(in crate::proxy) async fn move_failed(&mut self, e: MoveError) -> End {
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
            _ => incident::report(
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
    pub(super) fn move_limit(&self) -> Duration {
        self.shared.limits.connect_timeout * 2
    }

    /// Moves the session to a backend on the current route: reads its state
    /// from the old backend, takes the pre-warmed backend (or opens one),
    /// replays the state there, tells the client about parameters that
    /// differ, and closes the old backend. Only at a transaction boundary.
    pub(in crate::proxy) async fn move_backend(&mut self) -> Result<(), MoveError> {
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
        if self.info.moving.is_staging() {
            self.await_staging().await;
        }
        if let Some((mut p, staged)) = self.info.moving.take_parked() {
            if *p.route == **route {
                let staged = match staged {
                    // Read while the session was idle, and it ran no request
                    // since: its state is the one replayed.
                    Some(st) if st.at_request == self.requests => {
                        self.settle_server().await.map_err(MoveError::OldBackend)?;
                        Ok(st)
                    }
                    staged => self.stage_on(&mut p, staged).await,
                };
                match staged {
                    Ok(st) => {
                        self.shared.metrics.prewarm("used");
                        return Ok((p.conn, st.replayed));
                    }
                    // A parked backend may have died while it waited.
                    Err(MoveError::NewBackend(e)) => {
                        tracing::info!(
                            session = self.info.id,
                            "pre-warmed backend unusable ({e}); opening another"
                        );
                        self.shared.metrics.prewarm("failed");
                        prewarm::discard(&self.shared, p);
                    }
                    Err(e) => {
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

    /// Reads the session's state and makes `p` hold it: nothing to do when
    /// `staged` already is this state, else replayed (after an error `p`
    /// is of no use).
    async fn stage_on(
        &mut self,
        p: &mut Parked,
        staged: Option<Staged>,
    ) -> Result<Staged, MoveError> {
        let state = self.capture().await?;
        match still_staged(staged, state, self.requests) {
            Ok(st) => Ok(st),
            Err((earlier, state)) => replay_onto(p, earlier, state, self.requests).await,
        }
    }

    /// Reads the session state from the old backend; notifications that
    /// arrive meanwhile go to the client.
    pub(super) async fn capture(&mut self) -> Result<SessionState, MoveError> {
        self.settle_server().await.map_err(MoveError::OldBackend)?;
        let mut reader = FrameReader {
            buf: std::mem::take(&mut self.sbuf),
            max: self.shared.limits.max_message_size,
        };
        let mut link = Link::new(&mut self.server, &mut reader);
        let state = replay::capture(&mut link, &self.user, self.st.unnamed.text()).await;
        let notes = std::mem::take(&mut link.notifications);
        self.sbuf = reader.buf;
        if !notes.is_empty() {
            write_chunk(&mut self.client, &notes)
                .await
                .map_err(|e| MoveError::OldBackend(e.into()))?;
        }
        state
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
        Ok(())
    }
}

/// Closes a backend the session moved away from, a moment after the gate
/// opened: a server process exiting takes CPU the paused sessions' moves
/// are waiting for (on a small machine, milliseconds of the pause), and
/// so do the moves of a fleet's other members, which open a few ms later.
async fn retire(shared: Arc<Shared>, old: PgStream) {
    tokio::select! {
        _ = async {
            shared.gate.opened().await;
            tokio::time::sleep(super::RETIRE_AFTER).await;
        } => {}
        _ = shared.kill.cancelled() => {}
    }
    // Paced: a server process's exit is CPU on the old server (on a shared
    // host, everyone's): 500 at once held clients on the new server for
    // ~0.7 s, and even 8 sent off a few ms apart held every client for
    // 30-50 ms. One at a time, each waited for until it is gone, with a
    // rest as long as its exit took: at most half a core.
    let Ok(_turn) = shared.retiring.acquire().await else {
        terminate(old).await;
        return;
    };
    let took = terminate(old).await;
    tokio::time::sleep(took).await;
}

/// Tells an old backend to end and waits until it has (its socket closes
/// as the process exits), at most [`super::RETIRE_WAIT`]; returns how long
/// that took.
async fn terminate(mut old: PgStream) -> Duration {
    let started = Instant::now();
    let _ = old.write_all(&messages::message(b'X', &[])).await;
    let _ = old.shutdown().await;
    let mut sink = [0u8; 256];
    let _ = tokio::time::timeout(super::RETIRE_WAIT, async {
        while let Ok(n) = old.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
    started.elapsed()
}
