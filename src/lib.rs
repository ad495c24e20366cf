//! pgshift: move a live PostgreSQL database to another server with a write
//! pause of well under a second. See `../shared/DESIGN.md` for the map.

// Server errors carry their fields so they can be relayed to clients as is;
// the larger Err variant is cheaper than allocating on every error path.
#![allow(clippy::result_large_err)]

pub mod admin;
pub mod commands;
pub mod config;
pub mod context;
pub mod cutover;
pub mod db;
pub mod demo;
pub mod filter;
pub mod fleet;
#[doc(hidden)]
pub mod fuzzing;
pub mod localpg;
pub mod logging;
pub mod migration;
pub mod pg;
pub mod pgbin;
pub mod proxy;
pub mod replication;
pub mod run;
pub mod schema;
pub(crate) mod sqltext;
pub mod telemetry;
pub mod validate;
pub mod verify;
pub mod wire;

pub use config::Config;
pub use context::Context;
