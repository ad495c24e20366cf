//! The TOML configuration: model, defaults, `${ENV}` expansion and validation.
//!
//! Loading is two steps: serde parses the text (so unknown keys and wrong types
//! are reported with their key and line), then [`Config::resolve`] expands
//! `${VAR}` references and checks every value, failing on the first bad key
//! with a message that names it. Secrets are wrapped in [`Secret`] so they never
//! reach a log line, an error or `Debug` output.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use thiserror::Error;

mod expand;
mod tls_params;
mod toml_error;
pub(crate) mod window;

pub use crate::wire::tls::SslMode;
pub(crate) use expand::{expand, expand_conn};

/// A configuration error, always naming the key it is about.
#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config key `{key}`: {message}")]
    Invalid { key: String, message: String },
}

impl ConfigError {
    pub(crate) fn invalid(key: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError::Invalid {
            key: key.into(),
            message: message.into(),
        }
    }
}

/// A string that must never be printed (passwords, tokens).
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"***\"")
    }
}

/// A duration written as `500ms`, `5s`, `2m`, `1h`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        parse_duration(&s)
            .map(HumanDuration)
            .map_err(serde::de::Error::custom)
    }
}

/// A duration or size in the config that does not parse, with examples.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
#[error("{0}")]
pub struct ValueError(String);

/// Parses `500ms`, `5s`, `2m`, `1h`, `1d`.
pub(crate) fn parse_duration(s: &str) -> Result<Duration, ValueError> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().map_err(|_| {
        ValueError(format!(
            "`{s}` is not a duration (examples: 500ms, 5s, 2m, 1h)"
        ))
    })?;
    let secs = match unit.trim() {
        "ms" => n / 1000.0,
        "s" | "" => n,
        "m" | "min" => n * 60.0,
        "h" => n * 3600.0,
        "d" => n * 86400.0,
        other => {
            return Err(ValueError(format!(
                "`{s}`: unknown duration unit `{other}` (use ms, s, m, h, d)"
            )));
        }
    };
    if !secs.is_finite() || secs < 0.0 {
        return Err(ValueError(format!("`{s}` is not a valid duration")));
    }
    Duration::try_from_secs_f64(secs)
        .map_err(|_| ValueError(format!("`{s}` is too long a duration")))
}

/// A byte size written as `16MB`, `1GB`, `512kB` or a plain number of bytes.
/// Units are binary (1 kB = 1024 bytes), as in PostgreSQL's own settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => Ok(ByteSize(n)),
            Raw::S(s) => parse_bytes(&s)
                .map(ByteSize)
                .map_err(serde::de::Error::custom),
        }
    }
}

