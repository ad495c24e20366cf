//! The replication-protocol client: a `replication=database` connection to the
//! source that identifies the system, creates and drops logical slots (with an
//! exported snapshot for the initial copy) and streams pgoutput changes.
//!
//! crates.io tokio-postgres cannot open replication connections, so this is
//! built on [`ServerConnection`] (TCP, TLS, startup, SCRAM/md5/cleartext).
//!
//! # Reporting progress (contract for callers)
//!
//! [`ReplicationStream::send_status`] tells the server how far the consumer
//! got; the `flushed` position becomes the slot's `confirmed_flush_lsn`, and
//! the server may then discard WAL and will never send those changes again.
//! So a caller must report as flushed only what the target has **durably
//! committed** (its replication origin says so). The stream itself never sends
//! a status update and never advances a position on a keepalive: a keepalive's
//! `wal_end` is not a promise that anything before it was applied. The only
//! time it is safe to report a keepalive's `wal_end` is when every XLogData
//! received before that keepalive has been applied and committed on the
//! target (nothing is pending).
//!
//! The server closes a stream that has been silent for `wal_sender_timeout`
//! (default 60 s), and asks for a reply (`reply_requested`) at half of it: the
//! caller must answer such keepalives promptly with its durable position.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{BufMut, Bytes, BytesMut};
use thiserror::Error;
use tokio::io::AsyncWriteExt;

use super::Lsn;
use super::names::is_valid_slot_name;
use crate::config::Endpoint;
use crate::db::{DbError, quote_ident, quote_literal};
use crate::pg::Version;
use crate::wire::connect::TextRow;
use crate::wire::messages;
use crate::wire::{ConnectOptions, ErrorFields, ServerConnection, WireError};

/// Errors of the replication client and the slot / publication helpers.
#[derive(Debug, Error)]
pub enum ReplicationError {
    /// Wrong password, no pg_hba entry for replication, or no password configured.
    #[error("authentication to {addr} as \"{user}\" failed: {message}")]
    Auth {
        addr: String,
        user: String,
        message: String,
    },
    /// The source cannot do logical decoding; the server's own words are kept.
    #[error(
        "{addr} cannot do logical replication: {message}; set wal_level = logical on the source and restart it"
    )]
    WalLevelNotLogical { addr: String, message: String },
    #[error("replication slot \"{name}\" already exists on {addr}")]
    SlotExists { addr: String, name: String },
    #[error("replication slot \"{name}\" does not exist on {addr}")]
    SlotNotFound { addr: String, name: String },
    /// Another connection (maybe an earlier pgshift process) is streaming from the slot.
    #[error("replication slot \"{name}\" on {addr} is in use: {message}")]
    SlotInUse {
        addr: String,
        name: String,
        message: String,
    },
    /// The connection could not be opened, or the server went away (shutdown,
    /// crash, network). Retrying later may succeed.
    #[error("replication connection to {addr} lost: {reason}")]
    ServerGone { addr: String, reason: String },
    /// Any other error the server reported, with what pgshift was doing.
    #[error("{addr}: {context} failed: {error}")]
    Server {
        addr: String,
        context: String,
        error: Box<ErrorFields>,
    },
    #[error("replication protocol error from {addr}: {message}")]
    Protocol { addr: String, message: String },
    #[error("invalid {what}: {message}")]
    Invalid { what: String, message: String },
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("{context}: {}", crate::db::describe(.source))]
    Sql {
        context: String,
        source: tokio_postgres::Error,
    },
}

impl ReplicationError {
    /// Is this worth retrying after a pause (the server or network went away)?
    pub fn is_transient(&self) -> bool {
        match self {
            ReplicationError::ServerGone { .. } => true,
            ReplicationError::Sql { source, .. }
            | ReplicationError::Db(DbError::Connect { source, .. }) => connection_lost(source),
            _ => false,
        }
    }

    /// The SQLSTATE the server sent, if the error came from the server.
    pub fn sqlstate(&self) -> Option<&str> {
        match self {
            ReplicationError::Server { error, .. } => Some(error.code.as_str()),
            ReplicationError::Sql { source, .. } => source.code().map(|c| c.code()),
            _ => None,
        }
    }

    /// Maps a wire error to a typed error; `context` says what was being done.
    pub(crate) fn from_wire(addr: &str, user: &str, context: &str, e: WireError) -> Self {
        let addr = addr.to_string();
        match e {
            WireError::Server(error) => Self::from_server(addr, user, context, error),
            WireError::Auth(message) => ReplicationError::Auth {
                addr,
                user: user.to_string(),
                message,
            },
            WireError::Io(_) | WireError::Closed | WireError::Timeout(_) | WireError::Tls(_) => {
                ReplicationError::ServerGone {
                    addr,
                    reason: format!("{context}: {e}"),
                }
            }
            WireError::Protocol(_) | WireError::TooLarge { .. } => ReplicationError::Protocol {
                addr,
                message: format!("{context}: {e}"),
            },
        }
    }

