//! Premigration validation against real clusters: the library report and the
//! `pgshift validate` binary (exit code, table and JSON output).

mod common;
use common::*;

use std::path::{Path, PathBuf};
use std::process::Command;

use pgshift::validate::{Status, ValidationReport, validate};

/// A config text for `source`/`target` URLs and the `[migration]` body.
fn config_for_urls(source: &str, target: &str, migration: &str) -> String {
    format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\n\n[source]\nurl = \"{source}\"\n\n[target]\nurl = \"{target}\"\n\n[migration]\n{migration}\n"
    )
}

/// The body of `[migration]` (migration `vt` of `databases`) with `extra` keys.
fn migration_body(databases: &[&str], extra: &str) -> String {
    let list = databases
        .iter()
        .map(|d| format!("\"{d}\""))
        .collect::<Vec<_>>()
        .join(", ");
    format!("name = \"vt\"\ndatabases = [{list}]\n{extra}")
}

/// The config of a migration of `databases` from `src` to `dst` as the
/// superuser, with `extra` keys in `[migration]`.
fn pair_config(src: &Cluster, dst: &Cluster, databases: &[&str], extra: &str) -> String {
    config_for_urls(
        &src.url("postgres"),
        &dst.url("postgres"),
        &migration_body(databases, extra),
    )
}

/// A source (started with `source`) with an empty database `app`, and a target.
fn pair_with_app(source: ClusterOptions) -> (Cluster, Cluster) {
    let src = Cluster::start_with(source);
    let dst = Cluster::start();
    src.create_db("app");
    (src, dst)
}

fn load(text: &str) -> pgshift::Config {
    pgshift::Config::from_toml(text, &|_| None).expect("valid test config")
}

/// The library's validation report for a config text.
async fn report_for(text: &str) -> ValidationReport {
    validate(&load(text)).await
}

fn write_config(dir: &Path, text: &str) -> PathBuf {
    let p = dir.join("pgshift.toml");
    std::fs::write(&p, text).unwrap();
    p
}

/// Writes `text` to a config file and runs `pgshift validate --config FILE`
/// with `args`: (exit code, stdout, stderr).
fn run_validate_config(text: &str, args: &[&str]) -> (i32, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), text);
    let mut all = vec!["--config", cfg.to_str().unwrap()];
    all.extend_from_slice(args);
    run_validate(&all)
}