/// Parses `16MB`, `1GB`, `512kB`, `1TB`, `100` (bytes).
pub fn parse_bytes(s: &str) -> Result<u64, ValueError> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| ValueError(format!("`{s}` is not a size (examples: 16MB, 1GB)")))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" | "k" | "kib" => 1 << 10,
        "mb" | "m" | "mib" => 1 << 20,
        "gb" | "g" | "gib" => 1 << 30,
        "tb" | "t" | "tib" => 1 << 40,
        other => {
            return Err(ValueError(format!(
                "`{s}`: unknown size unit `{other}` (use B, kB, MB, GB, TB)"
            )));
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| ValueError(format!("`{s}` is too large")))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum AuthMethod {
    /// kebab-case alone would spell it `scram-sha256`.
    #[default]
    #[serde(rename = "scram-sha-256")]
    ScramSha256,
    Md5,
    Trust,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyUser {
    pub name: String,
    pub password: Secret,
}

fn default_listen() -> String {
    "127.0.0.1:6432".into()
}
fn default_max_clients() -> usize {
    1000
}
fn default_max_message() -> ByteSize {
    ByteSize(1 << 30)
}
fn default_max_startup() -> usize {
    256
}
fn default_max_startup_per_address() -> usize {
    64
}
fn default_startup_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(10))
}
fn default_shutdown_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(30))
}
fn default_connect_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(10))
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyConfig {
    #[serde(default = "default_listen")]
    pub listen: String,
    #[serde(default)]
    pub auth: AuthMethod,
    #[serde(default = "default_max_clients")]
    pub max_client_connections: usize,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// Largest message a client or server may send (PostgreSQL's own limit is 1 GiB).
    #[serde(default = "default_max_message")]
    pub max_message_size: ByteSize,
    /// Connections still in startup or authentication (they hold no place
    /// under max_client_connections); more are refused with 53300.
    #[serde(default = "default_max_startup")]
    pub max_startup_connections: usize,
    /// The same, from one client IP address.
    #[serde(default = "default_max_startup_per_address")]
    pub max_startup_connections_per_address: usize,
    /// A client that has not finished startup and authentication by then is dropped.
    #[serde(default = "default_startup_timeout")]
    pub startup_timeout: HumanDuration,
    /// On SIGTERM, how long open transactions may run before sessions are closed.
    #[serde(default = "default_shutdown_timeout")]
    pub shutdown_timeout: HumanDuration,
    /// Timeout for opening a backend connection to a server.
    #[serde(default = "default_connect_timeout")]
    pub server_connect_timeout: HumanDuration,
    /// Threads relaying client sessions (0: one per CPU core).
    #[serde(default)]
    pub relay_threads: usize,
    /// A directory for a Unix-domain socket `.s.PGSQL.<port>` (port: the
    /// one of `listen`), beside the TCP listener.
    pub unix_socket_dir: Option<PathBuf>,
    #[serde(default)]
    pub users: Vec<ProxyUser>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSection {
    /// May carry a password, so it is a secret as a whole.
    pub url: Secret,
}

fn default_admin_listen() -> String {
    "127.0.0.1:9432".into()
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    #[serde(default = "default_admin_listen")]
    pub listen: String,
    /// Bearer token for the POST endpoints and the full /status. Without
    /// one, those are open only when `listen` is a loopback address.
    pub token: Option<Secret>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: default_admin_listen(),
            token: None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Default, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum MigrationMode {
    #[default]
    Online,
    Offline,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Default, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum MigrationOption {
    Validate,
    Migrate,
    #[default]
    ValidateAndMigrate,
}

fn default_copy_jobs() -> usize {
    4
}
fn default_split() -> ByteSize {
    ByteSize(1 << 30)
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrationConfig {
    pub name: String,
    pub databases: Vec<String>,
    #[serde(default)]
    pub mode: MigrationMode,
    #[serde(default)]
    pub option: MigrationOption,
    /// Drop and recreate a target database of the same name; false refuses a non-empty one.
    #[serde(default)]
    pub overwrite: bool,
    #[serde(default = "default_copy_jobs")]
    pub copy_jobs: usize,
    #[serde(default = "default_split")]
    pub split_tables_larger_than: ByteSize,
    /// Concurrent post-data restores during the copy (each table's indexes
    /// and index-backed constraints, built as soon as its data is in);
    /// unset: `copy_jobs`. See [`MigrationConfig::index_jobs`].
    #[serde(default)]
    pub index_jobs: Option<usize>,
    /// Only these tables ("schema.table", globs with `*`). Empty: all.
    #[serde(default)]
    pub tables: Vec<String>,
    #[serde(default)]
    pub exclude_tables: Vec<String>,
    /// Also copy roles (`pg_dumpall --roles-only`).
    #[serde(default)]
    pub copy_roles: bool,
    /// The directory of the pg_dump / pg_dumpall / psql to use; unset: the
    /// best fit found (see [`crate::pgbin::client_tool_dirs`]).
    #[serde(default)]
    pub pg_bin: Option<std::path::PathBuf>,
    /// Schema changes on the source during the migration (see [`DdlSetting`]).
    #[serde(default)]
    pub ddl: DdlSetting,
    /// The most of an open transaction pgshift's walsenders hold before
    /// streaming it (14+): a large transaction's rows are visible on the
    /// target at most about this much of it after its commit. Lowers the
    /// servers' own `logical_decoding_work_mem` for pgshift's connections
    /// only, never raises it.
    #[serde(default = "default_decoding_work_mem")]
    pub logical_decoding_work_mem: ByteSize,
}

fn default_decoding_work_mem() -> ByteSize {
    ByteSize(8 << 20)
}

/// `[migration] ddl`: what a schema change on the source does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Default, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DdlSetting {
    /// `replicate` when the source lets pgshift's user create event
    /// triggers, else `stop` (validation says which and why).
    #[default]
    Auto,
    /// Captured on the source by event triggers and applied on the target
    /// in stream order; validation fails if the source does not allow it.
    Replicate,
    /// A schema change stops apply with the source's definition and a
    /// ready command (`pgshift ddl apply`).
    Stop,
}

impl MigrationConfig {
    /// How many tables' indexes may be built at once while the copy goes
    /// on. Defaults to `copy_jobs`: an index build is CPU and I/O work of
    /// the same order as a table copy, so as many builders as copiers keeps
    /// the target busy without oversubscribing it.
    pub fn index_jobs(&self) -> usize {
        self.index_jobs.unwrap_or(self.copy_jobs)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum CutoverTrigger {
    #[default]
    Manual,
    Auto,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum OnDrainTimeout {
    #[default]
    Abort,
    Cancel,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum CutoverVerify {
    #[default]
    Off,
    Counts,
    Checksums,
}

/// One or several maintenance windows.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum Windows {
    One(String),
    Many(Vec<String>),
}

impl Windows {
    pub fn list(&self) -> Vec<String> {
        match self {
            Windows::One(s) => vec![s.clone()],
            Windows::Many(v) => v.clone(),
        }
    }
}

fn default_lag_below() -> ByteSize {
    ByteSize(16 << 20)
}
fn default_drain() -> HumanDuration {
    HumanDuration(Duration::from_secs(5))
}
fn default_catchup() -> HumanDuration {
    HumanDuration(Duration::from_secs(10))
}
fn default_pregate_catchup() -> HumanDuration {
    HumanDuration(Duration::from_secs(300))
}
fn default_attempts() -> u32 {
    3
}
fn default_true() -> bool {
    true
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CutoverConfig {
    #[serde(default)]
    pub trigger: CutoverTrigger,
    pub window: Option<Windows>,
    #[serde(default = "default_lag_below")]
    pub start_when_lag_below: ByteSize,
    #[serde(default = "default_drain")]
    pub drain_timeout: HumanDuration,
    #[serde(default)]
    pub on_drain_timeout: OnDrainTimeout,
    #[serde(default = "default_catchup")]
    pub catchup_timeout: HumanDuration,
    /// Before the gate closes, apply catches up for as long as it keeps
    /// progressing, up to this; an attempt that cannot catch up by then is
    /// abandoned without pausing clients.
    #[serde(default = "default_pregate_catchup")]
    pub pregate_catchup_timeout: HumanDuration,
    #[serde(default = "default_attempts")]
    pub max_attempts: u32,
    /// Inside the pause (small databases only: the pause lasts as long).
    #[serde(default)]
    pub verify: CutoverVerify,
    /// After the gate opens: every table compared as of snapshots taken at
    /// the switch on both sides, clients running.
    #[serde(default = "default_verify_after")]
    pub verify_after: CutoverVerify,
    /// A mismatch found by `verify_after` starts a rollback by itself
    /// (while the rollback window is open).
    #[serde(default)]
    pub rollback_on_mismatch: bool,
    /// Roles set to NOLOGIN on the source while it is fenced, besides every
    /// role that can reach a migrated database (superusers included when listed).
    #[serde(default)]
    pub fence_roles: Vec<String>,
    /// Drop the slot and publication on the source after the switch (with
    /// `rollback`, when the rollback window ends).
    #[serde(default = "default_true")]
    pub drop_slot_after_cutover: bool,
    /// Keep a way back: reverse replication (target → source) from the
    /// switch, and `pgshift rollback` until `pgshift complete` ends the window.
    #[serde(default = "default_true")]
    pub rollback: bool,
    /// The rollback window ends by itself this long after the switch
    /// (unset: only `pgshift complete` or `rollback_max_retained_wal` end it).
    pub rollback_window: Option<HumanDuration>,
    /// The rollback window ends by itself when the reverse slot holds back
    /// more WAL than this on the target, so a forgotten window cannot fill
    /// its disk.
    #[serde(default = "default_rollback_wal")]
    pub rollback_max_retained_wal: ByteSize,
}

fn default_verify_after() -> CutoverVerify {
    CutoverVerify::Checksums
}

fn default_rollback_wal() -> ByteSize {
    ByteSize(10 << 30)
}

impl Default for CutoverConfig {
    fn default() -> Self {
        CutoverConfig {
            trigger: CutoverTrigger::Manual,
            window: None,
            start_when_lag_below: default_lag_below(),
            drain_timeout: default_drain(),
            on_drain_timeout: OnDrainTimeout::Abort,
            catchup_timeout: default_catchup(),
            pregate_catchup_timeout: default_pregate_catchup(),
            max_attempts: default_attempts(),
            verify: CutoverVerify::Off,
            verify_after: default_verify_after(),
            rollback_on_mismatch: false,
            fence_roles: vec![],
            drop_slot_after_cutover: true,
            rollback: true,
            rollback_window: None,
            rollback_max_retained_wal: default_rollback_wal(),
        }
    }
}

/// What this process does in its fleet (every pgshift with the same
/// migration name and target control database).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum FleetRole {
    /// Runs its proxy, and leads (validation, copy, streaming, cutover)
    /// when no other member does.
    #[default]
    Auto,
    /// Runs its proxy, never leads.
    Proxy,
    /// Leads when no other member does; runs no proxy.
    Replication,
}

impl FleetRole {
    pub fn as_str(self) -> &'static str {
        match self {
            FleetRole::Auto => "auto",
            FleetRole::Proxy => "proxy",
            FleetRole::Replication => "replication",
        }
    }
    pub fn may_lead(self) -> bool {
        self != FleetRole::Proxy
    }
    pub fn serves_proxy(self) -> bool {
        self != FleetRole::Replication
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetConfig {
    #[serde(default)]
    pub role: FleetRole,
    /// This member's name in the fleet. Unset: the host name (the pod's
    /// name in Kubernetes) and the proxy port.
    pub member_id: Option<String>,
    /// How often a member writes its heartbeat.
    #[serde(default = "default_heartbeat")]
    pub heartbeat_interval: HumanDuration,
    /// A member whose heartbeat is older than this is gone: a cutover
    /// leaves it out (its sessions are not spared by the fence).
    #[serde(default = "default_member_timeout")]
    pub member_timeout: HumanDuration,
    /// A member holding its gate for a cutover whose decision it cannot
    /// read for this long ends its held sessions with an error.
    #[serde(default = "default_decision_timeout")]
    pub decision_timeout: HumanDuration,
}

impl Default for FleetConfig {
    fn default() -> Self {
        FleetConfig {
            role: FleetRole::Auto,
            member_id: None,
            heartbeat_interval: default_heartbeat(),
            member_timeout: default_member_timeout(),
            decision_timeout: default_decision_timeout(),
        }
    }
}

fn default_heartbeat() -> HumanDuration {
    HumanDuration(Duration::from_millis(500))
}
fn default_member_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(5))
}
fn default_decision_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(30))
}

/// The file as written.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub proxy: ProxyConfig,
    pub source: ServerSection,
    pub target: ServerSection,
    #[serde(default)]
    pub admin: AdminConfig,
    pub migration: Option<MigrationConfig>,
    #[serde(default)]
    pub cutover: CutoverConfig,
    #[serde(default)]
    pub fleet: FleetConfig,
}

impl crate::wire::connect::ConnectOptions {
    /// How pgshift's own wire-level connections (replication, apply) reach `ep`.
    pub fn for_endpoint(ep: &Endpoint) -> crate::wire::connect::ConnectOptions {
        crate::wire::connect::ConnectOptions {
            host: ep.host.clone(),
            port: ep.port,
            sslmode: ep.sslmode,
            connect_timeout: Duration::from_secs(10),
            max_message_size: 1 << 30,
            sslrootcert: ep.sslrootcert.clone(),
            tls: None,
        }
    }
}

/// A server to connect to: where and as whom. Built from `[source].url` / `[target].url`.
#[derive(Clone, Debug)]
pub struct Endpoint {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: Option<Secret>,
    pub dbname: String,
    pub sslmode: SslMode,
    /// `sslrootcert`: PEM file of the CA certificate(s) the server's certificate
    /// must chain to; when set, the chain is verified whenever TLS is used.
    pub sslrootcert: Option<PathBuf>,
}

impl Endpoint {
    /// Parses a `postgres://` URL or a `key=value` connection string.
    pub fn parse(key: &str, url: &str) -> Result<Endpoint, ConfigError> {
        // tokio-postgres knows neither verify-* nor sslrootcert: they are taken out first.
        let (url, tls) = tls_params::take(url);
        let (sslmode, sslrootcert) = tls.resolve(key)?;
        let cfg: tokio_postgres::Config = url.parse().map_err(|e: tokio_postgres::Error| {
            // Never echo the URL itself: it may hold a password.
            ConfigError::invalid(key, format!("not a valid PostgreSQL connection URL ({e})"))
        })?;
        let host = match cfg.get_hosts().first() {
            Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
            #[cfg(unix)]
            Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
            None => "127.0.0.1".to_string(),
        };
        if host.contains('@') {
            // Never echo it: the part before the `@` is likely a password's tail.
            return Err(ConfigError::invalid(
                key,
                "the URL's host contains `@`: a password holding `@` must be written percent-encoded (%40), \
                 or passed through ${VAR}, which pgshift encodes",
            ));
        }
        let port = cfg.get_ports().first().copied().unwrap_or(5432);
        let user = cfg
            .get_user()
            .ok_or_else(|| ConfigError::invalid(key, "the URL names no user"))?
            .to_string();
        let password = cfg
            .get_password()
            .map(|p| Secret::new(String::from_utf8_lossy(p).into_owned()));
        let dbname = cfg.get_dbname().unwrap_or("postgres").to_string();
        Ok(Endpoint {
            host,
            port,
            user,
            password,
            dbname,
            sslmode,
            sslrootcert,
        })
    }

    /// The same server and credentials, another database.
    pub fn with_dbname(&self, dbname: &str) -> Endpoint {
        Endpoint {
            dbname: dbname.to_string(),
            ..self.clone()
        }
    }

    /// A tokio-postgres config for ordinary SQL connections.
    pub(crate) fn pg_config(&self) -> tokio_postgres::Config {
        let mut c = tokio_postgres::Config::new();
        c.host(&self.host)
            .port(self.port)
            .user(&self.user)
            .dbname(&self.dbname)
            .application_name("pgshift")
            .connect_timeout(Duration::from_secs(10))
            // pgshift's own connections must keep working on a fenced source
            // (default_transaction_read_only = on for every other session);
            // floats copied as text read back exactly (11 rounds them to 15
            // digits by default).
            .options("-c default_transaction_read_only=off -c extra_float_digits=3");
        if let Some(p) = &self.password {
            c.password(p.expose());
        }
        // Certificate checks are the TLS connector's (db::tls); tokio-postgres
        // only needs to know whether plaintext is acceptable. libpq never uses
        // TLS on a Unix socket.
        c.ssl_mode(match self.sslmode {
            _ if self.host.starts_with('/') => tokio_postgres::config::SslMode::Disable,
            SslMode::Disable => tokio_postgres::config::SslMode::Disable,
            SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            _ => tokio_postgres::config::SslMode::Require,
        });
        c
    }

    /// host:port for messages (never includes credentials).
    pub fn display(&self) -> String {
        format!("{}:{}/{}", self.host, self.port, self.dbname)
    }
}

/// The resolved configuration: every `${VAR}` expanded, every value checked.
#[derive(Clone, Debug)]
pub struct Config {
    pub file: FileConfig,
    pub proxy_listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub source: Endpoint,
    pub target: Endpoint,
    pub path: Option<PathBuf>,
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut c = Config::from_toml(&text, &|k| std::env::var(k).ok()).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.to_path_buf(),
                message,
            },
            other => other,
        })?;
        c.path = Some(path.to_path_buf());
        Ok(c)
    }

    /// Parses and resolves config text; `env` looks up `${VAR}` references.
    pub fn from_toml(
        text: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let file: FileConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: PathBuf::from("<config>"),
            message: toml_error::message(text, &e),
        })?;
        Config::resolve(file, env)
    }

    fn resolve(
        mut file: FileConfig,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        // Expand ${VAR} in every string that may carry a secret or a location.
        file.proxy.listen = expand("proxy.listen", &file.proxy.listen, env)?;
        for (i, u) in file.proxy.users.iter_mut().enumerate() {
            u.name = expand(&format!("proxy.users[{i}].name"), &u.name, env)?;
            u.password = Secret(expand(
                &format!("proxy.users[{i}].password"),
                u.password.expose(),
                env,
            )?);
        }
        if let Some(p) = &file.proxy.tls_cert {
            file.proxy.tls_cert = Some(PathBuf::from(expand(
                "proxy.tls_cert",
                &p.to_string_lossy(),
                env,
            )?));
        }
        if let Some(p) = &file.proxy.tls_key {
            file.proxy.tls_key = Some(PathBuf::from(expand(
                "proxy.tls_key",
                &p.to_string_lossy(),
                env,
            )?));
        }
        if let Some(p) = &file.proxy.unix_socket_dir {
            file.proxy.unix_socket_dir = Some(PathBuf::from(expand(
                "proxy.unix_socket_dir",
                &p.to_string_lossy(),
                env,
            )?));
        }
        file.source.url = Secret(expand_conn("source.url", file.source.url.expose(), env)?);
        file.target.url = Secret(expand_conn("target.url", file.target.url.expose(), env)?);
        file.admin.listen = expand("admin.listen", &file.admin.listen, env)?;
        if let Some(t) = &file.admin.token {
            let t = Secret(expand("admin.token", t.expose(), env)?);
            validate_token(&t)?;
            file.admin.token = Some(t);
        }

        let proxy_listen = parse_addr("proxy.listen", &file.proxy.listen)?;
        let admin_listen = parse_addr("admin.listen", &file.admin.listen)?;
        if proxy_listen == admin_listen {
            return Err(ConfigError::invalid(
                "admin.listen",
                "must differ from proxy.listen",
            ));
        }
        let source = Endpoint::parse("source.url", file.source.url.expose())?;
        let target = Endpoint::parse("target.url", file.target.url.expose())?;

        validate_proxy(&file.proxy)?;
        validate_unix_socket_dir(&file.proxy, proxy_listen.port())?;
        if let Some(m) = &file.migration {
            validate_migration(m)?;
            // The control schema lives in the target URL's database; overwriting a
            // migrated database must never destroy pgshift's own state.
            if m.databases.contains(&target.dbname) {
                return Err(ConfigError::invalid(
                    "target.url",
                    format!(
                        "its database `{}` holds pgshift's control schema and must not be one of migration.databases; \
                         point target.url at another database (e.g. postgres)",
                        target.dbname
                    ),
                ));
            }
        }
        validate_cutover(&file.cutover)?;
        if let Some(id) = &file.fleet.member_id {
            file.fleet.member_id = Some(expand("fleet.member_id", id, env)?);
        }
        validate_fleet(&file.fleet)?;

        Ok(Config {
            file,
            proxy_listen,
            admin_listen,
            source,
            target,
            path: None,
        })
    }

    pub fn proxy(&self) -> &ProxyConfig {
        &self.file.proxy
    }

    pub fn migration(&self) -> Option<&MigrationConfig> {
        self.file.migration.as_ref()
    }

    pub fn cutover(&self) -> &CutoverConfig {
        &self.file.cutover
    }

    pub fn fleet(&self) -> &FleetConfig {
        &self.file.fleet
    }

    /// The password the proxy uses for `user` (None: not a configured user).
    pub fn user_password(&self, user: &str) -> Option<&Secret> {
        self.file
            .proxy
            .users
            .iter()
            .find(|u| u.name == user)
            .map(|u| &u.password)
    }
}

