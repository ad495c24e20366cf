//! Large transactions streamed while in progress (pgoutput protocol 2+,
//! PostgreSQL 14+) are applied as they arrive, each into an open target
//! transaction of its own session: with savepoints for subtransactions,
//! rolled back on Stream Abort, committed exactly once at Stream Commit.
//! Run on the oldest (14) and newest (18) streaming versions, with
//! `logical_decoding_work_mem` at its minimum (64kB) so that every
//! transaction of a few hundred rows streams; source and target are
//! compared row by row after each.

mod common;
use common::*;

use std::process::Command;
use std::time::Duration;

use pgshift::config::Endpoint;
use pgshift::replication::Lsn;
use pgshift::replication::client::{ReplicationConnection, SnapshotAction};
use pgshift::replication::names::ReplicationNames;
use pgshift::replication::stream::{DatabaseStream, StreamConfig, StreamMetrics};
use pgshift::telemetry::status::Report;

const MIGRATION: &str = "streamed";
const DB: &str = "app";
const VERSIONS: [i32; 2] = [14, 18];
const WAIT: Duration = Duration::from_secs(180);

const SCHEMA: &str = "
CREATE TABLE t (id int PRIMARY KEY, v text NOT NULL, pad text);
CREATE TABLE u (id int PRIMARY KEY, n int NOT NULL);
CREATE TABLE nokey (a int, b text);
ALTER TABLE nokey REPLICA IDENTITY FULL;
INSERT INTO u SELECT g, 0 FROM generate_series(1, 100) g;
";

/// A source (streaming large transactions at 64kB) and a target of
/// `major`, both with `schema`, and a slot: the stream's configuration.
struct Setup {
    source: Cluster,
    target: Cluster,
    cfg: StreamConfig,
}

async fn setup(major: i32, schema: &str, corpus: bool) -> Setup {
    let source = Cluster::start_with(ClusterOptions {
        conf: vec![
            "logical_decoding_work_mem = '64kB'".into(),
            "synchronous_commit = on".into(),
        ],
        version: Some(major),
        ..Default::default()
    });
    let target = Cluster::start_version(major);
    for c in [&source, &target] {
        c.create_db(DB);
        if corpus {
            run_sql_file(c, "types_corpus.sql", 0, false);
        }
        c.psql(DB, schema);
    }
    let names = ReplicationNames::new(MIGRATION, DB);
    let src = source.client(DB).await;
    pgshift::replication::publication::create_publication(&src, &names.publication, None)
        .await
        .unwrap();
    let ep = Endpoint::parse("source.url", &source.url("postgres")).unwrap();
    let mut conn = ReplicationConnection::connect(&ep, DB, "pgshift-test")
        .await
        .unwrap();
    let slot = conn
        .create_slot(&names.slot, SnapshotAction::NoExport, false)
        .await
        .unwrap();
    conn.close().await;
    let cfg = StreamConfig {
        migration: MIGRATION.into(),
        database: DB.into(),
        source: ep,
        target: Endpoint::parse("target.url", &target.url("postgres")).unwrap(),
        consistent_point: slot.consistent_point,
        ddl: None,
        drop_origin: None,
        decoding_work_mem: None,
    };
    Setup {
        source,
        target,
        cfg,
    }
}

/// Runs tests/data/`file` with psql (`off` as its variable), in one
/// transaction when `single`, after a filler insert that makes it large.
fn run_sql_file(c: &Cluster, file: &str, off: u32, single: bool) {
    let mut cmd = Command::new(pg_program("psql"));
    cmd.args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-v"])
        .arg(format!("off={off}"))
        .args(["-d", &c.url(DB)]);
    if single {
        cmd.args([
            "-1",
            "-c",
            "INSERT INTO t SELECT g, 'filler', repeat('x', 200) FROM generate_series(1, 3000) g",
        ]);
    }
    let path = format!("{}/tests/data/{file}", env!("CARGO_MANIFEST_DIR"));
    let o = cmd.arg("-f").arg(path).output().expect("run psql");
    assert!(
        o.status.success(),
        "{file} on PostgreSQL {}: {}",
        c.major(),
        String::from_utf8_lossy(&o.stderr)
    );
}

fn start(cfg: &StreamConfig, reg: &prometheus::Registry) -> DatabaseStream {
    DatabaseStream::start(cfg.clone(), StreamMetrics::register(reg))
}

