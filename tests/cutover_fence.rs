//! The fence through the real binary: after a cutover no direct session can
//! commit on the source whatever it overrides; an abort gives every role its
//! LOGIN and every database its setting back exactly; the fence check stops
//! a cutover whose fence does not hold.

mod common;
mod cutover_common;
use common::*;
use cutover_common::*;

/// Every role's LOGIN and every database-level setting on `c`.
fn logins_and_settings(c: &Cluster) -> (String, String) {
    (
        c.psql(
            "postgres",
            "SELECT string_agg(rolname || '=' || rolcanlogin, ',' ORDER BY rolname) FROM pg_roles",
        ),
        c.psql(
            "postgres",
            "SELECT string_agg(coalesce(d.datname, '-') || ':' || s.setrole || ':' || array_to_string(s.setconfig, ';'), ',' ORDER BY d.datname, s.setrole)
             FROM pg_db_role_setting s LEFT JOIN pg_database d ON d.oid = s.setdatabase",
        ),
    )
}

/// The ways a session can turn `default_transaction_read_only` off, as SQL
/// that ends by committing a ledger row.
const OVERRIDES: [(&str, &str); 3] = [
    (
        "SET default_transaction_read_only",
        "SET default_transaction_read_only = off; INSERT INTO ledger (client) VALUES ('direct')",
    ),
    (
        "BEGIN READ WRITE",
        "BEGIN READ WRITE; INSERT INTO ledger (client) VALUES ('direct'); COMMIT",
    ),
    (
        "SET SESSION CHARACTERISTICS",
        "SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE; INSERT INTO ledger (client) VALUES ('direct')",
    ),
];

/// Runs `sql` on a new direct connection to the source as the application
/// role; the error if any.
async fn direct(pair: &Pair, db: &str, sql: &str) -> Result<(), String> {
    direct_on(&pair.source, db, sql).await
}