    fn from_server(addr: String, user: &str, context: &str, error: ErrorFields) -> Self {
        let code = error.code.as_str();
        match code {
            // invalid_password, invalid_authorization_specification
            "28P01" | "28000" => ReplicationError::Auth {
                addr,
                user: user.to_string(),
                message: error.message,
            },
            // object_not_in_prerequisite_state: "logical decoding requires wal_level >= logical"
            "55000" if error.message.contains("wal_level") => {
                ReplicationError::WalLevelNotLogical {
                    addr,
                    message: error.message,
                }
            }
            // admin_shutdown, crash_shutdown, cannot_connect_now, connection_exception class
            "57P01" | "57P02" | "57P03" => ReplicationError::ServerGone {
                addr,
                reason: format!("{context}: {error}"),
            },
            c if c.starts_with("08") => ReplicationError::ServerGone {
                addr,
                reason: format!("{context}: {error}"),
            },
            _ => ReplicationError::Server {
                addr,
                context: context.to_string(),
                error: Box::new(error),
            },
        }
    }

    /// Refines a server error about a named slot into the slot-specific variants.
    fn about_slot(self, name: &str) -> Self {
        match self {
            ReplicationError::Server { addr, error, .. } if error.code == "42710" => {
                ReplicationError::SlotExists {
                    addr,
                    name: name.to_string(),
                }
            }
            ReplicationError::Server { addr, error, .. } if error.code == "42704" => {
                ReplicationError::SlotNotFound {
                    addr,
                    name: name.to_string(),
                }
            }
            ReplicationError::Server { addr, error, .. } if error.code == "55006" => {
                ReplicationError::SlotInUse {
                    addr,
                    name: name.to_string(),
                    message: error.message,
                }
            }
            other => other,
        }
    }
}

/// Did a SQL call fail because the server or the network went away (rather
/// than the server rejecting the statement)?
fn connection_lost(e: &tokio_postgres::Error) -> bool {
    match e.code() {
        None => true,
        Some(code) => {
            let c = code.code();
            c.starts_with("08") || matches!(c, "57P01" | "57P02" | "57P03")
        }
    }
}

/// The answer to IDENTIFY_SYSTEM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SystemInfo {
    pub systemid: u64,
    pub timeline: u32,
    /// Current WAL flush position of the server.
    pub xlogpos: Lsn,
    pub dbname: Option<String>,
}

/// What CREATE_REPLICATION_SLOT does with the slot's initial snapshot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SnapshotAction {
    /// Export it, so copy workers can `SET TRANSACTION SNAPSHOT` to it.
    Export,
    /// Create the slot only.
    NoExport,
}

/// A newly created logical slot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlotInfo {
    pub name: String,
    /// Changes committed after this point are streamed; everything committed
    /// before it is in the exported snapshot.
    pub consistent_point: Lsn,
    pub snapshot_name: Option<String>,
    pub output_plugin: String,
}

/// A `replication=database` connection in command mode.
pub struct ReplicationConnection {
    conn: ServerConnection,
    addr: String,
    user: String,
    /// From the `server_version` reported at startup; None if it said nothing usable.
    server_version: Option<Version>,
}

impl ReplicationConnection {
    /// Opens a `replication=database` connection to `database` on the
    /// endpoint's server (TLS per its sslmode). The user needs the REPLICATION
    /// attribute (or superuser) and a pg_hba entry that allows it.
    pub async fn connect(
        endpoint: &Endpoint,
        database: &str,
        application_name: &str,
    ) -> Result<ReplicationConnection, ReplicationError> {
        let addr = endpoint.with_dbname(database).display();
        let startup = [
            ("user", endpoint.user.as_str()),
            ("database", database),
            ("replication", "database"),
            ("application_name", application_name),
            ("client_encoding", "UTF8"),
            // pgoutput prints values with the walsender's settings: floats
            // must read back exactly (11 rounds them to 15 digits by default).
            ("extra_float_digits", "3"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string()));
        let opts = ConnectOptions::for_endpoint(endpoint);
        let password = endpoint.password.as_ref().map(|p| p.expose());
        let conn = ServerConnection::connect(&opts, &startup, password)
            .await
            .map_err(|e| {
                ReplicationError::from_wire(&addr, &endpoint.user, "connecting for replication", e)
            })?;
        let server_version = conn
            .params
            .iter()
            .find(|(k, _)| k == "server_version")
            .and_then(|(_, v)| Version::from_server_version(v));
        Ok(ReplicationConnection {
            conn,
            addr,
            user: endpoint.user.clone(),
            server_version,
        })
    }

    /// The server's major version (15 for 15.4), 0 if it did not say.
    pub fn server_major_version(&self) -> u32 {
        self.server_version.map_or(0, |v| v.major().max(0) as u32)
    }