/// Every table of the database holds the same rows on both sides.
fn assert_same(s: &Setup) {
    let a = table_fingerprints(&s.source, DB);
    let b = table_fingerprints(&s.target, DB);
    assert!(!a.is_empty());
    assert_eq!(a, b, "source and target differ");
}

async fn caught_up(stream: &DatabaseStream, id: &str) {
    stream
        .catch_up(id, WAIT)
        .await
        .unwrap_or_else(|e| panic!("catch-up {id}: {e}; {:?}", stream.status.last_error()));
}

/// pgshift's apply sessions on the target holding an open transaction
/// that has written (it has an xid), and the tables they hold locks on.
fn open_apply_sessions(target: &Cluster) -> (i64, String) {
    let out = target.psql(
        DB,
        "SELECT count(DISTINCT a.pid) || '|' || coalesce(string_agg(DISTINCT c.relname, ',' ORDER BY c.relname), '')
         FROM pg_stat_activity a
         JOIN pg_locks l ON l.pid = a.pid AND l.locktype = 'relation' AND l.granted
         JOIN pg_class c ON c.oid = l.relation AND c.relkind = 'r'
         WHERE a.application_name = 'pgshift apply' AND a.backend_xid IS NOT NULL",
    );
    let (n, tables) = out.split_once('|').unwrap();
    (n.parse().unwrap(), tables.to_string())
}

/// Waits until `n` apply sessions hold open transactions on the target.
fn wait_open_sessions(target: &Cluster, n: i64, what: &str) {
    assert!(
        wait_until(WAIT, || open_apply_sessions(target).0 >= n),
        "{what}: the target never showed {n} open apply transactions: {:?}",
        open_apply_sessions(target)
    );
}

/// The source's current WAL position.
async fn current_lsn(c: &tokio_postgres::Client) -> Lsn {
    let r = c
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap();
    r.get::<_, String>(0).parse().unwrap()
}

fn metric(reg: &prometheus::Registry, name: &str) -> f64 {
    reg.gather()
        .iter()
        .filter(|f| f.name() == name)
        .flat_map(|f| f.get_metric().iter())
        // A metric is a gauge or a counter; the other reads 0.
        .map(|m| m.get_gauge().get_value() + m.get_counter().get_value())
        .sum()
}

/// A transaction larger than logical_decoding_work_mem with subtransactions
/// (some rolled back, some released, nested) is applied on the target
/// before the source commits — its session holds an open transaction with
/// locks on the tables it wrote — and is there exactly once after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_transaction_with_subtransactions_is_applied_before_its_commit() {
    for major in VERSIONS {
        if !version_or_skip(major, "streamed subtransactions") {
            continue;
        }
        let s = setup(major, SCHEMA, false).await;
        let reg = prometheus::Registry::new();
        let stream = start(&s.cfg, &reg);
        let c = s.source.client(DB).await;
        c.batch_execute(
            "BEGIN;
             INSERT INTO t SELECT g, 'top', repeat('p', 100) FROM generate_series(1, 2000) g;
             SAVEPOINT a;
             INSERT INTO t SELECT g, 'rolled back', repeat('r', 100) FROM generate_series(10001, 12000) g;
             UPDATE u SET n = -1;
             ROLLBACK TO SAVEPOINT a;
             SAVEPOINT b;
             INSERT INTO t SELECT g, 'released', repeat('b', 100) FROM generate_series(20001, 22000) g;
             SAVEPOINT c;
             UPDATE t SET v = 'nested' WHERE id BETWEEN 20001 AND 20500;
             INSERT INTO nokey SELECT g, 'n' FROM generate_series(1, 500) g;
             SAVEPOINT d;
             DELETE FROM t WHERE id BETWEEN 1 AND 300;
             ROLLBACK TO SAVEPOINT d;
             RELEASE SAVEPOINT b;
             SAVEPOINT e;
             DELETE FROM t WHERE id BETWEEN 301 AND 400;
             UPDATE u SET n = n + 1 WHERE id <= 50;
             DELETE FROM nokey WHERE a <= 10;
             INSERT INTO t SELECT g, 'after', repeat('e', 100) FROM generate_series(30001, 31000) g;",
        )
        .await
        .unwrap();
        // Still open on the source: its rows are being applied on the target.
        wait_open_sessions(&s.target, 1, "open on the source");
        let (_, tables) = open_apply_sessions(&s.target);
        assert!(tables.contains('t'), "locks of the open apply: {tables}");
        assert_eq!(
            s.target.psql(DB, "SELECT count(*) FROM t"),
            "0",
            "nothing is visible before the commit"
        );
        assert_eq!(stream.status.report()["streamed_transactions_open"], 1);
        c.batch_execute(
            "SAVEPOINT f; INSERT INTO t VALUES (99999, 'gone', NULL); ROLLBACK TO SAVEPOINT f; COMMIT",
        )
        .await
        .unwrap();
        caught_up(&stream, "after-subtransactions").await;
        assert_same(&s);
        assert_eq!(s.target.psql(DB, "SELECT count(*) FROM t"), "4900");
        assert_eq!(
            s.target.psql(
                DB,
                "SELECT count(*) FROM t WHERE v = 'rolled back' OR id = 99999"
            ),
            "0"
        );
        assert_eq!(stream.status.report()["streamed_transactions_open"], 0);
        assert_eq!(
            metric(&reg, "pgshift_apply_spilled_transactions_total"),
            0.0
        );
        stream.stop().await;
    }
}

