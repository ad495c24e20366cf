//! `pgshift run` killed with SIGKILL mid-copy and mid-stream, then started
//! again: the target ends as an exact copy, exactly once.

mod common;
mod e2e_common;
use common::*;
use e2e_common::*;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::Duration;

use pgshift::replication::names::ReplicationNames;

const STARTUP: Duration = Duration::from_secs(120);

#[test]
fn kill_mid_copy_then_restart_copies_exactly() {
    let source = Cluster::start();
    let target = Cluster::start();
    source.create_db("big");
    // Several tables copied one at a time (copy_jobs = 1): the copy runs long
    // enough to be killed between its first and its last table.
    let mut sql = String::new();
    for i in 1..=6 {
        sql.push_str(&format!(
            "CREATE TABLE t{i}(id bigint PRIMARY KEY, pad text);
             INSERT INTO t{i} SELECT g, md5(g::text) || md5((g * {i})::text) FROM generate_series(1, 60000) g;"
        ));
    }
    sql.push_str("CREATE TABLE ledger(id bigint PRIMARY KEY, at timestamptz NOT NULL DEFAULT clock_timestamp());");
    source.psql("big", &sql);
    // A database copied completely before the kill is kept, not copied again.
    source.create_db("small");
    source.psql(
        "small",
        "CREATE TABLE s(id int PRIMARY KEY); INSERT INTO s SELECT generate_series(1, 100)",
    );

    // Writes go on through the copy, the kill and the restart: each one is
    // either in a copy or in the stream, exactly once.
    let stop = Arc::new(AtomicBool::new(false));
    let last = Arc::new(AtomicI64::new(0));
    let writer = {
        let (url, stop, last) = (source.url("big"), stop.clone(), last.clone());
        std::thread::spawn(move || ledger_writer(url, stop, last))
    };
    let mut p = Pgshift::start(
        &source,
        &target,
        &migration("crash", &["small", "big"], "copy_jobs = 1"),
    );
    let s = p.wait_status("the copy under way", STARTUP, |s| {
        let c = &s["databases"]["big"]["copy"];
        c["rows"].as_u64().unwrap_or(0) > 0
            && c["tables_copied"].as_u64().unwrap_or(0) < c["tables_total"].as_u64().unwrap_or(0)
    });
    p.kill();
    let copied = s["databases"]["big"]["copy"]["tables_copied"].clone();
    assert_eq!(s["databases"]["big"]["phase"], "copying", "{s}");

    // Writes while pgshift is down belong to the new copy or the stream.
    source.psql(
        "big",
        "UPDATE t1 SET pad = 'after the crash' WHERE id <= 100",
    );
    p.restart();
    let s = p.wait_state("WaitingForUserAction", STARTUP);
    let db = &s["databases"]["big"];
    assert!(
        db["copy_restarts"].as_u64().unwrap_or(0) >= 1,
        "the status says the copy restarted (killed after {copied} tables): {db}"
    );
    // Only the migration's own slot remains (the first attempt's is gone).
    assert_eq!(db["copy_restarts"], 1);
    assert_eq!(s["databases"]["small"]["copy_restarts"], 0);
    let mut want: Vec<String> = ["big", "small"]
        .iter()
        .map(|d| format!("{}@{d}", ReplicationNames::new("crash", d).slot))
        .collect();
    want.sort();
    assert_eq!(slots(&source), want);

    source.psql("big", "DELETE FROM t6 WHERE id % 2 = 0");
    source.psql("small", "INSERT INTO s VALUES (1000)");
    stop.store(true, Ordering::Relaxed);
    writer.join().expect("writer");
    let n = last.load(Ordering::Relaxed);
    p.wait_caught_up(&source, &["small", "big"], Duration::from_secs(60));
    p.assert_exact_copy(&source, &target, &["small", "big"]);
    assert_eq!(
        target.psql(
            "big",
            "SELECT count(*), count(DISTINCT id), min(id), max(id) FROM ledger"
        ),
        format!("{n}|{n}|1|{n}")
    );
}

/// Inserts ids 1, 2, 3 … on the source, one transaction each (some in
/// pairs, some 500 at once), until stopped; the last committed id is published.
fn ledger_writer(url: String, stop: Arc<AtomicBool>, last: Arc<AtomicI64>) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let c = connect(&url).await;
        let mut id = 0i64;
        while !stop.load(Ordering::Relaxed) {
            if id % 100 == 50 {
                // A larger transaction now and then: kills land inside its apply.
                c.execute(
                    "INSERT INTO ledger(id) SELECT generate_series($1::bigint, $1::bigint + 499)",
                    &[&(id + 1)],
                )
                .await
                .expect("ledger insert");
                id += 500;
            } else if id % 5 == 0 {
                c.batch_execute(&format!(
                    "BEGIN; INSERT INTO ledger(id) VALUES ({}); INSERT INTO ledger(id) VALUES ({}); COMMIT",
                    id + 1,
                    id + 2
                ))
                .await
                .expect("ledger insert");
                id += 2;
            } else {
                id += 1;
                c.execute("INSERT INTO ledger(id) VALUES ($1)", &[&id])
                    .await
                    .expect("ledger insert");
            }
            last.store(id, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    });
}

