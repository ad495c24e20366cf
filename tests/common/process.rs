//! The one way tests run pgshift: [`Pgshift`] is a `pgshift run --config
//! FILE` process on a source/target pair, with its config, its logs (one
//! file per run), its admin API and the CLI.
//!
//! Waiting is blocking (std sleep polling over /status, one loop:
//! [`Probe::poll`]), for `#[test]` functions. Async tests use the `*_async`
//! twins, which run the same loop on a blocking thread, so other futures
//! (a writer, a `cutover --wait` in a `join!`) keep running meanwhile.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

use pgshift::admin::client::{AdminClient, ClientError};
use pgshift::replication::Lsn;
use serde_json::Value;

use super::*;

/// A `pgshift run` process (SIGKILLed when dropped) with its config and logs.
pub struct Pgshift {
    child: Option<Child>,
    /// Holds the config and the logs; free for a test's own files.
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub proxy_port: u16,
    pub admin_port: u16,
    /// The admin token, when the config sets one.
    pub token: Option<String>,
    runs: u32,
}

impl Pgshift {
    /// Writes the config for the pair ([`config_text`] with `extra`
    /// appended: `[migration]` and more) and starts `pgshift run` with the
    /// extra environment (e.g. `PGSHIFT_FAILPOINT`). Does not wait: the
    /// first wait for a status does.
    pub fn launch(
        source: &Cluster,
        target: &Cluster,
        extra: &str,
        env: &[(&str, &str)],
    ) -> Pgshift {
        let (proxy_port, admin_port) = (free_port(), free_port());
        let text = config_text(source, target, proxy_port, admin_port, extra);
        Pgshift::launch_config(&text, proxy_port, admin_port, env)
    }

    /// Writes `text` as the config (whose proxy and admin listen on the
    /// given ports) and starts `pgshift run` with the extra environment.
    /// Does not wait.
    pub fn launch_config(
        text: &str,
        proxy_port: u16,
        admin_port: u16,
        env: &[(&str, &str)],
    ) -> Pgshift {
        let dir = tempfile::tempdir().expect("temp dir");
        let config = dir.path().join("pgshift.toml");
        std::fs::write(&config, text).expect("write config");
        let mut p = Pgshift {
            child: None,
            dir,
            config,
            proxy_port,
            admin_port,
            token: admin_token(text),
            runs: 0,
        };
        p.spawn_with(env);
        p
    }

    /// [`Pgshift::launch`] without extra environment, then waits until the
    /// admin API answers.
    pub fn start(source: &Cluster, target: &Cluster, extra: &str) -> Pgshift {
        let p = Pgshift::launch(source, target, extra, &[]);
        p.wait_up();
        p
    }

    /// Starts the process again (after [`Pgshift::kill`]), without the
    /// launch's extra environment; each run logs to its own file. Does not wait.
    pub fn spawn(&mut self) {
        self.spawn_with(&[]);
    }

    /// [`Pgshift::spawn`], then waits until the admin API answers.
    pub fn restart(&mut self) {
        self.spawn();
        self.wait_up();
    }

    /// [`Pgshift::restart`] with extra environment (e.g. the same failpoint).
    pub fn restart_with(&mut self, env: &[(&str, &str)]) {
        self.spawn_with(env);
        self.wait_up();
    }

    fn spawn_with(&mut self, env: &[(&str, &str)]) {
        assert!(self.child.is_none(), "pgshift is already running");
        self.runs += 1;
        let log = std::fs::File::create(self.probe().log_path(self.runs)).expect("log file");
        let mut cmd = Command::new(pgshift_bin());
        cmd.arg("run")
            .arg("--config")
            .arg(&self.config)
            .env("RUST_LOG", "info")
            .env_remove("PGSHIFT_FAILPOINT")
            .stdout(log.try_clone().expect("log file"))
            .stderr(log);
        for (k, v) in env {
            cmd.env(k, v);
        }
        self.child = Some(cmd.spawn().expect("start pgshift run"));
    }

    /// Waits until the admin API answers (the migration state is loaded).
    pub fn wait_up(&self) {
        let ok = wait_until(Duration::from_secs(120), || self.status().is_some());
        assert!(ok, "pgshift did not start\n{}", self.log());
    }

    /// SIGKILL: no shutdown path runs.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for a clean exit; returns the exit code.
    pub fn terminate(&mut self) -> Option<i32> {
        self.sigterm();
        self.wait_exit(Duration::from_secs(120))
    }

