//! The one shared test harness: throwaway PostgreSQL clusters on loopback.
//!
//! `Cluster::start()` runs initdb into a temp dir (`wal_level = logical`,
//! a free loopback port, SCRAM, md5 and trust users) and the server is
//! stopped and removed when the value is dropped. When the tests run as root
//! (CI does), the server runs as the unprivileged `postgres` system user,
//! because PostgreSQL refuses to run as root.
//!
//! Any installed major version can be started: `Cluster::start_version(17)`
//! (or `ClusterOptions { version: Some(17), .. }`) finds its server programs
//! through `PG_BIN_17`, the cache scripts/fetch-pg.sh fills, or
//! /usr/lib/postgresql/17/bin. A test for a version that is not installed
//! calls [`version_or_skip`] first: it skips with a note, unless
//! `PGSHIFT_REQUIRE_VERSIONS` asks for that version (CI sets it).
//!
//! Users on every cluster:
//! - `postgres` / `postgres` (superuser, SCRAM)
//! - `app` / `app_pw` (SCRAM, CREATEDB, REPLICATION)
//! - `md5user` / `md5_pw` (password stored as md5; pg_hba asks md5)
//! - `trustuser` (no password; pg_hba trust)
#![allow(dead_code)]

mod process;
#[allow(unused_imports)]
pub use process::*;

use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use pgshift::localpg::{LocalCluster, Options as LocalOptions};

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

/// The server programs of major version `major`, if installed (see the module doc).
pub fn pg_bin_for(major: i32) -> Option<PathBuf> {
    pgshift::pgbin::server_bin_dir_for(major)
}

/// A directory with the client programs (pg_dump, psql) of major version
/// `major`: `PG_BIN_<major>`, `/usr/lib/postgresql/<major>/bin` or the fetch
/// cache's `clients-<major>/bin` (`scripts/fetch-pg.sh --clients <major>`).
pub fn client_bin_for(major: i32) -> Option<PathBuf> {
    let cache = pgshift::pgbin::cache_dir();
    std::env::var_os(format!("PG_BIN_{major}"))
        .map(PathBuf::from)
        .into_iter()
        .chain([
            PathBuf::from(format!("/usr/lib/postgresql/{major}/bin")),
            cache.join(format!("clients-{major}")).join("bin"),
        ])
        .find(|d| {
            d.join("psql").is_file() && pgshift::pgbin::dir_major(d, "pg_dump") == Some(major)
        })
}

/// Is `major` required by `PGSHIFT_REQUIRE_VERSIONS` (`all`, or a list such
/// as `11,13,18` or `11-18`)?
pub fn version_required(major: i32) -> bool {
    let Ok(spec) = std::env::var("PGSHIFT_REQUIRE_VERSIONS") else {
        return false;
    };
    let spec = spec.trim();
    if spec.is_empty() || spec == "0" {
        return false;
    }
    if spec == "1" || spec.eq_ignore_ascii_case("all") {
        return true;
    }
    spec.split([',', ' '])
        .filter(|p| !p.is_empty())
        .any(|part| match part.split_once('-') {
            Some((a, b)) => match (a.trim().parse::<i32>(), b.trim().parse::<i32>()) {
                (Ok(a), Ok(b)) => (a..=b).contains(&major),
                _ => false,
            },
            None => part.trim().parse::<i32>() == Ok(major),
        })
}

/// True when PostgreSQL `major` can be started; otherwise prints why the
/// caller skips it and returns false — or panics when the version is
/// required ([`version_required`]).
pub fn version_or_skip(major: i32, test: &str) -> bool {
    if pg_bin_for(major).is_some() {
        return true;
    }
    let msg = format!(
        "PostgreSQL {major} server programs not found (PG_BIN_{major}, {}/{major}/bin, /usr/lib/postgresql/{major}/bin); \
         fetch them with `scripts/fetch-pg.sh {major}`",
        pgshift::pgbin::cache_dir().display()
    );
    if version_required(major) {
        panic!("{test}: {msg} (PGSHIFT_REQUIRE_VERSIONS requires it)");
    }
    eprintln!("{test}: SKIPPED for PostgreSQL {major}: {msg}");
    false
}

