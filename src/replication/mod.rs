//! The replication engine: replication connection and slot, consistent
//! initial copy, pgoutput decoding, apply to the target, lag.

pub mod apply;
pub mod lsn;
pub mod pgoutput;

pub use lsn::Lsn;
