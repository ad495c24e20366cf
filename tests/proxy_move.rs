//! Moving live sessions to another server (issue 5, "Moving live sessions"):
//! session settings, SQL and protocol-level prepared statements (parameter
//! types that have other OIDs on the target) and LISTEN channels survive the
//! move; ParameterStatus values that differ reach the client; sessions with
//! temp tables, WITH HOLD cursors or advisory locks get a clear error and are
//! counted; pre-warmed backends are used; pgbench -M prepared runs through a
//! switch without a failure.

mod common;
mod proxy_common;
use common::*;
use proxy_common::*;

use std::error::Error;
use std::time::Duration;

use bytes::BytesMut;
use pgshift::config::Endpoint;
use pgshift::proxy::Route;
use tokio::io::AsyncWriteExt;
use tokio_postgres::types::{IsNull, ToSql, Type, to_sql_checked};

/// The same schema on both clusters; the target first gets other objects,
/// so the user types have other OIDs there.
fn schema(c: &Cluster, name: &str, pad_oids: bool) {
    if pad_oids {
        c.psql(
            "postgres",
            "CREATE TYPE pad_a AS ENUM ('x'); CREATE TYPE pad_b AS ENUM ('y');
             CREATE TABLE pad_t (a int, b text); CREATE DOMAIN pad_d AS text;",
        );
    }
    c.psql(
        "postgres",
        &format!(
            "CREATE TABLE whoami (v text); INSERT INTO whoami VALUES ('{name}');
             CREATE SCHEMA app_s;
             CREATE TYPE app_s.mood AS ENUM ('sad', 'ok', 'happy');
             CREATE DOMAIN app_s.posint AS int CHECK (VALUE > 0);
             CREATE TABLE app_s.items (id int, m app_s.mood);
             INSERT INTO app_s.items VALUES (1, 'sad'), (2, 'happy');
             GRANT USAGE ON SCHEMA app_s TO app;
             CREATE ROLE mover_role; GRANT mover_role TO app;
             GRANT ALL ON ALL TABLES IN SCHEMA app_s, public TO app;"
        ),
    );
}

fn pair() -> (Cluster, Cluster) {
    let a = Cluster::start();
    let b = Cluster::start();
    schema(&a, "A", false);
    schema(&b, "B", true);
    let oid = |c: &Cluster| c.psql("postgres", "SELECT 'app_s.mood'::regtype::oid");
    assert_ne!(oid(&a), oid(&b), "the test needs other OIDs on the target");
    (a, b)
}

/// The pair, a proxy in front of A and one client session through it.
async fn pair_with_client() -> (Cluster, Cluster, TestProxy, tokio_postgres::Client) {
    let (a, b) = pair();
    let proxy = start_proxy(&a).await;
    let c = connect(&proxy.url("postgres")).await;
    (a, b, proxy, c)
}

fn route_to(c: &Cluster) -> Route {
    let ep = Endpoint::parse("target.url", &c.url("postgres")).unwrap();
    Route::from_endpoint("target", &ep)
}

/// A binary parameter written as given, for types the client library has
/// no Rust type for (enums, domains).
#[derive(Debug)]
struct Raw(Vec<u8>);

impl ToSql for Raw {
    fn to_sql(&self, _: &Type, out: &mut BytesMut) -> Result<IsNull, Box<dyn Error + Sync + Send>> {
        out.extend_from_slice(&self.0);
        Ok(IsNull::No)
    }
    fn accepts(_: &Type) -> bool {
        true
    }
    to_sql_checked!();
}

async fn whoami(c: &tokio_postgres::Client) -> String {
    c.query_one("SELECT v FROM whoami", &[])
        .await
        .unwrap()
        .get(0)
}

async fn backend_pid(c: &tokio_postgres::Client) -> i32 {
    c.query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0)
}

