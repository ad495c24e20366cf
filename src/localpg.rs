//! Throwaway local PostgreSQL clusters: initdb into a temp dir, a free
//! loopback port, `wal_level = logical`, stopped and removed on drop. Used by
//! `pgshift demo` and by the integration tests' harness. PostgreSQL refuses
//! to run as root, so as root the server runs as the `postgres` system user.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU16, Ordering};

use thiserror::Error;

#[derive(Debug, Error)]
pub enum LocalPgError {
    #[error("{}", crate::pgbin::INSTALL_HINT)]
    NoBinaries,
    #[error(
        "running as root needs the `postgres` system user to run the server (create it, or run as another user)"
    )]
    NoServerUser,
    #[error("{what} failed: {detail}")]
    Command { what: String, detail: String },
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

/// A command that runs as the server's OS user.
fn as_server_user(program: &Path) -> Command {
    if crate::pgbin::is_root() {
        let mut c = Command::new("runuser");
        c.arg("-u").arg("postgres").arg("--").arg(program);
        c
    } else {
        Command::new(program)
    }
}

fn chown_to_server_user(path: &Path) -> Result<(), LocalPgError> {
    if crate::pgbin::is_root() {
        let st = Command::new("chown")
            .arg("-R")
            .arg("postgres:postgres")
            .arg(path)
            .status()?;
        if !st.success() {
            return Err(LocalPgError::NoServerUser);
        }
    }
    Ok(())
}

fn run(what: &str, mut c: Command) -> Result<Output, LocalPgError> {
    let out = c.output()?;
    if !out.status.success() {
        return Err(LocalPgError::Command {
            what: what.to_string(),
            detail: format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
            .trim()
            .to_string(),
        });
    }
    Ok(out)
}

/// A loopback port nobody listens on right now (start retries on a clash).
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

/// How to create a cluster.
#[derive(Clone, Debug)]
pub struct Options {
    /// Extra postgresql.conf lines.
    pub conf: Vec<String>,
    /// initdb --encoding with --locale=C; None: UTF8 with C.UTF-8.
    pub encoding: Option<String>,
    pub wal_level: String,
    /// The superuser `postgres`'s password.
    pub superuser_password: String,
    /// pg_hba.conf lines; None: trust on the socket, SCRAM on loopback.
    pub hba: Option<String>,
    /// The server programs' directory; None: the default installation
    /// ([`crate::pgbin::server_bin_dir`]).
    pub bin: Option<PathBuf>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            conf: vec![],
            encoding: None,
            wal_level: "logical".into(),
            superuser_password: "postgres".into(),
            hba: None,
            bin: None,
        }
    }
}

/// A running throwaway cluster; stopped and deleted on drop.
pub struct LocalCluster {
    pub port: u16,
    pub dir: tempfile::TempDir,
    pub data: PathBuf,
    pub bin: PathBuf,
    running: bool,
}

impl LocalCluster {
    /// initdb (or a copy of `template`, a data directory made by initdb with the
    /// same options) and start.
    pub fn create(opts: &Options, template: Option<&Path>) -> Result<LocalCluster, LocalPgError> {
        let bin = match &opts.bin {
            Some(b) => b.clone(),
            None => crate::pgbin::server_bin_dir().ok_or(LocalPgError::NoBinaries)?,
        };
        let dir = tempfile::Builder::new().prefix("pgshift-pg-").tempdir()?;
        chown_to_server_user(dir.path())?;
        let data = dir.path().join("data");
        match template {
            Some(t) => {
                let mut c = Command::new("cp");
                c.arg("-a").arg(t).arg(&data);
                run("copying the template cluster", c)?;
            }
            None => initdb(&bin, &data, dir.path(), opts)?,
        }
        let mut conf = format!(
            "\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\n\
             wal_level = {}\nmax_wal_senders = 20\nmax_replication_slots = 20\n\
             max_connections = 200\nfsync = off\nsynchronous_commit = off\nfull_page_writes = off\n\
             shared_buffers = 64MB\nmax_worker_processes = 16\nlog_min_messages = warning\n",
            dir.path().display(),
            opts.wal_level
        );
        for line in &opts.conf {
            conf.push_str(line);
            conf.push('\n');
        }
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(data.join("postgresql.conf"))?;
        std::io::Write::write_all(&mut f, conf.as_bytes())?;
        chown_to_server_user(dir.path())?;
        let mut c = LocalCluster {
            port: 0,
            dir,
            data,
            bin,
            running: false,
        };
        c.start()?;
        Ok(c)
    }

