//! The one shared test harness: throwaway PostgreSQL clusters on loopback.
//!
//! `Cluster::start()` runs initdb into a temp dir (`wal_level = logical`,
//! a free loopback port, SCRAM, md5 and trust users) and the server is
//! stopped and removed when the value is dropped. When the tests run as root
//! (CI does), the server runs as the unprivileged `postgres` system user,
//! because PostgreSQL refuses to run as root.
//!
//! Users on every cluster:
//! - `postgres` / `postgres` (superuser, SCRAM)
//! - `app` / `app_pw` (SCRAM, CREATEDB, REPLICATION)
//! - `md5user` / `md5_pw` (password stored as md5; pg_hba asks md5)
//! - `trustuser` (no password; pg_hba trust)
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

pub const SUPERUSER: &str = "postgres";
pub const SUPERUSER_PW: &str = "postgres";
pub const APP_USER: &str = "app";
pub const APP_PW: &str = "app_pw";
pub const MD5_USER: &str = "md5user";
pub const MD5_PW: &str = "md5_pw";
pub const TRUST_USER: &str = "trustuser";

/// The directory with PostgreSQL's server programs; panics with a clear message if none.
pub fn pg_bin() -> PathBuf {
    static BIN: OnceLock<Option<PathBuf>> = OnceLock::new();
    BIN.get_or_init(pgshift::pgbin::server_bin_dir)
        .clone()
        .unwrap_or_else(|| panic!("{}", pgshift::pgbin::INSTALL_HINT))
}

/// A program from the PostgreSQL bin dir (pgbench, pg_dump, psql …), falling back to PATH.
pub fn pg_program(name: &str) -> PathBuf {
    let p = pg_bin().join(name);
    if p.is_file() { p } else { PathBuf::from(name) }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe extern "C" {
        fn geteuid() -> u32;
    }
    unsafe { geteuid() == 0 }
}

/// Builds a command that runs as the server's OS user.
fn as_server_user(program: &Path) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.arg("-u").arg("postgres").arg("--").arg(program);
        c
    } else {
        Command::new(program)
    }
}

fn chown_to_server_user(path: &Path) {
    if is_root() {
        let st = Command::new("chown")
            .arg("-R")
            .arg("postgres:postgres")
            .arg(path)
            .status()
            .expect("run chown");
        assert!(st.success(), "chown {} failed", path.display());
    }
}

/// A loopback port nobody listens on (best effort; start retries on a clash).
pub fn free_port() -> u16 {
    static NEXT: AtomicU16 = AtomicU16::new(0);
    if NEXT.load(Ordering::Relaxed) == 0 {
        let seed = 20000 + (std::process::id() % 2000) as u16 * 10;
        let _ = NEXT.compare_exchange(0, seed, Ordering::Relaxed, Ordering::Relaxed);
    }
    loop {
        let p = NEXT.fetch_add(1, Ordering::Relaxed);
        if p > 60000 {
            NEXT.store(20000, Ordering::Relaxed);
            continue;
        }
        if std::net::TcpListener::bind(("127.0.0.1", p)).is_ok() {
            return p;
        }
    }
}

/// Options for a cluster; `Default` is what most tests want.
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    /// Extra lines for postgresql.conf.
    pub conf: Vec<String>,
    /// initdb --encoding (e.g. "LATIN1"); with --locale=C.
    pub encoding: Option<String>,
    pub wal_level: String,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            conf: vec![],
            encoding: None,
            wal_level: "logical".into(),
        }
    }
}

pub struct Cluster {
    pub port: u16,
    pub dir: tempfile::TempDir,
    pub data: PathBuf,
    pub socket_dir: PathBuf,
    running: bool,
}

