//! Fencing the source at cutover, and lifting the fence on abort.

mod common;
use common::*;
use pgshift::cutover::fence;

#[tokio::test]
async fn fence_blocks_writes_spares_ours_and_lifts_exactly() {
    let c = Cluster::start();
    c.create_db("app");
    c.create_db("billing");
    c.psql("app", "CREATE TABLE t (id int); GRANT ALL ON t TO app;");
    c.psql("billing", "CREATE TABLE t (id int)");
    // billing had an explicit database-level setting before: it must come back as it was.
    c.psql(
        "postgres",
        "ALTER DATABASE billing SET default_transaction_read_only = off",
    );
    c.psql("postgres", "CREATE ROLE fenced_role LOGIN PASSWORD 'x'");

    let admin = c.client("postgres").await;
    let bypass = connect(&c.url_as(APP_USER, APP_PW, "app")).await;
    let spared = connect(&c.url_as(APP_USER, APP_PW, "app")).await;
    let ours = connect(&format!("{}&application_name=pgshift-apply", c.url("app"))).await;
    let spared_pid: i32 = spared
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);

    let bypass_pid: i32 = bypass
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    // Temporary tables make its exit slow (it drops them on the way out).
    bypass
        .batch_execute(
            "DO $$ BEGIN FOR i IN 1..300 LOOP
               EXECUTE format('CREATE TEMP TABLE tmp_%s (id int PRIMARY KEY, v text)', i);
             END LOOP; END $$",
        )
        .await
        .unwrap();

    let dbs = vec!["app".to_string(), "billing".to_string()];
    let rec = fence::fence(&admin, &dbs, &["fenced_role".to_string()], &[spared_pid])
        .await
        .unwrap();
    assert_eq!(rec.terminated_sessions, 1, "{rec:?}");
    // Gone by the time the fence returns (awaited on PostgreSQL 14+), so it
    // cannot commit after a marker emitted next.
    let left: i64 = admin
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE pid = $1",
            &[&bypass_pid],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0, "the terminated session is still there");
    assert!(
        bypass.simple_query("SELECT 1").await.is_err(),
        "bypass session must be gone"
    );
    spared
        .simple_query("SELECT 1")
        .await
        .expect("spared session survives");
    ours.simple_query("SELECT 1")
        .await
        .expect("pgshift's own session survives");

    // New sessions are read-only on both databases; the role cannot log in.
    let fresh = connect(&c.url_as(APP_USER, APP_PW, "app")).await;
    let err = fresh
        .simple_query("INSERT INTO t VALUES (1)")
        .await
        .unwrap_err();
    assert_eq!(err.as_db_error().unwrap().code().code(), "25006", "{err}");
    let out = c.psql_output("billing", "INSERT INTO t VALUES (1)");
    assert!(!out.status.success());
    assert_eq!(
        c.psql(
            "postgres",
            "SELECT rolcanlogin FROM pg_roles WHERE rolname = 'fenced_role'"
        ),
        "f"
    );

    fence::lift(&admin, &rec).await.unwrap();
    let fresh = connect(&c.url_as(APP_USER, APP_PW, "app")).await;
    fresh
        .simple_query("INSERT INTO t VALUES (1)")
        .await
        .expect("writable after lift");
    assert_eq!(
        c.psql(
            "postgres",
            "SELECT array_to_string(setconfig, ',') FROM pg_db_role_setting s JOIN pg_database d ON d.oid = s.setdatabase WHERE d.datname = 'billing'"
        ),
        "default_transaction_read_only=off"
    );
    assert_eq!(
        c.psql("postgres", "SELECT count(*) FROM pg_db_role_setting s JOIN pg_database d ON d.oid = s.setdatabase WHERE d.datname = 'app'"),
        "0"
    );
    assert_eq!(
        c.psql(
            "postgres",
            "SELECT rolcanlogin FROM pg_roles WHERE rolname = 'fenced_role'"
        ),
        "t"
    );
}
