//! Cutover abort paths through the real binary: a transaction held past
//! drain_timeout (abort, or cancel it), a target that stops applying
//! (catchup_timeout), cancel before the point of no return, 409 and 401.

mod common;
mod cutover_common;
use common::*;
use cutover_common::*;

use std::time::Duration;

use pgshift::admin::client::ClientError;

/// A session through the proxy that LISTENs on `channel`: the client (keep
/// it alive) and the payloads it receives.
async fn listen(
    url: &str,
    channel: &str,
) -> (
    tokio_postgres::Client,
    tokio::sync::mpsc::UnboundedReceiver<String>,
) {
    use futures_util::StreamExt;
    let (client, mut conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
        while let Some(Ok(m)) = messages.next().await {
            if let tokio_postgres::AsyncMessage::Notification(n) = m {
                let _ = tx.send(n.payload().to_string());
            }
        }
    });
    client
        .batch_execute(&format!("LISTEN {channel}"))
        .await
        .unwrap();
    (client, rx)
}

/// Checks that clients of the proxy are on the source, which is writable.
async fn assert_on_unfenced_source(pair: &Pair, shift: &Pgshift) {
    assert!(!Pair::fenced(&pair.source), "fence still up on the source");
    let (id, port) = write_one(&shift.url(DB), "after abort").await.unwrap();
    assert_eq!(
        port as u16, pair.source.port,
        "write after abort not on source"
    );
    assert!(Pair::ledger_ids(&pair.source).contains(&id));
    // A fresh session directly on the source is read-write too.
    assert_eq!(
        pair.source.psql(DB, "SHOW default_transaction_read_only"),
        "off"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_transaction_aborts_then_second_cutover_succeeds() {
    let pair = Pair::start();
    // Long enough for the writer's in-flight insert to finish on a loaded
    // machine (the second attempt); the held transaction never does.
    let shift = pair.launch("", "drain_timeout = \"5s\"\ncatchup_timeout = \"20s\"", &[]);
    shift.wait_streaming_async(DB).await;

    // A session through the proxy, inside a transaction, idle.
    let held = connect(&shift.url(DB)).await;
    held.batch_execute("BEGIN; INSERT INTO ledger (client, note) VALUES ('held', 'open tx')")
        .await
        .unwrap();
    let writer = Writer::start(&shift.url(DB), "w1").await;
    let (_listener, mut notes) = listen(&shift.url(DB), "cutover_news").await;
    writer.wait_committed(3).await;

    let out = shift.cli_async(&["cutover", "--wait"]).await;
    let text = out_text(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("drain"), "{text}");
    assert!(text.contains("cutover aborted"), "{text}");

    let doc = shift.status_async().await.unwrap();
    assert_eq!(doc["state"], "WaitingForUserAction", "{doc:#}");
    assert_eq!(doc["substate"], "WaitingForCutoverTrigger", "{doc:#}");
    let last = &doc["last_cutover"];
    assert_eq!(last["outcome"], "aborted", "{last:#}");
    assert!(
        last["reason"].as_str().unwrap().contains("drain_timeout"),
        "{last:#}"
    );
    assert_on_unfenced_source(&pair, &shift).await;

    // The held transaction was never harmed: it commits on the source.
    held.batch_execute("COMMIT").await.unwrap();
    let held_id: i64 = pair
        .source
        .psql(DB, "SELECT id FROM ledger WHERE client = 'held'")
        .parse()
        .unwrap();
    // The writer kept writing through the pause without an error.
    writer.wait_more(3).await;

    // Second attempt, nothing holds it: it succeeds.
    let out = shift.cli_async(&["cutover", "--wait"]).await;
    let text = out_text(&out);
    assert_eq!(out.status.code(), Some(0), "{text}\n{}", shift.log());
    for phase in ["gate", "drain", "fence", "marker", "sequences", "switch"] {
        assert!(text.contains(phase), "{phase} not printed: {text}");
    }
    assert!(text.contains("cutover succeeded"), "{text}");
    // Writes after the switch (checked below to have landed on the target).
    writer.wait_more(3).await;
    let w = writer.finish().await;
    assert!(w.errors.is_empty(), "writer errors: {:?}", w.errors);
    assert!(w.committed.iter().any(|c| c.1 as u16 == pair.source.port));
    assert!(w.committed.iter().any(|c| c.1 as u16 == pair.target.port));

    // Everything acknowledged is on the target, the held row included.
    let on_target = Pair::ledger_ids(&pair.target);
    assert!(on_target.contains(&held_id));
    for (id, _) in &w.committed {
        assert!(on_target.contains(id), "id {id} lost");
    }
    // The held session itself moved: its next query runs on the target.
    let port: i32 = held
        .query_one("SELECT inet_server_port()", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(port as u16, pair.target.port);

    // The LISTEN session moved too: a NOTIFY sent on the target reaches it.
    pair.target
        .psql(DB, "NOTIFY cutover_news, 'hello from the target'");
    let note = tokio::time::timeout(Duration::from_secs(120), notes.recv())
        .await
        .expect("no notification after the switch");
    assert_eq!(note.as_deref(), Some("hello from the target"));

    // Not in WaitingForCutoverTrigger any more: 409.
    match shift.admin().post("/cutover").await {
        Err(ClientError::Refused { status: 409, .. }) => {}
        other => panic!("expected 409, got {other:?}"),
    }
    let status = shift.cli_async(&["status"]).await;
    let st = out_text(&status);
    assert!(status.status.success(), "{st}");
    assert!(st.contains("Succeeded"), "{st}");
    assert!(st.contains("switch") && st.contains("marker"), "{st}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_drain_timeout_cancel_closes_the_held_session() {
    let pair = Pair::start();
    let shift = pair.launch(
        "",
        "drain_timeout = \"1s\"\non_drain_timeout = \"cancel\"",
        &[],
    );
    shift.wait_streaming_async(DB).await;
    // Keep the connection's own result: the ErrorResponse that closes it.
    let (held, conn) = tokio_postgres::connect(&shift.url(DB), tokio_postgres::NoTls)
        .await
        .unwrap();
    let conn = tokio::spawn(conn);
    held.batch_execute("BEGIN; INSERT INTO ledger (client, note) VALUES ('held', 'doomed')")
        .await
        .unwrap();
    let writer = Writer::start(&shift.url(DB), "w").await;

    let out = shift.cli_async(&["cutover", "--wait"]).await;
    let text = out_text(&out);
    assert_eq!(out.status.code(), Some(0), "{text}\n{}", shift.log());
    let last = shift.last_cutover_async().await;
    assert!(detail(&last, "drain").contains("terminated 1"), "{last:#}");

    // The held session was closed with a clear error; its insert never committed.
    assert!(held.batch_execute("COMMIT").await.is_err());
    let closed = tokio::time::timeout(Duration::from_secs(120), conn)
        .await
        .expect("held connection not closed")
        .unwrap();
    let err = closed.expect_err("connection must end with an error");
    let msg = pgshift::db::describe(&err);
    assert!(msg.contains("pgshift cutover"), "unexpected: {msg}");
    assert_eq!(
        pair.target
            .psql(DB, "SELECT count(*) FROM ledger WHERE client = 'held'"),
        "0"
    );
    let w = writer.finish().await;
    assert!(w.errors.is_empty(), "writer errors: {:?}", w.errors);
    let on_target = Pair::ledger_ids(&pair.target);
    for (id, _) in &w.committed {
        assert!(on_target.contains(id), "id {id} lost");
    }
}

/// The connection that put the fence up breaks while the marker is
/// awaited: the abort lifts the fence on a new connection, so clients get a
/// writable source back (not one left read-only).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_lifts_the_fence_on_a_new_connection_when_the_first_broke() {
    // Apply is blocked once the pre-gate catch-up is done, so the marker
    // in the pause waits.
    // catchup_timeout is the window in which the test must find and break
    // the fence's connection: long enough for a loaded machine.
    let (pair, shift, held) = streaming_held_after_catchup("catchup_timeout = \"10s\"").await;
    let cutover = shift.cli_async(&["cutover", "--wait"]);
    let block_apply_after_catchup = held.block_apply(&pair, &shift, async {
        write_one(&shift.url(DB), "before").await.unwrap();
    });

    let watcher = pair.source.client("postgres").await;
    let break_fence_connection = async {
        // The connection that ran the fence (and then its check), idle while
        // the marker is awaited.
        shift
            .wait_phase_async("fence", Duration::from_secs(120))
            .await;
        // Its last query is the fence's, or the fence check's count of
        // sessions left.
        let sql = "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
                   WHERE (query LIKE '%pg_terminate_backend(pid%'
                          OR query LIKE '%string_agg(DISTINCT usename%')
                     AND state = 'idle' AND pid <> pg_backend_pid()";
        let start = std::time::Instant::now();
        while start.elapsed() < Duration::from_secs(120) {
            let n: i64 = watcher.query_one(sql, &[]).await.unwrap().get(0);
            if n > 0 {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        false
    };
    let (out, (blocker, broke)) = tokio::join!(cutover, async {
        let blocker = block_apply_after_catchup.await;
        (blocker, break_fence_connection.await)
    });
    assert!(broke, "never saw the fence's connection");
    assert_eq!(out.status.code(), Some(1), "{}", out_text(&out));
    let last = shift.last_cutover_async().await;
    assert_eq!(last["outcome"], "aborted", "{last:#}");
    assert!(
        detail(&last, "abort").starts_with("fence lifted on a new connection"),
        "{last:#}"
    );
    assert_on_unfenced_source(&pair, &shift).await;
    blocker.batch_execute("ROLLBACK").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_that_stops_applying_aborts_on_catchup_timeout() {
    // Apply blocks behind a lock a test session holds on the target.
    let (pair, shift, blocker) =
        streaming_with_apply_blocked("catchup_timeout = \"2s\"\npregate_catchup_timeout = \"2s\"")
            .await;
    // A larger transaction held back too: it must arrive once apply can go on.
    pair.source.psql(
        DB,
        "INSERT INTO ledger (client, note) SELECT 'bulk', repeat('x', 200) FROM generate_series(1, 2000)",
    );
    let writer = Writer::start(&shift.url(DB), "w").await;
    writer.wait_committed(3).await;

    let out = shift.cli_async(&["cutover", "--wait"]).await;
    let text = out_text(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    let last = shift.last_cutover_async().await;
    assert_eq!(last["outcome"], "aborted");
    assert!(
        last["reason"]
            .as_str()
            .unwrap()
            .contains("did not catch up"),
        "{last:#}"
    );
    // Apply could not catch up before the gate: the attempt ended there,
    // and no client was paused.
    assert_eq!(phase(&last, "catchup")["outcome"], "failed", "{last:#}");
    assert!(last["pause_seconds"].is_null(), "{last:#}");
    assert!(
        last["reason"]
            .as_str()
            .unwrap()
            .contains("clients were not paused"),
        "{last:#}"
    );
    let doc = shift
        .wait_substate_async(
            "WaitingForUserAction",
            "WaitingForCutoverTrigger",
            Duration::from_secs(120),
        )
        .await;
    assert!(
        doc["reason"].as_str().unwrap_or("").contains("catch up"),
        "{doc:#}"
    );
    assert_on_unfenced_source(&pair, &shift).await;
    // The writer goes on on the unfenced source.
    writer.wait_more(3).await;

    // Apply resumes once the lock goes; a new cutover then succeeds.
    blocker.batch_execute("ROLLBACK").await.unwrap();
    // Let apply work off the backlog first (catchup_timeout is short).
    let latest = *Pair::ledger_ids(&pair.source).last().unwrap();
    assert!(wait_until(Duration::from_secs(120), || {
        Pair::ledger_ids(&pair.target).contains(&latest)
    }));
    let out = shift.cli_async(&["cutover", "--wait"]).await;
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}\n{}",
        out_text(&out),
        shift.log()
    );
    let w = writer.finish().await;
    assert!(w.errors.is_empty(), "writer errors: {:?}", w.errors);
    let on_target = Pair::ledger_ids(&pair.target);
    for (id, _) in &w.committed {
        assert!(on_target.contains(id), "id {id} lost");
    }
    assert_eq!(
        pair.target
            .psql(DB, "SELECT count(*) FROM ledger WHERE client = 'bulk'"),
        "2000"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_with_token_releases_the_source() {
    let pair = Pair::start();
    let shift = pair.launch("token = \"s3cret-token-0123456789\"", "", &[]);
    shift.wait_streaming_async(DB).await;
    assert_eq!(
        pair.source
            .psql(DB, "SELECT count(*) FROM pg_replication_slots"),
        "1"
    );

    // POST without or with a wrong token: 401; GET /status stays open.
    for token in [None, Some("wrong")] {
        match shift.admin_with(token).post("/cutover").await {
            Err(ClientError::Refused { status: 401, .. }) => {}
            other => panic!("expected 401 for {token:?}, got {other:?}"),
        }
        match shift.admin_with(token).post("/cancel").await {
            Err(ClientError::Refused { status: 401, .. }) => {}
            other => panic!("expected 401 for {token:?}, got {other:?}"),
        }
    }
    assert!(shift.admin_with(None).get("/status").await.is_ok());
    let out = shift.cli_async(&["cancel", "--token", "wrong"]).await;
    assert!(!out.status.success(), "{}", out_text(&out));

    // The CLI takes the token from the config.
    let out = shift.cli_async(&["cancel"]).await;
    let text = out_text(&out);
    assert!(out.status.success(), "{text}");
    assert!(text.to_lowercase().contains("slot"), "{text}");
    let doc = shift.status_async().await.unwrap();
    assert_eq!(doc["state"], "Canceled", "{doc:#}");
    assert_eq!(
        pair.source
            .psql(DB, "SELECT count(*) FROM pg_replication_slots"),
        "0"
    );
    assert_eq!(
        pair.source.psql(DB, "SELECT count(*) FROM pg_publication"),
        "0"
    );
    // Clients keep working on the source, unfenced; the target is left as is.
    assert_on_unfenced_source(&pair, &shift).await;
    assert!(!Pair::ledger_ids(&pair.target).is_empty());
    // Canceled: no cutover any more.
    match shift.admin().post("/cutover").await {
        Err(ClientError::Refused { status: 409, .. }) => {}
        other => panic!("expected 409, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_start_one_attempt_and_cancel_waits() {
    let pair = Pair::start();
    // The attempt holds after pre-warming until `release` exists, so the
    // cancel below meets it running however slow the machine is.
    let dir = tempfile::tempdir().unwrap();
    let release = dir.path().join("release");
    let failpoint = format!("hold:prewarm:{}", release.display());
    let shift = pair.launch(
        "",
        "drain_timeout = \"2s\"",
        &[("PGSHIFT_FAILPOINT", failpoint.as_str())],
    );
    shift.wait_streaming_async(DB).await;
    let held = connect(&shift.url(DB)).await;
    held.batch_execute("BEGIN; SELECT 1").await.unwrap();

    // Two requests at once: one attempt starts, the other is refused.
    let (c1, c2) = (shift.admin(), shift.admin());
    let (a, b) = tokio::join!(c1.post("/cutover"), c2.post("/cutover"));
    let refused = [&a, &b]
        .iter()
        .filter(|r| matches!(r, Err(ClientError::Refused { status: 409, .. })))
        .count();
    assert_eq!(refused, 1, "{a:?} {b:?}");
    assert!(a.is_ok() || b.is_ok(), "{a:?} {b:?}");
    // Cancel while it runs: refused, the attempt goes on.
    match shift.admin().post("/cancel").await {
        Err(ClientError::Refused {
            status: 409,
            message,
        }) => {
            assert!(message.contains("cutover"), "{message}")
        }
        other => panic!("expected 409, got {other:?}"),
    }
    std::fs::write(&release, b"go").unwrap();
    let ok = wait_until(Duration::from_secs(120), || {
        pair.target.psql(
            "postgres",
            "SELECT count(*) FROM pgshift.cutover_attempt WHERE outcome = 'aborted'",
        ) == "1"
    });
    assert!(ok, "{}", shift.log());
    assert_eq!(
        pair.target
            .psql("postgres", "SELECT count(*) FROM pgshift.cutover_attempt"),
        "1"
    );
    held.batch_execute("COMMIT").await.unwrap();
    shift
        .wait_substate_async(
            "WaitingForUserAction",
            "WaitingForCutoverTrigger",
            Duration::from_secs(120),
        )
        .await;
    // Once it has finished, cancel is accepted.
    let out = shift.cli_async(&["cancel"]).await;
    assert!(out.status.success(), "{}", out_text(&out));
    assert_on_unfenced_source(&pair, &shift).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_statement_is_drained_and_bypassing_sessions_are_fenced() {
    let pair = Pair::start();
    let shift = pair.launch("", "drain_timeout = \"10s\"", &[]);
    shift.wait_streaming_async(DB).await;
    // A session straight on the source, not through the proxy.
    let bypass = connect(&pair.source.url_as(APP_USER, APP_PW, DB)).await;
    bypass.simple_query("SELECT 1").await.unwrap();

    // An autocommit statement still running when the gate closes: the drain
    // waits for it, so its row commits before the fence and the marker. It
    // waits for an advisory lock that a transaction through the proxy holds
    // until the gate is closed, so it runs into the pause however slow the
    // machine is.
    let holder = connect(&shift.url(DB)).await;
    holder
        .batch_execute("BEGIN; SELECT pg_advisory_xact_lock(4242)")
        .await
        .unwrap();
    let slow = connect(&shift.url(DB)).await;
    let slow_task = tokio::spawn(async move {
        slow.query_one(
            "INSERT INTO ledger (client, note) SELECT 'slow', 'x' FROM (SELECT pg_advisory_xact_lock(4242)) l RETURNING id",
            &[],
        )
        .await
        .map(|r| r.get::<_, i64>(0))
    });
    let cutover = shift.cli_async(&["cutover", "--wait"]);
    let release_after_gate = async {
        shift
            .wait_phase_async("gate", Duration::from_secs(120))
            .await;
        // Both sessions are still inside their statements or transactions.
        holder.batch_execute("COMMIT").await.unwrap();
    };
    let (out, ()) = tokio::join!(cutover, release_after_gate);
    assert_eq!(out.status.code(), Some(0), "{}", out_text(&out));
    let id = slow_task.await.unwrap().expect("slow insert committed");
    assert!(
        Pair::ledger_ids(&pair.target).contains(&id),
        "slow row lost"
    );
    let last = shift.last_cutover_async().await;
    let drain = phase(&last, "drain");
    assert!(drain["seconds"].as_f64().unwrap() > 0.0, "{last:#}");
    assert!(
        drain["outcome"] == "ok" && last["outcome"] == "succeeded",
        "{last:#}"
    );

    // Announced before the pause, then terminated; a new one cannot write.
    assert!(
        detail(&last, "prepare").starts_with("1 session(s) bypass the proxy"),
        "{last:#}"
    );
    assert!(
        detail(&last, "fence").starts_with("terminated 1 session"),
        "{last:#}"
    );
    assert!(bypass.simple_query("SELECT 1").await.is_err());
    // The application role can no longer log in to the source.
    let err = tokio_postgres::connect(
        &pair.source.url_as(APP_USER, APP_PW, DB),
        tokio_postgres::NoTls,
    )
    .await
    .err()
    .expect("the application role logged in to the fenced source");
    assert!(
        pgshift::db::describe(&err).contains("not permitted to log in"),
        "{}",
        pgshift::db::describe(&err)
    );
}
