//! The automatic trigger: inside a maintenance window it fires (and retries
//! at most max_attempts times after aborts); outside one it never fires.

mod common;
mod cutover_common;
use common::*;
use cutover_common::*;

use std::time::Duration;

use chrono::Timelike;

/// Attempts persisted on the target's control schema.
fn attempts(pair: &Pair) -> Vec<String> {
    pair.target
        .psql(
            "postgres",
            "SELECT outcome FROM pgshift.cutover_attempt ORDER BY started_at",
        )
        .lines()
        .map(str::to_string)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_trigger_inside_the_window_fires() {
    let pair = Pair::start();
    // Today's weekday with a range around now, in UTC.
    let now = chrono::Utc::now();
    let window = format!("{} 00:00-24:00 UTC", now.format("%a"));
    let shift = pair.launch(
        "",
        &format!("trigger = \"auto\"\nwindow = \"{window}\""),
        &[],
    );
    // The writer runs from before the migration is ready: the trigger may
    // fire the moment it is.
    drop(connect_retry(&shift.url(DB)).await); // the proxy is up
    let writer = Writer::start(&shift.url(DB), "w").await;
    let doc = shift
        .wait_substate_async("Succeeded", "RollbackAvailable", Duration::from_secs(300))
        .await;
    assert_eq!(doc["switched"], true);
    assert_eq!(doc["last_cutover"]["outcome"], "succeeded");
    // Writes after the switch (checked below to have landed on the target).
    writer.wait_more(3).await;
    let w = writer.finish().await;
    assert!(w.errors.is_empty(), "writer errors: {:?}", w.errors);
    assert!(w.committed.iter().any(|c| c.1 as u16 == pair.target.port));
    let on_target = Pair::ledger_ids(&pair.target);
    for (id, _) in &w.committed {
        assert!(on_target.contains(id), "id {id} lost");
    }
    assert_eq!(attempts(&pair), vec!["succeeded"]);
    let (id, port) = write_one(&shift.url(DB), "after").await.unwrap();
    assert_eq!(port as u16, pair.target.port);
    assert!(Pair::ledger_ids(&pair.target).contains(&id));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_trigger_outside_the_window_does_not_fire() {
    let pair = Pair::start();
    // A one-hour window that starts six hours from now (never contains now).
    let h = (chrono::Utc::now().hour() + 6) % 24;
    let window = format!("daily {h:02}:00-{:02}:00 UTC", (h + 1) % 24);
    let shift = pair.launch(
        "",
        &format!("trigger = \"auto\"\nwindow = \"{window}\"\nstart_when_lag_below = \"1GB\""),
        &[],
    );
    shift.wait_streaming_async(DB).await;
    // A check that something does NOT happen (the trigger ticks every
    // second): a fixed, short watch is the point here.
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let doc = shift.status_async().await.unwrap();
        assert_eq!(doc["substate"], "WaitingForCutoverTrigger", "{doc:#}");
        assert!(doc["last_cutover"].is_null(), "{doc:#}");
    }
    assert!(attempts(&pair).is_empty());
    // A manual cutover is still possible.
    let out = shift.cli_async(&["cutover", "--wait"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", out_text(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_trigger_respects_max_attempts() {
    let pair = Pair::start();
    let shift = pair.launch("",
        "trigger = \"auto\"\nwindow = \"daily 00:00-24:00 UTC\"\nmax_attempts = 2\ndrain_timeout = \"500ms\"",
        &[],
    );
    // Every attempt aborts: a transaction stays open through the proxy from
    // before streaming starts (it takes no lock, so the copy is not blocked).
    let held = connect_retry(&shift.url(DB)).await;
    held.batch_execute("BEGIN; SELECT 1").await.unwrap();
    shift
        .wait_substate_async(
            "WaitingForUserAction",
            "WaitingForCutoverTrigger",
            Duration::from_secs(300),
        )
        .await;
    // Both attempts ended (not merely started) while the transaction is held.
    let ok = wait_until(Duration::from_secs(120), || {
        let a = attempts(&pair);
        a.len() >= 2 && a.iter().all(|o| o != "running")
    });
    assert!(ok, "{:?}\n{}", attempts(&pair), shift.log());
    // … and after max_attempts no more, also once nothing holds it any more.
    // Checks that something does NOT happen (the trigger ticks every second):
    // short fixed watches are the point here.
    tokio::time::sleep(Duration::from_secs(3)).await;
    held.batch_execute("COMMIT").await.unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let a = attempts(&pair);
    assert_eq!(a, vec!["aborted", "aborted"], "{}", shift.log());
    let doc = shift.status_async().await.unwrap();
    assert_eq!(doc["substate"], "WaitingForCutoverTrigger", "{doc:#}");
    assert!(!Pair::fenced(&pair.source));
    let (_, port) = write_one(&shift.url(DB), "still source").await.unwrap();
    assert_eq!(port as u16, pair.source.port);
}
