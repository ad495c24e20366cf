//! The apply engine against real clusters: changes decoded by pgoutput on a
//! source (read with pg_logical_slot_peek_binary_changes) applied to a
//! target whose schema and initial data matched when the slot was created.

mod common;
use common::*;

use std::time::Duration;

use bytes::Bytes;
use pgshift::config::Endpoint;
use pgshift::replication::Lsn;
use pgshift::replication::apply::{
    Applier, ApplyError, ApplyMetrics, ApplyOptions, SourceTxn, wait_for_marker,
};
use pgshift::replication::marker::MarkerConnection;
use pgshift::replication::names::ReplicationNames;
use pgshift::replication::pgoutput::{Decoder, PgOutputMessage};
use pgshift::replication::stream::{DatabaseStream, StreamConfig, StreamMetrics};

const DB: &str = "postgres";

/// A source and a target with the same schema and data, and a slot on the source.
struct Pair {
    src: Cluster,
    dst: Cluster,
}

impl Pair {
    fn new(schema_and_data: &str) -> Pair {
        Pair::with_source_conf(schema_and_data, vec![])
    }

    fn with_source_conf(schema_and_data: &str, conf: Vec<String>) -> Pair {
        Pair::build(schema_and_data, conf, "")
    }

    /// `target_first` runs on the target before the schema (to shift its OIDs).
    fn build(schema_and_data: &str, conf: Vec<String>, target_first: &str) -> Pair {
        // Decoding reads only flushed WAL; the harness turns synchronous_commit off.
        let mut conf = conf;
        conf.push("synchronous_commit = on".into());
        let src = Cluster::start_with(ClusterOptions {
            conf,
            ..Default::default()
        });
        let dst = Cluster::start();
        if !target_first.is_empty() {
            dst.psql(DB, target_first);
        }
        src.psql(DB, schema_and_data);
        dst.psql(DB, schema_and_data);
        let p = Pair { src, dst };
        p.publish("pub", "slot");
        p
    }

    /// A publication of every table and a pgoutput slot on the source;
    /// returns the slot's consistent point.
    fn publish(&self, publication: &str, slot: &str) -> Lsn {
        self.src.psql(
            DB,
            &format!("CREATE PUBLICATION \"{publication}\" FOR ALL TABLES"),
        );
        self.src
            .psql(
                DB,
                &format!(
                    "SELECT lsn FROM pg_create_logical_replication_slot('{slot}', 'pgoutput')"
                ),
            )
            .parse()
            .expect("an LSN")
    }

    /// Runs each statement as its own transaction on the source.
    async fn run(&self, statements: &[impl AsRef<str>]) {
        let c = self.src.client(DB).await;
        for s in statements {
            let s = s.as_ref();
            c.batch_execute(s)
                .await
                .unwrap_or_else(|e| panic!("{s}: {e}"));
        }
    }

    /// Every change since the slot was created (peek: can be read again).
    async fn changes(&self, proto: &str) -> Vec<Bytes> {
        let c = self.src.client(DB).await;
        let extra = if proto == "2" {
            ", 'streaming', 'on'"
        } else {
            ""
        };
        c.query(
            &format!(
                "SELECT data FROM pg_logical_slot_peek_binary_changes('slot', NULL, NULL, \
                 'proto_version', '{proto}', 'publication_names', 'pub', 'messages', 'true'{extra})"
            ),
            &[],
        )
        .await
        .unwrap()
        .into_iter()
        .map(|r| Bytes::from(r.get::<_, Vec<u8>>(0)))
        .collect()
    }

    fn target(&self) -> Endpoint {
        Endpoint::parse("target.url", &self.dst.url(DB)).unwrap()
    }

    fn source(&self) -> Endpoint {
        Endpoint::parse("source.url", &self.src.url(DB)).unwrap()
    }

    /// How far the target's replication origin says apply got.
    fn origin_progress(&self) -> String {
        self.dst.psql(
            DB,
            "SELECT pg_replication_origin_progress('pgshift_mig_postgres', true)",
        )
    }

    async fn applier(&self, opts: ApplyOptions) -> Applier {
        Applier::connect(&self.target(), opts, None).await.unwrap()
    }

    fn same_data(&self) {
        assert_eq!(
            table_fingerprints(&self.src, DB),
            table_fingerprints(&self.dst, DB)
        );
    }
}

fn opts() -> ApplyOptions {
    ApplyOptions::new("mig", DB)
}

/// Options whose transaction groups (plain and net) hold at most `n`.
fn opts_in_groups_of(n: usize) -> ApplyOptions {
    let mut o = opts();
    o.max_batch_transactions = n;
    o.max_net_batch_transactions = n;
    o
}

/// The table and the suggested fix of a schema mismatch; panics on any other error.
fn schema_mismatch(err: &ApplyError) -> (&str, Option<&str>) {
    let ApplyError::SchemaMismatch { table, fix, .. } = err else {
        panic!("expected a schema mismatch, got {err}");
    };
    (table, fix.as_deref())
}

