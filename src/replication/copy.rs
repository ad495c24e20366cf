//! The consistent parallel initial copy of one database.
//!
//! Every worker imports the same exported snapshot on the source, so all of
//! them see the database as of one instant (the slot's consistent point), and
//! streams tables with COPY … TO STDOUT straight into COPY … FROM STDIN on the
//! target — no intermediate files. Large tables are split into ctid block
//! ranges (TID range scans, PostgreSQL 14+) that run in parallel.

use std::collections::VecDeque;
use std::io::IsTerminal;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use futures_util::{SinkExt, StreamExt};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use prometheus::{IntCounterVec, IntGaugeVec, Opts, Registry};
use serde::Serialize;
use thiserror::Error;

use crate::filter::TableFilter;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use crate::config::{Endpoint, MigrationConfig};
use crate::db::{self, DbError, quote_literal};
use crate::pg::tables::{CopiedTable, SourceTable, list_tables};

/// A split table is cut into at most this many ranges.
const MAX_PARTS: u64 = 256;
/// Bytes gathered from the source before one CopyData goes to the target
/// (the source sends one message per row).
const BATCH_BYTES: usize = 256 * 1024;

#[derive(Debug, Error)]
pub enum CopyError {
    #[error("{0}")]
    Connect(#[from] DbError),
    #[error("{0}")]
    Catalog(#[from] crate::pg::tables::CatalogError),
    #[error("{what}: {}", crate::db::describe(.source))]
    Sql {
        what: String,
        source: tokio_postgres::Error,
    },
    #[error("copying table {table}: {}", crate::db::describe(.source))]
    Table {
        table: String,
        source: tokio_postgres::Error,
    },
    #[error("a copy worker stopped unexpectedly: {0}")]
    Worker(String),
    #[error("the copy was canceled")]
    Canceled,
}

fn sql_err(what: impl Into<String>) -> impl FnOnce(tokio_postgres::Error) -> CopyError {
    let what = what.into();
    move |source| CopyError::Sql { what, source }
}

/// Settings of one database's copy.
#[derive(Clone, Debug)]
pub struct CopyOptions {
    /// Parallel workers (each one source and one target connection).
    pub jobs: usize,
    /// Tables larger than this (bytes, heap + TOAST) are copied in ranges.
    pub split_larger_than: u64,
    pub filter: TableFilter,
}

impl CopyOptions {
    pub(crate) fn from_config(m: &MigrationConfig) -> CopyOptions {
        CopyOptions {
            jobs: m.copy_jobs,
            split_larger_than: m.split_tables_larger_than.0,
            filter: TableFilter::from_migration(m),
        }
    }
}

async fn server_version(c: &Client) -> Result<crate::pg::Version, CopyError> {
    crate::pg::Version::of(c)
        .await
        .map_err(sql_err("reading the server version"))
}

/// The state of one table's copy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TableState {
    Queued,
    Copying,
    Copied,
    Error,
}

impl TableState {
    const ALL: [TableState; 4] = [
        TableState::Queued,
        TableState::Copying,
        TableState::Copied,
        TableState::Error,
    ];
    fn label(self) -> &'static str {
        match self {
            TableState::Queued => "queued",
            TableState::Copying => "copying",
            TableState::Copied => "copied",
            TableState::Error => "error",
        }
    }
}

/// Progress of one table.
#[derive(Clone, Debug, Serialize)]
pub struct TableProgress {
    pub table: String,
    pub state: TableState,
    /// Rows committed on the target.
    pub rows: u64,
    /// COPY bytes streamed so far.
    pub bytes: u64,
    /// Size on the source (heap + TOAST), for estimates.
    pub size_bytes: u64,
    /// Ranges the table is copied in (1 when not split) and how many are done.
    pub parts: u32,
    pub parts_done: u32,
    /// "binary" or "text" COPY.
    pub format: &'static str,
    pub seconds: f64,
    pub error: Option<String>,
}

/// The copy metrics, registered once per registry and shared by every
/// database's [`CopyProgress`].
#[derive(Clone)]
pub struct CopyMetrics {
    tables: IntGaugeVec,
    rows: IntCounterVec,
    bytes: IntCounterVec,
}

