//! `pgshift demo`: a whole online migration, cutover, verification and
//! rollback on throwaway local clusters, under a write load of its own
//! through the proxy, with a live
//! progress view and a report. Everything it starts is stopped and removed
//! on exit, also on Ctrl-C.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;
use thiserror::Error;
use tokio::task::JoinSet;

use crate::admin::client::human_bytes;
use crate::localpg::{LocalCluster, LocalPgError, Options};

#[derive(Debug, Error)]
pub enum DemoError {
    #[error("{0}")]
    Cluster(#[from] LocalPgError),
    #[error("{0}")]
    Run(#[from] crate::run::RunError),
    #[error("{0}; {hint}", hint = crate::pgbin::INSTALL_HINT)]
    Fetch(#[from] crate::pgbin::FetchError),
    #[error("a demo task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
    #[error("the demo's configuration: {0}")]
    Config(#[from] crate::config::ConfigError),
    #[error("cannot run pgbench: {0}")]
    PgbenchStart(#[source] std::io::Error),
    #[error("pgbench -i failed: {stderr}")]
    Pgbench { stderr: String },
    #[error("the migration runner is not running")]
    NoRunner,
    #[error("the migration runner stopped")]
    RunnerStopped,
    #[error("{0}")]
    Command(#[from] crate::commands::CommandError),
    #[error("cutover aborted: {reason}")]
    CutoverAborted { reason: String },
    #[error("migration {state}: {reason}")]
    MigrationEnded { state: String, reason: String },
    /// Ledger rows a client saw committed that the target lacks.
    #[error("{count} committed ledger rows missing on the target (e.g. {examples:?})")]
    MissingWrites { count: usize, examples: Vec<i64> },
    #[error("interrupted (Ctrl-C): everything the demo started was stopped and removed")]
    Interrupted,
}

/// What the demo is asked to do.
#[derive(Clone, Debug)]
pub struct DemoOptions {
    /// pgbench scale factor of the sample data (1 ≈ 15 MB).
    pub scale: u32,
    /// Concurrent client sessions of the write load.
    pub clients: usize,
    /// How long to stream under load before the cutover may start.
    pub stream_for: Duration,
}

impl Default for DemoOptions {
    fn default() -> Self {
        DemoOptions {
            scale: 10,
            clients: 4,
            stream_for: Duration::from_secs(8),
        }
    }
}

const APP_PW: &str = "demo-app-password";
const DB: &str = "shop";

/// The PostgreSQL installation the demo runs: the system's, or when there
/// is none, one fetched with scripts/fetch-pg.sh (a PyPI wheel; Python's
/// pip is enough). Says which.
fn server_programs() -> Result<std::path::PathBuf, DemoError> {
    let (bin, how) = match crate::pgbin::server_bin_dir() {
        Some(bin) => {
            let fetched = bin.starts_with(crate::pgbin::cache_dir());
            (
                bin,
                if fetched {
                    "fetched earlier"
                } else {
                    "installed"
                },
            )
        }
        None => {
            println!(
                "• no PostgreSQL installed: fetching PostgreSQL 18 (scripts/fetch-pg.sh --clients 18)"
            );
            let bin = crate::pgbin::fetch(&["--clients", "18"])?;
            (bin, "fetched now")
        }
    };
    let version = crate::pgbin::program_version(&bin.join("postgres"))
        .map(|v| format!("{}.{}", v / 10_000, v % 10_000))
        .unwrap_or_else(|| "of unknown version".into());
    println!("• PostgreSQL {version} from {} ({how})", bin.display());
    Ok(bin)
}

/// The write load's own record: what clients saw.
#[derive(Default)]
struct LoadStats {
    committed: AtomicU64,
    failed: AtomicU64,
    /// Longest single transaction as the client saw it, in microseconds.
    max_latency_us: AtomicU64,
    stop: AtomicBool,
    /// Every ledger id a client saw committed.
    ids: std::sync::Mutex<Vec<i64>>,
    errors: std::sync::Mutex<Vec<String>>,
}

pub async fn run(opts: DemoOptions) -> Result<u8, DemoError> {
    let started = Instant::now();
    println!(
        "pgshift demo: an online migration, cutover, verification and rollback on two throwaway local clusters\n"
    );

    // 1. Two clusters and sample data.
    let bin = tokio::task::spawn_blocking(server_programs).await??;
    let (source, target) = tokio::task::spawn_blocking(move || -> Result<_, LocalPgError> {
        let o = Options {
            bin: Some(bin),
            ..Options::default()
        };
        Ok((
            LocalCluster::create(&o, None)?,
            LocalCluster::create(&o, None)?,
        ))
    })
    .await??;
    println!(
        "• source cluster on 127.0.0.1:{}, target cluster on 127.0.0.1:{}",
        source.port, target.port
    );
    load_sample_data(&source, &target, opts.scale).await?;

    // 2. pgshift itself, in-process, exactly as `pgshift run` starts it.
    let config = demo_config(&source, &target)?;
    let proxy_addr = config.proxy_listen;
    let running = crate::run::start(config).await?;
    let ctx = running.ctx.clone();

    // 3. A steady write load through the proxy, from before the copy to after the cutover.
    let stats = Arc::new(LoadStats::default());
    let mut load = JoinSet::new();
    let url = format!("postgres://app:{APP_PW}@{proxy_addr}/{DB}");
    for i in 0..opts.clients {
        load.spawn(client_loop(
            url.clone(),
            stats.clone(),
            opts.scale,
            i as u64,
        ));
    }

    let result = tokio::select! {
        r = watch_migration(&ctx, &stats, &opts) => r,
        _ = tokio::signal::ctrl_c() => Err(DemoError::Interrupted),
    };

    // Keep the load a moment on the target, then stop it.
    if result.is_ok() {
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    stats.stop.store(true, Ordering::Relaxed);
    while load.join_next().await.is_some() {}

    let outcome = match result {
        Ok(watch) => {
            let checked = check_writes(&source, &target, &stats).await;
            print_report(
                &ctx.status.render(),
                &stats,
                &watch,
                &checked,
                started.elapsed(),
            );
            if checked.is_ok() && stats.failed.load(Ordering::Relaxed) == 0 {
                Ok(0)
            } else {
                Ok(1)
            }
        }
        Err(e) => Err(e),
    };
    running.shutdown().await;
    drop(source);
    drop(target);
    outcome
}

async fn load_sample_data(
    source: &LocalCluster,
    target: &LocalCluster,
    scale: u32,
) -> Result<(), DemoError> {
    let t = Instant::now();
    for c in [source, target] {
        c.psql(
            "postgres",
            &format!("CREATE ROLE app LOGIN PASSWORD '{APP_PW}'"),
        )?;
    }
    source.psql("postgres", &format!("CREATE DATABASE {DB} OWNER app"))?;
    let out = std::process::Command::new(source.program("pgbench"))
        .args(["-i", "-q", "--foreign-keys", "-s", &scale.to_string(), "-h"])
        .arg(source.socket_dir())
        .args(["-p", &source.port.to_string(), "-U", "postgres", DB])
        .output()
        .map_err(DemoError::PgbenchStart)?;
    if !out.status.success() {
        return Err(DemoError::Pgbench {
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    // pgbench_history has no key: give it one so it can be streamed; a
    // ledger the clients append to proves that no write is lost.
    source.psql(
        DB,
        "ALTER TABLE pgbench_history ADD COLUMN id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY;
         CREATE TABLE ledger (id bigserial PRIMARY KEY, client int NOT NULL, amount int NOT NULL,
                              note text, at timestamptz NOT NULL DEFAULT now());
         GRANT ALL ON ALL TABLES IN SCHEMA public TO app;
         GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO app;",
    )?;
    let size = source.psql(DB, "SELECT pg_database_size(current_database())")?;
    println!(
        "• sample data: pgbench scale {scale} + a ledger table, {} in {:.1}s",
        human_bytes(size.parse::<f64>().unwrap_or(0.0)),
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

fn demo_config(source: &LocalCluster, target: &LocalCluster) -> Result<crate::Config, DemoError> {
    let text = format!(
        r#"
[proxy]
listen = "127.0.0.1:{proxy}"
auth = "scram-sha-256"
[[proxy.users]]
name = "app"
password = "{APP_PW}"

[source]
url = "postgres://postgres:postgres@127.0.0.1:{sp}/postgres?sslmode=disable"
[target]
url = "postgres://postgres:postgres@127.0.0.1:{tp}/postgres?sslmode=disable"

[admin]
listen = "127.0.0.1:{admin}"

[migration]
name = "demo"
databases = ["{DB}"]
mode = "online"
copy_jobs = 4

[cutover]
trigger = "manual"
drain_timeout = "5s"
catchup_timeout = "10s"
verify_after = "checksums"
"#,
        proxy = crate::localpg::free_port(),
        admin = crate::localpg::free_port(),
        sp = source.port,
        tp = target.port,
    );
    Ok(crate::Config::from_toml(&text, &|_| None)?)
}

/// One client of the write load: TPC-B-like transactions plus a ledger
/// insert whose id is recorded once the commit is acknowledged.
async fn client_loop(url: String, stats: Arc<LoadStats>, scale: u32, seed: u64) {
    let client = loop {
        match tokio_postgres::connect(&url, tokio_postgres::NoTls).await {
            Ok((c, conn)) => {
                tokio::spawn(crate::db::drive(conn, "demo client".into(), None));
                break c;
            }
            Err(e) => {
                if stats.stop.load(Ordering::Relaxed) {
                    return;
                }
                stats
                    .errors
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(format!("connect: {e}"));
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    let accounts = (scale as u64) * 100_000;
    let mut x = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let Ok(update) = client
        .prepare("UPDATE pgbench_accounts SET abalance = abalance + $1 WHERE aid = $2")
        .await
    else {
        stats.failed.fetch_add(1, Ordering::Relaxed);
        return;
    };
    let Ok(insert) = client
        .prepare("INSERT INTO ledger (client, amount, note) VALUES ($1, $2, 'demo') RETURNING id")
        .await
    else {
        stats.failed.fetch_add(1, Ordering::Relaxed);
        return;
    };
    while !stats.stop.load(Ordering::Relaxed) {
        let aid = (next() % accounts) as i32 + 1;
        let delta = (next() % 10_000) as i32 - 5_000;
        let t = Instant::now();
        let r: Result<i64, tokio_postgres::Error> = async {
            client.batch_execute("BEGIN").await?;
            client.execute(&update, &[&delta, &aid]).await?;
            let id: i64 = client
                .query_one(&insert, &[&(seed as i32), &delta])
                .await?
                .get(0);
            client.batch_execute("COMMIT").await?;
            Ok(id)
        }
        .await;
        let us = t.elapsed().as_micros() as u64;
        stats.max_latency_us.fetch_max(us, Ordering::Relaxed);
        match r {
            Ok(id) => {
                stats.committed.fetch_add(1, Ordering::Relaxed);
                stats.ids.lock().unwrap_or_else(|p| p.into_inner()).push(id);
            }
            Err(e) => {
                stats.failed.fetch_add(1, Ordering::Relaxed);
                stats
                    .errors
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(crate::db::describe(&e));
                let _ = client.batch_execute("ROLLBACK").await;
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// What the progress view saw.
#[derive(Default)]
struct Watched {
    max_lag_seconds: f64,
    max_lag_bytes: u64,
    copy_seconds: f64,
}

/// Shows progress until the migration is Succeeded (triggering the cutover
/// once caught up), or fails.
async fn watch_migration(
    ctx: &Arc<crate::Context>,
    stats: &Arc<LoadStats>,
    opts: &DemoOptions,
) -> Result<Watched, DemoError> {
    let bar = indicatif::ProgressBar::new_spinner();
    if !console_is_terminal() {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let mut watched = Watched::default();
    let mut streaming_since: Option<Instant> = None;
    let mut cutover_requested = false;
    let mut rollback_requested = false;
    let mut last_line = Instant::now() - Duration::from_secs(10);
    let mut last_phase = String::new();
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let doc = ctx.status.render();
        let state = doc["state"].as_str().unwrap_or("").to_string();
        let substate = doc["substate"].as_str().unwrap_or("").to_string();
        let db = &doc["databases"][DB];
        let copy = &db["copy"];
        let stream = &db["stream"];
        if let Some(s) = copy["seconds"].as_f64() {
            watched.copy_seconds = s;
        }
        let lag_b = stream["lag_bytes"].as_u64().unwrap_or(0);
        let lag_s = stream["lag_seconds"].as_f64().unwrap_or(0.0);
        if streaming_since.is_some() {
            watched.max_lag_bytes = watched.max_lag_bytes.max(lag_b);
            watched.max_lag_seconds = watched.max_lag_seconds.max(lag_s);
        }
        let line = match (state.as_str(), substate.as_str()) {
            (_, "MigratingData") if copy["tables_total"].is_null() => {
                "preparing the copy (schema, slot)…".to_string()
            }
            (_, "MigratingData") => format!(
                "copying: {}/{} tables, {} rows, {}",
                copy["tables_copied"],
                copy["tables_total"],
                copy["rows"],
                human_bytes(copy["bytes"].as_f64().unwrap_or(0.0))
            ),
            (_, "WaitingForCutoverTrigger") => format!(
                "streaming: lag {} / {:.2}s, {} tx applied; load: {} committed, {} failed",
                human_bytes(lag_b as f64),
                lag_s,
                stream["transactions_applied"],
                stats.committed.load(Ordering::Relaxed),
                stats.failed.load(Ordering::Relaxed)
            ),
            (_, "CompletingMigration") => "cutover in progress…".to_string(),
            (_, "RollingBack") => "rollback in progress…".to_string(),
            (_, "RollbackAvailable") => format!(
                "on the target; reverse replication lag {}; verification after the switch: {}",
                human_bytes(db["reverse_stream"]["lag_bytes"].as_f64().unwrap_or(0.0)),
                doc["verify_after_switch"]["state"].as_str().unwrap_or("?")
            ),
            _ => format!("{state} / {substate}"),
        };
        let phase = format!("{state}/{substate}");
        if phase != last_phase {
            bar.println(format!("• {state} / {substate}"));
            last_phase = phase;
        }
        bar.set_message(line.clone());
        bar.tick();
        if !console_is_terminal() && last_line.elapsed() > Duration::from_secs(2) {
            println!("  {line}");
            last_line = Instant::now();
        }
        match (state.as_str(), substate.as_str()) {
            ("WaitingForUserAction", "WaitingForCutoverTrigger") if rollback_requested => {
                // Rolled back: clients on the source, forward streaming again.
                bar.finish_and_clear();
                return Ok(watched);
            }
            ("WaitingForUserAction", "WaitingForCutoverTrigger") => {
                let since = *streaming_since.get_or_insert_with(Instant::now);
                let last = &doc["last_cutover"];
                if cutover_requested && last["outcome"].as_str() == Some("aborted") {
                    bar.finish_and_clear();
                    return Err(DemoError::CutoverAborted {
                        reason: last["reason"].as_str().unwrap_or("?").to_string(),
                    });
                }
                // Caught up after streaming a while under load: cut over.
                if !cutover_requested && since.elapsed() >= opts.stream_for && lag_b < 16 << 20 {
                    bar.println("• caught up: starting the cutover under load");
                    request(ctx, crate::commands::CommandKind::Cutover).await?;
                    cutover_requested = true;
                }
            }
            ("Succeeded", "RollbackAvailable") => {
                let last = &doc["last_rollback"];
                if rollback_requested && last["outcome"].as_str() == Some("aborted") {
                    bar.finish_and_clear();
                    return Err(DemoError::CutoverAborted {
                        reason: format!("rollback: {}", last["reason"].as_str().unwrap_or("?")),
                    });
                }
                // The verification after the switch is done: roll back, under load.
                let verified = doc["verify_after_switch"]["state"]
                    .as_str()
                    .unwrap_or("none");
                if !rollback_requested && !matches!(verified, "running" | "none") {
                    bar.println(format!(
                        "• verification after the switch: {verified}; rolling back to the source under load"
                    ));
                    request(ctx, crate::commands::CommandKind::Rollback).await?;
                    rollback_requested = true;
                }
            }
            ("Succeeded", _) => {
                bar.finish_and_clear();
                return Ok(watched);
            }
            ("Failed" | "ValidationFailed" | "Canceled", _) => {
                bar.finish_and_clear();
                return Err(DemoError::MigrationEnded {
                    state: state.clone(),
                    reason: doc["reason"].as_str().unwrap_or("no reason").to_string(),
                });
            }
            _ => {}
        }
    }
}

async fn request(
    ctx: &Arc<crate::Context>,
    kind: crate::commands::CommandKind,
) -> Result<(), DemoError> {
    let tx = ctx.commands.get().ok_or(DemoError::NoRunner)?;
    let (reply, rx) = tokio::sync::oneshot::channel();
    tx.send(crate::commands::AdminCommand { kind, reply })
        .await
        .map_err(|_| DemoError::RunnerStopped)?;
    rx.await.map_err(|_| DemoError::RunnerStopped)??;
    Ok(())
}

fn console_is_terminal() -> bool {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal()
}

/// Every id a client saw committed is on the source, where the rollback
/// brought the clients back (those written on the target in between came
/// back by reverse replication).
async fn check_writes(
    source: &LocalCluster,
    target: &LocalCluster,
    stats: &LoadStats,
) -> Result<String, DemoError> {
    let ids = stats.ids.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let on_source = source.psql(DB, "SELECT string_agg(id::text, ',') FROM ledger")?;
    let source_ids: std::collections::HashSet<i64> = on_source
        .split(',')
        .filter_map(|s| s.parse().ok())
        .collect();
    let missing: Vec<i64> = ids
        .iter()
        .filter(|i| !source_ids.contains(i))
        .copied()
        .collect();
    let target_rows: i64 = target
        .psql(DB, "SELECT count(*) FROM ledger")?
        .parse()
        .unwrap_or(-1);
    if !missing.is_empty() {
        return Err(DemoError::MissingWrites {
            count: missing.len(),
            examples: missing[..missing.len().min(5)].to_vec(),
        });
    }
    Ok(format!(
        "all {} ledger rows clients saw committed are on the source after the rollback (the target holds {})",
        ids.len(),
        target_rows
    ))
}

/// One attempt's outcome and phases.
fn print_attempt(kind: &str, a: &Value) {
    println!(
        "{kind:<11} {} (id {})",
        a["outcome"].as_str().unwrap_or("?"),
        a["id"].as_str().unwrap_or("?")
    );
    for p in a["phases"].as_array().into_iter().flatten() {
        println!(
            "  {:<11} {:>8.1} ms  {}",
            p["phase"].as_str().unwrap_or(""),
            p["seconds"].as_f64().unwrap_or(0.0) * 1000.0,
            p["detail"].as_str().unwrap_or("")
        );
    }
}

fn print_report(
    doc: &Value,
    stats: &LoadStats,
    w: &Watched,
    checked: &Result<String, DemoError>,
    total: Duration,
) {
    let db = &doc["databases"][DB];
    let copy = &db["copy"];
    let bytes = copy["bytes"].as_f64().unwrap_or(0.0);
    println!("\n── pgshift demo report ─────────────────────────────────────────");
    println!(
        "copy        {} tables, {} rows, {} in {:.1}s ({}/s)",
        copy["tables_total"],
        copy["rows"],
        human_bytes(bytes),
        w.copy_seconds,
        human_bytes(if w.copy_seconds > 0.0 {
            bytes / w.copy_seconds
        } else {
            0.0
        })
    );
    println!(
        "streaming   max lag {} / {:.2}s under load",
        human_bytes(w.max_lag_bytes as f64),
        w.max_lag_seconds
    );
    let c = &doc["last_cutover"];
    print_attempt("cutover", c);
    let v = &doc["verify_after_switch"];
    println!(
        "verify      {} ({}) as of the switch, after the gate opened, in {:.1}s; {} table(s) differ",
        v["state"].as_str().unwrap_or("?"),
        v["mode"].as_str().unwrap_or("-"),
        v["seconds"].as_f64().unwrap_or(0.0),
        v["mismatches"].as_array().map_or(0, Vec::len)
    );
    let r = &doc["last_rollback"];
    print_attempt("rollback", r);
    println!(
        "pauses      cutover {:.1} ms, rollback {:.1} ms (gate closed → opened); the slowest client transaction took {:.1} ms",
        c["pause_seconds"].as_f64().unwrap_or(0.0) * 1000.0,
        r["pause_seconds"].as_f64().unwrap_or(0.0) * 1000.0,
        stats.max_latency_us.load(Ordering::Relaxed) as f64 / 1000.0
    );
    println!(
        "load        {} transactions committed, {} failed",
        stats.committed.load(Ordering::Relaxed),
        stats.failed.load(Ordering::Relaxed)
    );
    for e in stats
        .errors
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .take(5)
    {
        println!("  error: {e}");
    }
    match checked {
        Ok(m) => println!("verified    {m}"),
        Err(m) => println!("verified    FAILED: {m}"),
    }
    println!(
        "total       {:.1}s; both clusters are stopped and removed",
        total.as_secs_f64()
    );
}
