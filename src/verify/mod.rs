//! `pgshift verify`: compares every table on source and target, by row count
//! or by a checksum over all rows.
//!
//! Tables with a primary key are compared in key ranges of [`CHUNK_ROWS`]
//! rows: the source defines each range (keyset pagination over the key
//! index), the target is asked for exactly the same range, so no side ever
//! sorts a whole table. A chunk's checksum is the sum of the rows' md5 hashes
//! (as two 64-bit halves): order-independent inside the chunk, so it needs no
//! sort at all, and it counts duplicate rows. Tables without a key are
//! checked the same way in one piece. A mismatch names each differing range
//! by its key bounds (`compare.rs`).
//!
//! [`verify_database_at`] compares the same way as of two held snapshots
//! ([`HeldSnapshot`], `snapshot.rs`), one per side, taken at the switch
//! point while clients are held: both sides may change afterwards (the
//! target takes writes, reverse replication applies them to the source),
//! and the comparison still reads each as it was then. [`VerifyProgress`]
//! (`progress.rs`) shows how far a verification is, in /status, metrics and
//! the log.

use std::path::Path;

use serde::Serialize;
use thiserror::Error;
use tokio_postgres::Client;

use crate::config::{Config, ConfigError, Endpoint};
use crate::db::{self, DbError, quote_ident, quote_literal};
use crate::filter::TableFilter;
use crate::pg::tables::{CatalogError, SourceTable, list_tables};
use crate::pg::{self, Version};

mod compare;
mod progress;
mod snapshot;

use compare::{compare_checksums, compare_counts};
pub use progress::VerifyProgress;
pub use snapshot::{HeldSnapshot, SnapshotConnection, export_pair};

/// Rows per checksum chunk.
const CHUNK_ROWS: i64 = 100_000;

/// Differing key ranges a table's result lists (the rest are counted).
const MAX_RANGES: usize = 16;

