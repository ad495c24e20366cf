//! Helpers for the proxy tests: an in-process proxy in front of harness clusters.
#![allow(dead_code)]

use std::sync::Arc;

use pgshift::Config;
use pgshift::context::Context;
use pgshift::proxy::{Proxy, ProxyHandle};

use crate::common::*;

/// Password the proxy holds for `trustuser` (the server does not ask for one).
pub const TRUST_PW: &str = "trust_pw";

/// A running in-process proxy.
pub struct TestProxy {
    pub handle: ProxyHandle,
    pub ctx: Arc<Context>,
    pub port: u16,
    pub task: tokio::task::JoinHandle<()>,
}

impl TestProxy {
    pub fn url_as(&self, user: &str, pw: &str, db: &str) -> String {
        format!(
            "postgres://{user}:{pw}@127.0.0.1:{}/{db}?sslmode=disable",
            self.port
        )
    }
    /// The proxy URL for user `app`.
    pub fn url(&self, db: &str) -> String {
        self.url_as(APP_USER, APP_PW, db)
    }
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

/// Config text for a proxy in front of `source_port`, with all harness users.
pub fn proxy_config_text(
    proxy_port: u16,
    admin_port: u16,
    source_port: u16,
    target_port: u16,
    auth: &str,
    extra_proxy: &str,
) -> String {
    format!(
        r#"
[proxy]
listen = "127.0.0.1:{proxy_port}"
auth = "{auth}"
{extra_proxy}

[[proxy.users]]
name = "{SUPERUSER}"
password = "{SUPERUSER_PW}"
[[proxy.users]]
name = "{APP_USER}"
password = "{APP_PW}"
[[proxy.users]]
name = "{MD5_USER}"
password = "{MD5_PW}"
[[proxy.users]]
name = "{TRUST_USER}"
password = "{TRUST_PW}"

[source]
url = "postgres://postgres:postgres@127.0.0.1:{source_port}/postgres?sslmode=disable"
[target]
url = "postgres://postgres:postgres@127.0.0.1:{target_port}/postgres?sslmode=disable"
[admin]
listen = "127.0.0.1:{admin_port}"
"#
    )
}

/// Starts a proxy in this process in front of `source`.
pub async fn start_proxy_with(source: &Cluster, auth: &str, extra_proxy: &str) -> TestProxy {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let text = proxy_config_text(
        port,
        free_port(),
        source.port,
        source.port,
        auth,
        extra_proxy,
    );
    let config = Config::from_toml(&text, &|_| None).expect("test config parses");
    let ctx = Context::new(config);
    let (handle, task) = Proxy::start(ctx.clone(), listener).expect("proxy starts");
    TestProxy {
        handle,
        ctx,
        port,
        task,
    }
}

pub async fn start_proxy(source: &Cluster) -> TestProxy {
    start_proxy_with(source, "scram-sha-256", "").await
}

/// A proxy that also listens on a Unix-domain socket in `dir`.
pub struct UnixProxy {
    pub proxy: TestProxy,
    pub dir: tempfile::TempDir,
    pub task: tokio::task::JoinHandle<()>,
}

impl UnixProxy {
    /// The socket's directory, as `psql -h` and libpq's `host` take it.
    pub fn host(&self) -> String {
        self.dir.path().to_string_lossy().into_owned()
    }
    /// The socket file.
    pub fn socket(&self) -> std::path::PathBuf {
        self.dir
            .path()
            .join(format!(".s.PGSQL.{}", self.proxy.port))
    }
    /// A key-value connection string over the socket.
    pub fn conninfo(&self, user: &str, pw: &str, db: &str) -> String {
        format!(
            "host={} port={} user={user} password={pw} dbname={db}",
            self.host(),
            self.proxy.port
        )
    }
}

/// [`start_proxy_with`], plus the Unix socket, served as `pgshift run` serves it.
pub async fn start_proxy_unix(source: &Cluster, auth: &str) -> UnixProxy {
    let proxy = start_proxy_with(source, auth, "").await;
    let dir = tempfile::tempdir().unwrap();
    let socket = pgshift::proxy::UnixSocket::bind(dir.path(), proxy.port).expect("bind socket");
    let task = proxy.handle.serve_unix(socket);
    UnixProxy { proxy, dir, task }
}

/// Runs psql through the proxy with a script on stdin; returns (success, stdout, stderr).
pub fn psql_via(port: u16, user: &str, pw: &str, db: &str, script: &str) -> (bool, String, String) {
    psql_at("127.0.0.1", port, user, pw, db, script)
}

/// [`psql_via`] with `-h host` (an address, or a socket directory).
pub fn psql_at(
    host: &str,
    port: u16,
    user: &str,
    pw: &str,
    db: &str,
    script: &str,
) -> (bool, String, String) {
    use std::io::Write;
    let mut child = std::process::Command::new(pg_program("psql"))
        .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h", host])
        .arg("-p")
        .arg(port.to_string())
        .arg("-U")
        .arg(user)
        .arg("-d")
        .arg(db)
        .env("PGPASSWORD", pw)
        .env("PGSSLMODE", "disable")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run psql");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Sum of a metric's samples in the Prometheus text of `text` whose labels contain `label`.
pub fn metric_in(text: &str, name: &str, label: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter(|l| l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A metric of the in-process proxy (see [`metric_in`]).
pub fn metric(ctx: &Context, name: &str, label: &str) -> f64 {
    let text = pgshift::telemetry::metrics::render(&ctx.registry).unwrap();
    metric_in(&text, name, label)
}

/// Reads one backend message (tag, body) from a raw socket; None on EOF.
pub async fn read_msg(s: &mut tokio::net::TcpStream) -> Option<(u8, Vec<u8>)> {
    use tokio::io::AsyncReadExt;
    let mut head = [0u8; 5];
    s.read_exact(&mut head).await.ok()?;
    let len = i32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    let mut body = vec![0u8; len.saturating_sub(4)];
    s.read_exact(&mut body).await.ok()?;
    Some((head[0], body))
}

/// The SQLSTATE of an ErrorResponse body.
pub fn sqlstate(body: &[u8]) -> String {
    body.split(|b| *b == 0)
        .find_map(|f| f.strip_prefix(b"C"))
        .map(|c| String::from_utf8_lossy(c).into_owned())
        .unwrap_or_default()
}

/// A raw protocol session through a proxy with `auth = "trust"`: startup
/// sent and read up to ReadyForQuery.
pub async fn raw_session(port: u16, user: &str, db: &str) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let params = vec![
        ("user".to_string(), user.to_string()),
        ("database".to_string(), db.to_string()),
    ];
    s.write_all(&pgshift::wire::messages::startup_message(&params))
        .await
        .unwrap();
    loop {
        let (tag, body) = read_msg(&mut s).await.expect("startup answer");
        match tag {
            b'Z' => return s,
            b'E' => panic!("startup failed: {}", String::from_utf8_lossy(&body)),
            _ => {}
        }
    }
}

/// Reads messages until EOF and returns the first ErrorResponse's SQLSTATE (if any).
pub async fn error_then_eof(s: &mut tokio::net::TcpStream) -> Option<String> {
    let mut code = None;
    while let Some((tag, body)) =
        tokio::time::timeout(std::time::Duration::from_secs(120), read_msg(s))
            .await
            .expect("connection not closed")
    {
        if tag == b'E' && code.is_none() {
            code = Some(sqlstate(&body));
        }
    }
    code
}
