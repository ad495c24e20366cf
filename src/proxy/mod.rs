//! The proxy: listener, one task per client session, backend connections,
//! the route (`ArcSwap`), the pause gate, cancel-key mapping, TLS.
//!
//! [`Proxy::build`] builds it from the context, [`ProxyHandle::serve`] runs it
//! on a bound listener. The cutover holds a [`ProxyHandle`] and uses
//! [`ProxyHandle::gate`], [`ProxyHandle::prewarm`] (before closing the gate),
//! [`ProxyHandle::switch_to`] (swap the route, wait for sessions to move) and
//! [`ProxyHandle::sessions`].

pub(crate) mod admission;
pub(crate) mod auth;
mod backend;
mod cancel;
mod gate;
mod incident;
mod listener;
mod metrics;
mod moving;
pub(crate) mod route;
pub(crate) mod scan;
mod session;
mod sessions;
pub(crate) mod sqltext;
pub mod unix;
mod workers;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use thiserror::Error;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_rustls::rustls;
use tokio_util::sync::CancellationToken;

pub use admission::Peer;
pub(crate) use gate::Gate;
pub(crate) use metrics::ProxyMetrics;
pub use route::Route;
pub(crate) use route::Router;
pub use sessions::Registry;
pub(crate) use sessions::SessionInfo;
pub use unix::{UnixSocket, UnixSocketError};

use crate::config::ConfigError;
use crate::context::Context;

