//! `pgshift run`: bind every listener first (so a bad config or a port in use
//! fails before anything starts), then start the parts and wait for a signal.

use std::path::Path;
use std::sync::Arc;

use thiserror::Error;
use tokio::net::TcpListener;

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
}

/// Binds `addr`, naming the config key when that fails.
pub async fn bind(key: &str, addr: std::net::SocketAddr) -> Result<TcpListener, ConfigError> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| ConfigError::invalid(key, format!("cannot listen on {addr}: {e}")))
}

pub async fn run(path: &Path) -> Result<u8, RunError> {
    let config = Config::load(path)?;
    // Bind both ports before anything starts, so a port in use refuses the
    // start cleanly and names its key.
    let proxy_listener = bind("proxy.listen", config.proxy_listen).await?;
    let admin_listener = bind("admin.listen", config.admin_listen).await?;
    let ctx = Context::new(config);
    let proxy = crate::proxy::Proxy::build(ctx.clone())?;
    let router = crate::admin::base_router(ctx.clone());
    let admin = tokio::spawn(crate::admin::serve(admin_listener, router, ctx.clone()));
    // On SIGTERM the proxy task stops accepting and drains for proxy.shutdown_timeout.
    let proxy_task = proxy.serve(proxy_listener);
    wait_for_signal(&ctx).await;
    let _ = proxy_task.await;
    let _ = admin.await;
    tracing::info!("pgshift stopped");
    Ok(0)
}

/// Resolves on SIGTERM or SIGINT and cancels the context's shutdown token.
pub async fn wait_for_signal(ctx: &Arc<Context>) {
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