/// Runs `pgshift validate` and returns (exit code, stdout, stderr).
fn run_validate(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(pgshift_bin())
        .arg("validate")
        .args(args)
        .output()
        .expect("run pgshift");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn status_of(r: &ValidationReport, name: &str, scope: &str) -> Status {
    r.get(name, scope)
        .unwrap_or_else(|| panic!("no check {name}/{scope} in {r:#?}"))
        .status
}

fn action_of(r: &ValidationReport, name: &str, scope: &str) -> String {
    r.get(name, scope)
        .and_then(|c| c.action.clone())
        .unwrap_or_else(|| panic!("no action for {name}/{scope} in {r:#?}"))
}

#[tokio::test]
async fn healthy_pair_passes_and_reports_what_is_not_carried() {
    let (src, dst) = pair_with_app(ClusterOptions::default());
    src.psql("app", "CREATE TABLE orders (id bigint PRIMARY KEY, note text); INSERT INTO orders VALUES (1, 'a');");
    src.create_db("extras");
    src.psql(
        "extras",
        "CREATE TABLE items (id int PRIMARY KEY); \
         CREATE UNLOGGED TABLE scratch (id int PRIMARY KEY); \
         CREATE MATERIALIZED VIEW item_count AS SELECT count(*) FROM items; \
         SELECT lo_from_bytea(0, 'blob');",
    );
    src.psql(
        "postgres",
        "CREATE DATABASE latin TEMPLATE template0 ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C'",
    );
    let text = pair_config(&src, &dst, &["app", "extras", "latin"], "");

    let report = report_for(&text).await;
    assert!(!report.has_failures(), "{report:#?}");
    assert_eq!(status_of(&report, "column_types", "app"), Status::Succeeded);
    assert_eq!(
        status_of(&report, "connection", "source"),
        Status::Succeeded
    );
    assert_eq!(
        status_of(&report, "connection", "target"),
        Status::Succeeded
    );
    for name in [
        "wal_level",
        "replication_slots",
        "wal_senders",
        "replication_privilege",
    ] {
        assert_eq!(
            status_of(&report, name, "source"),
            Status::Succeeded,
            "{name}"
        );
    }
    for name in [
        "distinct_servers",
        "server_version",
        "create_database_privilege",
        "replication_origin_privilege",
        "session_replication_role",
        "control_schema",
    ] {
        assert_eq!(
            status_of(&report, name, "target"),
            Status::Succeeded,
            "{name}"
        );
    }
    // A pg_dump of the target's own version fits exactly; on a machine that
    // has only a newer one (no PostgreSQL installed: the fetched 16 and 18),
    // validation warns that the dump may hold syntax the target lacks.
    let fits = if client_bin_for(dst.major()).is_some() {
        Status::Succeeded
    } else {
        Status::Warning
    };
    assert_eq!(status_of(&report, "pg_dump", "pgshift"), fits);
    for name in [
        "database_on_source",
        "database_on_target",
        "encoding_locale",
        "extensions",
        "extension_preload",
        "replica_identity",
        "publication_privilege",
    ] {
        assert_eq!(status_of(&report, name, "app"), Status::Succeeded, "{name}");
    }
    let latin = report.get("encoding_locale", "latin").unwrap();
    assert_eq!(latin.status, Status::Succeeded);
    assert!(latin.found.contains("encoding LATIN1"), "{latin:?}");
    assert!(
        report
            .get("connection", "source")
            .unwrap()
            .found
            .contains("PostgreSQL 15")
    );
    // What logical replication does not carry is a Warning that says so.
    for name in ["unlogged_tables", "large_objects", "materialized_views"] {
        assert_eq!(status_of(&report, name, "app"), Status::Succeeded, "{name}");
        assert_eq!(
            status_of(&report, name, "extras"),
            Status::Warning,
            "{name}"
        );
    }
    let unlogged = report.get("unlogged_tables", "extras").unwrap();
    assert!(
        unlogged.found.contains("\"public\".\"scratch\"")
            && unlogged.found.contains("not streamed"),
        "{unlogged:?}"
    );
    assert!(
        action_of(&report, "unlogged_tables", "extras")
            .contains("ALTER TABLE \"public\".\"scratch\" SET LOGGED;")
    );
    assert!(
        report
            .get("large_objects", "extras")
            .unwrap()
            .found
            .contains("1 large object")
    );
    assert!(
        action_of(&report, "materialized_views", "extras")
            .contains("REFRESH MATERIALIZED VIEW \"public\".\"item_count\";")
    );

    // The binary: exit 0, a JSON document with the same checks, and a readable table.
    let (code, out, err) = run_validate_config(&text, &["--json"]);
    assert_eq!(code, 0, "stdout: {out}\nstderr: {err}");
    let doc: serde_json::Value = serde_json::from_str(&out).expect("JSON output");
    assert_eq!(doc["summary"]["failed"], 0);
    assert_eq!(
        doc["summary"]["total"].as_u64().unwrap() as usize,
        doc["checks"].as_array().unwrap().len()
    );
    assert!(doc["summary"]["warning"].as_u64().unwrap() >= 3);
    assert!(
        doc["checks"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["name"] == "wal_level" && c["status"] == "Succeeded")
    );

    let (code, out, _) = run_validate_config(&text, &[]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("STATUS") && out.contains("FOUND"), "{out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("Warning") && l.contains("materialized_views")),
        "{out}"
    );
    assert!(out.contains("action: refresh them on the target"), "{out}");
    assert!(out.contains("0 failed"), "{out}");
}

#[tokio::test]
async fn source_with_replica_wal_level_fails_online_only() {
    let (src, dst) = pair_with_app(ClusterOptions {
        wal_level: "replica".into(),
        ..Default::default()
    });
    let text = pair_config(&src, &dst, &["app"], "");
    let report = report_for(&text).await;
    assert_eq!(status_of(&report, "wal_level", "source"), Status::Failed);
    assert!(
        report
            .get("wal_level", "source")
            .unwrap()
            .found
            .contains("wal_level = replica")
    );
    assert!(
        action_of(&report, "wal_level", "source").contains("ALTER SYSTEM SET wal_level = logical")
    );

    let (code, out, err) = run_validate_config(&text, &[]);
    assert_eq!(code, 1, "stdout: {out}\nstderr: {err}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("Failed") && l.contains("wal_level")),
        "{out}"
    );
    assert!(
        out.contains("action: on the source: ALTER SYSTEM SET wal_level = logical"),
        "{out}"
    );

    // Offline mode does not need logical decoding.
    let offline = pair_config(&src, &dst, &["app"], "mode = \"offline\"");
    let report = report_for(&offline).await;
    assert_eq!(status_of(&report, "wal_level", "source"), Status::Succeeded);
    assert!(!report.has_failures(), "{report:#?}");
}

#[tokio::test]
async fn tables_without_key_fail_online_with_the_fix() {
    let (src, dst) = pair_with_app(ClusterOptions::default());
    src.psql(
        "app",
        "CREATE SCHEMA \"Odd Schema\"; \
         CREATE TABLE \"Odd Schema\".nokey (a int, b text); \
         CREATE TABLE public.uniq (id int NOT NULL, CONSTRAINT uniq_id UNIQUE (id)); \
         CREATE TABLE public.nothing (id int PRIMARY KEY); ALTER TABLE public.nothing REPLICA IDENTITY NOTHING; \
         CREATE TABLE public.full_ident (a int); ALTER TABLE public.full_ident REPLICA IDENTITY FULL; \
         CREATE TABLE public.good (id int PRIMARY KEY); \
         CREATE TABLE public.parted (id int, k int) PARTITION BY RANGE (k); \
         CREATE TABLE public.parted_1 PARTITION OF public.parted FOR VALUES FROM (0) TO (10);",
    );
    let text = pair_config(&src, &dst, &["app"], "");
    let report = report_for(&text).await;
    assert_eq!(
        status_of(&report, "replica_identity", "app"),
        Status::Failed
    );
    let found = &report.get("replica_identity", "app").unwrap().found;
    assert!(found.starts_with("4 table(s)"), "{found}");
    assert!(
        !found.contains("good") && !found.contains("full_ident"),
        "{found}"
    );
    let action = action_of(&report, "replica_identity", "app");
    for fix in [
        "ALTER TABLE \"Odd Schema\".\"nokey\" REPLICA IDENTITY FULL;",
        "ALTER TABLE \"public\".\"uniq\" REPLICA IDENTITY USING INDEX \"uniq_id\";",
        "ALTER TABLE \"public\".\"nothing\" REPLICA IDENTITY DEFAULT;",
        "ALTER TABLE \"public\".\"parted_1\" REPLICA IDENTITY FULL;",
    ] {
        assert!(action.contains(fix), "missing {fix} in {action}");
    }
    // The fixes are real SQL: applying them makes the check pass.
    let fixes: String = action
        .lines()
        .filter(|l| l.starts_with("ALTER TABLE"))
        .collect::<Vec<_>>()
        .join("\n");
    src.psql("app", &fixes);
    let report = report_for(&text).await;
    assert_eq!(
        status_of(&report, "replica_identity", "app"),
        Status::Succeeded,
        "{report:#?}"
    );
    src.psql(
        "app",
        "ALTER TABLE \"Odd Schema\".nokey REPLICA IDENTITY DEFAULT",
    );

    let (code, out, _) = run_validate_config(&text, &[]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("REPLICA IDENTITY FULL;"), "{out}");

    // Offline mode streams nothing: not a failure.
    let offline = pair_config(&src, &dst, &["app"], "mode = \"offline\"");
    let report = report_for(&offline).await;
    assert_eq!(
        status_of(&report, "replica_identity", "app"),
        Status::Succeeded
    );
    assert!(!report.has_failures(), "{report:#?}");

    // Filters: an excluded table is not checked.
    let filtered = pair_config(&src, &dst, &["app"], "exclude_tables = [\"Odd Schema.*\"]");
    let report = report_for(&filtered).await;
    assert_eq!(
        status_of(&report, "replica_identity", "app"),
        Status::Succeeded,
        "{report:#?}"
    );
}

#[tokio::test]
async fn extensions_missing_or_not_preloaded_on_target_fail() {
    let (src, dst) = pair_with_app(ClusterOptions {
        conf: vec!["shared_preload_libraries = 'pg_stat_statements'".into()],
        ..Default::default()
    });
    src.psql(
        "app",
        "CREATE EXTENSION pg_stat_statements; CREATE EXTENSION hstore;",
    );
    let text = pair_config(&src, &dst, &["app"], "");
    let report = report_for(&text).await;
    assert_eq!(
        status_of(&report, "extensions", "app"),
        Status::Succeeded,
        "{report:#?}"
    );
    assert_eq!(
        status_of(&report, "extension_preload", "app"),
        Status::Failed
    );
    assert!(
        report
            .get("extension_preload", "app")
            .unwrap()
            .found
            .contains("pg_stat_statements")
    );
    assert_eq!(
        action_of(&report, "extension_preload", "app"),
        "on the target: ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements'; then restart the target server"
    );
    assert_eq!(
        status_of(&report, "shared_preload_libraries", "target"),
        Status::Warning
    );

    // Applying the action on the target fixes it.
    let mut dst = dst;
    dst.psql(
        "postgres",
        "ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements'",
    );
    dst.restart();
    let text = pair_config(&src, &dst, &["app"], "");
    let report = report_for(&text).await;
    assert_eq!(
        status_of(&report, "extension_preload", "app"),
        Status::Succeeded,
        "{report:#?}"
    );

    // An extension the target cannot install: a catalog entry for an extension that
    // no installation ships, and an hstore version newer than any the target has
    // (this throwaway source's catalog is edited; no system directory is touched).
    src.psql(
        "app",
        "INSERT INTO pg_extension (oid, extname, extowner, extnamespace, extrelocatable, extversion) \
         VALUES (pg_nextoid('pg_extension', 'oid', 'pg_extension_oid_index'), 'pgshift_missing_ext', 10, 2200, false, '1.0'); \
         UPDATE pg_extension SET extversion = '99.0' WHERE extname = 'hstore';",
    );
    let report = report_for(&text).await;
    assert_eq!(status_of(&report, "extensions", "app"), Status::Failed);
    let found = &report.get("extensions", "app").unwrap().found;
    assert!(
        found.contains("pgshift_missing_ext 1.0: not available on the target"),
        "{found}"
    );
    assert!(
        found.contains("hstore 99.0: the target offers only up to"),
        "{found}"
    );
    assert!(
        action_of(&report, "extensions", "app").contains("DROP EXTENSION \"pgshift_missing_ext\";")
    );
    // A column whose type (here an array of it) that extension provides:
    // named with its table before anything starts.
    src.psql(
        "app",
        "CREATE TYPE ext_t AS ENUM ('x'); CREATE TABLE uses_ext (id int PRIMARY KEY, v ext_t[]); \
         INSERT INTO pg_depend VALUES ('pg_type'::regclass, 'ext_t'::regtype, 0, 'pg_extension'::regclass, \
           (SELECT oid FROM pg_extension WHERE extname = 'pgshift_missing_ext'), 0, 'e');",
    );
    let report = report_for(&text).await;
    assert_eq!(status_of(&report, "column_types", "app"), Status::Failed);
    let found = &report.get("column_types", "app").unwrap().found;
    assert!(
        found.contains(
            "column public.uses_ext.v (ext_t[], built from ext_t): type ext_t comes from extension pgshift_missing_ext, which the target cannot install"
        ),
        "{found}"
    );

    let (code, out, _) = run_validate_config(&text, &["--json"]);
    assert_eq!(code, 1, "{out}");
    let doc: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(
        doc["checks"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["name"] == "extensions" && c["status"] == "Failed")
    );
}

#[tokio::test]
async fn databases_missing_on_source_or_busy_on_target() {
    let src = Cluster::start();
    let dst = Cluster::start();
    for db in ["app", "busy", "empty"] {
        src.create_db(db);
    }
    dst.create_db("busy");
    dst.psql("busy", "CREATE TABLE leftover (id int)");
    dst.create_db("empty");
    let text = pair_config(
        &src,
        &dst,
        &["app", "ghost", "busy", "empty"],
        "overwrite = false",
    );
    let report = report_for(&text).await;
    assert_eq!(
        status_of(&report, "database_on_source", "app"),
        Status::Succeeded
    );
    assert_eq!(
        status_of(&report, "database_on_source", "ghost"),
        Status::Failed
    );
    assert!(action_of(&report, "database_on_source", "ghost").contains("remove \"ghost\""));
    assert_eq!(
        status_of(&report, "database_on_target", "app"),
        Status::Succeeded
    );
    assert_eq!(
        status_of(&report, "database_on_target", "busy"),
        Status::Failed
    );
    assert!(
        report
            .get("database_on_target", "busy")
            .unwrap()
            .found
            .contains("1 tables")
    );
    assert!(action_of(&report, "database_on_target", "busy").contains("overwrite = true"));
    assert_eq!(
        status_of(&report, "database_on_target", "empty"),
        Status::Succeeded
    );
    assert_eq!(
        status_of(&report, "target_database_locale", "empty"),
        Status::Succeeded
    );
    // A missing database gets no checks of its contents.
    assert!(report.get("replica_identity", "ghost").is_none());
    assert!(report.get("database_on_target", "ghost").is_none());

    let (code, out, _) = run_validate_config(&text, &[]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("Failed") && l.contains("ghost")),
        "{out}"
    );

    // A locale the target does not have (the source's catalog is edited to name
    // one no host has: no system directory is touched).
    src.create_db("badloc");
    src.psql(
        "postgres",
        "UPDATE pg_database SET datcollate = 'xx_XX.UTF-8', datctype = 'xx_XX.UTF-8' WHERE datname = 'badloc'",
    );
    let locale = pair_config(&src, &dst, &["badloc"], "");
    let report = report_for(&locale).await;
    let check = report.get("encoding_locale", "badloc").unwrap();
    assert_eq!(check.status, Status::Failed, "{check:?}");
    assert!(check.found.contains("xx_XX.UTF-8"), "{check:?}");
    assert!(action_of(&report, "encoding_locale", "badloc").contains("locale-gen"));

    let overwrite = pair_config(&src, &dst, &["app", "busy"], "overwrite = true");
    let report = report_for(&overwrite).await;
    assert_eq!(
        status_of(&report, "database_on_target", "busy"),
        Status::Warning
    );
    assert!(
        report
            .get("database_on_target", "busy")
            .unwrap()
            .found
            .contains("dropped and recreated")
    );
    assert!(!report.has_failures(), "{report:#?}");
}

