//! Moving a client session to a backend on another route (DESIGN.md
//! "Proxy"), without the client reconnecting. The relay (`session.rs`) calls
//! in only at transaction boundaries; this module owns the rest:
//!
//! - [`prewarm`]: before the pause, a backend on the next route is opened and
//!   parked for every session;
//! - [`stage`]: an idle session replays its state on its parked backend ahead
//!   of the pause, so the switch only swaps backends;
//! - [`swap`]: the move itself (read the state, replay it, adopt the new
//!   backend), or the session is told why it cannot move;
//! - [`replay`]: which state moves and how it is read and replayed;
//! - [`unnamed`]: the unnamed prepared statement, which the server does not
//!   list, followed from the client's Parse messages.
//!
//! Where one session's move stands is one [`MoveState`], kept in its
//! [`SessionInfo`] where pre-warming and the cutover's waits read it:
//!
//! ```text
//!  Idle ──park──▶ Prewarmed ──stage──▶ Staging ──replayed──▶ ReadyToSwap
//!                                      │  │  ▲                    │
//!                                      │  │  └── stage again ─────┤ after the next
//!                                      │  └─unreadable─▶ Refused ─┘ request (Refused:
//!                                      ▼                            only while held)
//!                               Idle (replay failed: backend closed)
//! ```
//!
//! From any state with a backend the session becomes Idle when the switch
//! takes that backend, or when it is discarded (cutover aborted, session
//! ended). A session that moved is Idle again, on its new route.

/// Old backends closed at once after a switch (see `swap::retire`).
pub(crate) const RETIRE_AT_ONCE: usize = 1;
/// How long closing one old backend waits for its process to be gone.
const RETIRE_WAIT: std::time::Duration = std::time::Duration::from_secs(1);
/// How long after the gate opened the first old backend closes.
const RETIRE_AFTER: std::time::Duration = std::time::Duration::from_millis(100);

pub(super) mod prewarm;
mod replay;
mod stage;
mod swap;
pub(super) mod unnamed;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use thiserror::Error;

use super::route::Route;
use super::sessions::SessionInfo;
use crate::wire::{ErrorFields, ServerConnection, WireError};
use replay::{Replayed, SessionState};

/// Why a session could not move.
#[derive(Debug, Error)]
pub(crate) enum MoveError {
    #[error("it holds {0}, which cannot move to another server")]
    Unmovable(Unmovable),
    #[error("cannot read the session state from the old server: {0}")]
    OldBackend(WireError),
    #[error("cannot open a backend on the new server: {0}")]
    NewBackend(WireError),
    #[error("cannot restore the session state on the new server: {0}")]
    Replay(ReplayError),
    #[error("moving took longer than {0:?}")]
    Timeout(Duration),
}

/// Session state that cannot move to another server.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Unmovable {
    pub(crate) temp_tables: bool,
    pub(crate) temp_functions: bool,
    pub(crate) advisory_locks: bool,
    /// Names of the session's WITH HOLD cursors.
    pub(crate) cursors: Vec<String>,
}

impl Unmovable {
    pub(crate) fn is_empty(&self) -> bool {
        *self == Unmovable::default()
    }
}

impl std::fmt::Display for Unmovable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut parts = Vec::new();
        for (held, what) in [
            (self.temp_tables, "temporary tables"),
            (self.temp_functions, "temporary functions"),
            (self.advisory_locks, "session-level advisory locks"),
        ] {
            if held {
                parts.push(what.to_string());
            }
        }
        if !self.cursors.is_empty() {
            parts.push(format!("WITH HOLD cursors ({})", self.cursors.join(", ")));
        }
        f.write_str(&parts.join(" and "))
    }
}

/// What went wrong replaying a session's state on the new server.
#[derive(Debug, Error)]
pub(crate) enum ReplayError {
    /// The server refused one step of the replay.
    #[error("{step}: {} ({})", .error.message, .error.code)]
    Server {
        step: &'static str,
        error: ErrorFields,
    },
    #[error("type {0} of a prepared statement does not exist on the new server")]
    MissingType(String),
    #[error("prepared statement {name} could not be re-created{}", .error.as_ref().map(|e| format!(": {} ({})", e.message, e.code)).unwrap_or_default())]
    NotRecreated {
        name: String,
        error: Option<ErrorFields>,
    },
}

/// A backend opened ahead of a route swap, waiting for its session.
pub(crate) struct Parked {
    pub(crate) route: Arc<Route>,
    pub(crate) conn: ServerConnection,
}

/// A session state replayed on a parked backend.
pub(crate) struct Staged {
    /// The state as read from the old backend and replayed.
    state: SessionState,
    replayed: Replayed,
    /// The session's request count when the state was read (while it was
    /// idle): equal to its count now, it ran no request since, so this is
    /// still its state and the move only swaps backends.
    at_request: u64,
}

/// Where a session's move to the next route stands.
#[derive(Default)]
pub(crate) enum MoveState {
    /// Nothing prepared: a move opens its backend itself.
    #[default]
    Idle,
    /// A backend is parked on the next route; no state replayed on it yet.
    Prewarmed(Parked),
    /// The session's state, read at request `at_request`, is being
    /// replayed on its parked backend, which is out of the slot meanwhile.
    Staging { route: Arc<Route>, at_request: u64 },
    /// The session's state is replayed on the parked backend; while the
    /// session runs no request, the switch only swaps backends.
    ReadyToSwap { parked: Parked, staged: Staged },
    /// The session's state could not be read for staging (e.g. it holds a
    /// temporary table). Tried again only when the gate holds the session
    /// after another request; the switch tries once more and reports.
    Refused {
        parked: Parked,
        /// A state replayed earlier, still on the backend.
        staged: Option<Staged>,
        at_request: u64,
        reason: MoveError,
    },
}

