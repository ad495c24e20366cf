//! The type corpus (tests/data/types_corpus.sql, types_stream.sql) and a
//! row-by-row comparison of every table, shared by tests/types_corpus.rs and
//! the version matrix (tests/e2e_versions.rs). The SQL runs on any source
//! version 11+ (psql's `\if` leaves out what a version lacks).

use std::process::Command;

use crate::common::*;

fn data_file(name: &str) -> String {
    format!("{}/tests/data/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// Runs a SQL file with psql, each statement in its own transaction, with
/// the psql variable `off` set to `off`.
pub fn run_file(c: &Cluster, db: &str, file: &str, off: u32) {
    let o = Command::new(pg_program("psql"))
        .args([
            "-X",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-v",
            &format!("off={off}"),
        ])
        .args(["-d", &c.url(db), "-f"])
        .arg(data_file(file))
        .output()
        .expect("run psql");
    assert!(
        o.status.success(),
        "{file} on PostgreSQL {}: {}",
        c.major(),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Every table of `db` holding rows (partitions and inheritance children
/// each on their own; `kinds`: relkinds, e.g. "r,m" with materialized
/// views), as a quoted name.
pub fn tables(c: &Cluster, db: &str, kinds: &str) -> Vec<String> {
    c.psql(
        db,
        &format!(
            "SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c \
             JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE c.relkind::text = ANY (string_to_array('{kinds}', ',')) \
             AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'pgshift') \
             AND n.nspname NOT LIKE 'pg_toast%' ORDER BY 1"
        ),
    )
    .lines()
    .map(str::to_string)
    .collect()
}

/// A table's rows as text with its columns in name order (so a table whose
/// column order differs on the target compares equal), sorted: the query
/// yielding them and the count with a checksum of the whole.
fn rows_query(c: &Cluster, db: &str, table: &str) -> String {
    let cols = c.psql(
        db,
        &format!(
            "SELECT string_agg(quote_ident(attname), ', ' ORDER BY attname) FROM pg_attribute \
             WHERE attrelid = '{}'::regclass AND attnum > 0 AND NOT attisdropped",
            table.replace('\'', "''")
        ),
    );
    format!("SELECT ROW({cols})::text AS r FROM ONLY {table}")
}

fn checksum(c: &Cluster, db: &str, table: &str, set: &str) -> String {
    c.psql(
        db,
        &format!(
            "{set}SELECT count(*) || ' ' || coalesce(md5(string_agg(r, E'\\n' ORDER BY r COLLATE \"C\")), '') \
             FROM ({}) x",
            rows_query(c, db, table)
        ),
    )
}

fn rows(c: &Cluster, db: &str, table: &str, set: &str) -> String {
    c.psql(
        db,
        &format!(
            "{set}SELECT r FROM ({}) x ORDER BY r COLLATE \"C\"",
            rows_query(c, db, table)
        ),
    )
}

/// Source and target hold the same tables of `kinds` with the same rows
/// (at least `min_tables` of them); a difference shows both sides' rows.
pub fn assert_same(
    phase: &str,
    source: &Cluster,
    target: &Cluster,
    db: &str,
    kinds: &str,
    min_tables: usize,
) {
    assert_same_except(phase, source, target, db, kinds, min_tables, &[])
}

/// [`assert_same`] but for the tables named in `except` (e.g. written on
/// the target after a switch), which need only exist on both sides.
pub fn assert_same_except(
    phase: &str,
    source: &Cluster,
    target: &Cluster,
    db: &str,
    kinds: &str,
    min_tables: usize,
    except: &[&str],
) {
    let names = tables(source, db, kinds);
    assert_eq!(
        names,
        tables(target, db, kinds),
        "{phase}: the tables differ"
    );
    assert!(names.len() >= min_tables, "{phase}: {names:?}");
    let set = comparable_floats(source, target);
    for t in names.iter().filter(|t| !except.contains(&t.as_str())) {
        if checksum(source, db, t, &set) != checksum(target, db, t, &set) {
            panic!(
                "{phase}: table {t} differs\nsource:\n{}\ntarget:\n{}",
                rows(source, db, t, &set),
                rows(target, db, t, &set)
            );
        }
    }
    assert_floats_exact(phase, source, target, db);
    eprintln!("{phase}: {} tables identical", names.len());
}

/// The corpus's floats (types_schema.floats) are the same bits on both
/// sides, whatever the versions print.
pub fn assert_floats_exact(phase: &str, source: &Cluster, target: &Cluster, db: &str) {
    let bits = "SELECT string_agg(concat_ws(' ', id, encode(float8send(f8), 'hex'), \
                encode(float4send(f4), 'hex'), \
                (SELECT string_agg(encode(float8send(e), 'hex'), ',') FROM unnest(f8s) e), \
                encode(float8send((cx).r), 'hex'), encode(float8send((cx).i), 'hex')), \
                E'\\n' ORDER BY id) FROM types_schema.floats";
    let s = source.psql(db, bits);
    assert!(!s.is_empty(), "{phase}: no floats in the corpus");
    assert_eq!(
        s,
        target.psql(db, bits),
        "{phase}: floats differ in their bits"
    );
}