#[derive(Debug, Error)]
pub enum VerifyError {
    #[error("{0}")]
    Config(#[from] ConfigError),
    #[error("{0}")]
    Connect(#[from] DbError),
    #[error("{0}")]
    List(#[from] CatalogError),
    #[error("{what}: {}", crate::db::describe(.source))]
    Sql {
        what: String,
        source: tokio_postgres::Error,
    },
    #[error("{what}: {message}")]
    Snapshot { what: String, message: String },
    #[error("no database to verify: give --database or list migration.databases in the config")]
    NoDatabases,
}

fn sql_err(what: impl Into<String>) -> impl FnOnce(tokio_postgres::Error) -> VerifyError {
    let what = what.into();
    move |source| VerifyError::Sql { what, source }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum VerifyMode {
    /// Row counts only (fast).
    Counts,
    /// Row counts and a checksum over every row.
    Checksums,
}

/// The comparison of one table.
#[derive(Clone, Debug, Serialize)]
pub struct TableVerify {
    pub table: String,
    /// None: the table does not exist on that side.
    pub source_rows: Option<i64>,
    pub target_rows: Option<i64>,
    pub matches: bool,
    /// What differs, for a mismatch: the first differing ranges in words.
    pub detail: Option<String>,
    /// Each differing key range (up to 16), e.g. `rows with (id) above
    /// (1000) up to (2000) differ: source 1000 rows, target 999`, or
    /// `the whole table differs: …` for a table without a key.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ranges: Vec<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct VerifyReport {
    pub database: String,
    pub mode: VerifyMode,
    pub tables: Vec<TableVerify>,
}

impl VerifyReport {
    /// True when every table matches.
    pub fn ok(&self) -> bool {
        self.tables.iter().all(|t| t.matches)
    }
    pub fn mismatches(&self) -> impl Iterator<Item = &TableVerify> {
        self.tables.iter().filter(|t| !t.matches)
    }
}

/// How [`verify_database_with`] compares.
#[derive(Clone, Debug)]
pub struct VerifyOptions {
    pub mode: VerifyMode,
    pub filter: TableFilter,
    /// Rows per checksum chunk.
    pub chunk_rows: i64,
    /// Tables compared at the same time (each with a source and a target connection).
    pub jobs: usize,
    /// After each checksum chunk (and the set-up), a rest this many times
    /// as long as it took (0: none; 1: the comparison keeps each side's
    /// backend busy at most half the time); paced, the two sides'
    /// connections are opened one after the other.
    pub pace: f64,
}

impl VerifyOptions {
    pub fn new(mode: VerifyMode) -> VerifyOptions {
        VerifyOptions {
            mode,
            filter: TableFilter::default(),
            chunk_rows: CHUNK_ROWS,
            jobs: 4,
            pace: 0.0,
        }
    }
}

/// Compares every table of `db` on source and target.
pub async fn verify_database(
    source: &Endpoint,
    target: &Endpoint,
    db: &str,
    mode: VerifyMode,
) -> Result<VerifyReport, VerifyError> {
    verify_database_with(source, target, db, &VerifyOptions::new(mode)).await
}

/// [`verify_database`] with explicit options (table filter, chunk size, parallelism).
pub async fn verify_database_with(
    source: &Endpoint,
    target: &Endpoint,
    db: &str,
    opts: &VerifyOptions,
) -> Result<VerifyReport, VerifyError> {
    let sides = Sides::Live { source, target, db };
    verify_tables(sides, opts, &VerifyProgress::new(db)).await
}

/// Compares every table of the snapshots' databases as of the two held
/// snapshots: each side is read exactly as it was when its snapshot was
/// exported, whatever was written since. The snapshots must stay held until
/// this returns.
pub async fn verify_database_at(
    source: &HeldSnapshot,
    target: &HeldSnapshot,
    opts: &VerifyOptions,
    progress: &VerifyProgress,
) -> Result<VerifyReport, VerifyError> {
    verify_tables(Sides::At { source, target }, opts, progress).await
}

/// Where a worker's pair of connections reads: the live databases, or the
/// snapshots held on both.
#[derive(Clone, Copy)]
enum Sides<'a> {
    Live {
        source: &'a Endpoint,
        target: &'a Endpoint,
        db: &'a str,
    },
    At {
        source: &'a HeldSnapshot,
        target: &'a HeldSnapshot,
    },
}

impl Sides<'_> {
    fn database(&self) -> &str {
        match self {
            Sides::Live { db, .. } => db,
            Sides::At { source, .. } => source.database(),
        }
    }

    /// A connection to each side whose text output of values is the same
    /// on both (floats: see [`pg::settings::comparable_float_digits`]).
    async fn open(self, paced: bool) -> Result<Pair, VerifyError> {
        let (src_ep, src_db, tgt_ep, tgt_db, snapshots) = match self {
            Sides::Live { source, target, db } => (source, db, target, db, None),
            Sides::At { source, target } => (
                source.endpoint(),
                source.database(),
                target.endpoint(),
                target.database(),
                Some((source.id().to_string(), target.id().to_string())),
            ),
        };
        let held = snapshots.is_some();
        let (src, tgt) = if paced {
            // One backend start-up (fork, authentication, cold caches) at a
            // time: paced work must not come as a burst.
            let src = connection(src_ep, src_db, "source", held).await?;
            (src, connection(tgt_ep, tgt_db, "target", held).await?)
        } else {
            tokio::try_join!(
                connection(src_ep, src_db, "source", held),
                connection(tgt_ep, tgt_db, "target", held)
            )?
        };
        let digits = pg::settings::comparable_float_digits(src.1, tgt.1);
        for (c, side) in [(&src.0, "source"), (&tgt.0, "target")] {
            c.batch_execute(&format!("SET extra_float_digits = {digits}"))
                .await
                .map_err(sql_err(format!("configuring the {side} connection")))?;
        }
        Ok(Pair {
            src: src.0,
            tgt: tgt.0,
            snapshots,
        })
    }
}

/// A worker's connections. On snapshots, each table is read in a
/// transaction of its own that imports the held snapshot: the same rows as
/// one long transaction, but a table's lock is let go once it is compared,
/// so replication into the live database (a TRUNCATE) waits for at most
/// the table being compared.
struct Pair {
    src: Client,
    tgt: Client,
    /// The snapshot ids (source, target) when reading held snapshots.
    snapshots: Option<(String, String)>,
}

impl Pair {
    async fn begin(&self) -> Result<(), VerifyError> {
        let Some((s, t)) = &self.snapshots else {
            return Ok(());
        };
        let enter = |id: &str| {
            format!(
                "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT {}",
                quote_literal(id)
            )
        };
        tokio::try_join!(
            async {
                self.src
                    .batch_execute(&enter(s))
                    .await
                    .map_err(sql_err(format!("importing the source snapshot {s}")))
            },
            async {
                self.tgt
                    .batch_execute(&enter(t))
                    .await
                    .map_err(sql_err(format!("importing the target snapshot {t}")))
            }
        )?;
        Ok(())
    }

    async fn end(&self) -> Result<(), VerifyError> {
        if self.snapshots.is_none() {
            return Ok(());
        }
        tokio::try_join!(
            async {
                self.src
                    .batch_execute("COMMIT")
                    .await
                    .map_err(sql_err("ending a source snapshot transaction"))
            },
            async {
                self.tgt
                    .batch_execute("COMMIT")
                    .await
                    .map_err(sql_err("ending a target snapshot transaction"))
            }
        )?;
        Ok(())
    }

    /// Compares one table (inside its snapshot transaction, if any).
    async fn compare(
        &self,
        display: &str,
        quoted: &str,
        opts: &VerifyOptions,
        progress: &VerifyProgress,
    ) -> Result<TableVerify, VerifyError> {
        self.begin().await?;
        let (src, tgt) = (&self.src, &self.tgt);
        let mut v = match opts.mode {
            VerifyMode::Counts => compare_counts(src, tgt, display, quoted, progress).await?,
            VerifyMode::Checksums => {
                let rows = opts.chunk_rows.max(1);
                compare_checksums(src, tgt, display, quoted, rows, opts.pace, progress).await?
            }
        };
        if !v.matches && self.snapshots.is_some() {
            for (c, side) in [(src, "source"), (tgt, "target")] {
                if rewritten_since_snapshot(c, quoted, side).await? {
                    let note = format!(
                        "{display} was truncated or rewritten on the {side} after the snapshot \
                         (TRUNCATE and rewriting ALTER TABLEs are not MVCC-safe: an older \
                         snapshot sees the table empty), so this difference may not be real"
                    );
                    v.detail = Some(match v.detail.take() {
                        Some(d) => format!("{d}; {note}"),
                        None => note,
                    });
                }
            }
        }
        self.end().await?;
        Ok(v)
    }
}

/// Whether a table's storage changed after the transaction's snapshot: its
/// `pg_class` row as of the snapshot names another file than the current
/// catalog does. Exact once the table is locked (it is, having been read).
async fn rewritten_since_snapshot(
    c: &Client,
    quoted: &str,
    side: &str,
) -> Result<bool, VerifyError> {
    let what = format!("checking whether {quoted} was rewritten on the {side}");
    let row = c
        .query_opt(
            "SELECT coalesce(c.relfilenode <> pg_relation_filenode(c.oid), false) \
             FROM pg_class c WHERE c.oid = $1::text::regclass",
            &[&quoted],
        )
        .await
        .map_err(sql_err(what.clone()))?;
    match row {
        Some(r) => r.try_get(0).map_err(sql_err(what)),
        None => Ok(false),
    }
}

/// Ends the progress however the verification ends.
struct Finish<'a>(&'a VerifyProgress);

impl Drop for Finish<'_> {
    fn drop(&mut self) {
        self.0.finish();
    }
}