/// Shortest `[admin].token` accepted.
const MIN_TOKEN_LEN: usize = 16;

/// An empty or short token would make the admin API as good as open.
fn validate_token(t: &Secret) -> Result<(), ConfigError> {
    let len = t.expose().len();
    if len == 0 {
        return Err(ConfigError::invalid(
            "admin.token",
            "is empty (is the environment variable it names set but empty?); \
             set a random token of at least 16 bytes (e.g. `openssl rand -hex 32`) or remove the key",
        ));
    }
    if len < MIN_TOKEN_LEN {
        return Err(ConfigError::invalid(
            "admin.token",
            format!(
                "is {len} bytes long, shorter than {MIN_TOKEN_LEN}; use a random token (e.g. `openssl rand -hex 32`)"
            ),
        ));
    }
    Ok(())
}

fn parse_addr(key: &str, s: &str) -> Result<SocketAddr, ConfigError> {
    use std::net::ToSocketAddrs;
    s.to_socket_addrs()
        .map_err(|e| ConfigError::invalid(key, format!("`{s}` is not a host:port address ({e})")))?
        .next()
        .ok_or_else(|| ConfigError::invalid(key, format!("`{s}` resolves to no address")))
}

/// The Unix-domain socket file for `port` in `dir`, named as PostgreSQL and
/// PgBouncer name theirs.
pub fn unix_socket_path(dir: &Path, port: u16) -> PathBuf {
    dir.join(format!(".s.PGSQL.{port}"))
}

