//! Schema copy, the consistent parallel data copy, sequences and verify,
//! against real clusters.

mod common;
use common::*;

use std::sync::Arc;

use pgshift::config::Endpoint;
use pgshift::filter::TableFilter;
use pgshift::replication::copy::{
    CopyMetrics, CopyOptions, CopyProgress, CopyReport, TableState, copy_database,
};
use pgshift::schema::{
    self, SchemaError, Section, TargetPrepared, copy_sequences, dump_restore_pre_data,
    dump_section, plan_dump, prepare_target_database, restore_section,
};
use pgshift::verify::{VerifyMode, VerifyOptions, verify_database, verify_database_with};
use tokio_util::sync::CancellationToken;

fn endpoint(c: &Cluster, db: &str) -> Endpoint {
    Endpoint::parse("test", &c.url(db)).unwrap()
}

/// A source connection holding a REPEATABLE READ transaction whose snapshot
/// is exported (kept open for as long as the client lives).
async fn export_snapshot(c: &Cluster, db: &str) -> (tokio_postgres::Client, String) {
    let client = c.client(db).await;
    client
        .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        .await
        .unwrap();
    let snap: String = client
        .query_one("SELECT pg_export_snapshot()", &[])
        .await
        .unwrap()
        .get(0);
    (client, snap)
}

fn options(jobs: usize, split: u64) -> CopyOptions {
    CopyOptions {
        jobs,
        split_larger_than: split,
        filter: TableFilter::default(),
    }
}

/// The whole schema + data + sequences path, as the migration runs it.
async fn migrate(
    src: &Cluster,
    tgt: &Cluster,
    db: &str,
    snapshot: &str,
    opts: &CopyOptions,
) -> (CopyReport, Arc<CopyProgress>) {
    let (s, t) = (endpoint(src, "postgres"), endpoint(tgt, "postgres"));
    prepare_target_database(&t, &s, db, true).await.unwrap();
    let plan = plan_dump(&s, &t, db).await.unwrap();
    assert!(plan.keep_owners, "{plan:?}");
    dump_restore_pre_data(&s, &t, db, Some(snapshot), &plan)
        .await
        .unwrap();
    // Post-data is dumped while the snapshot is valid and restored after the copy.
    let post_data = dump_section(&s, db, Some(snapshot), &plan, Section::PostData)
        .await
        .unwrap();
    let registry = prometheus::Registry::new();
    let metrics = CopyMetrics::register(&registry).unwrap();
    let progress = CopyProgress::new(db, Some(metrics));
    let report = copy_database(
        &s,
        &t,
        db,
        snapshot,
        opts,
        progress.clone(),
        CancellationToken::new(),
    )
    .await
    .unwrap();
    restore_section(&t, &post_data).await.unwrap();
    let seqs = copy_sequences(&src.client(db).await, &tgt.client(db).await)
        .await
        .unwrap();
    assert!(seqs.missing_on_target.is_empty(), "{seqs:?}");
    let text = pgshift::telemetry::metrics::render(&registry).unwrap();
    assert!(
        text.contains(&format!(
            "pgshift_copy_tables{{database=\"{db}\",state=\"copied\"}} {}",
            report.tables
        )),
        "{text}"
    );
    (report, progress)
}