/// initdb is the slow part of a start: one template per option set is made
/// once (shared by all test processes, published by an atomic rename) and copied.
fn template_for(opts: &ClusterOptions) -> PathBuf {
    let enc = opts.encoding.clone().unwrap_or_else(|| "UTF8".into());
    let version = Command::new(pg_bin().join("postgres"))
        .arg("--version")
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .last()
                .unwrap_or("x")
                .trim_end_matches(')')
                .to_string()
        })
        .unwrap_or_else(|_| "x".into());
    let root = std::env::temp_dir().join("pgshift-test-templates");
    let _ = std::fs::create_dir_all(&root);
    let final_dir = root.join(format!("{version}-{enc}-v1"));
    if final_dir.join("data/PG_VERSION").is_file() {
        return final_dir.join("data");
    }
    let dir = tempfile::Builder::new()
        .prefix("tpl-")
        .tempdir_in(&root)
        .expect("temp dir");
    chown_to_server_user(dir.path());
    let data = dir.path().join("data");
    let pwfile = dir.path().join("pw");
    std::fs::write(&pwfile, SUPERUSER_PW).unwrap();
    chown_to_server_user(&pwfile);
    let mut c = as_server_user(&pg_bin().join("initdb"));
    c.arg("-D")
        .arg(&data)
        .arg("-U")
        .arg(SUPERUSER)
        .arg("--pwfile")
        .arg(&pwfile)
        .arg("--auth-local=trust")
        .arg("--auth-host=scram-sha-256")
        .arg("--no-sync")
        .arg("--no-instructions");
    match &opts.encoding {
        Some(enc) => {
            c.arg("--encoding").arg(enc).arg("--locale=C");
        }
        None => {
            c.arg("--encoding=UTF8").arg("--locale=C.UTF-8");
        }
    }
    let out = c.output().expect("run initdb");
    assert!(
        out.status.success(),
        "initdb failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Clients by method: trust user, md5 user, everyone else SCRAM (also for replication).
    let hba = "local all all trust\n\
               host all trustuser 127.0.0.1/32 trust\n\
               host all md5user 127.0.0.1/32 md5\n\
               host all all 127.0.0.1/32 scram-sha-256\n\
               host replication all 127.0.0.1/32 scram-sha-256\n";
    std::fs::write(data.join("pg_hba.conf"), hba).unwrap();
    chown_to_server_user(&data);
    let tmp = dir.keep();
    if std::fs::rename(&tmp, &final_dir).is_err() {
        // Another process published it first.
        let _ = std::fs::remove_dir_all(&tmp);
    }
    final_dir.join("data")
}

impl Cluster {
    /// Starts a default cluster (UTF8, wal_level = logical).
    pub fn start() -> Cluster {
        Cluster::start_with(ClusterOptions::default())
    }

    pub fn start_with(opts: ClusterOptions) -> Cluster {
        let template = template_for(&opts);
        let dir = tempfile::Builder::new()
            .prefix("pgshift-pg-")
            .tempdir()
            .expect("temp dir");
        let data = dir.path().join("data");
        let st = Command::new("cp")
            .arg("-a")
            .arg(&template)
            .arg(&data)
            .status()
            .expect("cp");
        assert!(st.success(), "copying the template cluster failed");
        let socket_dir = dir.path().to_path_buf();
        chown_to_server_user(dir.path());
        let mut conf = format!(
            "\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\n\
             wal_level = {}\nmax_wal_senders = 20\nmax_replication_slots = 20\n\
             max_connections = 200\nfsync = off\nsynchronous_commit = off\nfull_page_writes = off\n\
             shared_buffers = 64MB\nmax_worker_processes = 16\nlog_min_messages = warning\n",
            socket_dir.display(),
            opts.wal_level
        );
        for line in &opts.conf {
            conf.push_str(line);
            conf.push('\n');
        }
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(data.join("postgresql.conf"))
            .unwrap();
        std::io::Write::write_all(&mut f, conf.as_bytes()).unwrap();
        let mut c = Cluster {
            port: 0,
            dir,
            data,
            socket_dir,
            running: false,
        };
        c.start_server();
        c.create_users();
        c
    }