impl CopyMetrics {
    pub fn register(reg: &Registry) -> Result<CopyMetrics, prometheus::Error> {
        let tables = IntGaugeVec::new(
            Opts::new(
                "pgshift_copy_tables",
                "Tables of the initial copy by database and state (queued, copying, copied, error)",
            ),
            &["database", "state"],
        )?;
        let rows = IntCounterVec::new(
            Opts::new(
                "pgshift_copy_rows_total",
                "Rows written to the target by the initial copy",
            ),
            &["database"],
        )?;
        let bytes = IntCounterVec::new(
            Opts::new(
                "pgshift_copy_bytes_total",
                "COPY bytes streamed from source to target by the initial copy",
            ),
            &["database"],
        )?;
        reg.register(Box::new(tables.clone()))?;
        reg.register(Box::new(rows.clone()))?;
        reg.register(Box::new(bytes.clone()))?;
        Ok(CopyMetrics {
            tables,
            rows,
            bytes,
        })
    }
}

struct ProgressInner {
    tables: Vec<TableProgress>,
    oids: Vec<u32>,
    /// Where completed tables are announced; dropped when the copy ends.
    copied_tx: Option<tokio::sync::mpsc::UnboundedSender<CopiedTable>>,
    started: Vec<Option<Instant>>,
    started_at: Option<Instant>,
    finished_seconds: Option<f64>,
}

/// Live progress of one database's copy, shared with `/status`.
pub struct CopyProgress {
    database: String,
    metrics: Option<CopyMetrics>,
    inner: Mutex<ProgressInner>,
    bar: ProgressBar,
}

/// A point-in-time view of [`CopyProgress`] (the `/status` document).
#[derive(Clone, Debug, Serialize)]
pub struct CopyProgressSnapshot {
    pub database: String,
    pub tables_total: usize,
    pub tables_queued: usize,
    pub tables_copying: usize,
    pub tables_copied: usize,
    pub tables_error: usize,
    pub rows: u64,
    pub bytes: u64,
    /// Source size of the tables (heap + TOAST), for a rough percentage.
    pub size_bytes: u64,
    pub seconds: f64,
    pub tables: Vec<TableProgress>,
}

fn multi_progress() -> &'static MultiProgress {
    static MP: OnceLock<MultiProgress> = OnceLock::new();
    MP.get_or_init(MultiProgress::new)
}

impl CopyProgress {
    /// Progress for `database`; bars on stderr when it is a terminal.
    pub fn new(database: &str, metrics: Option<CopyMetrics>) -> Arc<CopyProgress> {
        let bar = if std::io::stderr().is_terminal() {
            let b = multi_progress().add(ProgressBar::new(0));
            if let Ok(style) = ProgressStyle::with_template(
                "{prefix:>12} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {msg}",
            ) {
                b.set_style(style.progress_chars("=> "));
            }
            b.set_prefix(database.to_string());
            b
        } else {
            ProgressBar::hidden()
        };
        Arc::new(CopyProgress {
            database: database.to_string(),
            metrics,
            inner: Mutex::new(ProgressInner {
                tables: vec![],
                oids: vec![],
                copied_tx: None,
                started: vec![],
                started_at: None,
                finished_seconds: None,
            }),
            bar,
        })
    }

    pub fn database(&self) -> &str {
        &self.database
    }

    /// Announces every table as soon as all its data is committed on the
    /// target (so its indexes can be built while the others copy). The
    /// receiver sees the channel close when the copy ends, successfully or
    /// not; one subscriber (a later call replaces the earlier one).
    pub(crate) fn table_events(&self) -> tokio::sync::mpsc::UnboundedReceiver<CopiedTable> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        self.lock().copied_tx = Some(tx);
        rx
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ProgressInner> {
        // A panic elsewhere must not hide progress: use the data as it is.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn snapshot(&self) -> CopyProgressSnapshot {
        let g = self.lock();
        let count = |s: TableState| g.tables.iter().filter(|t| t.state == s).count();
        let seconds = g
            .finished_seconds
            .or_else(|| g.started_at.map(|s| s.elapsed().as_secs_f64()))
            .unwrap_or(0.0);
        CopyProgressSnapshot {
            database: self.database.clone(),
            tables_total: g.tables.len(),
            tables_queued: count(TableState::Queued),
            tables_copying: count(TableState::Copying),
            tables_copied: count(TableState::Copied),
            tables_error: count(TableState::Error),
            rows: g.tables.iter().map(|t| t.rows).sum(),
            bytes: g.tables.iter().map(|t| t.bytes).sum(),
            size_bytes: g.tables.iter().map(|t| t.size_bytes).sum(),
            seconds,
            tables: g.tables.clone(),
        }
    }

