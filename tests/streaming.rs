//! Change streaming end to end (issue 4): the stream task applies a busy
//! source to the target exactly once, through faults and restarts.

mod common;
use common::*;

use std::time::Duration;

use pgshift::replication::Lsn;
use pgshift::replication::client::{ReplicationConnection, SnapshotAction};
use pgshift::replication::names::ReplicationNames;
use pgshift::replication::stream::{DatabaseStream, StreamConfig, StreamMetrics};

const MIGRATION: &str = "stream-test";

/// Same schema (and data) on both sides, then a publication and a slot:
/// from here on the source's changes belong to the stream.
async fn prepare(source: &Cluster, target: &Cluster, db: &str, schema: &str) -> StreamConfig {
    for c in [source, target] {
        c.create_db(db);
        c.psql(db, schema);
    }
    let names = ReplicationNames::new(MIGRATION, db);
    let src = source.client(db).await;
    pgshift::replication::publication::create_publication(&src, &names.publication, None)
        .await
        .unwrap();
    let ep = pgshift::config::Endpoint::parse("source.url", &source.url("postgres")).unwrap();
    let mut conn = ReplicationConnection::connect(&ep, db, "pgshift-test")
        .await
        .unwrap();
    let slot = conn
        .create_slot(&names.slot, SnapshotAction::NoExport, false)
        .await
        .unwrap();
    conn.close().await;
    StreamConfig {
        migration: MIGRATION.into(),
        database: db.into(),
        source: ep,
        target: pgshift::config::Endpoint::parse("target.url", &target.url("postgres")).unwrap(),
        consistent_point: slot.consistent_point,
        ddl: None,
        drop_origin: None,
        decoding_work_mem: None,
    }
}

fn metrics() -> StreamMetrics {
    StreamMetrics::register(&prometheus::Registry::new())
}