async fn show(c: &tokio_postgres::Client, name: &str) -> String {
    c.query_one(&format!("SHOW {name}"), &[])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_and_prepared_statements_survive_a_prewarmed_move() {
    let (a, b, proxy, c) = pair_with_client().await;
    let h = &proxy.handle;
    // Settings and a SQL PREPARE in one query string (its text is the whole
    // string), and one on its own.
    c.batch_execute(
        "SET search_path = app_s, public; SET statement_timeout = '700ms';
         PREPARE multi(int) AS SELECT $1 + 100;
         SET DateStyle = 'German'",
    )
    .await
    .unwrap();
    c.batch_execute("PREPARE single(app_s.posint) AS SELECT m::text FROM items WHERE id = $1")
        .await
        .unwrap();
    // A PREPARE after a DEALLOCATE in one string: replaying the string
    // would fail at the DEALLOCATE (nothing to deallocate on the new backend).
    c.batch_execute("PREPARE gone AS SELECT 0").await.unwrap();
    c.batch_execute("DEALLOCATE gone; PREPARE kept AS SELECT 2")
        .await
        .unwrap();
    // Changed after the PREPARE texts that also set them: the replay must
    // not bring back the values those texts set.
    c.batch_execute("SET statement_timeout = '800ms'; RESET DateStyle")
        .await
        .unwrap();
    // Protocol-level: parameter types inferred as the enum and the domain.
    let by_mood = c
        .prepare("SELECT id FROM items WHERE m = $1 AND id >= $2::posint")
        .await
        .unwrap();
    let plain = c.prepare("SELECT $1::int * 2").await.unwrap();
    assert_eq!(whoami(&c).await, "A");

    // Pre-warm: the live session and one connecting afterwards get a backend on B.
    let route = route_to(&b);
    assert_eq!(h.prewarm(route.clone()).await, 1);
    let late = connect(&proxy.url("postgres")).await;
    assert!(wait_until(Duration::from_secs(10), || {
        h.sessions()
            .sessions()
            .iter()
            .all(|s| s.parked_backend().is_some_and(|(r, _)| r == "target"))
    }));
    let parked: Vec<i32> = h
        .sessions()
        .sessions()
        .iter()
        .map(|s| s.parked_backend().unwrap().1)
        .collect();

    // The switch with the gate closed, as the cutover does it.
    h.gate().close();
    let (moved, dropped) = h.switch_to(route, Duration::from_secs(10)).await;
    assert_eq!((moved, dropped), (2, 0));
    h.gate().open();

    // Each session runs on the very backend that was pre-warmed for it.
    let pid: i32 = backend_pid(&c).await;
    let late_pid: i32 = backend_pid(&late).await;
    let mut got = vec![pid, late_pid];
    let mut want = parked.clone();
    got.sort();
    want.sort();
    assert_eq!(got, want);
    assert_eq!(
        metric(&proxy.ctx, "pgshift_proxy_prewarmed_backends_total", "used"),
        2.0
    );
    assert_eq!(
        metric(&proxy.ctx, "pgshift_proxy_session_moves_total", "moved"),
        2.0
    );

    assert_eq!(whoami(&c).await, "B");
    assert_eq!(show(&c, "search_path").await, "app_s, public");
    assert_eq!(show(&c, "statement_timeout").await, "800ms");
    assert_eq!(show(&c, "DateStyle").await, "ISO, MDY");
    let e = c.simple_query("SELECT pg_sleep(2)").await.unwrap_err();
    assert_eq!(e.code().unwrap().code(), "57014", "{e}");
    // Prepared statements work without preparing again.
    let rows = c
        .query(
            &by_mood,
            &[&Raw(b"happy".to_vec()), &Raw(1i32.to_be_bytes().to_vec())],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].get::<_, i32>(0), 2);
    assert_eq!(
        c.query_one(&plain, &[&21i32])
            .await
            .unwrap()
            .get::<_, i32>(0),
        42
    );
    let r = c.simple_query("EXECUTE multi(1)").await.unwrap();
    assert_eq!(first_value(&r), "101");
    let r = c.simple_query("EXECUTE single(1)").await.unwrap();
    assert_eq!(first_value(&r), "sad");
    let r = c.simple_query("EXECUTE kept").await.unwrap();
    assert_eq!(first_value(&r), "2");
    // The replay created nothing the session did not have.
    let names: Vec<String> = c
        .query(
            "SELECT name FROM pg_prepared_statements WHERE from_sql ORDER BY name",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(names, vec!["kept", "multi", "single"]);
    // Cancel keys follow the session to its pre-warmed backend.
    c.batch_execute("SET statement_timeout = 0").await.unwrap();
    let token = c.cancel_token();
    let canceller = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        token.cancel_query(tokio_postgres::NoTls).await.unwrap();
    });
    let e = c.simple_query("SELECT pg_sleep(20)").await.unwrap_err();
    canceller.await.unwrap();
    assert!(
        e.as_db_error()
            .is_some_and(|d| d.message().contains("user request")),
        "{e:?}"
    );
    // The moved sessions are gone from the source.
    assert!(wait_until(Duration::from_secs(5), || a.psql(
        "postgres",
        "SELECT count(*) FROM pg_stat_activity WHERE usename = 'app'"
    ) == "0"));
}

