//! The proxy's Unix-domain socket (`proxy.unix_socket_dir`, issue 16):
//! `psql -h <dir>` and tokio-postgres over it, SCRAM and a wrong password,
//! cancel, SSLRequest answered 'N', the client address "unix"; a session on
//! the socket moves at a switch with its prepared statement; `pgshift run`
//! replaces a stale socket file, refuses to start beside another pgshift on
//! the same socket, and removes its file on shutdown.

mod common;
mod proxy_common;
use common::*;
use proxy_common::*;

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use pgshift::config::Endpoint;
use pgshift::proxy::Route;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_tokio_postgres_scram_and_cancel_over_the_unix_socket() {
    let pg = Cluster::start();
    let up = start_proxy_unix(&pg, "scram-sha-256").await;
    let mode = std::fs::metadata(up.socket()).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o777, "socket mode {mode:o}");

    // psql with -h <dir>, as libpq finds PostgreSQL's own socket.
    let (host, port) = (up.host(), up.proxy.port);
    let (ok, out, err) = tokio::task::spawn_blocking(move || {
        psql_at(
            &host,
            port,
            APP_USER,
            APP_PW,
            "postgres",
            "SELECT 'over ' || 'unix'",
        )
    })
    .await
    .unwrap();
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "over unix");

    // A wrong password: a clear ErrorResponse, as over TCP.
    let (host, port) = (up.host(), up.proxy.port);
    let (ok, _, err) = tokio::task::spawn_blocking(move || {
        psql_at(&host, port, APP_USER, "wrong", "postgres", "SELECT 1")
    })
    .await
    .unwrap();
    assert!(!ok);
    assert!(
        err.contains("password authentication failed for user \"app\""),
        "{err}"
    );
    let e = tokio_postgres::connect(
        &up.conninfo(APP_USER, "wrong", "postgres"),
        tokio_postgres::NoTls,
    )
    .await
    .err()
    .expect("a wrong password is refused");
    assert_eq!(e.code().map(|c| c.code()), Some("28P01"), "{e}");

    // tokio-postgres: the extended protocol, and the client address.
    let c = connect(&up.conninfo(APP_USER, APP_PW, "postgres")).await;
    let n: i32 = c
        .query_one("SELECT $1::int + 1", &[&41])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 42);
    let peers: Vec<_> = up
        .proxy
        .handle
        .sessions()
        .sessions()
        .iter()
        .map(|s| s.snapshot().peer)
        .collect();
    assert_eq!(peers, vec![Some("unix".to_string())]);

    // A CancelRequest on the socket reaches the session's backend.
    let token = c.cancel_token();
    let watcher = pg.client("postgres").await;
    let canceller = tokio::spawn(async move {
        wait_running(&watcher, "SELECT pg_sleep(60)").await;
        token.cancel_query(tokio_postgres::NoTls).await.unwrap();
    });
    let e = c.simple_query("SELECT pg_sleep(60)").await.unwrap_err();
    canceller.await.unwrap();
    assert_eq!(e.code().map(|c| c.code()), Some("57014"), "{e}");

    // SSLRequest: 'N' (no TLS on a Unix socket), then a plain startup.
    let mut s = tokio::net::UnixStream::connect(up.socket()).await.unwrap();
    s.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f])
        .await
        .unwrap();
    let mut answer = [0u8; 1];
    s.read_exact(&mut answer).await.unwrap();
    assert_eq!(&answer, b"N");
    let params = vec![
        ("user".to_string(), APP_USER.to_string()),
        ("database".to_string(), "postgres".to_string()),
    ];
    s.write_all(&pgshift::wire::messages::startup_message(&params))
        .await
        .unwrap();
    let mut head = [0u8; 1];
    s.read_exact(&mut head).await.unwrap();
    assert_eq!(&head, b"R", "an authentication request follows");
}