/// `sun_path` is 108 bytes on Linux, the terminating NUL included.
const MAX_UNIX_SOCKET_PATH: usize = 107;

/// The socket's path must fit in `sun_path`; an empty value is a mistake
/// (an unset variable), not "no socket" — that is leaving the key out.
fn validate_unix_socket_dir(p: &ProxyConfig, port: u16) -> Result<(), ConfigError> {
    let Some(dir) = &p.unix_socket_dir else {
        return Ok(());
    };
    if dir.as_os_str().is_empty() {
        return Err(ConfigError::invalid(
            "proxy.unix_socket_dir",
            "is empty; name a directory or remove the key",
        ));
    }
    let path = unix_socket_path(dir, port);
    let len = path.as_os_str().len();
    if len > MAX_UNIX_SOCKET_PATH {
        return Err(ConfigError::invalid(
            "proxy.unix_socket_dir",
            format!(
                "the socket path {} is {len} bytes long; the limit is {} (choose a shorter directory)",
                path.display(),
                MAX_UNIX_SOCKET_PATH
            ),
        ));
    }
    Ok(())
}

fn validate_proxy(p: &ProxyConfig) -> Result<(), ConfigError> {
    if p.max_client_connections == 0 {
        return Err(ConfigError::invalid(
            "proxy.max_client_connections",
            "must be at least 1",
        ));
    }
    if p.max_startup_connections == 0 {
        return Err(ConfigError::invalid(
            "proxy.max_startup_connections",
            "must be at least 1",
        ));
    }
    if p.max_startup_connections_per_address == 0
        || p.max_startup_connections_per_address > p.max_startup_connections
    {
        return Err(ConfigError::invalid(
            "proxy.max_startup_connections_per_address",
            "must be between 1 and proxy.max_startup_connections",
        ));
    }
    if p.max_message_size.0 < 1024 {
        return Err(ConfigError::invalid(
            "proxy.max_message_size",
            "must be at least 1kB",
        ));
    }
    match (&p.tls_cert, &p.tls_key) {
        (Some(_), None) => {
            return Err(ConfigError::invalid(
                "proxy.tls_key",
                "tls_cert is set but tls_key is not",
            ));
        }
        (None, Some(_)) => {
            return Err(ConfigError::invalid(
                "proxy.tls_cert",
                "tls_key is set but tls_cert is not",
            ));
        }
        (Some(c), Some(k)) => {
            for (key, path) in [("proxy.tls_cert", c), ("proxy.tls_key", k)] {
                if !path.is_file() {
                    return Err(ConfigError::invalid(
                        key,
                        format!("file {} does not exist", path.display()),
                    ));
                }
            }
        }
        _ => {}
    }
    let mut seen = std::collections::HashSet::new();
    for (i, u) in p.users.iter().enumerate() {
        if u.name.is_empty() {
            return Err(ConfigError::invalid(
                format!("proxy.users[{i}].name"),
                "must not be empty",
            ));
        }
        if !seen.insert(u.name.as_str()) {
            return Err(ConfigError::invalid(
                format!("proxy.users[{i}].name"),
                format!("user `{}` is listed twice", u.name),
            ));
        }
        if u.password.expose().is_empty() && p.auth != AuthMethod::Trust {
            return Err(ConfigError::invalid(
                format!("proxy.users[{i}].password"),
                "must not be empty",
            ));
        }
    }
    Ok(())
}

