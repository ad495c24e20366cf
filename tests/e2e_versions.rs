//! The version matrix: `pgshift run` between PostgreSQL major versions, the
//! whole way for each pair README lists as tested (the type corpus and
//! pgbench copied, streamed under load through the proxy, a `kill -9` and
//! restart, a cutover under prepared sessions, row-by-row comparisons).
//! Pairs whose versions are not installed are skipped, unless
//! PGSHIFT_REQUIRE_VERSIONS asks for them (CI does).

mod common;
mod e2e_common;
use common::*;
use e2e_common::corpus::{assert_same, assert_same_except, run_file};
use e2e_common::*;

use std::process::Command;
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

/// Runs pgbench against `url`-style connection arguments; returns its output.
fn pgbench(args: &[&str], host: &str, port: u16, user: &str) -> std::process::Output {
    Command::new(pg_program("pgbench"))
        .args(args)
        .args(["-h", host, "-p", &port.to_string(), "-U", user, "shop"])
        .env("PGPASSWORD", APP_PW)
        .env("PGSSLMODE", "disable")
        .output()
        .expect("run pgbench")
}

fn text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The database `shop`: the pair's own tables, the type corpus (as much of
/// it as the source's version has), pgbench's TPC-B tables (scale 1; the
/// history with a key so that it streams and its rows can be told apart).
fn populate(src: &Cluster, source: i32) {
    src.create_db("shop");
    src.psql("shop", &schema(source));
    run_file(src, "shop", "types_corpus.sql", 0);
    let o = pgbench(
        &["-i", "-q", "-s", "1"],
        &src.socket_dir.to_string_lossy(),
        src.port,
        APP_USER,
    );
    assert!(o.status.success(), "pgbench -i on {source}: {}", text(&o));
    src.psql(
        "shop",
        "ALTER TABLE pgbench_history ADD COLUMN id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY;
         CREATE TABLE writes(id bigint PRIMARY KEY);
         GRANT ALL ON ALL TABLES IN SCHEMA public TO app;
         GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO app;",
    );
}

/// TPC-B's invariant on `c`: every balance change is in the history once.
fn assert_tpcb_balanced(c: &Cluster, test: &str) {
    for (table, col) in [
        ("pgbench_accounts", "abalance"),
        ("pgbench_tellers", "tbalance"),
        ("pgbench_branches", "bbalance"),
    ] {
        assert_eq!(
            c.psql("shop", &format!("SELECT sum({col}) FROM {table}")),
            c.psql("shop", "SELECT sum(delta) FROM pgbench_history"),
            "{test}: {table}'s balances do not match the history"
        );
    }
}

