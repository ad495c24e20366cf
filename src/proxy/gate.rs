//! The pause gate. Closed, it holds each idle session's next request while
//! sessions inside a transaction run on to their end; it counts those so the
//! cutover can wait for zero.
//!
//! A session "inside a transaction" is one that has passed the gate with a
//! request and has not yet seen ReadyForQuery('I') for all of it: an open
//! explicit transaction, or a single statement still running. Entering
//! increments the count before checking the gate and closing sets the flag
//! before reading the count (both SeqCst), so a session either sees the gate
//! closed or is seen by the drain — never neither.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};

use std::sync::Arc;

use prometheus::IntGauge;
use tokio::sync::{Notify, watch};

use super::sessions::Registry;

pub struct Gate {
    closed: AtomicBool,
    open_tx: watch::Sender<bool>,
    sessions: Arc<Registry>,
    active: AtomicUsize,
    drained: Notify,
    waiting: AtomicUsize,
    in_tx_gauge: IntGauge,
    paused_gauge: IntGauge,
    waiting_gauge: IntGauge,
}

impl Gate {
    pub(crate) fn new(
        sessions: Arc<Registry>,
        in_tx_gauge: IntGauge,
        paused_gauge: IntGauge,
        waiting_gauge: IntGauge,
    ) -> Gate {
        Gate {
            closed: AtomicBool::new(false),
            open_tx: watch::Sender::new(true),
            sessions,
            active: AtomicUsize::new(0),
            drained: Notify::new(),
            waiting: AtomicUsize::new(0),
            in_tx_gauge,
            paused_gauge,
            waiting_gauge,
        }
    }

    /// Holds every idle session's next request from now on.
    pub fn close(&self) {
        self.closed.store(true, SeqCst);
        self.open_tx.send_replace(false);
        self.paused_gauge.set(1);
        // Wakes idle sessions so they stage their move (replay their state
        // on the pre-warmed backend) while the gate holds them.
        self.sessions.wake_all();
        tracing::info!("proxy pause gate closed");
    }

    /// Lets held requests run (on the route current at that moment).
    pub fn open(&self) {
        self.closed.store(false, SeqCst);
        self.open_tx.send_replace(true);
        self.paused_gauge.set(0);
        // Wakes idle sessions so they move to a swapped route right away.
        self.sessions.wake_all();
        tracing::info!("proxy pause gate opened");
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(SeqCst)
    }

    /// Sessions inside a transaction (or with a request in flight).
    pub fn sessions_in_transaction(&self) -> usize {
        self.active.load(SeqCst)
    }

    /// Sessions whose next request is being held by the closed gate.
    pub fn waiting_sessions(&self) -> usize {
        self.waiting.load(SeqCst)
    }

    /// Resolves when no session is inside a transaction. With the gate closed
    /// this is the drain; put a timeout around it.
    pub async fn drained(&self) {
        loop {
            let notified = self.drained.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.active.load(SeqCst) == 0 {
                return;
            }
            notified.await;
        }
    }

    /// Counts the session in, unless the gate is closed.
    pub(crate) fn try_enter(&self) -> bool {
        self.active.fetch_add(1, SeqCst);
        if self.closed.load(SeqCst) {
            self.uncount();
            return false;
        }
        // inc/dec (not set) so concurrent updates never leave a stale value.
        self.in_tx_gauge.inc();
        true
    }

    /// The session reached a transaction boundary (or ended inside one).
    pub(crate) fn leave(&self) {
        self.in_tx_gauge.dec();
        self.uncount();
    }

    fn uncount(&self) {
        if self.active.fetch_sub(1, SeqCst) == 1 {
            self.drained.notify_waiters();
        }
    }

    /// Resolves once the gate is open (not counted as a held session).
    pub(crate) async fn opened(&self) {
        let mut rx = self.open_tx.subscribe();
        let _ = rx.wait_for(|open| *open).await;
    }

    /// Waits until the gate is open (it may close again before the caller enters).
    pub(crate) async fn wait_open(&self) {
        let _counted = Waiting::new(self);
        let mut rx = self.open_tx.subscribe();
        let _ = rx.wait_for(|open| *open).await;
    }
}

/// Counts a held session; decrements even when the wait is abandoned.
struct Waiting<'a>(&'a Gate);

impl<'a> Waiting<'a> {
    fn new(g: &'a Gate) -> Self {
        g.waiting_gauge
            .set(g.waiting.fetch_add(1, SeqCst) as i64 + 1);
        Waiting(g)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let g = self.0;
        g.waiting_gauge
            .set(g.waiting.fetch_sub(1, SeqCst) as i64 - 1);
    }
}
