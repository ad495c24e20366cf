//! Observability is part of the feature: after a real migration and cutover,
//! every metric the README documents is exported (and nothing undocumented),
//! every metric the Grafana dashboard queries exists, and the /metrics text
//! passes `promtool check metrics` when promtool is installed.

mod common;
use common::*;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use pgshift::commands::{AdminCommand, CommandKind};

/// Metrics that only appear once something went wrong.
const ONLY_AFTER_ERRORS: &[&str] = &[
    "pgshift_proxy_errors_total",
    "pgshift_apply_errors_total",
    "pgshift_reverse_apply_errors_total",
];

fn readme_metrics() -> BTreeSet<String> {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let section = readme
        .split("## Metrics")
        .nth(1)
        .expect("README has a Metrics section");
    section
        .lines()
        .filter_map(|l| l.strip_prefix("| `pgshift_"))
        .map(|l| format!("pgshift_{}", l.split('`').next().unwrap()))
        .collect()
}

fn dashboard_metrics() -> BTreeSet<String> {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/dashboards/pgshift.json"
    ))
    .unwrap();
    let dash: serde_json::Value = serde_json::from_str(&text).expect("dashboard is valid JSON");
    assert!(
        dash["templating"]["list"]
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v["type"] == "datasource"),
        "the data source is a variable"
    );
    let mut out = BTreeSet::new();
    let mut exprs = Vec::new();
    collect_exprs(&dash, &mut exprs);
    assert!(exprs.len() > 10, "dashboard has panels with queries");
    for e in exprs {
        let mut rest = e.as_str();
        while let Some(i) = rest.find("pgshift_") {
            let tail = &rest[i..];
            let end = tail
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(tail.len());
            out.insert(tail[..end].to_string());
            rest = &tail[end..];
        }
    }
    out
}

fn collect_exprs(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, x) in m {
                if k == "expr" {
                    if let Some(s) = x.as_str() {
                        out.push(s.to_string());
                    }
                } else {
                    collect_exprs(x, out);
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|x| collect_exprs(x, out)),
        _ => {}
    }
}

