//! `pgshift verify`: compares every table on source and target, by row count
//! or by a checksum over all rows.
//!
//! Tables with a primary key are compared in key ranges of [`CHUNK_ROWS`]
//! rows: the source defines each range (keyset pagination over the key
//! index), the target is asked for exactly the same range, so no side ever
//! sorts a whole table. A chunk's checksum is the sum of the rows' md5 hashes
//! (as two 64-bit halves): order-independent inside the chunk, so it needs no
//! sort at all, and it counts duplicate rows. Tables without a key are
//! checked the same way in one piece.

use std::path::Path;

use serde::Serialize;
use thiserror::Error;
use tokio_postgres::Client;

use crate::config::{Config, ConfigError, Endpoint};
use crate::db::{self, DbError, quote_ident, quote_literal};
use crate::filter::TableFilter;
use crate::pg::tables::{CatalogError, SourceTable, list_tables};
use crate::pg::{self, Version};

/// Rows per checksum chunk.
const CHUNK_ROWS: i64 = 100_000;

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
    /// What differs, for a mismatch.
    pub detail: Option<String>,
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
}

impl VerifyOptions {
    pub fn new(mode: VerifyMode) -> VerifyOptions {
        VerifyOptions {
            mode,
            filter: TableFilter::default(),
            chunk_rows: CHUNK_ROWS,
            jobs: 4,
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
    let (src, tgt) = connections(source, target, db).await?;
    let (src_tables, tgt_tables) = tokio::try_join!(
        list_tables(&src, &opts.filter),
        list_tables(&tgt, &opts.filter)
    )?;
    let mut names: Vec<(String, String)> = src_tables
        .iter()
        .chain(&tgt_tables)
        .map(|t| (t.schema.clone(), t.name.clone()))
        .collect();
    names.sort();
    names.dedup();
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
        results[i] = Some(TableVerify {
            table: format!("{schema}.{name}"),
            source_rows: None,
            target_rows: None,
            matches: false,
            detail: Some(format!("missing on the {side}")),
        });
    }
    // The first pair of connections is one of the workers; the others open their own.
    let jobs = opts.jobs.clamp(1, work.len().max(1));
    let queue = std::sync::Mutex::new(work);
    let results = std::sync::Mutex::new(results);
    let worker = |pair: Option<(Client, Client)>| {
        let (queue, results, names) = (&queue, &results, &names);
        async move {
            let (src, tgt) = match pair {
                Some(p) => p,
                None => connections(source, target, db).await?,
            };
            loop {
                let next = queue.lock().unwrap_or_else(|e| e.into_inner()).pop_front();
                let Some(i) = next else { break };
                let (schema, name) = &names[i];
                let display = format!("{schema}.{name}");
                let quoted = format!("{}.{}", quote_ident(schema), quote_ident(name));
                let v = match opts.mode {
                    VerifyMode::Counts => compare_counts(&src, &tgt, &display, &quoted).await?,
                    VerifyMode::Checksums => {
                        compare_checksums(&src, &tgt, &display, &quoted, opts.chunk_rows.max(1))
                            .await?
                    }
                };
                if !v.matches {
                    tracing::warn!(database = db, table = %v.table, detail = ?v.detail, "tables differ");
                }
                results.lock().unwrap_or_else(|e| e.into_inner())[i] = Some(v);
            }
            Ok::<(), VerifyError>(())
        }
    };
    let mut workers = vec![worker(Some((src, tgt)))];
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

/// A connection to each side whose text output of values is the same on
/// both (floats: see [`pg::settings::comparable_float_digits`]).
async fn connections(
    source: &Endpoint,
    target: &Endpoint,
    db: &str,
) -> Result<(Client, Client), VerifyError> {
    let (src, tgt) = tokio::try_join!(
        connection(source, db, "source"),
        connection(target, db, "target")
    )?;
    let digits = pg::settings::comparable_float_digits(src.1, tgt.1);
    for (c, side) in [(&src.0, "source"), (&tgt.0, "target")] {
        c.batch_execute(&format!("SET extra_float_digits = {digits}"))
            .await
            .map_err(sql_err(format!("configuring the {side} connection")))?;
    }
    Ok((src.0, tgt.0))
}

async fn connection(ep: &Endpoint, db: &str, side: &str) -> Result<(Client, Version), VerifyError> {
    let c = db::connect(&ep.with_dbname(db), &format!("{side} database {db}")).await?;
    c.batch_execute(
        "SET TimeZone = 'UTC'; SET DateStyle = 'ISO, YMD'; SET IntervalStyle = 'postgres'; \
         SET bytea_output = 'hex'",
    )
    .await
    .map_err(sql_err(format!("configuring the {side} connection")))?;
    let version = Version::of(&c)
        .await
        .map_err(sql_err(format!("reading the {side} server's version")))?;
    Ok((c, version))
}

async fn compare_counts(
    src: &Client,
    tgt: &Client,
    table: &str,
    quoted: &str,
) -> Result<TableVerify, VerifyError> {
    let sql = format!("SELECT count(*) FROM ONLY {quoted}");
    let (s, t) = tokio::try_join!(
        one_i64(src, &sql, format!("counting {table} on the source")),
        one_i64(tgt, &sql, format!("counting {table} on the target"))
    )?;
    Ok(TableVerify {
        table: table.to_string(),
        source_rows: Some(s),
        target_rows: Some(t),
        matches: s == t,
        detail: (s != t).then(|| "row counts differ".to_string()),
    })
}

async fn one_i64(c: &Client, sql: &str, what: String) -> Result<i64, VerifyError> {
    Ok(c.query_one(sql, &[]).await.map_err(sql_err(what))?.get(0))
}

/// Sum of the rows' md5 (two 64-bit halves), as text.
const HASH_SUM: &str = "coalesce(sum(('x' || substr(h, 1, 16))::bit(64)::bigint::numeric), 0)::text \
     || '/' || coalesce(sum(('x' || substr(h, 17, 16))::bit(64)::bigint::numeric), 0)::text";
const ROW_HASH: &str = "md5(convert_to(x::text, 'UTF8'))";

/// Primary key columns (quoted) and their types, in key order.
async fn primary_key(c: &Client, quoted: &str) -> Result<Vec<(String, String)>, VerifyError> {
    let rows = c
        .query(
            "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod) \
             FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) \
             WHERE i.indrelid = $1::text::regclass AND i.indisprimary \
             ORDER BY array_position(i.indkey::int2[], a.attnum)",
            &[&quoted],
        )
        .await
        .map_err(sql_err(format!("reading the primary key of {quoted}")))?;
    Ok(rows
        .iter()
        .map(|r| (quote_ident(r.get(0)), r.get(1)))
        .collect())
}

async fn compare_checksums(
    src: &Client,
    tgt: &Client,
    table: &str,
    quoted: &str,
    chunk_rows: i64,
) -> Result<TableVerify, VerifyError> {
    let key = primary_key(src, quoted).await?;
    if key.is_empty() {
        let sql = format!(
            "SELECT count(*), {HASH_SUM} FROM (SELECT {ROW_HASH} AS h FROM ONLY {quoted} x) c"
        );
        let (s, t) = tokio::try_join!(
            chunk(src, &sql, format!("checksumming {table} on the source")),
            chunk(tgt, &sql, format!("checksumming {table} on the target"))
        )?;
        let matches = s == t;
        return Ok(TableVerify {
            table: table.to_string(),
            source_rows: Some(s.0),
            target_rows: Some(t.0),
            matches,
            detail: (!matches).then(|| describe(s.0, t.0, "table")),
        });
    }
    let cols: Vec<String> = key.iter().map(|(c, _)| format!("x.{c}")).collect();
    let row = format!("({})", cols.join(", "));
    let aliases: Vec<String> = (0..key.len()).map(|i| format!("k{i}")).collect();
    let mut lower: Option<Vec<String>> = None;
    let (mut src_rows, mut tgt_rows) = (0i64, 0i64);
    let mut first_diff: Option<String> = None;
    loop {
        let lower_cond = lower
            .as_ref()
            .map(|v| format!("{row} > {}", key_literal(&key, v)))
            .unwrap_or_else(|| "true".into());
        // `c` is read twice, so every version computes it once (12+ inlines
        // only a CTE read once; 11 has no MATERIALIZED keyword).
        let src_sql = format!(
            "WITH c AS (SELECT {ROW_HASH} AS h, {keys} FROM ONLY {quoted} x \
               WHERE {lower_cond} ORDER BY {order} LIMIT {chunk_rows}) \
             SELECT count(*), {HASH_SUM}, \
               (SELECT ARRAY[{key_text}] FROM c ORDER BY {desc} LIMIT 1) FROM c",
            keys = cols
                .iter()
                .zip(&aliases)
                .map(|(c, a)| format!("{c} AS {a}"))
                .collect::<Vec<_>>()
                .join(", "),
            order = cols.join(", "),
            key_text = aliases
                .iter()
                .map(|a| format!("{a}::text"))
                .collect::<Vec<_>>()
                .join(", "),
            desc = aliases
                .iter()
                .map(|a| format!("{a} DESC"))
                .collect::<Vec<_>>()
                .join(", "),
        );
        let r = src
            .query_one(&src_sql, &[])
            .await
            .map_err(sql_err(format!("checksumming {table} on the source")))?;
        let s: (i64, String) = (r.get(0), r.get(1));
        let upper: Option<Vec<String>> = r.get(2);
        // The last chunk is open upwards, so extra target rows are counted too.
        let last = s.0 < chunk_rows;
        let upper_cond = match (&upper, last) {
            (Some(u), false) => format!(" AND {row} <= {}", key_literal(&key, u)),
            _ => String::new(),
        };
        let tgt_sql = format!(
            "SELECT count(*), {HASH_SUM} FROM (SELECT {ROW_HASH} AS h FROM ONLY {quoted} x \
               WHERE {lower_cond}{upper_cond}) c"
        );
        let t = chunk(tgt, &tgt_sql, format!("checksumming {table} on the target")).await?;
        src_rows += s.0;
        tgt_rows += t.0;
        if s != t && first_diff.is_none() {
            let from = lower
                .as_ref()
                .map(|v| v.join(","))
                .unwrap_or_else(|| "start".into());
            first_diff = Some(format!(
                "{} in key range after ({from})",
                describe(s.0, t.0, "rows")
            ));
        }
        match upper {
            Some(u) if !last => lower = Some(u),
            _ => break,
        }
    }
    Ok(TableVerify {
        table: table.to_string(),
        source_rows: Some(src_rows),
        target_rows: Some(tgt_rows),
        matches: first_diff.is_none(),
        detail: first_diff,
    })
}

fn describe(s: i64, t: i64, what: &str) -> String {
    if s == t {
        format!("{what} differ in content")
    } else {
        format!("{what} counts differ ({s} vs {t})")
    }
}

/// `(v1::type1, v2::type2)` from key values as text.
fn key_literal(key: &[(String, String)], values: &[String]) -> String {
    let parts: Vec<String> = key
        .iter()
        .zip(values)
        .map(|((_, ty), v)| format!("{}::{ty}", quote_literal(v)))
        .collect();
    format!("({})", parts.join(", "))
}

async fn chunk(c: &Client, sql: &str, what: String) -> Result<(i64, String), VerifyError> {
    let r = c.query_one(sql, &[]).await.map_err(sql_err(what))?;
    Ok((r.get(0), r.get(1)))
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
