//! Verification as of held snapshots (`verify_database_at`): both sides are
//! read as they were when the snapshots were exported, whatever is written
//! afterwards, and a difference is reported with its table and key range.

mod common;
use common::*;

use pgshift::config::Endpoint;
use pgshift::verify::{
    HeldSnapshot, VerifyMode, VerifyOptions, VerifyProgress, VerifyReport, export_pair,
    verify_database_at, verify_database_with,
};
use pgshift::{telemetry::status::Report, verify::TableVerify};

const DB: &str = "app";

/// A keyed table over several chunks (of [`CHUNK_ROWS`]), a keyless table,
/// a composite key with a mixed-case column, and TOASTed values.
const SCHEMA_AND_DATA: &str = r#"
    CREATE TABLE big (id int PRIMARY KEY, v text, n numeric, f float8);
    INSERT INTO big SELECT i, 'v' || i, i / 3.0, i / 7.0 FROM generate_series(1, 5000) i;
    CREATE TABLE nokey (a int, b text);
    INSERT INTO nokey SELECT i % 10, 'x' || (i % 3) FROM generate_series(1, 100) i;
    CREATE TABLE pair (tenant int, "Order No" text, qty int, PRIMARY KEY (tenant, "Order No"));
    INSERT INTO pair SELECT t, 'o-' || o, o FROM generate_series(1, 5) t, generate_series(1, 300) o;
    CREATE TABLE docs (id int PRIMARY KEY, body text);
    INSERT INTO docs SELECT i, (SELECT string_agg(md5(i::text || j::text), '') FROM generate_series(1, 400) j)
      FROM generate_series(1, 20) i;
"#;

const CHUNK_ROWS: i64 = 1000;

fn endpoint(c: &Cluster) -> Endpoint {
    Endpoint::parse("test", &c.url("postgres")).unwrap()
}

fn options(mode: VerifyMode) -> VerifyOptions {
    VerifyOptions {
        chunk_rows: CHUNK_ROWS,
        jobs: 2,
        ..VerifyOptions::new(mode)
    }
}

/// Both clusters with the same schema and data.
fn same_data(src: &Cluster, tgt: &Cluster) {
    for c in [src, tgt] {
        c.create_db(DB);
        c.psql(DB, SCHEMA_AND_DATA);
    }
    // The long values really are out of line.
    assert_eq!(
        src.psql(
            DB,
            "SELECT pg_relation_size(reltoastrelid) > 0 FROM pg_class WHERE relname = 'docs'"
        ),
        "t"
    );
}

/// Snapshots on both sides, taken as the cutover would: connected first,
/// then exported together.
async fn snapshots(src: &Cluster, tgt: &Cluster) -> (HeldSnapshot, HeldSnapshot) {
    let (se, te) = (endpoint(src), endpoint(tgt));
    let (s, t) = tokio::try_join!(
        HeldSnapshot::connect(&se, DB),
        HeldSnapshot::connect(&te, DB)
    )
    .unwrap();
    let (s, t) = export_pair(s, t).await.unwrap();
    assert!(!s.id().is_empty() && !t.id().is_empty());
    assert_eq!((s.database(), t.database()), (DB, DB));
    (s, t)
}

fn table<'a>(r: &'a VerifyReport, name: &str) -> &'a TableVerify {
    r.tables
        .iter()
        .find(|t| t.table == name)
        .unwrap_or_else(|| panic!("{name} in {r:?}"))
}

const TABLES: [&str; 4] = ["public.big", "public.docs", "public.nokey", "public.pair"];