    fn start_server(&mut self) {
        for attempt in 0..5 {
            let port = if self.port == 0 || attempt > 0 {
                free_port()
            } else {
                self.port
            };
            let out = as_server_user(&pg_bin().join("pg_ctl"))
                .arg("-D")
                .arg(&self.data)
                .arg("-l")
                .arg(self.dir.path().join("server.log"))
                .arg("-w")
                .arg("-t")
                .arg("60")
                .arg("-o")
                .arg(format!("-p {port}"))
                .arg("start")
                .output()
                .expect("run pg_ctl");
            if out.status.success() {
                self.port = port;
                self.running = true;
                return;
            }
            let log =
                std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default();
            if !log.contains("could not bind") && !log.contains("already in use") {
                panic!(
                    "pg_ctl start failed: {}\n{log}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
        panic!("could not find a free port for PostgreSQL");
    }

    fn create_users(&self) {
        self.psql(
            "postgres",
            &format!(
                "SET password_encryption = 'scram-sha-256';
                 CREATE ROLE {APP_USER} LOGIN CREATEDB REPLICATION PASSWORD '{APP_PW}';
                 SET password_encryption = 'md5';
                 CREATE ROLE {MD5_USER} LOGIN PASSWORD '{MD5_PW}';
                 CREATE ROLE {TRUST_USER} LOGIN;
                 GRANT ALL ON SCHEMA public TO PUBLIC;"
            ),
        );
        self.psql("template1", "GRANT ALL ON SCHEMA public TO PUBLIC;");
    }

    /// Restarts the server on the same port (e.g. after a config change).
    pub fn restart(&mut self) {
        self.stop();
        self.start_server();
    }

    /// Stops the server (fast shutdown).
    pub fn stop(&mut self) {
        if self.running {
            let _ = as_server_user(&pg_bin().join("pg_ctl"))
                .arg("-D")
                .arg(&self.data)
                .arg("-m")
                .arg("fast")
                .arg("-w")
                .arg("stop")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            self.running = false;
        }
    }

    /// Stops the server abruptly, as a crash would.
    pub fn kill(&mut self) {
        if self.running {
            let _ = as_server_user(&pg_bin().join("pg_ctl"))
                .arg("-D")
                .arg(&self.data)
                .arg("-m")
                .arg("immediate")
                .arg("-w")
                .arg("stop")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            self.running = false;
        }
    }

    /// The server log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    /// A URL for `user`/`password` on `db`.
    pub fn url_as(&self, user: &str, password: &str, db: &str) -> String {
        format!(
            "postgres://{user}:{password}@127.0.0.1:{}/{db}?sslmode=disable",
            self.port
        )
    }

    /// The superuser URL for `db`.
    pub fn url(&self, db: &str) -> String {
        self.url_as(SUPERUSER, SUPERUSER_PW, db)
    }

    /// Runs psql as the superuser over the Unix socket; panics on error.
    pub fn psql(&self, db: &str, sql: &str) -> String {
        let out = self.psql_output(db, sql);
        assert!(
            out.status.success(),
            "psql failed on {db}: {}\nSQL: {sql}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// Runs psql and returns its raw output (for tests that expect errors).
    pub fn psql_output(&self, db: &str, sql: &str) -> Output {
        Command::new(pg_program("psql"))
            .arg("-X")
            .arg("-q")
            .arg("-A")
            .arg("-t")
            .arg("-v")
            .arg("ON_ERROR_STOP=1")
            .arg("-h")
            .arg(&self.socket_dir)
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-U")
            .arg(SUPERUSER)
            .arg("-d")
            .arg(db)
            .arg("-c")
            .arg(sql)
            .output()
            .expect("run psql")
    }

    /// Creates a database owned by the superuser.
    pub fn create_db(&self, db: &str) {
        self.psql("postgres", &format!("CREATE DATABASE \"{db}\""));
    }

    /// A tokio-postgres client as the superuser.
    pub async fn client(&self, db: &str) -> tokio_postgres::Client {
        connect(&self.url(db)).await
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Connects with tokio-postgres (no TLS) and drives the connection in the background.
pub async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect {url}: {e}"));
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

/// Polls `f` until it returns true or `timeout` passes.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// Row count and an order-independent checksum of every table in `db`'s user
/// schemas, for comparing source and target row by row.
pub fn table_fingerprints(c: &Cluster, db: &str) -> Vec<(String, i64, String)> {
    let tables = c.psql(
        db,
        "SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE c.relkind IN ('r','p') AND n.nspname NOT IN ('pg_catalog','information_schema','pgshift') \
         AND n.nspname NOT LIKE 'pg_toast%' AND NOT c.relispartition ORDER BY 1",
    );
    let mut out = Vec::new();
    for t in tables.lines().filter(|l| !l.is_empty()) {
        let r = c.psql(
            db,
            &format!("SELECT count(*), coalesce(md5(string_agg(md5(x::text), '' ORDER BY md5(x::text))), '') FROM {t} x"),
        );
        let (n, sum) = r.split_once('|').unwrap_or((&r, ""));
        out.push((t.to_string(), n.parse().unwrap_or(-1), sum.to_string()));
    }
    out
}

/// The path of the built pgshift binary (for tests that run it as a process).
pub fn pgshift_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_pgshift"))
}
