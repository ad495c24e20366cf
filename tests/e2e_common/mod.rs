//! End-to-end harness: the real `pgshift run` binary with a config file,
//! driven and observed only from outside (admin HTTP, CLI, SQL), the way an
//! operator would. Shared by the tests/e2e_*.rs files.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pgshift::replication::Lsn;
use serde_json::Value;

use crate::common::*;

pub mod corpus;

/// A `pgshift run` process (killed when dropped) with its config and log.
pub struct Pgshift {
    child: Option<Child>,
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub proxy_port: u16,
    pub admin_port: u16,
    runs: u32,
}

impl Pgshift {
    /// Writes a config for the pair (proxy users app / md5user) with `extra`
    /// appended (the [migration] section) and starts `pgshift run`.
    pub fn start(source: &Cluster, target: &Cluster, extra: &str) -> Pgshift {
        let dir = tempfile::tempdir().expect("temp dir");
        let (proxy_port, admin_port) = (free_port(), free_port());
        let config = dir.path().join("pgshift.toml");
        std::fs::write(
            &config,
            config_text(source, target, proxy_port, admin_port, extra),
        )
        .expect("write config");
        let mut p = Pgshift {
            child: None,
            dir,
            config,
            proxy_port,
            admin_port,
            runs: 0,
        };
        p.spawn();
        p
    }

    fn log_path(&self, run: u32) -> PathBuf {
        self.dir.path().join(format!("pgshift-{run}.log"))
    }

    /// Starts the process again (after a kill); each run logs to its own file.
    pub fn spawn(&mut self) {
        assert!(self.child.is_none(), "pgshift is already running");
        self.runs += 1;
        let log = std::fs::File::create(self.log_path(self.runs)).expect("log file");
        let child = Command::new(pgshift_bin())
            .arg("run")
            .arg("--config")
            .arg(&self.config)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start pgshift");
        self.child = Some(child);
        // The admin port answers once the migration state is loaded.
        let ok = wait_until(Duration::from_secs(120), || self.status().is_some());
        assert!(ok, "pgshift did not start\n{}", self.logs());
    }

    /// SIGKILL: no shutdown path runs.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for a clean exit; returns the exit code.
    pub fn terminate(&mut self) -> Option<i32> {
        let mut c = self.child.take()?;
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(c.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(120);
        while Instant::now() < deadline {
            if let Ok(Some(s)) = c.try_wait() {
                return s.code();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = c.kill();
        let _ = c.wait();
        None
    }

    /// Every run's log, for failure messages.
    pub fn logs(&self) -> String {
        (1..=self.runs)
            .map(|r| {
                format!(
                    "--- pgshift run {r} ---\n{}",
                    std::fs::read_to_string(self.log_path(r)).unwrap_or_default()
                )
            })
            .collect()
    }

    pub fn admin_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.admin_port)
    }

    /// GET /status, or None while the admin port does not answer.
    pub fn status(&self) -> Option<Value> {
        let (code, body) = http(self.admin_port, "GET", "/status")?;
        (code == 200).then(|| serde_json::from_str(&body).ok())?
    }

    /// Polls /status until `f` holds, at most `timeout`; panics with the
    /// last status and the logs.
    pub fn wait_status(&self, what: &str, timeout: Duration, f: impl Fn(&Value) -> bool) -> Value {
        self.wait_status_progress(what, timeout, |_| String::new(), f)
    }

    /// Polls /status until `f` holds, for as long as `progress` (e.g. the
    /// applied position) keeps changing: fails only after `stall` without
    /// any change, with the last status and the logs.
    pub fn wait_status_progress(
        &self,
        what: &str,
        stall: Duration,
        progress: impl Fn(&Value) -> String,
        f: impl Fn(&Value) -> bool,
    ) -> Value {
        let start = Instant::now();
        let mut moved = Instant::now();
        let mut seen = String::new();
        let mut last = Value::Null;
        while moved.elapsed() < stall {
            if let Some(s) = self.status() {
                if f(&s) {
                    eprintln!(
                        "{what}: reached after {:.1}s",
                        start.elapsed().as_secs_f64()
                    );
                    return s;
                }
                let p = progress(&s);
                if p != seen {
                    seen = p;
                    moved = Instant::now();
                }
                last = s;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "{what}: no progress for {stall:?} (after {:.1}s); last status:\n{}\n{}",
            start.elapsed().as_secs_f64(),
            serde_json::to_string_pretty(&last).unwrap_or_default(),
            self.logs()
        )
    }

    /// Waits for `state` (e.g. "WaitingForUserAction"); fails fast on an
    /// unexpected terminal state.
    pub fn wait_state(&self, state: &str, timeout: Duration) -> Value {
        let s = self.wait_status(state, timeout, |s| {
            let st = s["state"].as_str().unwrap_or("");
            st == state || is_terminal(st)
        });
        assert_eq!(
            s["state"],
            state,
            "unexpected state; status:\n{}\n{}",
            serde_json::to_string_pretty(&s).unwrap_or_default(),
            self.logs()
        );
        s
    }

    /// Waits until every listed database streams with lag 0, measured
    /// against a source position read now: lag is sampled once a second,
    /// and a sample from before the last write would say 0 too early.
    pub fn wait_caught_up(&self, source: &Cluster, dbs: &[&str], timeout: Duration) -> Value {
        let now: Lsn = source
            .psql("postgres", "SELECT pg_current_wal_lsn()")
            .parse()
            .expect("an LSN");
        // A slow machine applies slowly: wait while apply moves on, fail
        // only when it stops moving for `timeout`.
        let applied = |s: &Value| -> String {
            dbs.iter()
                .map(|db| s["databases"][db]["stream"]["applied_lsn"].to_string())
                .collect()
        };
        self.wait_status_progress("lag 0", timeout, applied, |s| {
            dbs.iter().all(|db| {
                let st = &s["databases"][db]["stream"];
                let sampled: Lsn = st["source_lsn"]
                    .as_str()
                    .and_then(|l| l.parse().ok())
                    .unwrap_or_default();
                st["state"] == "streaming" && st["lag_bytes"] == 0 && sampled >= now
            })
        })
    }

    /// Runs a pgshift subcommand against this instance's config.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(pgshift_bin())
            .args(args)
            .arg("--config")
            .arg(&self.config)
            .output()
            .expect("run pgshift")
    }

    /// `pgshift verify --config …`: (exit code, stdout + stderr).
    pub fn verify(&self) -> (i32, String) {
        let o = self.cli(&["verify"]);
        (
            o.status.code().unwrap_or(-1),
            format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
        )
    }

    /// Asserts `pgshift verify` passes and every database's fingerprints match.
    pub fn assert_exact_copy(&self, source: &Cluster, target: &Cluster, dbs: &[&str]) {
        let (code, out) = self.verify();
        assert_eq!(code, 0, "pgshift verify failed:\n{out}\n{}", self.logs());
        let set = comparable_floats(source, target);
        for db in dbs {
            assert_eq!(
                table_fingerprints_with(source, db, &set),
                table_fingerprints_with(target, db, &set),
                "database {db} differs"
            );
        }
    }

    /// The pid of the running process.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }
}

impl Drop for Pgshift {
    fn drop(&mut self) {
        self.kill9();
    }
}

pub fn is_terminal(state: &str) -> bool {
    matches!(
        state,
        "Succeeded" | "Failed" | "ValidationFailed" | "Canceled"
    )
}

/// One HTTP/1.1 request to the admin port: (status code, body).
pub fn http(port: u16, method: &str, path: &str) -> Option<(u16, String)> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let code = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string())?;
    Some((code, body))
}

