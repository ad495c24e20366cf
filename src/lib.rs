//! pgshift: move a live PostgreSQL database to another server with a write
//! pause of well under a second. See `../shared/DESIGN.md` for the map.

pub mod admin;
pub mod config;
pub mod context;
pub mod db;
pub mod pgbin;
pub mod proxy;
pub mod replication;
pub mod run;
pub mod schema;
pub mod verify;
pub mod wire;

pub use config::Config;
pub use context::Context;
