//! `pgshift run` between PostgreSQL major versions: the copy and the
//! stream reach an exact copy for pairs that failed before version-aware
//! SQL (17→17: datlocale; 12→17: wal_status; 13→16 with a newer pg_dump:
//! transaction_timeout; 11–13 sources: pgoutput options and row markers).
//! Pairs whose versions are not installed are skipped.
//! The full matrix of pairs builds on [`online_pair`].

mod common;
mod e2e_common;
use common::*;
use e2e_common::*;

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const STARTUP: Duration = Duration::from_secs(180);

/// An identity column, a partitioned table, a sequence no column owns; a
/// generated column where the source has them (12+).
fn schema(major: i32) -> String {
    let generated = if major >= 12 {
        ", doubled numeric GENERATED ALWAYS AS (price * 2) STORED"
    } else {
        ""
    };
    format!(
        "CREATE TABLE items(id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, name text NOT NULL,
                            price numeric(10,2){generated});
         CREATE TABLE events(id int, at date, PRIMARY KEY (id, at)) PARTITION BY RANGE (at);
         CREATE TABLE events_2024 PARTITION OF events FOR VALUES FROM ('2024-01-01') TO ('2025-01-01');
         CREATE SEQUENCE invoice_no START 1000; SELECT nextval('invoice_no');
         INSERT INTO items(name, price) SELECT 'item ' || g, g FROM generate_series(1, 300) g;
         INSERT INTO events SELECT g, date '2024-01-01' + g FROM generate_series(1, 200) g;"
    )
}

/// Migrates database `shop` online from a `source`-major to a
/// `target`-major server, the whole way: the copy, writes streamed, a
/// `kill -9` of pgshift and a restart mid-stream (exact copy after each),
/// then a cutover while a persistent session writes through the proxy:
/// every write it saw acknowledged is on the target exactly once, and the
/// session ends up on the target.
pub fn online_pair(source: i32, target: i32) {
    let test = format!("e2e_versions {source}->{target}");
    let Some((src, tgt)) = start_pair(source, target, &test) else {
        return;
    };
    src.create_db("shop");
    src.psql("shop", &schema(source));
    src.psql(
        "shop",
        "CREATE TABLE writes(id bigint PRIMARY KEY);
         GRANT ALL ON ALL TABLES IN SCHEMA public TO app;",
    );
    let mut p = Pgshift::start(&src, &tgt, &migration("versions", &["shop"], ""));
    let s = p.wait_state("WaitingForUserAction", STARTUP);
    assert_eq!(s["databases"]["shop"]["phase"], "streaming", "{test}: {s}");
    src.psql(
        "shop",
        "INSERT INTO items(name, price) SELECT 'late ' || g, g FROM generate_series(1, 50) g;
         UPDATE items SET price = price + 1 WHERE id % 7 = 0;
         DELETE FROM events WHERE id % 5 = 0;",
    );
    p.wait_caught_up(&src, &["shop"], Duration::from_secs(90));
    p.assert_exact_copy(&src, &tgt, &["shop"]);
    assert_eq!(
        tgt.psql("shop", "SELECT last_value FROM invoice_no"),
        src.psql("shop", "SELECT last_value FROM invoice_no")
    );

    // kill -9 mid-stream; writes while pgshift is down arrive after the restart.
    p.kill9();
    src.psql(
        "shop",
        "INSERT INTO items(name, price) SELECT 'while down ' || g, g FROM generate_series(1, 40) g;
         UPDATE events SET at = at + 1 WHERE id % 3 = 0;",
    );
    p.spawn();
    p.wait_state("WaitingForUserAction", STARTUP);
    p.wait_caught_up(&src, &["shop"], Duration::from_secs(90));
    p.assert_exact_copy(&src, &tgt, &["shop"]);

    // The cutover, with a session writing through the proxy all along.
    let stop = Arc::new(AtomicBool::new(false));
    let last = Arc::new(AtomicI64::new(0));
    let seen = Arc::new(Mutex::new(Seen::default()));
    let writer = {
        let (stop, last, seen) = (stop.clone(), last.clone(), seen.clone());
        let port = p.proxy_port;
        std::thread::spawn(move || proxied_writer(port, "shop", stop, last, seen))
    };
    assert!(
        wait_until(STARTUP, || last.load(Ordering::Relaxed) >= 20),
        "{test}: the writer does not write: {:?}",
        seen.lock().unwrap().errors
    );
    let out = p.cli(&["cutover", "--wait"]);
    assert!(
        out.status.success(),
        "{test}: cutover failed: {}{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        p.logs()
    );
    // The same session goes on writing, now on the target.
    let at_switch = last.load(Ordering::Relaxed);
    assert!(
        wait_until(STARTUP, || last.load(Ordering::Relaxed) >= at_switch + 20),
        "{test}: the writer stopped after the switch: {:?}",
        seen.lock().unwrap().errors
    );
    stop.store(true, Ordering::Relaxed);
    writer.join().expect("writer");
    let errors = seen.lock().unwrap().errors.clone();
    assert!(errors.is_empty(), "{test}: writer errors: {errors:?}");
    let acked = last.load(Ordering::Relaxed);
    assert_eq!(
        tgt.psql(
            "shop",
            &format!("SELECT count(*) FROM writes WHERE id BETWEEN 1 AND {acked}")
        ),
        acked.to_string(),
        "{test}: an acknowledged write is missing on the target"
    );
    // Nothing was written on the source after the switch.
    let on_source: i64 = src
        .psql("shop", "SELECT coalesce(max(id), 0) FROM writes")
        .parse()
        .unwrap();
    assert!(
        on_source <= at_switch,
        "{test}: the source took writes after the switch"
    );
    for table in ["items", "events"] {
        assert_eq!(
            src.psql(
                "shop",
                &format!("SELECT md5(string_agg(t::text, ',' ORDER BY t::text)) FROM {table} t")
            ),
            tgt.psql(
                "shop",
                &format!("SELECT md5(string_agg(t::text, ',' ORDER BY t::text)) FROM {table} t")
            ),
            "{test}: {table} differs after the cutover"
        );
    }
}

#[test]
fn v17_to_v17() {
    online_pair(17, 17);
}

#[test]
fn v14_to_v16() {
    online_pair(14, 16);
}

#[test]
fn v15_to_v18() {
    online_pair(15, 18);
}

#[test]
fn v12_to_v17() {
    online_pair(12, 17);
}

#[test]
fn v13_to_v16() {
    online_pair(13, 16);
}

#[test]
fn v11_to_v15() {
    online_pair(11, 15);
}

#[test]
fn v16_to_v18() {
    online_pair(16, 18);
}

#[test]
fn v18_to_v18() {
    online_pair(18, 18);
}

#[test]
fn v15_to_v15() {
    online_pair(15, 15);
}
