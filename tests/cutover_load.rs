//! A manual cutover under continuous load through the real binary: pgbench
//! `-M prepared` (TPC-B) and a psycopg client that records every id it saw
//! committed. Nothing fails, nothing is lost, nothing lands on the source
//! after the switch, and prepared statements keep working without re-preparing.

mod common;
mod cutover_common;
use common::*;
use cutover_common::*;

use std::time::Duration;

/// Row count and checksum of `table` rows with `id <= max_id`.
fn fingerprint_upto(c: &Cluster, table: &str, max_id: i64) -> String {
    c.psql(
        DB,
        &format!(
            "SELECT count(*), md5(coalesce(string_agg(x::text, ',' ORDER BY id), '')) FROM {table} x WHERE id <= {max_id}"
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cutover_under_pgbench_and_psycopg_load() {
    ensure_psycopg();
    let pair = Pair::start();
    pgbench_init(&pair);
    let shift = pair.launch(
        "",
        // Generous bounds: this test is about correctness; the abort paths
        // are tested in cutover_abort.rs. No rollback window, so nothing may
        // reach the source after the switch (tests/rollback.rs has one).
        "drain_timeout = \"60s\"\ncatchup_timeout = \"120s\"\nverify = \"checksums\"\nrollback = false",
        &[],
    );
    shift.wait_streaming_async(DB).await;

    // pgbench: TPC-B through the proxy, prepared statements. It runs until
    // the test stops it after the checks (-T only as a safety net), so it is
    // still running at the switch however slow the machine is.
    let mut pgbench = pgbench_through(shift.proxy_port, 2, 150);
    let count = |c: &Cluster, sql: &str| -> i64 { c.psql(DB, sql).parse().unwrap() };
    let history = |c: &Cluster| count(c, "SELECT count(*) FROM pgbench_history");
    let psycopg_rows = |c: &Cluster, above: i64| {
        count(
            c,
            &format!("SELECT count(*) FROM ledger WHERE client = 'psycopg' AND id > {above}"),
        )
    };

    // psycopg: records every id whose commit was acknowledged.
    let stop = shift.dir.path().join("stop");
    let result = shift.dir.path().join("psycopg.json");
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/python/cutover_client.py"
    );
    let py = tokio::process::Command::new("python3")
        .arg(script)
        .arg(shift.dsn(DB))
        .arg(&stop)
        .arg(&result)
        .output();
    let py = tokio::spawn(py);

    // Both clients are writing before the cutover starts.
    assert!(
        wait_until(Duration::from_secs(120), || history(&pair.source) >= 20
            && psycopg_rows(&pair.source, 0) >= 20),
        "the clients do not write\n{}",
        shift.log()
    );
    let started = std::time::Instant::now();
    let out = shift.cli_async(&["cutover", "--wait"]).await;
    let cutover_took = started.elapsed().as_secs_f64();
    let text = out_text(&out);
    assert_eq!(out.status.code(), Some(0), "{text}\n{}", shift.log());
    let last = shift.last_cutover_async().await;
    assert_eq!(last["outcome"], "succeeded", "{last:#}");

    // Both clients go on writing, now on the target.
    let source_ledger_max = count(&pair.source, "SELECT coalesce(max(id), 0) FROM ledger");
    let source_history = history(&pair.source);
    assert!(
        wait_until(Duration::from_secs(120), || history(&pair.target)
            >= source_history + 20
            && psycopg_rows(&pair.target, source_ledger_max) >= 20),
        "the clients stopped writing after the switch\n{}",
        shift.log()
    );
    std::fs::write(&stop, "").unwrap();
    let py_out = py.await.unwrap().unwrap();
    // pgbench never ends by itself: stop it; whatever it printed must show
    // no failed or aborted transaction.
    let _ = pgbench.start_kill();
    let bench = pgbench.wait_with_output().await.unwrap();
    let bench_text = out_text(&bench);
    assert!(
        !bench_text.contains("aborted") && !bench_text.contains("ERROR"),
        "pgbench failed across the cutover: {bench_text}"
    );
    assert!(py_out.status.success(), "psycopg: {}", out_text(&py_out));
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&result).unwrap()).unwrap();

    // Zero failed client transactions.
    assert_eq!(r["failures"], serde_json::json!([]), "{r:#}");
    let committed: Vec<(i64, u16)> = r["committed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c[0].as_i64().unwrap(), c[1].as_i64().unwrap() as u16))
        .collect();
    let on_source: Vec<i64> = committed
        .iter()
        .filter(|c| c.1 == pair.source.port)
        .map(|c| c.0)
        .collect();
    let on_target: Vec<i64> = committed
        .iter()
        .filter(|c| c.1 == pair.target.port)
        .map(|c| c.0)
        .collect();
    assert!(
        !on_source.is_empty() && !on_target.is_empty(),
        "writes before and after the switch: {r:#}"
    );
    assert_eq!(on_source.len() + on_target.len(), committed.len());

    // Every recorded id is on the target.
    let target_ids = Pair::ledger_ids(&pair.target);
    for (id, _) in &committed {
        assert!(target_ids.binary_search(id).is_ok(), "id {id} lost");
    }
    // Nothing was written on the source after the switch: its last id is
    // the last one committed there before the switch, and ids continue above it.
    let last_before = *on_source.iter().max().unwrap();
    let source_ids = Pair::ledger_ids(&pair.source);
    assert_eq!(*source_ids.last().unwrap(), last_before);
    assert!(on_target.iter().all(|id| *id > last_before));
    for id in &on_target {
        assert!(source_ids.binary_search(id).is_err(), "{id} on the source");
    }
    // pgbench's history: everything the source has, the target has, identical.
    let source_max: i64 = pair
        .source
        .psql(DB, "SELECT coalesce(max(id), 0) FROM pgbench_history")
        .parse()
        .unwrap();
    assert!(source_max > 0);
    assert_eq!(
        fingerprint_upto(&pair.source, "pgbench_history", source_max),
        fingerprint_upto(&pair.target, "pgbench_history", source_max)
    );
    let target_max: i64 = pair
        .target
        .psql(DB, "SELECT max(id) FROM pgbench_history")
        .parse()
        .unwrap();
    assert!(target_max > source_max, "pgbench wrote after the switch");

    // The source is fenced: a direct write fails.
    assert!(Pair::fenced(&pair.source));
    let direct = pair
        .source
        .psql_output(DB, "INSERT INTO ledger (client) VALUES ('direct')");
    assert!(
        String::from_utf8_lossy(&direct.stderr).contains("read-only"),
        "{direct:?}"
    );

    // The pre-switch comparison (verify phase, checksums) passed.
    let verify = last["phases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["phase"] == "verify")
        .expect("verify phase")
        .clone();
    assert_eq!(verify["outcome"], "ok", "{last:#}");
    assert!(verify["detail"].as_str().unwrap().contains("match"));

    // Session state moved: the same prepared statements, settings, on the target.
    let before = r["prepared_before"].as_array().unwrap();
    assert!(!before.is_empty());
    let after = r["prepared_after"].as_array().unwrap();
    for name in before {
        assert!(after.contains(name), "{name} gone after the switch: {r:#}");
    }
    assert_eq!(r["settings_after"]["port"], pair.target.port, "{r:#}");
    assert_eq!(r["settings_after"]["search_path"], "public");
    assert_eq!(r["settings_after"]["statement_timeout"], "31s");
    assert!(last["sessions_moved"].as_u64().unwrap() >= 3, "{last:#}");

    // The cutover's metrics.
    let metrics = shift.admin().get("/metrics").await.unwrap();
    let metrics = metrics.as_str().unwrap();
    let value = |name: &str| -> f64 {
        metrics
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name} missing:\n{metrics}"))
    };
    assert_eq!(
        value("pgshift_cutover_attempts_total{outcome=\"succeeded\"}"),
        1.0
    );
    // The pause is measured and lies inside the cutover (how short it is on
    // a given machine is a benchmark's business, not this test's).
    let pause = value("pgshift_cutover_pause_seconds");
    assert!(
        pause > 0.0 && pause < cutover_took,
        "pause {pause}, cutover {cutover_took}"
    );
    assert!(value("pgshift_cutover_phase_seconds{phase=\"marker\"}") > 0.0);
    assert!(value("pgshift_cutover_sessions_moved_total") >= 3.0);
    eprintln!("write pause {pause:.3}s, phases {:#}", last["phases"]);
}

/// A backlog apply has when the cutover starts is worked off before the
/// gate closes, not inside the pause: the marker then finds apply caught up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_is_applied_before_the_gate_closes() {
    // Written while apply waits behind a lock on the target. Generous
    // bounds: how long the backlog takes depends on the machine.
    let (pair, shift, blocker) = streaming_with_apply_blocked(
        "catchup_timeout = \"120s\"\npregate_catchup_timeout = \"600s\"",
    )
    .await;
    pair.source.psql(
        DB,
        "INSERT INTO ledger (client, note) SELECT 'bulk', repeat('x', 200) FROM generate_series(1, 100000)",
    );
    blocker.batch_execute("ROLLBACK").await.unwrap();

    let out = shift.cli_async(&["cutover", "--wait"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", out_text(&out));
    let last = shift.last_cutover_async().await;
    assert_eq!(phase(&last, "catchup")["outcome"], "ok", "{last:#}");
    let seconds = |name: &str| phase(&last, name)["seconds"].as_f64().unwrap();
    assert!(
        seconds("catchup") > seconds("marker"),
        "the backlog was applied in the pause: {last:#}"
    );
    assert_eq!(
        pair.target
            .psql(DB, "SELECT count(*) FROM ledger WHERE client = 'bulk'"),
        "100000"
    );
}
