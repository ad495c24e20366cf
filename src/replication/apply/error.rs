//! What stops apply, typed so the stream can tell a lost target from a
//! change the target refused.

use thiserror::Error;

use super::origin::OriginError;
use crate::replication::Lsn;
use crate::wire::{ErrorFields, WireError};

#[derive(Debug, Error)]
pub enum ApplyError {
    #[error("apply to target database {database}: {source}")]
    Connection {
        database: String,
        #[source]
        source: Box<WireError>,
    },
    #[error(
        "apply to target database {database}: cannot set up replication origin {origin}: {error}"
    )]
    Origin {
        database: String,
        origin: String,
        #[source]
        error: OriginError,
    },
    #[error("table {table} no longer matches the target: {difference}. Apply is stopped; {remedy}")]
    SchemaMismatch {
        database: String,
        table: String,
        difference: String,
        /// A statement to run on the target, only when certainly right and safe.
        fix: Option<String>,
        /// What to do: run `fix`, or what to change by hand.
        remedy: String,
    },
    #[error(
        "cannot apply the source transaction {transaction} to {table} ({op}) in database {database}: {error}"
    )]
    Row {
        database: String,
        transaction: SourceTxn,
        table: String,
        op: &'static str,
        error: Box<ErrorFields>,
    },
    #[error(
        "the source transaction {transaction} {op}s a row of {table} in database {database} that the target does not have ({rows} rows matched): the target has diverged"
    )]
    RowNotFound {
        database: String,
        transaction: SourceTxn,
        table: String,
        op: &'static str,
        rows: u64,
    },
    /// A DDL command replicated from the source that the target refused.
    #[error(
        "the target refused DDL {id} of the source transaction {transaction} in database {database}: {error}; the command: {statement}. Apply is stopped: change the target so the command can run and run `pgshift ddl retry --database {database}`, or apply the change by hand and run `pgshift ddl skip --database {database}`"
    )]
    Ddl {
        database: String,
        transaction: SourceTxn,
        /// The capture's event id, for `ddl skip`.
        id: String,
        statement: String,
        error: Box<ErrorFields>,
    },
    /// A DDL command pgshift cannot reproduce on the target.
    #[error(
        "cannot replicate DDL {id} of the source transaction {transaction} in database {database}: {reason}; the source ran: {query}. Apply is stopped: make the same change on the target by hand, then run `pgshift ddl skip --database {database}`"
    )]
    DdlUnsupported {
        database: String,
        transaction: SourceTxn,
        id: String,
        query: String,
        reason: String,
    },
    /// A streamed transaction spilled to a temporary file (the pool of
    /// streamed sessions was full) could not be written or read back.
    #[error(
        "apply to target database {database}: streamed transaction {xid} spilled to a temporary file: {source}"
    )]
    Spill {
        database: String,
        xid: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("apply to target database {database}: unexpected stream: {detail}")]
    Protocol { database: String, detail: String },
    #[error(
        "apply to target database {database} stopped after an earlier error; reconnect to resume"
    )]
    Stopped { database: String },
    /// Internal: a batched statement failed and the group is being applied
    /// again change by change; never returned by the public methods.
    #[doc(hidden)]
    #[error("a batched statement failed; applying the group again change by change")]
    Replay,
}

/// The source transaction a failed change came from, as errors name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SourceTxn {
    /// A committed transaction, by its commit LSN.
    Committed(Lsn),
    /// A transaction streamed while still in progress on the source: its
    /// commit LSN is not known yet, its xid is.
    InProgress { xid: u32 },
}

impl std::fmt::Display for SourceTxn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SourceTxn::Committed(lsn) => write!(f, "committed at {lsn}"),
            SourceTxn::InProgress { xid } => {
                write!(f, "with xid {xid} (streamed while in progress)")
            }
        }
    }
}

impl ApplyError {
    /// A failure that may pass by itself (a deadlock, a serialization
    /// failure, a lock or statement timeout, a server shutting down), so
    /// applying the same change again can succeed; every other row or
    /// schema error needs an operator.
    pub fn is_transient(&self) -> bool {
        match self {
            ApplyError::Row { error, .. } | ApplyError::Ddl { error, .. } => {
                ["40", "53", "55", "57", "58", "08"].contains(&error.code.get(..2).unwrap_or(""))
            }
            ApplyError::SchemaMismatch { .. }
            | ApplyError::RowNotFound { .. }
            | ApplyError::DdlUnsupported { .. } => false,
            _ => true,
        }
    }
}

impl ApplyError {
    /// What an operator can act on when apply stopped on a schema change:
    /// the DDL the target refused or could not get, or (without DDL
    /// capture) the table that no longer matches and the ready command.
    pub fn ddl_stop(&self) -> Option<crate::replication::ddl::DdlStop> {
        use crate::replication::ddl::DdlStop;
        match self {
            ApplyError::Ddl {
                database,
                id,
                statement,
                ..
            } => Some(DdlStop {
                database: database.clone(),
                id: Some(id.clone()),
                statement: Some(statement.clone()),
                error: self.to_string(),
            }),
            ApplyError::DdlUnsupported { database, id, .. } => Some(DdlStop {
                database: database.clone(),
                id: Some(id.clone()),
                statement: None,
                error: self.to_string(),
            }),
            ApplyError::SchemaMismatch { database, fix, .. } => Some(DdlStop {
                database: database.clone(),
                id: None,
                statement: fix.clone(),
                error: self.to_string(),
            }),
            _ => None,
        }
    }
}