    /// (Re)starts the progress with these tables, all queued.
    fn begin(&self, tables: &[SourceTable], parts: &[u32]) {
        let mut g = self.lock();
        if let Some(m) = &self.metrics {
            for s in TableState::ALL {
                m.tables
                    .with_label_values(&[&self.database, s.label()])
                    .set(0);
            }
            m.tables
                .with_label_values(&[&self.database, "queued"])
                .set(tables.len() as i64);
        }
        g.tables = tables
            .iter()
            .zip(parts)
            .map(|(t, p)| TableProgress {
                table: t.display(),
                state: TableState::Queued,
                rows: 0,
                bytes: 0,
                size_bytes: t.size_bytes,
                parts: *p,
                parts_done: 0,
                format: if t.binary { "binary" } else { "text" },
                seconds: 0.0,
                error: None,
            })
            .collect();
        g.oids = tables.iter().map(|t| t.oid).collect();
        g.started = vec![None; tables.len()];
        g.started_at = Some(Instant::now());
        g.finished_seconds = None;
        self.bar
            .set_length(tables.iter().map(|t| t.size_bytes).sum());
        self.bar.set_position(0);
        self.bar.set_message(format!("0/{} tables", tables.len()));
    }

    fn set_state(&self, g: &mut ProgressInner, i: usize, state: TableState) {
        let old = g.tables[i].state;
        if old == state {
            return;
        }
        g.tables[i].state = state;
        if let Some(m) = &self.metrics {
            m.tables
                .with_label_values(&[&self.database, old.label()])
                .dec();
            m.tables
                .with_label_values(&[&self.database, state.label()])
                .inc();
        }
    }

    fn part_started(&self, i: usize) {
        let mut g = self.lock();
        if g.started[i].is_none() {
            g.started[i] = Some(Instant::now());
        }
        self.set_state(&mut g, i, TableState::Copying);
    }

    fn add_bytes(&self, i: usize, n: u64) {
        let mut g = self.lock();
        g.tables[i].bytes += n;
        if let Some(m) = &self.metrics {
            m.bytes.with_label_values(&[&self.database]).inc_by(n);
        }
        self.bar.inc(n);
    }

    fn part_done(&self, i: usize, rows: u64) {
        let mut g = self.lock();
        if let Some(m) = &self.metrics {
            m.rows.with_label_values(&[&self.database]).inc_by(rows);
        }
        let seconds = g.started[i]
            .map(|s| s.elapsed().as_secs_f64())
            .unwrap_or(0.0);
        let t = &mut g.tables[i];
        t.rows += rows;
        t.parts_done += 1;
        t.seconds = seconds;
        if t.parts_done < t.parts {
            return;
        }
        let (table, rows, bytes) = (t.table.clone(), t.rows, t.bytes);
        self.set_state(&mut g, i, TableState::Copied);
        let done = g
            .tables
            .iter()
            .filter(|t| t.state == TableState::Copied)
            .count();
        let total = g.tables.len();
        if let Some(tx) = &g.copied_tx {
            // A receiver that is gone (post-data failed) stops nothing here:
            // the copy is being canceled by then.
            let _ = tx.send(CopiedTable {
                oid: g.oids[i],
                table: table.clone(),
            });
        }
        drop(g);
        if self.bar.is_hidden() {
            tracing::info!(database = %self.database, table = %table, rows, bytes, seconds = format!("{seconds:.2}"), "table copied");
        } else {
            self.bar.set_message(format!("{done}/{total} tables"));
        }
    }

    fn failed(&self, i: usize, error: &str) {
        let mut g = self.lock();
        g.tables[i].error = Some(error.to_string());
        self.set_state(&mut g, i, TableState::Error);
    }

    fn finish(&self) {
        let mut g = self.lock();
        g.finished_seconds = g.started_at.map(|s| s.elapsed().as_secs_f64());
        g.copied_tx = None;
        drop(g);
        self.bar.finish();
    }
}