/// The comparison both entry points share: tables listed on both sides,
/// `opts.jobs` of them compared at a time.
async fn verify_tables(
    sides: Sides<'_>,
    opts: &VerifyOptions,
    progress: &VerifyProgress,
) -> Result<VerifyReport, VerifyError> {
    let db = sides.database();
    let paced = opts.pace > 0.0;
    let started = std::time::Instant::now();
    let first = sides.open(paced).await?;
    first.begin().await?;
    let (src_tables, tgt_tables) = tokio::try_join!(
        list_tables(&first.src, &opts.filter),
        list_tables(&first.tgt, &opts.filter)
    )?;
    first.end().await?;
    if paced {
        // The set-up is work like a chunk's (two cold backends' catalog
        // reads): the same rest after it.
        tokio::time::sleep(started.elapsed().mul_f64(opts.pace)).await;
    }
    let mut names: Vec<(String, String)> = src_tables
        .iter()
        .chain(&tgt_tables)
        .map(|t| (t.schema.clone(), t.name.clone()))
        .collect();
    names.sort();
    names.dedup();
    progress.start(names.len());
    let _finish = Finish(progress);
    let mut results: Vec<Option<TableVerify>> = vec![None; names.len()];
    let mut work = std::collections::VecDeque::new();
    for (i, (schema, name)) in names.iter().enumerate() {
        let on = |list: &[SourceTable]| list.iter().any(|t| &t.schema == schema && &t.name == name);
        let (in_src, in_tgt) = (on(&src_tables), on(&tgt_tables));
        if in_src && in_tgt {
            work.push_back(i);
            continue;
        }
        let side = if in_src { "target" } else { "source" };
        let v = TableVerify {
            table: format!("{schema}.{name}"),
            source_rows: None,
            target_rows: None,
            matches: false,
            detail: Some(format!("missing on the {side}")),
            ranges: Vec::new(),
        };
        progress.end_table(&v);
        results[i] = Some(v);
    }
    // The first pair of connections is one of the workers; the others open their own.
    let jobs = opts.jobs.clamp(1, work.len().max(1));
    let queue = std::sync::Mutex::new(work);
    let results = std::sync::Mutex::new(results);
    let worker = |pair: Option<Pair>| {
        let (queue, results, names) = (&queue, &results, &names);
        async move {
            let pair = match pair {
                Some(p) => p,
                None => sides.open(paced).await?,
            };
            loop {
                let next = queue.lock().unwrap_or_else(|e| e.into_inner()).pop_front();
                let Some(i) = next else { break };
                let (schema, name) = &names[i];
                let display = format!("{schema}.{name}");
                let quoted = format!("{}.{}", quote_ident(schema), quote_ident(name));
                progress.begin_table(&display);
                let v = pair.compare(&display, &quoted, opts, progress).await?;
                if !v.matches {
                    tracing::warn!(database = db, table = %v.table, detail = ?v.detail, "tables differ");
                }
                progress.end_table(&v);
                results.lock().unwrap_or_else(|e| e.into_inner())[i] = Some(v);
            }
            Ok::<(), VerifyError>(())
        }
    };
    let mut workers = vec![worker(Some(first))];
    workers.extend((1..jobs).map(|_| worker(None)));
    futures_util::future::try_join_all(workers).await?;
    let tables = results
        .into_inner()
        .unwrap_or_else(|e| e.into_inner())
        .into_iter()
        .flatten()
        .collect();
    Ok(VerifyReport {
        database: db.to_string(),
        mode: opts.mode,
        tables,
    })
}

