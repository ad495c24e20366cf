//! Catalog smoke test: every version-specific query pgshift has (the
//! `probes` of src/pg/) and the functions that run them, against a live
//! server of each major version 11–18. A version whose programs are not
//! installed is skipped with a note, unless PGSHIFT_REQUIRE_VERSIONS asks
//! for it (CI sets `11-18`).

mod common;
use common::*;

use pgshift::pg::Version;
use tokio_postgres::types::Type;

const DB: &str = "smoke";

/// A value of parameter type `t` that matches nothing, for executing probes.
fn run_probe_sql(t: &Type) -> Box<dyn tokio_postgres::types::ToSql + Sync + Send> {
    match *t {
        Type::OID => Box::new(0u32),
        Type::INT4 => Box::new(0i32),
        Type::INT8 => Box::new(0i64),
        Type::TEXT_ARRAY | Type::NAME_ARRAY => Box::new(Vec::<String>::new()),
        Type::OID_ARRAY => Box::new(Vec::<u32>::new()),
        _ => Box::new("pgshift_no_such_object".to_string()),
    }
}

/// Prepares and runs every probe of `pgshift::pg::probes`.
async fn run_probes(c: &tokio_postgres::Client, v: Version) {
    let probes = pgshift::pg::probes(v);
    assert!(probes.len() >= 10, "probes: {probes:?}");
    for p in probes {
        let stmt = c.prepare(&p.sql).await.unwrap_or_else(|e| {
            panic!(
                "PostgreSQL {v}: probe {} does not prepare: {e:?}\n{}",
                p.name, p.sql
            )
        });
        let params: Vec<_> = stmt.params().iter().map(run_probe_sql).collect();
        let refs: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> =
            params.iter().map(|b| b.as_ref() as _).collect();
        c.query(&stmt, &refs)
            .await
            .unwrap_or_else(|e| panic!("PostgreSQL {v}: probe {} fails: {e:?}", p.name));
    }
}

/// Objects whose catalog entries differ across versions: a partitioned
/// table, a generated column (12+), sequences, an identity column.
fn create_objects(c: &Cluster, major: i32) {
    c.create_db(DB);
    let generated = if major >= 12 {
        ", doubled int GENERATED ALWAYS AS (n * 2) STORED"
    } else {
        ""
    };
    c.psql(
        DB,
        &format!(
            "CREATE TABLE plain (id int PRIMARY KEY, n int{generated});
             INSERT INTO plain (id, n) SELECT g, g FROM generate_series(1, 10) g;
             CREATE TABLE parted (id int, at date, PRIMARY KEY (id, at)) PARTITION BY RANGE (at);
             CREATE TABLE parted_2024 PARTITION OF parted FOR VALUES FROM ('2024-01-01') TO ('2025-01-01');
             INSERT INTO parted VALUES (1, '2024-05-01');
             CREATE TABLE ident (id int GENERATED ALWAYS AS IDENTITY PRIMARY KEY, v text);
             INSERT INTO ident (v) VALUES ('a'), ('b');
             CREATE SEQUENCE used_seq; SELECT setval('used_seq', 41);
             CREATE SEQUENCE fresh_seq START 7;"
        ),
    );
}

