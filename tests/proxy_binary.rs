//! The real `pgshift run` binary: proxy + admin from a config file, /metrics
//! and /healthz, SIGTERM drain, and refusing bad configs and busy ports.

mod common;
mod proxy_common;
use common::*;
use proxy_common::*;

use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_serves_proxy_and_admin_and_drains_on_sigterm() {
    let pg = Cluster::start();
    pg.psql("postgres", "CREATE TABLE t (id int); GRANT ALL ON t TO app");
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
    let mut p = Pgshift::launch_config(&text, proxy_port, admin_port, &[("APP_SECRET", APP_PW)]);
    assert!(
        wait_until(Duration::from_secs(120), || http(
            admin_port, "GET", "/healthz"
        )
        .is_some_and(|(s, b)| s == 200 && b.contains("ok"))),
        "admin never became healthy: {}",
        p.log()
    );

    let url = format!("postgres://app:{APP_PW}@127.0.0.1:{proxy_port}/postgres?sslmode=disable");
    let busy = connect(&url).await;
    let idle = connect(&url).await;
    idle.simple_query("SELECT 1").await.unwrap();
    busy.batch_execute("BEGIN; INSERT INTO t VALUES (1)")
        .await
        .unwrap();

    let (status, metrics) = http(admin_port, "GET", "/metrics").unwrap();
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
    p.sigterm();
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
    let code = tokio::task::block_in_place(|| p.wait_exit(Duration::from_secs(120)));
    assert_eq!(code, Some(0), "{}", p.log());
    assert_eq!(pg.psql("postgres", "SELECT count(*) FROM t"), "2");
    let logs = p.log();
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
        let mut p = Pgshift::launch_config(&text, 0, 0, &[]);
        let code = p.wait_exit(Duration::from_secs(120));
        let err = p.current_log();
        assert_eq!(code, Some(1), "expected a refusal for {key}: {err}");
        assert!(err.contains(key), "error does not name {key}: {err}");
        assert!(!err.contains(APP_PW), "a password reached the error: {err}");
    }
    drop(busy);
}