#[tokio::test]
async fn non_superusers_get_the_grants_they_need() {
    let (src, dst) = pair_with_app(ClusterOptions::default());
    src.psql("app", "CREATE TABLE t (id int PRIMARY KEY)");
    src.psql("postgres", "REVOKE CREATE ON DATABASE app FROM PUBLIC");
    let text = config_for_urls(
        &src.url_as(APP_USER, APP_PW, "postgres"),
        &dst.url_as(APP_USER, APP_PW, "postgres"),
        &migration_body(&["app"], ""),
    );
    let report = report_for(&text).await;
    // app has REPLICATION and CREATEDB.
    assert_eq!(
        status_of(&report, "replication_privilege", "source"),
        Status::Succeeded
    );
    assert_eq!(
        status_of(&report, "create_database_privilege", "target"),
        Status::Succeeded
    );
    assert_eq!(
        status_of(&report, "publication_privilege", "app"),
        Status::Failed
    );
    let action = action_of(&report, "publication_privilege", "app");
    assert!(
        action.contains("GRANT CREATE ON DATABASE \"app\" TO \"app\";"),
        "{action}"
    );
    assert!(
        action.contains("ALTER TABLE \"public\".\"t\" OWNER TO \"app\";"),
        "{action}"
    );
    assert_eq!(
        status_of(&report, "replication_origin_privilege", "target"),
        Status::Failed
    );
    assert_eq!(
        status_of(&report, "session_replication_role", "target"),
        Status::Failed
    );

    // The printed grants are real SQL that fix the rows.
    for line in action
        .lines()
        .filter(|l| l.starts_with("GRANT") || l.starts_with("ALTER"))
    {
        src.psql("app", line);
    }
    dst.psql(
        "postgres",
        &action_of(&report, "replication_origin_privilege", "target")
            .replace("on the target: ", ""),
    );
    dst.psql(
        "postgres",
        &action_of(&report, "session_replication_role", "target").replace("on the target: ", ""),
    );
    assert_eq!(
        status_of(&report, "control_schema", "target"),
        Status::Failed
    );
    dst.psql(
        "postgres",
        &action_of(&report, "control_schema", "target").replace("on the target: ", ""),
    );
    let report = report_for(&text).await;
    assert!(!report.has_failures(), "{report:#?}");
}

