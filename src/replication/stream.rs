//! Change streaming for one database: START_REPLICATION from where the
//! target's origin says apply is, decode, apply, and report to the source
//! only what the target has committed. Reconnects with backoff on any error
//! (a lost source or target, or an apply error the operator must fix) and
//! resumes exactly at the origin position. Also owns the lag numbers.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus::{GaugeVec, IntCounterVec, IntGaugeVec};
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::Lsn;
use super::apply::{Applier, ApplyDdl, ApplyError, ApplyMetrics, ApplyOptions, Marker};
use super::client::{ReplicationConnection, ReplicationError, ReplicationMessage, StreamOptions};
use super::marker::MarkerConnection;
use super::names::ReplicationNames;
use super::origin_filter::OriginFilter;
use super::pgoutput::{DecodeError, Decoder};
use crate::config::Endpoint;
use crate::telemetry::status::Report;

/// Streaming metrics, shared by every database's stream.
#[derive(Clone)]
pub struct StreamMetrics {
    pub lag_bytes: IntGaugeVec,
    pub lag_seconds: GaugeVec,
    pub received_lsn: IntGaugeVec,
    pub applied_lsn: IntGaugeVec,
    pub slot_retained_bytes: IntGaugeVec,
    pub errors: IntCounterVec,
    pub state: IntGaugeVec,
    pub apply: ApplyMetrics,
}

impl StreamMetrics {
    pub fn register(reg: &prometheus::Registry) -> StreamMetrics {
        StreamMetrics::register_as(reg, "pgshift", "")
    }

    /// The same metrics under another prefix (`pgshift_reverse` for the
    /// reverse direction after a cutover), their help texts led by `about`.
    pub fn register_as(reg: &prometheus::Registry, prefix: &str, about: &str) -> StreamMetrics {
        use crate::telemetry::metrics as m;
        let name = |suffix: &str| format!("{prefix}_{suffix}");
        let help = |text: &str| format!("{about}{text}");
        StreamMetrics {
            lag_bytes: m::int_gauge_vec(
                reg,
                &name("replication_lag_bytes"),
                &help(
                    "Source pg_current_wal_lsn() minus the last LSN the target has committed, in bytes",
                ),
                &["database"],
            ),
            lag_seconds: m::gauge_vec(
                reg,
                &name("replication_lag_seconds"),
                &help(
                    "Seconds since the target last held everything the source had (0 when nothing is pending)",
                ),
                &["database"],
            ),
            received_lsn: m::int_gauge_vec(
                reg,
                &name("replication_received_lsn"),
                &help("Last WAL position received from the source, as a number (bytes)"),
                &["database"],
            ),
            applied_lsn: m::int_gauge_vec(
                reg,
                &name("replication_applied_lsn"),
                &help("Last WAL position the target has committed, as a number (bytes)"),
                &["database"],
            ),
            slot_retained_bytes: m::int_gauge_vec(
                reg,
                &name("replication_slot_retained_bytes"),
                &help("WAL the migration's replication slot holds back on the source, in bytes"),
                &["database"],
            ),
            errors: m::int_counter_vec(
                reg,
                &name("replication_errors_total"),
                &help(
                    "Stream sessions ended by an error, by kind (source, target, apply, protocol)",
                ),
                &["database", "kind"],
            ),
            state: m::int_gauge_vec(
                reg,
                &name("replication_stream_state"),
                &help("1 for the state each database's stream is in, 0 for the others"),
                &["database", "state"],
            ),
            apply: ApplyMetrics::register_as(reg, prefix, about),
        }
    }
}

/// Where a stream is. Only `Streaming` is healthy: connected, applying,
/// and past the point where it last broke (a reconnect alone proves
/// nothing: an apply error comes back with the same change).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum StreamState {
    /// Not connected yet, no error so far.
    #[default]
    Starting,
    Connecting,
    Streaming,
    /// Broke (source or target gone, protocol); reconnecting with backoff.
    Retrying,
    /// Apply refused a change (schema difference, row error): retries
    /// cannot help until an operator acts.
    ApplyStopped,
    Stopped,
}

impl StreamState {
    pub const ALL: [StreamState; 6] = [
        StreamState::Starting,
        StreamState::Connecting,
        StreamState::Streaming,
        StreamState::Retrying,
        StreamState::ApplyStopped,
        StreamState::Stopped,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            StreamState::Starting => "starting",
            StreamState::Connecting => "connecting",
            StreamState::Streaming => "streaming",
            StreamState::Retrying => "retrying",
            StreamState::ApplyStopped => "apply_stopped",
            StreamState::Stopped => "stopped",
        }
    }
}