    /// The server's version, as far as its startup report tells.
    pub fn server_version(&self) -> Option<Version> {
        self.server_version
    }

    /// The version whose syntax and options to use: the reported one, or
    /// (when the server said nothing usable) the oldest supported.
    fn version_or_oldest(&self) -> Version {
        self.server_version.unwrap_or(Version(110000))
    }

    /// `IDENTIFY_SYSTEM`.
    pub async fn identify_system(&mut self) -> Result<SystemInfo, ReplicationError> {
        let rows = self.command("IDENTIFY_SYSTEM", "IDENTIFY_SYSTEM").await?;
        let row = self.single_row(&rows, 4, "IDENTIFY_SYSTEM")?;
        Ok(SystemInfo {
            systemid: self.field(row, 0, "systemid")?,
            timeline: self.field(row, 1, "timeline")?,
            xlogpos: self.lsn_field(row, 2, "xlogpos")?,
            dbname: row[3].clone(),
        })
    }

    /// Creates a logical slot using pgoutput.
    ///
    /// With [`SnapshotAction::Export`] the returned `snapshot_name` can be
    /// imported by other connections with `SET TRANSACTION SNAPSHOT` inside a
    /// `REPEATABLE READ` transaction. **The exported snapshot lives only while
    /// this connection stays open and idle**: any further command on it (or
    /// dropping it) destroys the snapshot. Keep the connection untouched until
    /// every copy worker has run `SET TRANSACTION SNAPSHOT`; afterwards it may
    /// be used again (e.g. for [`start_replication`](Self::start_replication)).
    ///
    /// The server waits for every transaction running at this moment to end
    /// before it answers (that is how it finds the consistent point), so an
    /// idle-in-transaction session on the source delays this call; wrap it in
    /// a timeout if needed (and then drop the connection: it is mid-command,
    /// and the server may still finish creating the slot: clean it up). A
    /// temporary slot is dropped when this connection closes.
    pub async fn create_slot(
        &mut self,
        name: &str,
        snapshot: SnapshotAction,
        temporary: bool,
    ) -> Result<SlotInfo, ReplicationError> {
        check_slot_name(name)?;
        let sql = self.version_or_oldest().create_slot_command(
            name,
            temporary,
            snapshot == SnapshotAction::Export,
        );
        let context = format!("creating replication slot \"{name}\"");
        let rows = self
            .command(&sql, &context)
            .await
            .map_err(|e| e.about_slot(name))?;
        let row = self.single_row(&rows, 4, &context)?;
        Ok(SlotInfo {
            name: row[0].clone().unwrap_or_else(|| name.to_string()),
            consistent_point: self.lsn_field(row, 1, "consistent_point")?,
            snapshot_name: row[2].clone(),
            output_plugin: row[3].clone().unwrap_or_default(),
        })
    }

