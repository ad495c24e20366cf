//! Schema changes during a migration: DDL run on the source is captured by
//! pgshift's event triggers and applied on the target in stream order,
//! between the data changes before and after it. Each step of a typical
//! application migration runs on the source under load through the proxy;
//! after each, source and target are equal row by row and in schema.

mod common;
mod e2e_common;
use common::*;
use e2e_common::*;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const STARTUP: Duration = Duration::from_secs(180);
const STALL: Duration = Duration::from_secs(120);

fn pg_dump_for(major: i32) -> PathBuf {
    client_bin_for(major)
        .map(|d| d.join("pg_dump"))
        .unwrap_or_else(|| pg_program("pg_dump"))
}

/// The application's schema before the migration.
fn populate(src: &Cluster) {
    src.create_db("shop");
    src.psql(
        "shop",
        "CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
         CREATE SCHEMA sales;
         CREATE TABLE orders(id bigserial PRIMARY KEY, amount numeric(10,2) NOT NULL,
                             legacy text, mood mood NOT NULL DEFAULT 'ok');
         CREATE TABLE events(id int, at date, PRIMARY KEY (id, at)) PARTITION BY RANGE (at);
         CREATE TABLE events_2024 PARTITION OF events FOR VALUES FROM ('2024-01-01') TO ('2025-01-01');
         CREATE TABLE big(id int PRIMARY KEY, v int NOT NULL);
         CREATE TABLE writes(id bigint PRIMARY KEY);
         INSERT INTO orders(amount, legacy) SELECT g, 'l' || g FROM generate_series(1, 2000) g;
         INSERT INTO events SELECT g, date '2024-01-01' + g FROM generate_series(1, 200) g;
         INSERT INTO big SELECT g, g FROM generate_series(1, 100000) g;
         GRANT ALL ON ALL TABLES IN SCHEMA public TO app;
         GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO app;",
    );
}

/// The steps of a typical application migration, each one client string
/// (simple query: several statements run as one transaction unless they
/// say otherwise), with data before and after the DDL in the same string
/// where the trap is there.
fn steps(source_major: i32) -> Vec<(&'static str, String)> {
    let mut s: Vec<(&'static str, String)> = vec![
        (
            "add a column with a default",
            "ALTER TABLE orders ADD COLUMN status text DEFAULT 'new'".into(),
        ),
        (
            "backfill it in batches",
            "UPDATE orders SET status = 'old' WHERE id <= 700;
             UPDATE orders SET status = 'old' WHERE id > 700 AND id <= 1400;
             UPDATE orders SET status = 'old' WHERE id > 1400"
                .into(),
        ),
        (
            "add NOT NULL",
            "ALTER TABLE orders ALTER COLUMN status SET NOT NULL".into(),
        ),
        (
            "create an index concurrently",
            "CREATE INDEX CONCURRENTLY orders_status_idx ON orders (status)".into(),
        ),
        (
            "create a table and insert into it in the same transaction",
            "BEGIN;
             CREATE TABLE audit(id bigserial PRIMARY KEY, order_id bigint REFERENCES orders(id), note text);
             INSERT INTO audit(order_id, note) SELECT id, 'created' FROM orders WHERE id <= 50;
             COMMIT"
                .into(),
        ),
        (
            "rename a column and write with the new name at once",
            "INSERT INTO orders(amount, status) VALUES (1.5, 'before');
             ALTER TABLE orders RENAME COLUMN amount TO total;
             INSERT INTO orders(total, status) VALUES (2.5, 'after');
             UPDATE orders SET total = total + 1 WHERE id <= 10"
                .into(),
        ),
        ("drop a column", "ALTER TABLE orders DROP COLUMN legacy".into()),
        (
            "add an enum value",
            "ALTER TYPE mood ADD VALUE 'ecstatic'".into(),
        ),
        (
            "use the new enum value",
            "INSERT INTO orders(total, status, mood) VALUES (3, 'x', 'ecstatic')".into(),
        ),
        (
            "create a partition and route rows to it",
            "CREATE TABLE events_2025 PARTITION OF events FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');
             INSERT INTO events SELECT g, date '2025-01-01' + g FROM generate_series(1, 100) g"
                .into(),
        ),
        (
            "several statements in one string, DDL among data",
            "INSERT INTO audit(note) VALUES ('one');
             ALTER TABLE audit ADD COLUMN seen boolean;
             UPDATE audit SET seen = true WHERE id <= 10;
             CREATE SEQUENCE ticket_no START 500;
             INSERT INTO audit(note, seen) VALUES ('two', false)"
                .into(),
        ),
        (
            "DDL inside a DO block",
            "DO $$ BEGIN EXECUTE 'CREATE INDEX audit_note_idx ON audit (note)'; END $$".into(),
        ),
        (
            "names resolved by search_path",
            "SET search_path = sales, public;
             CREATE TABLE regions(id int PRIMARY KEY, name text);
             INSERT INTO regions VALUES (1, 'north'), (2, 'south');
             CREATE INDEX ON orders (mood)"
                .into(),
        ),
        (
            "views, functions, triggers, comments, grants",
            "CREATE VIEW open_orders AS SELECT id, total FROM orders WHERE status <> 'done';
             CREATE FUNCTION touch() RETURNS trigger LANGUAGE plpgsql AS $f$ BEGIN NEW.note := coalesce(NEW.note, 'touched'); RETURN NEW; END $f$;
             CREATE TRIGGER audit_touch BEFORE INSERT ON audit FOR EACH ROW EXECUTE FUNCTION touch();
             COMMENT ON TABLE orders IS 'customer orders; see ''audit''';
             GRANT SELECT ON open_orders TO app;
             INSERT INTO audit(note) VALUES (NULL)"
                .into(),
        ),
        (
            "a table rewrite on a large table",
            "ALTER TABLE big ALTER COLUMN v TYPE bigint; UPDATE big SET v = v * 3 WHERE id % 1000 = 0".into(),
        ),
        (
            "schemas, types, materialized views, procedures, sequences, revokes, partitions",
            "CREATE SCHEMA billing;
             CREATE TYPE billing.addr AS (street text, city text);
             CREATE TABLE billing.invoices(id int PRIMARY KEY, ship_to billing.addr, amount numeric);
             INSERT INTO billing.invoices VALUES (1, ROW('Main St', 'Oslo'), 10);
             CREATE MATERIALIZED VIEW order_totals AS SELECT mood, count(*) AS n FROM orders GROUP BY mood;
             CREATE PROCEDURE close_order(order_id bigint) LANGUAGE sql AS $p$ UPDATE orders SET status = 'done' WHERE id = order_id $p$;
             CALL close_order(1);
             ALTER SEQUENCE ticket_no INCREMENT BY 5;
             REVOKE SELECT ON open_orders FROM app;
             ALTER TABLE events DETACH PARTITION events_2025;
             ALTER TABLE events ATTACH PARTITION events_2025 FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');
             CREATE TEMP TABLE scratch(x int); INSERT INTO scratch VALUES (1); DROP TABLE scratch"
                .into(),
        ),
        (
            "drop an index concurrently",
            "DROP INDEX CONCURRENTLY audit_note_idx".into(),
        ),
        (
            "drop what is no longer needed",
            "DROP VIEW open_orders; DROP INDEX orders_status_idx; ALTER TABLE audit DROP COLUMN seen;
             DROP SEQUENCE ticket_no; DROP PROCEDURE close_order(bigint)"
                .into(),
        ),
    ];
    if source_major >= 14 {
        // Detached without blocking writers (14+), which cannot run in a
        // transaction block.
        s.push((
            "detach a partition concurrently",
            "ALTER TABLE events DETACH PARTITION events_2024 CONCURRENTLY".into(),
        ));
    }
    s
}