/// A large transaction rolled back on the source leaves nothing on the
/// target; its session's transaction is gone, and apply goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aborted_large_transaction_leaves_nothing() {
    for major in VERSIONS {
        if !version_or_skip(major, "streamed abort") {
            continue;
        }
        let s = setup(major, SCHEMA, false).await;
        let reg = prometheus::Registry::new();
        let stream = start(&s.cfg, &reg);
        let c = s.source.client(DB).await;
        c.batch_execute(
            "BEGIN;
             INSERT INTO t SELECT g, 'aborted', repeat('a', 200) FROM generate_series(1, 3000) g;
             UPDATE u SET n = 7;",
        )
        .await
        .unwrap();
        wait_open_sessions(&s.target, 1, "open on the source");
        c.batch_execute("ROLLBACK").await.unwrap();
        c.batch_execute("INSERT INTO t VALUES (1, 'after', NULL); UPDATE u SET n = 1 WHERE id = 1")
            .await
            .unwrap();
        caught_up(&stream, "after-abort").await;
        assert_same(&s);
        assert_eq!(s.target.psql(DB, "SELECT count(*) FROM t"), "1");
        assert_eq!(open_apply_sessions(&s.target).0, 0);
        stream.stop().await;
    }
}

/// Five large transactions open at once, their blocks interleaved: four
/// are applied in sessions of their own, the fifth (no session left) is
/// spilled to a file and applied at its commit, which is counted. Each
/// rolls a subtransaction back; they commit in another order than they
/// began; one rolls back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interleaved_large_transactions_stay_apart() {
    for major in VERSIONS {
        if !version_or_skip(major, "interleaved streamed") {
            continue;
        }
        let s = setup(major, SCHEMA, false).await;
        let reg = prometheus::Registry::new();
        let stream = start(&s.cfg, &reg);
        let mut clients = Vec::new();
        for _ in 0..5 {
            let c = s.source.client(DB).await;
            c.batch_execute("BEGIN").await.unwrap();
            clients.push(c);
        }
        for round in 0..3 {
            for (i, c) in clients.iter().enumerate() {
                let base = i * 100_000 + round * 10_000;
                c.batch_execute(&format!(
                    "INSERT INTO t SELECT g, 'tx{i}', repeat('i', 150) FROM generate_series({}, {}) g;
                     UPDATE u SET n = n + 1 WHERE id = {};",
                    base + 1,
                    base + 700,
                    i + 1
                ))
                .await
                .unwrap();
                if round == 1 {
                    // A subtransaction rolled back, in a session or a spill.
                    c.batch_execute(&format!(
                        "SAVEPOINT s;
                         INSERT INTO t SELECT g, 'rolled back', repeat('r', 150) FROM generate_series({}, {}) g;
                         ROLLBACK TO SAVEPOINT s;",
                        base + 5001,
                        base + 5700
                    ))
                    .await
                    .unwrap();
                }
            }
        }
        wait_open_sessions(&s.target, 4, "four interleaved");
        assert!(
            wait_until(
                WAIT,
                || stream.status.report()["streamed_transactions_open"] == 5
            ),
            "{:#}",
            stream.status.report()
        );
        assert_eq!(open_apply_sessions(&s.target).0, 4);
        assert_eq!(
            metric(&reg, "pgshift_apply_spilled_transactions_total"),
            1.0
        );
        // Commit order: 3, 1, 4 (spilled), 0; 2 rolls back.
        for (i, end) in [
            (3, "COMMIT"),
            (1, "COMMIT"),
            (4, "COMMIT"),
            (2, "ROLLBACK"),
            (0, "COMMIT"),
        ] {
            clients[i].batch_execute(end).await.unwrap();
        }
        caught_up(&stream, "after-interleaved").await;
        assert_same(&s);
        assert_eq!(s.target.psql(DB, "SELECT count(*) FROM t"), "8400");
        assert_eq!(
            s.target.psql(DB, "SELECT count(*) FROM t WHERE v = 'tx2'"),
            "0"
        );
        stream.stop().await;
    }
}

