//! Staging: moves the cost of a move out of the cutover's pause. While a
//! cutover pre-warms a backend for a session, the idle session replays its
//! state there ahead of time, and reads it again (replaying only when it
//! changed) each time it is idle after a request, until the gate holds it.
//! A state read while idle stays the session's state until it runs its next
//! request, so the switch then only swaps backends — and a session the gate
//! holds reads nothing in the pause unless it ran a request since. A failure
//! leaves the move to the switch, which starts over and reports it.

use std::time::Instant;

use super::replay::{self, Link, Replayed, SessionState};
use super::{MoveError, MoveState, Parked, Staged, prewarm};
use crate::proxy::session::{End, Session};
use crate::wire::{ServerConnection, WireError};

impl Session {
    /// Stages the move when a backend is parked for the pre-warm route and
    /// the session's state was not staged (or tried) since its last request.
    pub(in crate::proxy) async fn stage_move(&mut self) -> Option<End> {
        if self.entered || self.shared.is_draining() || !self.shared.router.is_current(&self.route)
        {
            return None;
        }
        let target = {
            let guard = self.shared.prewarm.load();
            guard.as_ref()?.clone()
        };
        let held = self.shared.gate.is_closed();
        match self.info.moving.staging_at() {
            // Tried since the session last ran a request.
            Some(at) if at == self.requests => return None,
            // Its older state is being replayed in the background (see
            // below): a held session waits for that, an active one looks
            // again later.
            Some(_) if !held => return None,
            Some(_) => self.await_staging().await,
            None => {}
        }
        let (p, earlier) = self
            .info
            .moving
            .begin_staging(&target, held, self.requests)?;
        let started = Instant::now();
        let limit = self.move_limit();
        let requests = self.requests;
        // Read on the old backend: the client's next request waits for this.
        let state = match tokio::time::timeout(limit, self.capture()).await {
            Ok(Ok(state)) => state,
            Ok(Err(e)) => return self.not_staged(p, earlier, e).await,
            Err(_) => {
                // Cut off mid-query: the old backend's replies are out of step.
                self.end_staging(MoveState::Idle, Some(p));
                return Some(self.move_failed(MoveError::Timeout(limit)).await);
            }
        };
        let (mut p, earlier, state) = match still_staged(earlier, state, requests) {
            Ok(staged) => {
                self.end_staging(MoveState::ReadyToSwap { parked: p, staged }, None);
                return None;
            }
            Err((earlier, state)) => (p, earlier, state),
        };
        // Replayed on the new backend, which the client does not wait for
        // while the gate is open: a session's first replay (its prepared
        // statements parsed on a cold backend) can take tens of ms.
        let (shared, info) = (self.shared.clone(), self.info.clone());
        let replay = async move {
            let r =
                tokio::time::timeout(limit, replay_onto(&mut p, earlier, state, requests)).await;
            let outcome = match r {
                Ok(Ok(staged)) => {
                    tracing::debug!(
                        session = info.id,
                        held,
                        ms = format!("{:.2}", started.elapsed().as_secs_f64() * 1000.0),
                        "session move staged"
                    );
                    MoveState::ReadyToSwap { parked: p, staged }
                }
                // Partly replayed: of no use, the switch opens another.
                Ok(Err(e)) => {
                    tracing::debug!(session = info.id, "move not staged: {e}");
                    prewarm::discard(&shared, p);
                    MoveState::Idle
                }
                Err(_) => {
                    prewarm::discard(&shared, p);
                    MoveState::Idle
                }
            };
            prewarm::end_staging(&shared, &info, outcome);
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

    /// Ends this session's staging with `outcome`, closing `given_up`.
    fn end_staging(&self, outcome: MoveState, given_up: Option<Parked>) {
        if let Some(p) = given_up {
            prewarm::discard(&self.shared, p);
        }
        prewarm::end_staging(&self.shared, &self.info, outcome);
    }

    /// A state that could not be read for staging: the old backend broke or
    /// is out of step (as a move would fail), or it cannot move or replay
    /// (Refused: the switch reports it).
    async fn not_staged(
        &mut self,
        parked: Parked,
        staged: Option<Staged>,
        e: MoveError,
    ) -> Option<End> {
        if let MoveError::OldBackend(ref w) = e
            && !matches!(w, WireError::Server(_))
        {
            self.end_staging(MoveState::Idle, Some(parked));
            return Some(self.move_failed(e).await);
        }
        tracing::debug!(session = self.info.id, "move not staged: {e}");
        let refused = MoveState::Refused {
            parked,
            staged,
            at_request: self.requests,
            reason: e,
        };
        self.end_staging(refused, None);
        None
    }

    /// Waits for this session's background replay (bounded like a move).
    pub(super) async fn await_staging(&self) {
        let info = &self.info;
        self.shared
            .sessions
            .wait_changed_until(self.move_limit(), || !info.moving.is_staging())
            .await;
    }
}

/// Returns a backend to a clean session (before replaying another state).
async fn reset_on(conn: &mut ServerConnection) -> Result<(), MoveError> {
    let mut link = Link::new(&mut conn.stream, &mut conn.reader);
    replay::reset(&mut link).await
}

/// Replays `state` on a new backend.
pub(super) async fn restore_on(
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

/// Replays `state` on `p`'s backend (on a clean session when `earlier` was
/// replayed there before), as read at request `at_request`. After an error
/// the backend is of no use.
pub(super) async fn replay_onto(
    p: &mut Parked,
    earlier: Option<Staged>,
    state: SessionState,
    at_request: u64,
) -> Result<Staged, MoveError> {
    let mut replayed = Replayed::default();
    if let Some(old) = earlier {
        replayed = old.replayed;
        reset_on(&mut p.conn).await?;
    }
    replayed.merge(restore_on(&mut p.conn, &state).await?);
    Ok(Staged {
        state,
        replayed,
        at_request,
    })
}

/// `staged`, recorded as read at request `at_request`, when it holds
/// `state` (just read while the session was idle); else both back (the
/// state must be replayed).
pub(super) fn still_staged(
    staged: Option<Staged>,
    state: SessionState,
    at_request: u64,
) -> Result<Staged, (Option<Staged>, SessionState)> {
    match staged {
        Some(mut st) if st.state == state => {
            st.at_request = at_request;
            Ok(st)
        }
        other => Err((other, state)),
    }
}