/// Waits until the target has everything the source has, then compares
/// both row by row and in schema.
fn assert_same(p: &Pgshift, src: &Cluster, tgt: &Cluster, pg_dump: &Path, step: &str) {
    p.wait_caught_up(src, &["shop"], STALL);
    assert_eq!(
        reference_schema(src, tgt, pg_dump),
        schema_of(tgt, "shop", pg_dump),
        "schemas differ after: {step}\n{}",
        p.current_log()
    );
    let set = comparable_floats(src, tgt);
    assert_eq!(
        table_fingerprints_with(src, "shop", &set),
        table_fingerprints_with(tgt, "shop", &set),
        "rows differ after: {step}"
    );
}

/// The source's schema as the target's server prints it: of the source
/// itself when both are one major version, else of a fresh restore of the
/// source's schema into `shop_ref` on the target (views, triggers and
/// constraints print differently across versions).
fn reference_schema(src: &Cluster, tgt: &Cluster, pg_dump: &Path) -> String {
    if src.major() == tgt.major() {
        return schema_of(src, "shop", pg_dump);
    }
    restore_schema_reference(src, "shop", tgt, "shop_ref", pg_dump);
    schema_of(tgt, "shop_ref", pg_dump)
}

fn pgbench(args: &[&str], port: u16) -> std::process::Output {
    Command::new(pg_program("pgbench"))
        .args(args)
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-U",
            APP_USER,
            "shop",
        ])
        .env("PGPASSWORD", APP_PW)
        .env("PGSSLMODE", "disable")
        .output()
        .expect("run pgbench")
}

fn event_triggers(c: &Cluster) -> String {
    c.psql(
        "shop",
        "SELECT coalesce(string_agg(evtname, ','), '') FROM pg_event_trigger WHERE evtname LIKE 'pgshift%'",
    )
}