/// Pre-warming replays each session's state on its new backend ahead of
/// the pause; a session that changes its state afterwards (before the gate
/// holds it) still moves with its new state, on that same backend — read
/// again while it was idle, so the pause reads nothing from the source.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_changed_after_prewarm_moves_with_the_new_state() {
    let (a, b, proxy, c) = pair_with_client().await;
    let h = &proxy.handle;
    c.batch_execute("SET search_path = app_s, public; PREPARE early AS SELECT 1")
        .await
        .unwrap();
    let early = c.prepare("SELECT $1::int + 1").await.unwrap();

    let route = route_to(&b);
    assert_eq!(h.prewarm(route.clone()).await, 1);
    let parked = h.sessions().sessions()[0].parked_backend().unwrap().1;
    // prewarm() returns once the idle session has replayed its state there.
    let replayed = b.psql(
        "postgres",
        &format!("SELECT query <> '' FROM pg_stat_activity WHERE pid = {parked}"),
    );
    assert_eq!(
        replayed, "t",
        "the state was not replayed ahead of the pause"
    );

    // Changed after that: a statement dropped, a setting, a statement and a
    // channel added.
    for sql in [
        "DEALLOCATE early",
        "SET statement_timeout = '900ms'",
        "PREPARE late AS SELECT 2",
        "LISTEN late_channel",
    ] {
        c.batch_execute(sql).await.unwrap();
    }
    let late = c.prepare("SELECT $1::int + 2").await.unwrap();

    // Idle after those requests, the session reads its state again (gate
    // open): the source backend's last query is that read, and then the
    // proxy is quiet.
    let source_pid = h.sessions().sessions()[0].backend().pid;
    let last_query = format!(
        "SELECT state || ' ' || (query LIKE 'SELECT ''temp''%')::text || ' ' || query_start::text \
         FROM pg_stat_activity WHERE pid = {source_pid}"
    );
    assert!(
        wait_until(Duration::from_secs(5), || a
            .psql("postgres", &last_query)
            .starts_with("idle true")),
        "the session did not read its state again: {}",
        a.psql("postgres", &last_query)
    );
    assert!(h.wait_quiet(Duration::from_secs(5)).await);
    let before_pause = a.psql("postgres", &last_query);

    h.gate().close();
    // Held, it has nothing to read again: nothing runs on the source.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(a.psql("postgres", &last_query), before_pause);
    let (moved, dropped) = h.switch_to(route, Duration::from_secs(10)).await;
    assert_eq!((moved, dropped), (1, 0));
    h.gate().open();

    let pid: i32 = backend_pid(&c).await;
    assert_eq!(pid, parked, "the pre-warmed backend was not used");
    assert_eq!(whoami(&c).await, "B");
    assert_eq!(show(&c, "search_path").await, "app_s, public");
    assert_eq!(show(&c, "statement_timeout").await, "900ms");
    let sql_prepared = first_value(
        &c.simple_query(
            "SELECT string_agg(name, ',' ORDER BY name) FROM pg_prepared_statements WHERE from_sql",
        )
        .await
        .unwrap(),
    );
    assert_eq!(sql_prepared, "late");
    let channels = first_value(
        &c.simple_query("SELECT string_agg(c, ',') FROM pg_listening_channels() c")
            .await
            .unwrap(),
    );
    assert_eq!(channels, "late_channel");
    let one: i32 = c.query_one(&early, &[&1i32]).await.unwrap().get(0);
    let two: i32 = c.query_one(&late, &[&1i32]).await.unwrap().get(0);
    assert_eq!((one, two), (2, 3));
}

