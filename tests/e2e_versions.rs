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
/// `target`-major server: the copy, then writes streamed, until the target
/// is an exact copy.
pub fn online_pair(source: i32, target: i32) {
    let test = format!("e2e_versions {source}->{target}");
    let Some((src, tgt)) = start_pair(source, target, &test) else {
        return;
    };
    src.create_db("shop");
    src.psql("shop", &schema(source));
    let p = Pgshift::start(&src, &tgt, &migration("versions", &["shop"], ""));
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
