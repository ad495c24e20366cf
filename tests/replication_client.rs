//! The replication-protocol client against real clusters: exported snapshot,
//! streaming pgoutput, keepalives and status updates, typed errors, cleanup.

mod common;
use common::*;

use std::future::Future;
use std::time::Duration;

use pgshift::config::Endpoint;
use pgshift::replication::Lsn;
use pgshift::replication::client::{
    ReplicationConnection, ReplicationError, ReplicationMessage, ReplicationStream, SnapshotAction,
    StreamOptions,
};
use pgshift::replication::names::ReplicationNames;
use pgshift::replication::publication::{create_publication, drop_publication};
use pgshift::replication::slot::{Cleanup, cleanup, slot_state};

/// How long something that merely takes longer on a loaded machine may take.
const WAIT: Duration = Duration::from_secs(120);

fn endpoint(url: &str) -> Endpoint {
    Endpoint::parse("source.url", url).unwrap()
}

/// Polls `f` until it is true, without blocking the runtime.
async fn eventually<F, Fut>(mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    while tokio::time::Instant::now() < deadline {
        if f().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

async fn next(stream: &mut ReplicationStream) -> ReplicationMessage {
    tokio::time::timeout(WAIT, stream.next())
        .await
        .expect("no replication message in time")
        .expect("stream failed")
        .expect("stream ended")
}

/// pgoutput messages (their data) up to and including the `commits`-th Commit.
async fn collect_until_commits(stream: &mut ReplicationStream, commits: usize) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut seen = 0;
    while seen < commits {
        if let ReplicationMessage::XLogData { data, .. } = next(stream).await {
            if data.first() == Some(&b'C') {
                seen += 1;
            }
            out.push(data.to_vec());
        }
    }
    out
}

/// end_lsn of a pgoutput Commit: tag, flags, commit_lsn, end_lsn, timestamp.
fn commit_end_lsn(commit: &[u8]) -> Lsn {
    assert_eq!(commit[0], b'C');
    Lsn(u64::from_be_bytes(commit[10..18].try_into().unwrap()))
}

async fn confirmed_flush(client: &tokio_postgres::Client, slot: &str) -> Option<Lsn> {
    slot_state(client, slot)
        .await
        .unwrap()
        .and_then(|s| s.confirmed_flush_lsn)
}

/// (oid, puballtables) of a publication.
async fn pub_shape(client: &tokio_postgres::Client, name: &str) -> (i64, bool) {
    let r = client
        .query_one(
            "SELECT oid::int8, puballtables FROM pg_publication WHERE pubname = $1",
            &[&name],
        )
        .await
        .unwrap();
    (r.get(0), r.get(1))
}

#[tokio::test]
async fn exported_snapshot_stream_keepalives_and_status() {
    // A short sender timeout makes the server ask for replies within a second.
    let c = Cluster::start_with(ClusterOptions {
        conf: vec!["wal_sender_timeout = '2s'".into()],
        ..Default::default()
    });
    c.psql(
        "postgres",
        "CREATE TABLE t (id int PRIMARY KEY, v text); \
         INSERT INTO t SELECT g, 'before' FROM generate_series(1, 3) g",
    );
    let admin = c.client("postgres").await;
    create_publication(&admin, "pub", Some(&["public.t".to_string()]))
        .await
        .unwrap();

    // A REPLICATION (not superuser) role opens the replication connection.
    let ep = endpoint(&c.url_as(APP_USER, APP_PW, "postgres"));
    let mut repl = ReplicationConnection::connect(&ep, "postgres", "pgshift-test")
        .await
        .unwrap();
    assert_eq!(repl.server_major_version(), 15);
    let sys = repl.identify_system().await.unwrap();
    assert_eq!(sys.dbname.as_deref(), Some("postgres"));
    assert!(sys.timeline >= 1 && sys.xlogpos > Lsn::ZERO && sys.systemid > 0);

    let slot = repl
        .create_slot("s1", SnapshotAction::Export, false)
        .await
        .unwrap();
    assert_eq!(slot.name, "s1");
    assert_eq!(slot.output_plugin, "pgoutput");
    assert!(slot.consistent_point >= sys.xlogpos);
    let snapshot = slot.snapshot_name.clone().expect("an exported snapshot");
    assert_eq!(
        confirmed_flush(&admin, "s1").await,
        Some(slot.consistent_point)
    );

    // Rows written after the slot belong to the stream, not the snapshot.
    admin
        .batch_execute("INSERT INTO t VALUES (4, 'after'), (5, 'after')")
        .await
        .unwrap();
    let worker = c.client("postgres").await;
    worker
        .batch_execute(&format!(
            "BEGIN ISOLATION LEVEL REPEATABLE READ; SET TRANSACTION SNAPSHOT '{snapshot}'"
        ))
        .await
        .unwrap();
    let row = worker
        .query_one(
            "SELECT count(*), max(id), bool_and(v = 'before') FROM t",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        (
            row.get::<_, i64>(0),
            row.get::<_, i32>(1),
            row.get::<_, bool>(2)
        ),
        (3, 3, true)
    );
    worker.batch_execute("COMMIT").await.unwrap();
    let now: i64 = admin
        .query_one("SELECT count(*) FROM t", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(now, 5);

    // Every copy worker imported the snapshot: the connection may stream now.
    let mut stream = repl
        .start_replication(&StreamOptions::new("s1", slot.consistent_point, "pub"))
        .await
        .unwrap();
    admin
        .batch_execute("SELECT pg_logical_emit_message(true, 'pgshift', 'x')")
        .await
        .unwrap();
    let msgs = collect_until_commits(&mut stream, 2).await;
    let tags: Vec<u8> = msgs.iter().map(|m| m[0]).collect();
    assert_eq!(tags, b"BRIICBMC".to_vec(), "pgoutput tags {tags:?}");
    for insert in msgs.iter().filter(|m| m[0] == b'I') {
        assert!(insert.windows(5).any(|w| w == b"after"));
    }
    // Message: tag, flags, lsn, prefix (cstring), length, content.
    let m = &msgs[6];
    assert_eq!(&m[10..18], b"pgshift\0");
    assert_eq!(u32::from_be_bytes(m[18..22].try_into().unwrap()), 1);
    assert_eq!(&m[22..], b"x");
    let first_commit = commit_end_lsn(&msgs[4]);
    assert!(stream.received_lsn() >= first_commit);

    // Keepalives arrive (asking for a reply) but never move the slot.
    loop {
        if let ReplicationMessage::Keepalive {
            reply_requested: true,
            wal_end,
            server_time,
        } = next(&mut stream).await
        {
            assert!(wal_end >= first_commit);
            // PostgreSQL-epoch timestamps decode to the present.
            let skew = std::time::SystemTime::now()
                .duration_since(server_time)
                .unwrap_or_else(|e| e.duration());
            assert!(
                skew < Duration::from_secs(60),
                "server time off by {skew:?}"
            );
            break;
        }
    }
    assert_eq!(
        confirmed_flush(&admin, "s1").await,
        Some(slot.consistent_point)
    );

    // A status update reporting X as flushed moves confirmed_flush_lsn to X.
    stream
        .send_status(first_commit, first_commit, first_commit, false)
        .await
        .unwrap();
    assert!(
        eventually(|| async { confirmed_flush(&admin, "s1").await == Some(first_commit) }).await,
        "confirmed_flush_lsn did not reach {first_commit}"
    );
    // Positions never go backwards.
    stream
        .send_status(Lsn(1), Lsn(1), Lsn(1), false)
        .await
        .unwrap();
    assert_eq!(stream.reported_flushed_lsn(), first_commit);

    // A stream that never answers is dropped after wal_sender_timeout; one
    // that answers every requested keepalive stays up.
    let mut silent_conn = ReplicationConnection::connect(&ep, "postgres", "silent")
        .await
        .unwrap();
    let silent_slot = silent_conn
        .create_slot("silent", SnapshotAction::NoExport, true)
        .await
        .unwrap();
    assert!(silent_slot.snapshot_name.is_none());
    let mut silent = silent_conn
        .start_replication(&StreamOptions::new(
            "silent",
            silent_slot.consistent_point,
            "pub",
        ))
        .await
        .unwrap();
    let silent_end = tokio::spawn(async move {
        loop {
            match tokio::time::timeout(WAIT, silent.next()).await {
                Ok(Ok(Some(_))) => continue,
                Ok(Ok(None)) => return "ended".to_string(),
                Ok(Err(e)) => return format!("error transient={}: {e}", e.is_transient()),
                Err(_) => return "still open".to_string(),
            }
        }
    });
    // Answer keepalives until the silent stream was dropped (and at least
    // two were asked for): this one must outlive it.
    let alive_until = tokio::time::Instant::now() + WAIT;
    let mut replies = 0;
    while (replies < 2 || !silent_end.is_finished()) && tokio::time::Instant::now() < alive_until {
        let Ok(msg) = tokio::time::timeout(Duration::from_millis(500), stream.next()).await else {
            continue;
        };
        if let Some(ReplicationMessage::Keepalive {
            reply_requested: true,
            ..
        }) = msg.unwrap()
        {
            stream
                .send_status(first_commit, first_commit, first_commit, false)
                .await
                .unwrap();
            replies += 1;
        }
    }
    assert!(replies >= 2, "only {replies} keepalives asked for a reply");
    let silent_result = silent_end.await.unwrap();
    assert!(
        silent_result.starts_with("error transient=true") || silent_result == "ended",
        "the silent stream: {silent_result}"
    );
    admin
        .batch_execute("INSERT INTO t VALUES (6, 'later')")
        .await
        .unwrap();
    let later = collect_until_commits(&mut stream, 1).await;
    assert!(later.iter().any(|m| m[0] == b'I'));
    // The temporary slot went away with its connection.
    assert!(eventually(|| async { slot_state(&admin, "silent").await.unwrap().is_none() }).await);

    // CopyDone returns the connection to command mode; dropping is idempotent.
    let mut repl = stream.stop().await.unwrap();
    assert_eq!(repl.identify_system().await.unwrap().systemid, sys.systemid);
    assert!(repl.drop_slot("s1", false).await.unwrap());
    assert!(!repl.drop_slot("s1", true).await.unwrap());
    assert!(slot_state(&admin, "s1").await.unwrap().is_none());
    repl.close().await;
}

#[tokio::test]
async fn replica_wal_level_is_a_clear_error() {
    let c = Cluster::start_with(ClusterOptions {
        wal_level: "replica".into(),
        ..Default::default()
    });
    let ep = endpoint(&c.url_as(APP_USER, APP_PW, "postgres"));
    let mut repl = ReplicationConnection::connect(&ep, "postgres", "pgshift-test")
        .await
        .unwrap();
    let err = repl
        .create_slot("s", SnapshotAction::Export, false)
        .await
        .unwrap_err();
    assert!(
        matches!(err, ReplicationError::WalLevelNotLogical { .. }),
        "{err:?}"
    );
    let text = err.to_string();
    assert!(
        text.contains("logical decoding requires wal_level >= logical"),
        "{text}"
    );
    assert!(text.contains("set wal_level = logical"), "{text}");
    // The connection is still usable after the error.
    repl.identify_system().await.unwrap();
}

#[tokio::test]
async fn errors_are_typed_and_cleanup_is_idempotent() {
    let mut c = Cluster::start();
    let bad = endpoint(&c.url_as(APP_USER, "wrong", "postgres"));
    let err = ReplicationConnection::connect(&bad, "postgres", "pgshift-test")
        .await
        .err()
        .expect("wrong password accepted");
    assert!(matches!(err, ReplicationError::Auth { .. }), "{err:?}");
    assert!(
        err.to_string().contains("password authentication failed"),
        "{err}"
    );

    // Database names that differ only in case get separate objects.
    c.create_db("Db-1");
    c.create_db("db-1");
    let ep = endpoint(&c.url("postgres"));
    let names = ReplicationNames::new("mig-1", "Db-1");
    let other = ReplicationNames::new("mig-1", "db-1");
    assert_ne!(names.slot, other.slot);
    let db = c.client("Db-1").await;
    c.psql(
        "Db-1",
        "CREATE TABLE a (id int PRIMARY KEY); CREATE TABLE b (id int PRIMARY KEY)",
    );

    // Publications: created once, kept when asked again, reshaped when the list changes.
    create_publication(&db, &names.publication, None)
        .await
        .unwrap();
    let first = pub_shape(&db, &names.publication).await;
    assert!(first.1);
    create_publication(&db, &names.publication, None)
        .await
        .unwrap();
    assert_eq!(pub_shape(&db, &names.publication).await, first);
    let tables = vec!["public.a".to_string(), "\"public\".\"b\"".to_string()];
    create_publication(&db, &names.publication, Some(&tables))
        .await
        .unwrap();
    let second = pub_shape(&db, &names.publication).await;
    assert!(!second.1);
    create_publication(&db, &names.publication, Some(&tables))
        .await
        .unwrap();
    assert_eq!(pub_shape(&db, &names.publication).await, second);
    let published: String = db
        .query_one(
            "SELECT string_agg(tablename, ',' ORDER BY tablename) FROM pg_publication_tables WHERE pubname = $1",
            &[&names.publication],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(published, "a,b");

    let err = create_publication(&db, "p2", Some(&["public.missing".to_string()]))
        .await
        .unwrap_err();
    assert!(!err.is_transient());
    assert!(
        err.to_string()
            .contains("relation \"public.missing\" does not exist"),
        "{err}"
    );
    let err = create_publication(&db, "p2", Some(&["a; DROP TABLE a".to_string()]))
        .await
        .unwrap_err();
    assert!(matches!(err, ReplicationError::Invalid { .. }), "{err:?}");

    // Slots: a second create is SlotExists; streaming holds the slot.
    let mut repl = ReplicationConnection::connect(&ep, "Db-1", "pgshift-test")
        .await
        .unwrap();
    let slot = repl
        .create_slot(&names.slot, SnapshotAction::NoExport, false)
        .await
        .unwrap();
    let mut again = ReplicationConnection::connect(&ep, "Db-1", "pgshift-test")
        .await
        .unwrap();
    let err = again
        .create_slot(&names.slot, SnapshotAction::NoExport, false)
        .await
        .unwrap_err();
    assert!(
        matches!(err, ReplicationError::SlotExists { .. }),
        "{err:?}"
    );
    let opts = StreamOptions::new(&names.slot, slot.consistent_point, &names.publication);
    let mut stream = repl.start_replication(&opts).await.unwrap();
    let err = again
        .start_replication(&opts)
        .await
        .err()
        .expect("slot taken twice");
    assert!(matches!(err, ReplicationError::SlotInUse { .. }), "{err:?}");
    let missing = ReplicationConnection::connect(&ep, "Db-1", "pgshift-test")
        .await
        .unwrap();
    let err = missing
        .start_replication(&StreamOptions::new("nope", Lsn::ZERO, "p"))
        .await
        .err()
        .expect("missing slot streamed");
    assert!(
        matches!(err, ReplicationError::SlotNotFound { .. }),
        "{err:?}"
    );

    // Cleanup terminates the holder and drops both; a second run finds nothing.
    let removed = cleanup(&ep, "mig-1", "Db-1").await.unwrap();
    assert_eq!(
        removed,
        Cleanup {
            slot_dropped: true,
            publication_dropped: true,
            marker_table_dropped: false,
            ddl_capture_removed: false,
        }
    );
    assert!(slot_state(&db, &names.slot).await.unwrap().is_none());
    let ended = tokio::time::timeout(WAIT, async {
        loop {
            match stream.next().await {
                Ok(Some(_)) => continue,
                Ok(None) => return None,
                Err(e) => return Some(e),
            }
        }
    })
    .await
    .expect("the terminated stream did not end");
    if let Some(e) = ended {
        assert!(e.is_transient(), "{e:?}");
    }
    assert_eq!(
        cleanup(&ep, "mig-1", "Db-1").await.unwrap(),
        Cleanup::default()
    );
    assert!(!drop_publication(&db, &names.publication).await.unwrap());
    assert_eq!(
        cleanup(&ep, "mig-1", "no_such_db").await.unwrap(),
        Cleanup::default()
    );

    // The server going away mid-stream is a transient ServerGone.
    let mut conn = ReplicationConnection::connect(&ep, "db-1", "pgshift-test")
        .await
        .unwrap();
    let slot = conn
        .create_slot(&other.slot, SnapshotAction::NoExport, true)
        .await
        .unwrap();
    let mut stream = conn
        .start_replication(&StreamOptions::new(&other.slot, slot.consistent_point, "p"))
        .await
        .unwrap();
    c.kill();
    let err = tokio::time::timeout(WAIT, async {
        loop {
            if let Err(e) = stream.next().await {
                return e;
            }
        }
    })
    .await
    .expect("no error after the server died");
    assert!(
        matches!(err, ReplicationError::ServerGone { .. }),
        "{err:?}"
    );
    assert!(err.is_transient());
    // So is a SQL helper's lost connection.
    let err = slot_state(&db, &other.slot).await.unwrap_err();
    assert!(err.is_transient(), "{err:?}");
}

#[tokio::test]
async fn protocol_v2_streams_large_in_progress_transactions() {
    let c = Cluster::start_with(ClusterOptions {
        conf: vec!["logical_decoding_work_mem = '64kB'".into()],
        ..Default::default()
    });
    c.psql("postgres", "CREATE TABLE big (id int PRIMARY KEY, v text)");
    let admin = c.client("postgres").await;
    create_publication(&admin, "pub", None).await.unwrap();
    let ep = endpoint(&c.url("postgres"));
    let mut repl = ReplicationConnection::connect(&ep, "postgres", "pgshift-test")
        .await
        .unwrap();
    let slot = repl
        .create_slot("v2", SnapshotAction::NoExport, true)
        .await
        .unwrap();
    let mut opts = StreamOptions::new("v2", slot.consistent_point, "pub");
    opts.proto_version = 2;
    opts.streaming = true;
    let mut stream = repl.start_replication(&opts).await.unwrap();
    // Far more than 64kB of changes in one transaction.
    admin
        .batch_execute("INSERT INTO big SELECT g, repeat('x', 100) FROM generate_series(1, 5000) g")
        .await
        .unwrap();
    // Stream Start 'S' … Stream Stop 'E' chunks, then Stream Commit 'c'.
    let mut tags = Vec::new();
    loop {
        if let ReplicationMessage::XLogData { data, .. } = next(&mut stream).await {
            tags.push(data[0]);
            if data[0] == b'c' {
                break;
            }
        }
    }
    assert_eq!(tags[0], b'S', "first message {:?}", tags[0] as char);
    assert!(tags.contains(&b'E'));
    assert!(!tags.contains(&b'B'), "a streamed transaction has no Begin");
    assert!(tags.iter().filter(|&&t| t == b'I').count() == 5000);

    // Protocol 1 cannot stream: the server's refusal comes back typed.
    let mut conn = ReplicationConnection::connect(&ep, "postgres", "pgshift-test")
        .await
        .unwrap();
    let slot = conn
        .create_slot("v1", SnapshotAction::NoExport, true)
        .await
        .unwrap();
    let mut opts = StreamOptions::new("v1", slot.consistent_point, "pub");
    opts.streaming = true;
    let err = conn
        .start_replication(&opts)
        .await
        .err()
        .expect("v1 streamed");
    assert!(matches!(err, ReplicationError::Server { .. }), "{err:?}");
    assert!(err.to_string().contains("proto_version"), "{err}");
}