/// Waits until the target holds everything the source has now.
async fn wait_caught_up(source: &Cluster, stream: &DatabaseStream, timeout: Duration) {
    let want: Lsn = source
        .psql("postgres", "SELECT pg_current_wal_lsn()")
        .parse()
        .unwrap();
    let start = std::time::Instant::now();
    while stream.status.applied() < want {
        assert!(
            start.elapsed() < timeout,
            "not caught up: applied {} < {want}; state {}, last error {:?}",
            stream.status.applied(),
            stream.status.state(),
            stream.status.last_error()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn assert_same(source: &Cluster, target: &Cluster, db: &str) {
    let s = table_fingerprints(source, db);
    let t = table_fingerprints(target, db);
    assert!(!s.is_empty());
    assert_eq!(s, t, "source and target differ");
}

fn pgbench(c: &Cluster, db: &str, args: &[&str]) {
    let out = std::process::Command::new(pg_program("pgbench"))
        .args(args)
        .arg("-h")
        .arg(&c.socket_dir)
        .args(["-p", &c.port.to_string(), "-U", "postgres", db])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "pgbench {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

const MIXED: &str = "
CREATE TABLE items (id int PRIMARY KEY, qty int NOT NULL, note text);
CREATE TABLE events (id bigserial PRIMARY KEY, item int, kind text);
CREATE TABLE nokey (a int, b text);
ALTER TABLE nokey REPLICA IDENTITY FULL;
INSERT INTO items SELECT g, 0, 'n' || g FROM generate_series(1, 200) g;
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn converges_under_mixed_load() {
    let source = Cluster::start();
    let target = Cluster::start();
    // pgbench's tables are deterministic: initialised identically on both sides.
    for c in [&source, &target] {
        c.create_db("bench");
        pgbench(c, "bench", &["-i", "-q", "-s", "1"]);
        c.psql(
            "bench",
            &MIXED.replace("CREATE TABLE items", "CREATE TABLE IF NOT EXISTS items"),
        );
    }
    let names = ReplicationNames::new(MIGRATION, "bench");
    let src = source.client("bench").await;
    pgshift::replication::publication::create_publication(&src, &names.publication, None)
        .await
        .unwrap();
    let ep = pgshift::config::Endpoint::parse("source.url", &source.url("postgres")).unwrap();
    let mut conn = ReplicationConnection::connect(&ep, "bench", "pgshift-test")
        .await
        .unwrap();
    let slot = conn
        .create_slot(&names.slot, SnapshotAction::NoExport, false)
        .await
        .unwrap();
    conn.close().await;
    let cfg = StreamConfig {
        migration: MIGRATION.into(),
        database: "bench".into(),
        source: ep,
        target: pgshift::config::Endpoint::parse("target.url", &target.url("postgres")).unwrap(),
        consistent_point: slot.consistent_point,
        ddl: None,
        drop_origin: None,
        decoding_work_mem: None,
    };
    let stream = DatabaseStream::start(cfg, metrics());

    // TPC-B and a script of updates, deletes, inserts and truncates, concurrently.
    let script = source.dir.path().join("mixed.sql");
    std::fs::write(
        &script,
        "\\set id random(1, 400)\n\
         BEGIN;\n\
         INSERT INTO items VALUES (:id, 1, 'x') ON CONFLICT (id) DO UPDATE SET qty = items.qty + 1, note = md5(random()::text);\n\
         INSERT INTO events (item, kind) VALUES (:id, 'touch');\n\
         DELETE FROM items WHERE id = (:id * 7) % 400 + 1;\n\
         INSERT INTO nokey VALUES (:id % 5, NULL);\n\
         UPDATE nokey SET b = 'u' WHERE a = :id % 5 AND b IS NULL;\n\
         COMMIT;\n",
    )
    .unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let s2 = script.clone();
    let sock = source.socket_dir.clone();
    let port = source.port;
    let mixed = std::thread::spawn(move || {
        std::process::Command::new(pg_program("pgbench"))
            .args(["-n", "-c", "2", "-t", "300", "-f"])
            .arg(&s2)
            .arg("-h")
            .arg(&sock)
            .args(["-p", &port.to_string(), "-U", "postgres", "bench"])
            .output()
            .unwrap()
    });
    pgbench(&source, "bench", &["-n", "-c", "3", "-t", "300"]);
    source.psql("bench", "TRUNCATE events RESTART IDENTITY");
    let out = mixed.join().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    source.psql(
        "bench",
        "INSERT INTO events (item, kind) VALUES (1, 'after truncate')",
    );

    wait_caught_up(&source, &stream, Duration::from_secs(300)).await;
    assert_same(&source, &target, "bench");
    // Lag metrics come down to zero once caught up and idle (however long
    // the next status update takes on this machine).
    let start = std::time::Instant::now();
    loop {
        let report = pgshift::telemetry::status::Report::report(stream.status.as_ref());
        if report["state"] == "streaming" && report["lag_bytes"].as_u64().unwrap() < 1024 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "lag not reported as zero: {report}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stream.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashes_and_restarts_lose_and_duplicate_nothing() {
    let source = Cluster::start();
    let target = Cluster::start();
    let cfg = prepare(
        &source,
        &target,
        "ledger",
        "CREATE TABLE ledger (id bigint PRIMARY KEY, payload text NOT NULL)",
    )
    .await;
    // A writer commits ids 1..=N in order on the source.
    let url = source.url("ledger");
    let writer = tokio::spawn(async move {
        let c = connect(&url).await;
        for i in 1..=3000i64 {
            c.execute("INSERT INTO ledger VALUES ($1, repeat('x', 100))", &[&i])
                .await
                .unwrap();
            if i % 500 == 0 {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    });
    // Start and "kill" the stream repeatedly at varying points: aborting the
    // task drops it mid-whatever, like kill -9.
    for round in 0..6u64 {
        let s = DatabaseStream::start(cfg.clone(), metrics());
        tokio::time::sleep(Duration::from_millis(150 + round * 97)).await;
        s.abort();
    }
    writer.await.unwrap();
    let stream = DatabaseStream::start(cfg.clone(), metrics());
    wait_caught_up(&source, &stream, Duration::from_secs(300)).await;
    stream.stop().await;
    assert_eq!(
        target.psql(
            "ledger",
            "SELECT count(*), min(id), max(id), count(DISTINCT id) FROM ledger"
        ),
        "3000|1|3000|3000"
    );
    assert_same(&source, &target, "ledger");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn marker_resolves_after_earlier_commits_and_servers_restart() {
    let mut source = Cluster::start();
    let mut target = Cluster::start();
    let cfg = prepare(
        &source,
        &target,
        "app",
        "CREATE TABLE t (id int PRIMARY KEY, v text)",
    )
    .await;
    let stream = DatabaseStream::start(cfg, metrics());
    source.psql(
        "app",
        "INSERT INTO t SELECT g, 'a' FROM generate_series(1, 1000) g",
    );
    stream
        .catch_up("marker-1", Duration::from_secs(300))
        .await
        .unwrap();
    // The marker came after those rows: they are all there now.
    assert_eq!(target.psql("app", "SELECT count(*) FROM t"), "1000");

    // The target restarts mid-stream: apply reconnects and resumes.
    target.restart();
    source.psql(
        "app",
        "INSERT INTO t SELECT g, 'b' FROM generate_series(1001, 1500) g",
    );
    stream
        .catch_up("marker-2", Duration::from_secs(300))
        .await
        .unwrap();
    assert_eq!(target.psql("app", "SELECT count(*) FROM t"), "1500");

    // The source restarts mid-stream: the stream reconnects to the slot.
    source.restart();
    source.psql("app", "UPDATE t SET v = 'c' WHERE id % 2 = 0");
    stream
        .catch_up("marker-3", Duration::from_secs(300))
        .await
        .unwrap();
    assert_same(&source, &target, "app");
    stream.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_change_stops_apply_until_the_target_is_fixed() {
    let source = Cluster::start();
    let target = Cluster::start();
    let cfg = prepare(
        &source,
        &target,
        "app",
        "CREATE TABLE t (id int PRIMARY KEY, v text)",
    )
    .await;
    let stream = DatabaseStream::start(cfg, metrics());
    source.psql("app", "INSERT INTO t VALUES (1, 'a')");
    stream
        .catch_up("m1", Duration::from_secs(300))
        .await
        .unwrap();

    source.psql(
        "app",
        "ALTER TABLE t ADD COLUMN extra int; INSERT INTO t VALUES (2, 'b', 42)",
    );
    let start = std::time::Instant::now();
    loop {
        let e = stream.status.last_error().unwrap_or_default();
        if e.contains("extra") {
            assert!(e.contains("t"), "the error names the table: {e}");
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "no clear error: {e:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(target.psql("app", "SELECT count(*) FROM t"), "1");

    // The operator fixes the target; apply resumes with nothing lost.
    target.psql("app", "ALTER TABLE t ADD COLUMN extra int");
    stream
        .catch_up("m2", Duration::from_secs(300))
        .await
        .unwrap();
    assert_eq!(target.psql("app", "SELECT extra FROM t WHERE id = 2"), "42");
    assert_same(&source, &target, "app");
    stream.stop().await;
}
