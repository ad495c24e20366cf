//! Bad input never takes the proxy down: garbage, oversized messages, a
//! startup that never finishes, a client vanishing mid-message, a server
//! killed mid-query. Another session keeps working throughout.

mod common;
mod proxy_common;
use common::*;
use proxy_common::*;

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn still_works(c: &tokio_postgres::Client) {
    let n: i32 = c.query_one("SELECT 41 + 1", &[]).await.unwrap().get(0);
    assert_eq!(n, 42);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_oversized_timeouts_and_vanishing_clients() {
    let pg = Cluster::start();
    let proxy = start_proxy_with(
        &pg,
        "trust",
        // Short, so the silent startups below are dropped soon; long enough
        // for the well-behaved clients' startups on a loaded machine.
        "max_message_size = \"1MB\"\nstartup_timeout = \"2s\"",
    )
    .await;
    let bystander = connect(&proxy.url("postgres")).await;
    still_works(&bystander).await;

    // Garbage instead of a startup packet.
    let mut s = TcpStream::connect(("127.0.0.1", proxy.port)).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(error_then_eof(&mut s).await.as_deref(), Some("08P01"));
    still_works(&bystander).await;

    // Random bytes after a good startup.
    let mut s = raw_session(proxy.port, APP_USER, "postgres").await;
    s.write_all(&[0xde, 0xad, 0xbe, 0xef, 0x01, 0x02, 0x03, 0x04, 0x05])
        .await
        .unwrap();
    assert_eq!(error_then_eof(&mut s).await.as_deref(), Some("08P01"));
    still_works(&bystander).await;

    // A declared length over proxy.max_message_size.
    let mut s = raw_session(proxy.port, APP_USER, "postgres").await;
    s.write_all(b"Q\x00\x20\x00\x00select").await.unwrap();
    assert_eq!(error_then_eof(&mut s).await.as_deref(), Some("08P01"));
    still_works(&bystander).await;

    // A negative length.
    let mut s = raw_session(proxy.port, APP_USER, "postgres").await;
    s.write_all(b"Q\xff\xff\xff\xf0").await.unwrap();
    assert_eq!(error_then_eof(&mut s).await.as_deref(), Some("08P01"));

    // A startup that never finishes is dropped after proxy.startup_timeout.
    let started = Instant::now();
    let mut s = TcpStream::connect(("127.0.0.1", proxy.port)).await.unwrap();
    s.write_all(&[0, 0, 0]).await.unwrap();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(120), s.read(&mut buf))
        .await
        .expect("closed by the startup timeout")
        .unwrap_or(0);
    assert_eq!(n, 0);
    assert!(started.elapsed() >= Duration::from_millis(1900));
    assert!(metric(&proxy.ctx, "pgshift_proxy_errors_total", "startup_timeout") >= 1.0);
    // An SSLRequest, then silence: same.
    let mut s = TcpStream::connect(("127.0.0.1", proxy.port)).await.unwrap();
    s.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f])
        .await
        .unwrap();
    let mut one = [0u8; 1];
    s.read_exact(&mut one).await.unwrap();
    assert_eq!(&one, b"N");
    let n = tokio::time::timeout(Duration::from_secs(120), s.read(&mut buf))
        .await
        .expect("closed by the startup timeout")
        .unwrap_or(0);
    assert_eq!(n, 0);

    // GSSENCRequest is declined, then a normal startup proceeds.
    let mut s = TcpStream::connect(("127.0.0.1", proxy.port)).await.unwrap();
    s.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x30])
        .await
        .unwrap();
    s.read_exact(&mut one).await.unwrap();
    assert_eq!(&one, b"N");
    drop(s);

    // A client that vanishes in the middle of a message: its backend goes away.
    let mut s = raw_session(proxy.port, APP_USER, "postgres").await;
    s.write_all(b"Q\x00\x00\x01\x00SELECT 'half").await.unwrap();
    drop(s);
    let count = "SELECT count(*) FROM pg_stat_activity WHERE usename = 'app' AND backend_type = 'client backend'";
    assert!(
        wait_until(Duration::from_secs(120), || pg.psql("postgres", count)
            == "1"),
        "the vanished client's backend stays: {}",
        pg.psql("postgres", count)
    );
    assert!(wait_until(Duration::from_secs(120), || proxy
        .handle
        .sessions()
        .len()
        == 1));
    still_works(&bystander).await;
    assert_eq!(
        metric(&proxy.ctx, "pgshift_proxy_client_connections", ""),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_killed_mid_query_gives_an_error_then_close() {
    let pg = Cluster::start();
    let proxy = start_proxy(&pg).await;
    let victim = connect(&proxy.url("postgres")).await;
    let pid: i32 = victim
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    let query = tokio::spawn(async move {
        let r = victim.simple_query("SELECT pg_sleep(30)").await;
        (r.map(|_| ()), victim)
    });
    // Killed mid-query: once the query runs on the server.
    wait_running(&pg.client("postgres").await, "SELECT pg_sleep(30)").await;
    let st = std::process::Command::new("kill")
        .arg("-9")
        .arg(pid.to_string())
        .status()
        .unwrap();
    assert!(st.success());
    let (r, victim) = tokio::time::timeout(Duration::from_secs(120), query)
        .await
        .expect("the client hears about it")
        .unwrap();
    let e = r.unwrap_err();
    let db = e.as_db_error().expect("an ErrorResponse, not just EOF");
    assert_eq!(db.code().code(), "08006", "{db:?}");
    assert!(victim.is_closed() || victim.simple_query("SELECT 1").await.is_err());
    assert!(metric(&proxy.ctx, "pgshift_proxy_errors_total", "server_lost") >= 1.0);
    // The server recovers from the crash; the proxy serves new sessions.
    let mut ok = false;
    let recovering = Instant::now();
    while recovering.elapsed() < Duration::from_secs(120) {
        if let Ok((c, conn)) =
            tokio_postgres::connect(&proxy.url("postgres"), tokio_postgres::NoTls).await
        {
            tokio::spawn(conn);
            if c.simple_query("SELECT 1").await.is_ok() {
                ok = true;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ok, "proxy serves again after the server recovered");
}

/// Sends a startup packet with `params` and returns the ErrorResponse (SQLSTATE, text).
async fn startup_error(port: u16, params: &[(&str, &str)]) -> (String, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let params: Vec<(String, String)> = params
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    s.write_all(&pgshift::wire::messages::startup_message(&params))
        .await
        .unwrap();
    let (tag, body) = read_msg(&mut s).await.expect("an answer");
    assert_eq!(tag, b'E', "{}", String::from_utf8_lossy(&body));
    (sqlstate(&body), String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odd_startup_names_and_replication_are_refused() {
    let pg = Cluster::start();
    let proxy = start_proxy_with(&pg, "trust", "").await;
    let forged = "app\n2026-01-01 00:00:00 INFO admin logged in";
    let (code, text) = startup_error(proxy.port, &[("user", forged)]).await;
    assert_eq!(code, "28000");
    assert!(
        text.contains("control character") && !text.contains('\n'),
        "{text}"
    );
    let (code, text) = startup_error(
        proxy.port,
        &[("user", APP_USER), ("database", "post\x07gres")],
    )
    .await;
    assert_eq!(code, "08P01");
    assert!(text.contains("database name"), "{text}");
    let long = "u".repeat(64);
    let (code, text) = startup_error(proxy.port, &[("user", &long)]).await;
    assert_eq!(code, "28000");
    assert!(text.contains("63"), "{text}");
    for r in ["database", "true", "on", "1"] {
        let (code, text) = startup_error(
            proxy.port,
            &[
                ("user", APP_USER),
                ("database", "postgres"),
                ("replication", r),
            ],
        )
        .await;
        assert_eq!(code, "28000", "{r}");
        assert!(text.contains("replication"), "{text}");
    }
    // No backend was opened for any of them; normal clients are unaffected.
    assert_eq!(proxy.handle.sessions().len(), 0);
    let c = connect(&proxy.url("postgres")).await;
    still_works(&c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_see_an_incident_id_not_the_server_address() {
    // A source nobody listens on: no cluster needed.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let dead = free_port();
    let text = proxy_config_text(port, free_port(), dead, dead, "trust", "");
    let config = pgshift::Config::from_toml(&text, &|_| None).unwrap();
    let ctx = pgshift::Context::new(config);
    let (_handle, _task) = pgshift::proxy::Proxy::start(ctx, listener).unwrap();
    let (code, text) = startup_error(port, &[("user", APP_USER), ("database", "postgres")]).await;
    assert_eq!(code, "08006", "{text}");
    assert!(
        text.contains("cannot connect to the source server"),
        "{text}"
    );
    assert!(text.contains("pgshift incident "), "{text}");
    assert!(
        !text.contains("127.0.0.1") && !text.contains(&dead.to_string()),
        "{text}"
    );
}