/// DDL capture needs a source user that may create event triggers: with
/// `ddl = "auto"` a user that may not is a warning (schema changes will
/// stop apply), with `replicate` a failure, with `stop` nothing to check.
#[tokio::test]
async fn ddl_capture_needs_a_user_that_may_create_event_triggers() {
    let (src, dst) = pair_with_app(ClusterOptions::default());
    let as_app = |extra: &str| {
        config_for_urls(
            &src.url_as(APP_USER, APP_PW, "postgres"),
            &dst.url("postgres"),
            &migration_body(&["app"], extra),
        )
    };
    let report = report_for(&as_app("")).await;
    assert_eq!(status_of(&report, "ddl_capture", "source"), Status::Warning);
    let row = report.get("ddl_capture", "source").unwrap();
    assert!(
        row.found.contains("may not create event triggers") && row.found.contains("\"stop\""),
        "{row:?}"
    );
    assert!(action_of(&report, "ddl_capture", "source").contains("ALTER ROLE \"app\" SUPERUSER"));
    let report = report_for(&as_app("ddl = \"replicate\"")).await;
    assert_eq!(status_of(&report, "ddl_capture", "source"), Status::Failed);
    let report = report_for(&as_app("ddl = \"stop\"")).await;
    assert_eq!(
        status_of(&report, "ddl_capture", "source"),
        Status::Succeeded
    );
    let report = report_for(&pair_config(&src, &dst, &["app"], "ddl = \"replicate\"")).await;
    assert_eq!(
        status_of(&report, "ddl_capture", "source"),
        Status::Succeeded
    );
}

