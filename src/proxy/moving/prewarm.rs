//! Pre-warming: before the cutover pauses clients, every live session gets a
//! backend on the route it is about to move to (same user, database and
//! startup parameters), parked in its [`SessionInfo`]'s [`super::MoveState`].
//! The move then pays only for replaying session state, not for connecting
//! and authenticating. Sessions that connect while a pre-warm route is set
//! get one too.

use std::sync::Arc;

use tokio::sync::Semaphore;

use super::{MoveState, Parked};
use crate::proxy::Shared;
use crate::proxy::backend;
use crate::proxy::route::Route;
use crate::proxy::sessions::SessionInfo;

/// Backends warmed at once: each is opened, then its session's state is
/// replayed there (a cold backend's first statements load its caches), and
/// only then is the next one started. Warm-up is CPU on the target that the
/// clients do not wait for, so it goes at a pace that leaves them room: the
/// clients' transactions slow down with every process that competes with
/// them (two databases, 8 sessions, on 2 shared cores: 4 opened at once and
/// every replay at once held clients up to 75 ms; with 500 sessions, 16 at
/// once held them up to 0.5 s).
const CONCURRENCY: usize = 2;

/// How long one warm-up waits for its session to stage before the next
/// starts anyway: a session inside a transaction stages at its end, which
/// for an OLTP client is a few ms away; one idle in a long transaction
/// must not hold up the others (100 of them: 2.5 s of pre-warming).
const STAGE_ONE_WAIT: std::time::Duration = std::time::Duration::from_millis(50);

/// Parks a backend on `route` for every live session not already on it;
/// returns how many are parked when all attempts have ended.
pub(crate) async fn all(shared: &Arc<Shared>, route: Route) -> usize {
    let route = Arc::new(route);
    shared.prewarm.store(Some(route.clone()));
    let limit = Arc::new(Semaphore::new(CONCURRENCY));
    let sessions = shared.sessions.sessions();
    let opens = sessions.iter().map(|s| {
        let runtime = s.runtime.clone();
        let (shared, s, route, limit) = (shared.clone(), s.clone(), route.clone(), limit.clone());
        let open = async move {
            let _permit = limit.acquire().await;
            let parked = one(&shared, &s, &route).await;
            if parked {
                let staged = || s.is_closed() || s.moving.settled_for(&route);
                shared
                    .sessions
                    .wait_changed_until(STAGE_ONE_WAIT, staged)
                    .await;
            }
            parked
        };
        // On the session's relay thread, which will poll the backend.
        match runtime {
            Some(rt) => rt.spawn(open),
            None => tokio::spawn(open),
        }
    });
    let parked = futures_util::future::join_all(opens)
        .await
        .into_iter()
        .filter(|ok| matches!(ok, Ok(true)))
        .count();
    // Idle sessions replay their state on their parked backend now (see
    // [`super::stage`]); give busy ones a moment to reach a boundary.
    let staged = shared
        .sessions
        .wait_changed_until(STAGE_WAIT, || {
            sessions
                .iter()
                .all(|s| s.is_closed() || s.moving.settled_for(&route))
        })
        .await;
    tracing::info!(
        route = %route.name,
        sessions = sessions.len(),
        parked,
        staged,
        "pre-warmed backends for the next route"
    );
    parked
}

/// How long pre-warming waits for sessions to replay their state ahead of
/// the pause; the rest do it while the gate holds them.
const STAGE_WAIT: std::time::Duration = std::time::Duration::from_millis(500);

/// A session that connected while a pre-warm route is set gets its backend
/// in the background.
pub(crate) fn on_new_session(shared: &Arc<Shared>, info: &Arc<SessionInfo>) {
    if let Some(route) = shared.prewarm.load_full() {
        let shared = shared.clone();
        let info = info.clone();
        tokio::spawn(async move { one(&shared, &info, &route).await });
    }
}

