//! Helpers for the cutover tests: `pgshift run` as a real process on a
//! source/target pair, its admin API, and a ledger that clients write to.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

use pgshift::admin::client::{AdminClient, ClientError};
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

    /// Ledger ids on a cluster.
    pub fn ledger_ids(c: &Cluster) -> Vec<i64> {
        c.psql(DB, "SELECT id FROM ledger ORDER BY id")
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }
}

/// A `pgshift run --config FILE` process; killed when dropped.
pub struct Shift {
    pub child: Option<Child>,
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub proxy_port: u16,
    pub admin_port: u16,
    pub token: Option<String>,
    runs: usize,
}

impl Shift {
    /// Writes the config (`admin_extra` lands inside `[admin]`, `cutover`
    /// inside `[cutover]`) and starts pgshift with the extra environment.
    pub fn start(pair: &Pair, admin_extra: &str, cutover: &str, env: &[(&str, &str)]) -> Shift {
        let dir = tempfile::tempdir().unwrap();
        let proxy_port = free_port();
        let admin_port = free_port();
        let extra = format!(
            "{admin_extra}\n\n[migration]\nname = \"cut\"\ndatabases = [\"{DB}\"]\nmode = \"online\"\n\n[cutover]\n{cutover}\n"
        );
        let text = config_text(&pair.source, &pair.target, proxy_port, admin_port, &extra);
        let config = dir.path().join("pgshift.toml");
        std::fs::write(&config, text).unwrap();
        let token = admin_extra
            .lines()
            .find_map(|l| l.trim().strip_prefix("token = "))
            .map(|t| t.trim_matches('"').to_string());
        let mut s = Shift {
            child: None,
            dir,
            config,
            proxy_port,
            admin_port,
            token,
            runs: 0,
        };
        s.spawn(env);
        s
    }

    /// Starts the process (again), logging into the temp dir.
    pub fn spawn(&mut self, env: &[(&str, &str)]) {
        self.runs += 1;
        let log = std::fs::File::create(self.log_path()).unwrap();
        let mut cmd = Command::new(pgshift_bin());
        cmd.arg("run")
            .arg("--config")
            .arg(&self.config)
            .env("RUST_LOG", "info")
            .env_remove("PGSHIFT_FAILPOINT")
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        for (k, v) in env {
            cmd.env(k, v);
        }
        self.child = Some(cmd.spawn().expect("start pgshift run"));
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join(format!("pgshift-{}.log", self.runs))
    }

    /// The log of the current run.
    pub fn current_log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Every run's log, for failure messages.
    pub fn log(&self) -> String {
        (1..=self.runs)
            .map(|i| {
                let p = self.dir.path().join(format!("pgshift-{i}.log"));
                format!(
                    "--- run {i} ---\n{}",
                    std::fs::read_to_string(p).unwrap_or_default()
                )
            })
            .collect()
    }

    /// SIGKILL: no cleanup of any kind.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn admin(&self) -> AdminClient {
        AdminClient::new(
            &format!("http://127.0.0.1:{}", self.admin_port),
            self.token.clone(),
        )
        .unwrap()
    }

    pub fn admin_with(&self, token: Option<&str>) -> AdminClient {
        AdminClient::new(
            &format!("http://127.0.0.1:{}", self.admin_port),
            token.map(str::to_string),
        )
        .unwrap()
    }

    pub async fn status(&self) -> Result<Value, ClientError> {
        self.admin().get("/status").await
    }

    /// Waits until /status shows `state`/`substate`; panics with the log otherwise.
    pub async fn wait_state(&self, state: &str, substate: &str, timeout: Duration) -> Value {
        let start = Instant::now();
        let mut last = Value::Null;
        while start.elapsed() < timeout {
            if let Ok(doc) = self.status().await {
                if doc["state"] == state && doc["substate"] == substate {
                    return doc;
                }
                if doc["state"] == "Failed" {
                    panic!("migration failed: {doc:#}\n{}", self.log());
                }
                last = doc;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!(
            "state {state}/{substate} not reached in {timeout:?}; last status {last:#}\n{}",
            self.log()
        );
    }

    /// Waits until streaming with the target caught up (lag 0 bytes).
    pub async fn wait_streaming(&self) -> Value {
        let doc = self
            .wait_state(
                "WaitingForUserAction",
                "WaitingForCutoverTrigger",
                Duration::from_secs(300),
            )
            .await;
        let _ = doc;
        let start = Instant::now();
        loop {
            let doc = self.status().await.unwrap();
            let st = &doc["databases"][DB];
            if st["stream"]["state"] == "streaming" || start.elapsed() > Duration::from_secs(120) {
                return doc;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until the last cutover attempt has `phase` in its report.
    pub async fn wait_phase(&self, phase: &str, timeout: Duration) -> Value {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if let Ok(doc) = self.status().await
                && doc["last_cutover"]["phases"]
                    .as_array()
                    .is_some_and(|p| p.iter().any(|x| x["phase"] == phase))
            {
                return doc;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("phase {phase} not reached\n{}", self.log());
    }

    /// Runs a pgshift CLI command against this instance (`--config` added).
    pub async fn cli(&self, args: &[&str]) -> Output {
        let mut cmd = tokio::process::Command::new(pgshift_bin());
        cmd.args(args).arg("--config").arg(&self.config);
        tokio::time::timeout(Duration::from_secs(600), cmd.output())
            .await
            .expect("pgshift CLI did not finish")
            .expect("run pgshift CLI")
    }

    /// The proxy URL for `app`.
    pub fn url(&self) -> String {
        format!(
            "postgres://{APP_USER}:{APP_PW}@127.0.0.1:{}/{DB}?sslmode=disable",
            self.proxy_port
        )
    }

    /// A libpq-style DSN for the proxy (psycopg, pgbench).
    pub fn dsn(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user={APP_USER} password={APP_PW} dbname={DB} sslmode=disable",
            self.proxy_port
        )
    }

    /// The last cutover's report, from /status.
    pub async fn last_cutover(&self) -> Value {
        self.status().await.unwrap()["last_cutover"].clone()
    }
}

impl Drop for Shift {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Text of a finished command, for assertions.
pub fn out_text(o: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
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
) -> (Pair, Shift, tokio_postgres::Client) {
    let pair = Pair::start();
    let shift = Shift::start(&pair, "", cutover_conf, &[]);
    shift.wait_streaming().await;
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
pub async fn streaming_held_after_catchup(cutover_conf: &str) -> (Pair, Shift, Held) {
    let pair = Pair::start();
    let dir = tempfile::tempdir().unwrap();
    let release = dir.path().join("release");
    let failpoint = format!("hold:catchup:{}", release.display());
    let shift = Shift::start(
        &pair,
        "",
        cutover_conf,
        &[("PGSHIFT_FAILPOINT", failpoint.as_str())],
    );
    shift.wait_streaming().await;
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
        shift: &Shift,
        write: impl std::future::Future<Output = ()>,
    ) -> tokio_postgres::Client {
        shift.wait_phase("catchup", Duration::from_secs(120)).await;
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