/// A connection to `db` with the output settings both sides share; `held`:
/// it reads a held snapshot, so no timeout may end it early.
async fn connection(
    ep: &Endpoint,
    db: &str,
    side: &str,
    held: bool,
) -> Result<(Client, Version), VerifyError> {
    let c = db::connect(&ep.with_dbname(db), &format!("{side} database {db}")).await?;
    let version = Version::of(&c)
        .await
        .map_err(sql_err(format!("reading the {side} server's version")))?;
    let mut settings = "SET TimeZone = 'UTC'; SET DateStyle = 'ISO, YMD'; \
         SET IntervalStyle = 'postgres'; SET bytea_output = 'hex'"
        .to_string();
    if held {
        settings.push_str("; ");
        settings.push_str(snapshot::keep_alive_settings(version));
    }
    c.batch_execute(&settings)
        .await
        .map_err(sql_err(format!("configuring the {side} connection")))?;
    Ok((c, version))
}

/// `pgshift verify`: verifies the configured (or given) databases, prints a
/// table or JSON, and returns the exit code (0 all equal, 1 any difference).
pub async fn run_cli(
    config_path: &Path,
    databases: Vec<String>,
    json: bool,
    mode: VerifyMode,
) -> Result<u8, VerifyError> {
    let config = Config::load(config_path)?;
    let migration = config.migration();
    let databases = if databases.is_empty() {
        migration.map(|m| m.databases.clone()).unwrap_or_default()
    } else {
        databases
    };
    if databases.is_empty() {
        return Err(VerifyError::NoDatabases);
    }
    let filter = migration
        .map(TableFilter::from_migration)
        .unwrap_or_default();
    let mut reports = Vec::new();
    for db in &databases {
        let opts = VerifyOptions {
            filter: filter.clone(),
            ..VerifyOptions::new(mode)
        };
        reports.push(verify_database_with(&config.source, &config.target, db, &opts).await?);
    }
    let ok = reports.iter().all(|r| r.ok());
    if json {
        let doc = serde_json::json!({ "ok": ok, "databases": reports });
        println!("{}", serde_json::to_string_pretty(&doc).unwrap_or_default());
    } else {
        print!("{}", render_table(&reports));
        let bad: usize = reports.iter().map(|r| r.mismatches().count()).sum();
        if ok {
            println!("all tables match");
        } else {
            println!("{bad} table(s) differ");
        }
    }
    Ok(if ok { 0 } else { 1 })
}

/// The per-table results as an aligned text table.
pub(crate) fn render_table(reports: &[VerifyReport]) -> String {
    let fmt_rows = |n: Option<i64>| n.map(|n| n.to_string()).unwrap_or_else(|| "-".into());
    let mut rows: Vec<[String; 5]> = vec![[
        "DATABASE".into(),
        "TABLE".into(),
        "SOURCE ROWS".into(),
        "TARGET ROWS".into(),
        "RESULT".into(),
    ]];
    for r in reports {
        for t in &r.tables {
            let result = match (&t.detail, t.matches) {
                (_, true) => "match".to_string(),
                (Some(d), false) => format!("MISMATCH: {d}"),
                (None, false) => "MISMATCH".to_string(),
            };
            rows.push([
                r.database.clone(),
                t.table.clone(),
                fmt_rows(t.source_rows),
                fmt_rows(t.target_rows),
                result,
            ]);
        }
    }
    let widths: Vec<usize> = (0..5)
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}