const MANY_TYPES: &str = r#"
CREATE SCHEMA "Mixed Case";
CREATE SCHEMA "we""ird";
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE DOMAIN posint AS integer CHECK (VALUE > 0);
CREATE TYPE pair AS (a int, b text, m mood);
CREATE TABLE "Mixed Case"."Types Table" (
    id int GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    n numeric(20,5), big numeric, t text, b bytea, j jsonb,
    arr int[], tarr text[], m mood, marr mood[], d posint, p pair, parr pair[],
    ts timestamptz, u uuid, f float8, iv interval, r int4range,
    g int GENERATED ALWAYS AS (d * 2) STORED
);
INSERT INTO "Mixed Case"."Types Table" (n, big, t, b, j, arr, tarr, m, marr, d, p, parr, ts, u, f, iv, r)
SELECT i * 1.5, 10::numeric ^ 40 + i, 'café crème ñ ÿ ' || i, decode(md5(i::text), 'hex'),
       jsonb_build_object('k', i, 'nested', jsonb_build_array(i, 'é')),
       ARRAY[i, i + 1, NULL], ARRAY['a', 'ü' || i], (ARRAY['sad','ok','happy'])[i % 3 + 1]::mood,
       ARRAY['ok','happy']::mood[], i, ROW(i, 'pé' || i, 'ok')::pair,
       ARRAY[ROW(i, 'x', 'sad')::pair, NULL], '2024-01-01 12:00+02'::timestamptz + i * interval '1 hour',
       md5(i::text)::uuid, i / 7.0, i * interval '1 minute', int4range(i, i + 10)
FROM generate_series(1, 200) i;
INSERT INTO "Mixed Case"."Types Table" (t) VALUES (NULL), ('');
CREATE TABLE "we""ird"."ta""ble" (k text PRIMARY KEY, v text);
INSERT INTO "we""ird"."ta""ble" SELECT 'key ' || i, repeat('à', i) FROM generate_series(1, 50) i;
CREATE TABLE toasty (id serial PRIMARY KEY, big text, blob bytea);
INSERT INTO toasty (big, blob)
SELECT (SELECT string_agg(md5(i::text || j::text), '') FROM generate_series(1, 32768) j),
       (SELECT decode(string_agg(md5(j::text || i::text), ''), 'hex') FROM generate_series(1, 32768) j)
FROM generate_series(1, 3) i;
CREATE TABLE parted (id int, region text, v text, PRIMARY KEY (id, region)) PARTITION BY LIST (region);
CREATE TABLE parted_eu PARTITION OF parted FOR VALUES IN ('eu');
CREATE TABLE parted_us PARTITION OF parted FOR VALUES IN ('us');
CREATE TABLE parted_other PARTITION OF parted DEFAULT;
INSERT INTO parted SELECT i, (ARRAY['eu','us','apac'])[i % 3 + 1], 'v' || i FROM generate_series(1, 300) i;
CREATE TABLE nokey (a int, b text);
INSERT INTO nokey SELECT i % 10, 'dup' FROM generate_series(1, 40) i;
CREATE SEQUENCE free_seq START 100;
SELECT nextval('free_seq'), nextval('free_seq'), nextval('free_seq');
CREATE SEQUENCE never_called_seq START 7;
CREATE SEQUENCE "reset Seq";
SELECT setval('"reset Seq"', 50, false);
CREATE VIEW v AS SELECT count(*) FROM parted;
"#;

async fn sequence_state(c: &Cluster, db: &str) -> Vec<(String, i64, bool)> {
    let client = c.client(db).await;
    let mut out = vec![];
    for seq in [
        "free_seq",
        "never_called_seq",
        "\"reset Seq\"",
        "toasty_id_seq",
        "\"Mixed Case\".\"Types Table_id_seq\"",
    ] {
        let r = client
            .query_one(&format!("SELECT last_value, is_called FROM {seq}"), &[])
            .await
            .unwrap();
        out.push((seq.to_string(), r.get(0), r.get(1)));
    }
    out
}