/// Replaying a session's state on its pre-warmed backend does not hold up
/// the session: here the replay waits for a lock on the target, and the
/// client's requests go on meanwhile; the move then uses the replayed state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_replay_does_not_hold_up_the_client() {
    let (_a, b, proxy, c) = pair_with_client().await;
    let h = &proxy.handle;
    let count = c.prepare("SELECT count(*) FROM app_s.items").await.unwrap();
    // On the target, parsing that statement waits for this lock.
    let locker = b.client("postgres").await;
    locker
        .batch_execute("BEGIN; LOCK TABLE app_s.items IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();

    let route = route_to(&b);
    assert_eq!(h.prewarm(route.clone()).await, 1);
    let waiting = || {
        b.psql(
            "postgres",
            "SELECT count(*) FROM pg_stat_activity WHERE usename = 'app' AND wait_event_type = 'Lock'",
        )
    };
    assert!(
        wait_until(Duration::from_secs(120), || waiting() == "1"),
        "the replay is not waiting for the lock"
    );
    for _ in 0..3 {
        // The replay waits as long as the lock is held: any bound shows
        // the client does not.
        let n: i64 = tokio::time::timeout(Duration::from_secs(60), c.query_one(&count, &[]))
            .await
            .expect("the client waited for the replay")
            .unwrap()
            .get(0);
        assert_eq!(n, 2);
    }
    assert_eq!(whoami(&c).await, "A");
    assert_eq!(waiting(), "1", "the replay finished early");

    locker.batch_execute("ROLLBACK").await.unwrap();
    assert!(h.wait_quiet(Duration::from_secs(120)).await);
    // (Briefly out while the session reads its state once more.)
    // Taken when seen: it may be out again a moment later.
    let mut seen = None;
    assert!(wait_until(Duration::from_secs(120), || {
        seen = h.sessions().sessions()[0].parked_backend();
        seen.is_some()
    }));
    let parked = seen.unwrap().1;
    h.gate().close();
    let (moved, dropped) = h.switch_to(route, Duration::from_secs(10)).await;
    assert_eq!((moved, dropped), (1, 0));
    h.gate().open();
    assert_eq!(backend_pid(&c).await, parked);
    assert_eq!(whoami(&c).await, "B");
    let n: i64 = c.query_one(&count, &[]).await.unwrap().get(0);
    assert_eq!(n, 2);
}

fn first_value(msgs: &[tokio_postgres::SimpleQueryMessage]) -> String {
    msgs.iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(String::from),
            _ => None,
        })
        .expect("a row")
}

/// Sends one simple query on a raw session and collects messages up to ReadyForQuery.
async fn raw_query(s: &mut tokio::net::TcpStream, sql: &str) -> Vec<(u8, Vec<u8>)> {
    let mut out = BytesMut::new();
    postgres_protocol::message::frontend::query(sql, &mut out).unwrap();
    s.write_all(&out).await.unwrap();
    let mut msgs = Vec::new();
    loop {
        let m = tokio::time::timeout(Duration::from_secs(10), read_msg(s))
            .await
            .expect("reply within 10s")
            .expect("connection open");
        let done = m.0 == b'Z';
        msgs.push(m);
        if done {
            return msgs;
        }
    }
}

