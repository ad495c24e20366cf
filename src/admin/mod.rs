//! The admin HTTP API: `/metrics` (Prometheus), `/healthz`, `/status`, and
//! the POST endpoints that drive the migration.

pub mod metrics;
pub mod status;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::net::TcpListener;

use crate::context::Context;

/// Builds the router with the endpoints every pgshift has; parts merge their own.
pub fn base_router(ctx: Arc<Context>) -> Router {
    Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/status", get(status_handler))
        .with_state(ctx)
}

async fn metrics_handler(State(ctx): State<Arc<Context>>) -> impl IntoResponse {
    match metrics::render(&ctx.registry) {
        Ok(body) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            body,
        )
            .into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot render metrics: {e}\n"),
        )
            .into_response(),
    }
}

async fn status_handler(State(ctx): State<Arc<Context>>) -> impl IntoResponse {
    axum::Json(ctx.status.render())
}

/// Serves `router` on an already bound listener until shutdown.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    ctx: Arc<Context>,
) -> std::io::Result<()> {
    let addr: Option<SocketAddr> = listener.local_addr().ok();
    tracing::info!(?addr, "admin API listening");
    let shutdown = ctx.shutdown.clone();
    axum::serve(listener, router)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}