/// pgshift stopped dead mid-stream (as by kill -9: its sessions close, the
/// open target transaction dies with them) while a large transaction is
/// being applied; a new stream receives the whole transaction again from
/// the slot and applies it exactly once, after a transaction that was
/// already committed (and is not applied again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_mid_stream_applies_the_transaction_exactly_once() {
    for major in VERSIONS {
        if !version_or_skip(major, "streamed crash") {
            continue;
        }
        let s = setup(major, SCHEMA, false).await;
        let reg = prometheus::Registry::new();
        let stream = start(&s.cfg, &reg);
        let c = s.source.client(DB).await;
        c.batch_execute("INSERT INTO nokey VALUES (1, 'before')")
            .await
            .unwrap();
        caught_up(&stream, "before-crash").await;
        c.batch_execute(
            "BEGIN;
             INSERT INTO t SELECT g, 'big', repeat('k', 200) FROM generate_series(1, 3000) g;
             INSERT INTO nokey SELECT g, 'big' FROM generate_series(1, 1000) g;
             SAVEPOINT a;
             UPDATE u SET n = 5;
             ROLLBACK TO SAVEPOINT a;",
        )
        .await
        .unwrap();
        wait_open_sessions(&s.target, 1, "open before the crash");
        stream.abort();
        assert!(
            wait_until(WAIT, || open_apply_sessions(&s.target).0 == 0),
            "the open target transaction outlived pgshift"
        );
        c.batch_execute(
            "INSERT INTO t SELECT g, 'more', NULL FROM generate_series(5001, 6000) g; COMMIT",
        )
        .await
        .unwrap();
        c.batch_execute("INSERT INTO nokey VALUES (2, 'after')")
            .await
            .unwrap();
        let stream = start(&s.cfg, &prometheus::Registry::new());
        caught_up(&stream, "after-crash").await;
        assert_same(&s);
        assert_eq!(s.target.psql(DB, "SELECT count(*) FROM t"), "4000");
        // No key: a second apply of either transaction would show twice.
        assert_eq!(s.target.psql(DB, "SELECT count(*) FROM nokey"), "1002");
        stream.stop().await;
    }
}

/// Every class of column type (tests/data/types_corpus.sql), changed by
/// tests/data/types_stream.sql inside one large streamed transaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_type_corpus_in_a_streamed_transaction() {
    for major in VERSIONS {
        if !version_or_skip(major, "streamed type corpus") {
            continue;
        }
        let s = setup(major, SCHEMA, true).await;
        let reg = prometheus::Registry::new();
        let stream = start(&s.cfg, &reg);
        run_sql_file(&s.source, "types_stream.sql", 100, true);
        caught_up(&stream, "after-corpus").await;
        let a = table_fingerprints(&s.source, DB);
        assert!(a.len() >= 13, "{a:?}");
        assert_same(&s);
        assert!(
            metric(&reg, "pgshift_apply_transactions_total") >= 1.0,
            "the corpus transaction is counted"
        );
        stream.stop().await;
    }
}

