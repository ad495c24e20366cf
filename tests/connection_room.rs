//! Room on the target for the sessions that move to it: validation warns
//! when the target's free connection slots cannot take the source's client
//! sessions, and a cutover that would drop sessions at the switch is refused
//! before clients are paused — each with a `max_connections` that makes
//! room, which the tests apply to see that it does.

mod common;
mod cutover_common;
use common::*;
use cutover_common::*;

use pgshift::validate::{Status, validate};

/// The ALTER SYSTEM statement in `text` (up to its semicolon).
fn suggested_sql(text: &str) -> String {
    let start = text
        .find("ALTER SYSTEM SET max_connections")
        .unwrap_or_else(|| panic!("no suggested setting in {text:?}"));
    let end = start + text[start..].find(';').expect("statement ends with ;");
    text[start..=end].to_string()
}

/// A target of `major` with room for few ordinary connections.
fn small_target(major: Option<i32>) -> ClusterOptions {
    ClusterOptions {
        version: major,
        conf: vec![
            "max_connections = 12".into(),
            "superuser_reserved_connections = 3".into(),
            // Before 12 they come out of max_connections (the target needs none).
            "max_wal_senders = 2".into(),
        ],
        ..ClusterOptions::default()
    }
}

async fn validation_names_the_setting_that_makes_room(major: i32) {
    let source = Cluster::start_version(major);
    let mut target = Cluster::start_with(small_target(Some(major)));
    source.create_db("shop");
    let migration = "[migration]\nname = \"room\"\ndatabases = [\"shop\"]\nmode = \"online\"\n";
    let cfg = config_for(&source, &target, migration);
    let room = |r: &pgshift::validate::ValidationReport| {
        r.checks
            .iter()
            .find(|c| c.name == "connection_room" && c.scope == "target")
            .cloned()
            .unwrap_or_else(|| panic!("no connection_room check: {r:#?}"))
    };

    // Few sessions: room enough.
    let c = room(&validate(&cfg).await);
    assert_eq!(c.status, Status::Succeeded, "{c:?}");

    // Twelve client sessions on the migrated database: 9 slots cannot take them.
    let mut sessions = Vec::new();
    for _ in 0..12 {
        sessions.push(connect(&source.url_as(APP_USER, APP_PW, "shop")).await);
    }
    let c = room(&validate(&cfg).await);
    assert_eq!(c.status, Status::Warning, "{c:?}");
    assert!(c.found.contains("12 client session(s)"), "{c:?}");
    let action = c.action.clone().unwrap_or_default();

    // The suggested statement is valid and makes room.
    let sql = suggested_sql(&action);
    target.psql("postgres", &sql);
    target.restart();
    let c = room(&validate(&cfg).await);
    assert_eq!(c.status, Status::Succeeded, "after {sql}: {c:?}");
    drop(sessions);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validation_warns_when_the_target_cannot_take_the_sessions_oldest() {
    if version_or_skip(11, "connection room on 11") {
        validation_names_the_setting_that_makes_room(11).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validation_warns_when_the_target_cannot_take_the_sessions_newest() {
    if version_or_skip(18, "connection room on 18") {
        validation_names_the_setting_that_makes_room(18).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cutover_that_would_drop_sessions_is_refused_before_the_pause() {
    let pair = Pair::start_with(ClusterOptions::default(), small_target(None));
    let shift = pair.launch("", "", &[]);
    shift.wait_streaming_async(DB).await;

    // More sessions through the proxy than the target has free slots.
    let mut sessions = Vec::new();
    for _ in 0..10 {
        sessions.push(connect(&shift.url(DB)).await);
    }
    let out = shift.cli_async(&["cutover", "--wait"]).await;
    let text = out_text(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("10 client session(s)"), "{text}");
    let doc = shift.status_async().await.unwrap();
    let last = &doc["last_cutover"];
    assert_eq!(last["outcome"], "aborted", "{last:#}");
    // Refused at prepare: the gate never closed, clients were not paused.
    let phases: Vec<&str> = last["phases"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["phase"].as_str())
        .collect();
    assert_eq!(phases, ["prepare"], "{last:#}");
    assert!(last["pause_seconds"].is_null(), "{last:#}");
    assert!(!Pair::fenced(&pair.source));
    assert_eq!(doc["substate"], "WaitingForCutoverTrigger", "{doc:#}");

    // The suggested statement is valid SQL on the target (it takes effect
    // at the next restart, which pgshift's own sessions there would not
    // survive in this test). With fewer sessions, the next attempt fits.
    let sql = suggested_sql(last["reason"].as_str().unwrap());
    pair.target.psql("postgres", &sql);
    sessions.truncate(3);
    let mut closed = false;
    for _ in 0..1200 {
        let doc = shift.status_async().await.unwrap();
        if doc["proxy"]["sessions"] == 3 {
            closed = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(closed, "the proxy still counts the closed sessions");
    let out = shift.cli_async(&["cutover", "--wait"]).await;
    let text = out_text(&out);
    assert_eq!(out.status.code(), Some(0), "{text}\n{}", shift.log());
    for s in &sessions {
        let port: i32 = s
            .query_one("SELECT inet_server_port()", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(port as u16, pair.target.port);
    }
    assert_eq!(
        Pair::ledger_ids(&pair.source),
        Pair::ledger_ids(&pair.target)
    );
}