/// `/status` shows a database's copy as its progress snapshot
/// (attach with `Migration::attach(db, "copy", progress)`).
impl crate::telemetry::status::Report for CopyProgress {
    fn report(&self) -> serde_json::Value {
        serde_json::to_value(self.snapshot()).unwrap_or(serde_json::Value::Null)
    }
}

/// What [`copy_database`] did.
#[derive(Clone, Debug, Serialize)]
pub struct CopyReport {
    pub database: String,
    pub tables: usize,
    /// Work items: one per unsplit table plus one per range of split tables.
    pub parts: usize,
    pub split_tables: Vec<String>,
    /// Tables copied in text format (their types have no portable binary form).
    pub text_format_tables: Vec<String>,
    pub rows: u64,
    pub bytes: u64,
    pub seconds: f64,
}

/// One unit of work: a whole table or one ctid block range of it.
#[derive(Clone, Copy, Debug)]
struct WorkItem {
    table: usize,
    /// Block range [from, to); `to` None means to the end.
    range: Option<(u64, Option<u64>)>,
}

/// The ranges of a table: `parts` equal block ranges, the last one open so
/// rows in blocks beyond the measured size are never missed.
fn block_ranges(blocks: u64, parts: u64) -> Vec<(u64, Option<u64>)> {
    (0..parts)
        .map(|i| {
            let from = blocks * i / parts;
            let to = (i + 1 < parts).then(|| blocks * (i + 1) / parts);
            (from, to)
        })
        .collect()
}

fn parts_for(t: &SourceTable, split_larger_than: u64, tid_range_scans: bool) -> u64 {
    if !tid_range_scans || t.size_bytes <= split_larger_than || t.blocks < 2 {
        return 1;
    }
    t.size_bytes
        .div_ceil(split_larger_than.max(1))
        .min(t.blocks)
        .clamp(1, MAX_PARTS)
}

struct Shared {
    source: Endpoint,
    target: Endpoint,
    snapshot: String,
    tables: Vec<SourceTable>,
    queue: Mutex<VecDeque<WorkItem>>,
    progress: Arc<CopyProgress>,
    cancel: CancellationToken,
    first_error: Mutex<Option<CopyError>>,
}

impl Shared {
    fn record_error(&self, e: CopyError) {
        let mut g = self.first_error.lock().unwrap_or_else(|e| e.into_inner());
        if g.is_none() {
            *g = Some(e);
        }
        self.cancel.cancel();
    }
    fn next(&self) -> Option<WorkItem> {
        self.queue
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop_front()
    }
}

/// A source connection inside a REPEATABLE READ transaction on `snapshot`.
pub(crate) async fn snapshot_connection(
    source: &Endpoint,
    snapshot: &str,
    what: &str,
) -> Result<Client, CopyError> {
    let c = db::connect(source, what).await?;
    c.batch_execute(&format!(
        "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY; SET TRANSACTION SNAPSHOT {}",
        quote_literal(snapshot)
    ))
    .await
    .map_err(sql_err(format!("importing snapshot {snapshot}")))?;
    Ok(c)
}

/// A target connection for loading: replica role (no triggers, no FK
/// checks), asynchronous commit (a restarted copy starts over anyway).
async fn target_connection(target: &Endpoint, what: &str) -> Result<Client, CopyError> {
    let c = db::connect(target, what).await?;
    c.batch_execute("SET synchronous_commit = off")
        .await
        .map_err(sql_err("configuring the target connection"))?;
    if let Err(e) = c
        .batch_execute("SET session_replication_role = replica")
        .await
    {
        // Needs superuser before PostgreSQL 16. The pre-data schema has no
        // triggers or foreign keys yet, so the copy is correct without it.
        tracing::debug!("session_replication_role = replica refused on the target: {e}");
    }
    Ok(c)
}