async fn check_slot_and_publication(c: &Cluster, client: &tokio_postgres::Client, major: i32) {
    use pgshift::replication::{publication, slot};
    client
        .query(
            "SELECT pg_create_logical_replication_slot('smoke_slot', 'pgoutput')",
            &[],
        )
        .await
        .expect("create slot");
    let state = slot::slot_state(client, "smoke_slot")
        .await
        .unwrap_or_else(|e| panic!("PostgreSQL {major}: slot_state: {e}"))
        .expect("slot exists");
    assert_eq!(state.plugin.as_deref(), Some("pgoutput"));
    assert_eq!(state.wal_status.is_some(), major >= 13, "{state:?}");
    assert!(
        slot::drop_slot_if_exists(client, "smoke_slot", true)
            .await
            .unwrap()
    );

    publication::create_publication(client, "smoke_pub", None)
        .await
        .unwrap_or_else(|e| panic!("PostgreSQL {major}: create_publication: {e}"));
    // Another shape replaces it; the same shape keeps it.
    let tables = vec!["public.plain".to_string(), "public.parted_2024".to_string()];
    for _ in 0..2 {
        publication::create_publication(client, "smoke_pub", Some(&tables))
            .await
            .unwrap_or_else(|e| panic!("PostgreSQL {major}: publication for tables: {e}"));
    }
    let published = c.psql(
        DB,
        "SELECT string_agg(tablename, ',' ORDER BY tablename) FROM pg_publication_tables WHERE pubname = 'smoke_pub'",
    );
    assert_eq!(published, "parted_2024,plain");
    if major >= 13 {
        // A publication that names changes after the root is replaced.
        c.psql(
            DB,
            "ALTER PUBLICATION smoke_pub SET (publish_via_partition_root = true)",
        );
        publication::create_publication(client, "smoke_pub", Some(&tables))
            .await
            .unwrap();
        assert_eq!(
            c.psql(
                DB,
                "SELECT pubviaroot FROM pg_publication WHERE pubname = 'smoke_pub'"
            ),
            "f"
        );
    }
    assert!(
        publication::drop_publication(client, "smoke_pub")
            .await
            .unwrap()
    );
}

async fn check_tables_and_sequences(c: &Cluster, client: &tokio_postgres::Client, major: i32) {
    let tables = pgshift::pg::tables::list_tables(client, &Default::default())
        .await
        .unwrap_or_else(|e| panic!("PostgreSQL {major}: list_tables: {e}"));
    let mut names: Vec<String> = tables.iter().map(|t| t.quoted()).collect();
    names.sort();
    assert_eq!(
        names,
        vec![
            "\"public\".\"ident\"",
            "\"public\".\"parted_2024\"",
            "\"public\".\"plain\""
        ]
    );
    let plain = tables.iter().find(|t| t.name == "plain").unwrap();
    assert_eq!(
        plain.columns,
        vec!["\"id\"", "\"n\""],
        "generated columns are not copied"
    );

    // Sequences into a second database of the same server.
    c.create_db("smoke_copy");
    c.psql(
        "smoke_copy",
        "CREATE SEQUENCE used_seq; CREATE SEQUENCE fresh_seq START 7; CREATE SEQUENCE ident_id_seq;",
    );
    let other = c.client("smoke_copy").await;
    let r = pgshift::schema::copy_sequences(client, &other)
        .await
        .unwrap_or_else(|e| panic!("PostgreSQL {major}: copy_sequences: {e}"));
    assert_eq!(r.copied, 3, "{r:?}");
    assert_eq!(
        c.psql("smoke_copy", "SELECT last_value, is_called FROM used_seq"),
        "41|t"
    );
    assert_eq!(
        c.psql("smoke_copy", "SELECT last_value, is_called FROM fresh_seq"),
        "7|f"
    );
}