#[tokio::test]
async fn unreachable_or_refused_servers_are_failed_rows() {
    let dst = Cluster::start();
    dst.create_db("app");
    let bad_pw = config_for_urls(
        &dst.url_as(SUPERUSER, "wrong", "postgres"),
        &dst.url("postgres"),
        &migration_body(&["app"], ""),
    );
    let report = report_for(&bad_pw).await;
    assert_eq!(status_of(&report, "connection", "source"), Status::Failed);
    assert!(action_of(&report, "connection", "source").contains("fix the password"));
    assert_eq!(
        status_of(&report, "connection", "target"),
        Status::Succeeded
    );
    // Target-only checks still run; source-dependent ones are skipped.
    assert_eq!(
        status_of(&report, "create_database_privilege", "target"),
        Status::Succeeded
    );
    assert!(report.get("wal_level", "source").is_none());
    assert!(report.get("replica_identity", "app").is_none());
    assert_eq!(
        status_of(&report, "database_on_target", "app"),
        Status::Succeeded
    );
    assert!(report.has_failures());

    // The same server on both sides is refused before anything could be dropped.
    let same = pair_config(&dst, &dst, &["app"], "overwrite = true");
    let report = report_for(&same).await;
    assert_eq!(
        status_of(&report, "distinct_servers", "target"),
        Status::Failed
    );
    assert!(report.has_failures());

    let port = free_port();
    let down = config_for_urls(
        &format!("postgres://postgres:pw@127.0.0.1:{port}/postgres"),
        &dst.url("postgres"),
        &migration_body(&["app"], ""),
    );
    let (code, out, err) = run_validate_config(&down, &[]);
    assert_eq!(code, 1, "stdout: {out}\nstderr: {err}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("Failed") && l.contains("connection") && l.contains("source")),
        "{out}"
    );
    assert!(out.contains(&format!("127.0.0.1:{port}")), "{out}");
}