    /// Sends SIGTERM (the process then drains and exits).
    pub fn sigterm(&self) {
        if let Some(c) = &self.child {
            let st = Command::new("kill")
                .arg("-TERM")
                .arg(c.id().to_string())
                .status()
                .expect("run kill");
            assert!(st.success(), "kill -TERM {}", c.id());
        }
    }

    /// Waits until the process exits, at most `within` (then kills it):
    /// its exit code, or None when it had to be killed or is not running.
    pub fn wait_exit(&mut self, within: Duration) -> Option<i32> {
        let mut c = self.child.take()?;
        let start = Instant::now();
        while start.elapsed() < within {
            if let Ok(Some(s)) = c.try_wait() {
                return Some(s.code().unwrap_or(-1));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = c.kill();
        let _ = c.wait();
        None
    }

    /// The pid of the running process.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// What the waiting helpers need, to hand to a blocking thread.
    pub fn probe(&self) -> Probe {
        Probe {
            admin_port: self.admin_port,
            token: self.token.clone(),
            dir: self.dir.path().to_path_buf(),
            runs: self.runs,
        }
    }

    /// Runs `f` on a blocking thread (for the `*_async` twins); a panic
    /// there is the caller's panic.
    async fn off_runtime<T: Send + 'static>(
        &self,
        f: impl FnOnce(Probe) -> T + Send + 'static,
    ) -> T {
        let probe = self.probe();
        match tokio::task::spawn_blocking(move || f(probe)).await {
            Ok(v) => v,
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    }

    /// Every run's log (`--- run N ---` headers), for failure messages.
    pub fn log(&self) -> String {
        self.probe().log()
    }

    /// The log of the current run.
    pub fn current_log(&self) -> String {
        let probe = self.probe();
        std::fs::read_to_string(probe.log_path(probe.runs)).unwrap_or_default()
    }

    pub fn admin_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.admin_port)
    }

    /// An admin API client with the config's token.
    pub fn admin(&self) -> AdminClient {
        self.admin_with(self.token.as_deref())
    }

    /// An admin API client with `token` (or none).
    pub fn admin_with(&self, token: Option<&str>) -> AdminClient {
        AdminClient::new(&self.admin_url(), token.map(str::to_string)).expect("admin URL")
    }

    /// The proxy URL for `app` on `db`.
    pub fn url(&self, db: &str) -> String {
        format!(
            "postgres://{APP_USER}:{APP_PW}@127.0.0.1:{}/{db}?sslmode=disable",
            self.proxy_port
        )
    }

