//! The way back: reverse replication from the switch, `pgshift rollback`
//! under load with live sessions, a second cutover without a new copy, and
//! `complete` (by hand and by itself). Every acknowledged write is checked
//! on the server that must hold it, exactly once, and the two servers are
//! compared row by row.

mod common;
mod cutover_common;
use common::*;
use cutover_common::*;

use std::collections::HashSet;
use std::time::Duration;

use serde_json::Value;

const BOUNDS: &str = "drain_timeout = \"60s\"\ncatchup_timeout = \"120s\"";

/// Runs `pgshift <cmd> --wait` through the CLI; asserts it succeeded.
async fn attempt(shift: &Pgshift, cmd: &str) {
    let out = shift.cli_async(&[cmd, "--wait"]).await;
    assert!(
        out.status.success(),
        "{cmd}: {}\n{}",
        out_text(&out),
        shift.log()
    );
}

/// Waits until `f` holds for the status (at most 300 s, polling).
async fn wait_for(
    shift: &Pgshift,
    what: &str,
    f: impl Fn(&Value) -> bool + Send + 'static,
) -> Value {
    shift
        .wait_status_async(what, Duration::from_secs(300), f)
        .await
}

fn substate(s: &Value) -> (String, String) {
    (
        s["state"].as_str().unwrap_or("").to_string(),
        s["substate"].as_str().unwrap_or("").to_string(),
    )
}

/// Objects pgshift leaves on a cluster: slots, publications in `shop`,
/// replication origins.
fn leftovers(c: &Cluster) -> String {
    c.psql(
        DB,
        "SELECT concat_ws(' ',
           (SELECT string_agg(slot_name, ',') FROM pg_replication_slots),
           (SELECT string_agg(pubname, ',') FROM pg_publication),
           (SELECT string_agg(roname, ',') FROM pg_replication_origin WHERE roname LIKE 'pgshift%'))",
    )
}

/// Row-by-row fingerprints of the migrated tables (ledger, pgbench's).
fn rows(c: &Cluster) -> Vec<(String, i64, String)> {
    table_fingerprints(c, DB)
}