#[test]
fn bad_config_or_invocation_exits_2() {
    let url = "postgres://postgres:pw@127.0.0.1:1/postgres";
    let cases = [
        (migration_body(&["app"], "mode = \"sideways\""), "mode"),
        (
            migration_body(&["app"], "copy_jobs = 0"),
            "migration.copy_jobs",
        ),
        (
            "name = \"-bad\"\ndatabases = [\"app\"]".to_string(),
            "migration.name",
        ),
    ];
    for (body, key) in cases {
        let (code, out, err) = run_validate_config(&config_for_urls(url, url, &body), &[]);
        assert_eq!(code, 2, "{key}: stdout {out} stderr {err}");
        assert!(err.contains(key), "{key}: {err}");
        assert!(out.is_empty(), "{out}");
    }
    // No [migration] section.
    let text = config_for_urls(url, url, "").replace("[migration]\n", "");
    let (code, _, err) = run_validate_config(&text, &[]);
    assert_eq!(code, 2);
    assert!(err.contains("`migration`"), "{err}");
    // A file that does not exist, and a missing --config.
    let (code, _, err) = run_validate(&["--config", "/nonexistent/pgshift.toml"]);
    assert_eq!(code, 2);
    assert!(err.contains("/nonexistent/pgshift.toml"), "{err}");
    let (code, _, _) = run_validate(&[]);
    assert_eq!(code, 2);

    let (code, out, _) = run_validate(&["--help"]);
    assert_eq!(code, 0);
    for needle in ["--config", "--json", "Exit status", "corrective action"] {
        assert!(out.contains(needle), "{needle} missing from help:\n{out}");
    }
}

