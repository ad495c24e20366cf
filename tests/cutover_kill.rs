//! pgshift SIGKILLed inside each cutover phase (held there by the test hook
//! `PGSHIFT_FAILPOINT=after:<phase>`) and restarted: never both sides
//! writable by clients, nothing lost. Before the switch it comes back on the
//! source, unfenced, waiting for a new cutover (which then succeeds); after
//! the switch it comes back switched with the source fenced.

mod common;
mod cutover_common;
use common::*;
use cutover_common::*;

use std::time::Duration;

async fn kill_after(phase: &str) {
    let pair = Pair::start();
    let failpoint = format!("after:{phase}");
    let mut shift = pair.launch(
        "",
        "drain_timeout = \"5s\"\ncatchup_timeout = \"20s\"\nverify = \"counts\"",
        &[("PGSHIFT_FAILPOINT", &failpoint)],
    );
    shift.wait_streaming_async(DB).await;
    let writer = Writer::start(&shift.url(DB), "before-kill").await;
    writer.wait_committed(3).await;

    shift.admin().post("/cutover").await.unwrap();
    let doc = shift
        .wait_phase_async(phase, Duration::from_secs(120))
        .await;
    let phases: Vec<&str> = doc["last_cutover"]["phases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["phase"].as_str().unwrap())
        .collect();
    assert_eq!(phases.last(), Some(&phase), "{doc:#}");
    let fenced_phase = ["fence", "marker", "sequences", "verify", "switch"].contains(&phase);
    assert_eq!(Pair::fenced(&pair.source), fenced_phase, "{phases:?}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    shift.kill();
    // The writer's connection died with the proxy; what it saw committed counts.
    let before = writer.finish().await;
    assert!(!before.committed.is_empty());

    shift.spawn();
    if phase == "switch" {
        let doc = shift
            .wait_substate_async("Succeeded", "RollbackAvailable", Duration::from_secs(120))
            .await;
        assert_eq!(doc["switched"], true);
        assert_eq!(
            doc["last_cutover"]["outcome"],
            "succeeded",
            "{doc:#}\n{}",
            shift.log()
        );
        // Clients land on the target; the source stays fenced.
        let (id, port) = write_one(&shift.url(DB), "after restart").await.unwrap();
        assert_eq!(port as u16, pair.target.port);
        assert!(Pair::ledger_ids(&pair.target).contains(&id));
        assert!(Pair::fenced(&pair.source));
        let direct = pair
            .source
            .psql_output(DB, "INSERT INTO ledger (client) VALUES ('direct')");
        assert!(!direct.status.success());
        // Past the point of no return: neither cancel nor another cutover.
        for path in ["/cancel", "/cutover"] {
            match shift.admin().post(path).await {
                Err(pgshift::admin::client::ClientError::Refused { status: 409, .. }) => {}
                other => panic!("{path}: expected 409, got {other:?}"),
            }
        }
    } else {
        let doc = shift
            .wait_substate_async(
                "WaitingForUserAction",
                "WaitingForCutoverTrigger",
                Duration::from_secs(120),
            )
            .await;
        assert!(!doc["switched"].as_bool().unwrap());
        let last = &doc["last_cutover"];
        assert_eq!(last["outcome"], "interrupted", "{doc:#}");
        assert!(
            last["reason"].as_str().unwrap().contains("restart"),
            "{doc:#}"
        );
        // The fence is lifted; clients are on the source, which is writable.
        assert!(!Pair::fenced(&pair.source));
        let (_, port) = write_one(&shift.url(DB), "after restart").await.unwrap();
        assert_eq!(port as u16, pair.source.port);
        // A new cutover succeeds.
        let out = shift.cli_async(&["cutover", "--wait"]).await;
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}\n{}",
            out_text(&out),
            shift.log()
        );
        assert!(Pair::fenced(&pair.source));
        let (_, port) = write_one(&shift.url(DB), "after cutover").await.unwrap();
        assert_eq!(port as u16, pair.target.port);
    }
    // Nothing lost: every acknowledged write is on the target, and the
    // source holds nothing the target lacks.
    let target_ids = Pair::ledger_ids(&pair.target);
    for (id, _) in &before.committed {
        assert!(target_ids.contains(id), "id {id} lost");
    }
    for id in Pair::ledger_ids(&pair.source) {
        assert!(target_ids.contains(&id), "source id {id} not on the target");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_after_prewarm() {
    kill_after("prewarm").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_after_gate() {
    kill_after("gate").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_after_drain() {
    kill_after("drain").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_after_fence() {
    kill_after("fence").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_after_marker() {
    kill_after("marker").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_after_sequences() {
    kill_after("sequences").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_after_verify() {
    kill_after("verify").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_after_switch() {
    kill_after("switch").await;
}

/// Killed with the source fenced, restarted while the source is down: the
/// fence is lifted once the source is back (not given up on).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_after_fence_restarted_while_the_source_is_down() {
    let mut pair = Pair::start();
    let mut shift = pair.launch(
        "",
        "drain_timeout = \"5s\"",
        &[("PGSHIFT_FAILPOINT", "after:fence")],
    );
    shift.wait_streaming_async(DB).await;
    let writer = Writer::start(&shift.url(DB), "before-kill").await;
    writer.wait_committed(3).await;
    shift.admin().post("/cutover").await.unwrap();
    shift
        .wait_phase_async("fence", Duration::from_secs(120))
        .await;
    assert!(Pair::fenced(&pair.source));
    shift.kill();
    let before = writer.finish().await;

    pair.source.stop();
    shift.spawn();
    // The restarted pgshift tries to lift the fence and keeps retrying while
    // the source is down (seen twice in its log); meanwhile it must not
    // offer a new cutover nor give up.
    let retrying = || {
        shift
            .current_log()
            .matches("cannot lift the fence yet")
            .count()
            >= 2
    };
    assert!(
        wait_until(Duration::from_secs(120), retrying),
        "{}",
        shift.log()
    );
    let doc = shift.status_async().await.unwrap();
    assert_ne!(doc["substate"], "WaitingForCutoverTrigger", "{doc:#}");
    assert_ne!(doc["state"], "Failed", "{doc:#}\n{}", shift.log());
    pair.source.start().unwrap();

    shift
        .wait_substate_async(
            "WaitingForUserAction",
            "WaitingForCutoverTrigger",
            Duration::from_secs(120),
        )
        .await;
    assert!(!Pair::fenced(&pair.source));
    let (_, port) = write_one(&shift.url(DB), "after restart").await.unwrap();
    assert_eq!(port as u16, pair.source.port);
    let out = shift.cli_async(&["cutover", "--wait"]).await;
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}\n{}",
        out_text(&out),
        shift.log()
    );
    let target_ids = Pair::ledger_ids(&pair.target);
    for (id, _) in &before.committed {
        assert!(target_ids.contains(id), "id {id} lost");
    }
}
