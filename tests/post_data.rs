//! Post-data during the copy: a table's indexes and index-backed
//! constraints are built as soon as its data is in, while other tables are
//! still copying, and the target's schema ends up exactly what a plain
//! `pg_dump --schema-only` restore gives (partitions, foreign keys, unique,
//! deferrable and exclusion constraints, partial and expression indexes,
//! triggers, NOT VALID checks, a materialized view's index, clustering).
//! Run for the oldest and the newest source versions.

mod common;
use common::*;

use std::path::PathBuf;
use std::time::Duration;

const STARTUP: Duration = Duration::from_secs(180);
/// The advisory lock `public.gate` waits on: held by the test on the
/// target, it holds the copy of `big` (whose column's domain calls gate)
/// for as long as the test wants, without any timing.
const GATE_KEY: i64 = 4242;

const SCHEMA: &str = "
CREATE FUNCTION gate(v int) RETURNS boolean LANGUAGE sql
  AS $$ SELECT true FROM (SELECT pg_advisory_xact_lock_shared(4242)) s $$;
CREATE DOMAIN gated AS int CHECK (public.gate(VALUE));
CREATE TABLE big(id int PRIMARY KEY, g gated, pad text);
CREATE INDEX big_pad ON big (pad);
INSERT INTO big SELECT i, i, repeat('x', 200) FROM generate_series(1, 2000) i;

CREATE TABLE parent(id int PRIMARY KEY, name text UNIQUE, code int);
ALTER TABLE parent ADD CONSTRAINT parent_code_u UNIQUE (code) DEFERRABLE INITIALLY DEFERRED;
CREATE TABLE child(id int PRIMARY KEY, pid int REFERENCES parent ON DELETE CASCADE,
                   v int CHECK (v > 0), note text);
CREATE INDEX child_lower ON child (lower(note)) WHERE v > 10;
CREATE UNIQUE INDEX child_note_u ON child (note) WHERE note IS NOT NULL;
ALTER TABLE child ADD CONSTRAINT child_v_small CHECK (v < 1000000) NOT VALID;
ALTER TABLE child CLUSTER ON child_pkey;
CREATE TABLE booking(id int PRIMARY KEY, during tsrange,
                     EXCLUDE USING gist (during WITH &&));
CREATE TABLE ev(id int, at date, note text, PRIMARY KEY (id, at)) PARTITION BY RANGE (at);
CREATE TABLE ev_1 PARTITION OF ev FOR VALUES FROM ('2024-01-01') TO ('2025-01-01');
CREATE TABLE ev_2 PARTITION OF ev FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');
CREATE INDEX ev_note ON ev (note);
ALTER TABLE ev ADD CONSTRAINT ev_parent_fk FOREIGN KEY (id) REFERENCES parent(id);
CREATE FUNCTION touch() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NEW; END $$;
CREATE TRIGGER child_touch BEFORE UPDATE ON child FOR EACH ROW EXECUTE PROCEDURE touch();
CREATE MATERIALIZED VIEW parent_names AS SELECT id, name FROM parent;
CREATE UNIQUE INDEX parent_names_id ON parent_names (id);

INSERT INTO parent SELECT i, 'p' || i, i FROM generate_series(1, 100) i;
INSERT INTO child SELECT i, 1 + i % 100, i, 'n' || i FROM generate_series(1, 500) i;
INSERT INTO booking SELECT i, tsrange('2024-01-01'::timestamp + i * interval '1 hour',
                                      '2024-01-01'::timestamp + (i + 1) * interval '1 hour')
  FROM generate_series(1, 100) i;
INSERT INTO ev SELECT i, date '2024-06-01' + (i % 2) * 365, 'e' || i FROM generate_series(1, 100) i;
REFRESH MATERIALIZED VIEW parent_names;
";

/// The small tables with indexes of their own, whose builds must finish
/// while `big` is held.
const SMALL: [&str; 5] = [
    "public.parent",
    "public.child",
    "public.booking",
    "public.ev_1",
    "public.ev_2",
];

/// The pg_dump and psql the comparison uses: the target's (what pgshift
/// picks for a target at least as new as the source).
fn client(major: i32, program: &str) -> PathBuf {
    client_bin_for(major)
        .map(|d| d.join(program))
        .unwrap_or_else(|| pg_program(program))
}