/// Version pairs pgshift does not migrate fail validation with the
/// corrective action: a downgrade, and a target older than 15.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsupported_version_pairs_fail() {
    for (s, t, words, action) in [
        (
            17,
            16,
            "older major version than the source's 17",
            "PostgreSQL 17 to 18",
        ),
        (12, 14, "older than 15", "PostgreSQL 15 to 18"),
    ] {
        let Some((src, tgt)) = start_pair(s, t, "unsupported_version_pairs_fail") else {
            continue;
        };
        src.create_db("app");
        let text = pair_config(&src, &tgt, &["app"], "");
        let report = report_for(&text).await;
        let check = report
            .get("server_version", "target")
            .expect("version check");
        assert_eq!(check.status, Status::Failed, "{s}->{t}: {check:?}");
        assert!(check.found.contains(words), "{s}->{t}: {check:?}");
        assert!(
            check.action.as_deref().unwrap().contains(action),
            "{s}->{t}: {check:?}"
        );
        assert!(report.has_failures());
    }
}

/// Who the cutover's fence reaches: the roles it will set NOLOGIN, a role
/// it cannot (pgshift's own user, listed), one that also uses another
/// database, and a superuser it does not cover.
#[tokio::test]
async fn fence_checks_name_who_the_fence_reaches_and_misses() {
    let (src, dst) = pair_with_app(ClusterOptions::default());
    src.psql(
        "postgres",
        "CREATE ROLE reporter LOGIN; CREATE ROLE dba SUPERUSER LOGIN;",
    );
    src.psql("postgres", "CREATE DATABASE reports OWNER reporter");
    let base = pair_config(&src, &dst, &["app"], "");

    let r = report_for(&base).await;
    assert_eq!(status_of(&r, "fence_roles", "source"), Status::Succeeded);
    let found = &r.get("fence_roles", "source").unwrap().found;
    assert!(
        found.contains("app") && found.contains("reporter") && !found.contains("dba"),
        "{found}"
    );
    assert_eq!(
        status_of(&r, "fence_other_databases", "source"),
        Status::Warning
    );
    let found = &r.get("fence_other_databases", "source").unwrap().found;
    assert!(
        found.contains("reporter") && !found.contains("app,"),
        "{found}"
    );
    assert_eq!(
        status_of(&r, "fence_unfenced_logins", "source"),
        Status::Warning
    );
    assert!(
        r.get("fence_unfenced_logins", "source")
            .unwrap()
            .found
            .contains("dba")
    );

    // pgshift's own user listed: it cannot fence it (a warning: every
    // cutover will stop at its fence check).
    let listed = format!("{base}\n[cutover]\nfence_roles = [\"{SUPERUSER}\"]\n");
    let r = report_for(&listed).await;
    assert_eq!(status_of(&r, "fence_roles", "source"), Status::Warning);
    let c = r.get("fence_roles", "source").unwrap();
    assert!(c.found.contains(SUPERUSER), "{c:?}");
    assert!(!r.has_failures(), "{r:#?}");
}