/// The commit LSN of every transaction in the messages, in order.
fn commit_lsns(msgs: &[Bytes]) -> Vec<pgshift::replication::Lsn> {
    let mut d = Decoder::new();
    msgs.iter()
        .filter_map(|m| match d.decode(m.clone()).unwrap() {
            PgOutputMessage::Commit(c) => Some(c.commit_lsn),
            _ => None,
        })
        .collect()
}

/// Decodes each message (as the stream does) and applies it.
async fn feed(a: &mut Applier, d: &mut Decoder, msgs: &[Bytes]) -> Result<(), ApplyError> {
    for m in msgs {
        a.handle(d.decode(m.clone()).expect("pgoutput decodes"))
            .await?;
    }
    Ok(())
}

/// Feeds every message, then commits what is pending.
async fn apply_all(a: &mut Applier, msgs: &[Bytes]) -> Result<(), ApplyError> {
    feed(a, &mut Decoder::new(), msgs).await?;
    a.flush().await.map(|_| ())
}

#[tokio::test]
async fn mixed_workload_with_truncate_cascade_and_key_changes_converges() {
    let p = Pair::new(
        "CREATE TABLE accounts (id int PRIMARY KEY, balance numeric, note text, tags text[], ts timestamptz, j jsonb);
         INSERT INTO accounts SELECT g, g * 10, 'n' || g, ARRAY['a', NULL], '2024-01-01 00:00+00', '{\"a\": 1}' FROM generate_series(1, 100) g;
         CREATE TABLE parent (id int PRIMARY KEY, v text);
         CREATE TABLE child (id serial PRIMARY KEY, pid int REFERENCES parent, v text);
         INSERT INTO parent VALUES (1, 'p1'), (2, 'p2');
         INSERT INTO child (pid, v) SELECT 1 + g % 2, 'c' FROM generate_series(1, 10) g;
         CREATE TABLE ledger (id bigint PRIMARY KEY, account int, delta numeric);
         CREATE TABLE ident (id int GENERATED ALWAYS AS IDENTITY PRIMARY KEY, v int);
         CREATE TABLE keysonly (a int, b int, PRIMARY KEY (a, b));
         INSERT INTO keysonly VALUES (1, 1);",
    );
    let mut w: Vec<String> = Vec::new();
    for i in 0..200 {
        w.push(format!(
            "BEGIN; UPDATE accounts SET balance = balance + {i}, note = NULL WHERE id = {}; \
             INSERT INTO ledger VALUES ({i}, {}, {i}.5); COMMIT",
            1 + i % 100,
            1 + i % 100
        ));
    }
    w.push("INSERT INTO accounts SELECT g, 0, repeat('x', g), NULL, NULL, NULL FROM generate_series(101, 300) g".into());
    w.push("DELETE FROM accounts WHERE id % 7 = 0".into());
    // Key-changing updates, including one where keys swap ranges in one statement.
    w.push("UPDATE accounts SET id = id + 1000 WHERE id <= 20".into());
    w.push("UPDATE accounts SET id = -id, j = '{\"b\": [1, 2]}' WHERE id BETWEEN 50 AND 60".into());
    w.push("TRUNCATE parent, child RESTART IDENTITY CASCADE".into());
    w.push(
        "INSERT INTO parent VALUES (3, 'p3'); INSERT INTO child (pid, v) VALUES (3, 'after')"
            .into(),
    );
    w.push("INSERT INTO ident (v) SELECT g FROM generate_series(1, 5) g".into());
    w.push("UPDATE ident SET v = v * 10".into());
    w.push("UPDATE keysonly SET a = 1".into());
    w.push("UPDATE keysonly SET b = 2".into());
    w.push("TRUNCATE ledger".into());
    w.push("INSERT INTO ledger VALUES (1, 1, 1)".into());
    p.run(&w).await;

    let msgs = p.changes("1").await;
    let reg = prometheus::Registry::new();
    let metrics = ApplyMetrics::register(&reg);
    // Small groups and rounds, so group and round boundaries fall everywhere.
    let mut o = opts_in_groups_of(7);
    o.max_round_bytes = 2048;
    let mut a = Applier::connect(&p.target(), o, Some(metrics))
        .await
        .unwrap();
    apply_all(&mut a, &msgs).await.unwrap();
    p.same_data();

    let s = a.stats().clone();
    assert_eq!(s.transactions, 212);
    // 200 ledger + 200 accounts + 3 after the truncates; 200 + 18 + 10 key
    // changes of rows that survived the delete of every 7th id (42 rows).
    assert_eq!((s.inserts, s.updates, s.deletes), (408, 235, 42), "{s:?}");
    assert_eq!(s.truncates, 3);
    let progress = p.origin_progress();
    assert_eq!(progress, s.applied_lsn.to_string());
    // RESTART IDENTITY reached the target's sequence (rows carry explicit ids).
    assert_eq!(
        p.dst.psql(
            DB,
            "SELECT last_value || ',' || is_called FROM child_id_seq"
        ),
        "1,false"
    );
    let text = pgshift::telemetry::metrics::render(&reg).unwrap();
    assert!(
        text.contains("pgshift_apply_transactions_total{database=\"postgres\"} 212"),
        "{text}"
    );
    assert!(text.contains("pgshift_apply_rows_total{database=\"postgres\",op=\"truncate\"} 3"));
}