/// Copies every (filtered) table of `db` from source to target as of
/// `snapshot` with `opts.jobs` workers. The target tables must exist (pre-data
/// restored); each is emptied before its copy, so a restarted copy starts clean.
pub async fn copy_database(
    source: &Endpoint,
    target: &Endpoint,
    db: &str,
    snapshot: &str,
    opts: &CopyOptions,
    progress: Arc<CopyProgress>,
    cancel: CancellationToken,
) -> Result<CopyReport, CopyError> {
    let started = Instant::now();
    let source = source.with_dbname(db);
    let target = target.with_dbname(db);
    let (tables, items) = match plan(&source, &target, snapshot, opts).await {
        Ok(planned) => planned,
        Err(e) => {
            // Ends the table events too: their receiver must not wait on.
            progress.finish();
            return Err(e);
        }
    };
    let parts: Vec<u32> = (0..tables.len())
        .map(|i| items.iter().filter(|w| w.table == i).count() as u32)
        .collect();
    progress.begin(&tables, &parts);
    let report_base = CopyReport {
        database: db.to_string(),
        tables: tables.len(),
        parts: items.len(),
        split_tables: tables
            .iter()
            .zip(&parts)
            .filter(|(_, p)| **p > 1)
            .map(|(t, _)| t.display())
            .collect(),
        text_format_tables: tables
            .iter()
            .filter(|t| !t.binary)
            .map(|t| t.display())
            .collect(),
        rows: 0,
        bytes: 0,
        seconds: 0.0,
    };
    let jobs = opts.jobs.clamp(1, items.len().max(1));
    let shared = Arc::new(Shared {
        source,
        target,
        snapshot: snapshot.to_string(),
        tables,
        queue: Mutex::new(items.into()),
        progress: progress.clone(),
        cancel: cancel.child_token(),
        first_error: Mutex::new(None),
    });
    let workers: Vec<_> = (0..jobs)
        .map(|id| tokio::spawn(worker(id, shared.clone())))
        .collect();
    for w in workers {
        if let Err(e) = w.await {
            shared.record_error(CopyError::Worker(e.to_string()));
        }
    }
    progress.finish();
    if let Some(e) = shared
        .first_error
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take()
    {
        return Err(e);
    }
    if cancel.is_cancelled() {
        return Err(CopyError::Canceled);
    }
    let snap = progress.snapshot();
    let report = CopyReport {
        rows: snap.rows,
        bytes: snap.bytes,
        seconds: started.elapsed().as_secs_f64(),
        ..report_base
    };
    tracing::info!(
        database = db,
        tables = report.tables,
        rows = report.rows,
        bytes = report.bytes,
        seconds = format!("{:.2}", report.seconds),
        "database copied"
    );
    Ok(report)
}

/// Lists the tables inside the snapshot, cuts large ones into ranges and
/// empties the target tables of split ones (the others are emptied in their
/// own copy transaction).
async fn plan(
    source: &Endpoint,
    target: &Endpoint,
    snapshot: &str,
    opts: &CopyOptions,
) -> Result<(Vec<SourceTable>, Vec<WorkItem>), CopyError> {
    let src = snapshot_connection(source, snapshot, "source (copy planner)").await?;
    let tid_range_scans = server_version(&src).await?.tid_range_scans();
    let tables = list_tables(&src, &opts.filter).await?;
    drop(src);
    let mut items = Vec::new();
    let mut split = Vec::new();
    for (i, t) in tables.iter().enumerate() {
        let parts = parts_for(t, opts.split_larger_than, tid_range_scans);
        if parts > 1 {
            split.push(t.quoted());
            items.extend(block_ranges(t.blocks, parts).into_iter().map(|r| WorkItem {
                table: i,
                range: Some(r),
            }));
        } else {
            items.push(WorkItem {
                table: i,
                range: None,
            });
        }
    }
    if !split.is_empty() {
        let tgt = target_connection(target, "target (copy planner)").await?;
        for q in &split {
            tgt.batch_execute(&format!("TRUNCATE ONLY {q}"))
                .await
                .map_err(sql_err(format!("emptying target table {q}")))?;
        }
    }
    Ok((tables, items))
}