/// Waits until both servers hold the same rows (reverse or forward
/// replication catching up), then returns them.
async fn converge(pair: &Pair) -> Vec<(String, i64, String)> {
    let (s, t) = (&pair.source, &pair.target);
    assert!(
        wait_until(Duration::from_secs(180), || rows(s) == rows(t)),
        "source and target differ:\n{:?}\n{:?}",
        rows(s),
        rows(t)
    );
    rows(s)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_under_load_and_cutover_again() {
    ensure_psycopg();
    let pair = Pair::start();
    pgbench_init(&pair);
    let shift = pair.launch("", BOUNDS, &[]);
    shift.wait_streaming_async(DB).await;

    // Clients on persistent sessions through the proxy: a writer that
    // records the server port of every acknowledged commit, pgbench -M
    // prepared, and psycopg with prepared statements, settings and LISTEN.
    let writer = Writer::start(&shift.url(DB), "writer").await;
    let mut pgbench = pgbench_through(shift.proxy_port, 2, 100);
    let stop = shift.dir.path().join("stop");
    let result = shift.dir.path().join("psycopg.json");
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/python/cutover_client.py"
    );
    let py = tokio::spawn(
        tokio::process::Command::new("python3")
            .arg(script)
            .arg(shift.dsn(DB))
            .arg(&stop)
            .arg(&result)
            .output(),
    );
    writer.wait_more(30).await;

    // 1. Cutover: the window opens, reverse replication runs.
    attempt(&shift, "cutover").await;
    let s = wait_for(&shift, "the rollback window", |s| {
        s["rollback"]["window"] == "open"
    })
    .await;
    assert_eq!(
        substate(&s),
        ("Succeeded".into(), "RollbackAvailable".into())
    );
    assert!(Pair::fenced(&pair.source), "the source stays fenced");
    writer.wait_more(50).await;
    // What clients write on the target reaches the fenced source.
    converge_while_writing(&pair, &writer).await;

    // 2. Rollback under the same load.
    attempt(&shift, "rollback").await;
    let s = wait_for(&shift, "forward streaming again", |s| {
        s["substate"] == "WaitingForCutoverTrigger"
    })
    .await;
    assert_eq!(s["last_rollback"]["outcome"], "succeeded", "{s}");
    assert!(!Pair::fenced(&pair.source), "the source takes writes again");
    let mark = writer.acked();
    writer.wait_more(50).await;

    // 3. Cutover again, without a new copy.
    attempt(&shift, "cutover").await;
    wait_for(&shift, "the rollback window again", |s| {
        s["rollback"]["window"] == "open"
    })
    .await;
    writer.wait_more(30).await;

    std::fs::write(&stop, b"stop").unwrap();
    let py = py.await.unwrap().unwrap();
    assert!(py.status.success(), "psycopg client: {}", out_text(&py));
    let _ = pgbench.start_kill();
    let bench = pgbench.wait_with_output().await.unwrap();
    let bench_out = String::from_utf8_lossy(&bench.stdout).to_string()
        + &String::from_utf8_lossy(&bench.stderr);
    let w = writer.finish().await;
    assert!(w.errors.is_empty(), "writer errors: {:?}", w.errors);
    // pgbench aborts a client at its first failed transaction and says so.
    assert!(
        !bench_out.contains("aborted") && !bench_out.contains("ERROR"),
        "pgbench failed across the switches: {bench_out}"
    );

    // Every acknowledged write is on the final target exactly once, and
    // was made on the server the route pointed at.
    let final_rows = converge(&pair).await;
    assert!(!final_rows.is_empty());
    let ids = Pair::ledger_ids(&pair.target);
    let unique: HashSet<i64> = ids.iter().copied().collect();
    assert_eq!(unique.len(), ids.len(), "a ledger id twice on the target");
    for (id, _) in &w.committed {
        assert!(
            unique.contains(id),
            "acknowledged id {id} missing on the target"
        );
    }
    let ports: Vec<i32> = w.committed.iter().map(|(_, p)| *p).collect();
    let (sp, tp) = (pair.source.port as i32, pair.target.port as i32);
    assert!(
        ports.contains(&tp),
        "no write on the target after the cutover"
    );
    assert!(
        ports[mark..].contains(&sp),
        "no write on the source after the rollback"
    );
    assert_eq!(
        *ports.last().unwrap(),
        tp,
        "the last writes run on the target"
    );

    // psycopg kept its session state through both switches.
    let doc: Value = serde_json::from_slice(&std::fs::read(&result).unwrap()).unwrap();
    assert_eq!(doc["failures"], serde_json::json!([]), "{doc}");
    // Statements prepared before the first switch are still there (more
    // were prepared at first use since).
    let after = doc["prepared_after"].as_array().unwrap();
    for name in doc["prepared_before"].as_array().unwrap() {
        assert!(after.contains(name), "{name} lost: {doc}");
    }
    assert_eq!(doc["settings_after"]["statement_timeout"], "31s", "{doc}");
    assert_eq!(
        doc["listening_after"],
        serde_json::json!(["pgshift_client"]),
        "{doc}"
    );
    let committed: Vec<i64> = doc["committed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r[0].as_i64().unwrap())
        .collect();
    for id in &committed {
        assert!(
            unique.contains(id),
            "psycopg's id {id} missing on the target"
        );
    }

    // Sequences went back with the rollback: the source's next id is past
    // every id written on the target before it.
    let max_seq: i64 = pair
        .source
        .psql(DB, "SELECT last_value FROM ledger_id_seq")
        .parse()
        .unwrap();
    assert!(max_seq >= w.committed[..mark].iter().map(|(i, _)| *i).max().unwrap());

    // 4. complete: nothing of pgshift's stays on either server.
    let out = shift.cli_admin(&["complete"]);
    assert!(out.status.success(), "complete: {}", out_text(&out));
    let s = wait_for(&shift, "completed", |s| s["substate"] == "Completed").await;
    assert_eq!(s["rollback"]["window"], "closed");
    assert_eq!(leftovers(&pair.target), "", "left on the target");
    assert_eq!(leftovers(&pair.source), "", "left on the source");
}

/// Waits until the source holds what the target holds while the writer
/// keeps writing on the target (it stops for the comparison).
async fn converge_while_writing(pair: &Pair, writer: &Writer) {
    // The writer's latest acknowledged id reaches the source.
    let _ = writer;
    let max_target: i64 = pair
        .target
        .psql(DB, "SELECT max(id) FROM ledger")
        .parse()
        .unwrap();
    assert!(
        wait_until(Duration::from_secs(180), || {
            pair.source.psql(
                DB,
                &format!("SELECT count(*) FROM ledger WHERE id = {max_target}"),
            ) == "1"
        }),
        "the target's write {max_target} did not reach the source"
    );
}

/// `kill -9` while reverse replication streams and inside the rollback's
/// pause (target fenced, marker applied): after each restart nothing is lost
/// or applied twice, and never are both sides writable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_during_reverse_streaming_and_rollback_pause() {
    let pair = Pair::start();
    pgbench_init(&pair);
    let release = tempfile::tempdir().unwrap();
    let go = release.path().join("go");
    let failpoint = format!("hold:rollback-marker:{}", go.display());
    let env = [("PGSHIFT_FAILPOINT", failpoint.as_str())];
    let mut shift = pair.launch("", BOUNDS, &env);
    shift.wait_streaming_async(DB).await;
    let writer = Writer::start(&shift.url(DB), "w1").await;
    writer.wait_more(20).await;
    attempt(&shift, "cutover").await;
    writer.wait_more(40).await;

    // Reverse streaming killed: history (no key) shows any row applied twice.
    shift.kill();
    let w1 = writer.finish().await;
    shift.restart_with(&env);
    wait_for(&shift, "reverse streaming after a restart", |s| {
        s["rollback"]["window"] == "open"
            && s["databases"][DB]["reverse_stream"]["state"] == "streaming"
    })
    .await;
    let writer = Writer::start(&shift.url(DB), "w2").await;
    writer.wait_more(40).await;
    let w2 = writer.finish().await;
    converge(&pair).await;

    // Inside the rollback's pause: the target is fenced, the source still.
    let rollback = shift.cli_admin(&["rollback"]);
    assert!(rollback.status.success(), "{}", out_text(&rollback));
    shift
        .wait_status_async("held after the marker", Duration::from_secs(300), |s| {
            s["last_rollback"]["phases"]
                .as_array()
                .is_some_and(|p| p.iter().any(|p| p["phase"] == "marker"))
        })
        .await;
    // The source is guarded, not fenced, by then (its backends were
    // pre-warmed): an application write there is refused.
    let direct = connect(&pair.source.url_as(APP_USER, APP_PW, DB)).await;
    let refused = direct
        .execute("INSERT INTO ledger (client) VALUES ('direct')", &[])
        .await
        .expect_err("an application write on the source in the rollback's pause");
    assert_eq!(
        refused.code(),
        Some(&tokio_postgres::error::SqlState::READ_ONLY_SQL_TRANSACTION),
        "{refused:?}"
    );
    drop(direct);
    shift.kill();
    shift.restart_with(&env);
    let s = wait_for(&shift, "back in the window", |s| {
        s["rollback"]["window"] == "open"
            && s["databases"][DB]["reverse_stream"]["state"] == "streaming"
    })
    .await;
    assert_eq!(s["last_rollback"]["outcome"], "interrupted", "{s}");
    assert!(Pair::fenced(&pair.source), "the source is fenced again");
    // The target takes writes again through the proxy.
    let writer = Writer::start(&shift.url(DB), "w3").await;
    writer.wait_more(20).await;

    // The rollback now goes through (the hold released).
    std::fs::write(&go, b"go").unwrap();
    attempt(&shift, "rollback").await;
    writer.wait_more(20).await;
    let w3 = writer.finish().await;
    assert!(!Pair::fenced(&pair.source));
    let all = converge(&pair).await;
    assert!(!all.is_empty());
    let ids: Vec<i64> = Pair::ledger_ids(&pair.source);
    let unique: HashSet<i64> = ids.iter().copied().collect();
    assert_eq!(unique.len(), ids.len());
    for (id, _) in w1
        .committed
        .iter()
        .chain(&w2.committed)
        .chain(&w3.committed)
    {
        assert!(
            unique.contains(id),
            "acknowledged id {id} missing on the source"
        );
    }
    assert!(
        w2.errors.is_empty() && w3.errors.is_empty(),
        "{:?} {:?}",
        w2.errors,
        w3.errors
    );
}