/// While a large transaction's commit is not yet applied, lag counts from
/// the target's committed position — not from a keepalive that passed the
/// transaction's WAL while it was still open on the source: status and the
/// lag metrics show at least the transaction's WAL and a lag in seconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lag_counts_an_unapplied_large_transaction() {
    for major in VERSIONS {
        if !version_or_skip(major, "streamed lag") {
            continue;
        }
        let s = setup(major, SCHEMA, false).await;
        let reg = prometheus::Registry::new();
        let stream = start(&s.cfg, &reg);
        let c = s.source.client(DB).await;
        c.batch_execute("INSERT INTO u VALUES (1000, 0)")
            .await
            .unwrap();
        caught_up(&stream, "before-lag").await;
        // Quiet: the target holds everything, lag reads 0 within a sample.
        assert!(
            wait_until(WAIT, || stream.status.report()["lag_bytes"] == 0),
            "{:#}",
            stream.status.report()
        );
        let before = current_lsn(&c).await;
        c.batch_execute(
            "BEGIN; INSERT INTO t SELECT g, 'lag', repeat('l', 300) FROM generate_series(1, 4000) g;",
        )
        .await
        .unwrap();
        wait_open_sessions(&s.target, 1, "open on the source");
        // The end of the transaction waits on the target (its last block
        // writes a table locked there), so its commit stays unapplied.
        let blocker = s.target.client(DB).await;
        blocker
            .batch_execute("BEGIN; LOCK TABLE u IN ACCESS EXCLUSIVE MODE")
            .await
            .unwrap();
        c.batch_execute(
            "UPDATE u SET n = 9 WHERE id = 1;
             INSERT INTO t SELECT g, 'tail', repeat('l', 300) FROM generate_series(5001, 6000) g;
             COMMIT",
        )
        .await
        .unwrap();
        let committed = current_lsn(&c).await;
        let size = committed.0 - before.0;
        let seen = wait_until(WAIT, || {
            let r = stream.status.report();
            let source: Lsn = r["source_lsn"].as_str().unwrap().parse().unwrap();
            source >= committed
        });
        assert!(seen, "{:#}", stream.status.report());
        // A lag sample taken after the commit counts the whole transaction.
        let r = stream.status.report();
        let lag = r["lag_bytes"].as_u64().unwrap();
        assert!(lag >= size, "lag {lag} < transaction {size}: {r:#}");
        assert!(r["lag_seconds"].as_f64().unwrap() > 0.0, "{r:#}");
        assert_eq!(r["transaction_in_flight"], true, "{r:#}");
        assert!(metric(&reg, "pgshift_replication_lag_bytes") >= size as f64);
        assert!(metric(&reg, "pgshift_replication_lag_seconds") > 0.0);
        assert!(metric(&reg, "pgshift_replication_applied_lsn") <= before.0 as f64);
        blocker.batch_execute("COMMIT").await.unwrap();
        caught_up(&stream, "after-lag").await;
        assert_same(&s);
        assert!(
            wait_until(WAIT, || stream.status.report()["lag_bytes"] == 0),
            "{:#}",
            stream.status.report()
        );
        stream.stop().await;
    }
}

/// The real binary: `pgshift run` killed with SIGKILL while a large
/// transaction is open on the source and being applied on the target, then
/// started again; the transaction is applied exactly once after its commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_of_pgshift_mid_stream_then_restart() {
    for major in VERSIONS {
        if !version_or_skip(major, "streamed kill -9") {
            continue;
        }
        let source = Cluster::start_with(ClusterOptions {
            conf: vec![
                "logical_decoding_work_mem = '64kB'".into(),
                "synchronous_commit = on".into(),
            ],
            version: Some(major),
            ..Default::default()
        });
        // pgshift migrates to 15 and later.
        let target = Cluster::start_version(major.max(15));
        source.create_db(DB);
        source.psql(DB, SCHEMA);
        let mut p = Pgshift::start(&source, &target, &migration("killstreamed", &[DB], ""));
        p.wait_state("WaitingForUserAction", WAIT);
        let c = source.client(DB).await;
        c.batch_execute(
            "BEGIN;
             INSERT INTO t SELECT g, 'big', repeat('k', 200) FROM generate_series(1, 3000) g;
             SAVEPOINT a;
             INSERT INTO nokey SELECT g, 'gone' FROM generate_series(1, 1000) g;
             ROLLBACK TO SAVEPOINT a;
             INSERT INTO nokey SELECT g, 'big' FROM generate_series(1, 1000) g;",
        )
        .await
        .unwrap();
        wait_open_sessions(&target, 1, "open before kill -9");
        p.kill();
        assert!(
            wait_until(WAIT, || open_apply_sessions(&target).0 == 0),
            "the open target transaction outlived pgshift"
        );
        c.batch_execute(
            "INSERT INTO t SELECT g, 'more', NULL FROM generate_series(5001, 6000) g; COMMIT;
             INSERT INTO nokey VALUES (0, 'after');",
        )
        .await
        .unwrap();
        p.spawn();
        p.wait_caught_up(&source, &[DB], WAIT);
        assert_eq!(
            table_fingerprints(&source, DB),
            table_fingerprints(&target, DB)
        );
        assert_eq!(target.psql(DB, "SELECT count(*) FROM t"), "4000");
        assert_eq!(target.psql(DB, "SELECT count(*) FROM nokey"), "1001");
        p.terminate();
    }
}

