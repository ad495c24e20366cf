//! The proxy's Prometheus metrics. Sessions count locally and flush at
//! transaction boundaries, so the per-message path touches no shared counter.

use prometheus::{Histogram, IntCounter, IntCounterVec, IntGauge, Registry};

use crate::telemetry::metrics as m;

#[derive(Clone)]
pub struct ProxyMetrics {
    pub client_connections: IntGauge,
    pub client_connections_total: IntCounter,
    pub transactions_total: IntCounter,
    pub queries_total: IntCounter,
    pub bytes_client_to_server: IntCounter,
    pub bytes_server_to_client: IntCounter,
    pub errors: IntCounterVec,
    pub sessions_in_transaction: IntGauge,
    pub paused: IntGauge,
    pub pause_waiting_sessions: IntGauge,
    /// Sessions moved to a new route, by result (moved, dropped).
    pub session_moves: IntCounterVec,
    pub session_move_seconds: Histogram,
    /// Pre-warmed backends by result (opened, used, failed, discarded).
    pub prewarmed: IntCounterVec,
}

impl ProxyMetrics {
    pub fn register(reg: &Registry) -> ProxyMetrics {
        let bytes = m::int_counter_vec(
            reg,
            "pgshift_proxy_bytes_total",
            "Bytes relayed by the proxy, by direction",
            &["direction"],
        );
        ProxyMetrics {
            client_connections: m::int_gauge(
                reg,
                "pgshift_proxy_client_connections",
                "Client sessions currently open through the proxy",
            ),
            client_connections_total: m::int_counter(
                reg,
                "pgshift_proxy_client_connections_total",
                "Client connections accepted by the proxy (including cancel requests)",
            ),
            transactions_total: m::int_counter(
                reg,
                "pgshift_proxy_transactions_total",
                "Transactions completed through the proxy (ReadyForQuery 'I')",
            ),
            queries_total: m::int_counter(
                reg,
                "pgshift_proxy_queries_total",
                "Queries relayed (simple Query and extended Execute messages)",
            ),
            bytes_client_to_server: bytes.with_label_values(&["client_to_server"]),
            bytes_server_to_client: bytes.with_label_values(&["server_to_client"]),
            errors: m::int_counter_vec(
                reg,
                "pgshift_proxy_errors_total",
                "Proxy errors by kind (auth, protocol, too_large, startup_timeout, backend_connect, server_lost, client_lost, limit, tls, cancel)",
                &["kind"],
            ),
            sessions_in_transaction: m::int_gauge(
                reg,
                "pgshift_proxy_sessions_in_transaction",
                "Sessions inside a transaction or with a request in flight",
            ),
            paused: m::int_gauge(
                reg,
                "pgshift_proxy_paused",
                "1 while the pause gate is closed, else 0",
            ),
            pause_waiting_sessions: m::int_gauge(
                reg,
                "pgshift_proxy_pause_waiting_sessions",
                "Sessions whose next request is held by the closed pause gate",
            ),
            session_moves: m::int_counter_vec(
                reg,
                "pgshift_proxy_session_moves_total",
                "Sessions moved to a new route with their state (moved) or closed because they could not move (dropped)",
                &["result"],
            ),
            session_move_seconds: m::histogram(
                reg,
                "pgshift_proxy_session_move_seconds",
                "Time to move one idle session: read its state, get a backend, replay, in seconds",
                vec![
                    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
                ],
            ),
            prewarmed: m::int_counter_vec(
                reg,
                "pgshift_proxy_prewarmed_backends_total",
                "Backends opened ahead of a route swap, by result (opened, used, failed, discarded)",
                &["result"],
            ),
        }
    }

    pub fn prewarm(&self, result: &str) {
        self.prewarmed.with_label_values(&[result]).inc();
    }

    pub fn error(&self, kind: &str) {
        self.errors.with_label_values(&[kind]).inc();
    }
}
