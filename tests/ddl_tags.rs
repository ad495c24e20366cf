//! Ground truth for DDL replication's statement picking: a real server's
//! `ddl_command_end` event trigger records `current_query()` and `TG_TAG`
//! for a corpus of multi-statement query strings (simple query protocol),
//! and `pgshift::fuzzing::ddl_pick` must cut out of each string exactly the
//! statement that fired (or nothing, for DDL run inside a DO block or a
//! function). Also checks which statements fire at all: the corpus says
//! which tags each statement fires, and the server must agree.
//!
//! Runs on 15 (the default cluster) and on every other major 11–18 whose
//! programs are installed (see `common::version_or_skip`).
//!
//! What the servers showed: every statement of the corpus fires at most
//! once (ALTER TABLE with several actions, CREATE TABLE with serial columns,
//! CREATE INDEX on a partitioned table, DROP TABLE of several tables,
//! CREATE SCHEMA with elements); IF [NOT] EXISTS commands that do nothing
//! still fire, as does ALTER TABLE ALL IN TABLESPACE; REINDEX fires from 17
//! on; role grants, GRANT/COMMENT on databases, roles and tablespaces,
//! COMMENT ON EVENT TRIGGER, REASSIGN OWNED and EXPLAIN ANALYZE CREATE TABLE
//! AS fire nothing (the last still creates its table, unseen by DDL
//! replication); DROP OWNED fires.

mod common;
use common::*;

const DB: &str = "ddl";

/// One statement of a corpus string and the tags it fires, in order.
struct Part {
    sql: &'static str,
    fires: &'static [&'static str],
    /// The tags come from commands run inside it (DO, a function call):
    /// nothing in the string is the command that fired.
    hidden: bool,
    /// The first major version where it fires `fires` (none before).
    fires_since: i32,
}

