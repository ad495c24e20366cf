//! A stream's health, as operators and the cutover see it: a broken apply is
//! shown as such (state, error, retries, metrics), the migration is not
//! "ready" while it lasts, a cutover is refused without pausing anyone, and
//! the stream recovers by itself once the cause is fixed. Also: a failed
//! validation is not sticky, and a restart says where it resumes.

mod common;
mod cutover_common;
use common::*;
use cutover_common::*;

use std::time::Duration;

use pgshift::admin::client::ClientError;

/// The admin API's /metrics text.
async fn metrics(shift: &Pgshift) -> String {
    let port = shift.admin_port;
    tokio::task::spawn_blocking(move || http(port, "GET", "/metrics").expect("GET /metrics").1)
        .await
        .unwrap()
}

/// The value of one sample line of the Prometheus text, if present.
fn sample(text: &str, prefix: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_stream_is_reported_refuses_cutover_and_recovers() {
    let pair = Pair::start();
    let shift = pair.launch("", "", &[]);
    shift.wait_streaming_async(DB).await;

    // Break apply on purpose: the target refuses a row the source accepts.
    pair.target.psql(
        DB,
        "ALTER TABLE items ADD CONSTRAINT small_ids CHECK (id < 1000)",
    );
    pair.source.psql(
        DB,
        "INSERT INTO items VALUES (5000, 'too big for the target')",
    );

    // Status tells the truth: the stream's state, its error and retries,
    // and the migration is no longer ready for cutover.
    let doc = shift
        .wait_status_async(
            "apply_stopped and not ready",
            Duration::from_secs(120),
            |d| {
                let s = &d["databases"][DB]["stream"];
                s["state"] == "apply_stopped" && d["substate"] == "MigratingData"
            },
        )
        .await;
    let stream = &doc["databases"][DB]["stream"];
    assert_eq!(doc["state"], "InProgress", "{doc:#}");
    assert!(
        doc["reason"].as_str().unwrap_or("").contains("not ready"),
        "{doc:#}"
    );
    assert_eq!(stream["healthy"], false, "{doc:#}");
    assert_eq!(stream["error_kind"], "apply", "{doc:#}");
    assert!(stream["retries"].as_u64().unwrap() >= 1, "{doc:#}");
    assert!(
        stream["last_error"]
            .as_str()
            .unwrap_or("")
            .contains("small_ids"),
        "{doc:#}"
    );
    let m = metrics(&shift).await;
    assert!(
        sample(
            &m,
            "pgshift_replication_errors_total{database=\"shop\",kind=\"apply\"}"
        )
        .is_some_and(|v| v >= 1.0),
        "{m}"
    );
    assert_eq!(
        sample(
            &m,
            "pgshift_replication_stream_state{database=\"shop\",state=\"apply_stopped\"}"
        ),
        Some(1.0),
        "{m}"
    );
    let out = shift.cli_async(&["status"]).await;
    let text = out_text(&out);
    assert!(
        text.contains("apply_stopped") && text.contains("small_ids"),
        "{text}"
    );

    // A cutover is refused at once, naming the stream's error; no attempt
    // starts, so no client ever waits at a closed gate.
    let client = connect_retry(&shift.url(DB)).await;
    let refused = shift.admin().post("/cutover").await;
    match refused {
        Err(ClientError::Refused {
            status: 409,
            message,
        }) => assert!(
            message.contains("not healthy") && message.contains("small_ids"),
            "{message}"
        ),
        other => panic!("cutover not refused: {other:?}\n{}", shift.log()),
    }
    assert!(shift.last_cutover_async().await.is_null());
    let m = metrics(&shift).await;
    assert!(
        !m.contains("pgshift_cutover_attempts_total{"),
        "an attempt was counted: {m}"
    );
    let n: i64 = client
        .query_one("SELECT count(*) FROM items", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 101);

    // Fixed on the target: the stream recovers by itself, the error is
    // cleared, and the migration is ready again.
    pair.target
        .psql(DB, "ALTER TABLE items DROP CONSTRAINT small_ids");
    let doc = shift
        .wait_status_async("recovered and ready", Duration::from_secs(120), |d| {
            d["databases"][DB]["stream"]["state"] == "streaming"
                && d["substate"] == "WaitingForCutoverTrigger"
        })
        .await;
    assert!(
        doc["databases"][DB]["stream"]["last_error"].is_null(),
        "{doc:#}"
    );
    assert!(
        doc["databases"][DB]["stream"]["errors_total"]
            .as_u64()
            .unwrap()
            >= 1
    );
    assert_eq!(
        pair.target
            .psql(DB, "SELECT name FROM items WHERE id = 5000"),
        "too big for the target"
    );
    // The log is plain text (no colour codes when it is a file) and the
    // stream's recovery is said.
    let log = shift.log();
    assert!(!log.contains('\u{1b}'), "ANSI codes in a log file");
    assert!(log.contains("streaming recovered"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_validation_is_not_sticky() {
    let pair = Pair::start();
    pair.source.psql(
        DB,
        "CREATE TABLE notes (body text); INSERT INTO notes VALUES ('a'), ('b');",
    );
    let mut shift = pair.launch("", "", &[]);
    let doc = shift
        .wait_substate_async("ValidationFailed", "None", Duration::from_secs(120))
        .await;
    assert!(
        doc["reason"].as_str().unwrap_or("").contains("notes"),
        "{doc:#}"
    );
    shift.kill();

    // The operator fixes the cause and starts pgshift again: it validates
    // again and goes on.
    pair.source
        .psql(DB, "ALTER TABLE notes ADD COLUMN id serial PRIMARY KEY");
    shift.spawn();
    shift.wait_streaming_async(DB).await;
    assert_eq!(pair.target.psql(DB, "SELECT count(*) FROM notes"), "2");
    // The earlier failure stays in the history.
    assert_eq!(
        pair.target.psql(
            "postgres",
            "SELECT count(*) > 0 FROM pgshift.event WHERE migration = 'cut' AND state = 'ValidationFailed'"
        ),
        "t"
    );
    let log = shift.log();
    let second = log.split("--- run 2 ---").nth(1).unwrap();
    assert!(
        second.contains("resuming migration cut from ValidationFailed/None"),
        "{second}"
    );
    assert!(!second.contains("already exists"), "{second}");

    // A restart while streaming resumes streaming (no new copy) and says so;
    // a state is never logged as changing to itself.
    shift.kill();
    shift.spawn();
    shift.wait_streaming_async(DB).await;
    let log = shift.log();
    let third = log.split("--- run 3 ---").nth(1).unwrap();
    assert!(
        third.contains("resuming migration cut from WaitingForUserAction/WaitingForCutoverTrigger"),
        "{third}"
    );
    assert!(!third.contains("slot created"), "{third}");
    for line in third
        .lines()
        .filter(|l| l.contains("migration state changed"))
    {
        let from = line.split("from=").nth(1).and_then(|x| x.split(' ').next());
        let to = line.split("to=").nth(1).and_then(|x| x.split(' ').next());
        assert_ne!(from, to, "{line}");
    }
}
