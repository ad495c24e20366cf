//! What the cutover scenarios share beyond the harness's [`Pgshift`]
//! (tests/common/process.rs): a source/target pair with a ledger that
//! clients write to through the proxy, the online migration's config, and
//! set-ups that hold or block a cutover at a chosen point.
#![allow(dead_code)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::*;

/// The migrated database.
pub const DB: &str = "shop";

/// Source and target clusters; the source has `shop` with a ledger table
/// (`id bigserial`, written through the proxy by the tests) and an `items` table.
pub struct Pair {
    pub source: Cluster,
    pub target: Cluster,
}

impl Pair {
    pub fn start() -> Pair {
        Pair::start_with(ClusterOptions::default(), ClusterOptions::default())
    }

    /// [`Pair::start`] with cluster options of its own for each side (e.g.
    /// server programs of other versions).
    pub fn start_with(source: ClusterOptions, target: ClusterOptions) -> Pair {
        let source = Cluster::start_with(source);
        let target = Cluster::start_with(target);
        source.psql(
            "postgres",
            &format!("CREATE DATABASE {DB} OWNER {APP_USER}"),
        );
        source.psql(
            DB,
            "CREATE TABLE ledger (id bigserial PRIMARY KEY, client text NOT NULL, note text,
                                  at timestamptz NOT NULL DEFAULT clock_timestamp());
             CREATE TABLE items (id int PRIMARY KEY, name text);
             INSERT INTO items SELECT g, 'item ' || g FROM generate_series(1, 100) g;
             INSERT INTO ledger (client, note) SELECT 'seed', 'before the copy' FROM generate_series(1, 50);
             GRANT ALL ON ALL TABLES IN SCHEMA public TO app;
             GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO app;",
        );
        Pair { source, target }
    }

    /// Whether `db` on `c` has `default_transaction_read_only` set at database level.
    pub fn fenced(c: &Cluster) -> bool {
        c.psql(
            "postgres",
            &format!(
                "SELECT count(*) FROM pg_db_role_setting s JOIN pg_database d ON d.oid = s.setdatabase
                 WHERE d.datname = '{DB}' AND s.setrole = 0
                   AND 'default_transaction_read_only=on' = ANY(s.setconfig)"
            ),
        ) == "1"
    }

    /// Writes the online migration's config for `shop` (`admin_extra`
    /// lands inside `[admin]`, `cutover` inside `[cutover]`) and launches
    /// `pgshift run` with the extra environment.
    pub fn launch(&self, admin_extra: &str, cutover: &str, env: &[(&str, &str)]) -> Pgshift {
        let extra = format!(
            "{admin_extra}\n\n{}\n[cutover]\n{cutover}\n",
            migration("cut", &[DB], "mode = \"online\"")
        );
        Pgshift::launch(&self.source, &self.target, &extra, env)
    }

    /// Ledger ids on a cluster.
    pub fn ledger_ids(c: &Cluster) -> Vec<i64> {
        c.psql(DB, "SELECT id FROM ledger ORDER BY id")
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }
}