/// pgshift lowers its own walsender's logical_decoding_work_mem (the
/// server's stays as it is): a transaction far below the server's 64MB but
/// above pgshift's setting is streamed and applied while still open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgshift_streams_blocks_smaller_than_the_servers_setting() {
    for major in VERSIONS {
        if !version_or_skip(major, "decoding work mem") {
            continue;
        }
        let mut s = setup(major, SCHEMA, false).await;
        s.source.psql(
            "postgres",
            "ALTER SYSTEM SET logical_decoding_work_mem = '64MB'",
        );
        s.source.psql("postgres", "SELECT pg_reload_conf()");
        s.cfg.decoding_work_mem = Some(256 << 10);
        let reg = prometheus::Registry::new();
        let stream = start(&s.cfg, &reg);
        let c = s.source.client(DB).await;
        caught_up(&stream, "before").await;
        c.batch_execute(
            "BEGIN; INSERT INTO t SELECT g, 'open', repeat('o', 100) FROM generate_series(1, 20000) g;",
        )
        .await
        .unwrap();
        wait_open_sessions(&s.target, 1, "a few MB, open on the source");
        assert_eq!(stream.status.report()["streamed_transactions_open"], 1);
        assert_eq!(s.target.psql(DB, "SELECT count(*) FROM t"), "0");
        // Only pgshift's walsender runs with the lower setting.
        assert_eq!(s.source.psql(DB, "SHOW logical_decoding_work_mem"), "64MB");
        c.batch_execute("COMMIT").await.unwrap();
        caught_up(&stream, "after").await;
        assert_same(&s);
        assert_eq!(s.target.psql(DB, "SELECT count(*) FROM t"), "20000");
        stream.stop().await;
    }
}

/// A transaction below logical_decoding_work_mem is not streamed: while it
/// is open on the source, keepalives pass its WAL (the stream is idle) —
/// and once it commits, lag still counts it whole until it is committed on
/// the target, not from the keepalive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lag_counts_a_transaction_a_keepalive_passed_while_it_was_open() {
    for major in VERSIONS {
        if !version_or_skip(major, "keepalive lag") {
            continue;
        }
        let s = setup(major, SCHEMA, false).await;
        s.source.psql(
            "postgres",
            "ALTER SYSTEM SET logical_decoding_work_mem = '64MB'",
        );
        s.source.psql("postgres", "SELECT pg_reload_conf()");
        let reg = prometheus::Registry::new();
        let stream = start(&s.cfg, &reg);
        let c = s.source.client(DB).await;
        caught_up(&stream, "before-keepalive").await;
        let before = current_lsn(&c).await;
        c.batch_execute(
            "BEGIN; INSERT INTO t SELECT g, 'open', repeat('o', 100) FROM generate_series(1, 20000) g;",
        )
        .await
        .unwrap();
        let written = current_lsn(&c).await;
        // The stream is idle: a keepalive moves what the target holds past
        // the open transaction's WAL.
        assert!(
            wait_until(WAIT, || {
                let r = stream.status.report();
                r["applied_lsn"].as_str().unwrap().parse::<Lsn>().unwrap() >= written
            }),
            "{:#}",
            stream.status.report()
        );
        let blocker = s.target.client(DB).await;
        blocker
            .batch_execute("BEGIN; LOCK TABLE u IN ACCESS EXCLUSIVE MODE")
            .await
            .unwrap();
        c.batch_execute("UPDATE u SET n = 3 WHERE id = 2; COMMIT")
            .await
            .unwrap();
        let committed = current_lsn(&c).await;
        let size = committed.0 - before.0;
        assert!(
            wait_until(WAIT, || {
                let r = stream.status.report();
                let source: Lsn = r["source_lsn"].as_str().unwrap().parse().unwrap();
                source >= committed && r["transaction_in_flight"] == true
            }),
            "{:#}",
            stream.status.report()
        );
        let r = stream.status.report();
        let lag = r["lag_bytes"].as_u64().unwrap();
        assert!(lag >= size, "lag {lag} < transaction {size}: {r:#}");
        assert!(metric(&reg, "pgshift_replication_lag_bytes") >= size as f64);
        blocker.batch_execute("COMMIT").await.unwrap();
        caught_up(&stream, "after-keepalive").await;
        assert_same(&s);
        stream.stop().await;
    }
}