async fn worker(id: usize, s: Arc<Shared>) {
    let conns = tokio::select! {
        _ = s.cancel.cancelled() => return,
        r = async {
            let src = snapshot_connection(&s.source, &s.snapshot, &format!("source (copy worker {id})")).await?;
            let tgt = target_connection(&s.target, &format!("target (copy worker {id})")).await?;
            Ok::<_, CopyError>((src, tgt))
        } => r,
    };
    let (src, tgt) = match conns {
        Ok(c) => c,
        Err(e) => return s.record_error(e),
    };
    while let Some(item) = s.next() {
        if s.cancel.is_cancelled() {
            return;
        }
        let t = &s.tables[item.table];
        s.progress.part_started(item.table);
        let result = tokio::select! {
            _ = s.cancel.cancelled() => return,
            r = copy_item(&src, &tgt, t, item, &s.progress) => r,
        };
        match result {
            Ok(rows) => s.progress.part_done(item.table, rows),
            Err(source) => {
                s.progress.failed(item.table, &crate::db::describe(&source));
                return s.record_error(CopyError::Table {
                    table: t.display(),
                    source,
                });
            }
        }
    }
}

/// Streams one table or range from source to target in one target
/// transaction; returns the rows written.
async fn copy_item(
    src: &Client,
    tgt: &Client,
    t: &SourceTable,
    item: WorkItem,
    progress: &CopyProgress,
) -> Result<u64, tokio_postgres::Error> {
    let q = t.quoted();
    let cols = if t.columns.is_empty() {
        String::new()
    } else {
        format!("({})", t.columns.join(", "))
    };
    let format = if t.binary { "binary" } else { "text" };
    let (out_sql, in_sql) = match item.range {
        None => {
            // Truncated in the same transaction, so the rows can be written
            // frozen: no later anti-wraparound or hint-bit rewrite of the table.
            tgt.batch_execute(&format!("BEGIN; TRUNCATE ONLY {q}"))
                .await?;
            (
                format!("COPY {q} {cols} TO STDOUT (FORMAT {format})"),
                format!("COPY {q} {cols} FROM STDIN (FORMAT {format}, FREEZE)"),
            )
        }
        Some((from, to)) => {
            tgt.batch_execute("BEGIN").await?;
            let select_cols = if t.columns.is_empty() {
                String::new()
            } else {
                t.columns.join(", ")
            };
            let upper = to
                .map(|b| format!(" AND ctid < '({b},0)'::tid"))
                .unwrap_or_default();
            (
                format!(
                    "COPY (SELECT {select_cols} FROM ONLY {q} WHERE ctid >= '({from},0)'::tid{upper}) \
                     TO STDOUT (FORMAT {format})"
                ),
                format!("COPY {q} {cols} FROM STDIN (FORMAT {format})"),
            )
        }
    };
    let sink = tgt.copy_in::<_, bytes::Bytes>(&in_sql).await?;
    let stream = src.copy_out(&out_sql).await?;
    futures_util::pin_mut!(sink);
    futures_util::pin_mut!(stream);
    let mut buf = BytesMut::with_capacity(BATCH_BYTES * 2);
    let mut last_report = Instant::now();
    let mut unreported = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        unreported += chunk.len() as u64;
        buf.extend_from_slice(&chunk);
        if buf.len() >= BATCH_BYTES {
            sink.feed(buf.split().freeze()).await?;
            if last_report.elapsed() > Duration::from_millis(200) {
                progress.add_bytes(item.table, std::mem::take(&mut unreported));
                last_report = Instant::now();
            }
        }
    }
    if !buf.is_empty() {
        sink.feed(buf.split().freeze()).await?;
    }
    let rows = sink.as_mut().finish().await?;
    tgt.batch_execute("COMMIT").await?;
    progress.add_bytes(item.table, unreported);
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_cover_every_block() {
        let r = block_ranges(10, 3);
        assert_eq!(r, vec![(0, Some(3)), (3, Some(6)), (6, None)]);
        assert_eq!(block_ranges(5, 1), vec![(0, None)]);
    }

    #[test]
    fn split_decision() {
        let t = SourceTable {
            oid: 0,
            schema: "s".into(),
            name: "t".into(),
            size_bytes: 10 << 20,
            blocks: 1280,
            columns: vec![],
            binary: true,
        };
        assert_eq!(parts_for(&t, 1 << 20, true), 10);
        assert_eq!(parts_for(&t, 1 << 20, false), 1);
        assert_eq!(parts_for(&t, 100 << 20, true), 1);
        assert_eq!(parts_for(&t, 1, true), MAX_PARTS);
    }
}