impl std::fmt::Display for StreamState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What ended a stream session.
#[derive(Debug, thiserror::Error)]
enum StreamError {
    /// The replication connection to the source (connect, START_REPLICATION,
    /// reading or answering the stream).
    #[error("{0}")]
    Source(#[from] ReplicationError),
    #[error("the source did not report its server_version")]
    NoServerVersion,
    #[error("the source ended the replication stream")]
    Ended,
    /// A pgoutput message the decoder could not read.
    #[error("{0}")]
    Decode(#[from] DecodeError),
    #[error(transparent)]
    Apply(#[from] ApplyError),
}

impl StreamError {
    const KINDS: [&'static str; 4] = ["source", "target", "apply", "protocol"];

    /// The `kind` label of `pgshift_replication_errors_total`.
    pub fn kind(&self) -> &'static str {
        match self {
            StreamError::Source(_) | StreamError::NoServerVersion | StreamError::Ended => "source",
            StreamError::Apply(ApplyError::Connection { .. } | ApplyError::Origin { .. }) => {
                "target"
            }
            StreamError::Decode(_) | StreamError::Apply(ApplyError::Protocol { .. }) => "protocol",
            StreamError::Apply(_) => "apply",
        }
    }
}

/// A stream that is not streaming: its state, and what is wrong in words.
#[derive(Clone, Debug, thiserror::Error)]
#[error("{detail}")]
pub struct Unhealthy {
    pub state: StreamState,
    pub detail: String,
}

/// Why a marker was not seen committed on the target.
#[derive(Debug, thiserror::Error)]
pub enum CatchUpError {
    /// The stream is not healthy: waiting longer would not help.
    #[error("{0}")]
    Unhealthy(String),
    #[error("{0}")]
    Timeout(String),
    #[error("database {database}: cannot emit the marker on the source: {error}")]
    Emit { database: String, error: String },
}

/// Live numbers of one database's stream (for /status, lag and cutover).
#[derive(Default)]
struct Live {
    state: StreamState,
    received: Lsn,
    /// What the target holds: the last committed commit LSN, or the
    /// keepalive end when nothing received is still unapplied.
    applied: Lsn,
    /// The end of the last source transaction committed on the target (the
    /// replication origin's position), never a keepalive's end.
    committed: Lsn,
    /// A transaction is in flight: received (or streamed, v2) and not yet
    /// committed on the target. Lag then counts from `committed`: a
    /// keepalive that passed the transaction's WAL while it was still open
    /// on the source says nothing about whether the target holds it.
    in_flight: bool,
    /// Streamed (v2) transactions open on the source, being applied.
    streamed_open: usize,
    source_current: Lsn,
    lag_bytes: u64,
    lag_seconds: f64,
    slot_retained: u64,
    last_error: Option<String>,
    error_kind: Option<&'static str>,
    /// Failed sessions since the stream was last healthy.
    retries: u32,
    errors_total: u64,
    next_attempt: Option<chrono::DateTime<chrono::Utc>>,
    /// After an error: healthy again only once the target holds this
    /// position, past where the stream broke.
    recover_at: Option<Lsn>,
    /// (time, source position) samples, to know when the source was where
    /// the target is now.
    samples: VecDeque<(Instant, Lsn)>,
    transactions: u64,
    /// Source commit time (µs since 2000) of the oldest transaction received
    /// but not yet on the target.
    pending_since: Option<i64>,
}

impl Live {
    /// The position lag is measured from: what the target holds, but only
    /// its committed position while a transaction is in flight.
    fn held(&self) -> Lsn {
        if self.in_flight {
            self.committed
        } else {
            self.applied
        }
    }
}

pub struct StreamStatus {
    database: String,
    live: Mutex<Live>,
    /// Bumped on every state change, for waiters that must stop at once
    /// when the stream breaks.
    changed: watch::Sender<()>,
    state_metric: IntGaugeVec,
}

impl StreamStatus {
    fn new(database: &str, applied: Lsn, state_metric: IntGaugeVec) -> StreamStatus {
        let status = StreamStatus {
            database: database.to_string(),
            live: Mutex::new(Live {
                applied,
                committed: applied,
                ..Default::default()
            }),
            changed: watch::channel(()).0,
            state_metric,
        };
        status.export(StreamState::Starting);
        status
    }

    fn with<R>(&self, f: impl FnOnce(&mut Live) -> R) -> R {
        f(&mut self.live.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn export(&self, state: StreamState) {
        for s in StreamState::ALL {
            self.state_metric
                .with_label_values(&[&self.database, s.as_str()])
                .set(i64::from(s == state));
        }
    }

    /// Moves to `state` (logged and exported only when it changes).
    fn set_state(&self, state: StreamState) {
        let from = self.with(|l| std::mem::replace(&mut l.state, state));
        if from != state {
            self.export(state);
            self.changed.send_replace(());
        }
    }

    /// WAL the stream's slot holds back on its source, in bytes (as last read).
    pub fn retained_bytes(&self) -> u64 {
        self.with(|l| l.slot_retained)
    }

    pub fn lag_bytes(&self) -> u64 {
        self.with(|l| l.lag_bytes)
    }

    pub fn applied(&self) -> Lsn {
        self.with(|l| l.applied)
    }

    pub fn last_error(&self) -> Option<String> {
        self.with(|l| l.last_error.clone())
    }

    pub fn state(&self) -> StreamState {
        self.with(|l| l.state)
    }

    /// Ok when the stream is connected and applying; otherwise its state
    /// and what is wrong, for an operator (state, retries, the last error).
    pub fn health(&self) -> Result<(), Unhealthy> {
        self.with(|l| {
            if l.state == StreamState::Streaming {
                return Ok(());
            }
            let mut s = format!("database {}: stream {}", self.database, l.state);
            if l.retries > 0 {
                s.push_str(&format!(" (attempt {}", l.retries + 1));
                if let Some(t) = l.next_attempt {
                    let wait = (t - chrono::Utc::now()).num_milliseconds().max(0) as f64 / 1000.0;
                    s.push_str(&format!(", next in {wait:.1}s"));
                }
                s.push(')');
            }
            match &l.last_error {
                Some(e) => s.push_str(&format!(": {e}")),
                None if l.state == StreamState::Starting || l.state == StreamState::Connecting => {
                    s.push_str(": not streaming yet")
                }
                None => {}
            }
            Err(Unhealthy {
                state: l.state,
                detail: s,
            })
        })
    }

    /// A session is connecting: shown as such unless an error is unresolved.
    fn connecting(&self) {
        if self.with(|l| l.recover_at.is_none()) {
            self.set_state(StreamState::Connecting);
        }
    }

    /// The target holds `confirmed`: the stream is healthy unless it has
    /// not yet passed the point where it last broke.
    /// Returns whether this recovered the stream from an error.
    fn confirmed(&self, confirmed: Lsn) -> bool {
        let recovered = self.with(|l| {
            l.applied = l.applied.max(confirmed);
            match l.recover_at {
                Some(p) if confirmed < p => None,
                Some(_) => {
                    let retries = l.retries;
                    l.recover_at = None;
                    l.retries = 0;
                    l.next_attempt = None;
                    l.last_error = None;
                    l.error_kind = None;
                    Some(retries)
                }
                None => Some(0),
            }
        });
        if let Some(retries) = recovered {
            if retries > 0 {
                tracing::info!(database = %self.database, retries, "streaming recovered: the target is past the point where the stream broke");
            }
            self.set_state(StreamState::Streaming);
        }
        recovered.is_some_and(|r| r > 0)
    }

    /// A session ended with `err`; the next attempt is in `backoff`.
    /// Returns the number of failed attempts in a row.
    fn failed(&self, err: &StreamError, backoff: Duration) -> u32 {
        let state = match err {
            StreamError::Apply(e) if StreamError::kind(err) == "apply" && !e.is_transient() => {
                StreamState::ApplyStopped
            }
            _ => StreamState::Retrying,
        };
        let retries = self.with(|l| {
            l.last_error = Some(err.to_string());
            l.error_kind = Some(err.kind());
            l.retries += 1;
            l.errors_total += 1;
            l.next_attempt = chrono::Duration::from_std(backoff)
                .ok()
                .map(|d| chrono::Utc::now() + d);
            let at = l.received.max(l.applied);
            l.recover_at = Some(l.recover_at.map_or(at, |p| p.max(at)));
            l.retries
        });
        self.set_state(state);
        retries
    }
}

impl Report for StreamStatus {
    fn report(&self) -> Value {
        self.with(|l| {
            json!({
                "state": l.state.as_str(),
                "healthy": l.state == StreamState::Streaming,
                "received_lsn": l.received.to_string(),
                "applied_lsn": l.applied.to_string(),
                "committed_lsn": l.committed.to_string(),
                "transaction_in_flight": l.in_flight,
                "streamed_transactions_open": l.streamed_open,
                "source_lsn": l.source_current.to_string(),
                "lag_bytes": l.lag_bytes,
                "lag_seconds": (l.lag_seconds * 1000.0).round() / 1000.0,
                "slot_retained_bytes": l.slot_retained,
                "transactions_applied": l.transactions,
                "last_error": l.last_error,
                "error_kind": l.error_kind,
                "retries": l.retries,
                "errors_total": l.errors_total,
                "next_attempt_at": l.next_attempt.map(|t| t.to_rfc3339()),
            })
        })
    }
}

/// Everything one database's stream needs.
#[derive(Clone)]
pub struct StreamConfig {
    pub migration: String,
    pub database: String,
    pub source: Endpoint,
    pub target: Endpoint,
    /// Where the copy ended (the slot's consistent point).
    pub consistent_point: Lsn,
    /// DDL replication (`[migration] ddl`); None: none configured here.
    pub ddl: Option<StreamDdl>,
    /// Transactions committed under this replication origin are not applied:
    /// the other direction of the migration applied them (see
    /// `origin_filter`). None: every transaction is applied.
    pub drop_origin: Option<String>,
    /// `[migration] logical_decoding_work_mem`: the most of an open
    /// transaction the source's walsender holds before streaming it (14+;
    /// only ever lowered). None: the server's setting.
    pub decoding_work_mem: Option<u64>,
}

/// What a stream needs for DDL: the shared control, the migration's table
/// filter, and whether the source captures DDL.
#[derive(Clone)]
pub struct StreamDdl {
    pub control: Arc<crate::replication::ddl::DdlControl>,
    pub filter: crate::filter::TableFilter,
    /// Run on the target after DDL that created tables (see [`ApplyDdl`]).
    pub after_create: Option<String>,
}

/// A running stream for one database.
pub struct DatabaseStream {
    pub database: String,
    pub status: Arc<StreamStatus>,
    markers: watch::Receiver<Vec<Marker>>,
    stop: CancellationToken,
    task: Option<JoinHandle<()>>,
    lag_task: JoinHandle<()>,
    cfg: StreamConfig,
}

const STATUS_INTERVAL: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(10);

impl DatabaseStream {
    pub fn start(cfg: StreamConfig, metrics: StreamMetrics) -> DatabaseStream {
        // Every error kind is exported from the start, at 0, so a rate or an
        // alert on it works before the first error.
        for kind in StreamError::KINDS {
            metrics.errors.with_label_values(&[&cfg.database, kind]);
        }
        // Until the stream starts, the target holds what the copy did.
        let status = Arc::new(StreamStatus::new(
            &cfg.database,
            cfg.consistent_point,
            metrics.state.clone(),
        ));
        let (marker_tx, markers) = watch::channel(Vec::new());
        let stop = CancellationToken::new();
        let lag_task = tokio::spawn(lag_loop(
            cfg.clone(),
            metrics.clone(),
            status.clone(),
            stop.clone(),
        ));
        let task = tokio::spawn(run_with_retries(
            cfg.clone(),
            metrics,
            status.clone(),
            marker_tx,
            stop.clone(),
        ));
        DatabaseStream {
            database: cfg.database.clone(),
            status,
            markers,
            stop,
            task: Some(task),
            lag_task,
            cfg,
        }
    }

    /// Emits a marker on the source database and waits until apply has
    /// committed it on the target: then every transaction committed on the
    /// source before it is on the target. Opens its own source connection.
    pub async fn catch_up(&self, id: &str, timeout: Duration) -> Result<Lsn, CatchUpError> {
        let names = ReplicationNames::new(&self.cfg.migration, &self.database);
        let src = MarkerConnection::connect(&self.cfg.source.with_dbname(&self.database), &names)
            .await
            .map_err(|e| CatchUpError::Emit {
                database: self.database.clone(),
                error: e.to_string(),
            })?;
        let lsn = self.emit_marker(&src, id).await?;
        // Patient: a stream that breaks and recovers within `timeout` is fine.
        self.wait_for_marker(id, timeout, false).await?;
        Ok(lsn)
    }

    /// Emits the marker `id` on a source connection for markers; returns
    /// its position.
    pub(crate) async fn emit_marker(
        &self,
        src: &MarkerConnection,
        id: &str,
    ) -> Result<Lsn, CatchUpError> {
        src.emit(id).await.map_err(|e| CatchUpError::Emit {
            database: self.database.clone(),
            error: crate::db::describe(&e),
        })
    }

    /// Waits until apply has committed the marker `id`, for at most
    /// `timeout`; ends at once when the stream is not healthy (the cutover
    /// must not hold clients for a stream it knows is broken).
    pub(crate) async fn wait_marker(
        &self,
        id: &str,
        timeout: Duration,
    ) -> Result<(), CatchUpError> {
        self.wait_for_marker(id, timeout, true).await
    }

    async fn wait_for_marker(
        &self,
        id: &str,
        timeout: Duration,
        fail_fast: bool,
    ) -> Result<(), CatchUpError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut markers = self.markers.clone();
        let mut changed = self.status.changed.subscribe();
        loop {
            if markers.borrow_and_update().iter().any(|m| m.id == id) {
                return Ok(());
            }
            changed.borrow_and_update();
            if fail_fast {
                self.status
                    .health()
                    .map_err(|u| CatchUpError::Unhealthy(u.detail))?;
            }
            tokio::select! {
                r = markers.changed() => if r.is_err() {
                    return Err(CatchUpError::Unhealthy(format!("database {}: the stream stopped", self.database)));
                },
                _ = changed.changed() => {}
                _ = tokio::time::sleep_until(deadline) => {
                    return Err(CatchUpError::Timeout(format!(
                        "database {}: marker {id} not applied within {timeout:?} (stream {}, lag {} bytes)",
                        self.database,
                        self.status.state(),
                        self.status.lag_bytes(),
                    )));
                }
            }
        }
    }

    /// Stops streaming (what is received and complete is committed first).
    pub async fn stop(mut self) {
        self.stop.cancel();
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }

    /// Stops at once, committing nothing more (as a crash would).
    pub fn abort(self) {}
}

impl Drop for DatabaseStream {
    fn drop(&mut self) {
        self.stop.cancel();
        if let Some(t) = self.task.take() {
            t.abort();
        }
        self.lag_task.abort();
    }
}

/// Apply's DDL options for a session: in replicate mode, the capture's
/// names and the key that signs its events, read from the source.
async fn ddl_options(cfg: &StreamConfig) -> Result<Option<ApplyDdl>, StreamError> {
    use crate::replication::ddl::capture;
    let Some(d) = &cfg.ddl else {
        return Ok(None);
    };
    if d.control.setting == crate::config::DdlSetting::Stop {
        d.control.set_capturing(&cfg.database, false);
        return Ok(None);
    }
    let names = capture::CaptureNames::new(&ReplicationNames::new(&cfg.migration, &cfg.database));
    let src = crate::db::connect(
        &cfg.source.with_dbname(&cfg.database),
        "source (DDL capture)",
    )
    .await
    .map_err(ReplicationError::from)?;
    let key = capture::read_key(&src, &names).await?;
    d.control.export(&cfg.database);
    d.control.set_capturing(&cfg.database, key.is_some());
    let Some(key) = key else {
        // Not installed (the source forbids event triggers): a schema
        // change shows as a mismatch and stops apply.
        return Ok(None);
    };
    Ok(Some(ApplyDdl {
        control: d.control.clone(),
        names,
        key: Some(key.0),
        filter: d.filter.clone(),
        after_create: d.after_create.clone(),
    }))
}

/// The outer loop: run a session, and on any error wait and start again
/// from the origin position.
async fn run_with_retries(
    cfg: StreamConfig,
    metrics: StreamMetrics,
    status: Arc<StreamStatus>,
    markers: watch::Sender<Vec<Marker>>,
    stop: CancellationToken,
) {
    let mut backoff = Duration::from_millis(200);
    loop {
        let started = Instant::now();
        let result = session(&cfg, &metrics, &status, &markers, &stop).await;
        if stop.is_cancelled() {
            status.set_state(StreamState::Stopped);
            break;
        }
        let err = match result {
            Ok(()) => StreamError::Ended,
            Err(e) => e,
        };
        if started.elapsed() > Duration::from_secs(30) {
            backoff = Duration::from_millis(200);
        }
        metrics
            .errors
            .with_label_values(&[&cfg.database, err.kind()])
            .inc();
        let attempt = status.failed(&err, backoff);
        let ddl = cfg.ddl.as_ref().map(|d| d.control.clone());
        if let (Some(control), StreamError::Apply(e)) = (&ddl, &err)
            && let Some(stop) = e.ddl_stop()
        {
            control.stopped(stop);
        }
        let signal = ddl.as_ref().map(|c| c.retry_signal(&cfg.database));
        let retry_now = async {
            match &signal {
                Some(s) => s.notified().await,
                None => std::future::pending().await,
            }
        };
        tracing::warn!(
            database = %cfg.database,
            kind = err.kind(),
            state = %status.state(),
            attempt,
            "streaming interrupted, retrying in {backoff:?}: {err}"
        );
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            // `pgshift ddl retry|skip|apply`: try again now.
            _ = retry_now => {}
            _ = stop.cancelled() => { status.set_state(StreamState::Stopped); break; }
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// One connected session: applier + replication stream, until error or stop.
async fn session(
    cfg: &StreamConfig,
    metrics: &StreamMetrics,
    status: &Arc<StreamStatus>,
    markers: &watch::Sender<Vec<Marker>>,
    stop: &CancellationToken,
) -> Result<(), StreamError> {
    let db = &cfg.database;
    status.connecting();
    let mut apply_opts = ApplyOptions::new(&cfg.migration, db);
    apply_opts.source = Some(cfg.source.with_dbname(db));
    apply_opts.ddl = ddl_options(cfg).await?;
    let mut applier = Applier::connect(
        &cfg.target.with_dbname(db),
        apply_opts,
        Some(metrics.apply.clone()),
    )
    .await?;
    forward_markers(&applier, markers.clone());
    let names = ReplicationNames::new(&cfg.migration, db);
    let start = applier.applied_position().max(cfg.consistent_point);
    let conn = ReplicationConnection::connect(&cfg.source, db, "pgshift-replication")
        .await
        .map_err(StreamError::Source)?;
    let version = conn.server_version().ok_or(StreamError::NoServerVersion)?;
    // Markers are logical messages on 14+, rows of the marker table before.
    let mut opts = StreamOptions::for_server(&names.slot, start, &names.publication, version);
    opts.decoding_work_mem = cfg.decoding_work_mem;
    let mut stream = conn
        .start_replication(&opts)
        .await
        .map_err(StreamError::Source)?;
    tracing::info!(database = %db, slot = %names.slot, start = %start, "streaming changes");
    status.confirmed(start);

    // This session's stream is decoded here; apply gets typed messages.
    let mut decoder = Decoder::new();
    let mut filter = cfg.drop_origin.clone().map(OriginFilter::new);
    // The position the target holds; only this is ever reported as flushed.
    let mut confirmed = applier.applied_position().max(start);
    let mut keepalive_end = Lsn::ZERO;
    let mut tick = tokio::time::interval(STATUS_INTERVAL);
    loop {
        tokio::select! {
            biased;
            _ = stop.cancelled() => {
                let applied = applier.flush().await?;
                confirmed = confirmed.max(applied);
                let flushed = durable(&mut applier, keepalive_end).await?;
                let _ = stream.send_status(confirmed, flushed, flushed, false).await;
                let _ = stream.stop().await;
                return Ok(());
            }
            msg = stream.next() => {
                match msg.map_err(StreamError::Source)? {
                    None => return Ok(()),
                    Some(ReplicationMessage::XLogData { data, .. }) => {
                        let msg = decoder.decode(data.clone())?;
                        match filter.as_mut() {
                            None => applier.handle_with_bytes(msg, Some(data)).await?,
                            Some(f) => for (m, raw) in f.pass(msg, Some(data)) {
                                applier.handle_with_bytes(m, raw).await?;
                            },
                        }
                    }
                    // Not while a transaction apply has not seen is open:
                    // its end is not applied.
                    Some(ReplicationMessage::Keepalive { reply_requested, .. })
                        if filter.as_ref().is_some_and(OriginFilter::busy) =>
                    {
                        confirmed = commit_and_confirm(&mut applier, confirmed, Lsn::ZERO).await?;
                        if reply_requested {
                            let flushed = durable(&mut applier, Lsn::ZERO).await?;
                            stream.send_status(confirmed, flushed, flushed, false).await.map_err(StreamError::Source)?;
                        }
                    }
                    Some(ReplicationMessage::Keepalive { wal_end, reply_requested, .. }) => {
                        keepalive_end = keepalive_end.max(wal_end);
                        confirmed = commit_and_confirm(&mut applier, confirmed, keepalive_end).await?;
                        if reply_requested {
                            let flushed = durable(&mut applier, keepalive_end).await?;
                            stream.send_status(confirmed, flushed, flushed, false).await.map_err(StreamError::Source)?;
                        }
                    }
                }
                status.with(|l| l.received = stream.received_lsn());
            }
            // Nothing more arrived right now: commit what is complete, so a
            // quiet stream never holds committed work back.
            _ = tokio::task::yield_now(), if applier.has_pending() => {
                confirmed = commit_and_confirm(&mut applier, confirmed, Lsn::ZERO).await?;
            }
            _ = tick.tick() => {
                confirmed = commit_and_confirm(&mut applier, confirmed, Lsn::ZERO).await?;
                // Ask for a keepalive so an idle stream learns the server's end.
                let flushed = durable(&mut applier, keepalive_end).await?;
                stream.send_status(confirmed, flushed, flushed, true).await.map_err(StreamError::Source)?;
            }
        }
        let stats = applier.stats();
        let (committed, in_flight) = (applier.applied_position(), !applier.is_idle());
        let streamed_open = applier.streamed_open();
        status.with(|l| {
            l.transactions = stats.transactions;
            l.pending_since = stats.pending_since;
            l.committed = committed;
            l.in_flight = in_flight;
            l.streamed_open = streamed_open;
        });
        // Apply also commits on its own (a full group): what the target
        // holds is at least its committed position, also while a backlog
        // keeps the branches that confirm from running.
        if status.confirmed(confirmed.max(applier.applied_position()))
            && let Some(d) = &cfg.ddl
        {
            // Past the point where a schema change stopped it.
            d.control.resumed(db);
        }
        metrics
            .applied_lsn
            .with_label_values(&[db])
            .set(committed.0 as i64);
        metrics
            .received_lsn
            .with_label_values(&[db])
            .set(stream.received_lsn().0 as i64);
    }
}

/// The position to report to the source as flushed: the target's flushed
/// origin progress (apply commits asynchronously), plus the keepalive end
/// when nothing received is unapplied and everything committed is flushed.
/// Never more: the source may discard WAL up to what is reported.
async fn durable(applier: &mut Applier, keepalive_end: Lsn) -> Result<Lsn, StreamError> {
    if !applier.is_idle() {
        // Mid-transaction: the last query still stands; report nothing new.
        return Ok(Lsn::ZERO);
    }
    let d = applier.durable_position().await?;
    if d >= applier.applied_position() {
        Ok(d.max(keepalive_end))
    } else {
        Ok(d)
    }
}

/// Commits complete transactions and returns the position the target holds.
/// The keepalive end counts only when nothing received is still unapplied:
/// a keepalive never moves the position past a transaction not applied.
async fn commit_and_confirm(
    applier: &mut Applier,
    confirmed: Lsn,
    keepalive_end: Lsn,
) -> Result<Lsn, StreamError> {
    applier.check_streamed().await?;
    let applied = if applier.has_pending() {
        applier.flush().await?
    } else {
        applier.applied_position()
    };
    let mut c = confirmed.max(applied);
    if applier.is_idle() {
        c = c.max(keepalive_end);
    }
    Ok(c)
}

/// Copies the applier's committed markers into the stream's own channel,
/// which outlives reconnects.
fn forward_markers(applier: &Applier, tx: watch::Sender<Vec<Marker>>) {
    let mut rx = applier.subscribe();
    tokio::spawn(async move {
        while rx.changed().await.is_ok() {
            let new: Vec<Marker> = rx.borrow_and_update().markers.clone();
            tx.send_modify(|all| {
                for m in new {
                    if !all.contains(&m) {
                        all.push(m);
                    }
                }
                let excess = all.len().saturating_sub(256);
                all.drain(..excess);
            });
        }
    });
}

/// Once a second: the source's current position, the slot's retained WAL,
/// and from them lag in bytes and seconds.
async fn lag_loop(
    cfg: StreamConfig,
    metrics: StreamMetrics,
    status: Arc<StreamStatus>,
    stop: CancellationToken,
) {
    let names = ReplicationNames::new(&cfg.migration, &cfg.database);
    let db = cfg.database.clone();
    let mut client = None;
    let mut tick = tokio::time::interval(STATUS_INTERVAL);
    let mut ticks: u64 = 0;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => return,
        }
        ticks += 1;
        // A long phase reports progress in the logs too, not only in metrics.
        if ticks.is_multiple_of(30) {
            status.with(|l| {
                tracing::info!(
                    database = %db,
                    state = l.state.as_str(),
                    lag_bytes = l.lag_bytes,
                    lag_seconds = format!("{:.1}", l.lag_seconds),
                    applied_lsn = %l.applied,
                    transactions_applied = l.transactions,
                    "streaming progress"
                )
            });
        }
        if client.is_none() {
            client = crate::db::connect(&cfg.source, "source (lag)").await.ok();
        }
        let Some(c) = &client else { continue };
        let row = c
            .query_one(
                "SELECT pg_current_wal_lsn()::text,
                        coalesce((SELECT pg_current_wal_lsn() - restart_lsn FROM pg_replication_slots WHERE slot_name = $1), 0)::bigint",
                &[&names.slot],
            )
            .await;
        let row = match row {
            Ok(r) => r,
            Err(_) => {
                client = None;
                continue;
            }
        };
        let current: Lsn = row.get::<_, String>(0).parse().unwrap_or_default();
        let retained: i64 = row.get(1);
        let now = Instant::now();
        let (lag_bytes, lag_seconds) = status.with(|l| {
            l.source_current = current;
            l.slot_retained = retained.max(0) as u64;
            l.samples.push_back((now, current));
            while l.samples.len() > 3600 {
                l.samples.pop_front();
            }
            let held = l.held();
            l.lag_bytes = current.0.saturating_sub(held.0);
            l.lag_seconds = if held >= current {
                0.0
            } else {
                // The samples reach back only to this stream's start; a
                // transaction received but not applied tells its own age.
                let sampled = caught_up_at(&l.samples, held)
                    .map_or(0.0, |t| now.duration_since(t).as_secs_f64());
                let pending = l.pending_since.map_or(0.0, |t| {
                    let unix = t.saturating_add(super::pgoutput::PG_EPOCH_OFFSET_MICROS);
                    (chrono::Utc::now().timestamp_micros() - unix).max(0) as f64 / 1e6
                });
                sampled.max(pending)
            };
            (l.lag_bytes, l.lag_seconds)
        });
        metrics
            .lag_bytes
            .with_label_values(&[&db])
            .set(lag_bytes as i64);
        metrics
            .lag_seconds
            .with_label_values(&[&db])
            .set(lag_seconds);
        metrics
            .slot_retained_bytes
            .with_label_values(&[&db])
            .set(retained.max(0));
    }
}

/// When the source was exactly where the target is now: interpolated
/// between the samples around `applied`, so lag in seconds is not rounded
/// to the sampling interval. None when no sample is past `applied`.
fn caught_up_at(samples: &VecDeque<(Instant, Lsn)>, applied: Lsn) -> Option<Instant> {
    let after = samples.iter().position(|(_, lsn)| *lsn > applied)?;
    if after == 0 {
        // Behind even the oldest sample: as old as we know.
        return samples.front().map(|(t, _)| *t);
    }
    let (t0, l0) = samples[after - 1];
    let (t1, l1) = samples[after];
    let span = (l1.0 - l0.0) as f64;
    let frac = if span > 0.0 {
        (applied.0 - l0.0) as f64 / span
    } else {
        1.0
    };
    Some(t0 + t1.duration_since(t0).mul_f64(frac.clamp(0.0, 1.0)))
}

impl std::fmt::Debug for StreamStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "StreamStatus({})", self.database)
    }
}

#[cfg(test)]
mod lag_tests {
    use super::*;

    #[test]
    fn lag_time_is_interpolated_between_samples() {
        let base = Instant::now();
        let samples: VecDeque<_> = [(0u64, 100u64), (1000, 200), (2000, 400)]
            .into_iter()
            .map(|(ms, lsn)| (base + Duration::from_millis(ms), Lsn(lsn)))
            .collect();
        // Halfway between the second and third sample.
        let t = caught_up_at(&samples, Lsn(300)).unwrap();
        assert_eq!(t.duration_since(base), Duration::from_millis(1500));
        // Exactly at a sample.
        let t = caught_up_at(&samples, Lsn(200)).unwrap();
        assert_eq!(t.duration_since(base), Duration::from_millis(1000));
        // Behind the oldest sample: the oldest time.
        assert_eq!(caught_up_at(&samples, Lsn(50)).unwrap(), base);
        // Past every sample: nothing is pending as far as samples know.
        assert!(caught_up_at(&samples, Lsn(500)).is_none());
    }
}
