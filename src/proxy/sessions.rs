//! The registry of live sessions: what the cutover and `/status` see, and the
//! map from proxy-issued cancel keys to the real backend.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};

use std::task::{Context, Poll};

use arc_swap::ArcSwap;
use futures_util::task::AtomicWaker;
use tokio::sync::Notify;

use super::moving::MoveSlot;
use super::route::Route;
use crate::wire::messages::TxStatus;

/// The server process a session currently talks to.
#[derive(Clone, Debug)]
pub struct BackendRef {
    pub route: Arc<Route>,
    pub pid: i32,
    pub secret: i32,
}

/// One live client session.
pub struct SessionInfo {
    pub id: u64,
    /// The BackendKeyData handed to the client (pid, secret).
    pub proxy_key: (i32, i32),
    pub user: String,
    pub database: String,
    pub application_name: String,
    pub peer: Option<super::admission::Peer>,
    /// Startup parameters (user, database, options, …) every backend of
    /// this session is opened with.
    pub(crate) startup: Vec<(String, String)>,
    status: AtomicU8,
    busy: AtomicBool,
    backend: ArcSwap<BackendRef>,
    /// Wakes the session's relay loop to look at shared state (route swap,
    /// gate opened, shutdown, termination).
    pub(crate) wake: Wake,
    /// Set to close this one session (e.g. a cutover that cannot wait for
    /// its transaction); the message goes to the client.
    kill_message: Mutex<Option<String>>,
    /// Where the session's move to the next route stands.
    pub(crate) moving: MoveSlot,
    /// Set when the session has left the registry.
    closed: AtomicBool,
    /// The relay thread the session runs on: its backends are opened there
    /// (pre-warming too), so their sockets are polled by that thread.
    pub(crate) runtime: Option<tokio::runtime::Handle>,
}

/// A per-session, lock-free wake-up flag: the relay polls it on every loop
/// turn, so it must cost a few uncontended atomics, not a mutex.
#[derive(Default)]
pub(crate) struct Wake {
    flag: AtomicBool,
    waker: AtomicWaker,
}

impl Wake {
    pub(crate) fn notify(&self) {
        self.flag.store(true, Ordering::Release);
        self.waker.wake();
    }

    /// Ready once after each `notify` (several coalesce into one).
    pub(crate) fn poll(&self, cx: &mut Context<'_>) -> Poll<()> {
        self.waker.register(cx.waker());
        if self.flag.swap(false, Ordering::AcqRel) {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }
}

impl SessionInfo {
    /// The transaction status of the last ReadyForQuery.
    pub fn tx_status(&self) -> TxStatus {
        TxStatus::from_byte(self.status.load(Ordering::Relaxed)).unwrap_or(TxStatus::Idle)
    }
    pub(crate) fn set_tx_status(&self, s: TxStatus) {
        self.status.store(s.byte(), Ordering::Relaxed);
    }
    /// Inside a transaction or with a request in flight (counted by the gate).
    pub(crate) fn busy(&self) -> bool {
        self.busy.load(Ordering::Relaxed)
    }
    pub(crate) fn set_busy(&self, b: bool) {
        self.busy.store(b, Ordering::Relaxed);
    }
    pub fn backend(&self) -> Arc<BackendRef> {
        self.backend.load_full()
    }
    pub(crate) fn set_backend(&self, b: BackendRef) {
        self.backend.store(Arc::new(b));
    }

    /// Closes this session with an ErrorResponse carrying `message`.
    pub fn terminate(&self, message: &str) {
        *self.kill_message.lock().unwrap_or_else(|e| e.into_inner()) = Some(message.to_string());
        self.wake.notify();
    }