#[tokio::test]
async fn many_types_in_latin1_copy_exactly() {
    let opts = ClusterOptions {
        encoding: Some("LATIN1".into()),
        ..Default::default()
    };
    let (src, tgt) = (Cluster::start_with(opts.clone()), Cluster::start_with(opts));
    src.create_db("app");
    src.client("app")
        .await
        .batch_execute(MANY_TYPES)
        .await
        .unwrap();
    let (_hold, snap) = export_snapshot(&src, "app").await;
    let (report, progress) = migrate(&src, &tgt, "app", &snap, &options(3, 1 << 30)).await;

    assert_eq!(
        tgt.psql(
            "postgres",
            "SELECT pg_encoding_to_char(encoding) FROM pg_database WHERE datname = 'app'"
        ),
        "LATIN1"
    );
    // Leaf partitions are copied, the partitioned parent is not a work item.
    assert_eq!(report.tables, 7, "{report:?}");
    // Composite columns and arrays of user types cannot travel in binary.
    assert!(
        report
            .text_format_tables
            .contains(&"Mixed Case.Types Table".to_string()),
        "{report:?}"
    );
    let snapshot = progress.snapshot();
    assert_eq!(snapshot.tables_copied, 7);
    assert!(
        snapshot
            .tables
            .iter()
            .all(|t| t.state == TableState::Copied)
    );
    assert_eq!(snapshot.rows, 202 + 50 + 3 + 300 + 40);
    assert!(snapshot.bytes > 3_000_000, "{}", snapshot.bytes);

    let v = verify_database(
        &endpoint(&src, "postgres"),
        &endpoint(&tgt, "postgres"),
        "app",
        VerifyMode::Checksums,
    )
    .await
    .unwrap();
    assert!(v.ok(), "{v:?}");
    assert_eq!(v.tables.len(), 7);
    assert_eq!(
        table_fingerprints(&src, "app"),
        table_fingerprints(&tgt, "app")
    );
    let t = r#"SELECT t FROM "Mixed Case"."Types Table" WHERE id = 1"#;
    assert_eq!(tgt.psql("app", t), src.psql("app", t));
    assert_eq!(
        sequence_state(&src, "app").await,
        sequence_state(&tgt, "app").await
    );
    // The identity column continues after the copied rows.
    assert_eq!(
        tgt.psql(
            "app",
            r#"INSERT INTO "Mixed Case"."Types Table" (d) VALUES (1) RETURNING id, g"#
        ),
        "203|2"
    );
}

#[tokio::test]
async fn rows_written_after_the_snapshot_are_not_copied() {
    let (src, tgt) = (Cluster::start(), Cluster::start());
    src.create_db("app");
    src.psql(
        "app",
        "CREATE TABLE t (id int PRIMARY KEY, v text);
         INSERT INTO t SELECT i, 'v' || i FROM generate_series(1, 1000) i;
         CREATE TABLE other (id bigserial PRIMARY KEY, x int);
         INSERT INTO other (x) SELECT i FROM generate_series(1, 100) i;",
    );
    let (_hold, snap) = export_snapshot(&src, "app").await;
    let before = table_fingerprints(&src, "app");
    src.psql(
        "app",
        "INSERT INTO t SELECT i, 'late' FROM generate_series(1001, 1500) i;
         UPDATE t SET v = 'changed' WHERE id <= 10;
         DELETE FROM t WHERE id BETWEEN 500 AND 520;
         INSERT INTO other (x) VALUES (0);",
    );
    migrate(&src, &tgt, "app", &snap, &options(2, 1 << 30)).await;
    assert_eq!(table_fingerprints(&tgt, "app"), before);
    assert_eq!(
        tgt.psql(
            "app",
            "SELECT count(*) FROM t WHERE v = 'changed' OR v = 'late'"
        ),
        "0"
    );
    // Sequences are read live (they are not transactional): the late nextval is there.
    assert_eq!(
        tgt.psql("app", "SELECT last_value FROM other_id_seq"),
        "101"
    );
}

