//! End to end through `pgshift run`: offline mode holds writers at the proxy
//! during the copy and lands their writes on the target; and a migration of
//! more than 8 databases at once.

mod common;
mod e2e_common;
use common::*;
use e2e_common::*;

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const STARTUP: Duration = Duration::from_secs(120);

#[test]
fn offline_mode_holds_proxied_writes_and_lands_them_on_the_target() {
    let source = Cluster::start();
    let target = Cluster::start();
    source.create_db("shop");
    // A filler table makes the copy last long enough to be seen holding writers.
    source.psql(
        "shop",
        "CREATE TABLE writes(id bigint PRIMARY KEY, at timestamptz NOT NULL DEFAULT clock_timestamp());
         CREATE TABLE filler(id bigint PRIMARY KEY, pad text);
         INSERT INTO filler SELECT g, md5(g::text) FROM generate_series(1, 200000) g;
         GRANT ALL ON ALL TABLES IN SCHEMA public TO app;",
    );
    let p = Pgshift::start(
        &source,
        &target,
        &migration("off", &["shop"], "mode = \"offline\"\ncopy_jobs = 1"),
    );
    let stop = Arc::new(AtomicBool::new(false));
    let last = Arc::new(AtomicI64::new(0));
    let seen = Arc::new(Mutex::new(Seen::default()));
    let writer = {
        let (port, stop, last, seen) = (p.proxy_port, stop.clone(), last.clone(), seen.clone());
        std::thread::spawn(move || proxied_writer(port, "shop", stop, last, seen))
    };

    // During the copy the writer waits at the closed gate.
    p.wait_status("a writer held at the gate", STARTUP, |s| {
        s["proxy"]["paused"] == true && s["proxy"]["waiting_at_gate"].as_u64().unwrap_or(0) >= 1
            || is_terminal(s["state"].as_str().unwrap_or(""))
    });
    let s = p.wait_state("Succeeded", STARTUP);
    assert_eq!(s["substate"], "Completed");
    assert_eq!(s["proxy"]["route"], "target");
    assert_eq!(s["databases"]["shop"]["phase"], "switched");
    // The writer keeps going on the target for a while.
    let at_switch = last.load(Ordering::Relaxed);
    let goes_on = wait_until(STARTUP, || last.load(Ordering::Relaxed) > at_switch + 50);
    stop.store(true, Ordering::Relaxed);
    writer.join().expect("writer");
    assert!(
        goes_on,
        "the writer stopped after the switch: {:?}\n{}",
        seen.lock().unwrap().errors,
        p.log()
    );

    let seen = seen.lock().unwrap();
    assert!(seen.errors.is_empty(), "writes failed: {:?}", seen.errors);
    assert!(
        seen.slowest > Duration::from_millis(200),
        "a write was held during the copy (slowest {:?})",
        seen.slowest
    );
    let n = last.load(Ordering::Relaxed);
    // Every acknowledged write is on the target, exactly once.
    assert_eq!(
        target.psql(
            "shop",
            "SELECT count(*), count(DISTINCT id), max(id) FROM writes"
        ),
        format!("{n}|{n}|{n}")
    );
    // The source got only what was written before the gate closed.
    let on_source: i64 = source
        .psql("shop", "SELECT count(*) FROM writes")
        .parse()
        .unwrap();
    assert!(on_source < n, "source {on_source}, total {n}");
}

#[test]
fn ten_databases_migrate_together() {
    let source = Cluster::start_with(ClusterOptions {
        conf: vec![
            "max_replication_slots = 16".into(),
            "max_wal_senders = 16".into(),
        ],
        ..Default::default()
    });
    let target = Cluster::start();
    let dbs: Vec<String> = (0..10).map(|i| format!("db{i}")).collect();
    let names: Vec<&str> = dbs.iter().map(String::as_str).collect();
    for (i, db) in names.iter().enumerate() {
        source.create_db(db);
        source.psql(
            db,
            &format!(
                "CREATE TABLE t(id int PRIMARY KEY, v text);
                 INSERT INTO t SELECT g, '{db}' FROM generate_series(1, {}) g;",
                100 + i * 10
            ),
        );
    }
    let p = Pgshift::start(
        &source,
        &target,
        &migration("many", &names, "copy_jobs = 2"),
    );
    let s = p.wait_state("WaitingForUserAction", Duration::from_secs(240));
    assert_eq!(s["substate"], "WaitingForCutoverTrigger");
    assert_eq!(slots(&source).len(), 10, "{:?}", slots(&source));
    for db in &names {
        source.psql(db, "INSERT INTO t VALUES (100000, 'streamed')");
    }
    p.wait_caught_up(&source, &names, Duration::from_secs(60));
    p.assert_exact_copy(&source, &target, &names);
    for db in &names {
        assert_eq!(
            target.psql(db, "SELECT v FROM t WHERE id = 100000"),
            "streamed"
        );
    }
}