#[test]
fn kill_during_streaming_loses_and_duplicates_nothing() {
    let source = Cluster::start();
    let target = Cluster::start();
    source.create_db("bank");
    source.psql(
        "bank",
        "CREATE TABLE ledger(id bigint PRIMARY KEY, at timestamptz NOT NULL DEFAULT clock_timestamp());
         CREATE TABLE accounts(id int PRIMARY KEY, balance bigint);
         INSERT INTO accounts SELECT g, 1000 FROM generate_series(1, 100) g;",
    );
    let mut p = Pgshift::start(&source, &target, &migration("ledger", &["bank"], ""));
    p.wait_state("WaitingForUserAction", STARTUP);

    let stop = Arc::new(AtomicBool::new(false));
    let last = Arc::new(AtomicI64::new(0));
    let writer = {
        let (url, stop, last) = (source.url("bank"), stop.clone(), last.clone());
        std::thread::spawn(move || ledger_writer(url, stop, last))
    };
    for round in 0..3 {
        // Let the stream apply for a random while, then kill it mid-flight
        // (a random kill point, not a wait for something to have happened).
        std::thread::sleep(Duration::from_millis(300 + rand::random::<u64>() % 1500));
        p.kill();
        source.psql(
            "bank",
            &format!("UPDATE accounts SET balance = balance + {round} WHERE id % 3 = {round}"),
        );
        std::thread::sleep(Duration::from_millis(rand::random::<u64>() % 500));
        p.restart();
        p.wait_state("WaitingForUserAction", STARTUP);
        p.wait_status("streaming again", STARTUP, |s| {
            s["databases"]["bank"]["stream"]["state"] == "streaming"
        });
    }
    // The writer goes on past the last restart (and has written > 100 rows).
    let at_restart = last.load(Ordering::Relaxed);
    assert!(
        wait_until(STARTUP, || last.load(Ordering::Relaxed)
            > (at_restart + 50).max(100)),
        "the writer stopped at {}",
        last.load(Ordering::Relaxed)
    );
    stop.store(true, Ordering::Relaxed);
    writer.join().expect("writer");
    let n = last.load(Ordering::Relaxed);

    p.wait_caught_up(&source, &["bank"], Duration::from_secs(60));
    // No gaps, no duplicates (the key forbids them on the target too, so a
    // duplicate would have stopped apply instead).
    assert_eq!(
        target.psql(
            "bank",
            "SELECT count(*), count(DISTINCT id), min(id), max(id) FROM ledger"
        ),
        format!("{n}|{n}|1|{n}")
    );
    p.assert_exact_copy(&source, &target, &["bank"]);
}

/// `SHOW default_transaction_read_only` in a new session on `db`.
fn read_only(c: &Cluster, db: &str) -> String {
    c.psql(db, "SHOW default_transaction_read_only")
}

#[test]
fn offline_kill_mid_copy_keeps_the_fence_and_cancel_lifts_it() {
    let source = Cluster::start();
    let target = Cluster::start();
    source.create_db("shop");
    let mut sql = String::new();
    for i in 1..=6 {
        sql.push_str(&format!(
            "CREATE TABLE t{i}(id bigint PRIMARY KEY, pad text);
             INSERT INTO t{i} SELECT g, md5(g::text) FROM generate_series(1, 60000) g;"
        ));
    }
    source.psql("shop", &sql);
    let mut p = Pgshift::start(
        &source,
        &target,
        &migration("offcrash", &["shop"], "mode = \"offline\"\ncopy_jobs = 1"),
    );
    let copying = |s: &serde_json::Value| {
        let c = &s["databases"]["shop"]["copy"];
        c["rows"].as_u64().unwrap_or(0) > 0
            && c["tables_copied"].as_u64().unwrap_or(0) < c["tables_total"].as_u64().unwrap_or(0)
    };
    p.wait_status("the offline copy under way", STARTUP, copying);
    p.kill();
    // Killed mid-copy: the source stays fenced, so nothing can change under
    // the part already copied.
    assert_eq!(read_only(&source, "shop"), "on");

    p.restart();
    p.wait_status("the offline copy under way again", STARTUP, copying);
    let o = p.cli_admin(&["cancel"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    p.wait_state("Canceled", STARTUP);
    // The fence is lifted to what it was before the first run, not to the
    // fenced value the second run found.
    assert!(
        wait_until(STARTUP, || read_only(&source, "shop") == "off"),
        "the source stays read-only after the cancel\n{}",
        p.log()
    );
    source.psql("shop", "INSERT INTO t1 VALUES (0, 'writable again')");
}