#[tokio::test]
async fn large_table_is_split_into_ranges_and_copies_exactly() {
    let (src, tgt) = (Cluster::start(), Cluster::start());
    src.create_db("app");
    src.psql(
        "app",
        "CREATE TABLE big (id int PRIMARY KEY, pad text, n numeric);
         INSERT INTO big SELECT i, repeat(md5(i::text), 3), i / 3.0 FROM generate_series(1, 20000) i;
         DELETE FROM big WHERE id % 7 = 0;
         UPDATE big SET pad = 'updated' WHERE id % 11 = 0;
         CREATE TABLE small (id int PRIMARY KEY);
         INSERT INTO small SELECT generate_series(1, 10);",
    );
    let (_hold, snap) = export_snapshot(&src, "app").await;
    let (report, progress) = migrate(&src, &tgt, "app", &snap, &options(3, 64 << 10)).await;
    assert_eq!(report.split_tables, vec!["public.big".to_string()]);
    assert!(report.parts >= 20, "{report:?}");
    let big = progress
        .snapshot()
        .tables
        .into_iter()
        .find(|t| t.table == "public.big")
        .unwrap();
    assert_eq!(big.parts_done, big.parts);
    assert_eq!(big.rows as i64, 20000 - 20000 / 7);
    assert_eq!(
        table_fingerprints(&src, "app"),
        table_fingerprints(&tgt, "app")
    );
    // Small chunks make verify walk many key ranges.
    let small_chunks = VerifyOptions {
        chunk_rows: 1000,
        ..VerifyOptions::new(VerifyMode::Checksums)
    };
    let v = verify_database_with(
        &endpoint(&src, "postgres"),
        &endpoint(&tgt, "postgres"),
        "app",
        &small_chunks,
    )
    .await
    .unwrap();
    assert!(v.ok(), "{v:?}");
    // A change in the middle of the table is found in its chunk.
    tgt.psql("app", "UPDATE big SET n = n + 1 WHERE id = 9001");
    let v = verify_database_with(
        &endpoint(&src, "postgres"),
        &endpoint(&tgt, "postgres"),
        "app",
        &small_chunks,
    )
    .await
    .unwrap();
    assert!(!v.ok());
    let bad: Vec<_> = v.mismatches().map(|t| t.table.clone()).collect();
    assert_eq!(bad, vec!["public.big".to_string()]);
}

#[tokio::test]
async fn copy_error_names_the_table() {
    let (src, tgt) = (Cluster::start(), Cluster::start());
    src.create_db("app");
    src.psql(
        "app",
        "CREATE TABLE a (id int PRIMARY KEY); INSERT INTO a VALUES (1), (2);",
    );
    let (s, t) = (endpoint(&src, "postgres"), endpoint(&tgt, "postgres"));
    prepare_target_database(&t, &s, "app", true).await.unwrap();
    // The target table is narrower than the source: the copy must fail loudly.
    tgt.psql("app", "CREATE TABLE a (id int PRIMARY KEY CHECK (id < 2))");
    let (_hold, snap) = export_snapshot(&src, "app").await;
    let progress = CopyProgress::new("app", None);
    let e = copy_database(
        &s,
        &t,
        "app",
        &snap,
        &options(2, 1 << 30),
        progress.clone(),
        CancellationToken::new(),
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("public.a") && e.contains("check constraint"),
        "{e}"
    );
    assert_eq!(progress.snapshot().tables_error, 1);
}