    /// The message of a pending [`terminate`](Self::terminate), if any.
    pub(crate) fn kill_message(&self) -> Option<String> {
        self.kill_message
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The session has ended (it may still be referenced by a snapshot).
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    pub fn snapshot(&self) -> SessionSnapshot {
        let b = self.backend();
        SessionSnapshot {
            id: self.id,
            user: self.user.clone(),
            database: self.database.clone(),
            application_name: self.application_name.clone(),
            peer: self.peer.map(|p| p.to_string()),
            tx_status: self.tx_status(),
            busy: self.busy(),
            route: b.route.name.clone(),
            backend_pid: b.pid,
        }
    }
}

/// A point-in-time copy of a session's state, for status output.
#[derive(Clone, Debug, serde::Serialize)]
pub struct SessionSnapshot {
    pub id: u64,
    pub user: String,
    pub database: String,
    pub application_name: String,
    pub peer: Option<String>,
    pub tx_status: TxStatus,
    pub busy: bool,
    pub route: String,
    pub backend_pid: i32,
}

/// What a new session registers with.
pub(crate) struct NewSession {
    pub user: String,
    pub database: String,
    pub application_name: String,
    pub peer: Option<super::admission::Peer>,
    pub startup: Vec<(String, String)>,
    pub status: TxStatus,
    pub backend: BackendRef,
}

/// Live sessions keyed by their proxy-issued pid. Touched at connect,
/// disconnect and cancel only — never per message.
#[derive(Default)]
pub struct Registry {
    map: Mutex<HashMap<i32, Arc<SessionInfo>>>,
    next_id: AtomicU64,
    emptied: Notify,
    /// Notified when a session leaves or moves to another backend.
    changed: Notify,
}

impl Registry {
    pub(crate) fn register(&self, s: NewSession) -> Arc<SessionInfo> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        // Random positive pids, unique among live sessions.
        let pid = loop {
            let p = (rand::random::<u32>() >> 1) as i32;
            if p != 0 && !map.contains_key(&p) {
                break p;
            }
        };
        let info = Arc::new(SessionInfo {
            id,
            proxy_key: (pid, rand::random::<i32>()),
            user: s.user,
            database: s.database,
            application_name: s.application_name,
            peer: s.peer,
            startup: s.startup,
            status: AtomicU8::new(s.status.byte()),
            busy: AtomicBool::new(false),
            backend: ArcSwap::from_pointee(s.backend),
            wake: Wake::default(),
            kill_message: Mutex::new(None),
            moving: MoveSlot::default(),
            closed: AtomicBool::new(false),
            runtime: tokio::runtime::Handle::try_current().ok(),
        });
        map.insert(pid, info.clone());
        info
    }

    pub(crate) fn remove(&self, pid: i32) {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = map.remove(&pid) {
            s.closed.store(true, Ordering::SeqCst);
        }
        if map.is_empty() {
            self.emptied.notify_waiters();
        }
        drop(map);
        self.changed.notify_waiters();
    }

    /// Tells [`wait_changed`](Self::wait_changed) waiters a session moved.
    pub(crate) fn note_changed(&self) {
        self.changed.notify_waiters();
    }

    /// Resolves at the next [`note_changed`](Self::note_changed) (enable it
    /// before checking what it guards).
    pub(crate) fn changed(&self) -> tokio::sync::futures::Notified<'_> {
        self.changed.notified()
    }

    /// Resolves when `done` holds, re-checked whenever a session leaves or
    /// moves; false if `timeout` passes first.
    pub(crate) async fn wait_changed_until(
        &self,
        timeout: std::time::Duration,
        mut done: impl FnMut() -> bool,
    ) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let n = self.changed.notified();
            tokio::pin!(n);
            n.as_mut().enable();
            if done() {
                return true;
            }
            if tokio::time::timeout_at(deadline, n).await.is_err() {
                return done();
            }
        }
    }

    /// The session a client's CancelRequest names, if the secret matches.
    pub(crate) fn lookup_cancel(&self, pid: i32, secret: i32) -> Option<Arc<SessionInfo>> {
        let map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        map.get(&pid).filter(|s| s.proxy_key.1 == secret).cloned()
    }

    pub fn len(&self) -> usize {
        self.map.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Some session is staging its move (see [`super::moving::MoveState`]).
    pub(crate) fn any_staging(&self) -> bool {
        let map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        map.values().any(|s| s.moving.is_staging())
    }

    /// Every live session.
    pub fn sessions(&self) -> Vec<Arc<SessionInfo>> {
        let map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<_> = map.values().cloned().collect();
        v.sort_by_key(|s| s.id);
        v
    }

    pub fn snapshot(&self) -> Vec<SessionSnapshot> {
        self.sessions().iter().map(|s| s.snapshot()).collect()
    }

    /// Asks every session to look at shared state again.
    pub(crate) fn wake_all(&self) {
        let map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        for s in map.values() {
            s.wake.notify();
        }
    }

    /// Resolves when no session is registered.
    pub(crate) async fn wait_empty(&self) {
        loop {
            let n = self.emptied.notified();
            tokio::pin!(n);
            n.as_mut().enable();
            if self.is_empty() {
                return;
            }
            n.await;
        }
    }
}
