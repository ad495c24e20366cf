//! The cutover seams: with the gate closed a new transaction waits while an
//! open one completes; after the route is swapped to another cluster and the
//! gate opens, the held request and all new connections run on that cluster.

mod common;
mod proxy_common;
use common::*;
use proxy_common::*;

use std::time::Duration;

use pgshift::config::Endpoint;
use pgshift::proxy::Route;

async fn whoami(c: &tokio_postgres::Client) -> String {
    c.query_one("SELECT v FROM whoami", &[])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gate_holds_new_work_and_route_swap_moves_sessions() {
    let a = Cluster::start();
    let b = Cluster::start();
    for (c, name) in [(&a, "A"), (&b, "B")] {
        c.psql(
            "postgres",
            &format!(
                "CREATE TABLE whoami (v text); INSERT INTO whoami VALUES ('{name}');
                 CREATE TABLE t (id int); GRANT ALL ON whoami, t TO app;"
            ),
        );
    }
    let proxy = start_proxy(&a).await;
    let gate = proxy.handle.gate();

    let in_tx = connect(&proxy.url("postgres")).await;
    let idle = connect(&proxy.url("postgres")).await;
    let listener_client = connect(&proxy.url("postgres")).await;
    assert_eq!(whoami(&in_tx).await, "A");
    assert_eq!(whoami(&idle).await, "A");
    in_tx
        .batch_execute("BEGIN; INSERT INTO t VALUES (1)")
        .await
        .unwrap();

    gate.close();
    assert!(gate.is_closed());
    assert_eq!(metric(&proxy.ctx, "pgshift_proxy_paused", ""), 1.0);
    // tokio-postgres closes the statements of `whoami` in the background
    // (Close + Sync): those requests may still be in flight for a moment.
    assert!(wait_until(Duration::from_secs(120), || gate
        .sessions_in_transaction()
        == 1));

    // A new transaction on an idle session waits at the gate.
    let held = tokio::spawn(async move {
        let v = whoami(&idle).await;
        (v, idle)
    });
    assert!(wait_until(Duration::from_secs(120), || gate
        .waiting_sessions()
        == 1));
    // A check that something does NOT happen: a short, fixed watch.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !held.is_finished(),
        "the held request ran while the gate was closed"
    );
    assert_eq!(
        metric(&proxy.ctx, "pgshift_proxy_pause_waiting_sessions", ""),
        1.0
    );

    // A brand-new connection is held too.
    let new_url = proxy.url("postgres");
    let held_new = tokio::spawn(async move {
        let c = connect(&new_url).await;
        whoami(&c).await
    });

    // The drain does not finish while a transaction is open (a short,
    // fixed watch for something that must NOT happen) …
    assert!(
        tokio::time::timeout(Duration::from_millis(200), gate.drained())
            .await
            .is_err()
    );
    // … and the open transaction runs to its end with the gate closed.
    in_tx
        .batch_execute("INSERT INTO t VALUES (2)")
        .await
        .unwrap();
    in_tx.batch_execute("COMMIT").await.unwrap();
    tokio::time::timeout(Duration::from_secs(120), gate.drained())
        .await
        .expect("drained once the transaction committed");
    assert_eq!(gate.sessions_in_transaction(), 0);
    assert_eq!(a.psql("postgres", "SELECT count(*) FROM t"), "2");
    assert!(!held.is_finished() && !held_new.is_finished());

    // Swap the route to cluster B and open the gate.
    let target = Endpoint::parse("target.url", &b.url("postgres")).unwrap();
    proxy
        .handle
        .router()
        .swap(Route::from_endpoint("target", &target));
    gate.open();
    let (v, idle) = tokio::time::timeout(Duration::from_secs(120), held)
        .await
        .expect("held request released")
        .unwrap();
    assert_eq!(v, "B", "the held request runs on the new route");
    let v_new = tokio::time::timeout(Duration::from_secs(120), held_new)
        .await
        .expect("held connection released")
        .unwrap();
    assert_eq!(v_new, "B");
    assert_eq!(whoami(&idle).await, "B");
    assert_eq!(whoami(&in_tx).await, "B");
    let fresh = connect(&proxy.url("postgres")).await;
    assert_eq!(whoami(&fresh).await, "B");
    // The session that sent nothing moved too (woken by the swap), and the
    // registry says where every session is.
    assert!(wait_until(Duration::from_secs(120), || {
        proxy
            .handle
            .sessions()
            .snapshot()
            .iter()
            .all(|s| s.route == "target")
    }));
    assert_eq!(whoami(&listener_client).await, "B");
    // in_tx, idle, listener_client, fresh (the held new connection has ended).
    assert!(wait_until(Duration::from_secs(120), || proxy
        .handle
        .sessions()
        .len()
        == 4));
    // Writes land on B; A has only what committed before the swap.
    in_tx
        .batch_execute("INSERT INTO t VALUES (3)")
        .await
        .unwrap();
    assert_eq!(b.psql("postgres", "SELECT count(*) FROM t"), "1");
    assert_eq!(a.psql("postgres", "SELECT count(*) FROM t"), "2");
    // Cancel keys follow the session to its new backend.
    let token = idle.cancel_token();
    let watcher = b.client("postgres").await;
    let canceller = tokio::spawn(async move {
        wait_running(&watcher, "SELECT pg_sleep(20)").await;
        token.cancel_query(tokio_postgres::NoTls).await.unwrap();
    });
    let e = idle.simple_query("SELECT pg_sleep(20)").await.unwrap_err();
    canceller.await.unwrap();
    assert_eq!(e.code().unwrap().code(), "57014");
    assert_eq!(metric(&proxy.ctx, "pgshift_proxy_paused", ""), 0.0);
}
