//! The proxy relays real client traffic: psql scripts with COPY and errors,
//! tokio-postgres (extended protocol, pipelining, LISTEN/NOTIFY, cancel),
//! 100 MB values, and pgbench in every query mode.

mod common;
mod proxy_common;
use common::*;
use proxy_common::*;

use std::time::Duration;

use futures_util::StreamExt;
use pgshift::wire::messages::TxStatus;

async fn psql_async(port: u16, db: &str, script: &str) -> (bool, String, String) {
    let (db, script) = (db.to_string(), script.to_string());
    tokio::task::spawn_blocking(move || psql_via(port, APP_USER, APP_PW, &db, &script))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_script_with_copy_and_errors_in_transactions() {
    let pg = Cluster::start();
    pg.create_db("shop");
    pg.psql("shop", "GRANT ALL ON DATABASE shop TO app");
    let proxy = start_proxy(&pg).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("in.tsv");
    std::fs::write(&file, "10\tten\n11\televen\n").unwrap();
    let script = format!(
        "CREATE TABLE t (id int PRIMARY KEY, v text);\n\
         COPY t FROM STDIN;\n1\tone\n2\ttwo\n3\t\\N\n\\.\n\
         \\copy t from '{}'\n\
         \\set ON_ERROR_STOP 0\n\
         BEGIN;\nINSERT INTO t VALUES (4, 'four');\nSELECT 1/0;\nSELECT 'still aborted';\nROLLBACK;\n\
         BEGIN;\nINSERT INTO t VALUES (5, 'five');\nSAVEPOINT s;\nINSERT INTO t VALUES (1, 'dup');\nROLLBACK TO s;\nCOMMIT;\n\
         \\set ON_ERROR_STOP 1\n\
         SELECT 'count=' || count(*) FROM t;\n\
         COPY (SELECT id, v FROM t ORDER BY id) TO STDOUT;\n\
         \\copy (SELECT 'copied-out') to stdout\n",
        file.display()
    );
    let (ok, out, err) = psql_async(proxy.port, "shop", &script).await;
    assert!(ok, "psql failed: {err}");
    assert!(err.contains("division by zero"), "{err}");
    assert!(err.contains("current transaction is aborted"), "{err}");
    assert!(err.contains("duplicate key"), "{err}");
    assert!(out.contains("count=6"), "{out}");
    assert!(
        out.contains("1\tone\n2\ttwo\n3\t\\N\n5\tfive\n10\tten\n11\televen\n"),
        "{out}"
    );
    assert!(out.contains("copied-out"), "{out}");
    assert_eq!(pg.psql("shop", "SELECT count(*) FROM t WHERE id = 4"), "0");
    // The session ended cleanly and the counters moved.
    assert!(wait_until(Duration::from_secs(120), || proxy
        .handle
        .sessions()
        .is_empty()));
    assert!(metric(&proxy.ctx, "pgshift_proxy_transactions_total", "") >= 5.0);
    assert!(metric(&proxy.ctx, "pgshift_proxy_queries_total", "") >= 10.0);
    assert!(metric(&proxy.ctx, "pgshift_proxy_bytes_total", "client_to_server") > 100.0);
    assert!(metric(&proxy.ctx, "pgshift_proxy_bytes_total", "server_to_client") > 100.0);
    assert_eq!(
        metric(&proxy.ctx, "pgshift_proxy_client_connections", ""),
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokio_postgres_extended_pipelining_notify_and_cancel() {
    let pg = Cluster::start();
    let proxy = start_proxy(&pg).await;
    let url = format!(
        "{}&application_name=relaytest&options=-c%20search_path%3Dpublic%2Cpg_catalog",
        proxy.url("postgres")
    );
    let c = connect(&url).await;
    // Startup parameters reach the server.
    let row = c
        .query_one(
            "SELECT current_setting('application_name'), current_setting('search_path')",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "relaytest");
    assert_eq!(row.get::<_, String>(1), "public,pg_catalog");

    // Extended protocol with a prepared statement, and a pipeline of 100 queries.
    let stmt = c.prepare("SELECT $1::int * 2").await.unwrap();
    let futs = (0..100).map(|i| {
        let c = &c;
        let stmt = &stmt;
        async move { c.query_one(stmt, &[&i]).await.unwrap().get::<_, i32>(0) }
    });
    let got: Vec<i32> = futures_util::future::join_all(futs).await;
    assert_eq!(got, (0..100).map(|i| i * 2).collect::<Vec<_>>());

    // Transaction state is tracked from ReadyForQuery.
    c.batch_execute("CREATE TABLE k (id int PRIMARY KEY); BEGIN; INSERT INTO k VALUES (1)")
        .await
        .unwrap();
    let sessions = proxy.handle.sessions().snapshot();
    assert_eq!(sessions.len(), 1);
    assert_eq!(sessions[0].tx_status, TxStatus::InTransaction);
    assert_eq!(sessions[0].application_name, "relaytest");
    assert_eq!(proxy.handle.gate().sessions_in_transaction(), 1);
    let e = c
        .execute("INSERT INTO k VALUES (1)", &[])
        .await
        .unwrap_err();
    assert_eq!(e.code().unwrap().code(), "23505");
    // The client may see the error before the proxy has read ReadyForQuery.
    assert!(wait_until(Duration::from_secs(120), || proxy
        .handle
        .sessions()
        .snapshot()[0]
        .tx_status
        == TxStatus::Failed));
    c.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(proxy.handle.gate().sessions_in_transaction(), 0);
    assert_eq!(
        proxy.handle.sessions().snapshot()[0].tx_status,
        TxStatus::Idle
    );

    // LISTEN/NOTIFY: the notification arrives while the listener is idle.
    let (listener, mut conn) =
        tokio_postgres::connect(&proxy.url("postgres"), tokio_postgres::NoTls)
            .await
            .unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
        while let Some(Ok(m)) = messages.next().await {
            if let tokio_postgres::AsyncMessage::Notification(n) = m {
                let _ = tx.send((n.channel().to_string(), n.payload().to_string()));
            }
        }
    });
    listener.batch_execute("LISTEN chan").await.unwrap();
    c.batch_execute("NOTIFY chan, 'hello'").await.unwrap();
    let n = tokio::time::timeout(Duration::from_secs(120), rx.recv())
        .await
        .expect("no notification")
        .unwrap();
    assert_eq!(n, ("chan".to_string(), "hello".to_string()));

    // Cancel: the proxy-issued key reaches the real backend (sent once the
    // query runs there).
    let token = c.cancel_token();
    let started = std::time::Instant::now();
    let watcher = pg.client("postgres").await;
    let canceller = tokio::spawn(async move {
        wait_running(&watcher, "SELECT pg_sleep(30)").await;
        token.cancel_query(tokio_postgres::NoTls).await.unwrap();
    });
    let e = c.simple_query("SELECT pg_sleep(30)").await.unwrap_err();
    canceller.await.unwrap();
    assert_eq!(e.code().unwrap().code(), "57014", "{e}");
    // Cancelled, not run to its end.
    assert!(started.elapsed() < Duration::from_secs(30));
    // The session works after the cancel. (The postmaster signals a
    // cancelled backend twice — its pid and its process group — so on a
    // loaded machine the second signal can still hit the next statement.)
    let mut one = c.query_one("SELECT 1", &[]).await;
    if one
        .as_ref()
        .is_err_and(|e| e.code().map(|c| c.code()) == Some("57014"))
    {
        one = c.query_one("SELECT 1", &[]).await;
    }
    assert_eq!(one.unwrap().get::<_, i32>(0), 1);
    // Statement timeouts work through the proxy.
    c.batch_execute("SET statement_timeout = '200ms'")
        .await
        .unwrap();
    let e = c.simple_query("SELECT pg_sleep(5)").await.unwrap_err();
    assert_eq!(e.code().unwrap().code(), "57014", "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_megabyte_values_round_trip() {
    let pg = Cluster::start();
    let proxy = start_proxy(&pg).await;
    let c = connect(&proxy.url("postgres")).await;
    c.batch_execute("CREATE TABLE big (v text)").await.unwrap();
    let size = 100 * 1024 * 1024;
    let value: String = "0123456789abcdef".repeat(size / 16);
    c.execute("INSERT INTO big VALUES ($1)", &[&value])
        .await
        .unwrap();
    let row = c
        .query_one("SELECT length(v), md5(v) FROM big", &[])
        .await
        .unwrap();
    let expected_md5 = pg.psql(
        "postgres",
        &format!("SELECT md5(repeat('0123456789abcdef', {}))", size / 16),
    );
    assert_eq!(row.get::<_, i32>(0) as usize, size);
    assert_eq!(row.get::<_, String>(1), expected_md5);
    drop(value);
    let back: String = c.query_one("SELECT v FROM big", &[]).await.unwrap().get(0);
    assert_eq!(back.len(), size);
    assert!(back.starts_with("0123456789abcdef0123"));
}

fn pgbench(args: &[&str], port: u16, user: &str, pw: &str) -> String {
    let out = std::process::Command::new(pg_program("pgbench"))
        .args(args)
        .arg("-h")
        .arg("127.0.0.1")
        .arg("-p")
        .arg(port.to_string())
        .arg("-U")
        .arg(user)
        .env("PGPASSWORD", pw)
        .env("PGSSLMODE", "disable")
        .output()
        .expect("run pgbench");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "pgbench {args:?} failed:\n{text}");
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_all_query_modes() {
    let pg = Cluster::start();
    pg.create_db("bench");
    let proxy = start_proxy(&pg).await;
    let port = proxy.port;
    tokio::task::spawn_blocking(move || {
        pgbench(
            &["-i", "-q", "-s", "1", "bench"],
            port,
            SUPERUSER,
            SUPERUSER_PW,
        );
        for mode in ["simple", "extended", "prepared"] {
            for select_only in [true, false] {
                let mut args = vec!["-M", mode, "-c", "4", "-j", "2", "-t", "150", "-n"];
                if select_only {
                    args.push("-S");
                }
                args.push("bench");
                let out = pgbench(&args, port, SUPERUSER, SUPERUSER_PW);
                assert!(
                    out.contains("number of transactions actually processed: 600/600"),
                    "{mode} select_only={select_only}:\n{out}"
                );
                assert!(
                    !out.contains("number of failed transactions")
                        || out.contains("number of failed transactions: 0 "),
                    "{out}"
                );
            }
        }
    })
    .await
    .unwrap();
    assert!(metric(&proxy.ctx, "pgshift_proxy_transactions_total", "") >= 3600.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_ctrl_c_cancels_through_the_proxy() {
    let pg = Cluster::start();
    let proxy = start_proxy(&pg).await;
    let port = proxy.port;
    let watcher = pg.client("postgres").await;
    let started = std::time::Instant::now();
    let child = std::process::Command::new(pg_program("psql"))
        .args(["-X", "-h", "127.0.0.1", "-U", APP_USER, "-d", "postgres"])
        .arg("-p")
        .arg(port.to_string())
        .args(["-c", "SELECT pg_sleep(30)"])
        .env("PGPASSWORD", APP_PW)
        .env("PGSSLMODE", "disable")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Once psql's query runs on the server, press Ctrl-C.
    wait_running(&watcher, "SELECT pg_sleep(30)").await;
    let (elapsed, stderr) = tokio::task::spawn_blocking(move || {
        let st = std::process::Command::new("kill")
            .arg("-INT")
            .arg(child.id().to_string())
            .status()
            .unwrap();
        assert!(st.success());
        let out = child.wait_with_output().unwrap();
        (
            started.elapsed(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    })
    .await
    .unwrap();
    assert!(
        stderr.contains("canceling statement due to user request"),
        "{stderr}"
    );
    // Cancelled, not run to its end.
    assert!(elapsed < Duration::from_secs(30), "{elapsed:?}");
}

/// Each direction of a session's relay progresses on its own (issue 16):
/// a client streams a COPY IN and reads nothing until it has sent all of
/// it, while the server sends a 2 kB NOTICE per 100-byte row. A relay that
/// waits for the server to take a client chunk before it forwards the
/// server's messages stalls here: while it waits, the server produces 20×
/// that chunk in NOTICEs, blocks writing them once the sockets between them
/// are full, and stops reading. (The relay before this test stalled at
/// 50,000 rows and got through 20,000.) The client's receive buffer is made
/// large enough for every NOTICE (about 125 MB), so a direct connection
/// would not stall either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_in_while_the_server_floods_notices_does_not_stall() {
    use std::os::fd::AsRawFd;
    use tokio::io::AsyncWriteExt;
    const ROWS: usize = 60_000;
    const PAD: usize = 100;
    const NOTICE: usize = 2_000;
    let pg = Cluster::start();
    pg.psql(
        "postgres",
        &format!(
            "CREATE TABLE noisy (id int, pad text);
             CREATE FUNCTION shout() RETURNS trigger LANGUAGE plpgsql AS
               $$ BEGIN RAISE NOTICE 'row % {}', NEW.id; RETURN NEW; END $$;
             CREATE TRIGGER shout BEFORE INSERT ON noisy FOR EACH ROW EXECUTE FUNCTION shout();",
            "n".repeat(NOTICE)
        ),
    );
    let proxy = start_proxy_with(&pg, "trust", "").await;

    // The client's receive buffer holds every NOTICE it does not read yet:
    // SO_RCVBUFFORCE, past net.core.rmem_max (needs CAP_NET_ADMIN).
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    let size: libc::c_int = 256 << 20;
    // SAFETY: a valid socket and a c_int option value of the right length.
    let r = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(
        r,
        0,
        "SO_RCVBUFFORCE: {} (the test needs CAP_NET_ADMIN)",
        std::io::Error::last_os_error()
    );
    let mut s = sock
        .connect(format!("127.0.0.1:{}", proxy.port).parse().unwrap())
        .await
        .unwrap();
    let params = vec![
        ("user".to_string(), SUPERUSER.to_string()),
        ("database".to_string(), "postgres".to_string()),
    ];
    s.write_all(&pgshift::wire::messages::startup_message(&params))
        .await
        .unwrap();
    while let Some((tag, body)) = read_msg(&mut s).await {
        assert_ne!(tag, b'E', "{}", String::from_utf8_lossy(&body));
        if tag == b'Z' {
            break;
        }
    }

    let run = async move {
        use pgshift::wire::messages::message;
        // Everything first: the query, every row, CopyDone — no reads.
        s.write_all(&message(b'Q', b"COPY noisy FROM STDIN\0"))
            .await
            .unwrap();
        let pad = "x".repeat(PAD);
        let mut chunk = Vec::new();
        for i in 0..ROWS {
            chunk.extend_from_slice(&message(b'd', format!("{i}\t{pad}\n").as_bytes()));
            if chunk.len() > 256 * 1024 {
                s.write_all(&chunk).await.unwrap();
                chunk.clear();
            }
        }
        chunk.extend_from_slice(&message(b'c', b""));
        s.write_all(&chunk).await.unwrap();
        // Then everything the server said.
        let (mut notices, mut done) = (0usize, String::new());
        while let Some((tag, body)) = read_msg(&mut s).await {
            match tag {
                b'N' => notices += 1,
                b'C' => done = String::from_utf8_lossy(&body).trim_end_matches('\0').into(),
                b'E' => panic!("COPY failed: {}", String::from_utf8_lossy(&body)),
                b'Z' => break,
                _ => {}
            }
        }
        (notices, done)
    };
    // A failsafe only: the relay either stalls for good or finishes.
    let (notices, done) = tokio::time::timeout(Duration::from_secs(300), run)
        .await
        .expect("the relay stalled: COPY data and NOTICEs wait on each other");
    assert_eq!(notices, ROWS);
    assert_eq!(done, format!("COPY {ROWS}"));
    assert_eq!(
        pg.psql("postgres", "SELECT count(*) FROM noisy"),
        ROWS.to_string()
    );
}