/// A session on the Unix socket moves to the target at the switch, with
/// its settings and its prepared statement, as a TCP one does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unix_socket_session_moves_with_its_prepared_statement() {
    let (a, b) = (Cluster::start(), Cluster::start());
    for (c, name) in [(&a, "A"), (&b, "B")] {
        c.psql(
            "postgres",
            &format!(
                "CREATE TABLE whoami (v text); INSERT INTO whoami VALUES ('{name}');
                 GRANT SELECT ON whoami TO app;"
            ),
        );
    }
    let up = start_proxy_unix(&a, "scram-sha-256").await;
    let c = connect(&up.conninfo(APP_USER, APP_PW, "postgres")).await;
    c.batch_execute("SET statement_timeout = '700ms'")
        .await
        .unwrap();
    let st = c.prepare("SELECT v || $1::text FROM whoami").await.unwrap();
    let v: String = c.query_one(&st, &[&"1"]).await.unwrap().get(0);
    assert_eq!(v, "A1");

    let h = &up.proxy.handle;
    let ep = Endpoint::parse("target.url", &b.url("postgres")).unwrap();
    let route = Route::from_endpoint("target", &ep);
    assert_eq!(h.prewarm(route.clone()).await, 1);
    h.gate().close();
    let (moved, dropped) = h.switch_to(route, Duration::from_secs(60)).await;
    h.gate().open();
    assert_eq!((moved, dropped), (1, 0));

    // The statement prepared on A runs on B without preparing again.
    let v: String = c.query_one(&st, &[&"2"]).await.unwrap().get(0);
    assert_eq!(v, "B2");
    let t: String = c
        .query_one("SHOW statement_timeout", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(t, "700ms");
    assert_eq!(
        metric(&up.proxy.ctx, "pgshift_proxy_session_moves_total", "moved"),
        1.0
    );
}

/// The config for `pgshift run` with the socket in `dir`, the proxy on
/// `listen_ip:proxy_port`.
fn unix_config(
    source: &Cluster,
    target: &Cluster,
    dir: &std::path::Path,
    listen_ip: &str,
    proxy_port: u16,
    admin_port: u16,
) -> String {
    config_text(source, target, proxy_port, admin_port, "").replacen(
        &format!("listen = \"127.0.0.1:{proxy_port}\""),
        &format!(
            "listen = \"{listen_ip}:{proxy_port}\"\nunix_socket_dir = \"{}\"",
            dir.display()
        ),
        1,
    )
}

#[test]
fn pgshift_run_replaces_a_stale_socket_refuses_a_second_instance_and_cleans_up() {
    let (source, target) = (Cluster::start(), Cluster::start());
    let dir = tempfile::tempdir().unwrap();
    let (port, admin) = (free_port(), free_port());
    let socket = dir.path().join(format!(".s.PGSQL.{port}"));
    // Left behind by a process that was killed: the file, nobody listening.
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    assert!(socket.exists());

    let text = unix_config(&source, &target, dir.path(), "127.0.0.1", port, admin);
    let mut first = Pgshift::launch_config(&text, port, admin, &[]);
    first.wait_up();
    let host = dir.path().to_string_lossy().into_owned();
    let (ok, out, err) = psql_at(&host, port, APP_USER, APP_PW, "postgres", "SELECT 7");
    assert!(ok, "{err}\n{}", first.log());
    assert_eq!(out.trim(), "7");

    // Another pgshift whose socket would be the same file (same port, on
    // another loopback address for TCP): refused, the first one untouched.
    let admin2 = free_port();
    let text2 = unix_config(&source, &target, dir.path(), "127.0.0.2", port, admin2);
    let mut second = Pgshift::launch_config(&text2, port, admin2, &[]);
    let code = second.wait_exit(Duration::from_secs(120));
    assert!(
        matches!(code, Some(c) if c != 0),
        "{code:?}\n{}",
        second.log()
    );
    assert!(
        second.log().contains(&format!(
            "another process is listening on {}",
            socket.display()
        )),
        "{}",
        second.log()
    );
    let (ok, _, err) = psql_at(&host, port, APP_USER, APP_PW, "postgres", "SELECT 8");
    assert!(ok, "the first pgshift still serves: {err}");

    // A clean shutdown removes the file.
    assert_eq!(first.terminate(), Some(0), "{}", first.log());
    assert!(!socket.exists(), "the socket file is removed on shutdown");
}