#[tokio::test]
async fn prepare_target_database_overwrite_rules() {
    let (src, tgt) = (Cluster::start(), Cluster::start());
    src.psql(
        "postgres",
        "CREATE DATABASE app ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0",
    );
    let (s, t) = (endpoint(&src, "postgres"), endpoint(&tgt, "postgres"));
    assert_eq!(
        prepare_target_database(&t, &s, "app", false).await.unwrap(),
        TargetPrepared::Created
    );
    assert_eq!(
        tgt.psql("postgres", "SELECT pg_encoding_to_char(encoding), datcollate FROM pg_database WHERE datname = 'app'"),
        "LATIN1|C"
    );
    // Empty: reused as it is.
    assert_eq!(
        prepare_target_database(&t, &s, "app", false).await.unwrap(),
        TargetPrepared::Reused
    );
    tgt.psql(
        "app",
        "CREATE TABLE leftover (x int); INSERT INTO leftover VALUES (1)",
    );
    let e = prepare_target_database(&t, &s, "app", false)
        .await
        .unwrap_err();
    assert!(matches!(e, SchemaError::TargetNotEmpty { .. }), "{e}");
    assert!(e.to_string().contains("overwrite"), "{e}");
    assert_eq!(tgt.psql("app", "SELECT count(*) FROM leftover"), "1");
    // Overwrite drops it even while someone is connected.
    let holder = tgt.client("app").await;
    assert_eq!(
        prepare_target_database(&t, &s, "app", true).await.unwrap(),
        TargetPrepared::Recreated
    );
    assert!(holder.simple_query("SELECT 1").await.is_err());
    assert_eq!(
        tgt.psql(
            "app",
            "SELECT count(*) FROM pg_class WHERE relname = 'leftover'"
        ),
        "0"
    );
    // A database missing on the source is a clear error.
    let e = prepare_target_database(&t, &s, "nope", true)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("nope"), "{e}");
}

#[tokio::test]
async fn replica_identity_survives_schema_copy() {
    let (src, tgt) = (Cluster::start(), Cluster::start());
    src.create_db("app");
    src.psql(
        "app",
        "CREATE TABLE by_index (a int NOT NULL, b int NOT NULL, v text);
         CREATE UNIQUE INDEX by_index_ab ON by_index (a, b);
         ALTER TABLE by_index REPLICA IDENTITY USING INDEX by_index_ab;
         CREATE TABLE by_unique (a int NOT NULL CONSTRAINT by_unique_a UNIQUE, v text);
         ALTER TABLE by_unique REPLICA IDENTITY USING INDEX by_unique_a;
         CREATE TABLE full_ri (a int, v text);
         ALTER TABLE full_ri REPLICA IDENTITY FULL;
         CREATE TABLE nothing_ri (a int PRIMARY KEY);
         ALTER TABLE nothing_ri REPLICA IDENTITY NOTHING;
         CREATE TABLE default_ri (a int PRIMARY KEY);
         INSERT INTO by_index VALUES (1, 1, 'x');",
    );
    let (_hold, snap) = export_snapshot(&src, "app").await;
    migrate(&src, &tgt, "app", &snap, &options(2, 1 << 30)).await;
    let q = "SELECT c.relname, c.relreplident, coalesce((SELECT i.indexrelid::regclass::text FROM pg_index i \
             WHERE i.indrelid = c.oid AND i.indisreplident), '-') \
             FROM pg_class c WHERE c.relkind = 'r' AND c.relnamespace = 'public'::regnamespace ORDER BY 1";
    let expected = "by_index|i|by_index_ab\nby_unique|i|by_unique_a\ndefault_ri|d|-\nfull_ri|f|-\nnothing_ri|n|-";
    assert_eq!(src.psql("app", q), expected);
    assert_eq!(tgt.psql("app", q), expected);
}

#[tokio::test]
async fn roles_are_copied_without_touching_existing_ones() {
    let (src, tgt) = (Cluster::start(), Cluster::start());
    src.psql(
        "postgres",
        "CREATE ROLE owner_role LOGIN PASSWORD 'pw1'; CREATE ROLE \"Read\"\"Only\" NOLOGIN;
         GRANT \"Read\"\"Only\" TO owner_role; ALTER ROLE app CONNECTION LIMIT 3;",
    );
    let (s, t) = (endpoint(&src, "postgres"), endpoint(&tgt, "postgres"));
    let r = schema::copy_roles(&s, &t).await.unwrap();
    assert!(r.created.contains(&"owner_role".to_string()), "{r:?}");
    assert!(r.created.contains(&"Read\"Only".to_string()), "{r:?}");
    assert!(r.existing.contains(&"app".to_string()), "{r:?}");
    assert!(r.errors.is_empty(), "{r:?}");
    assert_eq!(
        tgt.psql("postgres", "SELECT pg_has_role('owner_role', 'Read\"Only', 'MEMBER'), rolconnlimit FROM pg_roles WHERE rolname = 'app'"),
        "t|-1"
    );
    // The copied role logs in with its source password.
    connect(&tgt.url_as("owner_role", "pw1", "postgres")).await;
}

