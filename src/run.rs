//! `pgshift run`: bind every listener first (so a bad config or a port in use
//! fails before anything starts), then start the parts and wait for a signal.

use std::path::Path;
use std::sync::Arc;

use thiserror::Error;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::config::{Config, ConfigError};
use crate::context::Context;

#[derive(Debug, Error)]
pub enum RunError {
    #[error("{0}")]
    Config(#[from] ConfigError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Proxy(#[from] crate::proxy::ProxyError),
    #[error("{0}")]
    Migration(#[from] crate::migration::ControlError),
}

/// Binds `addr`, naming the config key when that fails.
pub async fn bind(key: &str, addr: std::net::SocketAddr) -> Result<TcpListener, ConfigError> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| ConfigError::invalid(key, format!("cannot listen on {addr}: {e}")))
}

/// The parts of a running pgshift.
pub struct Running {
    pub ctx: Arc<Context>,
    pub proxy: crate::proxy::ProxyHandle,
    /// This process's membership of its migration's fleet (None: a plain proxy).
    pub fleet: Option<Arc<crate::fleet::Fleet>>,
    proxy_task: Option<JoinHandle<()>>,
    unix_task: Option<JoinHandle<()>>,
    admin_task: JoinHandle<std::io::Result<()>>,
    fleet_tasks: Option<crate::fleet::FleetTasks>,
}

impl Running {
    /// Stops everything: the proxy drains open transactions
    /// (`proxy.shutdown_timeout`), the migration stops its streams.
    pub async fn shutdown(self) {
        self.ctx.shutdown.cancel();
        if let Some(p) = self.proxy_task {
            let _ = p.await;
        }
        if let Some(u) = self.unix_task {
            let _ = u.await;
        }
        // The member leaves the fleet after its sessions have drained, so
        // a cutover never counts on a member that is going.
        if let Some(f) = self.fleet_tasks {
            f.join().await;
        }
        let _ = self.admin_task.await;
        tracing::info!("pgshift stopped");
    }
}

/// Starts pgshift from a resolved config: both ports (and the proxy's Unix
/// socket) are bound before anything starts, so a port in use refuses the
/// start cleanly and names its key; the migration's persisted state is read before the proxy serves, so
/// a switched migration routes to the target from the first connection.
pub async fn start(config: Config) -> Result<Running, RunError> {
    // A replication-only fleet member serves no clients.
    let serves = config.migration().is_none() || config.fleet().role.serves_proxy();
    let proxy_listener = if serves {
        Some(bind("proxy.listen", config.proxy_listen).await?)
    } else {
        None
    };
    let admin_listener = bind("admin.listen", config.admin_listen).await?;
    // Named after the port the proxy listens on (the one bound, should the
    // config ask for any free port).
    let unix_socket = match (&config.proxy().unix_socket_dir, &proxy_listener) {
        (Some(dir), Some(l)) => Some(
            crate::proxy::UnixSocket::bind(dir, l.local_addr()?.port())
                .map_err(crate::proxy::ProxyError::from)?,
        ),
        _ => None,
    };
    let ctx = Context::new(config);
    let proxy = crate::proxy::Proxy::build(ctx.clone())?;
    let p = proxy.clone();
    ctx.status.register("proxy", Arc::new(move || p.status()));
    let (fleet, fleet_tasks) = match crate::fleet::Fleet::start(&ctx, &proxy).await? {
        Some((f, t)) => (Some(f), Some(t)),
        None => (None, None),
    };
    let router = crate::admin::base_router(ctx.clone());
    let admin_task = tokio::spawn(crate::admin::serve(admin_listener, router, ctx.clone()));
    // On shutdown the proxy task stops accepting and drains for proxy.shutdown_timeout.
    let proxy_task = proxy_listener.map(|l| proxy.serve(l));
    let unix_task = unix_socket.map(|s| proxy.serve_unix(s));
    Ok(Running {
        ctx,
        proxy,
        fleet,
        proxy_task,
        unix_task,
        admin_task,
        fleet_tasks,
    })
}

pub async fn run(path: &Path) -> Result<u8, RunError> {
    let config = Config::load(path)?;
    let running = start(config).await?;
    wait_for_signal(&running.ctx).await;
    running.shutdown().await;
    Ok(0)
}

/// Resolves on SIGTERM or SIGINT and cancels the context's shutdown token.
async fn wait_for_signal(ctx: &Arc<Context>) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("cannot install SIGTERM handler: {e}");
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received, shutting down"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received, shutting down"),
        _ = ctx.shutdown.cancelled() => {}
    }
    ctx.shutdown.cancel();
}
