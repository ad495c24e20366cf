//! End to end through the real `pgshift run` binary: an online migration
//! with writes directly and through the proxy, `status` outputs, the
//! `validate` option, cancel, overwrite, and table filters.

mod common;
mod e2e_common;
use common::*;
use e2e_common::*;

use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pgshift::replication::names::ReplicationNames;

const STARTUP: Duration = Duration::from_secs(120);

/// Tables with an identity column, a generated column, a foreign key, jsonb
/// and a sequence no column owns.
const SHOP: &str = "
CREATE TABLE items(id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, name text NOT NULL,
                   price numeric(10,2), doubled numeric GENERATED ALWAYS AS (price * 2) STORED);
CREATE TABLE orders(id serial PRIMARY KEY, item_id bigint REFERENCES items(id), qty int, note text);
CREATE SEQUENCE invoice_no START 1000;
CREATE TABLE invoices(no bigint PRIMARY KEY DEFAULT nextval('invoice_no'), body jsonb);
INSERT INTO items(name, price) SELECT 'item ' || g, g FROM generate_series(1, 500) g;
INSERT INTO orders(item_id, qty, note) SELECT g % 500 + 1, g, repeat('x', g % 50) FROM generate_series(1, 2000) g;
INSERT INTO invoices(body) SELECT jsonb_build_object('n', g) FROM generate_series(1, 100) g;
GRANT ALL ON ALL TABLES IN SCHEMA public TO app;
GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO app;
";

fn shop(source: &Cluster) {
    source.create_db("shop");
    source.psql("shop", SHOP);
}

