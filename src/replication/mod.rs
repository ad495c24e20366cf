//! The replication engine: replication connection and slot, consistent
//! initial copy, pgoutput decoding, apply to the target, lag.

pub mod apply;
pub mod client;
pub mod copy;
pub mod ddl;
mod lsn;
pub mod marker;
pub mod names;
mod origin_filter;
pub mod pgoutput;
pub mod publication;
pub mod slot;
pub mod stream;

pub use lsn::{Lsn, ParseLsnError};
