//! Checks of the shared harness itself.

mod common;
use common::*;

#[test]
fn cluster_starts_with_logical_wal_and_users() {
    let c = Cluster::start();
    assert_eq!(c.psql("postgres", "SHOW wal_level"), "logical");
    assert_eq!(
        c.psql("postgres", "SELECT string_agg(rolname, ',' ORDER BY rolname) FROM pg_roles WHERE rolname IN ('app','md5user','trustuser')"),
        "app,md5user,trustuser"
    );
}

#[tokio::test]
async fn clusters_run_side_by_side_and_accept_scram() {
    let a = Cluster::start();
    let b = Cluster::start();
    assert_ne!(a.port, b.port);
    let ca = connect(&a.url_as(APP_USER, APP_PW, "postgres")).await;
    let cb = connect(&b.url_as(MD5_USER, MD5_PW, "postgres")).await;
    let ra: i32 = ca.query_one("SELECT 1", &[]).await.unwrap().get(0);
    let rb: i32 = cb.query_one("SELECT 2", &[]).await.unwrap().get(0);
    assert_eq!((ra, rb), (1, 2));
}