/// The window ends by itself (`rollback_window`), dropping what it kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_window_ends_by_itself() {
    let pair = Pair::start();
    let shift = pair.launch("", &format!("{BOUNDS}\nrollback_window = \"2s\""), &[]);
    shift.wait_streaming_async(DB).await;
    attempt(&shift, "cutover").await;
    let s = wait_for(&shift, "completed by itself", |s| {
        s["substate"] == "Completed"
    })
    .await;
    assert!(
        s["rollback"]["closed_reason"]
            .as_str()
            .is_some_and(|r| r.contains("rollback_window")),
        "{s}"
    );
    assert_eq!(leftovers(&pair.target), "");
    assert_eq!(leftovers(&pair.source), "");
    // And rollback and complete are refused with a clear reason.
    for cmd in ["rollback", "complete"] {
        let out = shift.cli_admin(&[cmd]);
        assert!(!out.status.success(), "{cmd}");
        let text = out_text(&out);
        assert!(
            text.contains("409") && text.contains("Succeeded/Completed"),
            "{cmd}: {text}"
        );
    }
}

/// The window also ends when the reverse slot holds back more WAL on the
/// target than `rollback_max_retained_wal`: writes on the target make it
/// grow, and the window's end drops it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_window_ends_when_the_reverse_slot_holds_too_much() {
    let pair = Pair::start();
    let shift = pair.launch(
        "",
        &format!("{BOUNDS}\nrollback_max_retained_wal = \"64kB\""),
        &[],
    );
    shift.wait_streaming_async(DB).await;
    attempt(&shift, "cutover").await;
    // Writes on the target through the proxy: WAL the reverse slot keeps
    // until it is confirmed (and longer: its restart point moves only with
    // the server's own snapshots of running transactions).
    let writer = Writer::start(&shift.url(DB), "w").await;
    let s = wait_for(&shift, "completed by itself", |s| {
        s["substate"] == "Completed"
    })
    .await;
    let w = writer.finish().await;
    assert!(w.errors.is_empty(), "{:?}", w.errors);
    assert!(
        s["rollback"]["closed_reason"]
            .as_str()
            .is_some_and(|r| r.contains("rollback_max_retained_wal")),
        "{s}"
    );
    assert_eq!(leftovers(&pair.target), "");
}