fn cstrs(body: &[u8]) -> Vec<String> {
    body.split(|b| *b == 0)
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_and_parameter_status_follow_the_move() {
    let (a, b) = pair();
    a.psql("postgres", "ALTER DATABASE postgres SET TimeZone = 'UTC'");
    b.psql(
        "postgres",
        "ALTER DATABASE postgres SET TimeZone = 'Asia/Tokyo'",
    );
    let proxy = start_proxy_with(&a, "trust", "").await;
    let mut s = raw_session(proxy.port, APP_USER, "postgres").await;
    // The session ends up in LATIN1: its state must still move intact.
    raw_query(
        &mut s,
        r#"LISTEN plain; LISTEN "Mixed Case"; LISTEN "grüße"; SET DateStyle = 'German';
           SET client_encoding = 'LATIN1'; SET ROLE mover_role"#,
    )
    .await;

    proxy.handle.router().swap(route_to(&b));
    assert!(wait_until(Duration::from_secs(10), || proxy
        .handle
        .sessions()
        .snapshot()
        .iter()
        .all(|x| x.route == "target")));
    b.psql("postgres", r#"NOTIFY "Mixed Case", 'on the target'"#);

    // The moved session tells the client what differs, then the notification arrives.
    let mut status = Vec::new();
    let payload = loop {
        let (tag, body) = tokio::time::timeout(Duration::from_secs(10), read_msg(&mut s))
            .await
            .expect("notification within 10s")
            .expect("connection open");
        match tag {
            b'S' => status.push(cstrs(&body)[..2].join("=")),
            b'A' => break cstrs(&body[4..]),
            other => panic!("unexpected message {:?}", other as char),
        }
    };
    assert_eq!(payload[..2], ["Mixed Case", "on the target"]);
    assert!(
        status.contains(&"TimeZone=Asia/Tokyo".to_string()),
        "{status:?}"
    );
    // DateStyle and client_encoding were replayed: unchanged for the client.
    assert!(
        !status
            .iter()
            .any(|x| x.starts_with("DateStyle") || x.starts_with("client_encoding")),
        "{status:?}"
    );
    let r = raw_query(&mut s, "SELECT current_user").await;
    assert!(
        r.iter()
            .any(|(t, body)| *t == b'D' && body.ends_with(b"mover_role")),
        "SET ROLE was not replayed"
    );
    let r = raw_query(&mut s, "SELECT pg_listening_channels()").await;
    let mut channels: Vec<Vec<u8>> = r
        .iter()
        .filter(|(t, _)| *t == b'D')
        .map(|(_, body)| body[6..].to_vec())
        .collect();
    channels.sort();
    let latin1 = b"gr\xfc\xdfe".to_vec();
    assert_eq!(
        channels,
        vec![b"Mixed Case".to_vec(), latin1, b"plain".to_vec()]
    );
}

/// Reads up to EOF; returns the first ErrorResponse's (SQLSTATE, message).
async fn error_and_eof(s: &mut tokio::net::TcpStream) -> (String, String) {
    let mut err = None;
    while let Some((tag, body)) = tokio::time::timeout(Duration::from_secs(10), read_msg(s))
        .await
        .expect("closed within 10s")
    {
        if tag == b'E' && err.is_none() {
            let message = body
                .split(|b| *b == 0)
                .find_map(|f| f.strip_prefix(b"M"))
                .map(|m| String::from_utf8_lossy(m).into_owned())
                .unwrap_or_default();
            err = Some((sqlstate(&body), message));
        }
    }
    err.expect("an ErrorResponse before the close")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_that_cannot_move_get_a_clear_error_and_are_counted() {
    let (a, b) = pair();
    let proxy = start_proxy_with(&a, "trust", "").await;
    let h = &proxy.handle;
    let mut temp = raw_session(proxy.port, APP_USER, "postgres").await;
    raw_query(&mut temp, "CREATE TEMP TABLE scratch (x int)").await;
    let mut cursor = raw_session(proxy.port, APP_USER, "postgres").await;
    raw_query(
        &mut cursor,
        "DECLARE held CURSOR WITH HOLD FOR SELECT * FROM whoami",
    )
    .await;
    let mut lock = raw_session(proxy.port, APP_USER, "postgres").await;
    raw_query(&mut lock, "SELECT pg_advisory_lock(42)").await;
    let mut func = raw_session(proxy.port, APP_USER, "postgres").await;
    raw_query(
        &mut func,
        "CREATE FUNCTION pg_temp.scratch_fn() RETURNS int LANGUAGE sql AS 'SELECT 1'",
    )
    .await;
    // A session that dropped its temp table and released its lock moves fine.
    let mut fine = raw_session(proxy.port, APP_USER, "postgres").await;
    raw_query(
        &mut fine,
        "CREATE TEMP TABLE gone (x int); DROP TABLE gone;
         SELECT pg_advisory_lock(7); SELECT pg_advisory_unlock(7)",
    )
    .await;

    // A cutover that aborts closes what it pre-warmed.
    assert_eq!(h.prewarm(route_to(&b)).await, 5);
    let on_b = || {
        b.psql(
            "postgres",
            "SELECT count(*) FROM pg_stat_activity WHERE usename = 'app'",
        )
    };
    assert_eq!(on_b(), "5");
    assert_eq!(h.discard_prewarm(), 5);
    assert!(
        h.sessions()
            .sessions()
            .iter()
            .all(|s| s.parked_backend().is_none())
    );
    assert!(wait_until(Duration::from_secs(5), || on_b() == "0"));
    assert_eq!(
        metric(
            &proxy.ctx,
            "pgshift_proxy_prewarmed_backends_total",
            "discarded"
        ),
        5.0
    );

    // The switch itself then opens backends as it moves.
    h.gate().close();
    let (moved, dropped) = h.switch_to(route_to(&b), Duration::from_secs(10)).await;
    h.gate().open();
    assert_eq!((moved, dropped), (1, 4));
    assert_eq!(h.moves_failed(), 4);
    assert_eq!(
        metric(&proxy.ctx, "pgshift_proxy_session_moves_total", "dropped"),
        4.0
    );

    for (s, why) in [
        (&mut temp, "temporary tables"),
        (&mut cursor, "WITH HOLD cursors (held)"),
        (&mut lock, "session-level advisory locks"),
        (&mut func, "temporary functions"),
    ] {
        let (code, message) = error_and_eof(s).await;
        assert_eq!(code, "57P01", "{message}");
        assert!(message.contains(why), "{message}");
        assert!(message.contains("reconnect"), "{message}");
    }
    let r = raw_query(&mut fine, "SELECT v FROM whoami").await;
    assert!(r.iter().any(|(t, body)| *t == b'D' && body.ends_with(b"B")));
    // The source's session advisory lock went with the dropped session.
    assert!(wait_until(Duration::from_secs(5), || a.psql(
        "postgres",
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"
    ) == "0"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_prepared_runs_through_a_switch_without_failures() {
    let a = Cluster::start();
    let b = Cluster::start();
    for c in [&a, &b] {
        let out = std::process::Command::new(pg_program("pgbench"))
            .args(["-i", "-q", "-s", "1", "-h", "127.0.0.1", "-U", SUPERUSER])
            .arg("-p")
            .arg(c.port.to_string())
            .arg("postgres")
            .env("PGPASSWORD", SUPERUSER_PW)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let proxy = start_proxy(&a).await;
    let port = proxy.port;
    // pgbench runs until the checks are done (not for a fixed time: the
    // switch must find all four clients running however slow the machine).
    let mut bench = std::process::Command::new(pg_program("pgbench"))
        .args(["-M", "prepared", "-c", "4", "-j", "2", "-t", "10000000"])
        .args(["-h", "127.0.0.1", "-U", SUPERUSER, "-p"])
        .arg(port.to_string())
        .arg("postgres")
        .env("PGPASSWORD", SUPERUSER_PW)
        .env("PGSSLMODE", "disable")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let history = |c: &Cluster| -> i64 {
        c.psql("postgres", "SELECT count(*) FROM pgbench_history")
            .parse()
            .unwrap()
    };
    let h = &proxy.handle;
    assert!(
        wait_until(Duration::from_secs(120), || h.sessions().len() == 4
            && history(&a) >= 50),
        "pgbench clients connected and running"
    );
    assert_eq!(h.prewarm(route_to(&b)).await, 4);
    h.gate().close();
    tokio::time::timeout(Duration::from_secs(120), h.gate().drained())
        .await
        .expect("drained");
    let (moved, dropped) = h.switch_to(route_to(&b), Duration::from_secs(10)).await;
    h.gate().open();
    assert_eq!((moved, dropped), (4, 0));
    // Work continues on the target after the switch, then pgbench is stopped.
    assert!(
        wait_until(Duration::from_secs(120), || history(&b) >= 50),
        "no transaction ran on the target"
    );
    let _ = bench.kill();
    let out = bench.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("aborted") && !stderr.contains("ERROR"),
        "pgbench failed across the switch: {stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psycopg_prepared_writer_keeps_going_across_a_switch() {
    ensure_psycopg();
    let (a, b) = pair();
    for c in [&a, &b] {
        c.psql(
            "postgres",
            "CREATE TABLE ledger (id int PRIMARY KEY, note text); GRANT ALL ON ledger TO app",
        );
    }
    let proxy = start_proxy(&a).await;
    let dsn = format!(
        "host=127.0.0.1 port={} user={APP_USER} password={APP_PW} dbname=postgres sslmode=disable",
        proxy.port
    );
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/move_psycopg.py");
    // The client writes until told to stop, not for a fixed time.
    let stop_dir = tempfile::tempdir().unwrap();
    let stop = stop_dir.path().join("stop");
    let stop_arg = stop.to_string_lossy().into_owned();
    let client = tokio::task::spawn_blocking(move || {
        std::process::Command::new("python3")
            .args([script, &dsn, &stop_arg])
            .output()
            .unwrap()
    });
    let rows = |c: &Cluster| -> i64 {
        c.psql("postgres", "SELECT count(*) FROM ledger")
            .parse()
            .unwrap()
    };
    let h = &proxy.handle;
    assert!(wait_until(Duration::from_secs(120), || h.sessions().len()
        == 1
        && rows(&a) >= 20));
    assert_eq!(h.prewarm(route_to(&b)).await, 1);
    h.gate().close();
    tokio::time::timeout(Duration::from_secs(120), h.gate().drained())
        .await
        .expect("drained");
    assert_eq!(
        h.switch_to(route_to(&b), Duration::from_secs(10)).await,
        (1, 0)
    );
    h.gate().open();
    assert!(
        wait_until(Duration::from_secs(120), || rows(&b) >= 20),
        "the client does not write on the target"
    );
    std::fs::write(&stop, b"").unwrap();

    let out = client.await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(report["failed"], 0, "{report}");
    assert_eq!(report["server"], "B");
    assert_eq!(report["application_name"], "mover");
    assert!(report["prepared"].as_i64().unwrap() >= 2, "{report}");
    // Every id the client saw committed is on one side, never both.
    let ids = |c: &Cluster| -> Vec<i64> {
        let s = c.psql(
            "postgres",
            "SELECT string_agg(id::text, ',' ORDER BY id) FROM ledger",
        );
        s.split(',')
            .filter(|x| !x.is_empty())
            .map(|x| x.parse().unwrap())
            .collect()
    };
    let (on_a, on_b) = (ids(&a), ids(&b));
    assert!(!on_a.is_empty() && !on_b.is_empty(), "{on_a:?} {on_b:?}");
    let mut all: Vec<i64> = on_a.iter().chain(on_b.iter()).copied().collect();
    all.sort();
    let committed: Vec<i64> = report["committed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_i64().unwrap())
        .collect();
    assert_eq!(all, committed);
}

/// Sends `out` (ending in Sync) on a raw session and collects the replies up
/// to ReadyForQuery.
async fn raw_exchange(s: &mut tokio::net::TcpStream, out: &[u8]) -> Vec<(u8, Vec<u8>)> {
    s.write_all(out).await.unwrap();
    let mut msgs = Vec::new();
    loop {
        let m = tokio::time::timeout(Duration::from_secs(10), read_msg(s))
            .await
            .expect("reply within 10s")
            .expect("connection open");
        let done = m.0 == b'Z';
        msgs.push(m);
        if done {
            return msgs;
        }
    }
}

/// Parse of the unnamed statement (parameter types left to the server), Sync.
fn parse_unnamed(sql: &str) -> BytesMut {
    let mut out = BytesMut::new();
    postgres_protocol::message::frontend::parse("", sql, [], &mut out).unwrap();
    postgres_protocol::message::frontend::sync(&mut out);
    out
}

/// Bind of the unnamed statement with one text parameter, Execute, Sync
/// (what libpq's PQexecPrepared(conn, "", …) sends).
fn run_unnamed(param: &str) -> BytesMut {
    let mut body = BytesMut::new();
    body.extend_from_slice(b"\0\0"); // portal "", statement ""
    body.extend_from_slice(&0i16.to_be_bytes()); // parameters in text
    body.extend_from_slice(&1i16.to_be_bytes());
    body.extend_from_slice(&(param.len() as i32).to_be_bytes());
    body.extend_from_slice(param.as_bytes());
    body.extend_from_slice(&0i16.to_be_bytes()); // results in text
    let mut out = BytesMut::new();
    out.extend_from_slice(&pgshift::wire::messages::message(b'B', &body));
    postgres_protocol::message::frontend::execute("", 0, &mut out).unwrap();
    postgres_protocol::message::frontend::sync(&mut out);
    out
}

/// The single text value the unnamed statement returns for `param`; panics
/// on an ErrorResponse.
async fn unnamed_value(s: &mut tokio::net::TcpStream, param: &str) -> String {
    let replies = raw_exchange(s, &run_unnamed(param)).await;
    if let Some((_, body)) = replies.iter().find(|(t, _)| *t == b'E') {
        panic!(
            "the unnamed statement failed: {} {}",
            sqlstate(body),
            String::from_utf8_lossy(body)
        );
    }
    let (_, row) = replies.iter().find(|(t, _)| *t == b'D').expect("a DataRow");
    String::from_utf8_lossy(&row[6..]).into_owned()
}

/// A raw session that parsed the unnamed statement: its parameter type is
/// inferred as the enum `app_s.mood`, whose OID differs on the target.
async fn session_with_unnamed(proxy: &TestProxy) -> tokio::net::TcpStream {
    let mut s = raw_session(proxy.port, APP_USER, "postgres").await;
    let replies = raw_exchange(
        &mut s,
        &parse_unnamed("SELECT v || ':' || id FROM whoami, app_s.items WHERE m = $1"),
    )
    .await;
    let tags: Vec<u8> = replies.iter().map(|(t, _)| *t).collect();
    assert_eq!(tags, b"1Z", "Parse failed: {replies:?}");
    assert_eq!(unnamed_value(&mut s, "happy").await, "A:2");
    s
}

/// A client that parsed the unnamed statement on the source can Bind and
/// Execute it after its session moved: the move parses it again on the
/// target, with its parameter type resolved there by name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_unnamed_statement_moves_with_the_session() {
    let (a, b) = pair();
    let proxy = start_proxy_with(&a, "trust", "").await;
    let mut s = session_with_unnamed(&proxy).await;
    // A failed Parse drops the unnamed statement: nothing to carry, and the
    // session still moves.
    let mut dropped = session_with_unnamed(&proxy).await;
    let r = raw_exchange(&mut dropped, &parse_unnamed("SELECT no_such_column")).await;
    assert!(r.iter().any(|(t, _)| *t == b'E'));

    proxy.handle.router().swap(route_to(&b));
    assert!(wait_until(Duration::from_secs(10), || proxy
        .handle
        .sessions()
        .snapshot()
        .iter()
        .all(|x| x.route == "target")));
    assert_eq!(unnamed_value(&mut s, "happy").await, "B:2");
    assert_eq!(unnamed_value(&mut s, "sad").await, "B:1");
    // As on a server: there is no unnamed statement to bind.
    let r = raw_exchange(&mut dropped, &run_unnamed("happy")).await;
    let error = r.iter().find(|(t, _)| *t == b'E').expect("an error");
    assert_eq!(sqlstate(&error.1), "26000");
    assert_eq!(proxy.handle.moves_failed(), 0);
}

/// Staging reads the session's state on the source ahead of the switch:
/// the unnamed statement is still there afterwards for the client, and the
/// switch to the staged backend carries it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_unnamed_statement_survives_staging_and_a_prewarmed_switch() {
    let (a, b) = pair();
    let proxy = start_proxy_with(&a, "trust", "").await;
    let h = &proxy.handle;
    let mut s = session_with_unnamed(&proxy).await;

    let route = route_to(&b);
    assert_eq!(h.prewarm(route.clone()).await, 1);
    assert!(h.wait_quiet(Duration::from_secs(10)).await);
    // Staged: its state (with the unnamed statement) was read on the source.
    let parked = h.sessions().sessions()[0].parked_backend().unwrap().1;
    let replayed = b.psql(
        "postgres",
        &format!("SELECT query <> '' FROM pg_stat_activity WHERE pid = {parked}"),
    );
    assert_eq!(
        replayed, "t",
        "the state was not replayed ahead of the pause"
    );
    assert_eq!(unnamed_value(&mut s, "happy").await, "A:2");
    assert!(h.wait_quiet(Duration::from_secs(10)).await);

    h.gate().close();
    let (moved, dropped) = h.switch_to(route, Duration::from_secs(10)).await;
    h.gate().open();
    assert_eq!((moved, dropped), (1, 0));
    assert_eq!(unnamed_value(&mut s, "happy").await, "B:2");
}