#[tokio::test]
async fn unchanged_toast_columns_are_left_alone() {
    let p = Pair::new(
        "CREATE TABLE docs (id int PRIMARY KEY, body text, n int);
         ALTER TABLE docs ALTER body SET STORAGE EXTERNAL;
         INSERT INTO docs SELECT 1, string_agg(md5(g::text), '') , 0 FROM generate_series(1, 32768) g;",
    );
    p.run(&[
        "UPDATE docs SET n = 1 WHERE id = 1",
        "INSERT INTO docs SELECT 2, string_agg(md5((g * 3)::text), ''), 0 FROM generate_series(1, 32768) g",
        "UPDATE docs SET n = n + 1",
        "UPDATE docs SET id = 3 WHERE id = 2",
    ])
    .await;
    let msgs = p.changes("1").await;
    let mut a = p.applier(opts()).await;
    apply_all(&mut a, &msgs).await.unwrap();
    p.same_data();
    assert_eq!(
        p.dst.psql(
            DB,
            "SELECT string_agg(id || ':' || length(body) || ':' || n, ',' ORDER BY id) FROM docs"
        ),
        "1:1048576:2,3:1048576:1"
    );
}

#[tokio::test]
async fn replica_identity_full_with_duplicates_and_nulls_and_using_index() {
    let p = Pair::build(
        "CREATE TYPE mood AS ENUM ('sad', 'happy');
         CREATE TABLE nokey (a int, b text, j json, m mood);
         ALTER TABLE nokey REPLICA IDENTITY FULL;
         INSERT INTO nokey VALUES (1, NULL, '{\"x\": 1}', 'sad'), (1, NULL, '{\"x\": 1}', 'sad'), (2, 'x', NULL, NULL), (NULL, NULL, NULL, NULL), (NULL, NULL, NULL, NULL);
         CREATE TABLE fullbig (n int, body text);
         ALTER TABLE fullbig REPLICA IDENTITY FULL;
         ALTER TABLE fullbig ALTER body SET STORAGE EXTERNAL;
         INSERT INTO fullbig SELECT 1, string_agg(md5(g::text), '') FROM generate_series(1, 4096) g;
         CREATE TABLE byidx (id int, code text NOT NULL, v text);
         CREATE UNIQUE INDEX byidx_code ON byidx (code);
         ALTER TABLE byidx REPLICA IDENTITY USING INDEX byidx_code;
         INSERT INTO byidx VALUES (1, 'a', 'v1'), (2, 'b', 'v2'), (NULL, 'n', NULL);",
        vec![],
        // User types get other OIDs on the target.
        "CREATE TYPE unrelated AS ENUM ('x'); CREATE TYPE unrelated2 AS ENUM ('y');",
    );
    p.run(&[
        "UPDATE nokey SET b = 'y' WHERE ctid = (SELECT ctid FROM nokey WHERE a = 1 LIMIT 1)",
        "DELETE FROM nokey WHERE ctid = (SELECT ctid FROM nokey WHERE a IS NULL LIMIT 1)",
        "UPDATE nokey SET a = 3, m = 'happy' WHERE a = 2",
        "UPDATE fullbig SET n = 2",
        "UPDATE nokey SET j = '{\"x\": 2}' WHERE b IS NULL AND a = 1",
        "INSERT INTO nokey VALUES (NULL, NULL, NULL)",
        "UPDATE byidx SET code = 'c' WHERE code = 'a'",
        "UPDATE byidx SET v = 'z', id = 20 WHERE code = 'b'",
        "UPDATE byidx SET v = 'set' WHERE code = 'n'",
        "DELETE FROM byidx WHERE code = 'c'",
    ])
    .await;
    let msgs = p.changes("1").await;
    let mut a = p.applier(opts()).await;
    apply_all(&mut a, &msgs).await.unwrap();
    p.same_data();
    assert_eq!(
        p.dst.psql(DB, "SELECT count(*) FROM nokey WHERE a IS NULL"),
        "2"
    );
    assert_eq!(
        p.dst
            .psql(DB, "SELECT count(*) FROM nokey WHERE a = 1 AND b IS NULL"),
        "1"
    );
}