/// Oldest source and newest target, and newest on both sides: cutover,
/// writes on the target, rollback, every write on the source once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_across_versions() {
    for (src, tgt) in [(11, 15), (18, 18)] {
        if !version_or_skip(src, "rollback_across_versions")
            || !version_or_skip(tgt, "rollback_across_versions")
        {
            continue;
        }
        let pair = Pair::start_with(
            ClusterOptions {
                version: Some(src),
                ..Default::default()
            },
            ClusterOptions {
                version: Some(tgt),
                ..Default::default()
            },
        );
        let shift = pair.launch("", BOUNDS, &[]);
        shift.wait_streaming_async(DB).await;
        let writer = Writer::start(&shift.url(DB), "w").await;
        writer.wait_more(20).await;
        attempt(&shift, "cutover").await;
        writer.wait_more(30).await;
        attempt(&shift, "rollback").await;
        writer.wait_more(20).await;
        let w = writer.finish().await;
        assert!(w.errors.is_empty(), "{src}->{tgt}: {:?}", w.errors);
        converge(&pair).await;
        let ids = Pair::ledger_ids(&pair.source);
        let unique: HashSet<i64> = ids.iter().copied().collect();
        assert_eq!(unique.len(), ids.len(), "{src}->{tgt}");
        for (id, _) in &w.committed {
            assert!(
                unique.contains(id),
                "{src}->{tgt}: id {id} missing on the source"
            );
        }
    }
}

/// A difference planted on the target inside the pause (after the marker,
/// before the snapshot) is found by the verification after the switch,
/// named with its table and key range; `rollback_on_mismatch` then brings
/// the clients back to the source by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verification_after_the_switch_finds_a_planted_difference() {
    let pair = Pair::start();
    let release = tempfile::tempdir().unwrap();
    let go = release.path().join("go");
    let failpoint = format!("hold:sequences:{}", go.display());
    let shift = pair.launch(
        "",
        &format!("{BOUNDS}\nrollback_on_mismatch = true"),
        &[("PGSHIFT_FAILPOINT", failpoint.as_str())],
    );
    shift.wait_streaming_async(DB).await;
    let writer = Writer::start(&shift.url(DB), "w").await;
    writer.wait_more(10).await;
    let out = shift.cli_admin(&["cutover"]);
    assert!(out.status.success(), "{}", out_text(&out));
    shift
        .wait_status_async("held after the sequences", Duration::from_secs(300), |s| {
            s["last_cutover"]["phases"]
                .as_array()
                .is_some_and(|p| p.iter().any(|p| p["phase"] == "sequences"))
        })
        .await;
    // The source is fenced and the marker applied: a change made now on the
    // target (as a superuser, whom the guard lets write) is a difference.
    pair.target
        .psql(DB, "UPDATE items SET name = 'planted' WHERE id = 7");
    std::fs::write(&go, b"go").unwrap();
    let s = wait_for(&shift, "the verification after the switch", |s| {
        s["verify_after_switch"]["state"] == "mismatch"
            || s["verify_after_switch"]["state"] == "match"
    })
    .await;
    let v = &s["verify_after_switch"];
    assert_eq!(v["state"], "mismatch", "{s}");
    let m = v["mismatches"].as_array().unwrap();
    assert_eq!(m.len(), 1, "{v}");
    assert_eq!(m[0]["table"], "public.items", "{v}");
    assert!(
        m[0]["detail"].as_str().unwrap().contains("(id)"),
        "the key range is named: {v}"
    );
    // rollback_on_mismatch: back on the source, the writer never failed.
    let s = wait_for(&shift, "rolled back by itself", |s| {
        s["last_rollback"]["outcome"] == "succeeded" && s["substate"] == "WaitingForCutoverTrigger"
    })
    .await;
    assert!(s["last_rollback"]["id"].is_string());
    writer.wait_more(10).await;
    let w = writer.finish().await;
    assert!(w.errors.is_empty(), "{:?}", w.errors);
    assert_eq!(
        w.committed.last().unwrap().1,
        pair.source.port as i32,
        "the writer ends on the source"
    );
}