/// CREATE DATABASE with each locale provider the version has, read back
/// through the locale query, then DROP DATABASE as pgshift spells it.
async fn check_databases(c: &Cluster, client: &tokio_postgres::Client, v: Version) {
    use pgshift::pg::database::{DbLocale, create_database_sql, drop_database_sql, locale_sql};
    let mut locales = vec![("libc_db", "c", None)];
    if v.at_least(15) {
        locales.push(("icu_db", "i", Some("und")));
    }
    if v.at_least(17) {
        locales.push(("builtin_db", "b", Some("C")));
    }
    for (db, provider, locale) in locales {
        let l = DbLocale {
            encoding: "UTF8".into(),
            collate: "C".into(),
            ctype: "C".into(),
            provider: provider.into(),
            locale: locale.map(str::to_string),
            icu_rules: None,
        };
        let sql = create_database_sql(v, db, &l).unwrap();
        client
            .batch_execute(&sql)
            .await
            .unwrap_or_else(|e| panic!("PostgreSQL {v}: {sql}: {e:?}"));
        let row = client.query_one(&locale_sql(v), &[&db]).await.unwrap();
        assert_eq!(row.get::<_, String>(4), provider, "{db}");
        assert_eq!(row.get::<_, Option<String>>(5).as_deref(), locale, "{db}");
        let other = c.client(db).await; // a session DROP must get rid of
        if !v.at_least(13) {
            drop(other);
            client
                .execute(pgshift::pg::database::TERMINATE_SESSIONS_SQL, &[&db])
                .await
                .unwrap();
        } else {
            std::mem::forget(other);
        }
        let drop_sql = drop_database_sql(v, db);
        let mut dropped = false;
        for _ in 0..2400 {
            match client.batch_execute(&drop_sql).await {
                Ok(()) => {
                    dropped = true;
                    break;
                }
                // Before 13 the terminated session may take a moment to exit.
                Err(e)
                    if !v.at_least(13)
                        && e.code() == Some(&tokio_postgres::error::SqlState::OBJECT_IN_USE) =>
                {
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
                Err(e) => panic!("PostgreSQL {v}: {drop_sql}: {e:?}"),
            }
        }
        assert!(dropped, "PostgreSQL {v}: {db} still in use");
    }
}

/// The fence's version-dependent termination (waiting from 14) of an
/// application role's session that bypasses the proxy, and lifting it again.
async fn check_fence(c: &Cluster, admin: &tokio_postgres::Client, v: Version) {
    use pgshift::cutover::fence;
    let app_url = c.url_as(APP_USER, APP_PW, DB);
    let bypassing = connect(&app_url).await;
    let dbs = vec![DB.to_string()];
    let planned = fence::plan(admin, &dbs, &[])
        .await
        .unwrap_or_else(|e| panic!("PostgreSQL {v}: plan: {e}"));
    assert!(fence::count_bypassing(admin, &planned, &[]).await.unwrap() >= 1);
    let rec = fence::fence(admin, &dbs, &[], &[])
        .await
        .unwrap_or_else(|e| panic!("PostgreSQL {v}: fence: {e}"));
    assert_eq!(rec.await_termination, v.at_least(14));
    assert!(rec.terminated_sessions >= 1, "PostgreSQL {v}: {rec:?}");
    assert!(bypassing.simple_query("SELECT 1").await.is_err());
    assert!(
        tokio_postgres::connect(&app_url, tokio_postgres::NoTls)
            .await
            .is_err(),
        "PostgreSQL {v}: a fenced role logged in"
    );
    fence::lift(admin, &rec).await.unwrap();
    connect(&app_url)
        .await
        .simple_query("SELECT 1")
        .await
        .unwrap();
}

/// `pgshift validate` of the server against itself: every check's query
/// runs on this version (the pair itself fails: same server).
async fn check_validation(c: &Cluster, major: i32) {
    let text = format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\n[source]\nurl = \"{}\"\n[target]\nurl = \"{}\"\n\
         [migration]\nname = \"smoke\"\ndatabases = [\"{DB}\"]\n",
        c.url("postgres"),
        c.url("postgres")
    );
    let config = pgshift::Config::from_toml(&text, &|_| None).expect("config");
    let report = pgshift::validate::validate(&config).await;
    for check in &report.checks {
        assert!(
            !check.found.contains("query failed"),
            "PostgreSQL {major}: {} ({}): {}",
            check.name,
            check.scope,
            check.found
        );
    }
    let version = report
        .get("server_version", "target")
        .expect("version check");
    let want = if major >= 15 {
        pgshift::validate::Status::Succeeded
    } else {
        pgshift::validate::Status::Failed
    };
    assert_eq!(version.status, want, "{version:?}");
}

async fn smoke(major: i32) {
    let name = format!("pg_versions::v{major}");
    if !version_or_skip(major, &name) {
        return;
    }
    let c = Cluster::start_version(major);
    assert_eq!(c.major(), major);
    create_objects(&c, major);
    let client = c.client(DB).await;
    let v = Version::of(&client).await.unwrap();
    assert_eq!(v.major(), major);
    run_probes(&client, v).await;
    check_slot_and_publication(&c, &client, major).await;
    check_tables_and_sequences(&c, &client, major).await;
    let admin = c.client("postgres").await;
    check_databases(&c, &admin, v).await;
    check_validation(&c, major).await;
    // Last: it terminates `client`.
    check_fence(&c, &admin, v).await;
}

macro_rules! versions {
    ($($name:ident => $major:expr),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                smoke($major).await;
            }
        )*
    };
}

versions! {
    v11 => 11, v12 => 12, v13 => 13, v14 => 14,
    v15 => 15, v16 => 16, v17 => 17, v18 => 18,
}
