//! Change streaming for one database: START_REPLICATION from where the
//! target's origin says apply is, decode, apply, and report to the source
//! only what the target has committed. Reconnects with backoff on any error
//! (a lost source or target, or an apply error the operator must fix) and
//! resumes exactly at the origin position. Also owns the lag numbers.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus::{GaugeVec, IntGaugeVec};
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::Lsn;
use super::apply::{self, Applier, ApplyMetrics, ApplyOptions, Marker};
use super::client::{ReplicationConnection, ReplicationMessage, StreamOptions};
use super::marker::PreparedMarker;
use super::names::ReplicationNames;
use crate::admin::status::Report;
use crate::config::Endpoint;

/// Streaming metrics, shared by every database's stream.
#[derive(Clone)]
pub struct StreamMetrics {
    pub lag_bytes: IntGaugeVec,
    pub lag_seconds: GaugeVec,
    pub received_lsn: IntGaugeVec,
    pub applied_lsn: IntGaugeVec,
    pub slot_retained_bytes: IntGaugeVec,
    pub apply: ApplyMetrics,
}

impl StreamMetrics {
    pub fn register(reg: &prometheus::Registry) -> StreamMetrics {
        use crate::admin::metrics as m;
        StreamMetrics {
            lag_bytes: m::int_gauge_vec(
                reg,
                "pgshift_replication_lag_bytes",
                "Source pg_current_wal_lsn() minus the last LSN the target has committed, in bytes",
                &["database"],
            ),
            lag_seconds: m::gauge_vec(
                reg,
                "pgshift_replication_lag_seconds",
                "Seconds since the target last held everything the source had (0 when nothing is pending)",
                &["database"],
            ),
            received_lsn: m::int_gauge_vec(
                reg,
                "pgshift_replication_received_lsn",
                "Last WAL position received from the source, as a number (bytes)",
                &["database"],
            ),
            applied_lsn: m::int_gauge_vec(
                reg,
                "pgshift_replication_applied_lsn",
                "Last WAL position the target has committed, as a number (bytes)",
                &["database"],
            ),
            slot_retained_bytes: m::int_gauge_vec(
                reg,
                "pgshift_replication_slot_retained_bytes",
                "WAL the migration's replication slot holds back on the source, in bytes",
                &["database"],
            ),
            apply: ApplyMetrics::register(reg),
        }
    }
}

/// Live numbers of one database's stream (for /status, lag and cutover).
#[derive(Default)]
struct Live {
    state: &'static str,
    received: Lsn,
    /// What the target holds: the last committed commit LSN, or the
    /// keepalive end when nothing received is still unapplied.
    applied: Lsn,
    source_current: Lsn,
    lag_bytes: u64,
    lag_seconds: f64,
    slot_retained: u64,
    last_error: Option<String>,
    /// (time, source position) samples, to know when the source was where
    /// the target is now.
    samples: VecDeque<(Instant, Lsn)>,
    transactions: u64,
}

pub struct StreamStatus {
    database: String,
    live: Mutex<Live>,
}

impl StreamStatus {
    fn with<R>(&self, f: impl FnOnce(&mut Live) -> R) -> R {
        f(&mut self.live.lock().unwrap_or_else(|e| e.into_inner()))
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

    pub fn state(&self) -> &'static str {
        self.with(|l| l.state)
    }
}

