//! The shared context every long-running part receives as an `Arc<Context>`.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::commands::CommandSender;
use crate::config::Config;
use crate::telemetry::status::StatusBoard;

pub struct Context {
    pub config: Config,
    /// Every pgshift metric is registered here; `/metrics` renders it.
    pub registry: prometheus::Registry,
    /// Cancelled on SIGTERM / SIGINT: parts stop accepting work and wind down.
    pub shutdown: CancellationToken,
    /// Providers behind `GET /status`.
    pub status: StatusBoard,
    /// Where `POST /cutover` and `/cancel` go; set by the migration runner.
    pub commands: std::sync::OnceLock<CommandSender>,
}

impl Context {
    pub fn new(config: Config) -> Arc<Context> {
        Arc::new(Context {
            config,
            registry: prometheus::Registry::new(),
            shutdown: CancellationToken::new(),
            status: StatusBoard::default(),
            commands: std::sync::OnceLock::new(),
        })
    }
}