/// A source of major `source` and a target of major `target` (e.g. for an
/// end-to-end test of a version pair), or None after a skip note when one
/// of them is not installed (see [`version_or_skip`]).
pub fn start_pair(source: i32, target: i32, test: &str) -> Option<(Cluster, Cluster)> {
    if !(version_or_skip(source, test) & version_or_skip(target, test)) {
        return None;
    }
    Some((
        Cluster::start_version(source),
        Cluster::start_version(target),
    ))
}

/// A program from the PostgreSQL bin dir (pgbench, pg_dump, psql …), falling back to PATH.
pub fn pg_program(name: &str) -> PathBuf {
    let p = pg_bin().join(name);
    if p.is_file() {
        p
    } else {
        pgshift::pgbin::find(name).unwrap_or_else(|| PathBuf::from(name))
    }
}

/// A loopback port nobody listens on (best effort; start retries on a clash).
pub fn free_port() -> u16 {
    pgshift::localpg::free_port()
}

/// Options for a cluster; `Default` is what most tests want.
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    /// Extra lines for postgresql.conf.
    pub conf: Vec<String>,
    /// initdb --encoding (e.g. "LATIN1"); with --locale=C.
    pub encoding: Option<String>,
    pub wal_level: String,
    /// TLS toward clients (see [`ClusterTls`]).
    pub tls: ClusterTls,
    /// The major version to run; None: the default installation ([`pg_bin`]).
    pub version: Option<i32>,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            conf: vec![],
            encoding: None,
            wal_level: "logical".into(),
            tls: ClusterTls::Off,
            version: None,
        }
    }
}

impl ClusterOptions {
    /// The server programs these options run.
    fn bin(&self) -> PathBuf {
        match self.version {
            Some(v) => pg_bin_for(v).unwrap_or_else(|| {
                panic!(
                    "PostgreSQL {v} server programs not found (PG_BIN_{v}, {}, /usr/lib/postgresql/{v}/bin); \
                     fetch them with `scripts/fetch-pg.sh {v}`",
                    pgshift::pgbin::cache_dir().display()
                )
            }),
            None => pg_bin(),
        }
    }

    fn local(&self) -> LocalOptions {
        LocalOptions {
            bin: Some(self.bin()),
            conf: self.conf.clone(),
            encoding: self.encoding.clone(),
            wal_level: self.wal_level.clone(),
            superuser_password: SUPERUSER_PW.into(),
            // Clients by method: trust user, md5 user, everyone else SCRAM (also replication).
            hba: Some(
                "local all all trust\n\
                 host all trustuser 127.0.0.1/32 trust\n\
                 host all md5user 127.0.0.1/32 md5\n\
                 host all all 127.0.0.1/32 scram-sha-256\n\
                 host replication all 127.0.0.1/32 scram-sha-256\n"
                    .into(),
            ),
        }
    }
}

/// A throwaway cluster with the test users; derefs to [`LocalCluster`]
/// (`port`, `data`, `dir`, `stop`, `kill`, `log` …).
pub struct Cluster {
    inner: LocalCluster,
    pub socket_dir: PathBuf,
    /// With TLS on: the PEM file of the CA that signed the server certificate
    /// (for `sslrootcert`).
    pub tls_root_cert: Option<PathBuf>,
}

impl std::ops::Deref for Cluster {
    type Target = LocalCluster;
    fn deref(&self) -> &LocalCluster {
        &self.inner
    }
}

impl std::ops::DerefMut for Cluster {
    fn deref_mut(&mut self) -> &mut LocalCluster {
        &mut self.inner
    }
}