fn pair(source: i32, target: i32) {
    let test = format!("post_data {source}->{target}");
    let Some((src, tgt)) = start_pair(source, target, &test) else {
        return;
    };
    src.create_db("shop");
    src.psql("shop", SCHEMA);

    // The target database exists (empty) so that the test can hold the
    // gate there before pgshift starts; pgshift reuses an empty database.
    tgt.create_db("shop");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let gate = rt.block_on(tgt.client("shop"));
    rt.block_on(gate.execute("SELECT pg_advisory_lock($1)", &[&GATE_KEY]))
        .unwrap();

    let p = Pgshift::start(
        &src,
        &tgt,
        &migration("postdata", &["shop"], "copy_jobs = 2\nindex_jobs = 2"),
    );
    // Every small table's own indexes are built while big's copy is held.
    let s = p.wait_status(
        "small tables' indexes built during the copy",
        STARTUP,
        |s| {
            let db = &s["databases"]["shop"];
            let big_copying = db["copy"]["tables"].as_array().is_some_and(|t| {
                t.iter()
                    .any(|t| t["table"] == "public.big" && t["state"] == "copying")
            });
            big_copying && db["post_data"]["tables_done"].as_u64() == Some(SMALL.len() as u64)
        },
    );
    let post = &s["databases"]["shop"]["post_data"];
    assert_eq!(
        post["tables_total"],
        SMALL.len() as u64 + 1,
        "{test}: {post}"
    );
    assert_eq!(post["rest_done"], false, "{test}: {post}");
    let built = tgt.psql(
        "shop",
        "SELECT string_agg(indexname, ',' ORDER BY indexname) FROM pg_indexes WHERE schemaname = 'public'",
    );
    for idx in [
        "parent_pkey",
        "parent_name_key",
        "parent_code_u",
        "child_pkey",
        "child_lower",
        "child_note_u",
        "booking_during_excl",
        "ev_1_pkey",
        "ev_2_note_idx",
    ] {
        assert!(
            built.split(',').any(|i| i == idx),
            "{test}: {idx} missing in {built}"
        );
    }
    for later in [
        "big_pkey",
        "big_pad",
        "ev_pkey",
        "ev_note",
        "parent_names_id",
    ] {
        assert!(
            !built.split(',').any(|i| i == later),
            "{test}: {later} already in {built}"
        );
    }
    // Nothing that spans tables yet: foreign keys and triggers come last.
    assert_eq!(
        tgt.psql(
            "shop",
            "SELECT count(*) FROM pg_constraint WHERE contype = 'f'"
        ),
        "0",
        "{test}"
    );

    rt.block_on(gate.execute("SELECT pg_advisory_unlock($1)", &[&GATE_KEY]))
        .unwrap();
    let s = p.wait_state("WaitingForUserAction", STARTUP);
    let post = &s["databases"]["shop"]["post_data"];
    assert_eq!(post["rest_done"], true, "{test}: {post}");
    assert_eq!(post["items_done"], post["items_total"], "{test}: {post}");
    let log = p.log();
    let small_built = log
        .find("post-data: indexes built for public.")
        .unwrap_or_else(|| panic!("{test}: no per-table post-data in the log:\n{log}"));
    let big_copied = log
        .find("table=public.big")
        .unwrap_or_else(|| panic!("{test}: big's copy not in the log:\n{log}"));
    assert!(small_built < big_copied, "{test}: the log's order:\n{log}");

    // The schema is exactly a plain pg_dump --schema-only restore's, made
    // on the target server by the same pg_dump.
    let pg_dump = client(target, "pg_dump");
    restore_schema_reference(&src, "shop", &tgt, "shop_ref", &pg_dump);
    let copied = schema_of(&tgt, "shop", &pg_dump);
    assert_eq!(
        copied,
        schema_of(&tgt, "shop_ref", &pg_dump),
        "{test}: schema differs"
    );
    if source == target {
        assert_eq!(
            copied,
            schema_of(&src, "shop", &pg_dump),
            "{test}: schema differs from the source"
        );
    }
    assert!(copied.contains("FOREIGN KEY"), "{test}: {copied}");
    p.assert_exact_copy(&src, &tgt, &["shop"]);
}

#[test]
fn oldest_source_v11_to_v18() {
    pair(11, 18);
}

#[test]
fn newest_source_v18_to_v18() {
    pair(18, 18);
}

#[test]
fn same_version_v15() {
    pair(15, 15);
}

/// An index the target cannot build fails the migration, and the error
/// names that index (a setting of the target's role makes the index
/// expression raise there, never on the source).
#[test]
fn a_failed_index_build_names_the_index() {
    let (src, tgt) = (Cluster::start(), Cluster::start());
    let schema = "
        CREATE FUNCTION picky(v int) RETURNS int LANGUAGE plpgsql IMMUTABLE AS $$
        BEGIN
          IF current_setting('pgshift_test.refuse', true) = 'on' THEN
            RAISE EXCEPTION 'picky refuses to index %', v;
          END IF;
          RETURN v;
        END $$;
        CREATE TABLE fine(id int PRIMARY KEY);
        CREATE TABLE refused(id int PRIMARY KEY, v int);
        CREATE INDEX refused_picky ON refused (public.picky(v));
        INSERT INTO fine SELECT generate_series(1, 10);
        INSERT INTO refused SELECT i, i FROM generate_series(1, 10) i;";
    src.create_db("shop");
    src.psql("shop", schema);
    tgt.psql(
        "postgres",
        &format!("ALTER ROLE {SUPERUSER} SET pgshift_test.refuse = 'on'"),
    );
    let p = Pgshift::start(&src, &tgt, &migration("postdatafail", &["shop"], ""));
    let s = p.wait_state("Failed", STARTUP);
    let text = s.to_string();
    assert!(
        text.contains("refused_picky; Type: INDEX; Schema: public")
            && text.contains("picky refuses to index"),
        "the error names the index and the server's message: {s:#}"
    );
}