#[tokio::test]
async fn relation_mismatch_stops_with_the_fix_and_resumes_after_it() {
    let p = Pair::new("CREATE TABLE t (id int PRIMARY KEY, v text);");
    p.run(&[
        "INSERT INTO t VALUES (1, 'before')",
        "ALTER TABLE t ADD COLUMN extra integer",
        "INSERT INTO t VALUES (2, 'after', 5)",
        "UPDATE t SET extra = 7 WHERE id = 1",
    ])
    .await;
    let msgs = p.changes("1").await;
    let mut a = p.applier(opts()).await;
    let err = apply_all(&mut a, &msgs).await.unwrap_err();
    let text = err.to_string();
    let (table, fix) = schema_mismatch(&err);
    assert_eq!(table, "public.t");
    assert!(
        text.contains("\"extra\" (integer) exists on the source but not on the target"),
        "{text}"
    );
    assert_eq!(
        fix,
        Some("ALTER TABLE \"public\".\"t\" ADD COLUMN \"extra\" integer;")
    );
    // A stopped applier refuses more work.
    assert!(matches!(a.flush().await, Err(ApplyError::Stopped { .. })));
    drop(a);
    // The operator runs the fix; apply again from the origin position.
    p.dst.psql(DB, fix.unwrap());
    let mut a = p.applier(opts()).await;
    apply_all(&mut a, &msgs).await.unwrap();
    p.same_data();
    assert_eq!(
        p.dst.psql(
            DB,
            "SELECT string_agg(id || ':' || extra, ',' ORDER BY id) FROM t"
        ),
        "1:7,2:5"
    );
}

#[tokio::test]
async fn a_column_type_difference_names_both_types() {
    let p = Pair::new("CREATE TABLE t (id int PRIMARY KEY, v int);");
    p.dst.psql(DB, "ALTER TABLE t ALTER v TYPE bigint");
    p.run(&["INSERT INTO t VALUES (1, 1)"]).await;
    let msgs = p.changes("1").await;
    let mut a = p.applier(opts()).await;
    let err = apply_all(&mut a, &msgs).await.unwrap_err();
    let text = err.to_string();
    assert!(text.contains("table public.t"), "{text}");
    assert!(
        text.contains("column \"v\" is integer on the source but bigint on the target"),
        "{text}"
    );
    assert!(
        text.contains(
            "ALTER TABLE \"public\".\"t\" ALTER COLUMN \"v\" TYPE integer USING \"v\"::integer;"
        ),
        "{text}"
    );
    assert_eq!(p.dst.psql(DB, "SELECT count(*) FROM t"), "0");
}

/// Options that let the applier read the source catalog for messages.
fn opts_with_source(p: &Pair) -> ApplyOptions {
    let mut o = opts();
    o.source = Some(p.source());
    o
}

/// pgoutput names a domain column's base type: domains on both sides (in a
/// quoted, non-ASCII schema, over a domain, over an array) match, and are
/// applied.
#[tokio::test]
async fn domain_columns_match_the_same_domains_on_the_target() {
    let schema = "CREATE SCHEMA \"Tÿpes\";
        CREATE DOMAIN \"Tÿpes\".posint AS integer CHECK (VALUE > 0);
        CREATE DOMAIN \"Tÿpes\".small AS \"Tÿpes\".posint CHECK (VALUE < 1000);
        CREATE DOMAIN \"Tÿpes\".ints AS integer[] CHECK (cardinality(VALUE) < 10);
        CREATE TYPE \"Tÿpes\".mood AS ENUM ('sad', 'ok');
        CREATE DOMAIN \"Tÿpes\".mood_d AS \"Tÿpes\".mood;
        CREATE TABLE \"Tÿpes\".t (id int PRIMARY KEY, d \"Tÿpes\".posint, s \"Tÿpes\".small,
                                    a \"Tÿpes\".ints, m \"Tÿpes\".mood_d);";
    let p = Pair::new(schema);
    p.run(&[
        "INSERT INTO \"Tÿpes\".t VALUES (1, 5, 7, '{1,NULL}', 'ok'), (2, NULL, NULL, NULL, NULL)",
        "UPDATE \"Tÿpes\".t SET d = 6, s = 8, a = '{}', m = 'sad' WHERE id = 1",
        "DELETE FROM \"Tÿpes\".t WHERE id = 2",
    ])
    .await;
    let msgs = p.changes("1").await;
    let mut a = p.applier(opts()).await;
    apply_all(&mut a, &msgs).await.unwrap();
    p.same_data();
    assert_eq!(
        p.dst.psql(DB, "SELECT t::text FROM \"Tÿpes\".t"),
        "(1,6,8,{},sad)"
    );
}