    /// `DROP_REPLICATION_SLOT`. Returns false if there was no such slot.
    /// With `wait`, waits for a connection still streaming from the slot to
    /// go away instead of failing with [`ReplicationError::SlotInUse`].
    pub async fn drop_slot(&mut self, name: &str, wait: bool) -> Result<bool, ReplicationError> {
        check_slot_name(name)?;
        let version = self.version_or_oldest();
        let sql =
            version
                .drop_slot_command(name, wait)
                .ok_or_else(|| ReplicationError::Invalid {
                    what: "DROP_REPLICATION_SLOT".into(),
                    message: format!("PostgreSQL {version} cannot WAIT for a slot in use (13+)"),
                })?;
        match self
            .command(&sql, &format!("dropping replication slot \"{name}\""))
            .await
            .map_err(|e| e.about_slot(name))
        {
            Ok(_) => Ok(true),
            Err(ReplicationError::SlotNotFound { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Sends `START_REPLICATION SLOT … LOGICAL …` with pgoutput options and
    /// enters CopyBoth mode. The server begins at the slot's
    /// `confirmed_flush_lsn` if `start` is older than it.
    pub async fn start_replication(
        mut self,
        opts: &StreamOptions,
    ) -> Result<ReplicationStream, ReplicationError> {
        check_slot_name(&opts.slot)?;
        if let Some(v) = self.server_version {
            opts.check(v)?;
        }
        if opts.streaming
            && let Some(bytes) = opts.decoding_work_mem
        {
            self.lower_decoding_work_mem(bytes).await?;
        }
        let sql = opts.command();
        let context = format!("starting replication from slot \"{}\"", opts.slot);
        let mut out = BytesMut::new();
        postgres_protocol::message::frontend::query(&sql, &mut out).map_err(|e| {
            ReplicationError::Invalid {
                what: "START_REPLICATION command".into(),
                message: e.to_string(),
            }
        })?;
        self.write(&out, &context).await?;
        // The answer is CopyBothResponse, or an error followed by ReadyForQuery.
        loop {
            let f = self.read_frame(&context).await?;
            match f.tag() {
                b'W' => break,
                b'E' => {
                    let fields = self.parse_error(&f.bytes)?;
                    self.drain_until_ready(&context).await?;
                    return Err(ReplicationError::from_server(
                        self.addr.clone(),
                        &self.user,
                        &context,
                        fields,
                    )
                    .about_slot(&opts.slot));
                }
                b'N' | b'S' => {}
                t => {
                    return Err(
                        self.protocol(format!("{context}: unexpected message {:?}", t as char))
                    );
                }
            }
        }
        Ok(ReplicationStream {
            conn: self,
            slot: opts.slot.clone(),
            received: opts.start,
            reported: StatusPositions::default(),
            state: StreamState::Streaming,
        })
    }

    /// Closes the connection (an exported snapshot or temporary slot goes with it).
    pub async fn close(self) {
        self.conn.terminate().await;
    }

    /// Lowers this walsender's `logical_decoding_work_mem` to `bytes`
    /// (never raises it: a server set lower keeps its setting). A streamed
    /// transaction arrives in blocks of about that much, and what is left
    /// of it at its commit is at most one block: the smaller the block, the
    /// sooner its rows are visible on the target after the commit.
    async fn lower_decoding_work_mem(&mut self, bytes: u64) -> Result<(), ReplicationError> {
        // The setting's unit is kB; 64kB is its minimum.
        let kb = (bytes / 1024).max(64);
        let sql = format!(
            "SELECT pg_catalog.set_config('logical_decoding_work_mem', \
               LEAST(pg_catalog.pg_size_bytes(pg_catalog.current_setting('logical_decoding_work_mem')) / 1024, {kb})::text || 'kB', false)"
        );
        self.command(&sql, "setting logical_decoding_work_mem")
            .await?;
        Ok(())
    }

    async fn command(
        &mut self,
        sql: &str,
        context: &str,
    ) -> Result<Vec<TextRow>, ReplicationError> {
        self.conn
            .simple_query(sql)
            .await
            .map_err(|e| ReplicationError::from_wire(&self.addr, &self.user, context, e))
    }

    async fn write(&mut self, bytes: &[u8], context: &str) -> Result<(), ReplicationError> {
        let r = async {
            self.conn.stream.write_all(bytes).await?;
            self.conn.stream.flush().await
        }
        .await;
        r.map_err(|e| ReplicationError::from_wire(&self.addr, &self.user, context, e.into()))
    }

    /// Reads one frame; end of stream is [`ReplicationError::ServerGone`].
    /// Cancel-safe: bytes read so far stay in the frame reader's buffer.
    async fn read_frame(&mut self, context: &str) -> Result<crate::wire::Frame, ReplicationError> {
        self.conn
            .reader
            .read_required(&mut self.conn.stream)
            .await
            .map_err(|e| ReplicationError::from_wire(&self.addr, &self.user, context, e))
    }

    /// Skips messages up to ReadyForQuery (after an error or CopyDone).
    async fn drain_until_ready(&mut self, context: &str) -> Result<(), ReplicationError> {
        loop {
            if self.read_frame(context).await?.tag() == b'Z' {
                return Ok(());
            }
        }
    }

    fn parse_error(&self, frame: &[u8]) -> Result<ErrorFields, ReplicationError> {
        ErrorFields::parse(frame).map_err(|e| self.protocol(e.to_string()))
    }

    fn protocol(&self, message: String) -> ReplicationError {
        ReplicationError::Protocol {
            addr: self.addr.clone(),
            message,
        }
    }

    fn single_row<'a>(
        &self,
        rows: &'a [TextRow],
        columns: usize,
        context: &str,
    ) -> Result<&'a TextRow, ReplicationError> {
        match rows {
            [row] if row.len() >= columns => Ok(row),
            _ => Err(self.protocol(format!(
                "{context}: expected one row of {columns} columns, got {rows:?}"
            ))),
        }
    }

    fn field<T: std::str::FromStr>(
        &self,
        row: &TextRow,
        i: usize,
        name: &str,
    ) -> Result<T, ReplicationError> {
        row[i]
            .as_deref()
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| self.protocol(format!("bad {name} value {:?}", row[i])))
    }

    fn lsn_field(&self, row: &TextRow, i: usize, name: &str) -> Result<Lsn, ReplicationError> {
        self.field(row, i, name)
    }
}

fn check_slot_name(name: &str) -> Result<(), ReplicationError> {
    if is_valid_slot_name(name) {
        Ok(())
    } else {
        Err(ReplicationError::Invalid {
            what: "replication slot name".into(),
            message: format!(
                "`{name}`: only lowercase letters, digits and underscores, at most 63 bytes"
            ),
        })
    }
}

/// What to stream: slot, start position and pgoutput options.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamOptions {
    pub slot: String,
    /// Usually the slot's consistent point or the target's origin position.
    pub start: Lsn,
    pub publication: String,
    /// pgoutput protocol version: 1, or 2 for `streaming`.
    pub proto_version: u32,
    /// Deliver logical decoding messages (`pg_logical_emit_message`) as 'M'.
    pub messages: bool,
    /// Stream large in-progress transactions (needs `proto_version` ≥ 2).
    pub streaming: bool,
    /// With `streaming`: the walsender's `logical_decoding_work_mem` is
    /// lowered to this many bytes (see `lower_decoding_work_mem`); None:
    /// the server's setting.
    pub decoding_work_mem: Option<u64>,
}

