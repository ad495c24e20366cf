//! The type corpus: every class of column type (tests/data/types_corpus.sql)
//! through one online migration by the real `pgshift run` binary — the
//! initial copy (binary and text), changes streamed under every replica
//! identity (tests/data/types_stream.sql), a `kill -9` mid-stream and a
//! restart, and the cutover — compared row by row after each phase.
//! One pair of clusters and one pgshift process, in phases.

mod common;
mod e2e_common;
use common::*;
use e2e_common::corpus::{assert_same, run_file};

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::Duration;

const DB: &str = "typesdb";
const STARTUP: Duration = Duration::from_secs(180);
const CATCH_UP: Duration = Duration::from_secs(120);

/// Changes row by row in many small transactions until stopped; the last
/// committed tick is published.
fn ticker(url: String, stop: Arc<AtomicBool>, last: Arc<AtomicI64>) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async move {
        let c = connect(&url).await;
        let mut n = 0i64;
        while !stop.load(Ordering::Relaxed) {
            n += 1;
            c.batch_execute(&format!(
                "BEGIN; INSERT INTO types_schema.ticks VALUES ({n});
                 UPDATE types_schema.builtins SET c_int8 = {n} WHERE id = 3;
                 UPDATE types_schema.builtins_text SET c_int2 = {} WHERE id = 3;
                 UPDATE types_schema.arrays SET a_int = ARRAY[{n}, NULL] WHERE id = 1;
                 UPDATE \"Tÿpes \"\"Ω\"\"\".\"Ünïcode Tåble\" SET d_small = {} WHERE \"Ïd\" = 1;
                 UPDATE types_schema.events SET k = (k + 37) % 300 WHERE id = {};
                 COMMIT;",
                n % 30000,
                n % 999 + 1,
                n % 25 + 1
            ))
            .await
            .unwrap_or_else(|e| panic!("tick {n}: {e}"));
            last.store(n, Ordering::Relaxed);
        }
    });
}