/// A domain on the source and a different type on the target: the message
/// names the domain (read from the source catalog) and the target type,
/// and offers ALTER COLUMN only where it cannot drop a target domain.
#[tokio::test]
async fn a_domain_difference_names_the_real_source_type_and_a_safe_fix() {
    let p = Pair::new(
        "CREATE SCHEMA s; CREATE DOMAIN s.posint AS integer CHECK (VALUE > 0);
         CREATE TABLE s.t (id int PRIMARY KEY, d s.posint, e integer);",
    );
    p.dst.psql(
        DB,
        "ALTER TABLE s.t ALTER d TYPE text; ALTER TABLE s.t ALTER e TYPE s.posint",
    );
    p.run(&["INSERT INTO s.t VALUES (1, 1, 1)"]).await;
    let msgs = p.changes("1").await;

    // Without the source catalog: the stream's word only, and no statement.
    let mut a = p.applier(opts()).await;
    let err = apply_all(&mut a, &msgs).await.unwrap_err();
    let (_, fix) = schema_mismatch(&err);
    let text = err.to_string();
    assert_eq!(fix, None, "{text}");
    assert!(
        text.contains("column \"d\" is the user type with OID")
            && text.contains("int4 or a domain over it")
            && text.contains("but text on the target"),
        "{text}"
    );
    drop(a);

    // With it: the domain by name, and a statement that makes the column
    // the domain again.
    let mut a = p.applier(opts_with_source(&p)).await;
    let err = apply_all(&mut a, &msgs).await.unwrap_err();
    let (_, fix) = schema_mismatch(&err);
    let text = err.to_string();
    assert!(
        text.contains("column \"d\" is s.posint on the source but text on the target"),
        "{text}"
    );
    let fix = fix.expect("a statement").to_string();
    assert_eq!(
        fix,
        "ALTER TABLE \"s\".\"t\" ALTER COLUMN \"d\" TYPE s.posint USING \"d\"::s.posint;"
    );
    drop(a);
    p.dst.psql(DB, &fix);

    // Integer on the source, a domain on the target: changing the target
    // column would drop its domain, so both types are named instead.
    let mut a = p.applier(opts_with_source(&p)).await;
    let err = apply_all(&mut a, &msgs).await.unwrap_err();
    let (_, fix) = schema_mismatch(&err);
    let text = err.to_string();
    assert_eq!(fix, None, "{text}");
    assert!(
        text.contains("column \"e\" is integer on the source but s.posint on the target")
            && text.contains("source: integer; target: s.posint"),
        "{text}"
    );
}

/// A column added on the source whose type is a domain or an array of a
/// user type: the fix adds it with the source's exact type and default.
#[tokio::test]
async fn a_missing_user_typed_column_is_added_with_the_source_definition() {
    let p = Pair::new(
        "CREATE SCHEMA \"Odd \"\"S\"; CREATE TYPE \"Odd \"\"S\".mood AS ENUM ('a', 'b');
         CREATE DOMAIN \"Odd \"\"S\".posint AS integer CHECK (VALUE > 0);
         CREATE TABLE \"Odd \"\"S\".t (id int PRIMARY KEY);",
    );
    p.run(&[
        "ALTER TABLE \"Odd \"\"S\".t ADD COLUMN moods \"Odd \"\"S\".mood[] DEFAULT '{a}'",
        "ALTER TABLE \"Odd \"\"S\".t ADD COLUMN d \"Odd \"\"S\".posint NOT NULL DEFAULT 3",
        "INSERT INTO \"Odd \"\"S\".t VALUES (1, '{b,a}', 4), (2, DEFAULT, DEFAULT)",
    ])
    .await;
    let msgs = p.changes("1").await;
    for expected in [
        "ALTER TABLE \"Odd \"\"S\".\"t\" ADD COLUMN \"moods\" \"Odd \"\"S\".mood[] DEFAULT '{a}'::\"Odd \"\"S\".mood[];",
        "ALTER TABLE \"Odd \"\"S\".\"t\" ADD COLUMN \"d\" \"Odd \"\"S\".posint DEFAULT 3 NOT NULL;",
    ] {
        let mut a = p.applier(opts_with_source(&p)).await;
        let err = apply_all(&mut a, &msgs).await.unwrap_err();
        assert_eq!(schema_mismatch(&err).1, Some(expected), "{err}");
        drop(a);
        p.dst.psql(DB, expected);
    }
    let mut a = p.applier(opts_with_source(&p)).await;
    apply_all(&mut a, &msgs).await.unwrap();
    p.same_data();
}

#[tokio::test]
async fn a_row_that_cannot_be_applied_stops_with_its_lsn_and_commits_nothing_of_it() {
    let p = Pair::new("CREATE TABLE t (id int PRIMARY KEY, v int);");
    // The target has a constraint the source lacks.
    p.dst
        .psql(DB, "ALTER TABLE t ADD CONSTRAINT small CHECK (v < 100)");
    p.run(&[
        "INSERT INTO t VALUES (1, 1)",
        "BEGIN; INSERT INTO t VALUES (2, 2); INSERT INTO t VALUES (3, 300); COMMIT",
    ])
    .await;
    let msgs = p.changes("1").await;
    let mut a = p.applier(opts_in_groups_of(1)).await;
    let err = apply_all(&mut a, &msgs).await.unwrap_err();
    let ApplyError::Row {
        transaction: SourceTxn::Committed(commit_lsn),
        table,
        op,
        error,
        ..
    } = &err
    else {
        panic!("expected a row error, got {err}");
    };
    assert_eq!(table, "public.t");
    assert_eq!(*op, "insert");
    assert_eq!(error.code, "23514");
    // The failing transaction is the second one.
    let commits = commit_lsns(&msgs);
    assert_eq!(*commit_lsn, commits[1]);
    assert!(err.to_string().contains(&commit_lsn.to_string()));
    drop(a);
    assert_eq!(
        p.dst
            .psql(DB, "SELECT string_agg(id::text, ',' ORDER BY id) FROM t"),
        "1"
    );
    p.dst.psql(DB, "ALTER TABLE t DROP CONSTRAINT small");
    let mut a = p.applier(opts()).await;
    apply_all(&mut a, &msgs).await.unwrap();
    assert_eq!(a.stats().skipped_transactions, 1);
    p.same_data();
}