/// Runs SQL as `app` through the proxy with psql (a real client).
fn psql_via_proxy(p: &Pgshift, db: &str, sql: &str) -> String {
    let o = Command::new(pg_program("psql"))
        .args(["-X", "-q", "-At", "-v", "ON_ERROR_STOP=1"])
        .args(["-h", "127.0.0.1", "-p", &p.proxy_port.to_string()])
        .args(["-U", APP_USER, "-d", db, "-c", sql])
        .env("PGPASSWORD", APP_PW)
        .output()
        .expect("run psql");
    assert!(
        o.status.success(),
        "psql through the proxy failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

#[test]
fn online_migration_streams_direct_and_proxied_writes() {
    let source = Cluster::start();
    let target = Cluster::start();
    shop(&source);
    let p = Pgshift::start(&source, &target, &migration("e2e", &["shop"], ""));

    let s = p.wait_state("WaitingForUserAction", STARTUP);
    assert_eq!(s["substate"], "WaitingForCutoverTrigger");
    assert_eq!(s["databases"]["shop"]["phase"], "streaming");
    assert_eq!(s["proxy"]["route"], "source");
    // A sequence no column owns is copied with its value.
    assert_eq!(
        target.psql("shop", "SELECT last_value FROM invoice_no"),
        source.psql("shop", "SELECT last_value FROM invoice_no")
    );

    source.psql(
        "shop",
        "INSERT INTO items(name, price) SELECT 'late ' || g, g FROM generate_series(1, 100) g;
         UPDATE orders SET qty = qty + 1, note = 'changed' WHERE id % 7 = 0;
         DELETE FROM orders WHERE id % 11 = 0;",
    );
    psql_via_proxy(
        &p,
        "shop",
        "INSERT INTO orders(item_id, qty, note) SELECT g, g, 'via proxy' FROM generate_series(1, 50) g;
         INSERT INTO invoices(body) VALUES ('{\"via\": \"proxy\"}');
         UPDATE items SET price = price + 1 WHERE id <= 10;",
    );

    p.wait_caught_up(&source, &["shop"], Duration::from_secs(60));
    p.assert_exact_copy(&source, &target, &["shop"]);
    assert_eq!(
        target.psql(
            "shop",
            "SELECT count(*) FROM orders WHERE note = 'via proxy'"
        ),
        "50"
    );
    // The generated column is computed on the target from the streamed value.
    assert_eq!(
        target.psql("shop", "SELECT doubled FROM items WHERE id = 1"),
        "4.00"
    );

    // `pgshift status` against the running binary: the table and the JSON.
    let table = p.cli_admin(&["status"]);
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(
        table.status.success()
            && text.contains("WaitingForUserAction / WaitingForCutoverTrigger")
            && text
                .lines()
                .any(|l| l.starts_with("shop") && l.contains("streaming")),
        "status table:\n{text}"
    );
    let json = p.cli_admin(&["status", "--json"]);
    let doc: serde_json::Value = serde_json::from_slice(&json.stdout).expect("status --json");
    // (lag_bytes itself moves with any WAL the source writes meanwhile.)
    assert_eq!(doc["state"], "WaitingForUserAction");
    assert_eq!(doc["databases"]["shop"]["stream"]["state"], "streaming");
}

#[test]
fn validate_option_stops_after_validation() {
    let source = Cluster::start();
    let target = Cluster::start();
    shop(&source);

    let mut p = Pgshift::start(
        &source,
        &target,
        &migration("check", &["shop"], "option = \"validate\""),
    );
    let s = p.wait_state("Succeeded", STARTUP);
    assert_eq!(s["substate"], "Completed");
    assert!(slots(&source).is_empty(), "validate creates no slot");
    p.kill();

    // Online mode cannot carry a table without a key.
    source.psql("shop", "CREATE TABLE nokey(a int, b text)");
    let p = Pgshift::start(
        &source,
        &target,
        &migration("check2", &["shop"], "option = \"validate\""),
    );
    let s = p.wait_state("ValidationFailed", STARTUP);
    let reason = s["reason"].as_str().unwrap_or("");
    assert!(reason.contains("nokey"), "reason names the table: {reason}");
    assert!(slots(&source).is_empty());
}

#[test]
fn cancel_releases_the_source_and_stays_canceled() {
    let source = Cluster::start();
    let target = Cluster::start();
    shop(&source);
    let mut p = Pgshift::start(&source, &target, &migration("gone", &["shop"], ""));
    p.wait_state("WaitingForUserAction", STARTUP);
    let names = ReplicationNames::new("gone", "shop");
    assert_eq!(slots(&source), vec![format!("{}@shop", names.slot)]);
    assert_eq!(
        publications(&source, "shop"),
        vec![names.publication.clone()]
    );

    let o = p.cli_admin(&["cancel"]);
    assert!(
        o.status.success(),
        "cancel: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let s = p.wait_state("Canceled", STARTUP);
    assert!(s["reason"].as_str().unwrap_or("").contains("canceled"));
    assert!(slots(&source).is_empty(), "slot left: {:?}", slots(&source));
    assert!(publications(&source, "shop").is_empty());
    // The target is left as it is.
    assert_eq!(target.psql("shop", "SELECT count(*) FROM orders"), "2000");

    // A restart does not start a canceled migration again.
    p.kill();
    p.restart();
    // It comes back Canceled, and stays so: a short watch for something that
    // must NOT happen (a slot created again, another state).
    p.wait_state("Canceled", STARTUP);
    for _ in 0..15 {
        std::thread::sleep(Duration::from_millis(200));
        if let Some(s) = p.status() {
            assert_eq!(s["state"], "Canceled", "{s:#}");
        }
        assert!(slots(&source).is_empty());
    }
    // And a second cancel is refused.
    let o = p.cli_admin(&["cancel"]);
    assert!(!o.status.success());
}

#[test]
fn overwrite_false_refuses_a_non_empty_target_and_true_recreates_it() {
    let source = Cluster::start();
    let target = Cluster::start();
    shop(&source);
    target.create_db("shop");
    target.psql(
        "shop",
        "CREATE TABLE precious(x int); INSERT INTO precious VALUES (1)",
    );

    // Refused by validation, and (option = migrate, no validation) by the
    // copy itself when it prepares the target database.
    for (name, option, state) in [
        ("ow", "validate-and-migrate", "ValidationFailed"),
        ("ow-m", "migrate", "Failed"),
    ] {
        let mut p = Pgshift::start(
            &source,
            &target,
            &migration(name, &["shop"], &format!("option = \"{option}\"")),
        );
        let s = p.wait_state(state, STARTUP);
        let reason = s["reason"].as_str().unwrap_or("");
        assert!(
            reason.contains("shop") && reason.contains("overwrite"),
            "the reason says what to do: {reason}"
        );
        // Nothing was dropped.
        assert_eq!(target.psql("shop", "SELECT count(*) FROM precious"), "1");
        assert!(
            slots(&source).is_empty(),
            "no slot left: {:?}",
            slots(&source)
        );
        assert!(publications(&source, "shop").is_empty());
        p.kill();
    }

    let p = Pgshift::start(
        &source,
        &target,
        &migration("ow2", &["shop"], "overwrite = true"),
    );
    p.wait_state("WaitingForUserAction", STARTUP);
    assert_eq!(
        target.psql(
            "shop",
            "SELECT count(*) FROM pg_class WHERE relname = 'precious'"
        ),
        "0"
    );
    p.wait_caught_up(&source, &["shop"], Duration::from_secs(60));
    p.assert_exact_copy(&source, &target, &["shop"]);
}

#[test]
fn table_filters_apply_to_copy_and_stream() {
    let source = Cluster::start();
    let target = Cluster::start();
    source.create_db("shop");
    source.psql(
        "shop",
        "CREATE SCHEMA other;
         CREATE TABLE keep(id int PRIMARY KEY, v text);
         CREATE TABLE skip_me(id int PRIMARY KEY, v text);
         CREATE TABLE other.b(id int PRIMARY KEY, v text);
         INSERT INTO keep SELECT g, 'k' FROM generate_series(1, 100) g;
         INSERT INTO skip_me SELECT g, 's' FROM generate_series(1, 100) g;
         INSERT INTO other.b SELECT g, 'b' FROM generate_series(1, 100) g;",
    );
    let p = Pgshift::start(
        &source,
        &target,
        &migration(
            "filtered",
            &["shop"],
            "tables = [\"public.*\"]\nexclude_tables = [\"public.skip_*\"]",
        ),
    );
    p.wait_state("WaitingForUserAction", STARTUP);
    source.psql(
        "shop",
        "INSERT INTO keep SELECT g, 'k2' FROM generate_series(101, 150) g;
         INSERT INTO skip_me SELECT g, 's2' FROM generate_series(101, 150) g;
         INSERT INTO other.b SELECT g, 'b2' FROM generate_series(101, 150) g;",
    );
    p.wait_caught_up(&source, &["shop"], Duration::from_secs(60));
    let (code, out) = p.verify();
    assert_eq!(code, 0, "verify (filtered):\n{out}");
    assert_eq!(target.psql("shop", "SELECT count(*) FROM keep"), "150");
    // Left-out tables are not created on the target (their schema is).
    for t in ["skip_me", "other.b"] {
        assert_eq!(
            target.psql("shop", &format!("SELECT to_regclass('{t}') IS NULL")),
            "t",
            "{t} was created on the target"
        );
    }
    assert_eq!(
        target.psql(
            "shop",
            "SELECT count(*) FROM pg_namespace WHERE nspname = 'other'"
        ),
        "1"
    );
}

#[test]
fn online_cutover_moves_a_proxied_writer_to_the_target() {
    let source = Cluster::start();
    let target = Cluster::start();
    shop(&source);
    source.psql(
        "shop",
        "CREATE TABLE writes(id bigint PRIMARY KEY, at timestamptz NOT NULL DEFAULT clock_timestamp());
         GRANT ALL ON writes TO app;",
    );
    // Without a rollback window (tests/rollback.rs has the window): no
    // reverse replication, so the source keeps only what it had at the switch.
    let p = Pgshift::start(
        &source,
        &target,
        &format!(
            "{}\n[cutover]\nrollback = false\n",
            migration("move", &["shop"], "")
        ),
    );
    p.wait_state("WaitingForUserAction", STARTUP);

    let stop = Arc::new(AtomicBool::new(false));
    let last = Arc::new(AtomicI64::new(0));
    let seen = Arc::new(Mutex::new(Seen::default()));
    let writer = {
        let (port, stop, last, seen) = (p.proxy_port, stop.clone(), last.clone(), seen.clone());
        std::thread::spawn(move || proxied_writer(port, "shop", stop, last, seen))
    };
    assert!(wait_until(STARTUP, || last.load(Ordering::Relaxed) > 50));
    let o = p.cli_admin(&["cutover", "--wait"]);
    assert!(
        o.status.success(),
        "cutover: {}{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
        p.log()
    );
    let s = p.wait_state("Succeeded", STARTUP);
    assert_eq!(s["proxy"]["route"], "target");
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
    // No write failed and the writer went on after the switch (above); how
    // short the pause is, is a benchmark's business (bench/cutover.sh), not
    // a test's: it depends on the machine.
    eprintln!("slowest write across the cutover: {:?}", seen.slowest);
    let n = last.load(Ordering::Relaxed);
    assert_eq!(
        target.psql(
            "shop",
            "SELECT count(*), count(DISTINCT id), max(id) FROM writes"
        ),
        format!("{n}|{n}|{n}")
    );
    // The writes after the switch went to the target only.
    let on_source: i64 = source
        .psql("shop", "SELECT count(*) FROM writes")
        .parse()
        .unwrap();
    assert!(on_source < n, "source {on_source}, total {n}");
    // The sequences were carried at the switch, so new ids do not collide.
    psql_via_proxy(
        &p,
        "shop",
        "INSERT INTO orders(item_id, qty, note) VALUES (1, 1, 'after')",
    );
    assert!(slots(&source).is_empty(), "slot dropped after cutover");
}

#[test]
fn copy_roles_brings_owners_and_grants_before_the_schema() {
    let source = Cluster::start();
    let target = Cluster::start();
    shop(&source);
    source.psql(
        "postgres",
        "CREATE ROLE reporting LOGIN PASSWORD 'r'; CREATE ROLE auditors NOLOGIN;
         GRANT auditors TO reporting;",
    );
    source.psql(
        "shop",
        "CREATE TABLE reports(id int PRIMARY KEY, body text);
         ALTER TABLE reports OWNER TO reporting;
         GRANT SELECT ON items TO auditors;",
    );
    let mut p = Pgshift::start(
        &source,
        &target,
        &migration("roles", &["shop"], "copy_roles = true"),
    );
    p.wait_streaming("shop");
    // The roles exist with their membership, and the objects kept their
    // owner and grants (without the roles, the restore would have given
    // them to the target user and dropped the grant).
    assert_eq!(
        target.psql(
            "postgres",
            "SELECT string_agg(rolname || ':' || rolcanlogin, ',' ORDER BY rolname) FROM pg_roles WHERE rolname IN ('reporting', 'auditors')"
        ),
        "auditors:false,reporting:true"
    );
    assert_eq!(
        target.psql(
            "postgres",
            "SELECT pg_has_role('reporting', 'auditors', 'MEMBER')"
        ),
        "t"
    );
    assert_eq!(
        target.psql(
            "shop",
            "SELECT tableowner FROM pg_tables WHERE tablename = 'reports'"
        ),
        "reporting"
    );
    assert_eq!(
        target.psql(
            "shop",
            "SELECT has_table_privilege('auditors', 'items', 'SELECT')"
        ),
        "t"
    );
    p.assert_exact_copy(&source, &target, &["shop"]);
    p.terminate();
}