/// A row of a streamed transaction that the target refuses stops apply
/// while the source transaction is still open, with an error naming the
/// table and the transaction (by xid: its commit LSN is not known yet);
/// nothing of it is visible on the target; once the target is fixed, the
/// transaction is applied exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_the_target_refuses_in_a_streamed_transaction_is_named_and_nothing_is_lost() {
    for major in VERSIONS {
        if !version_or_skip(major, "streamed row error") {
            continue;
        }
        let s = setup(major, SCHEMA, false).await;
        s.target
            .psql(DB, "INSERT INTO t VALUES (2500, 'target only', NULL)");
        let reg = prometheus::Registry::new();
        let stream = start(&s.cfg, &reg);
        let c = s.source.client(DB).await;
        c.batch_execute(
            "BEGIN;
             INSERT INTO t SELECT g, 'big', repeat('b', 200) FROM generate_series(1, 3000) g;",
        )
        .await
        .unwrap();
        let xid: String = c
            .query_one("SELECT (txid_current() % 4294967296)::text", &[])
            .await
            .unwrap()
            .get(0);
        let named = wait_until(WAIT, || {
            stream
                .status
                .last_error()
                .is_some_and(|e| e.contains("public.t"))
        });
        let e = stream.status.last_error().unwrap_or_default();
        assert!(named, "no error while the transaction is open: {e:?}");
        assert!(
            e.contains(&format!("xid {xid} (streamed while in progress)")),
            "the error names the transaction: {e}"
        );
        assert!(e.contains("insert"), "the error names the operation: {e}");
        assert_eq!(
            s.target.psql(DB, "SELECT count(*) FROM t WHERE v = 'big'"),
            "0"
        );

        // The operator removes the target's stray row; the source commits.
        s.target.psql(DB, "DELETE FROM t WHERE id = 2500");
        c.batch_execute("COMMIT").await.unwrap();
        caught_up(&stream, "fixed").await;
        assert_same(&s);
        assert_eq!(s.target.psql(DB, "SELECT count(*) FROM t"), "3000");
        stream.stop().await;
    }
}

/// A streamed transaction whose own session cannot connect (here the target
/// database refuses new connections; at a cutover, sessions moving to the
/// target may have taken every slot) is spilled to a file and applied at
/// its commit on apply's own session, exactly once: apply does not stop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_transaction_without_a_session_of_its_own_is_spilled() {
    for major in VERSIONS {
        if !version_or_skip(major, "streamed without a session") {
            continue;
        }
        let s = setup(major, SCHEMA, false).await;
        let reg = prometheus::Registry::new();
        let stream = start(&s.cfg, &reg);
        caught_up(&stream, "connected").await;
        s.target
            .psql("postgres", "ALTER DATABASE app ALLOW_CONNECTIONS false");
        s.source.psql(
            DB,
            "INSERT INTO t SELECT g, 'no session', repeat('n', 200) FROM generate_series(1, 3000) g",
        );
        let spilled = wait_until(WAIT, || {
            metric(&reg, "pgshift_apply_spilled_transactions_total") >= 1.0
        });
        s.target
            .psql("postgres", "ALTER DATABASE app ALLOW_CONNECTIONS true");
        assert!(spilled, "not spilled: {:?}", stream.status.last_error());
        caught_up(&stream, "spilled").await;
        assert_same(&s);
        assert_eq!(s.target.psql(DB, "SELECT count(*) FROM t"), "3000");
        stream.stop().await;
    }
}