/// Migration names become parts of slot, publication and origin names.
fn valid_migration_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 40
        && !name.starts_with('-')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
}

fn validate_migration(m: &MigrationConfig) -> Result<(), ConfigError> {
    if !valid_migration_name(&m.name) {
        return Err(ConfigError::invalid(
            "migration.name",
            format!(
                "`{}` must be 1-40 letters, digits or hyphens, not starting with a hyphen",
                m.name
            ),
        ));
    }
    if m.databases.is_empty() {
        return Err(ConfigError::invalid(
            "migration.databases",
            "list at least one database",
        ));
    }
    let mut seen = std::collections::HashSet::new();
    for (i, d) in m.databases.iter().enumerate() {
        if d.is_empty() || d.len() > 63 {
            return Err(ConfigError::invalid(
                format!("migration.databases[{i}]"),
                "must be 1-63 characters",
            ));
        }
        if !seen.insert(d.as_str()) {
            return Err(ConfigError::invalid(
                format!("migration.databases[{i}]"),
                format!("database `{d}` is listed twice"),
            ));
        }
        if matches!(d.as_str(), "template0" | "template1") {
            return Err(ConfigError::invalid(
                format!("migration.databases[{i}]"),
                "template databases cannot be migrated",
            ));
        }
    }
    if m.copy_jobs == 0 || m.copy_jobs > 64 {
        return Err(ConfigError::invalid(
            "migration.copy_jobs",
            "must be between 1 and 64",
        ));
    }
    if m.index_jobs.is_some_and(|j| j == 0 || j > 64) {
        return Err(ConfigError::invalid(
            "migration.index_jobs",
            "must be between 1 and 64",
        ));
    }
    if !(64 << 10..=1 << 40).contains(&m.logical_decoding_work_mem.0) {
        return Err(ConfigError::invalid(
            "migration.logical_decoding_work_mem",
            "must be between 64kB (PostgreSQL's minimum) and 1TB",
        ));
    }
    if m.split_tables_larger_than.0 == 0 {
        return Err(ConfigError::invalid(
            "migration.split_tables_larger_than",
            "must be larger than 0",
        ));
    }
    Ok(())
}