/// initdb is the slow part of a start: one template per server version and
/// option set is made once (shared by all test processes, published by an
/// atomic rename) and copied.
fn template_for(opts: &ClusterOptions) -> PathBuf {
    let enc = opts.encoding.clone().unwrap_or_else(|| "UTF8".into());
    let bin = opts.bin();
    let version = Command::new(bin.join("postgres"))
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
    // Two builds of one release (Debian's, a fetched one) may differ in
    // what a data directory holds: the bin dir is part of the key.
    let build = {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        bin.hash(&mut h);
        h.finish() as u32
    };
    let final_dir = root.join(format!("{version}-{build:08x}-{enc}-v2"));
    if final_dir.join("data/PG_VERSION").is_file() {
        return final_dir.join("data");
    }
    let dir = tempfile::Builder::new()
        .prefix("tpl-")
        .tempdir_in(&root)
        .expect("temp dir");
    let _ = Command::new("chown")
        .arg("postgres:postgres")
        .arg(dir.path())
        .status();
    pgshift::localpg::initdb(&bin, &dir.path().join("data"), dir.path(), &opts.local())
        .unwrap_or_else(|e| panic!("initdb: {e}"));
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

    /// Starts a default cluster of major version `major`; panics when its
    /// programs are not installed (see [`version_or_skip`]).
    pub fn start_version(major: i32) -> Cluster {
        Cluster::start_with(ClusterOptions {
            version: Some(major),
            ..ClusterOptions::default()
        })
    }

    /// The server's major version (from its programs).
    pub fn major(&self) -> i32 {
        pgshift::pgbin::dir_major(&self.bin, "postgres").unwrap_or(0)
    }

    pub fn start_with(opts: ClusterOptions) -> Cluster {
        let template = template_for(&opts);
        let inner =
            LocalCluster::create(&opts.local(), Some(&template)).unwrap_or_else(|e| panic!("{e}"));
        let mut c = Cluster {
            socket_dir: inner.socket_dir().to_path_buf(),
            inner,
            tls_root_cert: None,
        };
        if opts.tls != ClusterTls::Off {
            c.enable_tls(opts.tls == ClusterTls::Only);
        }
        c.create_users();
        c
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

    /// Restarts the server (e.g. after a config change).
    pub fn restart(&mut self) {
        self.inner.stop();
        self.inner.start().unwrap_or_else(|e| panic!("{e}"));
    }

    /// A URL for `user`/`password` on `db`.
    pub fn url_as(&self, user: &str, password: &str, db: &str) -> String {
        self.inner.url_as(user, password, db)
    }

    /// The superuser URL for `db`.
    pub fn url(&self, db: &str) -> String {
        self.url_as(SUPERUSER, SUPERUSER_PW, db)
    }

    /// Runs psql as the superuser over the Unix socket; panics on error.
    pub fn psql(&self, db: &str, sql: &str) -> String {
        self.inner
            .psql(db, sql)
            .unwrap_or_else(|e| panic!("{e}\nSQL: {sql}"))
    }

    /// Runs psql and returns its raw output (for tests that expect errors).
    pub fn psql_output(&self, db: &str, sql: &str) -> Output {
        self.inner.psql_output(db, sql).expect("run psql")
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

/// Waits until `watcher` (a direct session on the server) sees a session
/// running exactly `query` (e.g. before cancelling it: a cancel sent before
/// the query has started reaches nothing). Panics after 120 s.
pub async fn wait_running(watcher: &tokio_postgres::Client, query: &str) {
    let start = Instant::now();
    loop {
        let n: i64 = watcher
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query = $1",
                &[&query],
            )
            .await
            .unwrap()
            .get(0);
        if n > 0 {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "{query} never ran"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
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
    table_fingerprints_with(c, db, "")
}

/// The `SET` under which two clusters print equal floats as equal text
/// (11 cannot print them as 12+ does: see `comparable_float_digits`).
pub fn comparable_floats(a: &Cluster, b: &Cluster) -> String {
    let digits = pgshift::pg::settings::comparable_float_digits(
        pgshift::pg::Version::major_release(a.major()),
        pgshift::pg::Version::major_release(b.major()),
    );
    format!("SET extra_float_digits = {digits}; ")
}

/// [`table_fingerprints`] with `set` (SET statements) run first.
pub fn table_fingerprints_with(c: &Cluster, db: &str, set: &str) -> Vec<(String, i64, String)> {
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
            &format!("{set}SELECT count(*), coalesce(md5(string_agg(md5(x::text), '' ORDER BY md5(x::text))), '') FROM {t} x"),
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

/// A config text for a source/target pair, with proxy users app (SCRAM) and
/// md5user and the given extra TOML appended (e.g. a [migration] section).
pub fn config_text(
    source: &Cluster,
    target: &Cluster,
    proxy_port: u16,
    admin_port: u16,
    extra: &str,
) -> String {
    format!(
        r#"
[proxy]
listen = "127.0.0.1:{proxy_port}"
auth = "scram-sha-256"

[[proxy.users]]
name = "{APP_USER}"
password = "{APP_PW}"

[[proxy.users]]
name = "{MD5_USER}"
password = "{MD5_PW}"

[source]
url = "{}"

[target]
url = "{}"

[admin]
listen = "127.0.0.1:{admin_port}"

{extra}
"#,
        source.url("postgres"),
        target.url("postgres")
    )
}

/// A resolved config for a source/target pair (see [`config_text`]).
pub fn config_for(source: &Cluster, target: &Cluster, extra: &str) -> pgshift::Config {
    let text = config_text(source, target, free_port(), free_port(), extra);
    pgshift::Config::from_toml(&text, &|k| std::env::var(k).ok()).expect("test config is valid")
}

/// TLS on a harness cluster. The server certificate is issued by a fresh
/// test CA ([`Cluster::tls_root_cert`]) for the name `localhost` only, so
/// `sslmode=verify-full` succeeds with host `localhost` and fails with
/// `127.0.0.1` (a name mismatch), while `verify-ca` accepts both.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ClusterTls {
    #[default]
    Off,
    /// `ssl = on`; TCP clients may use TLS or not.
    On,
    /// `ssl = on` and only `hostssl` lines in pg_hba.conf: plaintext TCP is refused.
    Only,
}

/// A throwaway certificate authority for TLS tests.
pub struct TestCa {
    issuer: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
}

impl TestCa {
    /// A new self-signed CA with common name `name`.
    pub fn new(name: &str) -> TestCa {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let key = rcgen::KeyPair::generate().expect("CA key");
        TestCa {
            issuer: rcgen::CertifiedIssuer::self_signed(params, key).expect("CA certificate"),
        }
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> String {
        self.issuer.pem()
    }

    /// Writes the CA certificate to `path` and returns it.
    pub fn write_cert(&self, path: &std::path::Path) -> PathBuf {
        std::fs::write(path, self.cert_pem()).expect("write CA certificate");
        path.to_path_buf()
    }

    /// A server certificate for `names` (DNS names or IP addresses) and its
    /// private key, both PEM.
    pub fn issue_server(&self, names: &[&str]) -> (String, String) {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = rcgen::CertificateParams::new(names.clone()).expect("server params");
        params.distinguished_name.push(
            rcgen::DnType::CommonName,
            names.first().cloned().unwrap_or_default(),
        );
        let key = rcgen::KeyPair::generate().expect("server key");
        let cert = params
            .signed_by(&key, &self.issuer)
            .expect("server certificate");
        (cert.pem(), key.serialize_pem())
    }
}

impl Cluster {
    /// Turns TLS on: a certificate for `localhost` from a fresh [`TestCa`]
    /// in the data directory (owned by the server user, mode 0600), `ssl = on`,
    /// with `only` a pg_hba.conf of `hostssl` lines; then restarts.
    fn enable_tls(&mut self, only: bool) {
        use std::os::unix::fs::PermissionsExt;
        let ca = TestCa::new("pgshift test CA");
        let (cert, key) = ca.issue_server(&["localhost"]);
        let data = self.data.clone();
        for (name, pem) in [("server.crt", &cert), ("server.key", &key)] {
            let path = data.join(name);
            std::fs::write(&path, pem).expect("write server certificate");
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
                .expect("chmod server certificate");
            // As root the server runs as `postgres` and must own its key.
            let _ = Command::new("chown")
                .arg("postgres:postgres")
                .arg(&path)
                .status();
        }
        let mut conf = std::fs::OpenOptions::new()
            .append(true)
            .open(data.join("postgresql.conf"))
            .expect("open postgresql.conf");
        std::io::Write::write_all(
            &mut conf,
            b"\nssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n",
        )
        .expect("write postgresql.conf");
        if only {
            std::fs::write(
                data.join("pg_hba.conf"),
                "local all all trust\n\
                 hostssl all trustuser 127.0.0.1/32 trust\n\
                 hostssl all md5user 127.0.0.1/32 md5\n\
                 hostssl all all 127.0.0.1/32 scram-sha-256\n\
                 hostssl replication all 127.0.0.1/32 scram-sha-256\n",
            )
            .expect("write pg_hba.conf");
        }
        self.tls_root_cert = Some(ca.write_cert(&self.dir.path().join("root.crt")));
        self.restart();
    }
}

/// Makes sure Python's `import psycopg` works, installing `psycopg[binary]`
/// from PyPI if needed (python3 with pip is required for these tests).
pub fn ensure_psycopg() {
    let have = Command::new("python3")
        .args(["-c", "import psycopg"])
        .status()
        .is_ok_and(|s| s.success());
    if have {
        return;
    }
    let out = Command::new("python3")
        .args(["-m", "pip", "install", "--quiet", "psycopg[binary]"])
        .output()
        .expect("run python3 -m pip (python3 is required for this test)");
    assert!(
        out.status.success(),
        "installing psycopg failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `pg_dump --schema-only` of `db` without comments, blank lines, psql's
/// per-dump `\restrict` keys and pgshift's own objects (the target's write
/// guard until the cutover, the source's DDL capture and marker tables):
/// the schema, statement by statement, comparable between source and target
/// (also of two major versions).
pub fn schema_of(c: &Cluster, db: &str, pg_dump: &std::path::Path) -> String {
    let out = Command::new(pg_dump)
        .args(["--schema-only", "--no-publications", "--no-subscriptions"])
        .args(["--exclude-schema=pgshift", "--exclude-schema=pgshift_guard"])
        .args(["-d", &c.url(db)])
        .output()
        .expect("run pg_dump");
    assert!(
        out.status.success(),
        "pg_dump: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| {
            !l.is_empty()
                && !l.starts_with("--")
                && !l.starts_with("\\restrict")
                && !l.starts_with("\\unrestrict")
        })
        .collect::<Vec<_>>()
        .join("\n")
        .split(";\n")
        .map(|statement| statement.trim_end_matches(';'))
        // What differs only by the server's version: 12+ dumps name the
        // table access method; 11 prints triggers as EXECUTE PROCEDURE;
        // 18 names NOT NULL constraints (a renamed column keeps its name).
        .filter(|statement| !statement.starts_with("SET default_table_access_method"))
        .map(|statement| {
            unnamed_not_null(&statement.replace("EXECUTE PROCEDURE", "EXECUTE FUNCTION"))
        })
        .filter(|statement| {
            let own_trigger =
                statement.contains("EVENT TRIGGER") && statement.contains("pgshift_ddl_");
            !statement.contains("pgshift_guard") && !own_trigger
        })
        .collect::<Vec<_>>()
        .join(";\n")
}

/// `col type CONSTRAINT name NOT NULL` as `col type NOT NULL` (18 names NOT
/// NULL constraints; older servers have no such name to compare).
fn unnamed_not_null(statement: &str) -> String {
    let mut out = String::new();
    let mut rest = statement;
    while let Some(at) = rest.find(" CONSTRAINT ") {
        let after = &rest[at + " CONSTRAINT ".len()..];
        let name_end = after.find(' ').unwrap_or(after.len());
        if after[name_end..].starts_with(" NOT NULL") {
            out.push_str(&rest[..at]);
            rest = &after[name_end..];
        } else {
            out.push_str(&rest[..at + 1]);
            rest = &rest[at + 1..];
        }
    }
    out.push_str(rest);
    out
}

/// Restores the schema of `src`'s database `db` into a new database
/// `into` on `tgt`, as a plain `pg_dump --schema-only | psql` would (with
/// `pg_dump` and the psql beside it): the reference a migrated schema is
/// compared with across versions. pgshift's own objects on the source are
/// left out (the marker and capture tables' schema, and the capture's
/// event triggers, which are the database's and whose functions are in it).
pub fn restore_schema_reference(
    src: &Cluster,
    db: &str,
    tgt: &Cluster,
    into: &str,
    pg_dump: &std::path::Path,
) {
    tgt.psql("postgres", &format!("DROP DATABASE IF EXISTS \"{into}\""));
    tgt.create_db(into);
    let dump = Command::new(pg_dump)
        .args(["--schema-only", "--no-publications", "--no-subscriptions"])
        .args([
            "--exclude-schema=pgshift",
            "--no-tablespaces",
            "-d",
            &src.url(db),
        ])
        .output()
        .expect("run pg_dump");
    assert!(
        dump.status.success(),
        "pg_dump: {}",
        String::from_utf8_lossy(&dump.stderr)
    );
    let sql: String = String::from_utf8_lossy(&dump.stdout)
        .split(";\n")
        .filter(|statement| !statement.contains("pgshift_ddl_"))
        .collect::<Vec<_>>()
        .join(";\n");
    let mut psql = Command::new(pg_dump.with_file_name("psql"))
        .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-o", "/dev/null"])
        .args(["-d", &tgt.url(into)])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("run psql");
    std::io::Write::write_all(psql.stdin.as_mut().unwrap(), sql.as_bytes()).unwrap();
    drop(psql.stdin.take());
    assert!(
        psql.wait().unwrap().success(),
        "restoring the schema of {db} into {into}"
    );
}