#[tokio::test]
async fn restart_after_a_crash_applies_each_transaction_exactly_once() {
    let p = Pair::new(
        "CREATE TABLE ledger (id int PRIMARY KEY, v int);
         CREATE TABLE counter (id int PRIMARY KEY, n int);
         INSERT INTO counter VALUES (1, 0);",
    );
    let mut w = Vec::new();
    for i in 1..=400 {
        w.push(format!(
            "BEGIN; INSERT INTO ledger VALUES ({i}, {i}); UPDATE counter SET n = n + 1; COMMIT"
        ));
    }
    p.run(&w).await;
    let msgs = p.changes("1").await;
    for cut in [msgs.len() / 3 + 2, msgs.len() / 2 + 1, msgs.len() * 4 / 5] {
        let mut a = p.applier(opts_in_groups_of(16)).await;
        let from = a.applied_position();
        feed(&mut a, &mut Decoder::new(), &msgs[..cut])
            .await
            .unwrap();
        // "Crash": the applier goes away without a flush, mid-group and mid-transaction.
        drop(a);
        let n: i64 = p
            .dst
            .psql(DB, "SELECT count(*) FROM ledger")
            .parse()
            .unwrap();
        let counter: i64 = p.dst.psql(DB, "SELECT n FROM counter").parse().unwrap();
        assert_eq!(n, counter, "rows and progress are one fact");
        assert!(n > 0 && n < 400);
        let progress = p.origin_progress();
        assert_ne!(progress, from.to_string());
    }
    let mut a = p.applier(opts()).await;
    // The source stream breaks mid-transaction and restarts from the position.
    feed(
        &mut a,
        &mut Decoder::new(),
        &msgs[..msgs.len() * 9 / 10 + 1],
    )
    .await
    .unwrap();
    let from = a.restart_stream().await.unwrap();
    assert_eq!(from, a.applied_position());
    apply_all(&mut a, &msgs).await.unwrap();
    let s = a.stats().clone();
    assert!(s.skipped_transactions > 0);
    assert!(s.skipped_transactions + s.transactions >= 400);
    assert_eq!(
        p.dst
            .psql(DB, "SELECT count(*) || ',' || max(id) FROM ledger"),
        "400,400"
    );
    assert_eq!(p.dst.psql(DB, "SELECT n FROM counter"), "400");
    p.same_data();
    // The position is where the last commit record ends (what the source
    // reports as its WAL end when idle, so lag can reach zero).
    let mut d = Decoder::new();
    let last_end = msgs
        .iter()
        .filter_map(|m| match d.decode(m.clone()).unwrap() {
            PgOutputMessage::Commit(c) => Some(c.end_lsn),
            _ => None,
        })
        .last()
        .unwrap();
    assert_eq!(a.applied_position(), last_end);
    // Once more from the start: nothing left to apply.
    drop(a);
    let mut a = p.applier(opts()).await;
    apply_all(&mut a, &msgs).await.unwrap();
    assert_eq!(a.stats().transactions, 0);
    assert_eq!(a.stats().skipped_transactions, 400);
}

#[tokio::test]
async fn marker_resolves_only_after_earlier_transactions_are_visible() {
    let p = Pair::new("CREATE TABLE t (id int PRIMARY KEY);");
    let mut w = Vec::new();
    for i in 1..=50 {
        w.push(format!("INSERT INTO t VALUES ({i})"));
    }
    p.run(&w).await;
    let names = ReplicationNames::new("mig", DB);
    let src = MarkerConnection::connect(&p.source(), &names)
        .await
        .unwrap();
    let marker_lsn = src.emit("cutover-42").await.unwrap();
    assert!(marker_lsn.0 > 0);
    p.run(&["INSERT INTO t VALUES (51)"]).await;
    let msgs = p.changes("1").await;

    let mut a = p.applier(opts()).await;
    let mut rx = a.subscribe();
    let dst_url = p.dst.url(DB);
    let watcher = tokio::spawn(async move {
        let m = wait_for_marker(&mut rx, "cutover-42", Duration::from_secs(120)).await;
        let c = connect(&dst_url).await;
        let n: i64 = c
            .query_one("SELECT count(*) FROM t WHERE id <= 50", &[])
            .await
            .unwrap()
            .get(0);
        (m, n)
    });
    // Before the marker's transaction is committed, it is not reported.
    feed(&mut a, &mut Decoder::new(), &msgs).await.unwrap();
    assert!(
        a.subscribe().borrow().markers.is_empty(),
        "nothing committed yet"
    );
    a.flush().await.unwrap();
    let (m, n) = watcher.await.unwrap();
    let m = m.expect("marker committed");
    assert_eq!(n, 50);
    // The message's LSN is the end of its record; its commit comes at or after it.
    assert!(m.commit_lsn >= marker_lsn);
    assert_eq!(p.dst.psql(DB, "SELECT count(*) FROM t"), "51");
}