/// Clears the pre-warm route and closes every parked backend (the cutover
/// was aborted). Returns how many were closed.
pub(crate) fn discard_all(shared: &Shared) -> usize {
    shared.prewarm.store(None);
    let mut n = 0;
    for s in shared.sessions.sessions() {
        if let Some((p, _)) = s.moving.take_parked() {
            discard(shared, p);
            n += 1;
        }
    }
    n
}

/// Closes a parked backend that will not be used.
pub(crate) fn discard(shared: &Shared, p: Parked) {
    shared.metrics.prewarm("discarded");
    tokio::spawn(p.conn.terminate());
}

/// Opens and parks one backend; false if none is parked for `route` after.
async fn one(shared: &Shared, info: &SessionInfo, route: &Arc<Route>) -> bool {
    let already = |info: &SessionInfo| {
        *info.backend().route == **route
            || info.moving.route().is_some_and(|r| Arc::ptr_eq(&r, route))
    };
    if info.is_closed() || already(info) {
        return false;
    }
    let conn = match backend::open(shared, route, &info.startup, &info.user).await {
        Ok(c) => c,
        Err(e) => {
            // Not fatal: the move opens a backend itself.
            shared.metrics.prewarm("failed");
            tracing::warn!(session = info.id, route = %route.name, "cannot pre-warm a backend: {e}");
            return false;
        }
    };
    shared.metrics.prewarm("opened");
    let still_wanted = shared
        .prewarm
        .load()
        .as_ref()
        .is_some_and(|r| Arc::ptr_eq(r, route));
    if !still_wanted || *info.backend().route == **route {
        tokio::spawn(conn.terminate());
        return false;
    }
    // The session may have ended meanwhile: its removal takes what is parked,
    // or `park` sees it closed (both are ordered by the parked lock).
    let parked = Parked {
        route: route.clone(),
        conn,
    };
    if !park(shared, info, parked) {
        return false;
    }
    // An idle session stages its move now.
    info.wake.notify();
    true
}

/// Whether a backend parked for `route` is still of use to `info`.
fn wanted(shared: &Shared, info: &SessionInfo, route: &Arc<Route>) -> bool {
    !info.is_closed()
        && shared
            .prewarm
            .load()
            .as_ref()
            .is_some_and(|w| Arc::ptr_eq(w, route))
}

/// Parks a pre-warmed backend where the switch looks for it, unless the
/// session ended or the cutover gave up its pre-warming meanwhile (checked
/// again after parking: whoever looks last closes it). True if it stays parked.
fn park(shared: &Shared, info: &SessionInfo, p: Parked) -> bool {
    if !wanted(shared, info, &p.route) {
        discard(shared, p);
        return false;
    }
    let route = p.route.clone();
    match info.moving.park_prewarmed(p) {
        Ok(Some(other)) => discard(shared, other),
        Ok(None) => {}
        Err(p) => {
            discard(shared, p);
            return false;
        }
    }
    still_wanted(shared, info, &route)
}

/// Ends a session's staging with `outcome` (see [`park`] for when what is
/// parked is closed instead), and tells waiters on "nobody is staging"
/// (pre-warming, the cutover's quiet moment) to look again.
pub(super) fn end_staging(shared: &Shared, info: &SessionInfo, outcome: MoveState) {
    let route = outcome.parked().map(|p| p.route.clone());
    let outcome = match route {
        Some(r) if !wanted(shared, info, &r) => {
            if let Some((p, _)) = outcome.into_parked() {
                discard(shared, p);
            }
            MoveState::Idle
        }
        _ => outcome,
    };
    let route = outcome.parked().map(|p| p.route.clone());
    if let Some(other) = info.moving.end_staging(outcome) {
        discard(shared, other);
    }
    if let Some(r) = route {
        still_wanted(shared, info, &r);
    }
    shared.sessions.note_changed();
}

/// Closes what is parked when it is no longer wanted; true if it stays.
fn still_wanted(shared: &Shared, info: &SessionInfo, route: &Arc<Route>) -> bool {
    if wanted(shared, info, route) {
        return true;
    }
    if let Some((p, _)) = info.moving.take_parked() {
        discard(shared, p);
    }
    false
}