impl MoveState {
    fn parked(&self) -> Option<&Parked> {
        match self {
            MoveState::Prewarmed(p)
            | MoveState::ReadyToSwap { parked: p, .. }
            | MoveState::Refused { parked: p, .. } => Some(p),
            MoveState::Idle | MoveState::Staging { .. } => None,
        }
    }

    /// The parked backend and the state on it (if any), dropping the rest.
    fn into_parked(self) -> Option<(Parked, Option<Staged>)> {
        match self {
            MoveState::Prewarmed(p) => Some((p, None)),
            MoveState::ReadyToSwap { parked, staged } => Some((parked, Some(staged))),
            MoveState::Refused { parked, staged, .. } => Some((parked, staged)),
            MoveState::Idle | MoveState::Staging { .. } => None,
        }
    }
}

/// A session's [`MoveState`], shared by its relay, pre-warming and the
/// cutover's waits. Every transition takes the lock once.
#[derive(Default)]
pub(crate) struct MoveSlot(Mutex<MoveState>);

impl MoveSlot {
    fn lock(&self) -> std::sync::MutexGuard<'_, MoveState> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Route name and backend pid of the parked backend, if one is parked.
    pub(crate) fn parked_backend(&self) -> Option<(String, i32)> {
        self.lock()
            .parked()
            .map(|p| (p.route.name.clone(), p.conn.key.map_or(0, |k| k.0)))
    }

    /// The route a backend is parked (or being staged) for.
    pub(crate) fn route(&self) -> Option<Arc<Route>> {
        match &*self.lock() {
            MoveState::Staging { route, .. } => Some(route.clone()),
            s => s.parked().map(|p| p.route.clone()),
        }
    }

    pub(crate) fn is_staging(&self) -> bool {
        matches!(*self.lock(), MoveState::Staging { .. })
    }

    /// The request count of the state being staged, if a staging is under way.
    fn staging_at(&self) -> Option<u64> {
        match &*self.lock() {
            MoveState::Staging { at_request, .. } => Some(*at_request),
            _ => None,
        }
    }

    /// Takes the parked backend out for staging when it is for `target`
    /// and the session's state was not staged (or tried) at request
    /// `requests`; a Refused state is tried again only while `held`.
    fn begin_staging(
        &self,
        target: &Arc<Route>,
        held: bool,
        requests: u64,
    ) -> Option<(Parked, Option<Staged>)> {
        let mut s = self.lock();
        let due = match &*s {
            MoveState::Prewarmed(p) => Arc::ptr_eq(&p.route, target),
            MoveState::ReadyToSwap { parked, staged } => {
                Arc::ptr_eq(&parked.route, target) && staged.at_request != requests
            }
            MoveState::Refused {
                parked, at_request, ..
            } => held && Arc::ptr_eq(&parked.route, target) && *at_request != requests,
            MoveState::Idle | MoveState::Staging { .. } => false,
        };
        if !due {
            return None;
        }
        let staging = MoveState::Staging {
            route: target.clone(),
            at_request: requests,
        };
        std::mem::replace(&mut *s, staging).into_parked()
    }

    /// Nothing more to wait for before the gate closes: not staging, and no
    /// backend parked for `route` without the state tried on it.
    pub(crate) fn settled_for(&self, route: &Arc<Route>) -> bool {
        match &*self.lock() {
            MoveState::Staging { .. } => false,
            MoveState::Prewarmed(p) => !Arc::ptr_eq(&p.route, route),
            _ => true,
        }
    }

    /// Takes the parked backend (and the state replayed on it) out; the
    /// session is Idle after. A staging under way keeps its backend.
    pub(crate) fn take_parked(&self) -> Option<(Parked, Option<Staged>)> {
        let mut s = self.lock();
        if let MoveState::Refused { reason, .. } = &*s {
            tracing::debug!(
                "a backend is parked for a session whose state could not be staged ({reason})"
            );
        }
        s.parked()?;
        std::mem::take(&mut *s).into_parked()
    }

    /// Parks a freshly opened backend, returning the one it replaces; the
    /// backend itself comes back as the error while a staging is under way
    /// (that one stays).
    fn park_prewarmed(&self, p: Parked) -> Result<Option<Parked>, Parked> {
        let mut s = self.lock();
        if matches!(*s, MoveState::Staging { .. }) {
            return Err(p);
        }
        Ok(std::mem::replace(&mut *s, MoveState::Prewarmed(p))
            .into_parked()
            .map(|(p, _)| p))
    }

    /// Ends a staging with its outcome (a parked state, or Idle when the
    /// backend was given up); returns a backend it replaces, if any.
    fn end_staging(&self, outcome: MoveState) -> Option<Parked> {
        std::mem::replace(&mut *self.lock(), outcome)
            .into_parked()
            .map(|(p, _)| p)
    }
}

impl SessionInfo {
    /// Route name and backend pid of the pre-warmed backend, if one is parked.
    pub fn parked_backend(&self) -> Option<(String, i32)> {
        self.moving.parked_backend()
    }
}
