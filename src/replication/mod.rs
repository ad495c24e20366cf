//! The replication engine: replication connection and slot, consistent
//! initial copy, pgoutput decoding, apply to the target, lag.

pub mod copy;
pub mod lsn;

pub use lsn::Lsn;
