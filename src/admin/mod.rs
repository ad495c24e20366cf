//! The admin HTTP API: `/metrics` (Prometheus), `/healthz`, `/status`, and
//! the POST endpoints that drive the migration.

pub mod client;
pub mod commands;
pub mod metrics;
pub mod status;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use tokio::net::TcpListener;

use crate::context::Context;

/// Builds the router with the endpoints every pgshift has; parts merge their own.
pub fn base_router(ctx: Arc<Context>) -> Router {
    Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/status", get(status_handler))
        .route("/cutover", post(cutover_handler))
        .route("/cancel", post(cancel_handler))
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

async fn cutover_handler(
    State(ctx): State<Arc<Context>>,
    headers: HeaderMap,
) -> axum::response::Response {
    command(&ctx, &headers, commands::CommandKind::Cutover).await
}

async fn cancel_handler(
    State(ctx): State<Arc<Context>>,
    headers: HeaderMap,
) -> axum::response::Response {
    command(&ctx, &headers, commands::CommandKind::Cancel).await
}

/// Checks the bearer token (when `[admin].token` is set) and hands the
/// command to the migration runner.
async fn command(
    ctx: &Arc<Context>,
    headers: &HeaderMap,
    kind: commands::CommandKind,
) -> axum::response::Response {
    use axum::Json;
    use serde_json::json;
    if let Some(token) = &ctx.config.file.admin.token {
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if !crate::wire::auth::constant_time_eq(given.as_bytes(), token.expose().as_bytes()) {
            return (
                StatusCode::UNAUTHORIZED,
                Json(json!({"error": "a valid bearer token is required (Authorization: Bearer <[admin].token>)"})),
            )
                .into_response();
        }
    }
    let Some(tx) = ctx.commands.get() else {
        return (
            StatusCode::CONFLICT,
            Json(json!({"error": "no migration is configured in this pgshift ([migration] section)"})),
        )
            .into_response();
    };
    let (reply, rx) = tokio::sync::oneshot::channel();
    if tx
        .send(commands::AdminCommand { kind, reply })
        .await
        .is_err()
    {
        return (
            StatusCode::CONFLICT,
            Json(json!({"error": "the migration is no longer running"})),
        )
            .into_response();
    }
    match rx.await {
        Ok(Ok(v)) => (StatusCode::OK, Json(v)).into_response(),
        Ok(Err(commands::CommandError::Conflict(m))) => {
            (StatusCode::CONFLICT, Json(json!({"error": m}))).into_response()
        }
        Ok(Err(commands::CommandError::Failed(m))) => {
            (StatusCode::INTERNAL_SERVER_ERROR, Json(json!({"error": m}))).into_response()
        }
        Err(_) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            Json(json!({"error": "the migration runner stopped"})),
        )
            .into_response(),
    }
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