#[tokio::test]
async fn streamed_large_transactions_apply_once_and_aborts_are_dropped() {
    let p = Pair::with_source_conf(
        "CREATE TABLE t (id int PRIMARY KEY, v text);",
        vec!["logical_decoding_work_mem = 64kB".into()],
    );
    p.run(&[
        "INSERT INTO t SELECT g, 'big' FROM generate_series(1, 3000) g",
        "BEGIN; INSERT INTO t SELECT g, 'aborted' FROM generate_series(5000, 8000) g; ROLLBACK",
        "BEGIN; UPDATE t SET v = 'sub' WHERE id <= 1000; SAVEPOINT s; \
         DELETE FROM t WHERE id > 1000; ROLLBACK TO s; INSERT INTO t VALUES (-1, 'kept'); COMMIT",
        "INSERT INTO t VALUES (0, 'small')",
    ])
    .await;
    let msgs = p.changes("2").await;
    assert!(
        msgs.iter().any(|m| m[0] == b'S'),
        "the large transaction was streamed"
    );
    let mut a = p.applier(opts()).await;
    apply_all(&mut a, &msgs).await.unwrap();
    p.same_data();
    assert_eq!(a.stats().transactions, 3);
    assert_eq!(p.dst.psql(DB, "SELECT count(*) FROM t"), "3002");
}