impl StreamOptions {
    /// What pgshift streams from a server of `version`: from 14 on,
    /// protocol 2 with large in-progress transactions streamed (apply
    /// applies them as they arrive, so a large transaction does not put the
    /// target behind by its whole apply time at its commit) and logical
    /// decoding messages (the cutover markers); before 14, protocol 1
    /// (whole transactions; markers are rows of a published table, see
    /// [`MarkerTransport`]).
    ///
    /// [`MarkerTransport`]: crate::pg::replication::MarkerTransport
    pub(crate) fn for_server(
        slot: &str,
        start: Lsn,
        publication: &str,
        version: Version,
    ) -> StreamOptions {
        let p = version.pgoutput();
        StreamOptions {
            messages: p.messages,
            proto_version: if p.streaming { 2 } else { 1 },
            streaming: p.streaming,
            ..StreamOptions::new(slot, start, publication)
        }
    }

    /// Refuses, with a clear error, options that `version`'s pgoutput
    /// does not know (the server's own error would come only once
    /// streaming starts, and a retry would meet it again).
    pub fn check(&self, version: Version) -> Result<(), ReplicationError> {
        let p = version.pgoutput();
        let unknown = if self.proto_version > p.max_proto_version {
            Some(format!(
                "proto_version {} (at most {})",
                self.proto_version, p.max_proto_version
            ))
        } else if self.messages && !p.messages {
            Some("the messages option (PostgreSQL 14+)".to_string())
        } else if self.streaming && !p.streaming {
            Some("the streaming option (PostgreSQL 14+)".to_string())
        } else {
            None
        };
        match unknown {
            Some(what) => Err(ReplicationError::Invalid {
                what: "pgoutput options".into(),
                message: format!("PostgreSQL {version}'s pgoutput does not support {what}"),
            }),
            None => Ok(()),
        }
    }

    /// Protocol 1, messages on, no streaming of in-progress transactions.
    pub fn new(slot: &str, start: Lsn, publication: &str) -> StreamOptions {
        StreamOptions {
            slot: slot.to_string(),
            start,
            publication: publication.to_string(),
            proto_version: 1,
            messages: true,
            streaming: false,
            decoding_work_mem: None,
        }
    }

    /// The START_REPLICATION command text.
    pub fn command(&self) -> String {
        // publication_names is a list of identifiers inside a string literal.
        let mut options = vec![
            format!("proto_version '{}'", self.proto_version),
            format!(
                "publication_names {}",
                quote_literal(&quote_ident(&self.publication))
            ),
        ];
        if self.messages {
            options.push("messages 'true'".into());
        }
        if self.streaming {
            options.push("streaming 'true'".into());
        }
        format!(
            "START_REPLICATION SLOT {} LOGICAL {} ({})",
            self.slot,
            self.start,
            options.join(", ")
        )
    }
}