impl Report for StreamStatus {
    fn report(&self) -> Value {
        self.with(|l| {
            json!({
                "state": l.state,
                "received_lsn": l.received.to_string(),
                "applied_lsn": l.applied.to_string(),
                "source_lsn": l.source_current.to_string(),
                "lag_bytes": l.lag_bytes,
                "lag_seconds": (l.lag_seconds * 1000.0).round() / 1000.0,
                "slot_retained_bytes": l.slot_retained,
                "transactions_applied": l.transactions,
                "last_error": l.last_error,
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
        let status = Arc::new(StreamStatus {
            database: cfg.database.clone(),
            live: Mutex::new(Live {
                state: "starting",
                // Until the stream starts, the target holds what the copy did.
                applied: cfg.consistent_point,
                ..Default::default()
            }),
        });
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
    pub async fn catch_up(&self, id: &str, timeout: Duration) -> Result<Lsn, String> {
        let names = ReplicationNames::new(&self.cfg.migration, &self.database);
        let src = marker_connection(&self.cfg.source.with_dbname(&self.database), &names).await?;
        self.catch_up_on(&src, id, timeout).await
    }

    /// Like [`catch_up`](Self::catch_up) on a connection from [`marker_connection`].
    pub async fn catch_up_on(
        &self,
        src: &MarkerConnection,
        id: &str,
        timeout: Duration,
    ) -> Result<Lsn, String> {
        let deadline = Instant::now() + timeout;
        let lsn = apply::emit_marker_with(&src.client, &src.emit, id)
            .await
            .map_err(|e| crate::db::describe(&e))?;
        let mut rx = self.markers.clone();
        let wait = async {
            loop {
                if rx.borrow_and_update().iter().any(|m| m.id == id) {
                    return Ok(lsn);
                }
                if rx.changed().await.is_err() {
                    return Err("the stream stopped".to_string());
                }
            }
        };
        match tokio::time::timeout_at(deadline.into(), wait).await {
            Ok(r) => r,
            Err(_) => Err(format!(
                "database {}: marker at {lsn} not applied within {timeout:?} (stream: {}, lag {} bytes{})",
                self.database,
                self.status.state(),
                self.status.lag_bytes(),
                self.status
                    .last_error()
                    .map(|e| format!(", last error: {e}"))
                    .unwrap_or_default()
            )),
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

/// A source connection for the markers of the migration's database `names`
/// belongs to: it must write through the fence, and its commit is flushed
/// at once so the walsender sends it without waiting for the WAL writer
/// (the source may run with synchronous_commit = off).
pub async fn marker_connection(
    source_db: &Endpoint,
    names: &ReplicationNames,
) -> Result<MarkerConnection, String> {
    let client = crate::db::connect(source_db, "source (marker)")
        .await
        .map_err(|e| e.to_string())?;
    client.batch_execute(
        "SET default_transaction_read_only = off; SET synchronous_commit = on; SET application_name = 'pgshift-marker'",
    )
    .await
    .map_err(|e| crate::db::describe(&e))?;
    let emit = apply::prepare_marker(&client, names)
        .await
        .map_err(|e| crate::db::describe(&e))?;
    Ok(MarkerConnection { client, emit })
}

/// A source connection for markers with the marker statement prepared.
pub struct MarkerConnection {
    client: tokio_postgres::Client,
    emit: PreparedMarker,
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
            status.with(|l| l.state = "stopped");
            break;
        }
        let msg = match result {
            Ok(()) => "the source ended the replication stream".to_string(),
            Err(e) => e,
        };
        tracing::warn!(database = %cfg.database, "streaming interrupted, retrying in {backoff:?}: {msg}");
        status.with(|l| {
            l.last_error = Some(msg);
            if l.state != "apply_stopped" {
                l.state = "retrying";
            }
        });
        if started.elapsed() > Duration::from_secs(30) {
            backoff = Duration::from_millis(200);
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stop.cancelled() => { status.with(|l| l.state = "stopped"); break; }
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
) -> Result<(), String> {
    let db = &cfg.database;
    status.with(|l| l.state = "connecting");
    let mut applier = Applier::connect(
        &cfg.target.with_dbname(db),
        ApplyOptions::new(&cfg.migration, db),
        Some(metrics.apply.clone()),
    )
    .await
    .map_err(|e| e.to_string())?;
    forward_markers(&applier, markers.clone());
    let names = ReplicationNames::new(&cfg.migration, db);
    let start = applier.applied_position().max(cfg.consistent_point);
    let conn = ReplicationConnection::connect(&cfg.source, db, "pgshift-replication")
        .await
        .map_err(|e| e.to_string())?;
    let version = conn
        .server_version()
        .ok_or("the source did not report its server_version")?;
    // Markers are logical messages on 14+, rows of the marker table before.
    let opts = StreamOptions::for_server(&names.slot, start, &names.publication, version);
    let mut stream = conn
        .start_replication(&opts)
        .await
        .map_err(|e| e.to_string())?;
    tracing::info!(database = %db, slot = %names.slot, start = %start, "streaming changes");
    status.with(|l| {
        l.state = "streaming";
        l.applied = l.applied.max(start);
    });

    // The position the target holds; only this is ever reported as flushed.
    let mut confirmed = applier.applied_position().max(start);
    let mut keepalive_end = Lsn::ZERO;
    let mut tick = tokio::time::interval(STATUS_INTERVAL);
    loop {
        tokio::select! {
            biased;
            _ = stop.cancelled() => {
                let applied = applier.flush().await.map_err(|e| e.to_string())?;
                confirmed = confirmed.max(applied);
                let flushed = durable(&mut applier, keepalive_end).await?;
                let _ = stream.send_status(confirmed, flushed, flushed, false).await;
                let _ = stream.stop().await;
                return Ok(());
            }
            msg = stream.next() => {
                match msg.map_err(|e| e.to_string())? {
                    None => return Ok(()),
                    Some(ReplicationMessage::XLogData { data, .. }) => {
                        if let Err(e) = applier.handle_xlogdata(data).await {
                            status.with(|l| l.state = "apply_stopped");
                            return Err(e.to_string());
                        }
                    }
                    Some(ReplicationMessage::Keepalive { wal_end, reply_requested, .. }) => {
                        keepalive_end = keepalive_end.max(wal_end);
                        confirmed = commit_and_confirm(&mut applier, confirmed, keepalive_end).await?;
                        if reply_requested {
                            let flushed = durable(&mut applier, keepalive_end).await?;
                            stream.send_status(confirmed, flushed, flushed, false).await.map_err(|e| e.to_string())?;
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
                stream.send_status(confirmed, flushed, flushed, true).await.map_err(|e| e.to_string())?;
            }
        }
        let stats = applier.stats();
        status.with(|l| {
            l.applied = l.applied.max(confirmed);
            l.transactions = stats.transactions;
            if l.state != "streaming" {
                l.state = "streaming";
            }
        });
        metrics
            .applied_lsn
            .with_label_values(&[db])
            .set(confirmed.0 as i64);
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
async fn durable(applier: &mut Applier, keepalive_end: Lsn) -> Result<Lsn, String> {
    if !applier.is_idle() {
        // Mid-transaction: the last query still stands; report nothing new.
        return Ok(Lsn::ZERO);
    }
    let d = applier
        .durable_position()
        .await
        .map_err(|e| e.to_string())?;
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
) -> Result<Lsn, String> {
    let applied = if applier.has_pending() {
        applier.flush().await.map_err(|e| e.to_string())?
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
                    state = l.state,
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
            l.lag_bytes = current.0.saturating_sub(l.applied.0);
            l.lag_seconds = if l.applied >= current {
                0.0
            } else {
                match caught_up_at(&l.samples, l.applied) {
                    Some(t) => now.duration_since(t).as_secs_f64(),
                    None => 0.0,
                }
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