fn write_config(dir: &std::path::Path, src: &Cluster, tgt: &Cluster) -> std::path::PathBuf {
    let path = dir.join("pgshift.toml");
    std::fs::write(
        &path,
        format!(
            r#"
[proxy]
listen = "127.0.0.1:16432"
[[proxy.users]]
name = "app"
password = "app_pw"
[source]
url = "{}"
[target]
url = "{}"
[admin]
listen = "127.0.0.1:19432"
[migration]
name = "verify-test"
databases = ["app"]
"#,
            src.url("postgres"),
            tgt.url("postgres")
        ),
    )
    .unwrap();
    path
}

fn run_verify(config: &std::path::Path, extra: &[&str]) -> (i32, String) {
    let out = std::process::Command::new(pgshift_bin())
        .arg("verify")
        .arg("--config")
        .arg(config)
        .args(extra)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        eprintln!(
            "pgshift verify stderr: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    (out.status.code().unwrap_or(-1), stdout)
}

#[tokio::test]
async fn verify_binary_detects_changed_and_missing_rows() {
    let (src, tgt) = (Cluster::start(), Cluster::start());
    src.create_db("app");
    src.psql(
        "app",
        "CREATE TABLE orders (id int PRIMARY KEY, amount numeric, note text);
         INSERT INTO orders SELECT i, i * 2.5, 'n' || i FROM generate_series(1, 500) i;
         CREATE TABLE events (k text, v int);
         INSERT INTO events SELECT 'e' || (i % 5), i FROM generate_series(1, 50) i;
         CREATE TABLE untouched (id int PRIMARY KEY);",
    );
    let (_hold, snap) = export_snapshot(&src, "app").await;
    migrate(&src, &tgt, "app", &snap, &options(2, 1 << 30)).await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &src, &tgt);

    let (code, out) = run_verify(&config, &[]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("public.orders") && out.contains("500") && out.contains("all tables match"),
        "{out}"
    );

    tgt.psql("app", "UPDATE orders SET note = 'tampered' WHERE id = 250");
    let (code, out) = run_verify(&config, &["--database", "app"]);
    assert_eq!(code, 1, "{out}");
    let line = out.lines().find(|l| l.contains("public.orders")).unwrap();
    assert!(line.contains("MISMATCH"), "{out}");
    assert!(
        out.lines()
            .any(|l| l.contains("public.events") && l.contains("match") && !l.contains("MISMATCH")),
        "{out}"
    );
    // Counts alone do not see a changed value.
    let (code, out) = run_verify(&config, &["--counts-only"]);
    assert_eq!(code, 0, "{out}");

    tgt.psql(
        "app",
        "UPDATE orders SET note = 'n250' WHERE id = 250; DELETE FROM events WHERE v = 7",
    );
    let (code, out) = run_verify(&config, &["--json"]);
    assert_eq!(code, 1, "{out}");
    let doc: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(doc["ok"], false);
    let tables = doc["databases"][0]["tables"].as_array().unwrap();
    let events = tables
        .iter()
        .find(|t| t["table"] == "public.events")
        .unwrap();
    assert_eq!(
        (
            events["source_rows"].as_i64(),
            events["target_rows"].as_i64()
        ),
        (Some(50), Some(49))
    );
    assert_eq!(events["matches"], false);
    let orders = tables
        .iter()
        .find(|t| t["table"] == "public.orders")
        .unwrap();
    assert_eq!(orders["matches"], true);
}