/// One message from the server while streaming.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReplicationMessage {
    /// WAL data: one pgoutput message in `data`.
    XLogData {
        /// Where this message's WAL begins (0 for some pgoutput messages).
        wal_start: Lsn,
        /// The server's current end of WAL (not a position to report as applied).
        wal_end: Lsn,
        server_time: SystemTime,
        data: Bytes,
    },
    /// The server is alive; `wal_end` is how far it has sent. Never report it
    /// as flushed unless nothing received before it is still unapplied.
    Keepalive {
        wal_end: Lsn,
        server_time: SystemTime,
        /// Answer with [`ReplicationStream::send_status`] soon, or the server
        /// closes the connection after `wal_sender_timeout`.
        reply_requested: bool,
    },
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct StatusPositions {
    written: Lsn,
    flushed: Lsn,
    applied: Lsn,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum StreamState {
    Streaming,
    /// The server sent CopyDone; ours is still owed.
    ServerCopyDone,
    /// The server sent CommandComplete: the command is over.
    ServerFinished,
    /// An error ended the stream.
    Failed,
}

/// A logical replication stream (CopyBoth mode). See the module docs for
/// what may be reported with [`send_status`](Self::send_status).
pub struct ReplicationStream {
    conn: ReplicationConnection,
    slot: String,
    received: Lsn,
    reported: StatusPositions,
    state: StreamState,
}

impl ReplicationStream {
    /// The next message. `Ok(None)`: the server ended the stream (CopyDone,
    /// or it is shutting down); reconnect to continue. An ErrorResponse
    /// becomes a typed error; EOF is [`ReplicationError::ServerGone`].
    ///
    /// Cancel-safe: dropping the future (e.g. in `tokio::select!` with a
    /// timer) loses nothing; the next call continues where this one was.
    pub async fn next(&mut self) -> Result<Option<ReplicationMessage>, ReplicationError> {
        match self.state {
            StreamState::Streaming => {}
            StreamState::ServerCopyDone | StreamState::ServerFinished => return Ok(None),
            StreamState::Failed => {
                return Err(ReplicationError::ServerGone {
                    addr: self.conn.addr.clone(),
                    reason: "the replication stream already failed".into(),
                });
            }
        }
        loop {
            let frame = match self.conn.read_frame("streaming changes").await {
                Ok(f) => f,
                Err(e) => {
                    self.state = StreamState::Failed;
                    return Err(e);
                }
            };
            match frame.tag() {
                b'd' => {
                    let msg = parse_copy_data(&frame.bytes).map_err(|e| {
                        self.state = StreamState::Failed;
                        self.conn.protocol(e.to_string())
                    })?;
                    let (ReplicationMessage::XLogData { wal_end, .. }
                    | ReplicationMessage::Keepalive { wal_end, .. }) = &msg;
                    self.received = self.received.max(*wal_end);
                    return Ok(Some(msg));
                }
                // Logical walsenders end with CopyDone when asked, and with
                // CommandComplete (no CopyDone) when the server shuts down.
                b'c' => {
                    self.state = StreamState::ServerCopyDone;
                    return Ok(None);
                }
                b'C' => {
                    self.state = StreamState::ServerFinished;
                    return Ok(None);
                }
                b'E' => {
                    self.state = StreamState::Failed;
                    let fields = self.conn.parse_error(&frame.bytes)?;
                    return Err(ReplicationError::from_server(
                        self.conn.addr.clone(),
                        &self.conn.user,
                        "streaming changes",
                        fields,
                    )
                    .about_slot(&self.slot));
                }
                b'N' | b'S' => {}
                t => {
                    self.state = StreamState::Failed;
                    return Err(self.conn.protocol(format!(
                        "unexpected message {:?} while streaming",
                        t as char
                    )));
                }
            }
        }
    }

    /// Sends a Standby Status Update. Report as `flushed`/`applied` only what
    /// the target has durably committed (see the module docs); `written` may
    /// be what was received. Positions never move backwards: a value lower
    /// than one reported before is raised to it (it was durable then, too).
    /// `reply_requested` asks the server to answer with a keepalive.
    ///
    /// Not cancel-safe (a half-written message would corrupt the stream):
    /// do not race it against other futures.
    pub async fn send_status(
        &mut self,
        written: Lsn,
        flushed: Lsn,
        applied: Lsn,
        reply_requested: bool,
    ) -> Result<(), ReplicationError> {
        let r = &mut self.reported;
        r.written = r.written.max(written);
        r.flushed = r.flushed.max(flushed);
        r.applied = r.applied.max(applied);
        let msg = standby_status_update(*r, SystemTime::now(), reply_requested);
        let result = self
            .conn
            .write(&msg, "sending a standby status update")
            .await;
        if result.is_err() {
            self.state = StreamState::Failed;
        }
        result
    }

    /// The highest `wal_end` seen in any message (what was received, for metrics).
    pub fn received_lsn(&self) -> Lsn {
        self.received
    }

    /// The flushed position last reported to the server.
    pub fn reported_flushed_lsn(&self) -> Lsn {
        self.reported.flushed
    }

    pub fn slot(&self) -> &str {
        &self.slot
    }

    /// Ends streaming politely (CopyDone) and returns the connection in
    /// command mode, e.g. to drop the slot. Messages still in flight are
    /// discarded: report positions with [`send_status`](Self::send_status) first.
    pub async fn stop(mut self) -> Result<ReplicationConnection, ReplicationError> {
        if self.state == StreamState::Failed {
            return Err(ReplicationError::ServerGone {
                addr: self.conn.addr.clone(),
                reason: "the replication stream already failed".into(),
            });
        }
        let context = "ending replication";
        // CopyBoth ends when both sides have sent CopyDone.
        if self.state != StreamState::ServerFinished {
            self.conn
                .write(&messages::message(b'c', &[]), context)
                .await?;
        }
        let mut error = None;
        loop {
            let f = self.conn.read_frame(context).await?;
            match f.tag() {
                b'Z' => break,
                b'E' => error = Some(self.conn.parse_error(&f.bytes)?),
                _ => {}
            }
        }
        match error {
            Some(e) => Err(ReplicationError::from_server(
                self.conn.addr.clone(),
                &self.conn.user,
                context,
                e,
            )),
            None => Ok(self.conn),
        }
    }
}

/// Seconds from the Unix epoch to PostgreSQL's (2000-01-01 00:00:00 UTC).
const PG_EPOCH_OFFSET_SECS: u64 = 946_684_800;

/// A PostgreSQL timestamp (microseconds since 2000-01-01 UTC) as a SystemTime.
pub(crate) fn pg_timestamp_to_system_time(micros: i64) -> SystemTime {
    let epoch = UNIX_EPOCH + Duration::from_secs(PG_EPOCH_OFFSET_SECS);
    if micros >= 0 {
        epoch + Duration::from_micros(micros as u64)
    } else {
        epoch - Duration::from_micros(micros.unsigned_abs())
    }
}

/// A SystemTime as a PostgreSQL timestamp (microseconds since 2000-01-01 UTC).
pub(crate) fn system_time_to_pg_timestamp(t: SystemTime) -> i64 {
    let epoch = UNIX_EPOCH + Duration::from_secs(PG_EPOCH_OFFSET_SECS);
    match t.duration_since(epoch) {
        Ok(d) => i64::try_from(d.as_micros()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_micros()).unwrap_or(i64::MAX),
    }
}

/// A CopyData frame of the replication stream that is not one pgshift reads.
#[derive(Debug, Error, PartialEq, Eq)]
pub(crate) enum CopyDataError {
    #[error("truncated replication message of {0} bytes")]
    Truncated(usize),
    #[error("unknown replication message {0:?}")]
    Unknown(char),
    #[error("empty CopyData message")]
    Empty,
}

/// Parses a CopyData frame ('d' + header) into XLogData or a keepalive.
pub(crate) fn parse_copy_data(frame: &Bytes) -> Result<ReplicationMessage, CopyDataError> {
    let body = &frame[5..];
    let read_u64 = |at: usize| -> u64 {
        let mut b = [0u8; 8];
        b.copy_from_slice(&body[at..at + 8]);
        u64::from_be_bytes(b)
    };
    match body.first() {
        Some(b'w') if body.len() >= 25 => Ok(ReplicationMessage::XLogData {
            wal_start: Lsn(read_u64(1)),
            wal_end: Lsn(read_u64(9)),
            server_time: pg_timestamp_to_system_time(read_u64(17) as i64),
            data: frame.slice(5 + 25..),
        }),
        Some(b'k') if body.len() >= 18 => Ok(ReplicationMessage::Keepalive {
            wal_end: Lsn(read_u64(1)),
            server_time: pg_timestamp_to_system_time(read_u64(9) as i64),
            reply_requested: body[17] != 0,
        }),
        Some(b'w') | Some(b'k') => Err(CopyDataError::Truncated(body.len())),
        Some(t) => Err(CopyDataError::Unknown(*t as char)),
        None => Err(CopyDataError::Empty),
    }
}

/// A CopyData frame holding a Standby Status Update ('r').
fn standby_status_update(p: StatusPositions, now: SystemTime, reply_requested: bool) -> Bytes {
    let mut body = BytesMut::with_capacity(34);
    body.put_u8(b'r');
    body.put_u64(p.written.0);
    body.put_u64(p.flushed.0);
    body.put_u64(p.applied.0);
    body.put_i64(system_time_to_pg_timestamp(now));
    body.put_u8(u8::from(reply_requested));
    messages::message(b'd', &body)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn copy_data(body: &[u8]) -> Bytes {
        messages::message(b'd', body)
    }

    #[test]
    fn parses_xlogdata_and_keepalive() {
        let mut b = vec![b'w'];
        b.extend_from_slice(&0x1_0000_0010u64.to_be_bytes());
        b.extend_from_slice(&0x1_0000_0020u64.to_be_bytes());
        b.extend_from_slice(&1_000_000i64.to_be_bytes());
        b.extend_from_slice(b"Bpayload");
        match parse_copy_data(&copy_data(&b)).unwrap() {
            ReplicationMessage::XLogData {
                wal_start,
                wal_end,
                server_time,
                data,
            } => {
                assert_eq!(wal_start, Lsn(0x1_0000_0010));
                assert_eq!(wal_end.to_string(), "1/20");
                assert_eq!(
                    server_time,
                    UNIX_EPOCH + Duration::from_secs(PG_EPOCH_OFFSET_SECS + 1)
                );
                assert_eq!(&data[..], b"Bpayload");
            }
            other => panic!("{other:?}"),
        }

        let mut k = vec![b'k'];
        k.extend_from_slice(&42u64.to_be_bytes());
        k.extend_from_slice(&0i64.to_be_bytes());
        k.push(1);
        assert_eq!(
            parse_copy_data(&copy_data(&k)).unwrap(),
            ReplicationMessage::Keepalive {
                wal_end: Lsn(42),
                server_time: pg_timestamp_to_system_time(0),
                reply_requested: true,
            }
        );
    }

    #[test]
    fn rejects_short_or_unknown_copy_data() {
        assert_eq!(
            parse_copy_data(&copy_data(b"w\0\0"))
                .unwrap_err()
                .to_string(),
            "truncated replication message of 3 bytes"
        );
        assert!(parse_copy_data(&copy_data(b"k\0\0\0\0\0\0\0\0")).is_err());
        assert_eq!(
            parse_copy_data(&copy_data(b"x")).unwrap_err(),
            CopyDataError::Unknown('x')
        );
        assert_eq!(
            parse_copy_data(&copy_data(b"")).unwrap_err(),
            CopyDataError::Empty
        );
    }

    #[test]
    fn status_update_layout() {
        let p = StatusPositions {
            written: Lsn(3),
            flushed: Lsn(2),
            applied: Lsn(1),
        };
        let now = pg_timestamp_to_system_time(123_456);
        let f = standby_status_update(p, now, true);
        assert_eq!(f[0], b'd');
        assert_eq!(i32::from_be_bytes([f[1], f[2], f[3], f[4]]), 4 + 34);
        let body = &f[5..];
        assert_eq!(body[0], b'r');
        assert_eq!(u64::from_be_bytes(body[1..9].try_into().unwrap()), 3);
        assert_eq!(u64::from_be_bytes(body[9..17].try_into().unwrap()), 2);
        assert_eq!(u64::from_be_bytes(body[17..25].try_into().unwrap()), 1);
        assert_eq!(
            i64::from_be_bytes(body[25..33].try_into().unwrap()),
            123_456
        );
        assert_eq!(body[33], 1);
    }

    #[test]
    fn timestamps_round_trip() {
        for micros in [0i64, 1, -1, 757_382_400_000_000, -946_684_800_000_000] {
            assert_eq!(
                system_time_to_pg_timestamp(pg_timestamp_to_system_time(micros)),
                micros
            );
        }
    }

    #[test]
    fn start_command_quotes_publication() {
        let mut o = StreamOptions::new("pgshift_m_db_01234567", Lsn(0x16_B374_D848), "My \"pub\"");
        assert_eq!(
            o.command(),
            "START_REPLICATION SLOT pgshift_m_db_01234567 LOGICAL 16/B374D848 \
             (proto_version '1', publication_names '\"My \"\"pub\"\"\"', messages 'true')"
        );
        o.messages = false;
        o.streaming = true;
        o.proto_version = 2;
        assert!(o.command().ends_with(
            "(proto_version '2', publication_names '\"My \"\"pub\"\"\"', streaming 'true')"
        ));
    }

    #[test]
    fn stream_options_follow_the_source_version() {
        for (num, messages) in [
            (110000, false),
            (130004, false),
            (140000, true),
            (180000, true),
        ] {
            let v = Version(num);
            let o = StreamOptions::for_server("s", Lsn(0), "p", v);
            // Streaming of in-progress transactions comes with messages (14+).
            assert_eq!(o.proto_version, if messages { 2 } else { 1 });
            assert_eq!(o.streaming, messages, "{v}");
            assert_eq!(o.messages, messages, "{v}");
            assert_eq!(o.command().contains("messages"), messages, "{v}");
            o.check(v).unwrap();
        }
        let e = StreamOptions::new("s", Lsn(0), "p")
            .check(Version(130004))
            .unwrap_err();
        assert!(e.to_string().contains("messages option"), "{e}");
        let mut o = StreamOptions::for_server("s", Lsn(0), "p", Version(130004));
        assert_eq!(o.proto_version, 1);
        o.proto_version = 2;
        assert!(o.check(Version(130004)).is_err());
        assert!(o.check(Version(140000)).is_ok());
        o.streaming = true;
        assert!(o.check(Version(140000)).is_ok());
    }

    #[test]
    fn server_errors_are_typed() {
        let err = |code: &str, msg: &str| {
            ReplicationError::from_wire(
                "h:1/db",
                "app",
                "doing",
                WireError::Server(ErrorFields::new("ERROR", code, msg)),
            )
        };
        assert!(matches!(
            err("28P01", "password authentication failed for user \"app\""),
            ReplicationError::Auth { .. }
        ));
        let e = err("55000", "logical decoding requires wal_level >= logical");
        assert!(matches!(e, ReplicationError::WalLevelNotLogical { .. }));
        assert!(e.to_string().contains("wal_level >= logical"), "{e}");
        assert!(matches!(
            err("42710", "replication slot \"s\" already exists").about_slot("s"),
            ReplicationError::SlotExists { .. }
        ));
        assert!(matches!(
            err("55006", "replication slot \"s\" is active for PID 7").about_slot("s"),
            ReplicationError::SlotInUse { .. }
        ));
        assert!(
            err(
                "57P01",
                "terminating connection due to administrator command"
            )
            .is_transient()
        );
        assert!(ReplicationError::from_wire("h", "u", "x", WireError::Closed).is_transient());
        assert_eq!(err("42601", "syntax error").sqlstate(), Some("42601"));
    }
}
