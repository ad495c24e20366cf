//! Relay threads. Sessions run on their own single-threaded runtimes, apart
//! from the rest of pgshift (replication, admin): a relayed round trip is a
//! few socket calls, and on a work-stealing scheduler the wake-ups between
//! threads (futex calls, tasks moving between cores) cost as much again.
//! Like PgBouncer's event loop, each relay thread polls its own sockets and
//! runs its sessions to completion; sessions are dealt out round-robin.

use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::runtime::Handle;
use tokio::sync::oneshot;

/// The relay threads; they stop when this is dropped (dropping the sessions
/// still on them).
pub(crate) struct Workers {
    handles: Vec<Handle>,
    next: AtomicUsize,
    /// Dropping a sender ends its thread's runtime.
    _stop: Vec<oneshot::Sender<()>>,
}

impl Workers {
    /// Starts `n` (at least one) relay threads.
    pub(crate) fn start(n: usize) -> std::io::Result<Workers> {
        let mut handles = Vec::new();
        let mut stop = Vec::new();
        for i in 0..n.max(1) {
            // I/O and timers only: the signal and process drivers would be
            // polled at every turn for nothing.
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_io()
                .enable_time()
                .build()?;
            handles.push(rt.handle().clone());
            let (tx, rx) = oneshot::channel::<()>();
            stop.push(tx);
            std::thread::Builder::new()
                .name(format!("pgshift-relay-{i}"))
                .spawn(move || {
                    rt.block_on(async {
                        let _ = rx.await;
                    });
                })?;
        }
        Ok(Workers {
            handles,
            next: AtomicUsize::new(0),
            _stop: stop,
        })
    }

    /// The thread the next session runs on.
    pub(crate) fn next(&self) -> &Handle {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.handles.len();
        &self.handles[i]
    }
}
