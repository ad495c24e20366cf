//! Streaming from every supported source version (11 on) to a newer
//! target: pgoutput options and slot syntax follow the source, and the
//! cutover marker proves catch-up everywhere — a logical message on 14+, a
//! row of pgshift's marker table before. Versions whose server programs are
//! missing are skipped with a note (PGSHIFT_REQUIRE_VERSIONS=1 fails instead).

mod common;
mod cutover_common;
use common::*;

use std::time::Duration;

use pgshift::pg::tables::list_tables;
use pgshift::replication::Lsn;
use pgshift::replication::client::{ReplicationConnection, SnapshotAction};
use pgshift::replication::marker;
use pgshift::replication::names::ReplicationNames;
use pgshift::replication::slot::{Cleanup, cleanup};
use pgshift::replication::stream::{DatabaseStream, StreamConfig, StreamMetrics};

const MIGRATION: &str = "versions";
const DB: &str = "app";

const SCHEMA: &str = "
CREATE TABLE t (id int PRIMARY KEY, v text);
CREATE TABLE full_ident (a int, b text);
ALTER TABLE full_ident REPLICA IDENTITY FULL;
CREATE TABLE parted (id int, k int, v text, PRIMARY KEY (id, k)) PARTITION BY RANGE (k);
CREATE TABLE parted_low PARTITION OF parted FOR VALUES FROM (0) TO (100);
CREATE TABLE parted_high PARTITION OF parted FOR VALUES FROM (100) TO (200);
CREATE TABLE trunc (id int PRIMARY KEY);
";

fn source_with(major: u32) -> Option<Cluster> {
    if !version_or_skip(major as i32, "stream_versions") {
        return None;
    }
    let c = Cluster::start_version(major as i32);
    let num: u32 = c
        .psql("postgres", "SHOW server_version_num")
        .parse()
        .unwrap();
    assert_eq!(num / 10000, major, "the source runs the wanted version");
    Some(c)
}

/// Same schema on both sides, the marker table where the source needs one,
/// a publication (all tables, or a list like a filtered migration makes)
/// and a slot created with the source's syntax.
async fn prepare(source: &Cluster, target: &Cluster, table_list: bool) -> StreamConfig {
    for c in [source, target] {
        c.create_db(DB);
        c.psql(DB, SCHEMA);
    }
    let names = ReplicationNames::new(MIGRATION, DB);
    let src = source.client(DB).await;
    let marker_table = marker::ensure_table(&src, &names).await.unwrap();
    let old = source
        .psql("postgres", "SHOW server_version_num")
        .parse::<u32>()
        .unwrap()
        < 140000;
    assert_eq!(
        marker_table.is_some(),
        old,
        "a marker table exactly before 14"
    );
    let tables = if table_list {
        // Leaf partitions: partitioned tables cannot be published before 13.
        let mut list: Vec<String> = list_tables(&src, &Default::default())
            .await
            .unwrap()
            .iter()
            .map(|t| t.quoted())
            .collect();
        assert!(
            list.iter().all(|t| !t.contains("pgshift")),
            "the marker table is not a user table: {list:?}"
        );
        list.extend(marker_table);
        Some(list)
    } else {
        None
    };
    pgshift::replication::publication::create_publication(
        &src,
        &names.publication,
        tables.as_deref(),
    )
    .await
    .unwrap();
    let ep = pgshift::config::Endpoint::parse("source.url", &source.url("postgres")).unwrap();
    let mut conn = ReplicationConnection::connect(&ep, DB, "pgshift-test")
        .await
        .unwrap();
    let slot = conn
        .create_slot(&names.slot, SnapshotAction::NoExport, false)
        .await
        .unwrap();
    conn.close().await;
    StreamConfig {
        migration: MIGRATION.into(),
        database: DB.into(),
        source: ep,
        target: pgshift::config::Endpoint::parse("target.url", &target.url("postgres")).unwrap(),
        consistent_point: slot.consistent_point,
        ddl: None,
        drop_origin: None,
        decoding_work_mem: None,
    }
}