async fn wait_state(ctx: &pgshift::Context, state: &str, timeout: Duration) -> serde_json::Value {
    let start = Instant::now();
    loop {
        let doc = ctx.status.render();
        if doc["state"] == state {
            return doc;
        }
        assert!(
            start.elapsed() < timeout,
            "state never became {state}: {doc}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn scrape(admin: std::net::SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(admin).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = String::new();
    s.read_to_string(&mut buf).await.unwrap();
    let (head, body) = buf.split_once("\r\n\r\n").unwrap();
    assert!(
        head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"),
        "{head}"
    );
    body.to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_readme_and_dashboard_agree_after_a_real_cutover() {
    let source = Cluster::start();
    let target = Cluster::start();
    source.create_db("shop");
    source.psql(
        "shop",
        "CREATE TABLE orders (id bigserial PRIMARY KEY, amount int NOT NULL);
         INSERT INTO orders (amount) SELECT g FROM generate_series(1, 1000) g;
         GRANT ALL ON orders, orders_id_seq TO app;",
    );
    let config = config_for(
        &source,
        &target,
        "[migration]\nname = \"obs\"\ndatabases = [\"shop\"]\n[cutover]\nverify = \"counts\"\n",
    );
    let admin = config.admin_listen;
    let proxy_addr = config.proxy_listen;
    let running = pgshift::run::start(config).await.unwrap();
    let ctx = running.ctx.clone();
    wait_state(&ctx, "WaitingForUserAction", Duration::from_secs(300)).await;

    // Traffic through the proxy, streamed to the target.
    let client = connect(&format!(
        "postgres://{APP_USER}:{APP_PW}@{proxy_addr}/shop?sslmode=disable"
    ))
    .await;
    for i in 0..20 {
        client
            .execute("INSERT INTO orders (amount) VALUES ($1)", &[&i])
            .await
            .unwrap();
    }
    client
        .execute("UPDATE orders SET amount = amount + 1 WHERE id < 10", &[])
        .await
        .unwrap();
    client
        .execute("DELETE FROM orders WHERE id = 5", &[])
        .await
        .unwrap();

    let (reply, rx) = tokio::sync::oneshot::channel();
    ctx.commands
        .get()
        .unwrap()
        .send(AdminCommand {
            kind: CommandKind::Cutover,
            reply,
        })
        .await
        .unwrap();
    rx.await.unwrap().unwrap();
    let doc = wait_state(&ctx, "Succeeded", Duration::from_secs(300)).await;
    assert_eq!(doc["last_cutover"]["outcome"], "succeeded", "{doc}");
    client
        .execute("INSERT INTO orders (amount) VALUES (777777)", &[])
        .await
        .unwrap();
    // The verification after the switch and reverse replication run their
    // course, then a rollback: every metric of the way back is exported.
    let start = Instant::now();
    loop {
        let doc = ctx.status.render();
        let verified = doc["verify_after_switch"]["state"] == "match";
        let back = source.psql("shop", "SELECT count(*) FROM orders WHERE amount = 777777") == "1";
        if verified && back {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(300), "{doc}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (reply, rx) = tokio::sync::oneshot::channel();
    ctx.commands
        .get()
        .unwrap()
        .send(AdminCommand {
            kind: CommandKind::Rollback,
            reply,
        })
        .await
        .unwrap();
    rx.await.unwrap().unwrap();
    let doc = wait_state(&ctx, "WaitingForUserAction", Duration::from_secs(300)).await;
    assert_eq!(doc["last_rollback"]["outcome"], "succeeded", "{doc}");

    let text = scrape(admin).await;
    running.shutdown().await;

    let exported: BTreeSet<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .map(|l| l.split_whitespace().next().unwrap().to_string())
        .collect();
    for l in text.lines().filter(|l| l.starts_with("# HELP ")) {
        assert!(
            l.split_whitespace().count() > 3,
            "metric without help text: {l}"
        );
    }
    let documented = readme_metrics();
    assert!(documented.len() > 20, "{documented:?}");
    let undocumented: Vec<_> = exported.difference(&documented).collect();
    assert!(
        undocumented.is_empty(),
        "exported but not in README: {undocumented:?}"
    );
    let missing: Vec<_> = documented
        .difference(&exported)
        .filter(|m| !ONLY_AFTER_ERRORS.contains(&m.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "in README but not exported: {missing:?}"
    );
    // A histogram's series (_bucket, _sum, _count) belong to its documented name.
    let base = |m: &str| -> String {
        for suffix in ["_bucket", "_sum", "_count"] {
            if let Some(b) = m.strip_suffix(suffix)
                && documented.contains(b)
            {
                return b.to_string();
            }
        }
        m.to_string()
    };
    let unknown: Vec<_> = dashboard_metrics()
        .into_iter()
        .filter(|m| !documented.contains(&base(m)))
        .collect();
    assert!(
        unknown.is_empty(),
        "dashboard queries metrics pgshift does not export: {unknown:?}"
    );
    assert!(
        text.contains("pgshift_cutover_attempts_total{outcome=\"succeeded\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("pgshift_rollback_attempts_total{outcome=\"succeeded\"} 1"),
        "{text}"
    );
    assert!(text.contains(
        "pgshift_migration_state{state=\"WaitingForUserAction\",substate=\"WaitingForCutoverTrigger\"} 1"
    ));

    // promtool's own checker, when installed (CI installs it).
    if let Ok(mut child) = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
    {
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "promtool check metrics: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    } else {
        eprintln!("promtool not installed: skipping its check");
    }
}

/// pgshift (proxy and admin API, no migration) with `admin` as the
/// `[admin]` section's extra lines; no server is contacted.
async fn start_admin(listen_ip: &str, admin: &str) -> (pgshift::run::Running, String) {
    let (proxy, admin_port, dead) = (free_port(), free_port(), free_port());
    let text = format!(
        r#"
[proxy]
listen = "127.0.0.1:{proxy}"
auth = "trust"
[source]
url = "postgres://postgres:pw@127.0.0.1:{dead}/postgres?sslmode=disable"
[target]
url = "postgres://postgres:pw@127.0.0.1:{dead}/postgres?sslmode=disable"
[admin]
listen = "{listen_ip}:{admin_port}"
{admin}
"#
    );
    let config = pgshift::Config::from_toml(&text, &|_| None).unwrap();
    let running = pgshift::run::start(config).await.unwrap();
    // Something /status must not show to anyone without the token.
    running.ctx.status.register(
        "probe",
        std::sync::Arc::new(|| {
            serde_json::json!({"state": "ok", "lag_bytes": 7,
                "last_error": "cannot connect to 10.9.8.7:5432 as user \"dba_admin\""})
        }),
    );
    (running, format!("http://127.0.0.1:{admin_port}"))
}

fn refused_status(r: Result<serde_json::Value, pgshift::admin::client::ClientError>) -> u16 {
    match r {
        Err(pgshift::admin::client::ClientError::Refused { status, .. }) => status,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_api_fails_closed() {
    use pgshift::admin::client::AdminClient;
    const TOKEN: &str = "0123456789abcdef-admin";

    // With a token: POST needs it, /status without it hides details.
    let (running, url) = start_admin("127.0.0.1", &format!("token = \"{TOKEN}\"")).await;
    let anon = AdminClient::new(&url, None).unwrap();
    let wrong = AdminClient::new(&url, Some("0123456789abcdef-wrong".into())).unwrap();
    let admin = AdminClient::new(&url, Some(TOKEN.into())).unwrap();
    assert_eq!(refused_status(anon.post("/cancel").await), 401);
    assert_eq!(refused_status(wrong.post("/cutover").await), 401);
    // Authorized, refused only because no migration runs here.
    assert_eq!(refused_status(admin.post("/cancel").await), 409);
    let limited = anon.get("/status").await.unwrap();
    let text = limited.to_string();
    assert_eq!(limited["redacted"], true, "{text}");
    assert_eq!(limited["probe"]["lag_bytes"], 7, "{text}");
    assert_eq!(limited["probe"]["state"], "ok", "{text}");
    assert!(
        !text.contains("10.9.8.7") && !text.contains("dba_admin"),
        "{text}"
    );
    let full = admin.get("/status").await.unwrap();
    assert!(full.to_string().contains("10.9.8.7"), "{full}");
    assert!(full.get("redacted").is_none(), "{full}");
    // The token itself is shown nowhere.
    let metrics = admin.get("/metrics").await.unwrap().to_string();
    assert!(!full.to_string().contains(TOKEN) && !metrics.contains(TOKEN));
    running.shutdown().await;

    // No token, listening beyond loopback: POST refused, /status limited.
    let (running, url) = start_admin("0.0.0.0", "").await;
    let anon = AdminClient::new(&url, None).unwrap();
    assert_eq!(refused_status(anon.post("/cutover").await), 403);
    assert_eq!(refused_status(anon.post("/cancel").await), 403);
    assert_eq!(anon.get("/status").await.unwrap()["redacted"], true);
    running.shutdown().await;

    // No token on loopback: open (as before).
    let (running, url) = start_admin("127.0.0.1", "").await;
    let anon = AdminClient::new(&url, None).unwrap();
    assert_eq!(refused_status(anon.post("/cancel").await), 409);
    assert!(
        anon.get("/status")
            .await
            .unwrap()
            .to_string()
            .contains("10.9.8.7")
    );
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_api_drops_slow_and_excess_connections() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (running, url) = start_admin("127.0.0.1", "").await;
    let addr = url.trim_start_matches("http://").to_string();

    // A request head that never ends is cut off by the header-read timeout.
    let mut half = tokio::net::TcpStream::connect(&addr).await.unwrap();
    half.write_all(b"GET /status HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(120), half.read_to_end(&mut buf)).await;
    assert!(closed.is_ok(), "a half-sent request was held for 60s");

    // Connections beyond the cap are answered 503 at once.
    let mut idle = Vec::new();
    for _ in 0..pgshift::admin::MAX_CONNECTIONS {
        idle.push(tokio::net::TcpStream::connect(&addr).await.unwrap());
    }
    let mut extra = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let mut answer = String::new();
    extra.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    drop(idle);
    let client = pgshift::admin::client::AdminClient::new(&url, None).unwrap();
    let start = Instant::now();
    while client.get("/healthz").await.is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "admin API never recovered"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    running.shutdown().await;
}

/// A log sink for one test's tracing subscriber.
#[derive(Clone, Default)]
struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The server's notices on pgshift's connections are logged at DEBUG
/// (WARNINGs at WARN) with the connection's label, not at INFO.
#[tokio::test]
async fn server_notices_are_logged_at_debug_with_the_connection_label() {
    let pg = Cluster::start();
    let cfg = config_for(&pg, &pg, "");
    let sink = Captured::default();
    let writer = sink.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    // The current-thread runtime runs the connection task on this thread.
    let _guard = tracing::subscriber::set_default(subscriber);
    let c = pgshift::db::connect(&cfg.source, "notice probe")
        .await
        .unwrap();
    c.batch_execute(
        "DO $$ BEGIN RAISE NOTICE 'pgshift-test-notice'; RAISE WARNING 'pgshift-test-warning'; END $$",
    )
    .await
    .unwrap();
    let log = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
    let line = |needle: &str| {
        log.lines()
            .find(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no log line with {needle} in:\n{log}"))
            .to_string()
    };
    let notice = line("pgshift-test-notice");
    assert!(
        notice.contains("DEBUG") && notice.contains("notice probe"),
        "{notice}"
    );
    let warning = line("pgshift-test-warning");
    assert!(
        warning.contains("WARN") && warning.contains("notice probe"),
        "{warning}"
    );
}