#[derive(Debug, Error)]
pub enum ProxyError {
    #[error("{0}")]
    Config(#[from] ConfigError),
    #[error("cannot start the proxy's relay threads: {0}")]
    Threads(std::io::Error),
    #[error("{0}")]
    UnixSocket(#[from] UnixSocketError),
}

/// Limits from `[proxy]`, resolved once.
#[derive(Clone, Debug)]
pub(crate) struct Limits {
    pub(crate) max_clients: usize,
    pub(crate) max_message_size: usize,
    pub(crate) startup_timeout: Duration,
    pub(crate) connect_timeout: Duration,
    pub(crate) shutdown_timeout: Duration,
}

impl Shared {
    /// The proxy is shutting down (see [`Shared::draining`]).
    pub(crate) fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }
}

/// State shared by the listener and every session.
pub(crate) struct Shared {
    pub(crate) ctx: Arc<Context>,
    pub(crate) users: auth::Users,
    pub(crate) tls: Option<Arc<rustls::ServerConfig>>,
    pub(crate) router: Router,
    pub(crate) gate: Gate,
    pub(crate) sessions: Arc<Registry>,
    pub(crate) metrics: ProxyMetrics,
    pub(crate) limits: Limits,
    /// Client sessions holding a place under `max_client_connections`.
    pub(crate) clients: AtomicUsize,
    /// Connections still in startup or authentication.
    pub(crate) startup_slots: Arc<admission::StartupSlots>,
    pub(crate) stop_accepting: CancellationToken,
    /// Shutdown: idle sessions close, busy ones at their next boundary. An
    /// atomic, not a CancellationToken (whose check takes a lock shared by
    /// every session): the relay reads it at every transaction boundary.
    pub(crate) draining: AtomicBool,
    /// Shutdown timeout passed: every session closes now.
    pub(crate) kill: CancellationToken,
    /// Sessions that could not move to a new route and were closed.
    pub(crate) moves_failed: std::sync::atomic::AtomicU64,
    /// The route backends are being pre-warmed for (see [`moving::prewarm`]).
    pub(crate) prewarm: arc_swap::ArcSwapOption<Route>,
    /// The threads sessions run on.
    pub(crate) workers: workers::Workers,
    /// Old backends being closed after a switch (see `moving::swap`).
    pub(crate) retiring: tokio::sync::Semaphore,
}

pub struct Proxy;

/// `proxy.relay_threads`, 0 meaning one per core.
fn relay_threads(configured: usize) -> usize {
    if configured > 0 {
        return configured;
    }
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

impl Proxy {
    /// Builds the proxy from `ctx.config`: SCRAM verifiers, TLS, metrics, and
    /// the initial route (the source).
    pub fn build(ctx: Arc<Context>) -> Result<ProxyHandle, ProxyError> {
        let cfg = ctx.config.proxy();
        let tls = match (&cfg.tls_cert, &cfg.tls_key) {
            (Some(cert), Some(key)) => Some(
                crate::wire::tls::server_config(cert, key)
                    .map_err(|e| ConfigError::invalid("proxy.tls_cert", e.to_string()))?,
            ),
            _ => None,
        };
        let metrics = ProxyMetrics::register(&ctx.registry);
        let sessions = Arc::new(Registry::default());
        let limits = Limits {
            max_clients: cfg.max_client_connections,
            max_message_size: usize::try_from(cfg.max_message_size.0).unwrap_or(usize::MAX),
            startup_timeout: cfg.startup_timeout.0,
            connect_timeout: cfg.server_connect_timeout.0,
            shutdown_timeout: cfg.shutdown_timeout.0,
        };
        let shared = Shared {
            users: auth::Users::new(cfg.auth, &cfg.users),
            tls,
            router: Router::new(
                Route::from_endpoint("source", &ctx.config.source),
                sessions.clone(),
            ),
            gate: Gate::new(
                sessions.clone(),
                metrics.sessions_in_transaction.clone(),
                metrics.paused.clone(),
                metrics.pause_waiting_sessions.clone(),
            ),
            sessions,
            metrics,
            limits,
            clients: AtomicUsize::new(0),
            startup_slots: admission::StartupSlots::new(
                cfg.max_startup_connections,
                cfg.max_startup_connections_per_address,
            ),
            stop_accepting: CancellationToken::new(),
            draining: AtomicBool::new(false),
            kill: CancellationToken::new(),
            moves_failed: std::sync::atomic::AtomicU64::new(0),
            prewarm: arc_swap::ArcSwapOption::empty(),
            retiring: tokio::sync::Semaphore::new(moving::RETIRE_AT_ONCE),
            workers: workers::Workers::start(relay_threads(cfg.relay_threads))
                .map_err(ProxyError::Threads)?,
            ctx,
        };
        Ok(ProxyHandle {
            shared: Arc::new(shared),
        })
    }

    /// Builds the proxy and serves it on `listener`.
    pub fn start(
        ctx: Arc<Context>,
        listener: TcpListener,
    ) -> Result<(ProxyHandle, JoinHandle<()>), ProxyError> {
        let h = Proxy::build(ctx)?;
        let task = h.serve(listener);
        Ok((h, task))
    }
}

/// What the rest of pgshift holds to steer the proxy. Cheap to clone.
#[derive(Clone)]
pub struct ProxyHandle {
    shared: Arc<Shared>,
}

impl ProxyHandle {
    /// Accepts clients on `listener`. The task ends after the proxy has shut
    /// down: on [`shutdown`](Self::shutdown) or when the context's shutdown
    /// token fires (then it drains for `proxy.shutdown_timeout` first).
    pub(crate) fn serve(&self, listener: TcpListener) -> JoinHandle<()> {
        if let Ok(addr) = listener.local_addr() {
            tracing::info!(%addr, "proxy listening");
        }
        let shared = self.shared.clone();
        let handle = self.clone();
        tokio::spawn(async move {
            listener::accept_loop(shared.clone(), listener).await;
            if shared.ctx.shutdown.is_cancelled() {
                handle.shutdown(shared.limits.shutdown_timeout).await;
            }
        })
    }

    /// Accepts clients on the Unix-domain socket too (see [`unix`]); the
    /// task ends when the proxy stops accepting, removing the socket file.
    pub fn serve_unix(&self, socket: UnixSocket) -> JoinHandle<()> {
        tokio::spawn(listener::accept_unix_loop(self.shared.clone(), socket))
    }

    pub fn router(&self) -> &Router {
        &self.shared.router
    }

    pub fn gate(&self) -> &Gate {
        &self.shared.gate
    }

    pub fn sessions(&self) -> &Registry {
        &self.shared.sessions
    }

    pub fn metrics(&self) -> &ProxyMetrics {
        &self.shared.metrics
    }

    /// Sessions that could not move to a new route and were closed, so far.
    pub fn moves_failed(&self) -> u64 {
        self.shared
            .moves_failed
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Opens, for every live session (and every session that connects until
    /// the switch), a backend on `route` with the session's user, database
    /// and startup parameters, parked until the session moves there. Call
    /// before closing the gate: the pause then pays only for replaying
    /// session state. Returns how many backends are parked.
    pub async fn prewarm(&self, route: Route) -> usize {
        moving::prewarm::all(&self.shared, route).await
    }

    /// Closes the parked backends (the switch will not happen). Returns how many.
    pub fn discard_prewarm(&self) -> usize {
        moving::prewarm::discard_all(&self.shared)
    }

    /// Swaps the route to `route` and waits (at most `timeout`) until every
    /// live session is on it or closed; the gate may stay closed meanwhile
    /// (idle sessions move without passing it). Returns (moved, dropped):
    /// sessions now on the new route, and sessions closed because they could
    /// not move (also counted by [`moves_failed`](Self::moves_failed)).
    pub async fn switch_to(&self, route: Route, timeout: Duration) -> (u64, u64) {
        let failed_before = self.moves_failed();
        self.shared.router.swap(route);
        let new = self.shared.router.current();
        let live = self.shared.sessions.sessions();
        let on_new = |s: &SessionInfo| Arc::ptr_eq(&s.backend().route, &new);
        let settled = self
            .shared
            .sessions
            .wait_changed_until(timeout, || live.iter().all(|s| s.is_closed() || on_new(s)))
            .await;
        // Sessions connecting from now on start on the new route.
        self.shared.prewarm.store(None);
        let moved = live.iter().filter(|s| on_new(s)).count() as u64;
        let dropped = self.moves_failed() - failed_before;
        if !settled {
            let pending = live.iter().filter(|s| !s.is_closed() && !on_new(s)).count();
            tracing::warn!(
                pending,
                "sessions still on the old route after {timeout:?}: they move at their next request"
            );
        }
        (moved, dropped)
    }

    /// Resolves true once no session is inside a transaction or staging its
    /// move (see `moving::stage`), false if `timeout` passes first.
    pub async fn wait_quiet(&self, timeout: Duration) -> bool {
        let (gate, sessions) = (&self.shared.gate, &self.shared.sessions);
        let quiet = || gate.sessions_in_transaction() == 0 && !sessions.any_staging();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            // A staging that ends notifies `changed`; the last transaction
            // that ends, `drained`.
            let changed = sessions.changed();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if quiet() {
                return true;
            }
            let woke = if gate.sessions_in_transaction() == 0 {
                tokio::time::timeout_at(deadline, changed).await.is_ok()
            } else {
                tokio::select! {
                    _ = gate.drained() => true,
                    _ = changed => true,
                    _ = tokio::time::sleep_until(deadline) => false,
                }
            };
            if !woke {
                return quiet();
            }
        }
    }

    /// Cancels the running query of every session inside a transaction or
    /// request (as a client's CancelRequest would). Returns how many.
    pub(crate) async fn cancel_busy_sessions(&self) -> usize {
        let busy: Vec<_> = self
            .sessions()
            .sessions()
            .into_iter()
            .filter(|s| s.busy())
            .collect();
        for s in &busy {
            let b = s.backend();
            let opts = backend::connect_options(&self.shared, &b.route);
            if let Err(e) = crate::wire::connect::send_cancel(&opts, b.pid, b.secret).await {
                tracing::warn!(session = s.id, "cannot cancel the running query: {e}");
            }
        }
        busy.len()
    }

    /// Closes every session still inside a transaction or request, with an
    /// ErrorResponse carrying `message`; their transactions roll back.
    pub(crate) fn terminate_busy_sessions(&self, message: &str) -> usize {
        let busy: Vec<_> = self
            .sessions()
            .sessions()
            .into_iter()
            .filter(|s| s.busy())
            .collect();
        for s in &busy {
            s.terminate(message);
        }
        busy.len()
    }

    /// Source backends of the live sessions (the fence spares them).
    pub fn source_backend_pids(&self) -> Vec<i32> {
        self.backend_pids("source")
    }

    /// Backends of the live sessions on the route named `route` ("source"
    /// or "target": a rollback fences the target and spares these).
    pub fn backend_pids(&self, route: &str) -> Vec<i32> {
        self.sessions()
            .sessions()
            .iter()
            .map(|s| s.backend())
            .filter(|b| b.route.name == route)
            .map(|b| b.pid)
            .collect()
    }

    /// Closes every session with an ErrorResponse carrying `message`.
    pub(crate) fn terminate_all(&self, message: &str) -> usize {
        let all = self.sessions().sessions();
        for s in &all {
            s.terminate(message);
        }
        all.len()
    }

    /// What `/status` shows under `proxy`.
    pub fn status(&self) -> serde_json::Value {
        let gate = self.gate();
        serde_json::json!({
            "route": self.router().current().name,
            "sessions": self.sessions().len(),
            "sessions_in_transaction": gate.sessions_in_transaction(),
            "paused": gate.is_closed(),
            "waiting_at_gate": gate.waiting_sessions(),
            "sessions_dropped_on_move": self.moves_failed(),
        })
    }

    /// Stops accepting, closes idle sessions, lets open transactions finish
    /// within `timeout`, then closes the rest. Returns how many sessions
    /// had to be cut off.
    pub async fn shutdown(&self, timeout: Duration) -> usize {
        let s = &self.shared;
        s.stop_accepting.cancel();
        s.draining.store(true, Ordering::SeqCst);
        s.sessions.wake_all();
        tracing::info!(
            sessions = s.sessions.len(),
            in_transaction = s.gate.sessions_in_transaction(),
            "proxy draining: waiting up to {timeout:?} for open transactions"
        );
        if tokio::time::timeout(timeout, s.sessions.wait_empty())
            .await
            .is_ok()
        {
            tracing::info!("proxy drained");
            return 0;
        }
        let left = s.sessions.len();
        tracing::warn!(
            sessions = left,
            "shutdown timeout passed: closing the remaining sessions"
        );
        s.kill.cancel();
        s.sessions.wake_all();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.sessions.wait_empty()).await;
        left
    }
}
