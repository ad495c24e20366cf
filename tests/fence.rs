//! Fencing the source at cutover, and lifting the fence on abort.

mod common;
use common::*;
use pgshift::config::{Endpoint, ProxyUser, Secret};
use pgshift::cutover::fence;

/// Every role's LOGIN and every database-level setting, to compare a
/// server before and after a fence went up and came down.
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

async fn pid(c: &tokio_postgres::Client) -> i32 {
    c.query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0)
}

/// The SQLSTATE of a failed connection attempt.
async fn login_error(url: &str) -> String {
    match tokio_postgres::connect(url, tokio_postgres::NoTls).await {
        Ok(_) => "connected".into(),
        Err(e) => e
            .as_db_error()
            .map(|d| d.code().code().to_string())
            .unwrap_or_else(|| e.to_string()),
    }
}

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
    c.psql(
        "postgres",
        "CREATE ROLE fenced_role LOGIN PASSWORD 'x';
         CREATE ROLE dormant NOLOGIN PASSWORD 'x';
         CREATE ROLE admin2 SUPERUSER LOGIN PASSWORD 'x';",
    );
    let before = logins_and_settings(&c);

    let admin = c.client("postgres").await;
    let bypass = connect(&c.url_as(APP_USER, APP_PW, "app")).await;
    // A name is any client's to choose: only pgshift's role with it is spared.
    let posing = connect(&format!(
        "{}&application_name=pgshift-apply",
        c.url_as(APP_USER, APP_PW, "app")
    ))
    .await;
    // A session of a fenced role on a database outside the migration.
    let elsewhere = connect(&c.url_as(APP_USER, APP_PW, "postgres")).await;
    let spared = connect(&c.url_as(APP_USER, APP_PW, "app")).await;
    let ours = connect(&format!("{}&application_name=pgshift-apply", c.url("app"))).await;
    let spared_pid = pid(&spared).await;
    let bypass_pid = pid(&bypass).await;
    // Temporary tables make its exit slow (it drops them on the way out),
    // yet within the fence's 1 s wait.
    bypass
        .batch_execute(
            "DO $$ BEGIN FOR i IN 1..100 LOOP
               EXECUTE format('CREATE TEMP TABLE tmp_%s (id int PRIMARY KEY, v text)', i);
             END LOOP; END $$",
        )
        .await
        .unwrap();

    let dbs = vec!["app".to_string(), "billing".to_string()];
    let rec = fence::fence(&admin, &dbs, &["fenced_role".to_string()], &[spared_pid])
        .await
        .unwrap();
    // Every login role but pgshift's own and the superusers; not the one
    // that could not log in anyway.
    let mut roles = rec.roles.clone();
    roles.sort();
    assert_eq!(
        roles,
        vec![APP_USER, "fenced_role", MD5_USER, TRUST_USER],
        "{rec:?}"
    );
    assert_eq!(rec.terminated_sessions, 3, "{rec:?}");
    // Gone by the time the fence returns (awaited on PostgreSQL 14+), so it
    // cannot commit after a marker emitted next.
    if rec.await_termination {
        let left: i64 = admin
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = $1",
                &[&bypass_pid],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(left, 0, "the terminated session is still there");
    }
    for (name, s) in [
        ("bypass", &bypass),
        ("posing", &posing),
        ("elsewhere", &elsewhere),
    ] {
        assert!(
            s.simple_query("SELECT 1").await.is_err(),
            "{name} session must be gone"
        );
    }
    spared
        .simple_query("SELECT 1")
        .await
        .expect("spared session survives");
    ours.simple_query("SELECT 1")
        .await
        .expect("pgshift's own session survives");

    // No fenced role can log in, on any database; a superuser's new
    // session is read-only by default on a migrated database.
    for (user, pw) in [(APP_USER, APP_PW), ("fenced_role", "x"), (MD5_USER, MD5_PW)] {
        for db in ["app", "postgres"] {
            assert_eq!(
                login_error(&c.url_as(user, pw, db)).await,
                "28000",
                "{user} on {db}"
            );
        }
    }
    let out = c.psql_output("billing", "INSERT INTO t VALUES (1)");
    assert!(!out.status.success());

    fence::lift(&admin, &rec).await.unwrap();
    // Exactly as before: LOGIN where it was, billing's explicit setting,
    // nothing on app, dormant still NOLOGIN.
    assert_eq!(logins_and_settings(&c), before);
    let fresh = connect(&c.url_as(APP_USER, APP_PW, "app")).await;
    fresh
        .simple_query("INSERT INTO t VALUES (1)")
        .await
        .expect("writable after lift");
}

