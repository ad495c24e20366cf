//! The real `pgshift run` binary: proxy + admin from a config file, /metrics
//! and /healthz, SIGTERM drain, and refusing bad configs and busy ports.

mod common;
mod proxy_common;
use common::*;
use proxy_common::*;

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(60))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string())?;
    Some((status, body))
}

fn spawn_run(config: &Path, log: &Path) -> Child {
    Command::new(pgshift_bin())
        .arg("run")
        .arg("--config")
        .arg(config)
        .env("APP_SECRET", APP_PW)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .expect("start pgshift")
}

fn wait_exit(child: &mut Child, within: Duration) -> Option<i32> {
    let start = Instant::now();
    while start.elapsed() < within {
        if let Some(st) = child.try_wait().unwrap() {
            return Some(st.code().unwrap_or(-1));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    None
}

fn write_config(dir: &Path, text: &str) -> std::path::PathBuf {
    let p = dir.join("pgshift.toml");
    std::fs::write(&p, text).unwrap();
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_serves_proxy_and_admin_and_drains_on_sigterm() {
    let pg = Cluster::start();
    pg.psql("postgres", "CREATE TABLE t (id int); GRANT ALL ON t TO app");
    let dir = tempfile::tempdir().unwrap();
    let (proxy_port, admin_port) = (free_port(), free_port());
    let text = proxy_config_text(
        proxy_port,
        admin_port,
        pg.port,
        pg.port,
        "scram-sha-256",
        "shutdown_timeout = \"20s\"",
    )
    .replace(
        &format!("password = \"{APP_PW}\""),
        "password = \"${APP_SECRET}\"",
    );
    let config = write_config(dir.path(), &text);
    let log = dir.path().join("pgshift.log");
    let mut child = spawn_run(&config, &log);
    assert!(
        wait_until(Duration::from_secs(120), || http_get(
            admin_port, "/healthz"
        )
        .is_some_and(|(s, b)| s == 200 && b.contains("ok"))),
        "admin never became healthy: {}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );

    let url = format!("postgres://app:{APP_PW}@127.0.0.1:{proxy_port}/postgres?sslmode=disable");
    let busy = connect(&url).await;
    let idle = connect(&url).await;
    idle.simple_query("SELECT 1").await.unwrap();
    busy.batch_execute("BEGIN; INSERT INTO t VALUES (1)")
        .await
        .unwrap();

    let (status, metrics) = http_get(admin_port, "/metrics").unwrap();
    assert_eq!(status, 200);
    for name in [
        "pgshift_proxy_client_connections",
        "pgshift_proxy_client_connections_total",
        "pgshift_proxy_transactions_total",
        "pgshift_proxy_queries_total",
        "pgshift_proxy_bytes_total",
        "pgshift_proxy_sessions_in_transaction",
        "pgshift_proxy_paused",
        "pgshift_proxy_pause_waiting_sessions",
    ] {
        assert!(
            metrics.contains(&format!("# HELP {name} ")),
            "{name} missing:\n{metrics}"
        );
    }
    assert_eq!(
        metric_in(&metrics, "pgshift_proxy_client_connections", ""),
        2.0
    );
    assert_eq!(
        metric_in(&metrics, "pgshift_proxy_sessions_in_transaction", ""),
        1.0
    );
    assert_eq!(metric_in(&metrics, "pgshift_proxy_paused", ""), 0.0);
    assert!(metric_in(&metrics, "pgshift_proxy_bytes_total", "server_to_client") > 0.0);

    // SIGTERM: idle sessions are closed, the open transaction may finish.
    let st = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert!(st.success());
    // Once the process has handled the signal (however long that takes
    // here), it accepts no connection and the idle session is closed.
    assert!(
        wait_until(Duration::from_secs(120), || std::net::TcpStream::connect((
            "127.0.0.1",
            proxy_port
        ))
        .is_err()),
        "still accepting after SIGTERM"
    );
    let started = std::time::Instant::now();
    let e = loop {
        match idle.simple_query("SELECT 1").await {
            Err(e) => break e,
            Ok(_) => {
                assert!(
                    started.elapsed() < Duration::from_secs(120),
                    "the idle session stays open after SIGTERM"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    assert!(
        idle.is_closed() || e.code().map(|c| c.code()) == Some("57P01"),
        "{e:?}"
    );
    busy.batch_execute("INSERT INTO t VALUES (2)")
        .await
        .unwrap();
    busy.batch_execute("COMMIT").await.unwrap();
    let code = tokio::task::spawn_blocking(move || wait_exit(&mut child, Duration::from_secs(120)))
        .await
        .unwrap();
    assert_eq!(code, Some(0), "{}", std::fs::read_to_string(&log).unwrap());
    assert_eq!(pg.psql("postgres", "SELECT count(*) FROM t"), "2");
    let logs = std::fs::read_to_string(&log).unwrap();
    assert!(
        logs.contains("proxy draining") && logs.contains("proxy drained"),
        "{logs}"
    );
    assert!(
        !logs.contains(APP_PW),
        "a password reached the log:\n{logs}"
    );
}

#[test]
fn run_refuses_busy_ports_and_bad_configs_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy_port = busy.local_addr().unwrap().port();
    let cases = [
        (
            proxy_config_text(busy_port, free_port(), 5432, 5433, "md5", ""),
            "proxy.listen",
        ),
        (
            proxy_config_text(free_port(), busy_port, 5432, 5433, "md5", ""),
            "admin.listen",
        ),
        (
            proxy_config_text(
                free_port(),
                free_port(),
                5432,
                5433,
                "md5",
                "listen_port = 1",
            ),
            "listen_port",
        ),
        (
            proxy_config_text(free_port(), free_port(), 5432, 5433, "md5", "").replace(
                &format!("password = \"{APP_PW}\""),
                "password = \"${NO_SUCH_VAR_X}\"",
            ),
            "proxy.users[1].password",
        ),
        (
            proxy_config_text(
                free_port(),
                free_port(),
                5432,
                5433,
                "md5",
                "tls_cert = \"/nonexistent.pem\"\ntls_key = \"/nonexistent.key\"",
            ),
            "proxy.tls_cert",
        ),
    ];
    for (text, key) in cases {
        let config = write_config(dir.path(), &text);
        let log = dir.path().join("err.log");
        let mut child = spawn_run(&config, &log);
        let code = wait_exit(&mut child, Duration::from_secs(120));
        let err = std::fs::read_to_string(&log).unwrap();
        assert_eq!(code, Some(1), "expected a refusal for {key}: {err}");
        assert!(err.contains(key), "error does not name {key}: {err}");
        assert!(!err.contains(APP_PW), "a password reached the error: {err}");
    }
    drop(busy);
}