/// A writer through the proxy on one persistent connection: inserts ledger
/// rows and records every id whose COMMIT was acknowledged, with the port of
/// the server that ran it (`inet_server_port()`).
pub struct Writer {
    pub stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    pub task: tokio::task::JoinHandle<WriterResult>,
    /// How many commits were acknowledged so far (for waiting on progress).
    pub acked: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

#[derive(Debug, Default)]
pub struct WriterResult {
    /// (id, server port) of every acknowledged commit.
    pub committed: Vec<(i64, i32)>,
    pub errors: Vec<String>,
}

impl Writer {
    pub async fn start(url: &str, name: &str) -> Writer {
        let client = connect(url).await;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s = stop.clone();
        let acked = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let a = acked.clone();
        let name = name.to_string();
        let task = tokio::spawn(async move {
            let mut r = WriterResult::default();
            let insert = client
                .prepare(
                    "INSERT INTO ledger (client, note) VALUES ($1, 'writer') RETURNING id, inet_server_port()",
                )
                .await
                .unwrap();
            while !s.load(std::sync::atomic::Ordering::Relaxed) {
                let res: Result<(i64, i32), tokio_postgres::Error> = async {
                    client.batch_execute("BEGIN").await?;
                    let row = client.query_one(&insert, &[&name]).await?;
                    client.batch_execute("COMMIT").await?;
                    Ok((row.get(0), row.get(1)))
                }
                .await;
                match res {
                    Ok(x) => {
                        r.committed.push(x);
                        a.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    Err(e) => {
                        r.errors.push(pgshift::db::describe(&e));
                        if client.is_closed() {
                            break;
                        }
                        let _ = client.batch_execute("ROLLBACK").await;
                    }
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            r
        });
        Writer { stop, task, acked }
    }

    /// How many commits were acknowledged so far.
    pub fn acked(&self) -> usize {
        self.acked.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Waits until `n` more commits than now were acknowledged.
    pub async fn wait_more(&self, n: usize) {
        self.wait_committed(self.acked() + n).await;
    }

    /// Waits until at least `n` commits were acknowledged (no time budget:
    /// a slow machine only makes it take longer; a stuck writer fails after 120 s).
    pub async fn wait_committed(&self, n: usize) {
        let start = Instant::now();
        while self.acked.load(std::sync::atomic::Ordering::Relaxed) < n {
            assert!(
                !self.task.is_finished() && start.elapsed() < Duration::from_secs(120),
                "the writer did not reach {n} commits"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn finish(self) -> WriterResult {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.task.await.unwrap()
    }
}

/// One acknowledged write through the proxy; returns (id, server port).
pub async fn write_one(url: &str, note: &str) -> Result<(i64, i32), String> {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let row = client
        .query_one(
            "INSERT INTO ledger (client, note) VALUES ('one', $1) RETURNING id, inet_server_port()",
            &[&note],
        )
        .await
        .map_err(|e| pgshift::db::describe(&e))?;
    Ok((row.get(0), row.get(1)))
}

/// Connects through the proxy, retrying while pgshift is still starting.
pub async fn connect_retry(url: &str) -> tokio_postgres::Client {
    let start = Instant::now();
    loop {
        match tokio_postgres::connect(url, tokio_postgres::NoTls).await {
            Ok((c, conn)) => {
                tokio::spawn(conn);
                return c;
            }
            Err(e) if start.elapsed() > Duration::from_secs(120) => panic!("connect {url}: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// The report of phase `name` in a cutover report (Null if absent).
pub fn phase(last: &Value, name: &str) -> Value {
    last["phases"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["phase"] == name))
        .cloned()
        .unwrap_or_default()
}

/// The detail of phase `name` in a cutover report ("" if absent).
pub fn detail(last: &Value, name: &str) -> String {
    phase(last, name)["detail"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// A migration streaming with `cutover_conf`, whose apply blocks behind a
/// lock held by the returned session on the target (roll it back to let
/// apply go on).
pub async fn streaming_with_apply_blocked(
    cutover_conf: &str,
) -> (Pair, Pgshift, tokio_postgres::Client) {
    let pair = Pair::start();
    let shift = pair.launch("", cutover_conf, &[]);
    shift.wait_streaming_async(DB).await;
    let blocker = pair.target.client(DB).await;
    blocker
        .batch_execute("BEGIN; LOCK TABLE ledger IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    (pair, shift, blocker)
}

/// A migration streaming with `cutover_conf` whose cutover attempts hold
/// after their pre-gate catch-up (test hook) until [`Held::block_apply`]
/// has blocked apply: the marker inside the pause then waits behind it.
pub async fn streaming_held_after_catchup(cutover_conf: &str) -> (Pair, Pgshift, Held) {
    let pair = Pair::start();
    let dir = tempfile::tempdir().unwrap();
    let release = dir.path().join("release");
    let failpoint = format!("hold:catchup:{}", release.display());
    let shift = pair.launch(
        "",
        cutover_conf,
        &[("PGSHIFT_FAILPOINT", failpoint.as_str())],
    );
    shift.wait_streaming_async(DB).await;
    (pair, shift, Held { _dir: dir, release })
}

pub struct Held {
    _dir: tempfile::TempDir,
    release: PathBuf,
}

impl Held {
    /// Once the attempt's catch-up is done: locks the target's ledger (the
    /// returned session holds the lock; roll it back to let apply go on),
    /// writes a ledger row on the source through `write` so apply has a
    /// change to wait on, then lets the attempt go on.
    pub async fn block_apply(
        &self,
        pair: &Pair,
        shift: &Pgshift,
        write: impl std::future::Future<Output = ()>,
    ) -> tokio_postgres::Client {
        shift
            .wait_phase_async("catchup", Duration::from_secs(120))
            .await;
        let blocker = pair.target.client(DB).await;
        blocker
            .batch_execute("BEGIN; LOCK TABLE ledger IN ACCESS EXCLUSIVE MODE")
            .await
            .unwrap();
        write.await;
        std::fs::write(&self.release, b"go").unwrap();
        blocker
    }
}

/// pgbench TPC-B `-M prepared` through the proxy on `port` (persistent
/// sessions), `clients` clients at `rate` tx/s in all, until killed (`-T`
/// only as a safety net), so it still runs at every switch however slow the
/// machine is.
pub fn pgbench_through(port: u16, clients: u32, rate: u32) -> tokio::process::Child {
    tokio::process::Command::new(pg_program("pgbench"))
        .args(["-M", "prepared", "-n", "-j", "1", "-T", "100000"])
        .args(["-c", &clients.to_string(), "-R", &rate.to_string()])
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(["-U", APP_USER, DB])
        .env("PGPASSWORD", APP_PW)
        .env("PGSSLMODE", "disable")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start pgbench")
}

/// pgbench TPC-B tables in `shop` (scale 1), history with a key so it streams.
pub fn pgbench_init(pair: &Pair) {
    let out = std::process::Command::new(pg_program("pgbench"))
        .args(["-i", "-q", "-s", "1", "-h"])
        .arg(&pair.source.socket_dir)
        .args(["-p", &pair.source.port.to_string(), "-U", APP_USER, DB])
        .output()
        .unwrap();
    assert!(out.status.success(), "pgbench -i: {}", out_text(&out));
    pair.source.psql(
        DB,
        "ALTER TABLE pgbench_history ADD COLUMN id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY",
    );
}