fn counts(c: &Cluster) -> String {
    c.psql(
        DB,
        "SELECT (SELECT count(*) FROM t) || ',' || (SELECT count(*) FROM full_ident) || ',' || \
                (SELECT count(*) FROM parted) || ',' || (SELECT count(*) FROM trunc)",
    )
}

/// INSERT, UPDATE, DELETE and TRUNCATE reach the target, and each marker
/// resolves only once everything committed before it is there — also on a
/// source fenced read-only, as in a cutover's pause.
async fn streams_every_change_and_marks(major: u32, table_list: bool, target_major: Option<u32>) {
    let Some(source) = source_with(major) else {
        return;
    };
    // The default target is the harness's server (PG_BIN or the system's).
    let target = match target_major {
        None => Cluster::start(),
        Some(m) => {
            if !version_or_skip(m as i32, "stream_versions") {
                return;
            }
            Cluster::start_version(m as i32)
        }
    };
    let cfg = prepare(&source, &target, table_list).await;
    let stream = DatabaseStream::start(cfg, StreamMetrics::register(&prometheus::Registry::new()));

    source.psql(
        DB,
        "INSERT INTO t SELECT g, 'a' FROM generate_series(1, 500) g;
         INSERT INTO full_ident SELECT g, 'x' || g FROM generate_series(1, 50) g;
         INSERT INTO parted SELECT g, g % 200, 'p' FROM generate_series(1, 400) g;
         INSERT INTO trunc SELECT generate_series(1, 100);",
    );
    let lsn = stream
        .catch_up("m1", Duration::from_secs(300))
        .await
        .unwrap_or_else(|e| panic!("PostgreSQL {major}: {e}"));
    assert!(lsn > Lsn::ZERO);
    // The marker came after those commits: they are on the target now.
    assert_eq!(counts(&target), "500,50,400,100");

    source.psql(
        DB,
        "UPDATE t SET v = 'b' WHERE id % 2 = 0;
         DELETE FROM t WHERE id % 3 = 0;
         UPDATE full_ident SET b = 'y' WHERE a <= 10;
         DELETE FROM full_ident WHERE a > 40;
         UPDATE parted SET k = k + 100 WHERE k < 50;
         DELETE FROM parted WHERE id % 7 = 0;
         TRUNCATE trunc;
         INSERT INTO trunc VALUES (1);",
    );
    // Fenced as the cutover fences: new sessions default to read-only.
    source.psql(
        "postgres",
        &format!("ALTER DATABASE {DB} SET default_transaction_read_only = on"),
    );
    stream
        .catch_up("m2", Duration::from_secs(300))
        .await
        .unwrap_or_else(|e| panic!("PostgreSQL {major}, fenced: {e}"));
    assert_eq!(counts(&target), counts(&source));
    let (s, t) = (
        table_fingerprints(&source, DB),
        table_fingerprints(&target, DB),
    );
    assert_eq!(s.len(), 4, "{s:?}");
    assert_eq!(s, t, "PostgreSQL {major}: source and target differ");
    assert_eq!(
        target.psql(
            DB,
            "SELECT count(*) FROM pg_namespace WHERE nspname = 'pgshift'"
        ),
        "0",
        "nothing of pgshift's reaches the target"
    );
    if major < 14 {
        let names = ReplicationNames::new(MIGRATION, DB);
        assert_eq!(
            source.psql(
                DB,
                &format!(
                    "SELECT string_agg(id, ',' ORDER BY id) FROM {}",
                    marker::qualified_table(&names)
                )
            ),
            "m1,m2"
        );
    }
    stream.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_11_streams_and_marks() {
    streams_every_change_and_marks(11, false, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_12_with_a_table_list_streams_and_marks() {
    streams_every_change_and_marks(12, true, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_13_streams_and_marks() {
    streams_every_change_and_marks(13, false, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_14_streams_and_marks_with_logical_messages() {
    streams_every_change_and_marks(14, true, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_11_to_target_18_streams_and_marks() {
    streams_every_change_and_marks(11, true, Some(18)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_18_streams_and_marks() {
    streams_every_change_and_marks(18, false, None).await;
}

/// Cancel and the end of a cutover release the marker table with the slot
/// and publication, on a fenced source too; the schema goes once empty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cleanup_drops_the_marker_table_on_a_fenced_source() {
    let Some(source) = source_with(13) else {
        return;
    };
    let target = Cluster::start();
    let cfg = prepare(&source, &target, false).await;
    let names = ReplicationNames::new(MIGRATION, DB);
    // Another migration of the same database keeps its own marker table.
    let other = ReplicationNames::new("other", DB);
    let src = source.client(DB).await;
    marker::ensure_table(&src, &other).await.unwrap();
    source.psql(
        "postgres",
        &format!("ALTER DATABASE {DB} SET default_transaction_read_only = on"),
    );
    let removed = cleanup(&cfg.source, MIGRATION, DB).await.unwrap();
    assert_eq!(
        removed,
        Cleanup {
            slot_dropped: true,
            publication_dropped: true,
            marker_table_dropped: true,
            ddl_capture_removed: false,
        }
    );
    let tables = |c: &Cluster| {
        c.psql(
            DB,
            "SELECT coalesce(string_agg(relname, ',' ORDER BY relname), '-') FROM pg_class c \
             JOIN pg_namespace n ON n.oid = c.relnamespace WHERE nspname = 'pgshift' AND relkind = 'r'",
        )
    };
    assert_eq!(tables(&source), other.publication);
    assert_eq!(
        cleanup(&cfg.source, MIGRATION, DB).await.unwrap(),
        Cleanup::default()
    );
    let removed = cleanup(&cfg.source, "other", DB).await.unwrap();
    assert!(removed.marker_table_dropped);
    assert_eq!(tables(&source), "-");
    assert_eq!(
        source.psql(
            DB,
            "SELECT count(*) FROM pg_namespace WHERE nspname = 'pgshift'"
        ),
        "0"
    );
    assert_eq!(marker::table_name(&names), names.publication);
}

/// The reported case, end to end through `pgshift run`: a 13 source to a
/// 16 target copies, streams and cuts over with clients writing through
/// the proxy; the marker row proves the catch-up, every acknowledged write
/// is on the target, and nothing of pgshift's stays on the source or
/// reaches the target.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cutover_from_13_to_16() {
    use cutover_common::{DB as SHOP, Pair, Writer, phase, write_one};
    if !(version_or_skip(13, "cutover_from_13_to_16")
        & version_or_skip(16, "cutover_from_13_to_16"))
    {
        return;
    }
    let pair = Pair::start_with(
        ClusterOptions {
            version: Some(13),
            ..Default::default()
        },
        ClusterOptions {
            version: Some(16),
            ..Default::default()
        },
    );
    // No rollback window: nothing of pgshift's may stay on the source.
    let shift = pair.launch("", "rollback = false", &[]);
    shift.wait_streaming_async(SHOP).await;
    let names = ReplicationNames::new("cut", SHOP);
    let marker_table = marker::qualified_table(&names);
    assert_eq!(
        pair.source.psql(
            SHOP,
            &format!("SELECT to_regclass('{marker_table}') IS NOT NULL")
        ),
        "t",
        "the marker table exists while streaming"
    );
    let writer = Writer::start(&shift.url(SHOP), "w").await;
    writer.wait_committed(3).await;
    let out = shift.cli_async(&["cutover", "--wait"]).await;
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}\n{}",
        out_text(&out),
        shift.log()
    );
    shift
        .wait_substate_async("Succeeded", "Completed", Duration::from_secs(120))
        .await;
    // Writes after the switch (checked below to have landed on the target).
    writer.wait_more(3).await;
    let w = writer.finish().await;
    assert!(w.errors.is_empty(), "writer errors: {:?}", w.errors);
    assert!(w.committed.iter().any(|c| c.1 as u16 == pair.source.port));
    assert!(w.committed.iter().any(|c| c.1 as u16 == pair.target.port));
    let last = shift.last_cutover_async().await;
    assert_eq!(phase(&last, "marker")["outcome"], "ok", "{last:#}");
    // Every write the source acknowledged is on the target exactly once.
    let on_source = Pair::ledger_ids(&pair.source);
    let on_target = Pair::ledger_ids(&pair.target);
    assert!(on_source.iter().all(|id| on_target.contains(id)));
    for (id, _) in &w.committed {
        assert!(on_target.contains(id), "id {id} lost");
    }
    let (id, port) = write_one(&shift.url(SHOP), "after").await.unwrap();
    assert_eq!(port as u16, pair.target.port);
    assert!(Pair::ledger_ids(&pair.target).contains(&id));
    // The switch released the slot, publication and marker table.
    for (c, what) in [(&pair.source, "source"), (&pair.target, "target")] {
        assert_eq!(
            c.psql(
                SHOP,
                "SELECT count(*) FROM pg_namespace WHERE nspname = 'pgshift'"
            ),
            "0",
            "no pgshift schema left in the {what}'s {SHOP}"
        );
    }
    assert_eq!(
        pair.source
            .psql("postgres", "SELECT count(*) FROM pg_replication_slots"),
        "0"
    );
    assert_eq!(
        pair.source
            .psql(SHOP, "SELECT count(*) FROM pg_publication"),
        "0",
        "the publication is dropped on the fenced source too"
    );
}

/// Premigration checks do not count the marker table as a user table: a
/// source user who owns every table of theirs passes, even when the marker
/// table (left by an earlier run with other credentials) is not theirs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validation_leaves_the_marker_table_out() {
    let Some(source) = source_with(13) else {
        return;
    };
    let target = Cluster::start();
    source.psql(
        "postgres",
        &format!("CREATE DATABASE {DB} OWNER {APP_USER}"),
    );
    source.psql(
        DB,
        &format!("SET ROLE {APP_USER}; CREATE TABLE t (id int PRIMARY KEY)"),
    );
    let names = ReplicationNames::new(MIGRATION, DB);
    marker::ensure_table(&source.client(DB).await, &names)
        .await
        .unwrap()
        .expect("13 needs a marker table");
    let text = format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\n\n[source]\nurl = \"{}\"\n\n[target]\nurl = \"{}\"\n\n\
         [migration]\nname = \"{MIGRATION}\"\ndatabases = [\"{DB}\"]\n",
        source.url_as(APP_USER, APP_PW, "postgres"),
        target.url("postgres")
    );
    let cfg = pgshift::Config::from_toml(&text, &|_| None).unwrap();
    let report = pgshift::validate::validate(&cfg).await;
    let check = report
        .get("publication_privilege", DB)
        .unwrap_or_else(|| panic!("{report:#?}"));
    assert_eq!(
        check.status,
        pgshift::validate::Status::Succeeded,
        "{check:?}"
    );
    assert!(!check.found.contains("pgshift"), "{check:?}");
}

/// The slot commands use the syntax the source knows: the keyword form of
/// CREATE_REPLICATION_SLOT before 15, and no DROP … WAIT before 13 (a clear
/// error instead of the server's syntax error).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slot_commands_on_source_11() {
    let Some(source) = source_with(11) else {
        return;
    };
    let ep = pgshift::config::Endpoint::parse("source.url", &source.url("postgres")).unwrap();
    let mut conn = ReplicationConnection::connect(&ep, "postgres", "pgshift-test")
        .await
        .unwrap();
    assert_eq!(conn.server_major_version(), 11);
    let slot = conn
        .create_slot("v11", SnapshotAction::Export, false)
        .await
        .unwrap();
    assert!(slot.snapshot_name.is_some(), "{slot:?}");
    let err = conn.drop_slot("v11", true).await.unwrap_err();
    assert!(err.to_string().contains("WAIT"), "{err}");
    assert!(conn.drop_slot("v11", false).await.unwrap());
    assert!(!conn.drop_slot("v11", false).await.unwrap());
    conn.create_slot("v11_tmp", SnapshotAction::NoExport, true)
        .await
        .unwrap();
    conn.close().await;
}