/// The production path (the stream decoding and applying) commits whenever
/// its input runs empty: a transaction with nothing behind it is on the
/// target while the stream waits for more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stream_commits_whenever_its_input_runs_empty() {
    let p = Pair::new("CREATE TABLE t (id int PRIMARY KEY, v text);");
    let names = ReplicationNames::new("mig", DB);
    let start = p.publish(&names.publication, &names.slot);
    let cfg = StreamConfig {
        migration: "mig".into(),
        database: DB.into(),
        source: p.source(),
        target: p.target(),
        consistent_point: start,
        ddl: None,
        drop_origin: None,
        decoding_work_mem: None,
    };
    let stream = DatabaseStream::start(cfg, StreamMetrics::register(&prometheus::Registry::new()));
    p.run(&["INSERT INTO t SELECT g, 'a' FROM generate_series(1, 100) g"])
        .await;
    // Nothing comes after it: it is committed while the stream waits.
    let rows = || p.dst.psql(DB, "SELECT count(*) FROM t");
    tokio::time::timeout(Duration::from_secs(60), async {
        while rows() != "100" {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("not applied: stream {:?}", stream.status.health()));
    p.run(&["UPDATE t SET v = 'b' WHERE id % 2 = 0"]).await;
    stream
        .catch_up("caught-up", Duration::from_secs(60))
        .await
        .unwrap();
    p.same_data();
    stream.stop().await;
}

/// Updates, deletes and inserts counted by the target's statistics, after
/// the applier's backend exited (which flushes them).
async fn target_tuple_counts(p: &Pair, table: &str) -> String {
    wait_until(Duration::from_secs(120), || {
        p.dst
            .psql(
                DB,
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pgshift apply'",
            )
            .eq("0")
    });
    p.dst.psql(
        DB,
        &format!(
            "SELECT n_tup_ins || ',' || n_tup_upd || ',' || n_tup_del FROM pg_stat_user_tables WHERE relname = '{table}'"
        ),
    )
}

#[tokio::test]
async fn a_group_is_applied_as_one_net_change_per_row() {
    let p = Pair::new(
        "CREATE TABLE hot (id int PRIMARY KEY, n int, note text);
         ALTER TABLE hot ALTER note SET STORAGE EXTERNAL;
         INSERT INTO hot SELECT g, 0, NULL FROM generate_series(1, 10) g;
         CREATE TABLE log (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, v text, at timestamptz);",
    );
    let mut w: Vec<String> = Vec::new();
    for i in 0..60 {
        // Every transaction updates the same counter row (a version chain
        // natively, one update here) and logs a row.
        w.push(format!(
            "BEGIN; UPDATE hot SET n = n + 1 WHERE id = 1; INSERT INTO log (v, at) VALUES ('e{i}', now()); COMMIT"
        ));
    }
    w.extend(
        [
            // Insert then update with an unchanged TOAST value taken from the insert.
            "INSERT INTO hot VALUES (100, 0, repeat('t', 100000))",
            "UPDATE hot SET n = 5 WHERE id = 100",
            // Update then delete; delete then re-insert the same key.
            "UPDATE hot SET n = 7 WHERE id = 2",
            "DELETE FROM hot WHERE id = 2",
            "DELETE FROM hot WHERE id = 3",
            "INSERT INTO hot VALUES (3, 33, 'back')",
            "UPDATE hot SET note = 'x' WHERE id = 3",
            // A key change, applied on its own between batches.
            "UPDATE hot SET id = 40, n = 40 WHERE id = 4",
            "UPDATE hot SET n = 41 WHERE id = 40",
            "UPDATE hot SET note = NULL, n = NULL WHERE id = 5",
        ]
        .map(String::from),
    );
    p.run(&w).await;
    let msgs = p.changes("1").await;

    let mut a = p.applier(opts()).await;
    apply_all(&mut a, &msgs).await.unwrap();
    let s = a.stats().clone();
    // Counted per source change, whatever was folded.
    assert_eq!((s.inserts, s.updates, s.deletes), (62, 66, 2), "{s:?}");
    drop(a);
    p.same_data();
    // 60 updates of row 1 became one; the target saw far fewer row versions
    // than the source wrote.
    let (ins, upd, del) = {
        let c = target_tuple_counts(&p, "hot").await;
        let v: Vec<u64> = c.split(',').map(|x| x.parse().unwrap()).collect();
        (v[0], v[1], v[2])
    };
    assert!(upd <= 8, "updates on the target: {upd}");
    assert!(ins >= 2 && del >= 2, "{ins} {del}");
    assert_eq!(target_tuple_counts(&p, "log").await, "60,0,0");
}

#[tokio::test]
async fn without_net_batching_every_change_is_its_own_statement() {
    let p =
        Pair::new("CREATE TABLE hot (id int PRIMARY KEY, n int); INSERT INTO hot VALUES (1, 0);");
    let w: Vec<String> = (0..30)
        .map(|_| "UPDATE hot SET n = n + 1 WHERE id = 1".to_string())
        .collect();
    p.run(&w).await;
    let msgs = p.changes("1").await;
    let mut o = opts();
    o.net_batching = false;
    let mut a = p.applier(o).await;
    apply_all(&mut a, &msgs).await.unwrap();
    drop(a);
    p.same_data();
    assert_eq!(target_tuple_counts(&p, "hot").await, "1,30,0");
}

#[tokio::test]
async fn tables_with_other_unique_constraints_keep_the_source_order() {
    // Swapping unique values through a temporary one only works in order:
    // such a table is never folded.
    let p = Pair::new(
        "CREATE TABLE u (id int PRIMARY KEY, email text UNIQUE);
         INSERT INTO u VALUES (1, 'a'), (2, 'b');
         CREATE TABLE trig (id int PRIMARY KEY, n int);
         CREATE TABLE seen (n int);
         CREATE FUNCTION note() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN INSERT INTO seen VALUES (NEW.n); RETURN NEW; END $$;
         INSERT INTO trig VALUES (1, 0);",
    );
    // On the target only: a trigger that fires for replayed rows too.
    p.dst.psql(
        DB,
        "CREATE TRIGGER t AFTER UPDATE ON trig FOR EACH ROW EXECUTE FUNCTION note();
         ALTER TABLE trig ENABLE ALWAYS TRIGGER t;",
    );
    p.run(&[
        "BEGIN; UPDATE u SET email = 'tmp' WHERE id = 1; UPDATE u SET email = 'a' WHERE id = 2; UPDATE u SET email = 'b' WHERE id = 1; COMMIT",
        "UPDATE trig SET n = 1",
        "UPDATE trig SET n = 2",
        "UPDATE trig SET n = 3",
    ])
    .await;
    let msgs = p.changes("1").await;
    let mut a = p.applier(opts()).await;
    apply_all(&mut a, &msgs).await.unwrap();
    assert_eq!(
        p.dst
            .psql(DB, "SELECT string_agg(id || email, ',' ORDER BY id) FROM u"),
        "1b,2a"
    );
    // The trigger saw every update, in order.
    assert_eq!(
        p.dst.psql(DB, "SELECT string_agg(n::text, ',') FROM seen"),
        "1,2,3"
    );
}

#[tokio::test]
async fn a_batched_row_missing_on_the_target_is_reported_with_its_transaction() {
    let p = Pair::new(
        "CREATE TABLE t (id int PRIMARY KEY, v int);
         INSERT INTO t SELECT g, 0 FROM generate_series(1, 10) g;",
    );
    // The target diverged: row 7 is gone.
    p.dst.psql(DB, "DELETE FROM t WHERE id = 7");
    p.run(&[
        "UPDATE t SET v = 1 WHERE id = 1",
        "UPDATE t SET v = 1 WHERE id IN (2, 7, 9)",
        "UPDATE t SET v = 2 WHERE id = 3",
    ])
    .await;
    let msgs = p.changes("1").await;
    let mut a = p.applier(opts()).await;
    let err = apply_all(&mut a, &msgs).await.unwrap_err();
    let ApplyError::RowNotFound {
        transaction: SourceTxn::Committed(commit_lsn),
        table,
        op,
        ..
    } = &err
    else {
        panic!("expected a missing row, got {err}");
    };
    assert_eq!((table.as_str(), *op), ("public.t", "update"));
    let commits = commit_lsns(&msgs);
    assert_eq!(*commit_lsn, commits[1], "{err}");
    drop(a);
    // Nothing of the group was committed.
    assert_eq!(p.dst.psql(DB, "SELECT sum(v) FROM t"), "0");
}
