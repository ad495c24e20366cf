//! The admin HTTP API: `/metrics` (Prometheus), `/healthz`, `/status`, and
//! the POST endpoints that drive the migration.
//!
//! Access fails closed: with `[admin].token` set, the POST endpoints and the
//! full `/status` need it as a bearer token; without one they are open only
//! when the API listens on a loopback address. Anyone else gets `/status`
//! without addresses, user names or error texts ([`status::redact`]).

pub mod client;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use tokio::net::TcpListener;

use crate::commands;
use crate::context::Context;
use crate::telemetry::{metrics, status};

/// Builds the router with the endpoints every pgshift has; parts merge their own.
pub(crate) fn base_router(ctx: Arc<Context>) -> Router {
    Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/status", get(status_handler))
        .route("/cutover", post(cutover_handler))
        .route("/cancel", post(cancel_handler))
        .route("/rollback", post(rollback_handler))
        .route("/complete", post(complete_handler))
        .route("/ddl/{action}", post(ddl_handler))
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

async fn status_handler(State(ctx): State<Arc<Context>>, headers: HeaderMap) -> impl IntoResponse {
    let doc = ctx.status.render();
    match access(&ctx, &headers) {
        Access::Granted => axum::Json(doc),
        Access::BadToken | Access::NoToken => axum::Json(status::redact(&doc)),
    }
}

/// What a request may do.
#[derive(Debug, PartialEq, Eq)]
enum Access {
    /// The right token, or no token configured and a loopback listener.
    Granted,
    /// A token is configured and the request does not carry it.
    BadToken,
    /// No token is configured and the API listens beyond loopback.
    NoToken,
}

fn access(ctx: &Context, headers: &HeaderMap) -> Access {
    let Some(token) = &ctx.config.file.admin.token else {
        return if ctx.config.admin_listen.ip().is_loopback() {
            Access::Granted
        } else {
            Access::NoToken
        };
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if crate::wire::auth::constant_time_eq(given.as_bytes(), token.expose().as_bytes()) {
        Access::Granted
    } else {
        Access::BadToken
    }
}

async fn cutover_handler(
    State(ctx): State<Arc<Context>>,
    headers: HeaderMap,
) -> axum::response::Response {
    command(&ctx, &headers, commands::CommandKind::Cutover).await
}

async fn rollback_handler(
    State(ctx): State<Arc<Context>>,
    headers: HeaderMap,
) -> axum::response::Response {
    command(&ctx, &headers, commands::CommandKind::Rollback).await
}

async fn complete_handler(
    State(ctx): State<Arc<Context>>,
    headers: HeaderMap,
) -> axum::response::Response {
    command(&ctx, &headers, commands::CommandKind::Complete).await
}

async fn cancel_handler(
    State(ctx): State<Arc<Context>>,
    headers: HeaderMap,
) -> axum::response::Response {
    command(&ctx, &headers, commands::CommandKind::Cancel).await
}

/// `POST /ddl/{skip,retry,apply}[?database=DB]`.
async fn ddl_handler(
    State(ctx): State<Arc<Context>>,
    axum::extract::Path(action): axum::extract::Path<String>,
    axum::extract::Query(q): axum::extract::Query<std::collections::HashMap<String, String>>,
    headers: HeaderMap,
) -> axum::response::Response {
    let Some(action) = commands::DdlAction::parse(&action) else {
        return (
            StatusCode::NOT_FOUND,
            axum::Json(
                serde_json::json!({"error": "unknown DDL action: use skip, retry or apply"}),
            ),
        )
            .into_response();
    };
    let database = q.get("database").cloned();
    command(
        &ctx,
        &headers,
        commands::CommandKind::Ddl { action, database },
    )
    .await
}

/// Checks access (see the module comment) and hands the command to the
/// migration runner.
async fn command(
    ctx: &Arc<Context>,
    headers: &HeaderMap,
    kind: commands::CommandKind,
) -> axum::response::Response {
    use axum::Json;
    use serde_json::json;
    match access(ctx, headers) {
        Access::Granted => {}
        Access::BadToken => {
            return (
                StatusCode::UNAUTHORIZED,
                Json(json!({"error": "a valid bearer token is required (Authorization: Bearer <[admin].token>)"})),
            )
                .into_response();
        }
        Access::NoToken => {
            return (
                StatusCode::FORBIDDEN,
                Json(json!({"error": "no [admin].token is configured and admin.listen is not a loopback address: \
                                      set a token (at least 16 bytes) to allow POST requests"})),
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

/// A client must send a whole request head within this.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Open admin connections at most; more are answered 503 and closed.
pub const MAX_CONNECTIONS: usize = 32;

/// Serves `router` on an already bound listener until shutdown: HTTP/1 with
/// a header-read timeout (also ending idle keep-alive connections) and at
/// most [`MAX_CONNECTIONS`] connections, so slow or idle clients cannot
/// hold the API.
pub(crate) async fn serve(
    listener: TcpListener,
    router: Router,
    ctx: Arc<Context>,
) -> std::io::Result<()> {
    let addr: Option<SocketAddr> = listener.local_addr().ok();
    tracing::info!(?addr, "admin API listening");
    let shutdown = ctx.shutdown.clone();
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let mut conns = tokio::task::JoinSet::new();
    loop {
        let tcp = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    tracing::warn!("admin API: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        while conns.try_join_next().is_some() {}
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            refuse_busy(&tcp);
            continue;
        };
        conns.spawn(serve_connection(
            tcp,
            router.clone(),
            shutdown.clone(),
            permit,
        ));
    }
    // Requests in flight get a moment to answer.
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while conns.join_next().await.is_some() {}
    })
    .await;
    Ok(())
}

async fn serve_connection(
    tcp: tokio::net::TcpStream,
    router: Router,
    shutdown: tokio_util::sync::CancellationToken,
    _permit: tokio::sync::OwnedSemaphorePermit,
) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    let service = hyper_util::service::TowerToHyperService::new(router);
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    let conn = builder.serve_connection(TokioIo::new(tcp), service);
    tokio::pin!(conn);
    let r = tokio::select! {
        r = conn.as_mut() => r,
        _ = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = r {
        tracing::debug!("admin API connection ended: {e}");
    }
}

/// Answers 503 without waiting for the request and closes.
fn refuse_busy(tcp: &tokio::net::TcpStream) {
    static LAST_WARNED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    if crate::logging::once_per(&LAST_WARNED, 10) {
        tracing::warn!("admin API: {MAX_CONNECTIONS} connections are open; refusing more");
    }
    let body = "{\"error\":\"too many admin API connections\"}";
    let resp = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    // A fresh socket's send buffer takes this at once; if not, closing says enough.
    let _ = tcp.try_write(resp.as_bytes());
}