/// The fence check: passes on a fence that holds, and fails on one that
/// does not — a role pgshift cannot fence (its own, listed), or a fenced
/// role that got LOGIN back.
#[tokio::test]
async fn verify_catches_a_fence_that_does_not_hold() {
    let c = Cluster::start();
    c.create_db("app");
    let admin = c.client("postgres").await;
    let source = Endpoint::parse("source.url", &c.url("postgres")).unwrap();
    let users = vec![ProxyUser {
        name: APP_USER.into(),
        password: Secret::new(APP_PW),
    }];
    let dbs = vec!["app".to_string()];

    // pgshift's own user, listed: it cannot fence it.
    let listed = vec![SUPERUSER.to_string()];
    let rec = fence::fence(&admin, &dbs, &listed, &[]).await.unwrap();
    assert_eq!(rec.unfenceable, vec![SUPERUSER.to_string()], "{rec:?}");
    let err = fence::verify(&admin, &source, &rec, &listed, &[], &users)
        .await
        .unwrap_err();
    // Typed: the cutover can tell a fence that does not hold from an SQL failure.
    assert!(
        err.does_not_hold()
            && matches!(&err, fence::FenceError::RolesCanLogIn { roles } if roles.contains(&SUPERUSER.to_string())),
        "{err:?}"
    );
    let err = err.to_string();
    assert!(
        err.contains("does not hold") && err.contains(SUPERUSER),
        "{err}"
    );
    fence::lift(&admin, &rec).await.unwrap();

    // A fence that holds: the login attempt as the proxy user is refused.
    let rec = fence::fence(&admin, &dbs, &[], &[]).await.unwrap();
    let ok = fence::verify(&admin, &source, &rec, &[], &[], &users)
        .await
        .unwrap();
    assert!(ok.contains("login as proxy user app refused"), "{ok}");

    // Someone gives the application role its LOGIN back.
    c.psql("postgres", &format!("ALTER ROLE {APP_USER} LOGIN"));
    let err = fence::verify(&admin, &source, &rec, &[], &[], &users)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("does not hold") && err.contains(APP_USER),
        "{err}"
    );
    fence::lift(&admin, &rec).await.unwrap();
}

/// What validation reports: the roles fenced, the ones that use other
/// databases, the superusers the fence does not cover.
#[tokio::test]
async fn survey_names_who_the_fence_reaches() {
    let c = Cluster::start();
    c.create_db("app");
    c.psql(
        "postgres",
        "CREATE ROLE reporter LOGIN;
         CREATE ROLE dba SUPERUSER LOGIN;
         CREATE ROLE locked_out LOGIN;
         REVOKE CONNECT ON DATABASE app FROM PUBLIC;
         GRANT CONNECT ON DATABASE app TO app, reporter;",
    );
    c.psql("postgres", "CREATE DATABASE reports OWNER reporter");
    // locked_out has no CONNECT on app (PUBLIC's was revoked): out of reach.
    let admin = c.client("postgres").await;
    let s = fence::survey(&admin, &["app".to_string()], &[])
        .await
        .unwrap();
    assert_eq!(s.own_role, SUPERUSER);
    let names: Vec<(&str, bool, bool)> = s
        .roles
        .iter()
        .map(|r| (r.name.as_str(), r.can_fence, r.uses_other_databases))
        .collect();
    assert_eq!(
        names,
        vec![(APP_USER, true, false), ("reporter", true, true)],
        "{s:?}"
    );
    assert_eq!(s.superusers, vec!["dba".to_string()]);
}