async fn direct_on(c: &Cluster, db: &str, sql: &str) -> Result<(), String> {
    let url = c.url_as(APP_USER, APP_PW, db);
    let (c, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .map_err(|e| pgshift::db::describe(&e))?;
    tokio::spawn(conn);
    c.batch_execute(sql)
        .await
        .map_err(|e| pgshift::db::describe(&e))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_direct_session_commits_on_the_source_after_a_cutover() {
    let pair = Pair::start();
    let shift = pair.launch("", "", &[]);
    shift.wait_streaming_async(DB).await;
    // Sessions straight on the source, opened before the cutover: one per
    // override, and the database owner's (app owns shop) on another database.
    let mut before = Vec::new();
    for _ in OVERRIDES {
        before.push(connect(&pair.source.url_as(APP_USER, APP_PW, DB)).await);
    }
    let owner = connect(&pair.source.url_as(APP_USER, APP_PW, "postgres")).await;
    let proxied = connect(&shift.url(DB)).await;

    // Before the switch the target refuses the application role's writes
    // (it owns the table: privileges would not stop it) while apply goes on.
    let e = direct_on(
        &pair.target,
        DB,
        "INSERT INTO ledger (client) VALUES ('early')",
    )
    .await
    .unwrap_err();
    assert!(e.contains("being migrated") && e.contains("25006"), "{e}");
    let id: i64 = proxied
        .query_one(
            "INSERT INTO ledger (client) VALUES ('applied') RETURNING id",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(wait_until(std::time::Duration::from_secs(120), || {
        Pair::ledger_ids(&pair.target).contains(&id)
    }));

    let out = shift.cli_async(&["cutover", "--wait"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", out_text(&out));
    let last = shift.last_cutover_async().await;
    eprintln!(
        "fence {:.1} ms ({}); fence check {:.1} ms ({}); pause {:.1} ms",
        phase(&last, "fence")["seconds"].as_f64().unwrap() * 1000.0,
        detail(&last, "fence"),
        phase(&last, "fence_check")["seconds"].as_f64().unwrap() * 1000.0,
        detail(&last, "fence_check"),
        last["pause_seconds"].as_f64().unwrap() * 1000.0,
    );
    assert_eq!(phase(&last, "fence_check")["outcome"], "ok", "{last:#}");
    assert!(
        detail(&last, "fence_check").contains("login as proxy user app refused"),
        "{last:#}"
    );

    for ((name, sql), session) in OVERRIDES.iter().zip(&before) {
        assert!(
            session.batch_execute(sql).await.is_err(),
            "{name}: a session from before the cutover committed"
        );
        let e = direct(&pair, DB, sql).await.unwrap_err();
        assert!(e.contains("not permitted to log in"), "{name}: {e}");
    }
    // The owner: its session elsewhere was closed too, and a new one cannot
    // log in to turn the database's setting off.
    let alter = "ALTER DATABASE shop SET default_transaction_read_only = off";
    assert!(owner.batch_execute(alter).await.is_err());
    let e = direct(&pair, "postgres", alter).await.unwrap_err();
    assert!(e.contains("not permitted to log in"), "{e}");
    assert!(Pair::fenced(&pair.source));
    assert_eq!(
        pair.source
            .psql(DB, "SELECT count(*) FROM ledger WHERE client = 'direct'"),
        "0"
    );

    // The proxy's session moved and writes on the target.
    let port: i32 = proxied
        .query_one(
            "INSERT INTO ledger (client) VALUES ('proxied') RETURNING inet_server_port()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(port as u16, pair.target.port);
    // The guard is gone: the application writes on the target directly too.
    direct_on(
        &pair.target,
        DB,
        "INSERT INTO ledger (client) VALUES ('late')",
    )
    .await
    .unwrap();
    assert_eq!(guard_schemas(&pair.target), "0");
}

/// How many `pgshift_guard` schemas the target's migrated database has.
fn guard_schemas(c: &Cluster) -> String {
    c.psql(
        DB,
        "SELECT count(*) FROM pg_namespace WHERE nspname = 'pgshift_guard'",
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_removes_the_target_guard() {
    let pair = Pair::start();
    let shift = pair.launch("", "", &[]);
    shift.wait_streaming_async(DB).await;
    assert_eq!(guard_schemas(&pair.target), "1");
    let write = "INSERT INTO ledger (client) VALUES ('direct')";
    assert!(direct_on(&pair.target, DB, write).await.is_err());
    // A superuser (here the test harness) is not refused.
    pair.target
        .psql(DB, "DELETE FROM ledger WHERE client = 'nobody'");

    let out = shift.cli_async(&["cancel"]).await;
    assert!(out.status.success(), "{}", out_text(&out));
    assert_eq!(guard_schemas(&pair.target), "0");
    let triggers = pair.target.psql(
        DB,
        "SELECT count(*) FROM pg_trigger WHERE tgname = 'pgshift_guard'",
    );
    assert_eq!(triggers, "0");
    direct_on(&pair.target, DB, write).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_gives_every_login_and_setting_back_exactly() {
    // The attempt is held after its pre-gate catch-up until apply is
    // blocked, so the marker in the pause cannot arrive and it aborts after
    // the fence went up.
    let (pair, shift, held) = streaming_held_after_catchup("catchup_timeout = \"2s\"").await;
    pair.source.psql(
        "postgres",
        "CREATE ROLE dormant NOLOGIN PASSWORD 'd';
         CREATE ROLE reporter LOGIN PASSWORD 'r';
         ALTER DATABASE shop SET default_transaction_read_only = off;
         ALTER ROLE app IN DATABASE shop SET work_mem = '8MB';",
    );
    let before = logins_and_settings(&pair.source);
    let bypass = connect(&pair.source.url_as(APP_USER, APP_PW, DB)).await;
    let proxied = connect(&shift.url(DB)).await;

    let cutover = shift.cli_async(&["cutover", "--wait"]);
    // Held back by the blocked apply: the marker cannot arrive.
    let block_apply = held.block_apply(&pair, &shift, async {
        pair.source
            .psql(DB, "INSERT INTO ledger (client) VALUES ('held back')");
    });
    let (out, blocker) = tokio::join!(cutover, block_apply);
    assert_eq!(out.status.code(), Some(1), "{}", out_text(&out));
    let last = shift.last_cutover_async().await;
    assert_eq!(last["outcome"], "aborted", "{last:#}");
    assert_eq!(phase(&last, "fence")["outcome"], "ok", "{last:#}");

    assert_eq!(logins_and_settings(&pair.source), before);
    assert!(bypass.simple_query("SELECT 1").await.is_err());
    // Every role writes again as before, directly and through the proxy.
    for sql in OVERRIDES.map(|o| o.1) {
        direct(&pair, DB, sql).await.unwrap();
    }
    direct(&pair, DB, "INSERT INTO ledger (client) VALUES ('plain')")
        .await
        .unwrap();
    let port: i32 = proxied
        .query_one(
            "INSERT INTO ledger (client) VALUES ('proxied') RETURNING inet_server_port()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(port as u16, pair.source.port);
    let reporter = pair.source.url_as("reporter", "r", "postgres");
    let _ = connect(&reporter).await;
    let dormant = pair.source.url_as("dormant", "d", "postgres");
    assert!(
        tokio_postgres::connect(&dormant, tokio_postgres::NoTls)
            .await
            .is_err(),
        "a role that was NOLOGIN before got LOGIN"
    );
    blocker.batch_execute("ROLLBACK").await.unwrap();
    // The target stays guarded: nothing switched.
    let e = direct_on(&pair.target, DB, "INSERT INTO ledger (client) VALUES ('x')")
        .await
        .unwrap_err();
    assert!(e.contains("being migrated"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fence_check_stops_a_cutover_whose_fence_does_not_hold() {
    let pair = Pair::start();
    // pgshift's own user, listed: it cannot fence itself, so the fence
    // cannot hold for it.
    let shift = pair.launch("", &format!("fence_roles = [\"{SUPERUSER}\"]"), &[]);
    shift.wait_streaming_async(DB).await;
    let proxied = connect(&shift.url(DB)).await;

    let out = shift.cli_async(&["cutover", "--wait"]).await;
    assert_eq!(out.status.code(), Some(1), "{}", out_text(&out));
    let last = shift.last_cutover_async().await;
    assert_eq!(last["outcome"], "aborted", "{last:#}");
    assert_eq!(phase(&last, "fence_check")["outcome"], "failed", "{last:#}");
    let reason = last["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("does not hold") && reason.contains(SUPERUSER),
        "{last:#}"
    );
    assert!(phase(&last, "switch").is_null(), "{last:#}");

    // Nothing switched; the source is writable for everyone again.
    assert!(!Pair::fenced(&pair.source));
    let port: i32 = proxied
        .query_one(
            "INSERT INTO ledger (client) VALUES ('proxied') RETURNING inet_server_port()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(port as u16, pair.source.port);
    direct(&pair, DB, "INSERT INTO ledger (client) VALUES ('plain')")
        .await
        .unwrap();
}