/// A statement firing `tag` once.
const fn ddl(sql: &'static str, tag: &'static [&'static str]) -> Part {
    Part {
        sql,
        fires: tag,
        hidden: false,
        fires_since: 0,
    }
}

/// A statement that fires nothing.
const fn quiet(sql: &'static str) -> Part {
    ddl(sql, &[])
}

/// A statement that runs DDL inside (DO, SELECT f()).
const fn hidden(sql: &'static str, tags: &'static [&'static str]) -> Part {
    Part {
        sql,
        fires: tags,
        hidden: true,
        fires_since: 0,
    }
}

const fn since(major: i32, p: Part) -> Part {
    Part {
        fires_since: major,
        ..p
    }
}

/// A query string: the first major version it runs on, and its statements.
struct Case {
    min: i32,
    parts: Vec<Part>,
}

fn case(parts: Vec<Part>) -> Case {
    Case { min: 11, parts }
}

fn corpus() -> Vec<Case> {
    vec![
        case(vec![
            quiet("INSERT INTO base VALUES (1, 1)"),
            ddl(
                "CREATE TABLE t1 (id serial PRIMARY KEY, a int)",
                &["CREATE TABLE"],
            ),
            quiet("UPDATE base SET a = 2"),
            ddl("ALTER TABLE t1 ADD COLUMN b text", &["ALTER TABLE"]),
            ddl("ALTER TABLE t1 RENAME COLUMN b TO c", &["ALTER TABLE"]),
            ddl(
                "ALTER TABLE t1 ALTER COLUMN a TYPE bigint",
                &["ALTER TABLE"],
            ),
            ddl(
                "ALTER TABLE t1 ALTER COLUMN a SET NOT NULL",
                &["ALTER TABLE"],
            ),
            quiet("SET work_mem = '8MB'"),
            ddl(
                "ALTER TABLE t1 ADD CONSTRAINT t1_base FOREIGN KEY (a) REFERENCES base (id)",
                &["ALTER TABLE"],
            ),
            ddl(
                "alter table t1 drop column c, add d serial",
                &["ALTER TABLE"],
            ),
            quiet("SELECT 1"),
        ]),
        case(vec![
            ddl("CREATE INDEX t1_a ON t1 (a)", &["CREATE INDEX"]),
            quiet("SELECT count(*) FROM t1"),
            ddl("CREATE UNIQUE INDEX t1_a2 ON t1 (a, id)", &["CREATE INDEX"]),
            ddl(
                "CREATE INDEX IF NOT EXISTS t1_a2 ON t1 (a)",
                &["CREATE INDEX"],
            ),
            ddl("DROP INDEX t1_a", &["DROP INDEX"]),
            ddl("/* x; /* y; */ */ -- z;\nDROP INDEX t1_a2", &["DROP INDEX"]),
            ddl("DROP TABLE IF EXISTS no_such_table", &["DROP TABLE"]),
            ddl(
                "ALTER TABLE IF EXISTS no_such_table ADD x int",
                &["ALTER TABLE"],
            ),
        ]),
        case(vec![
            ddl(
                "CREATE TABLE t2 AS SELECT * FROM base",
                &["CREATE TABLE AS"],
            ),
            quiet("INSERT INTO t2 SELECT * FROM base"),
            ddl("SELECT id INTO t3 FROM base", &["SELECT INTO"]),
            ddl(
                "WITH w AS (SELECT 1 AS x) SELECT x INTO t4 FROM w",
                &["SELECT INTO"],
            ),
            ddl(
                "CREATE TABLE t5 (id, a) AS SELECT 1, 2",
                &["CREATE TABLE AS"],
            ),
            ddl("SELECT 1 AS x INTO TEMP tt1", &["SELECT INTO"]),
            ddl("CREATE TEMP TABLE tt2 (a int)", &["CREATE TABLE"]),
            quiet("PREPARE q1 AS SELECT 1 AS a"),
            ddl("CREATE TABLE t6 AS EXECUTE q1", &["CREATE TABLE AS"]),
            ddl("DROP TABLE t2, t3, t4 CASCADE", &["DROP TABLE"]),
        ]),
        case(vec![
            ddl("CREATE SEQUENCE s1", &["CREATE SEQUENCE"]),
            ddl("ALTER SEQUENCE s1 RESTART 5", &["ALTER SEQUENCE"]),
            quiet("SELECT nextval('s1')"),
            ddl("CREATE VIEW v1 AS SELECT * FROM base", &["CREATE VIEW"]),
            ddl(
                "CREATE OR REPLACE VIEW v1 AS SELECT id, a FROM base",
                &["CREATE VIEW"],
            ),
            ddl("ALTER VIEW v1 RENAME TO v2", &["ALTER VIEW"]),
            ddl("DROP VIEW v2", &["DROP VIEW"]),
            ddl(
                "CREATE MATERIALIZED VIEW m1 AS SELECT * FROM base",
                &["CREATE MATERIALIZED VIEW"],
            ),
            ddl(
                "REFRESH MATERIALIZED VIEW m1",
                &["REFRESH MATERIALIZED VIEW"],
            ),
            ddl(
                "ALTER MATERIALIZED VIEW m1 RENAME TO m2",
                &["ALTER MATERIALIZED VIEW"],
            ),
            ddl("DROP MATERIALIZED VIEW m2", &["DROP MATERIALIZED VIEW"]),
            ddl("DROP SEQUENCE s1", &["DROP SEQUENCE"]),
        ]),
        case(vec![
            ddl(
                "CREATE FUNCTION f1() RETURNS trigger LANGUAGE plpgsql AS $body$ BEGIN \
                 /* ALTER TABLE base ADD x int; */ PERFORM 'ALTER TABLE base ADD y int;'; \
                 RETURN NEW; END $body$",
                &["CREATE FUNCTION"],
            ),
            ddl(
                "CREATE TRIGGER tr1 BEFORE INSERT ON base FOR EACH ROW EXECUTE PROCEDURE f1()",
                &["CREATE TRIGGER"],
            ),
            quiet("INSERT INTO base VALUES (2, 2)"),
            ddl("ALTER FUNCTION f1() RENAME TO f2", &["ALTER FUNCTION"]),
            ddl(
                "ALTER TRIGGER tr1 ON base RENAME TO tr2",
                &["ALTER TRIGGER"],
            ),
            ddl("DROP TRIGGER tr2 ON base", &["DROP TRIGGER"]),
            ddl(
                "CREATE PROCEDURE p1() LANGUAGE sql AS 'SELECT 1'",
                &["CREATE PROCEDURE"],
            ),
            quiet("CALL p1()"),
            ddl("DROP PROCEDURE p1()", &["DROP PROCEDURE"]),
            ddl("DROP FUNCTION f2()", &["DROP FUNCTION"]),
        ]),
        case(vec![
            ddl("CREATE TYPE mood AS ENUM ('a', 'b')", &["CREATE TYPE"]),
            ddl("CREATE TYPE pair AS (x int, y int)", &["CREATE TYPE"]),
            ddl("ALTER TYPE pair ADD ATTRIBUTE z int", &["ALTER TYPE"]),
            ddl(
                "CREATE DOMAIN posint AS int CHECK (VALUE > 0)",
                &["CREATE DOMAIN"],
            ),
            ddl("ALTER DOMAIN posint SET DEFAULT 1", &["ALTER DOMAIN"]),
            ddl("CREATE SCHEMA sch1", &["CREATE SCHEMA"]),
            ddl("ALTER SCHEMA sch1 RENAME TO sch2", &["ALTER SCHEMA"]),
            ddl("CREATE TABLE sch2.x (a posint, m mood)", &["CREATE TABLE"]),
            ddl("DROP SCHEMA sch2 CASCADE", &["DROP SCHEMA"]),
            ddl("DROP DOMAIN posint", &["DROP DOMAIN"]),
            ddl("DROP TYPE pair", &["DROP TYPE"]),
            ddl(
                "CREATE SCHEMA sch3 CREATE TABLE st (a int) CREATE VIEW sv AS SELECT * FROM st",
                &["CREATE SCHEMA"],
            ),
        ]),
        // Before 12, ADD VALUE cannot run in a (implicit) transaction block.
        case(vec![ddl("ALTER TYPE mood ADD VALUE 'c'", &["ALTER TYPE"])]),
        Case {
            min: 12,
            parts: vec![
                quiet("SELECT 1"),
                ddl(
                    "ALTER TYPE mood ADD VALUE IF NOT EXISTS 'd' BEFORE 'a'",
                    &["ALTER TYPE"],
                ),
                ddl("ALTER TYPE mood RENAME VALUE 'b' TO 'bb'", &["ALTER TYPE"]),
            ],
        },
        case(vec![
            ddl(
                "CREATE TABLE pt (k int, v text) PARTITION BY LIST (k)",
                &["CREATE TABLE"],
            ),
            ddl(
                "CREATE TABLE pt1 PARTITION OF pt FOR VALUES IN (1)",
                &["CREATE TABLE"],
            ),
            ddl("CREATE TABLE pt2 (k int, v text)", &["CREATE TABLE"]),
            ddl(
                "ALTER TABLE pt ATTACH PARTITION pt2 FOR VALUES IN (2)",
                &["ALTER TABLE"],
            ),
            quiet("INSERT INTO pt VALUES (1, 'a'), (2, 'b')"),
            ddl("CREATE INDEX ON pt (k)", &["CREATE INDEX"]),
            ddl("ALTER TABLE pt DETACH PARTITION pt2", &["ALTER TABLE"]),
        ]),
        case(vec![
            ddl("COMMENT ON TABLE base IS 'x; y'", &["COMMENT"]),
            ddl("COMMENT ON COLUMN base.a IS E'it\\'s; \\\\'", &["COMMENT"]),
            quiet("COMMENT ON DATABASE ddl IS 'db'"),
            quiet("CREATE ROLE r_ddl"),
            ddl("GRANT SELECT ON base TO r_ddl", &["GRANT"]),
            quiet("GRANT r_ddl TO app"),
            ddl(
                "GRANT SELECT (a), UPDATE (a) ON TABLE base TO r_ddl",
                &["GRANT"],
            ),
            ddl("REVOKE UPDATE ON base FROM r_ddl", &["REVOKE"]),
            quiet("REVOKE r_ddl FROM app"),
            quiet("GRANT CONNECT ON DATABASE ddl TO r_ddl"),
            ddl(
                "ALTER DEFAULT PRIVILEGES GRANT SELECT ON TABLES TO r_ddl",
                &["ALTER DEFAULT PRIVILEGES"],
            ),
            quiet("COMMENT ON ROLE r_ddl IS 'x'"),
            ddl("GRANT USAGE ON SCHEMA public TO r_ddl", &["GRANT"]),
            ddl(
                "REVOKE ALL ON ALL TABLES IN SCHEMA public FROM r_ddl",
                &["REVOKE"],
            ),
            quiet("ALTER ROLE r_ddl SET work_mem = '1MB'"),
        ]),
        case(vec![
            hidden(
                "DO $$ BEGIN EXECUTE 'CREATE TABLE d1 (a int)'; END $$",
                &["CREATE TABLE"],
            ),
            ddl("ALTER TABLE d1 ADD b int", &["ALTER TABLE"]),
            hidden(
                "DO $do$ BEGIN EXECUTE 'ALTER TABLE d1 ADD c int'; EXECUTE $x$ALTER TABLE d1 ADD d int$x$; END $do$",
                &["ALTER TABLE", "ALTER TABLE"],
            ),
            ddl(
                "CREATE FUNCTION mk() RETURNS void LANGUAGE plpgsql AS $$ BEGIN \
                 EXECUTE 'CREATE INDEX d1_a ON d1 (a)'; END $$",
                &["CREATE FUNCTION"],
            ),
            hidden("SELECT mk()", &["CREATE INDEX"]),
        ]),
        Case {
            min: 14,
            parts: vec![
                ddl(
                    "CREATE FUNCTION fa(x int) RETURNS int LANGUAGE sql BEGIN ATOMIC \
                     SELECT CASE WHEN x > 0 THEN x ELSE 0 END; END",
                    &["CREATE FUNCTION"],
                ),
                ddl(
                    "CREATE OR REPLACE PROCEDURE pa() LANGUAGE sql BEGIN ATOMIC \
                     INSERT INTO base VALUES (100, 1); UPDATE base SET a = 3 WHERE id = 100; END",
                    &["CREATE PROCEDURE"],
                ),
                quiet("CALL pa()"),
                ddl("ALTER PROCEDURE pa() RENAME TO pb", &["ALTER PROCEDURE"]),
                // (CREATE SCHEMA cannot hold CREATE FUNCTION up to 18.)
            ],
        },
        case(vec![
            ddl(
                "CREATE TABLE \"Weird;Name\" (\"ALTER TABLE\" int, \"end\" text)",
                &["CREATE TABLE"],
            ),
            quiet("SELECT E'\\'; ALTER TABLE base ADD z int; '"),
            ddl(
                "ALTER TABLE \"Weird;Name\" ADD COLUMN \"begin\" int",
                &["ALTER TABLE"],
            ),
            quiet("SELECT $q$ ; DROP TABLE base; $q$, $$;$$"),
            quiet("BEGIN"),
            ddl("CREATE TABLE tx1 (a int)", &["CREATE TABLE"]),
            quiet("INSERT INTO tx1 VALUES (1)"),
            ddl("ALTER TABLE tx1 ADD b int", &["ALTER TABLE"]),
            ddl(
                "CREATE RULE r1 AS ON INSERT TO tx1 DO ALSO (NOTIFY ch1; NOTIFY ch2)",
                &["CREATE RULE"],
            ),
            ddl("CREATE POLICY pol ON base USING (true)", &["CREATE POLICY"]),
            ddl(
                "ALTER TABLE base ENABLE ROW LEVEL SECURITY",
                &["ALTER TABLE"],
            ),
            quiet("TRUNCATE tx1"),
            quiet("ANALYZE tx1"),
            quiet("END"),
        ]),
        case(vec![
            ddl(
                "CREATE EXTENSION IF NOT EXISTS plpgsql",
                &["CREATE EXTENSION"],
            ),
            ddl(
                "CREATE FOREIGN DATA WRAPPER w",
                &["CREATE FOREIGN DATA WRAPPER"],
            ),
            ddl(
                "CREATE SERVER srv FOREIGN DATA WRAPPER w",
                &["CREATE SERVER"],
            ),
            ddl(
                "CREATE USER MAPPING FOR app SERVER srv",
                &["CREATE USER MAPPING"],
            ),
            ddl(
                "CREATE FOREIGN TABLE ft (a int) SERVER srv",
                &["CREATE FOREIGN TABLE"],
            ),
            ddl(
                "CREATE TEXT SEARCH CONFIGURATION tsc (COPY = english)",
                &["CREATE TEXT SEARCH CONFIGURATION"],
            ),
            ddl("CREATE COLLATION coll FROM \"C\"", &["CREATE COLLATION"]),
            ddl(
                "CREATE STATISTICS st1 ON id, a FROM base",
                &["CREATE STATISTICS"],
            ),
            ddl(
                "CREATE PUBLICATION pub1 FOR TABLE base",
                &["CREATE PUBLICATION"],
            ),
            ddl("CREATE UNLOGGED TABLE ut (a int)", &["CREATE TABLE"]),
            ddl("CREATE RECURSIVE VIEW rv (n) AS SELECT 1", &["CREATE VIEW"]),
            ddl("CREATE TABLE IF NOT EXISTS t1 (id int)", &["CREATE TABLE"]),
            ddl(
                "CREATE TABLE IF NOT EXISTS t5 AS SELECT 1 AS id",
                &["CREATE TABLE AS"],
            ),
            ddl("ALTER INDEX t1_pkey RENAME TO t1_pk", &["ALTER INDEX"]),
            ddl("ALTER TABLE ut SET SCHEMA public", &["ALTER TABLE"]),
            ddl(
                "ALTER TABLE ALL IN TABLESPACE pg_default SET TABLESPACE pg_default",
                &["ALTER TABLE"],
            ),
            quiet("EXPLAIN ANALYZE CREATE TABLE xa AS SELECT 1"),
            quiet("COMMENT ON EVENT TRIGGER pgshift_tag IS 'x'"),
            quiet("GRANT CREATE ON TABLESPACE pg_default TO r_ddl"),
            quiet("CREATE ROLE r_ddl2"),
            ddl("GRANT SELECT ON ut TO r_ddl2", &["GRANT"]),
            quiet("REASSIGN OWNED BY r_ddl2 TO postgres"),
            ddl("DROP OWNED BY r_ddl2", &["DROP OWNED"]),
            quiet("DROP ROLE r_ddl2"),
            quiet("SELECT * FROM base FOR UPDATE"),
        ]),
        case(vec![
            since(17, ddl("REINDEX TABLE base", &["REINDEX"])),
            quiet("SELECT 1"),
            since(17, ddl("REINDEX INDEX base_pkey", &["REINDEX"])),
        ]),
        Case {
            min: 12,
            parts: vec![ddl(
                "ALTER TABLE base ADD COLUMN g int GENERATED ALWAYS AS (id * 2) STORED",
                &["ALTER TABLE"],
            )],
        },
    ]
}

const SETUP: &str = "
CREATE TABLE pgshift_tags (n serial, query text, tag text);
CREATE TABLE base (id int PRIMARY KEY, a int);
CREATE FUNCTION pgshift_tag() RETURNS event_trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO pgshift_tags (query, tag) VALUES (current_query(), tg_tag);
END $$;
CREATE EVENT TRIGGER pgshift_tag ON ddl_command_end EXECUTE PROCEDURE pgshift_tag();
";

async fn check(c: &Cluster) {
    let major = c.major();
    c.create_db(DB);
    c.psql(DB, SETUP);
    let client = c.client(DB).await;
    let mut failures = Vec::new();
    let mut last = 0i32;
    let mut checked = 0;
    for (i, case) in corpus().iter().enumerate() {
        if major < case.min {
            continue;
        }
        let query = case
            .parts
            .iter()
            .map(|p| p.sql)
            .collect::<Vec<_>>()
            .join(";\n");
        client
            .batch_execute(&query)
            .await
            .unwrap_or_else(|e| panic!("PostgreSQL {major}: case {i} fails: {e:?}\n{query}"));
        let rows = client
            .query(
                "SELECT n, query, tag FROM pgshift_tags WHERE n > $1 ORDER BY n",
                &[&last],
            )
            .await
            .unwrap();
        // What fired, and the statement each firing must pick (None for hidden).
        let want: Vec<(&str, Option<&str>)> = case
            .parts
            .iter()
            .filter(|p| major >= p.fires_since)
            .flat_map(|p| {
                p.fires
                    .iter()
                    .map(move |t| (*t, (!p.hidden).then_some(p.sql)))
            })
            .collect();
        let got: Vec<(String, String)> = rows
            .iter()
            .map(|r| (r.get::<_, String>(1), r.get::<_, String>(2)))
            .collect();
        if let Some(r) = rows.last() {
            last = r.get(0);
        }
        let got_tags: Vec<&str> = got.iter().map(|(_, t)| t.as_str()).collect();
        let want_tags: Vec<&str> = want.iter().map(|(t, _)| *t).collect();
        if got_tags != want_tags {
            failures.push(format!(
                "case {i}: fired {got_tags:?}, corpus says {want_tags:?}"
            ));
            continue;
        }
        for (k, ((q, tag), (_, stmt))) in got.iter().zip(&want).enumerate() {
            assert_eq!(q, &query, "current_query() is the whole string");
            let nth = got[..k].iter().filter(|(_, t)| t == tag).count();
            let picked = pgshift::fuzzing::ddl_pick(q, tag, nth);
            checked += 1;
            if picked.as_deref() != *stmt {
                failures.push(format!(
                    "case {i}: firing {k} ({tag}, nth {nth}) picked {picked:?}, fired by {stmt:?}"
                ));
            }
        }
    }
    // A statement that fired nothing has none of the tags that fired.
    let all_tags: std::collections::BTreeSet<String> = client
        .query("SELECT DISTINCT tag FROM pgshift_tags", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    for case in corpus().iter().filter(|c| major >= c.min) {
        for p in &case.parts {
            if p.hidden || (p.fires.is_empty() || major < p.fires_since) {
                for tag in &all_tags {
                    if let Some(s) = pgshift::fuzzing::ddl_pick(p.sql, tag, 0) {
                        failures.push(format!("{s:?} fired nothing but has tag {tag}"));
                    }
                }
            }
        }
    }
    // EXPLAIN ANALYZE CREATE TABLE AS fired nothing, yet made its table.
    let made: bool = client
        .query_one("SELECT to_regclass('xa') IS NOT NULL", &[])
        .await
        .unwrap()
        .get(0);
    assert!(made, "EXPLAIN ANALYZE CREATE TABLE xa AS made no table");
    // Known limitation: a firing inside a DO block counts towards nth but
    // cannot be picked, so a same-tag DDL after it in the string is missed.
    let q = "DO $$ BEGIN EXECUTE 'CREATE TABLE k1 ()'; END $$; CREATE TABLE k2 ()";
    client.batch_execute(q).await.unwrap();
    let tags: Vec<String> = client
        .query(
            "SELECT tag FROM pgshift_tags WHERE n > $1 ORDER BY n",
            &[&last],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(tags, ["CREATE TABLE", "CREATE TABLE"]);
    assert_eq!(
        pgshift::fuzzing::ddl_pick(q, "CREATE TABLE", 0).as_deref(),
        Some("CREATE TABLE k2 ()"),
        "firing 0 is k1's, inside the DO block"
    );
    assert_eq!(pgshift::fuzzing::ddl_pick(q, "CREATE TABLE", 1), None);
    assert!(
        failures.is_empty(),
        "PostgreSQL {major}:\n{}",
        failures.join("\n")
    );
    eprintln!("ddl_tags: PostgreSQL {major}: {checked} firings picked right");
}

async fn run(major: i32) {
    if major == 15 {
        let c = Cluster::start();
        assert_eq!(c.major(), 15);
        check(&c).await;
        return;
    }
    if !version_or_skip(major, &format!("ddl_tags::v{major}")) {
        return;
    }
    check(&Cluster::start_version(major)).await;
}

macro_rules! versions {
    ($($name:ident => $major:expr),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                run($major).await;
            }
        )*
    };
}

versions! {
    v11 => 11, v12 => 12, v13 => 13, v14 => 14,
    v15 => 15, v16 => 16, v17 => 17, v18 => 18,
}