#[test]
fn every_column_type_survives_copy_stream_restart_and_cutover() {
    let source = Cluster::start();
    let target = Cluster::start();
    source.create_db(DB);
    run_file(&source, DB, "types_corpus.sql", 0);
    let mut p = Pgshift::start(&source, &target, &migration("types", &[DB], ""));

    // Phase 1: the initial copy (binary for types_schema.builtins, text for
    // the tables with user types).
    let status = p.wait_state("WaitingForUserAction", STARTUP);
    let format = |table: &str| {
        status["databases"][DB]["copy"]["tables"]
            .as_array()
            .and_then(|ts| ts.iter().find(|t| t["table"] == table))
            .map(|t| t["format"].clone())
            .unwrap_or_else(|| panic!("no copy status for {table}: {status:#}"))
    };
    assert_eq!(format("types_schema.builtins"), "binary");
    assert_eq!(format("types_schema.builtins_text"), "text");
    assert_eq!(format("Tÿpes \"Ω\".Ünïcode Tåble"), "text");
    assert_same("copy", &source, &target, DB, "r,m", 13);
    assert_eq!(
        target.psql(
            DB,
            "SELECT relispopulated FROM pg_class WHERE oid = 'types_schema.mood_counts'::regclass"
        ),
        "t",
        "the materialized view is populated after the copy\n{}",
        p.log()
    );

    // Phase 2: inserts, updates (TOASTed values unchanged), deletes, rows
    // moving between partitions, under DEFAULT / USING INDEX / FULL.
    run_file(&source, DB, "types_stream.sql", 100);
    p.wait_caught_up(&source, &[DB], CATCH_UP);
    assert_same("stream", &source, &target, DB, "r,m", 13);

    // Phase 3: the target's column order differs (made by hand); an enum
    // value added on the source (DDL is replicated, in stream order, before
    // the rows that use it); replica identity FULL on tables of user types;
    // then changes again.
    target.psql(
        DB,
        "BEGIN;
         ALTER TABLE types_schema.reordered RENAME TO reordered_old;
         CREATE TABLE types_schema.reordered (c date, b int, id int PRIMARY KEY, a text);
         INSERT INTO types_schema.reordered (id, a, b, c) SELECT id, a, b, c FROM types_schema.reordered_old;
         DROP TABLE types_schema.reordered_old;
         COMMIT;",
    );
    source.psql(
        DB,
        "ALTER TYPE types_schema.mood ADD VALUE 'meh' BEFORE 'sad'",
    );
    source.psql(
        DB,
        "ALTER TABLE types_schema.arrays REPLICA IDENTITY FULL;
         ALTER TABLE \"Tÿpes \"\"Ω\"\"\".\"Ünïcode Tåble\" REPLICA IDENTITY FULL;
         ALTER TABLE types_schema.builtins_text REPLICA IDENTITY DEFAULT;",
    );
    run_file(&source, DB, "types_stream.sql", 200);
    source.psql(
        DB,
        "UPDATE types_schema.builtins_text SET mood = 'meh' WHERE id = 1;
         UPDATE types_schema.arrays SET a_mood = '{meh,NULL}' WHERE id = 1;
         DELETE FROM types_schema.arrays WHERE id = 2;
         UPDATE \"Tÿpes \"\"Ω\"\"\".\"Ünïcode Tåble\" SET e_mood = 'meh', d_mood = 'meh' WHERE \"Ïd\" = 1;
         DELETE FROM \"Tÿpes \"\"Ω\"\"\".\"Ünïcode Tåble\" WHERE \"Ïd\" = 2;
         INSERT INTO types_schema.reordered VALUES (7, 'a7', 7, '2021-02-03');",
    );
    p.wait_caught_up(&source, &[DB], CATCH_UP);
    assert_same("replica identities", &source, &target, DB, "r,m", 13);

    // Phase 4: kill -9 mid-stream, restart.
    let stop = Arc::new(AtomicBool::new(false));
    let last = Arc::new(AtomicI64::new(0));
    let writer = {
        let (url, stop, last) = (source.url(DB), stop.clone(), last.clone());
        std::thread::spawn(move || ticker(url, stop, last))
    };
    let applied = |n: i64| {
        target
            .psql(DB, "SELECT count(*) FROM types_schema.ticks")
            .parse::<i64>()
            .unwrap_or(0)
            >= n
    };
    assert!(
        wait_until(CATCH_UP, || applied(20)),
        "ticks are not applied\n{}",
        p.log()
    );
    p.kill();
    let at_kill = last.load(Ordering::Relaxed);
    p.restart();
    p.wait_state("WaitingForUserAction", STARTUP);
    assert!(
        wait_until(CATCH_UP, || applied(at_kill + 20)),
        "ticks are not applied after the restart\n{}",
        p.log()
    );
    stop.store(true, Ordering::Relaxed);
    writer.join().expect("writer");
    p.wait_caught_up(&source, &[DB], CATCH_UP);
    assert_same("kill -9 and restart", &source, &target, DB, "r,m", 13);

    // Phase 5: the cutover.
    let o = p.cli_admin(&["cutover", "--wait"]);
    assert!(
        o.status.success(),
        "cutover: {}{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
        p.log()
    );
    p.wait_state("Succeeded", STARTUP);
    // The source's materialized view is as it was; the target's is refreshed.
    assert_same("cutover", &source, &target, DB, "r", 13);
    // Refreshed again from the switched data, in the background.
    assert!(
        wait_until(CATCH_UP, || p
            .log()
            .contains("materialized view 1/1 refreshed after the switch")),
        "{}",
        p.log()
    );
    assert_eq!(
        target.psql(
            DB,
            "SELECT string_agg(format('%s=%s', e_mood, n), ',' ORDER BY e_mood) FROM types_schema.mood_counts"
        ),
        target.psql(
            DB,
            "SELECT string_agg(format('%s=%s', e_mood, n), ',' ORDER BY e_mood) FROM \
             (SELECT e_mood, count(*) AS n FROM \"Tÿpes \"\"Ω\"\"\".\"Ünïcode Tåble\" GROUP BY e_mood) x"
        ),
        "the materialized view shows the switched data"
    );

    // Phase 6: the way back. The corpus's changes made on the target after
    // the switch reach the fenced source by reverse replication, every type
    // as it is (the reordered table's columns by name).
    run_file(&target, DB, "types_stream.sql", 300);
    let end = target.psql(DB, "SELECT pg_current_wal_lsn()");
    let reached = || {
        let applied = p
            .status()
            .and_then(|s| {
                s["databases"][DB]["reverse_stream"]["applied_lsn"]
                    .as_str()
                    .map(str::to_string)
            })
            .unwrap_or_else(|| "0/0".into());
        target.psql(
            DB,
            &format!("SELECT '{applied}'::pg_lsn >= '{end}'::pg_lsn"),
        ) == "t"
    };
    assert!(
        wait_until(CATCH_UP, reached),
        "reverse replication did not catch up\n{}",
        p.log()
    );
    assert_same("reverse replication", &source, &target, DB, "r", 13);
}