    /// Starts the server (on a new free port if the old one is taken).
    pub fn start(&mut self) -> Result<(), LocalPgError> {
        let mut last = String::new();
        for attempt in 0..5 {
            let port = if self.port == 0 || attempt > 0 {
                free_port()
            } else {
                self.port
            };
            let out = as_server_user(&self.bin.join("pg_ctl"))
                .arg("-D")
                .arg(&self.data)
                .arg("-l")
                .arg(self.log_path())
                .arg("-w")
                .arg("-t")
                .arg("60")
                .arg("-o")
                .arg(format!("-p {port}"))
                .arg("start")
                .output()?;
            if out.status.success() {
                self.port = port;
                self.running = true;
                return Ok(());
            }
            last = self.log();
            if !last.contains("could not bind") && !last.contains("already in use") {
                break;
            }
        }
        Err(LocalPgError::Command {
            what: "pg_ctl start".into(),
            detail: last,
        })
    }

    fn pg_ctl_stop(&mut self, mode: &str) {
        if self.running {
            let _ = as_server_user(&self.bin.join("pg_ctl"))
                .arg("-D")
                .arg(&self.data)
                .arg("-m")
                .arg(mode)
                .arg("-w")
                .arg("stop")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            self.running = false;
        }
    }

    /// Fast shutdown.
    pub fn stop(&mut self) {
        self.pg_ctl_stop("fast");
    }

    /// Immediate shutdown, as a crash would.
    pub fn kill(&mut self) {
        self.pg_ctl_stop("immediate");
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("server.log")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    pub fn socket_dir(&self) -> &Path {
        self.dir.path()
    }

    /// Runs psql as `postgres` over the socket; Err with psql's message on failure.
    pub fn psql(&self, db: &str, sql: &str) -> Result<String, LocalPgError> {
        let out = self.psql_output(db, sql)?;
        if !out.status.success() {
            return Err(LocalPgError::Command {
                what: format!("psql on {db}"),
                detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    pub fn psql_output(&self, db: &str, sql: &str) -> Result<Output, LocalPgError> {
        Ok(Command::new(self.program("psql"))
            .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h"])
            .arg(self.socket_dir())
            .arg("-p")
            .arg(self.port.to_string())
            .args(["-U", "postgres", "-d", db, "-c", sql])
            .output()?)
    }

    /// A PostgreSQL program from the same installation; else found as
    /// [`crate::pgbin::find`] does (server-only installations lack psql).
    pub(crate) fn program(&self, name: &str) -> PathBuf {
        let p = self.bin.join(name);
        if p.is_file() {
            p
        } else {
            crate::pgbin::find(name).unwrap_or_else(|| PathBuf::from(name))
        }
    }

    /// A loopback URL as `user`.
    pub fn url_as(&self, user: &str, password: &str, db: &str) -> String {
        format!(
            "postgres://{user}:{password}@127.0.0.1:{}/{db}?sslmode=disable",
            self.port
        )
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs initdb into `data` with the options' encoding, superuser password and hba.
pub fn initdb(bin: &Path, data: &Path, scratch: &Path, opts: &Options) -> Result<(), LocalPgError> {
    let pwfile = scratch.join("pw");
    std::fs::write(&pwfile, &opts.superuser_password)?;
    chown_to_server_user(&pwfile)?;
    let mut c = as_server_user(&bin.join("initdb"));
    c.arg("-D")
        .arg(data)
        .args(["-U", "postgres", "--pwfile"])
        .arg(&pwfile)
        .args([
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            "--no-sync",
        ]);
    // --no-instructions exists from 14.
    if crate::pgbin::dir_major(bin, "initdb").is_some_and(|m| m >= 14) {
        c.arg("--no-instructions");
    }
    match &opts.encoding {
        Some(enc) => c.arg("--encoding").arg(enc).arg("--locale=C"),
        None => c.arg("--encoding=UTF8").arg("--locale=C.UTF-8"),
    };
    run("initdb", c)?;
    let _ = std::fs::remove_file(&pwfile);
    let hba = opts.hba.clone().unwrap_or_else(|| {
        "local all all trust\nhost all all 127.0.0.1/32 scram-sha-256\nhost replication all 127.0.0.1/32 scram-sha-256\n".into()
    });
    std::fs::write(data.join("pg_hba.conf"), hba)?;
    chown_to_server_user(data)?;
    Ok(())
}