#[tokio::test]
async fn writes_after_the_snapshots_are_not_seen() {
    let (src, tgt) = (Cluster::start(), Cluster::start());
    same_data(&src, &tgt);
    let (s, t) = snapshots(&src, &tgt).await;

    // Both sides change after the switch point, differently.
    src.psql(
        DB,
        "UPDATE big SET v = 'changed' WHERE id < 100;
         DELETE FROM nokey WHERE a = 1;
         INSERT INTO pair VALUES (9, 'new', 1);
         UPDATE docs SET body = body || 'x' WHERE id = 3;",
    );
    tgt.psql(
        DB,
        "DELETE FROM big WHERE id > 4000;
         INSERT INTO nokey VALUES (42, 'late');
         UPDATE pair SET qty = 0 WHERE tenant = 2;
         UPDATE docs SET body = 'short' WHERE id = 7;",
    );
    // The live databases differ now…
    let live = verify_database_with(
        &endpoint(&src),
        &endpoint(&tgt),
        DB,
        &options(VerifyMode::Checksums),
    )
    .await
    .unwrap();
    let mut live_bad: Vec<&str> = live.mismatches().map(|t| t.table.as_str()).collect();
    live_bad.sort();
    assert_eq!(live_bad, TABLES, "{live:?}");

    // …but as of the snapshots they are equal, by checksums and by counts.
    let reg = prometheus::Registry::new();
    let progress = VerifyProgress::with_metrics(DB, &reg);
    let r = verify_database_at(&s, &t, &options(VerifyMode::Checksums), &progress)
        .await
        .unwrap();
    assert!(r.ok(), "{r:?}");
    let mut names: Vec<&str> = r.tables.iter().map(|t| t.table.as_str()).collect();
    names.sort();
    assert_eq!(names, TABLES);
    assert_eq!(table(&r, "public.big").source_rows, Some(5000));
    assert_eq!(table(&r, "public.nokey").target_rows, Some(100));
    assert_eq!(table(&r, "public.pair").source_rows, Some(1500));

    let p = progress.report();
    assert_eq!(p["running"], false, "{p}");
    assert_eq!(p["tables"], 4, "{p}");
    assert_eq!(p["tables_compared"], 4, "{p}");
    assert_eq!(p["tables_mismatched"], 0, "{p}");
    assert_eq!(p["rows_compared"], 5000 + 100 + 1500 + 20, "{p}");
    let metrics = pgshift::telemetry::metrics::render(&reg).unwrap();
    assert!(
        metrics.contains("pgshift_verify_tables_compared{database=\"app\"} 4"),
        "{metrics}"
    );

    // A second run reuses the same snapshots (and the same gauges).
    let again = VerifyProgress::with_metrics(DB, &reg);
    let counts = verify_database_at(&s, &t, &options(VerifyMode::Counts), &again)
        .await
        .unwrap();
    assert!(counts.ok(), "{counts:?}");
    assert_eq!(again.tables_done(), 4);

    s.release().await.unwrap();
    t.release().await.unwrap();
}