    /// A libpq-style DSN for the proxy as `app` on `db` (psycopg, pgbench).
    pub fn dsn(&self, db: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user={APP_USER} password={APP_PW} dbname={db} sslmode=disable",
            self.proxy_port
        )
    }

    /// GET /status, or None while the admin API does not answer.
    pub fn status(&self) -> Option<Value> {
        self.probe().status()
    }

    /// GET /status (async, through the admin client).
    pub async fn status_async(&self) -> Result<Value, ClientError> {
        self.admin().get("/status").await
    }

    /// The last cutover's report, from /status.
    pub async fn last_cutover_async(&self) -> Value {
        self.status_async().await.expect("status")["last_cutover"].clone()
    }

    /// Polls /status until `f` holds, at most `timeout`; panics with the
    /// last status and the logs.
    pub fn wait_status(&self, what: &str, timeout: Duration, f: impl Fn(&Value) -> bool) -> Value {
        self.probe().wait_status(what, timeout, f)
    }

    pub async fn wait_status_async(
        &self,
        what: &str,
        timeout: Duration,
        f: impl Fn(&Value) -> bool + Send + 'static,
    ) -> Value {
        let what = what.to_string();
        self.off_runtime(move |p| p.wait_status(&what, timeout, f))
            .await
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
        self.probe().wait_status_progress(what, stall, progress, f)
    }

    /// Waits for `state` (e.g. "WaitingForUserAction"); fails fast on an
    /// unexpected terminal state.
    pub fn wait_state(&self, state: &str, timeout: Duration) -> Value {
        self.probe().wait_state(state, timeout)
    }

    /// Waits until /status shows `state`/`substate`; fails fast on `Failed`.
    pub fn wait_substate(&self, state: &str, substate: &str, timeout: Duration) -> Value {
        self.probe().wait_substate(state, substate, timeout)
    }

    pub async fn wait_substate_async(
        &self,
        state: &str,
        substate: &str,
        timeout: Duration,
    ) -> Value {
        let (state, substate) = (state.to_string(), substate.to_string());
        self.off_runtime(move |p| p.wait_substate(&state, &substate, timeout))
            .await
    }

    /// Waits until the migration waits for a cutover trigger and `db`'s
    /// stream says `streaming` (after 120 s more it returns anyway: the
    /// caller's assertions then say what is wrong).
    pub fn wait_streaming(&self, db: &str) -> Value {
        self.probe().wait_streaming(db)
    }

    pub async fn wait_streaming_async(&self, db: &str) -> Value {
        let db = db.to_string();
        self.off_runtime(move |p| p.wait_streaming(&db)).await
    }

    /// Waits until the last cutover attempt has `phase` in its report.
    pub fn wait_phase(&self, phase: &str, timeout: Duration) -> Value {
        self.probe().wait_phase(phase, timeout)
    }

    pub async fn wait_phase_async(&self, phase: &str, timeout: Duration) -> Value {
        let phase = phase.to_string();
        self.off_runtime(move |p| p.wait_phase(&phase, timeout))
            .await
    }

    /// Waits until every listed database streams with lag 0, measured
    /// against a source position read now: lag is sampled once a second,
    /// and a sample from before the last write would say 0 too early.
    pub fn wait_caught_up(&self, source: &Cluster, dbs: &[&str], stall: Duration) -> Value {
        // The insert position: with synchronous_commit = off (the test
        // clusters') a commit not yet written is past pg_current_wal_lsn().
        let now: Lsn = source
            .psql("postgres", "SELECT pg_current_wal_insert_lsn()")
            .parse()
            .expect("an LSN");
        // A slow machine applies slowly: wait while apply moves on, fail
        // only when it stops moving for `stall`.
        let applied = |s: &Value| -> String {
            dbs.iter()
                .map(|db| s["databases"][db]["stream"]["applied_lsn"].to_string())
                .collect()
        };
        self.wait_status_progress("lag 0", stall, applied, |s| {
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

    /// Runs a pgshift subcommand that reaches this instance by `--admin URL`
    /// (no config file), as an operator on another machine would.
    pub fn cli_admin(&self, args: &[&str]) -> Output {
        Command::new(pgshift_bin())
            .args(args)
            .arg("--admin")
            .arg(self.admin_url())
            .output()
            .expect("run pgshift")
    }

    /// [`Pgshift::cli`] as a future (e.g. a `cutover --wait` beside other work).
    pub async fn cli_async(&self, args: &[&str]) -> Output {
        let mut cmd = tokio::process::Command::new(pgshift_bin());
        cmd.args(args).arg("--config").arg(&self.config);
        tokio::time::timeout(Duration::from_secs(600), cmd.output())
            .await
            .expect("pgshift CLI did not finish")
            .expect("run pgshift CLI")
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
        assert_eq!(code, 0, "pgshift verify failed:\n{out}\n{}", self.log());
        let set = comparable_floats(source, target);
        for db in dbs {
            assert_eq!(
                table_fingerprints_with(source, db, &set),
                table_fingerprints_with(target, db, &set),
                "database {db} differs"
            );
        }
    }
}

impl Drop for Pgshift {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The admin token a config text sets (`token = "…"`), if any.
fn admin_token(text: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.trim().strip_prefix("token = "))
        .map(|t| t.trim_matches('"').to_string())
}

/// Where a pgshift's status and logs are read; cheap to clone into a
/// blocking thread. Holds the one status-polling loop.
#[derive(Clone)]
pub struct Probe {
    admin_port: u16,
    token: Option<String>,
    dir: PathBuf,
    runs: u32,
}

impl Probe {
    fn log_path(&self, run: u32) -> PathBuf {
        self.dir.join(format!("pgshift-{run}.log"))
    }

    /// Every run's log, for failure messages.
    pub fn log(&self) -> String {
        (1..=self.runs)
            .map(|r| {
                format!(
                    "--- run {r} ---\n{}",
                    std::fs::read_to_string(self.log_path(r)).unwrap_or_default()
                )
            })
            .collect()
    }

    /// GET /status (with the token, which the full document needs), or
    /// None while the admin API does not answer.
    pub fn status(&self) -> Option<Value> {
        let (code, body) = http_with(self.admin_port, "GET", "/status", self.token.as_deref())?;
        (code == 200).then(|| serde_json::from_str(&body).ok())?
    }

    /// The one polling loop: /status until `f` holds (Ok), or until
    /// `progress` has not changed for `stall` (Err with the last status).
    pub fn poll(
        &self,
        stall: Duration,
        progress: impl Fn(&Value) -> String,
        f: impl Fn(&Value) -> bool,
    ) -> Result<Value, Value> {
        let mut moved = Instant::now();
        let mut seen = String::new();
        let mut last = Value::Null;
        while moved.elapsed() < stall {
            if let Some(s) = self.status() {
                if f(&s) {
                    return Ok(s);
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
        Err(last)
    }

    /// [`Probe::poll`] that panics with the last status and the logs.
    pub fn wait_status_progress(
        &self,
        what: &str,
        stall: Duration,
        progress: impl Fn(&Value) -> String,
        f: impl Fn(&Value) -> bool,
    ) -> Value {
        let start = Instant::now();
        match self.poll(stall, progress, f) {
            Ok(s) => {
                eprintln!(
                    "{what}: reached after {:.1}s",
                    start.elapsed().as_secs_f64()
                );
                s
            }
            Err(last) => panic!(
                "{what}: not reached, no progress for {stall:?} (after {:.1}s); last status:\n{}\n{}",
                start.elapsed().as_secs_f64(),
                serde_json::to_string_pretty(&last).unwrap_or_default(),
                self.log()
            ),
        }
    }

    /// Polls /status until `f` holds, at most `timeout`.
    pub fn wait_status(&self, what: &str, timeout: Duration, f: impl Fn(&Value) -> bool) -> Value {
        self.wait_status_progress(what, timeout, |_| String::new(), f)
    }

    /// See [`Pgshift::wait_state`].
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
            self.log()
        );
        s
    }

    /// See [`Pgshift::wait_substate`].
    pub fn wait_substate(&self, state: &str, substate: &str, timeout: Duration) -> Value {
        let what = format!("state {state}/{substate}");
        let s = self.wait_status(&what, timeout, |s| {
            (s["state"] == state && s["substate"] == substate) || s["state"] == "Failed"
        });
        if s["state"] == "Failed" && state != "Failed" {
            panic!("migration failed: {s:#}\n{}", self.log());
        }
        s
    }

    /// See [`Pgshift::wait_streaming`].
    pub fn wait_streaming(&self, db: &str) -> Value {
        self.wait_substate(
            "WaitingForUserAction",
            "WaitingForCutoverTrigger",
            Duration::from_secs(300),
        );
        let streaming = |s: &Value| s["databases"][db]["stream"]["state"] == "streaming";
        self.poll(Duration::from_secs(120), |_| String::new(), streaming)
            .unwrap_or_else(|last| last)
    }

    /// See [`Pgshift::wait_phase`].
    pub fn wait_phase(&self, phase: &str, timeout: Duration) -> Value {
        self.wait_status(&format!("phase {phase}"), timeout, |s| {
            s["last_cutover"]["phases"]
                .as_array()
                .is_some_and(|p| p.iter().any(|x| x["phase"] == phase))
        })
    }
}

/// Whether a migration state is final.
pub fn is_terminal(state: &str) -> bool {
    matches!(
        state,
        "Succeeded" | "Failed" | "ValidationFailed" | "Canceled"
    )
}

/// A `[migration]` section for `dbs` with extra keys.
pub fn migration(name: &str, dbs: &[&str], extra: &str) -> String {
    let list: Vec<String> = dbs.iter().map(|d| format!("\"{d}\"")).collect();
    format!(
        "[migration]\nname = \"{name}\"\ndatabases = [{}]\n{extra}\n",
        list.join(", ")
    )
}

/// One HTTP/1.1 request to the admin port: (status code, body).
pub fn http(port: u16, method: &str, path: &str) -> Option<(u16, String)> {
    http_with(port, method, path, None)
}

/// [`http`] with a bearer token.
pub fn http_with(
    port: u16,
    method: &str,
    path: &str,
    token: Option<&str>,
) -> Option<(u16, String)> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(60))).ok()?;
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let code = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string())?;
    Some((code, body))
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