fn validate_fleet(f: &FleetConfig) -> Result<(), ConfigError> {
    if let Some(id) = &f.member_id
        && (id.is_empty() || id.len() > 63 || id.chars().any(char::is_control))
    {
        return Err(ConfigError::invalid(
            "fleet.member_id",
            "must be 1-63 printable characters",
        ));
    }
    if f.heartbeat_interval.0.is_zero() {
        return Err(ConfigError::invalid(
            "fleet.heartbeat_interval",
            "must be larger than 0",
        ));
    }
    if f.member_timeout.0 < f.heartbeat_interval.0 * 3 {
        return Err(ConfigError::invalid(
            "fleet.member_timeout",
            "must be at least three heartbeat_intervals",
        ));
    }
    if f.decision_timeout.0.is_zero() {
        return Err(ConfigError::invalid(
            "fleet.decision_timeout",
            "must be larger than 0",
        ));
    }
    Ok(())
}

fn validate_cutover(c: &CutoverConfig) -> Result<(), ConfigError> {
    if c.trigger == CutoverTrigger::Auto && c.window.is_none() {
        return Err(ConfigError::invalid(
            "cutover.window",
            "trigger = \"auto\" needs at least one window",
        ));
    }
    if let Some(w) = &c.window {
        window::parse_all(&w.list())
            .map_err(|e| ConfigError::invalid("cutover.window", e.to_string()))?;
    }
    if c.max_attempts == 0 {
        return Err(ConfigError::invalid(
            "cutover.max_attempts",
            "must be at least 1",
        ));
    }
    if c.drain_timeout.0.is_zero() {
        return Err(ConfigError::invalid(
            "cutover.drain_timeout",
            "must be larger than 0",
        ));
    }
    if c.catchup_timeout.0.is_zero() {
        return Err(ConfigError::invalid(
            "cutover.catchup_timeout",
            "must be larger than 0",
        ));
    }
    if c.pregate_catchup_timeout.0.is_zero() {
        return Err(ConfigError::invalid(
            "cutover.pregate_catchup_timeout",
            "must be larger than 0",
        ));
    }
    if c.rollback_window.is_some_and(|w| w.0.is_zero()) {
        return Err(ConfigError::invalid(
            "cutover.rollback_window",
            "must be larger than 0 (leave it out to keep the window until `pgshift complete`)",
        ));
    }
    if c.rollback_max_retained_wal.0 == 0 {
        return Err(ConfigError::invalid(
            "cutover.rollback_max_retained_wal",
            "must be larger than 0",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[proxy]
listen = "127.0.0.1:6432"
auth = "md5"
[[proxy.users]]
name = "app"
password = "${APP_PASSWORD}"
[source]
url = "postgres://postgres:${SRC}@127.0.0.1:5432/postgres"
[target]
url = "postgres://postgres:pw@127.0.0.1:5433/postgres"
"#;

    fn env(k: &str) -> Option<String> {
        match k {
            "APP_PASSWORD" => Some("s3cret".into()),
            "SRC" => Some("srcpw".into()),
            _ => None,
        }
    }

    #[test]
    fn fleet_settings_are_checked_naming_the_key() {
        let with = |fleet: &str| Config::from_toml(&format!("{MINIMAL}[fleet]\n{fleet}\n"), &env);
        let c = with("role = \"proxy\"\nmember_id = \"${APP_PASSWORD}-x\"").unwrap();
        assert_eq!(c.fleet().role, FleetRole::Proxy);
        assert!(!c.fleet().role.may_lead());
        assert_eq!(c.fleet().member_id.as_deref(), Some("s3cret-x"));
        assert_eq!(
            Config::from_toml(MINIMAL, &env).unwrap().fleet().role,
            FleetRole::Auto
        );
        for (fleet, key) in [
            ("member_id = \"\"", "fleet.member_id"),
            ("heartbeat_interval = \"0s\"", "fleet.heartbeat_interval"),
            (
                "heartbeat_interval = \"2s\"\nmember_timeout = \"5s\"",
                "fleet.member_timeout",
            ),
            ("decision_timeout = \"0s\"", "fleet.decision_timeout"),
        ] {
            let e = with(fleet).unwrap_err().to_string();
            assert!(e.contains(key), "{fleet}: {e}");
        }
        let e = with("role = \"boss\"").unwrap_err().to_string();
        assert!(e.contains("role"), "{e}");
    }

    #[test]
    fn rollback_settings_are_checked_naming_the_key() {
        let with =
            |cutover: &str| Config::from_toml(&format!("{MINIMAL}[cutover]\n{cutover}\n"), &env);
        let c = Config::from_toml(MINIMAL, &env).unwrap();
        let cut = c.cutover();
        assert!(cut.rollback);
        assert_eq!(cut.rollback_window.map(|w| w.0), None);
        assert_eq!(cut.rollback_max_retained_wal.0, 10 << 30);
        assert_eq!(cut.verify_after, CutoverVerify::Checksums);
        assert!(!cut.rollback_on_mismatch);
        let c = with("rollback = false\nrollback_window = \"7d\"\nverify_after = \"off\"").unwrap();
        assert!(!c.cutover().rollback);
        assert_eq!(
            c.cutover().rollback_window.map(|w| w.0),
            Some(Duration::from_secs(7 * 86400))
        );
        assert_eq!(c.cutover().verify_after, CutoverVerify::Off);
        for (cutover, key) in [
            ("rollback_window = \"0s\"", "cutover.rollback_window"),
            ("rollback_window = \"soon\"", "rollback_window"),
            (
                "rollback_max_retained_wal = \"0\"",
                "cutover.rollback_max_retained_wal",
            ),
            (
                "rollback_max_retained_wal = \"lots\"",
                "rollback_max_retained_wal",
            ),
            ("verify_after = \"all\"", "verify_after"),
            ("rollback = \"yes\"", "rollback"),
        ] {
            let e = with(cutover).unwrap_err().to_string();
            assert!(e.contains(key), "{cutover}: {e}");
        }
    }

    #[test]
    fn loads_minimal_with_env() {
        let c = Config::from_toml(MINIMAL, &env).unwrap();
        assert_eq!(c.proxy().auth, AuthMethod::Md5);
        assert_eq!(c.user_password("app").unwrap().expose(), "s3cret");
        assert_eq!(c.source.password.as_ref().unwrap().expose(), "srcpw");
        assert_eq!(c.source.port, 5432);
        assert_eq!(c.admin_listen.port(), 9432);
        assert_eq!(c.proxy().max_message_size.0, 1 << 30);
        // Debug output never carries a secret.
        let dbg = format!("{c:?}");
        assert!(!dbg.contains("s3cret") && !dbg.contains("srcpw"), "{dbg}");
    }

    #[test]
    fn missing_variable_names_key() {
        let e = Config::from_toml(MINIMAL, &|_| None)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("proxy.users[0].password") && e.contains("APP_PASSWORD"),
            "{e}"
        );
    }

    #[test]
    fn unknown_key_is_refused() {
        let t = MINIMAL.replace("auth = \"md5\"", "auth = \"md5\"\nlisten_port = 5");
        let e = Config::from_toml(&t, &env).unwrap_err().to_string();
        assert!(e.contains("listen_port"), "{e}");
    }

    #[test]
    fn bad_url_names_key_without_password() {
        let t = MINIMAL.replace(
            "postgres://postgres:pw@127.0.0.1:5433/postgres",
            "postgres://postgres:pw@127.0.0.1:notaport/x",
        );
        let e = Config::from_toml(&t, &env).unwrap_err().to_string();
        assert!(e.contains("target.url"), "{e}");
        assert!(!e.contains("pw@"), "{e}");
    }

    #[test]
    fn scram_method_name() {
        let t = MINIMAL.replace("auth = \"md5\"", "auth = \"scram-sha-256\"");
        assert_eq!(
            Config::from_toml(&t, &env).unwrap().proxy().auth,
            AuthMethod::ScramSha256
        );
    }

    #[test]
    fn bad_auth_method() {
        let t = MINIMAL.replace("auth = \"md5\"", "auth = \"password\"");
        let e = Config::from_toml(&t, &env).unwrap_err().to_string();
        assert!(e.contains("auth") || e.contains("password"), "{e}");
    }

    #[test]
    fn migration_name_rules() {
        assert!(valid_migration_name("orders-to-flex"));
        assert!(!valid_migration_name("-x"));
        assert!(!valid_migration_name("a_b"));
        assert!(!valid_migration_name(""));
    }

    #[test]
    fn sizes_and_durations() {
        assert_eq!(parse_bytes("16MB").unwrap(), 16 << 20);
        assert_eq!(parse_bytes("1GB").unwrap(), 1 << 30);
        assert_eq!(parse_bytes("100").unwrap(), 100);
        assert!(parse_bytes("1XB").is_err());
        assert_eq!(parse_duration("5s").unwrap(), Duration::from_secs(5));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert!(parse_duration("abc").is_err());
        // Beyond what a Duration holds: an error, not a panic (found by fuzzing).
        assert!(parse_duration("99999999999999999999d").is_err());
    }

    #[test]
    fn control_database_is_not_migrated() {
        let t = format!("{MINIMAL}\n[migration]\nname = \"m\"\ndatabases = [\"postgres\"]\n");
        let e = Config::from_toml(&t, &env).unwrap_err().to_string();
        assert!(e.contains("target.url"), "{e}");
    }

    #[test]
    fn auto_trigger_needs_window() {
        let t = format!("{MINIMAL}\n[cutover]\ntrigger = \"auto\"\n");
        let e = Config::from_toml(&t, &env).unwrap_err().to_string();
        assert!(e.contains("cutover.window"), "{e}");
    }

    #[test]
    fn empty_or_short_admin_token_is_refused() {
        for value in ["", "short-token-15b"] {
            let env = |k: &str| match k {
                "TOKEN" => Some(value.to_string()),
                other => env(other),
            };
            let t = format!("{MINIMAL}\n[admin]\ntoken = \"${{TOKEN}}\"\n");
            let e = Config::from_toml(&t, &env).unwrap_err().to_string();
            assert!(e.contains("admin.token"), "{e}");
            if !value.is_empty() {
                assert!(!e.contains(value), "{e}");
            }
        }
        let t = format!("{MINIMAL}\n[admin]\ntoken = \"0123456789abcdef\"\n");
        let c = Config::from_toml(&t, &env).unwrap();
        assert_eq!(c.file.admin.token.unwrap().expose().len(), MIN_TOKEN_LEN);
    }

    #[test]
    fn url_password_from_env_means_itself() {
        for pw in ["p@ss", "a/b?c#d", "x:y%z", "sp ace"] {
            let env = |k: &str| match k {
                "SRC" => Some(pw.to_string()),
                other => env(other),
            };
            let c = Config::from_toml(MINIMAL, &env).unwrap();
            assert_eq!(c.source.password.as_ref().unwrap().expose(), pw);
            assert_eq!(c.source.host, "127.0.0.1");
            assert_eq!(c.source.port, 5432);
            assert_eq!(c.source.dbname, "postgres");
        }
    }

    #[test]
    fn literal_host_with_at_is_refused_without_echo() {
        let t = MINIMAL.replace(
            "postgres://postgres:pw@127.0.0.1:5433/postgres",
            "postgres://postgres:se@cr3t@127.0.0.1:5433/postgres",
        );
        let e = Config::from_toml(&t, &env).unwrap_err().to_string();
        assert!(e.contains("target.url") && e.contains('@'), "{e}");
        assert!(!e.contains("cr3t"), "{e}");
    }

    #[test]
    fn toml_errors_name_position_and_key_not_the_line() {
        let t = MINIMAL.replace(
            "url = \"postgres://postgres:pw@127.0.0.1:5433/postgres\"",
            "url = \"postgres://postgres:Hunter2Secret@127.0.0.1:5433/postgres\" x",
        );
        let e = Config::from_toml(&t, &env).unwrap_err().to_string();
        assert!(!e.contains("Hunter2Secret"), "{e}");
        assert!(e.contains("line 11") && e.contains("target.url"), "{e}");
        // A wrong type quotes the value in serde's message: elided.
        let t = MINIMAL.replace(
            "auth = \"md5\"",
            "auth = \"md5\"\nmax_client_connections = \"Hunter2Secret\"",
        );
        let e = Config::from_toml(&t, &env).unwrap_err().to_string();
        assert!(!e.contains("Hunter2Secret"), "{e}");
        assert!(e.contains("proxy.max_client_connections"), "{e}");
        let t = MINIMAL.replace("\"${APP_PASSWORD}\"", "73915824");
        let e = Config::from_toml(&t, &env).unwrap_err().to_string();
        assert!(!e.contains("73915824") && e.contains("password"), "{e}");
    }

    #[test]
    fn startup_limits_are_checked() {
        let c = Config::from_toml(MINIMAL, &env).unwrap();
        assert_eq!(c.proxy().max_startup_connections, 256);
        assert_eq!(c.proxy().max_startup_connections_per_address, 64);
        let t = MINIMAL.replace(
            "auth = \"md5\"",
            "auth = \"md5\"\nmax_startup_connections = 10\nmax_startup_connections_per_address = 11",
        );
        let e = Config::from_toml(&t, &env).unwrap_err().to_string();
        assert!(
            e.contains("proxy.max_startup_connections_per_address"),
            "{e}"
        );
    }
}