#[tokio::test]
async fn a_difference_is_reported_with_its_table_and_key_range() {
    let (src, tgt) = (Cluster::start(), Cluster::start());
    same_data(&src, &tgt);
    // Planted before the switch point: a missing row and a changed value,
    // in two different chunks of one table.
    tgt.psql(
        DB,
        "DELETE FROM big WHERE id = 2500; UPDATE big SET v = 'planted' WHERE id = 4200;",
    );
    let (s, t) = snapshots(&src, &tgt).await;
    // Repaired after it: the snapshots still see the difference.
    tgt.psql(
        DB,
        "INSERT INTO big VALUES (2500, 'v2500', 2500 / 3.0, 2500 / 7.0);
         UPDATE big SET v = 'v4200' WHERE id = 4200;",
    );
    let progress = VerifyProgress::new(DB);
    let r = verify_database_at(&s, &t, &options(VerifyMode::Checksums), &progress)
        .await
        .unwrap();
    let bad: Vec<&str> = r.mismatches().map(|t| t.table.as_str()).collect();
    assert_eq!(bad, ["public.big"], "{r:?}");
    let big = table(&r, "public.big");
    assert_eq!((big.source_rows, big.target_rows), (Some(5000), Some(4999)));
    assert_eq!(
        big.ranges,
        [
            // Narrowed from the 1000-row chunks to the rows themselves.
            "rows with (id) above (2499) up to (2500) differ: source 1 row, target 0",
            "rows with (id) above (4199) up to (4200) differ in content (1 row on each side)",
        ],
        "{big:?}"
    );
    assert_eq!(big.detail.as_deref(), Some(big.ranges.join("; ").as_str()));
    assert_eq!(progress.tables_mismatched(), 1);
    // Paced as after a switch (one table at a time, a rest after each
    // chunk): the same findings.
    let paced = VerifyOptions {
        jobs: 1,
        pace: 1.0,
        ..options(VerifyMode::Checksums)
    };
    let again = verify_database_at(&s, &t, &paced, &VerifyProgress::new(DB))
        .await
        .unwrap();
    assert_eq!(table(&again, "public.big").ranges, big.ranges);
    assert_eq!(again.mismatches().count(), 1, "{again:?}");
    drop((s, t));

    // A composite key's range names both columns; a keyless table is
    // reported as a whole.
    tgt.psql(
        DB,
        r#"DELETE FROM pair WHERE tenant = 5 AND "Order No" = 'o-7';
           UPDATE nokey SET b = 'other' WHERE a = 3;"#,
    );
    let (s, t) = snapshots(&src, &tgt).await;
    let r = verify_database_at(&s, &t, &options(VerifyMode::Checksums), &progress)
        .await
        .unwrap();
    let mut bad: Vec<&str> = r.mismatches().map(|t| t.table.as_str()).collect();
    bad.sort();
    assert_eq!(bad, ["public.nokey", "public.pair"], "{r:?}");
    let pair = table(&r, "public.pair");
    assert_eq!(pair.ranges.len(), 1, "{pair:?}");
    let range = &pair.ranges[0];
    // Narrowed to the deleted row: the key before it, and the row itself.
    assert_eq!(
        range,
        r#"rows with (tenant, "Order No") above (5, 'o-69') up to (5, 'o-7') differ: source 1 row, target 0"#
    );
    assert_eq!(
        table(&r, "public.nokey").ranges,
        ["the whole table differs in content (100 rows on each side)"]
    );
}

#[tokio::test]
async fn oldest_source_to_newest_target() {
    let Some((src, tgt)) = start_pair(11, 18, "oldest_source_to_newest_target") else {
        return;
    };
    same_data(&src, &tgt);
    tgt.psql(DB, "UPDATE big SET f = f + 1 WHERE id = 10");
    let (s, t) = snapshots(&src, &tgt).await;
    assert_eq!((s.version().major(), t.version().major()), (11, 18));
    src.psql(DB, "UPDATE big SET v = 'after' WHERE id <= 2000");
    tgt.psql(
        DB,
        "UPDATE big SET f = id / 7.0 WHERE id = 10; DELETE FROM docs;",
    );
    let progress = VerifyProgress::new(DB);
    let r = verify_database_at(&s, &t, &options(VerifyMode::Checksums), &progress)
        .await
        .unwrap();
    let bad: Vec<&str> = r.mismatches().map(|t| t.table.as_str()).collect();
    assert_eq!(bad, ["public.big"], "{r:?}");
    assert_eq!(
        table(&r, "public.big").ranges,
        ["rows with (id) above (9) up to (10) differ in content (1 row on each side)"]
    );
    let counts = verify_database_at(&s, &t, &options(VerifyMode::Counts), &progress)
        .await
        .unwrap();
    assert!(counts.ok(), "{counts:?}");
}

/// TRUNCATE is not MVCC-safe: a snapshot from before it sees the table
/// empty. The difference is still reported, saying it may not be real.
#[tokio::test]
async fn a_truncate_after_the_snapshot_is_named() {
    let (src, tgt) = (Cluster::start(), Cluster::start());
    same_data(&src, &tgt);
    let (s, t) = snapshots(&src, &tgt).await;
    tgt.psql(DB, "TRUNCATE nokey");
    let r = verify_database_at(
        &s,
        &t,
        &options(VerifyMode::Counts),
        &VerifyProgress::new(DB),
    )
    .await
    .unwrap();
    let bad: Vec<&str> = r.mismatches().map(|t| t.table.as_str()).collect();
    assert_eq!(bad, ["public.nokey"], "{r:?}");
    let detail = table(&r, "public.nokey").detail.clone().unwrap_or_default();
    assert!(
        detail.contains("truncated or rewritten on the target after the snapshot"),
        "{detail}"
    );
}