/// The whole migration set under load, then a cutover with persistent
/// prepared sessions; the capture is gone from the source afterwards.
fn application_migration(source: i32, target: i32) {
    let test = format!("ddl {source}->{target}");
    let Some((src, tgt)) = start_pair(source, target, &test) else {
        return;
    };
    populate(&src);
    let o = Command::new(pg_program("pgbench"))
        .args(["-i", "-q", "-s", "1", "-h"])
        .arg(&src.socket_dir)
        .args(["-p", &src.port.to_string(), "-U", "postgres", "shop"])
        .output()
        .expect("pgbench -i");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    src.psql(
        "shop",
        "ALTER TABLE pgbench_history ADD COLUMN id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY;
         GRANT ALL ON ALL TABLES IN SCHEMA public TO app; GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO app;",
    );
    let p = Pgshift::start(&src, &tgt, &migration("ddl", &["shop"], ""));
    p.wait_substate("WaitingForUserAction", "WaitingForCutoverTrigger", STARTUP);
    assert!(
        !event_triggers(&src).is_empty(),
        "the capture is installed on the source"
    );
    let status = p.status().unwrap();
    assert_eq!(status["ddl"]["capturing"]["shop"], true, "{status}");
    let pg_dump = pg_dump_for(target);
    assert_same(&p, &src, &tgt, &pg_dump, "the copy");

    // Each step runs beside a TPC-B burst through the proxy (prepared
    // statements); the comparison waits for the burst to end.
    let port = p.proxy_port;
    let with_load = |sql: &str| {
        let load = std::thread::spawn(move || {
            pgbench(&["-c", "2", "-T", "2", "-M", "prepared", "-n"], port)
        });
        src.psql("shop", sql);
        let o = load.join().unwrap();
        assert!(
            o.status.success(),
            "pgbench: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    };
    for (what, sql) in steps(source) {
        with_load(&sql);
        assert_same(&p, &src, &tgt, &pg_dump, what);
    }
    // DDL on a table pgbench writes, while it writes.
    with_load("ALTER TABLE pgbench_history ADD COLUMN note text DEFAULT 'x'");
    assert_same(
        &p,
        &src,
        &tgt,
        &pg_dump,
        "DDL on a table under the TPC-B load",
    );
    let status = p.status().unwrap();
    let applied = status["ddl"]["commands"]["shop"]["applied"]
        .as_u64()
        .unwrap_or(0);
    assert!(applied >= 20, "DDL applied: {status}");
    assert!(
        status["ddl"]["commands"]["shop"]["failed"].is_null(),
        "{status}"
    );
    let metrics = http(p.admin_port, "GET", "/metrics").unwrap().1;
    assert!(
        metrics.contains("pgshift_ddl_commands_total{database=\"shop\",outcome=\"applied\"}"),
        "{metrics}"
    );

    // Cutover with persistent prepared sessions writing.
    let stop = Arc::new(AtomicBool::new(false));
    let last = Arc::new(AtomicI64::new(0));
    let seen = Arc::new(Mutex::new(Seen::default()));
    let writer = {
        let (stop, last, seen) = (stop.clone(), last.clone(), seen.clone());
        std::thread::spawn(move || proxied_prepared_writer(port, "shop", stop, last, seen))
    };
    wait_until(Duration::from_secs(60), || {
        last.load(Ordering::Relaxed) > 20
    });
    let o = p.cli(&["cutover", "--wait"]);
    assert!(o.status.success(), "cutover: {}\n{}", out_text(&o), p.log());
    let after = last.load(Ordering::Relaxed);
    wait_until(Duration::from_secs(60), || {
        last.load(Ordering::Relaxed) > after + 20
    });
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    assert!(
        seen.lock().unwrap().errors.is_empty(),
        "{:?}",
        seen.lock().unwrap().errors
    );
    let n = last.load(Ordering::Relaxed);
    assert_eq!(
        tgt.psql("shop", "SELECT count(*) || ',' || max(id) FROM writes"),
        format!("{n},{n}"),
        "every acknowledged write on the target exactly once"
    );
    assert_eq!(
        event_triggers(&src),
        "",
        "the capture is removed at cutover"
    );
}

#[test]
fn ddl_replicates_an_application_migration_15() {
    application_migration(15, 15);
}

#[test]
fn ddl_replicates_an_application_migration_from_the_oldest_to_the_newest() {
    application_migration(11, 18);
}

#[test]
fn ddl_replicates_an_application_migration_18() {
    application_migration(18, 18);
}

/// A small database for the operator's cases.
fn small(src: &Cluster) {
    src.create_db("shop");
    src.psql(
        "shop",
        "CREATE TABLE t(id int PRIMARY KEY, a int);
         INSERT INTO t SELECT g, g FROM generate_series(1, 100) g;",
    );
}

fn wait_ddl_stopped(p: &Pgshift, what: &str) -> serde_json::Value {
    p.wait_status(what, STALL, |s| {
        s["databases"]["shop"]["stream"]["state"] == "apply_stopped"
            && s["ddl"]["stopped"]
                .as_array()
                .is_some_and(|a| !a.is_empty())
    })
}

/// A command the target refuses stops apply with the command and the
/// source transaction; `ddl retry` runs it again once the target is fixed,
/// `ddl skip` goes on without it. Nothing written meanwhile is lost.
#[test]
fn a_ddl_the_target_refuses_stops_apply_until_the_operator_decides() {
    let Some((src, tgt)) = start_pair(14, 18, "ddl refused") else {
        return;
    };
    small(&src);
    let p = Pgshift::start(&src, &tgt, &migration("ddl-refused", &["shop"], ""));
    p.wait_substate("WaitingForUserAction", "WaitingForCutoverTrigger", STARTUP);
    let pg_dump = pg_dump_for(18);

    // Retry: the target has a table of that name already.
    tgt.psql("shop", "CREATE TABLE blocker(x text)");
    src.psql(
        "shop",
        "CREATE TABLE blocker(id int PRIMARY KEY); INSERT INTO blocker VALUES (1);
         INSERT INTO t VALUES (101, 101)",
    );
    let s = wait_ddl_stopped(&p, "apply stopped on CREATE TABLE blocker");
    let err = s["databases"]["shop"]["stream"]["last_error"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        err.contains("CREATE TABLE blocker") && err.contains("already exists"),
        "{err}"
    );
    assert!(err.contains("pgshift ddl retry"), "{err}");
    assert_eq!(
        tgt.psql("shop", "SELECT count(*) FROM t"),
        "100",
        "nothing of the transaction applied"
    );
    src.psql("shop", "INSERT INTO t VALUES (102, 102)");
    tgt.psql("shop", "DROP TABLE blocker");
    let o = p.cli(&["ddl", "retry"]);
    assert!(o.status.success(), "{}", out_text(&o));
    assert_same(&p, &src, &tgt, &pg_dump, "ddl retry");

    // Skip: the operator already made the same index by hand.
    tgt.psql("shop", "CREATE INDEX t_a_idx ON t (a)");
    src.psql(
        "shop",
        "CREATE INDEX t_a_idx ON t (a); INSERT INTO t VALUES (103, 103)",
    );
    let s = wait_ddl_stopped(&p, "apply stopped on CREATE INDEX t_a_idx");
    let id = s["ddl"]["stopped"][0]["id"].as_str().unwrap().to_string();
    // `ddl apply` is for a table that no longer matches, not for this.
    let o = p.cli(&["ddl", "apply", "--database", "shop"]);
    assert!(!o.status.success(), "{}", out_text(&o));
    let o = p.cli(&["ddl", "skip", "--database", "shop"]);
    assert!(o.status.success(), "{}", out_text(&o));
    assert_same(&p, &src, &tgt, &pg_dump, "ddl skip");
    let s = p.status().unwrap();
    let recent = s["ddl"]["recent"].as_array().unwrap();
    assert!(
        recent
            .iter()
            .any(|r| r["id"] == id.as_str() && r["outcome"] == "skipped"),
        "{s}"
    );
    assert!(
        s["ddl"]["commands"]["shop"]["failed"].as_u64().unwrap() >= 2,
        "{s}"
    );
    let o = p.cli(&["ddl", "retry"]);
    assert!(
        !o.status.success(),
        "nothing is stopped any more: {}",
        out_text(&o)
    );
}

/// `ddl = "stop"`: no capture; a schema change stops apply with the
/// source's definition and a ready command, which `ddl apply` runs.
#[test]
fn ddl_stop_mode_offers_a_ready_command() {
    let Some((src, tgt)) = start_pair(15, 15, "ddl stop") else {
        return;
    };
    small(&src);
    let p = Pgshift::start(
        &src,
        &tgt,
        &migration("ddl-stop", &["shop"], "ddl = \"stop\""),
    );
    p.wait_substate("WaitingForUserAction", "WaitingForCutoverTrigger", STARTUP);
    assert_eq!(event_triggers(&src), "", "no capture in stop mode");
    src.psql(
        "shop",
        "ALTER TABLE t ADD COLUMN b text NOT NULL DEFAULT 'x'; INSERT INTO t VALUES (101, 1, 'y')",
    );
    let s = wait_ddl_stopped(&p, "apply stopped on the new column");
    let stop = &s["ddl"]["stopped"][0];
    assert_eq!(
        stop["statement"].as_str().unwrap(),
        "ALTER TABLE \"public\".\"t\" ADD COLUMN \"b\" text DEFAULT 'x'::text NOT NULL;",
        "{s}"
    );
    let o = p.cli(&["ddl", "skip"]);
    assert!(!o.status.success(), "nothing to skip: {}", out_text(&o));
    let o = p.cli(&["ddl", "apply"]);
    assert!(o.status.success(), "{}", out_text(&o));
    assert_same(&p, &src, &tgt, &pg_dump_for(15), "ddl apply");
}

/// Cancel removes the capture from the source.
#[test]
fn cancel_removes_the_capture() {
    let Some((src, tgt)) = start_pair(12, 15, "ddl cancel") else {
        return;
    };
    small(&src);
    let p = Pgshift::start(&src, &tgt, &migration("ddl-cancel", &["shop"], ""));
    p.wait_substate("WaitingForUserAction", "WaitingForCutoverTrigger", STARTUP);
    assert_ne!(event_triggers(&src), "");
    src.psql(
        "shop",
        "ALTER TABLE t ADD COLUMN b int; INSERT INTO t VALUES (101, 1, 2)",
    );
    assert_same(&p, &src, &tgt, &pg_dump_for(15), "add a column on 12");
    let o = p.cli(&["cancel"]);
    assert!(o.status.success(), "{}", out_text(&o));
    p.wait_state("Canceled", STARTUP);
    assert_eq!(event_triggers(&src), "");
    assert_eq!(
        src.psql(
            "shop",
            "SELECT count(*) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = 'pgshift'"
        ),
        "0"
    );
}

/// With `tables` / `exclude_tables` the publication lists tables: a table
/// created in the migrated set joins it in its own transaction, so rows
/// inserted right after the CREATE flow; one outside the set is neither
/// created on the target nor streamed.
fn listed_publication(source: i32, target: i32) {
    let Some((src, tgt)) = start_pair(source, target, "ddl listed publication") else {
        return;
    };
    small(&src);
    src.psql("shop", "CREATE SCHEMA scratch");
    let p = Pgshift::start(
        &src,
        &tgt,
        &migration("ddl-listed", &["shop"], "exclude_tables = [\"scratch.*\"]"),
    );
    p.wait_substate("WaitingForUserAction", "WaitingForCutoverTrigger", STARTUP);
    src.psql(
        "shop",
        "CREATE TABLE fresh(id int PRIMARY KEY, v text); INSERT INTO fresh VALUES (1, 'a'), (2, 'b');
         CREATE TABLE scratch.tmp(id int PRIMARY KEY); INSERT INTO scratch.tmp VALUES (1);
         CREATE TABLE made AS SELECT g AS id FROM generate_series(1, 5) g;
         ALTER TABLE made ADD PRIMARY KEY (id)",
    );
    src.psql(
        "shop",
        "INSERT INTO fresh VALUES (3, 'c'); INSERT INTO made VALUES (6)",
    );
    p.wait_caught_up(&src, &["shop"], STALL);
    assert_eq!(
        tgt.psql("shop", "SELECT string_agg(v, ',' ORDER BY id) FROM fresh"),
        "a,b,c"
    );
    assert_eq!(tgt.psql("shop", "SELECT count(*) FROM made"), "6");
    assert_eq!(
        tgt.psql("shop", "SELECT to_regclass('scratch.tmp') IS NULL"),
        "t",
        "an excluded table is not created on the target"
    );
    let s = p.status().unwrap();
    assert!(
        s["ddl"]["commands"]["shop"]["ignored"].as_u64().unwrap() >= 1,
        "{s}"
    );
}

#[test]
fn new_tables_join_a_listed_publication_11() {
    listed_publication(11, 15);
}

#[test]
fn new_tables_join_a_listed_publication_16() {
    listed_publication(16, 18);
}

/// The core of an application migration from every source version the
/// version matrix covers, to the newest target.
#[test]
fn ddl_from_every_source_version() {
    for source in 11..=18 {
        let Some((src, tgt)) = start_pair(source, 18, &format!("ddl from {source}")) else {
            continue;
        };
        small(&src);
        src.psql("shop", "CREATE TYPE mood AS ENUM ('ok')");
        let p = Pgshift::start(&src, &tgt, &migration("ddl-every", &["shop"], ""));
        p.wait_substate("WaitingForUserAction", "WaitingForCutoverTrigger", STARTUP);
        let pg_dump = pg_dump_for(18);
        for (what, sql) in [
            (
                "add a column and backfill it",
                "ALTER TABLE t ADD COLUMN b text DEFAULT 'x'; UPDATE t SET b = 'y' WHERE id <= 10",
            ),
            (
                "create an index concurrently",
                "CREATE INDEX CONCURRENTLY t_b_idx ON t (b)",
            ),
            (
                "create a table and use it in one transaction",
                "BEGIN; CREATE TABLE u(id serial PRIMARY KEY, t_id int REFERENCES t(id));
                 INSERT INTO u(t_id) VALUES (1), (2); COMMIT",
            ),
            (
                "rename and write",
                "ALTER TABLE t RENAME COLUMN a TO aa; INSERT INTO t(id, aa) VALUES (1000, 1)",
            ),
            ("add an enum value", "ALTER TYPE mood ADD VALUE 'great'"),
            (
                "use it",
                "ALTER TABLE t ADD COLUMN m mood; UPDATE t SET m = 'great' WHERE id = 1",
            ),
            ("drop", "ALTER TABLE t DROP COLUMN b; DROP TABLE u"),
        ] {
            src.psql("shop", sql);
            assert_same(&p, &src, &tgt, &pg_dump, &format!("{what} (from {source})"));
        }
    }
}

/// DDL in the middle of a transaction large enough to be streamed while
/// in progress (14+): applied in that transaction's own target session,
/// between its rows; a rollback to a savepoint undoes DDL too.
#[test]
fn ddl_inside_a_streamed_transaction() {
    if !version_or_skip(16, "ddl streamed") {
        return;
    }
    let src = Cluster::start_with(ClusterOptions {
        version: Some(16),
        conf: vec!["logical_decoding_work_mem = 64kB".into()],
        ..Default::default()
    });
    let tgt = Cluster::start_version(16);
    small(&src);
    let p = Pgshift::start(&src, &tgt, &migration("ddl-streamed", &["shop"], ""));
    p.wait_substate("WaitingForUserAction", "WaitingForCutoverTrigger", STARTUP);
    src.psql(
        "shop",
        "BEGIN;
         INSERT INTO t SELECT g, g FROM generate_series(1000, 20000) g;
         ALTER TABLE t ADD COLUMN note text DEFAULT 'n';
         INSERT INTO t SELECT g, g, 'after ' || g FROM generate_series(20001, 40000) g;
         SAVEPOINT s;
         ALTER TABLE t ADD COLUMN gone int;
         INSERT INTO t SELECT g, g, 'gone', g FROM generate_series(40001, 41000) g;
         ROLLBACK TO SAVEPOINT s;
         CREATE TABLE side(id int PRIMARY KEY);
         INSERT INTO side SELECT g FROM generate_series(1, 5000) g;
         COMMIT",
    );
    assert_same(
        &p,
        &src,
        &tgt,
        &pg_dump_for(16),
        "DDL in a streamed transaction",
    );
    let s = p.status().unwrap();
    assert!(
        s["ddl"]["commands"]["shop"]["applied"].as_u64().unwrap() >= 2,
        "{s}"
    );
}

/// A LATIN1 source: the event's text is UTF-8, apply's session speaks the
/// source's encoding; non-ASCII names and literals arrive intact.
#[test]
fn ddl_in_a_latin1_database() {
    let src = Cluster::start_with(ClusterOptions {
        encoding: Some("LATIN1".into()),
        ..Default::default()
    });
    let tgt = Cluster::start_with(ClusterOptions {
        encoding: Some("LATIN1".into()),
        ..Default::default()
    });
    small(&src);
    let p = Pgshift::start(&src, &tgt, &migration("ddl-latin1", &["shop"], ""));
    p.wait_substate("WaitingForUserAction", "WaitingForCutoverTrigger", STARTUP);
    src.psql(
        "shop",
        "ALTER TABLE t ADD COLUMN \"café\" text DEFAULT 'crème brûlée';
         CREATE TABLE \"Größe\"(id int PRIMARY KEY, v text DEFAULT 'ä');
         INSERT INTO \"Größe\"(id) VALUES (1); INSERT INTO t(id, a) VALUES (500, 1);
         INSERT INTO t(id, a, \"café\") VALUES (501, 2, 'déjà vu')",
    );
    assert_same(
        &p,
        &src,
        &tgt,
        &pg_dump_for(15),
        "DDL with non-ASCII names in LATIN1",
    );
}

/// DDL run inside DO blocks and a plpgsql function: the query string holds
/// no statement of its own, so tables are rebuilt from the definition the
/// capture sends (`CREATE TABLE`) or reconciled with the target's
/// (`ALTER TABLE`).
fn nested_steps(source_major: i32) -> Vec<(&'static str, String)> {
    let mut s: Vec<(&'static str, String)> = vec![
        (
            "create a table (serial key, default, check, foreign key, collation) in a DO block and insert into it",
            "DO $$ BEGIN
               EXECUTE 'CREATE TABLE items(id serial PRIMARY KEY, order_id bigint REFERENCES orders(id),
                          qty int NOT NULL DEFAULT 1 CHECK (qty > 0), name text COLLATE \"C\")';
               INSERT INTO items(order_id, qty, name) SELECT id, 2, 'n' || id FROM orders WHERE id <= 20;
             END $$"
                .into(),
        ),
        (
            "a function adds a column with a default and NOT NULL",
            "CREATE FUNCTION migrate() RETURNS void LANGUAGE plpgsql AS $f$
               BEGIN EXECUTE 'ALTER TABLE items ADD COLUMN status text NOT NULL DEFAULT ''new'''; END $f$;
             SELECT migrate();
             INSERT INTO items(order_id, name) VALUES (1, 'after')"
                .into(),
        ),
        (
            "a function renames a column",
            "CREATE OR REPLACE FUNCTION migrate() RETURNS void LANGUAGE plpgsql AS $f$
               BEGIN EXECUTE 'ALTER TABLE items RENAME COLUMN name TO label'; END $f$;
             SELECT migrate();
             INSERT INTO items(order_id, label) VALUES (2, 'renamed')"
                .into(),
        ),
        (
            "change a column's type in a DO block",
            "DO $$ BEGIN EXECUTE 'ALTER TABLE items ALTER COLUMN qty TYPE bigint'; END $$;
             UPDATE items SET qty = 5000000000 WHERE id = 1"
                .into(),
        ),
        (
            "drop a column in a DO block",
            "DO $$ BEGIN ALTER TABLE orders DROP COLUMN legacy; END $$".into(),
        ),
        (
            "add and drop constraints in a DO block",
            "DO $$ BEGIN
               ALTER TABLE items ADD CONSTRAINT items_label_len CHECK (length(label) < 100);
               ALTER TABLE items DROP CONSTRAINT items_qty_check;
               ALTER TABLE items ALTER COLUMN label SET NOT NULL;
               ALTER TABLE items ALTER COLUMN status SET DEFAULT 'fresh';
             END $$;
             INSERT INTO items(order_id, label, qty) VALUES (3, 'checked', -1)"
                .into(),
        ),
        (
            "two renames in one DO block (each command carries its own definition)",
            "DO $$ BEGIN
               ALTER TABLE items RENAME COLUMN label TO title;
               ALTER TABLE items RENAME COLUMN status TO state;
             END $$;
             INSERT INTO items(order_id, title) VALUES (4, 'two renames')"
                .into(),
        ),
        (
            "create a partition of a partitioned table in a DO block and route rows to it",
            "DO $$ BEGIN
               EXECUTE 'CREATE TABLE events_2026 PARTITION OF events FOR VALUES FROM (''2026-01-01'') TO (''2027-01-01'')';
               INSERT INTO events SELECT g, date '2026-01-01' + g FROM generate_series(1, 50) g;
             END $$"
                .into(),
        ),
        (
            "a function creates a partitioned table, its partition and an identity table",
            "CREATE OR REPLACE FUNCTION migrate() RETURNS void LANGUAGE plpgsql AS $f$ BEGIN
               CREATE TABLE metrics(id int, at date NOT NULL, v int DEFAULT 0, PRIMARY KEY (id, at)) PARTITION BY RANGE (at);
               CREATE TABLE metrics_2026 PARTITION OF metrics FOR VALUES FROM ('2026-01-01') TO ('2027-01-01');
               INSERT INTO metrics VALUES (1, '2026-02-01', 5);
               CREATE TABLE notes(id int GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, body text);
               INSERT INTO notes(body) VALUES ('a'), ('b');
             END $f$;
             SELECT migrate()"
                .into(),
        ),
        (
            "add a serial column to an empty table and drop a column in a function",
            "CREATE TABLE drafts(id int PRIMARY KEY, junk text);
             CREATE OR REPLACE FUNCTION migrate() RETURNS void LANGUAGE plpgsql AS $f$ BEGIN
               ALTER TABLE drafts ADD COLUMN n serial;
               ALTER TABLE drafts DROP COLUMN junk;
             END $f$;
             SELECT migrate();
             INSERT INTO drafts(id) VALUES (1), (2)"
                .into(),
        ),
    ];
    if source_major >= 12 {
        s.push((
            "a generated column in a DO block",
            "DO $$ BEGIN
               ALTER TABLE notes ADD COLUMN shout text GENERATED ALWAYS AS (upper(body)) STORED;
             END $$;
             INSERT INTO notes(body) VALUES ('c')"
                .into(),
        ));
    }
    s
}

fn ddl_nested(source: i32, target: i32) {
    let test = format!("ddl nested {source}->{target}");
    let Some((src, tgt)) = start_pair(source, target, &test) else {
        return;
    };
    populate(&src);
    let p = Pgshift::start(&src, &tgt, &migration("ddl-nested", &["shop"], ""));
    p.wait_substate("WaitingForUserAction", "WaitingForCutoverTrigger", STARTUP);
    let pg_dump = pg_dump_for(target);
    let same = |what: &str| assert_same(&p, &src, &tgt, &pg_dump, what);
    same("the copy");
    for (what, sql) in nested_steps(source) {
        src.psql("shop", &sql);
        same(what);
    }
    let status = p.status().unwrap();
    assert!(
        status["ddl"]["commands"]["shop"]["failed"].is_null(),
        "{status}"
    );
    assert!(
        p.current_log().contains("DDL applied (reconciled)"),
        "ALTER TABLE inside DO blocks is reconciled"
    );

    // What the definition does not show (a partition attached to the
    // table the command names) stops apply, saying why.
    src.psql(
        "shop",
        "CREATE TABLE events_2027 (id int NOT NULL, at date NOT NULL);
         DO $$ BEGIN
           ALTER TABLE events ATTACH PARTITION events_2027 FOR VALUES FROM ('2027-01-01') TO ('2028-01-01');
         END $$",
    );
    let stopped = wait_until(STALL, || {
        p.status().is_some_and(|s| {
            let db = &s["databases"]["shop"];
            db["stream"]["state"] == "apply_stopped"
                && db.to_string().contains("inside a function or a DO block")
        })
    });
    let status = p.status().unwrap_or_default();
    assert!(stopped, "apply stops: {status}");
    // The operator goes on without it and attaches the partition on the
    // target by hand.
    let o = p.cli(&["ddl", "skip"]);
    assert!(o.status.success(), "{}", out_text(&o));
    p.wait_caught_up(&src, &["shop"], STALL);
    tgt.psql(
        "shop",
        "ALTER TABLE events ATTACH PARTITION events_2027 FOR VALUES FROM ('2027-01-01') TO ('2028-01-01')",
    );
    same("an ATTACH PARTITION inside a DO block, skipped and made by hand");
}

#[test]
fn ddl_inside_do_blocks_and_functions() {
    ddl_nested(15, 15);
}

#[test]
fn ddl_inside_do_blocks_and_functions_from_the_oldest_to_the_newest() {
    ddl_nested(11, 18);
}

#[test]
fn ddl_inside_do_blocks_and_functions_18() {
    ddl_nested(18, 18);
}

/// `kill -9` of pgshift while DDL and rows keep coming on the source: the
/// restarted apply resumes from the replication origin and applies each
/// command exactly once (a rebuilt concurrent index is not built twice).
#[test]
fn ddl_survives_a_kill_and_restart() {
    let Some((src, tgt)) = start_pair(15, 15, "ddl kill") else {
        return;
    };
    small(&src);
    let mut p = Pgshift::start(&src, &tgt, &migration("ddl-kill", &["shop"], ""));
    p.wait_substate("WaitingForUserAction", "WaitingForCutoverTrigger", STARTUP);
    let pg_dump = pg_dump_for(15);
    src.psql(
        "shop",
        "ALTER TABLE t ADD COLUMN b int DEFAULT 1; INSERT INTO t VALUES (101, 1, 2)",
    );
    src.psql("shop", "CREATE INDEX CONCURRENTLY t_b_idx ON t (b)");
    // Killed at once, with the commands above possibly half applied.
    p.kill();
    src.psql(
        "shop",
        "CREATE TABLE u(id int PRIMARY KEY); INSERT INTO u VALUES (1), (2);
         ALTER TABLE t RENAME COLUMN b TO bb; INSERT INTO t VALUES (102, 2, 3)",
    );
    src.psql("shop", "CREATE INDEX CONCURRENTLY u_id_idx ON u (id)");
    p.restart();
    assert_same(&p, &src, &tgt, &pg_dump, "DDL across a kill -9 and restart");
    p.kill();
    p.restart();
    src.psql(
        "shop",
        "INSERT INTO u VALUES (3); ALTER TABLE u ADD COLUMN v text",
    );
    assert_same(&p, &src, &tgt, &pg_dump, "after a second restart");
}

/// Anyone may emit a logical message with the capture's prefix: one that
/// pgshift's capture did not sign is never run on the target, and apply
/// goes on (counted as rejected).
#[test]
fn a_forged_ddl_message_is_never_run() {
    let Some((src, tgt)) = start_pair(16, 16, "ddl forged") else {
        return;
    };
    small(&src);
    let p = Pgshift::start(&src, &tgt, &migration("ddl-forged", &["shop"], ""));
    p.wait_substate("WaitingForUserAction", "WaitingForCutoverTrigger", STARTUP);
    let stem = src.psql(
        "shop",
        "SELECT substring(evtname from 'pgshift_(ddl_[0-9a-f]+)_end') FROM pg_event_trigger WHERE evtname LIKE 'pgshift_ddl_%_end'",
    );
    let prefix = format!("pgshift-ddl:{}", stem.trim_start_matches("ddl_"));
    let event = r#"{"v":1,"kind":"end","id":"1.1","tag":"DROP TABLE","nth":0,"query":"DROP TABLE t","objects":[]}"#;
    src.psql(
        "shop",
        &format!(
            "SET ROLE app;
             SELECT pg_logical_emit_message(true, '{prefix}', '{} {event}');
             SELECT pg_logical_emit_message(true, '{prefix}', '{event}');
             RESET ROLE;
             INSERT INTO t VALUES (101, 101)",
            "00".repeat(32)
        ),
    );
    assert_same(&p, &src, &tgt, &pg_dump_for(16), "forged DDL messages");
    assert_eq!(tgt.psql("shop", "SELECT count(*) FROM t"), "101");
    let s = p.status().unwrap();
    assert_eq!(s["ddl"]["commands"]["shop"]["rejected"], 2, "{s}");
}