/// Migrates database `shop` online from a `source`-major to a
/// `target`-major server, the whole way: the copy of the type corpus,
/// pgbench's tables and the pair's own; pgbench through the proxy and the
/// corpus's changes streamed; a `kill -9` of pgshift and a restart
/// mid-stream (every table compared row by row after each phase); then a
/// cutover while pgbench `-M prepared` and a session with a prepared
/// statement write through the proxy: every write the session saw
/// acknowledged is on the target exactly once, pgbench goes on without an
/// error, and everything the source committed is on the target as it was.
pub fn online_pair(source: i32, target: i32) {
    let test = format!("e2e_versions {source}->{target}");
    let Some((src, tgt)) = start_pair(source, target, &test) else {
        return;
    };
    populate(&src, source);
    // No rollback window: the source must take no write after the switch
    // (tests/rollback.rs covers reverse replication on 11 -> 15 and 18 -> 18).
    let mut p = Pgshift::start(
        &src,
        &tgt,
        &format!(
            "{}\n[cutover]\nrollback = false\n",
            migration("versions", &["shop"], "")
        ),
    );
    let s = p.wait_state("WaitingForUserAction", STARTUP);
    assert_eq!(s["databases"]["shop"]["phase"], "streaming", "{test}: {s}");
    assert_same(&format!("{test}: copy"), &src, &tgt, "shop", "r,m", 20);

    // Streaming under load through the proxy, and every kind of change.
    let o = pgbench(
        &["-n", "-M", "extended", "-c", "2", "-j", "1", "-t", "100"],
        "127.0.0.1",
        p.proxy_port,
        APP_USER,
    );
    assert!(o.status.success(), "{test}: pgbench: {}", text(&o));
    run_file(&src, "shop", "types_stream.sql", 100);
    src.psql(
        "shop",
        "INSERT INTO items(name, price) SELECT 'late ' || g, g FROM generate_series(1, 50) g;
         UPDATE items SET price = price + 1 WHERE id % 7 = 0;
         DELETE FROM events WHERE id % 5 = 0;",
    );
    p.wait_caught_up(&src, &["shop"], Duration::from_secs(90));
    assert_same(&format!("{test}: stream"), &src, &tgt, "shop", "r,m", 20);
    p.assert_exact_copy(&src, &tgt, &["shop"]);
    assert_eq!(
        tgt.psql("shop", "SELECT last_value FROM invoice_no"),
        src.psql("shop", "SELECT last_value FROM invoice_no")
    );

    // kill -9 mid-stream; writes while pgshift is down arrive after the restart.
    p.kill();
    src.psql(
        "shop",
        "INSERT INTO items(name, price) SELECT 'while down ' || g, g FROM generate_series(1, 40) g;
         UPDATE events SET at = at + 1 WHERE id % 3 = 0;",
    );
    run_file(&src, "shop", "types_stream.sql", 200);
    p.restart();
    p.wait_state("WaitingForUserAction", STARTUP);
    p.wait_caught_up(&src, &["shop"], Duration::from_secs(90));
    assert_same(&format!("{test}: restart"), &src, &tgt, "shop", "r,m", 20);
    p.assert_exact_copy(&src, &tgt, &["shop"]);

    // The cutover, with pgbench -M prepared and a session holding a
    // prepared statement writing through the proxy all along.
    let history = |c: &Cluster| -> i64 {
        c.psql("shop", "SELECT count(*) FROM pgbench_history")
            .parse()
            .unwrap()
    };
    let before = history(&src);
    let bench = Command::new(pg_program("pgbench"))
        .args(["-n", "-M", "prepared", "-c", "2", "-j", "1", "-T", "100000"])
        .args(["-h", "127.0.0.1", "-p", &p.proxy_port.to_string()])
        .args(["-U", APP_USER, "shop"])
        .env("PGPASSWORD", APP_PW)
        .env("PGSSLMODE", "disable")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start pgbench");
    let stop = Arc::new(AtomicBool::new(false));
    let last = Arc::new(AtomicI64::new(0));
    let seen = Arc::new(Mutex::new(Seen::default()));
    let writer = {
        let (stop, last, seen) = (stop.clone(), last.clone(), seen.clone());
        let port = p.proxy_port;
        std::thread::spawn(move || proxied_prepared_writer(port, "shop", stop, last, seen))
    };
    assert!(
        wait_until(STARTUP, || last.load(Ordering::Relaxed) >= 20
            && history(&src) >= before + 20),
        "{test}: the writers do not write: {:?}",
        seen.lock().unwrap().errors
    );
    let out = p.cli(&["cutover", "--wait"]);
    assert!(
        out.status.success(),
        "{test}: cutover failed: {}\n{}",
        text(&out),
        p.log()
    );
    // The same sessions go on writing, now on the target.
    let at_switch = last.load(Ordering::Relaxed);
    let source_history = history(&src);
    assert!(
        wait_until(STARTUP, || last.load(Ordering::Relaxed) >= at_switch + 20
            && history(&tgt) >= source_history + 20),
        "{test}: the writers stopped after the switch: {:?}",
        seen.lock().unwrap().errors
    );
    stop.store(true, Ordering::Relaxed);
    writer.join().expect("writer");
    let mut bench = bench;
    let _ = bench.kill();
    let bench = bench.wait_with_output().expect("pgbench output");
    let bench_text = text(&bench);
    assert!(
        !bench_text.contains("aborted") && !bench_text.contains("ERROR"),
        "{test}: pgbench failed across the cutover: {bench_text}"
    );
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
    assert_eq!(
        history(&src),
        source_history,
        "{test}: the source took pgbench writes after the switch"
    );
    // Everything the source committed is on the target as it was: the
    // tables nobody wrote after the switch entirely, pgbench's history up to
    // the source's last row, and TPC-B's balances add up on both sides.
    p.wait_state("Succeeded", STARTUP);
    assert_same_except(
        &format!("{test}: cutover"),
        &src,
        &tgt,
        "shop",
        "r",
        20,
        &[
            "public.writes",
            "public.pgbench_history",
            "public.pgbench_accounts",
            "public.pgbench_tellers",
            "public.pgbench_branches",
        ],
    );
    let upto = |c: &Cluster| {
        c.psql(
            "shop",
            &format!(
                "SELECT count(*), md5(coalesce(string_agg(h::text, ',' ORDER BY id), '')) \
                 FROM pgbench_history h WHERE id <= {}",
                src.psql("shop", "SELECT coalesce(max(id), 0) FROM pgbench_history")
            ),
        )
    };
    assert_eq!(upto(&src), upto(&tgt), "{test}: the history differs");
    assert_tpcb_balanced(&src, &test);
    assert_tpcb_balanced(&tgt, &test);
}

#[test]
fn v11_to_v18() {
    online_pair(11, 18);
}

#[test]
fn v12_to_v17() {
    online_pair(12, 17);
}

#[test]
fn v13_to_v15() {
    online_pair(13, 15);
}

#[test]
fn v14_to_v16() {
    online_pair(14, 16);
}

#[test]
fn v15_to_v15() {
    online_pair(15, 15);
}

#[test]
fn v16_to_v18() {
    online_pair(16, 18);
}

#[test]
fn v17_to_v17() {
    online_pair(17, 17);
}

#[test]
fn v18_to_v18() {
    online_pair(18, 18);
}