/// The migration's slots on the source (name, database).
pub fn slots(source: &Cluster) -> Vec<String> {
    source
        .psql(
            "postgres",
            "SELECT slot_name || '@' || database FROM pg_replication_slots ORDER BY 1",
        )
        .lines()
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect()
}

/// Publications in `db` on the source.
pub fn publications(source: &Cluster, db: &str) -> Vec<String> {
    source
        .psql(db, "SELECT pubname FROM pg_publication ORDER BY 1")
        .lines()
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect()
}

/// A migration section for `dbs` with extra keys.
pub fn migration(name: &str, dbs: &[&str], extra: &str) -> String {
    let list: Vec<String> = dbs.iter().map(|d| format!("\"{d}\"")).collect();
    format!(
        "[migration]\nname = \"{name}\"\ndatabases = [{}]\n{extra}\n",
        list.join(", ")
    )
}

/// What a proxied writer saw.
#[derive(Default)]
pub struct Seen {
    pub errors: Vec<String>,
    pub slowest: Duration,
}

/// Inserts ids 1, 2, 3 … into `writes(id)` through the proxy as `app`, one
/// autocommit statement each, until stopped; the last acknowledged id is
/// published, an error is recorded and ends the writer (never retried).
pub fn proxied_writer(
    port: u16,
    db: &str,
    stop: Arc<AtomicBool>,
    last: Arc<AtomicI64>,
    seen: Arc<Mutex<Seen>>,
) {
    write_through_proxy(port, db, false, stop, last, seen)
}

/// [`proxied_writer`] with one named prepared statement, prepared once and
/// executed for every write: the statement must survive a session move.
pub fn proxied_prepared_writer(
    port: u16,
    db: &str,
    stop: Arc<AtomicBool>,
    last: Arc<AtomicI64>,
    seen: Arc<Mutex<Seen>>,
) {
    write_through_proxy(port, db, true, stop, last, seen)
}

fn write_through_proxy(
    port: u16,
    db: &str,
    prepared: bool,
    stop: Arc<AtomicBool>,
    last: Arc<AtomicI64>,
    seen: Arc<Mutex<Seen>>,
) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let url = format!("postgres://{APP_USER}:{APP_PW}@127.0.0.1:{port}/{db}");
    rt.block_on(async move {
        let c = connect(&url).await;
        const INSERT: &str = "INSERT INTO writes(id) VALUES ($1)";
        let statement = if prepared {
            Some(c.prepare(INSERT).await.expect("prepare the write"))
        } else {
            None
        };
        let mut id = 0i64;
        while !stop.load(Ordering::Relaxed) {
            id += 1;
            let t = Instant::now();
            let r = match &statement {
                Some(st) => c.execute(st, &[&id]).await,
                None => c.execute(INSERT, &[&id]).await,
            };
            {
                let mut s = seen.lock().unwrap();
                s.slowest = s.slowest.max(t.elapsed());
                if let Err(e) = r {
                    let detail = e
                        .as_db_error()
                        .map(|d| format!("{} {} ({:?})", d.code().code(), d.message(), d.detail()));
                    s.errors
                        .push(format!("id {id}: {e} {}", detail.unwrap_or_default()));
                    return;
                }
            }
            last.store(id, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
}
