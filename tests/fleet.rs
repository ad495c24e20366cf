//! A fleet of sidecars: several `pgshift run` processes on one migration,
//! each with clients through its own proxy. One leads (streams, cuts
//! over); one cutover moves every member's sessions; a leader that dies is
//! replaced and streaming resumes exactly once; a member that dies or
//! stops during a cutover never lets a write commit on the source after
//! the marker.

mod common;
mod cutover_common;
use common::*;
use cutover_common::*;

use std::process::Command;
use std::time::Duration;

use serde_json::Value;

/// The fleet's shared config for member `id` (`cutover` inside `[cutover]`).
fn member_extra(id: &str, cutover: &str) -> String {
    format!(
        "\n{}\n[cutover]\n{cutover}\n\n[fleet]\nmember_id = \"{id}\"\nheartbeat_interval = \"200ms\"\nmember_timeout = \"2s\"\n",
        migration("cut", &[DB], "mode = \"online\"")
    )
}

fn launch(pair: &Pair, id: &str, cutover: &str, env: &[(&str, &str)]) -> Pgshift {
    Pgshift::launch(&pair.source, &pair.target, &member_extra(id, cutover), env)
}

fn fleet_of(status: &Value) -> &Value {
    &status["fleet"]
}

fn is_leader(p: &Pgshift) -> bool {
    p.status()
        .is_some_and(|s| fleet_of(&s)["leader"] == Value::Bool(true))
}

/// Index of the member that leads, once one does (and only one claims it).
fn wait_leader(members: &[&Pgshift]) -> usize {
    let mut found = None;
    let ok = wait_until(Duration::from_secs(120), || {
        let leading: Vec<usize> = (0..members.len())
            .filter(|i| is_leader(members[*i]))
            .collect();
        found = leading.first().copied();
        leading.len() == 1
    });
    assert!(ok, "no single leader");
    found.unwrap()
}

/// Waits until `p` sees `n` live members.
fn wait_members(p: &Pgshift, n: usize) {
    p.wait_status("fleet members", Duration::from_secs(120), |s| {
        fleet_of(s)["members"]
            .as_array()
            .is_some_and(|m| m.iter().filter(|x| x["alive"] == Value::Bool(true)).count() == n)
    });
}

fn route(p: &Pgshift) -> String {
    p.status()
        .map(|s| s["proxy"]["route"].as_str().unwrap_or("").to_string())
        .unwrap_or_default()
}

/// pgbench `-M prepared` through `port` at a low rate until killed.
fn pgbench(port: u16) -> tokio::process::Child {
    pgbench_through(port, 1, 10)
}

/// Every acknowledged write is on the target once; nothing committed on
/// the source after the switch (every source row is on the target, and
/// every write on the target has a higher id than any on the source).
fn check_writes(pair: &Pair, results: &[(String, WriterResult)]) {
    let target_ids = Pair::ledger_ids(&pair.target);
    let source_ids = Pair::ledger_ids(&pair.source);
    let mut on_source_max = 0;
    let mut on_target_min = i64::MAX;
    for (name, r) in results {
        for (id, port) in &r.committed {
            assert!(target_ids.binary_search(id).is_ok(), "{name}: id {id} lost");
            if *port == i32::from(pair.source.port) {
                on_source_max = on_source_max.max(*id);
            } else {
                assert_eq!(*port, i32::from(pair.target.port));
                on_target_min = on_target_min.min(*id);
            }
        }
    }
    assert!(
        on_source_max < on_target_min,
        "a write on the source ({on_source_max}) after one on the target ({on_target_min})"
    );
    for id in &source_ids {
        assert!(
            target_ids.binary_search(id).is_ok(),
            "id {id} committed on the source was never replicated: written after the marker"
        );
    }
    let mut dedup = target_ids.clone();
    dedup.dedup();
    assert_eq!(dedup.len(), target_ids.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_members_one_cutover_under_pgbench() {
    let pair = Pair::start();
    pgbench_init(&pair);
    // Generous bounds: this test is about every member moving.
    let cutover = "drain_timeout = \"60s\"\ncatchup_timeout = \"120s\"";
    // The first member leads; the others join while it validates and copies.
    let first = launch(&pair, "m0", cutover, &[]);
    first.wait_up();
    assert!(is_leader(&first), "{}", first.log());
    let mut members = vec![first];
    for i in 1..8 {
        members.push(launch(&pair, &format!("m{i}"), cutover, &[]));
    }
    members[0].wait_streaming_async(DB).await;
    for m in &members {
        m.wait_up();
    }
    wait_members(&members[0], 8);
    // A rolling deploy: a follower is replaced (killed, started again);
    // the leader stays, nothing starts over.
    members[7].kill();
    members[7].restart();
    wait_members(&members[0], 8);
    let refs: Vec<&Pgshift> = members.iter().collect();
    assert_eq!(wait_leader(&refs), 0, "the first member leads throughout");
    let s = members[0].status().unwrap();
    assert_eq!(s["databases"][DB]["copy_restarts"], 0, "{s:#}");

    // Persistent clients through every member's proxy.
    let mut benches = Vec::new();
    let mut writers = Vec::new();
    for (i, m) in members.iter().enumerate() {
        benches.push(pgbench(m.proxy_port));
        writers.push((
            format!("w{i}"),
            Writer::start(&m.url(DB), &format!("w{i}")).await,
        ));
    }
    for (_, w) in &writers {
        w.wait_more(5).await;
    }
    wait_members(&members[0], 8);

    // The cutover is asked of a follower.
    let out = members[5].cli_async(&["cutover", "--wait"]).await;
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}\n{}",
        out_text(&out),
        members[0].log()
    );
    let last = members[0].last_cutover_async().await;
    assert_eq!(last["outcome"], "succeeded", "{last:#}");
    let drain = detail(&last, "drain");
    assert!(drain.contains("8 member(s) drained"), "{drain}");
    // Every member ends on the target, with its gate open.
    for m in &members {
        assert!(
            wait_until(Duration::from_secs(60), || route(m) == "target"),
            "{}",
            m.log()
        );
    }
    for (_, w) in &writers {
        w.wait_more(5).await;
    }
    let mut results = Vec::new();
    for (name, w) in writers {
        results.push((name, w.finish().await));
    }
    for mut b in benches {
        let _ = b.start_kill();
        let out = b.wait_with_output().await.unwrap();
        let text = out_text(&out);
        assert!(
            !text.contains("aborted") && !text.contains("ERROR"),
            "pgbench failed across the cutover: {text}"
        );
    }
    for (name, r) in &results {
        assert!(r.errors.is_empty(), "{name}: {:?}", r.errors);
        assert!(
            r.committed
                .iter()
                .any(|c| c.1 == i32::from(pair.source.port))
        );
        assert!(
            r.committed
                .iter()
                .any(|c| c.1 == i32::from(pair.target.port))
        );
    }
    check_writes(&pair, &results);
    // pgbench's history up to the switch is identical on both sides.
    let source_max: i64 = pair
        .source
        .psql(DB, "SELECT coalesce(max(id), 0) FROM pgbench_history")
        .parse()
        .unwrap();
    let upto = format!(
        "SELECT count(*), md5(coalesce(string_agg(x::text, ',' ORDER BY id), '')) FROM pgbench_history x WHERE id <= {source_max}"
    );
    assert_eq!(pair.source.psql(DB, &upto), pair.target.psql(DB, &upto));
    // Every member reports the same migration.
    for m in &members {
        let s = m.status().unwrap();
        assert_eq!(s["state"], "Succeeded", "{s:#}");
    }
    // The fleet's metrics.
    let metrics = http(members[3].admin_port, "GET", "/metrics").unwrap().1;
    assert!(metrics.contains("pgshift_fleet_members 8"), "{metrics}");
    assert!(metrics.contains("pgshift_fleet_leader{member=\"m0\"} 1"));
    assert!(metrics.contains("pgshift_fleet_leader{member=\"m3\"} 0"));
}

/// Source writes straight to the source (no proxy) into a table without a
/// key: a change applied twice would show as a duplicate row.
async fn direct_writer(pair: &Pair) -> Writer {
    pair.source.psql(
        DB,
        "CREATE TABLE events (n bigint, note text); ALTER TABLE events REPLICA IDENTITY FULL;
         GRANT ALL ON events TO app;",
    );
    let url = pair.source.url_as(APP_USER, APP_PW, DB);
    let client = connect(&url).await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let acked = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (s, a) = (stop.clone(), acked.clone());
    let task = tokio::spawn(async move {
        let mut r = WriterResult::default();
        let mut n = 0i64;
        while !s.load(std::sync::atomic::Ordering::Relaxed) {
            n += 1;
            match client
                .execute(
                    "INSERT INTO events VALUES ($1, 'e'), ($1, 'same row twice on purpose')",
                    &[&n],
                )
                .await
            {
                Ok(_) => {
                    r.committed.push((n, 0));
                    a.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                Err(e) => r.errors.push(e.to_string()),
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        r
    });
    Writer { stop, task, acked }
}

/// The leader's control session (it holds the migration's lock).
fn control_backend(target: &Cluster) -> Option<i32> {
    target
        .psql(
            "postgres",
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted LIMIT 1",
        )
        .trim()
        .parse()
        .ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_leader_resumes_streaming_exactly_once() {
    let pair = Pair::start();
    let writer = direct_writer(&pair).await;
    let a = launch(&pair, "a", "", &[]);
    a.wait_streaming_async(DB).await;
    // b never leads: its writer must never notice the leaders change.
    let b = Pgshift::launch(
        &pair.source,
        &pair.target,
        &format!("{}role = \"proxy\"\n", member_extra("b", "")),
        &[],
    );
    b.wait_up();
    let c = launch(&pair, "c", "", &[]);
    c.wait_up();
    wait_members(&b, 3);
    assert_eq!(wait_leader(&[&a, &b, &c]), 0);

    // A writer through a follower's proxy, while the source changes directly.
    let through_b = Writer::start(&b.url(DB), "via-b").await;
    through_b.wait_more(10).await;
    writer.wait_more(50).await;

    // The leader loses its lock (its control session ends) but lives: it
    // stops applying; a member takes over.
    let pid = control_backend(&pair.target).expect("the leader holds the lock");
    pair.target
        .psql("postgres", &format!("SELECT pg_terminate_backend({pid})"));
    assert!(
        wait_until(Duration::from_secs(60), || a
            .log()
            .contains("this member stops leading")),
        "{}",
        a.log()
    );
    let second = wait_leader(&[&a, &b, &c]);
    writer.wait_more(50).await;

    // The leader is killed: another member leads within seconds.
    let leader_now = second;
    let mut procs = [a, b, c];
    procs[leader_now].kill();
    let alive: Vec<usize> = (0..3).filter(|i| *i != leader_now).collect();
    let third = {
        let refs: Vec<&Pgshift> = alive.iter().map(|i| &procs[*i]).collect();
        alive[wait_leader(&refs)]
    };
    assert_ne!(third, leader_now);
    writer.wait_more(50).await;
    // A member joins while streaming: it follows and routes to the source.
    let d = launch(&pair, "d", "", &[]);
    d.wait_up();
    wait_members(&d, 3);
    assert!(!is_leader(&d));
    assert_eq!(route(&d), "source");
    let through_d = write_one(&d.url(DB), "via-d").await.unwrap();
    assert_eq!(through_d.1, i32::from(pair.source.port));

    // SIGTERM: a member leaves the fleet (its row goes) and exits.
    let mut d = d;
    d.sigterm();
    assert_eq!(d.wait_exit(Duration::from_secs(60)), Some(0), "{}", d.log());
    assert_eq!(
        pair.target.psql(
            "postgres",
            "SELECT count(*) FROM pgshift.member WHERE id = 'd'"
        ),
        "0"
    );
    let direct = writer.finish().await;
    let via_b = through_b.finish().await;
    assert!(direct.errors.is_empty(), "{:?}", direct.errors);
    // The writer through b never noticed the leaders change (b was never killed).
    assert!(via_b.errors.is_empty(), "{:?}", via_b.errors);
    procs[third].wait_caught_up(&pair.source, &[DB], Duration::from_secs(60));
    // Row by row: each event exactly once, each ledger row once.
    assert_eq!(
        table_fingerprints(&pair.source, DB),
        table_fingerprints(&pair.target, DB)
    );
    let n: i64 = pair
        .target
        .psql(DB, "SELECT count(*) FROM events")
        .parse()
        .unwrap();
    assert_eq!(n as usize, direct.committed.len() * 2);
}

/// Whether `member` answered `step` of the running cutover.
fn answered(target: &Cluster, member: &str, step: &str) -> bool {
    target.psql(
        "postgres",
        &format!(
            "SELECT count(*) FROM pgshift.fleet_ack WHERE member = '{member}' AND step = '{step}'"
        ),
    ) != "0"
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_killed_in_the_drain_and_one_stopped_through_the_switch() {
    let pair = Pair::start();
    let hold = tempfile::tempdir().unwrap();
    let gate_file = hold.path().join("gate");
    let fp = format!("hold:gate:{}", gate_file.display());
    // drain_timeout longer than member_timeout: a member that is gone is
    // left out, not waited for.
    let cutover = "drain_timeout = \"30s\"\ncatchup_timeout = \"120s\"";
    let leader = launch(&pair, "lead", cutover, &[("PGSHIFT_FAILPOINT", &fp)]);
    leader.wait_streaming_async(DB).await;
    let mut killed = launch(&pair, "killed", cutover, &[]);
    let stopped = launch(&pair, "stopped", cutover, &[]);
    killed.wait_up();
    stopped.wait_up();
    wait_members(&leader, 3);

    let wl = Writer::start(&leader.url(DB), "lead").await;
    let wk = Writer::start(&killed.url(DB), "killed").await;
    let ws = Writer::start(&stopped.url(DB), "stopped").await;
    for w in [&wl, &wk, &ws] {
        w.wait_more(5).await;
    }

    // A transaction left open through the member that will die: it cannot
    // drain.
    let open_tx = connect(&killed.url(DB)).await;
    open_tx
        .batch_execute("BEGIN; INSERT INTO ledger (client) VALUES ('never committed')")
        .await
        .unwrap();
    // The cutover holds after closing the gates (test hook on the leader).
    let started = leader.cli_async(&["cutover"]).await;
    assert_eq!(started.status.code(), Some(0), "{}", out_text(&started));
    assert!(
        wait_until(Duration::from_secs(60), || answered(
            &pair.target,
            "stopped",
            "drained"
        )),
        "{}",
        stopped.log()
    );
    assert!(!answered(&pair.target, "killed", "drained"));
    // One member dies in the drain; the other stops (SIGSTOP) until after
    // the switch.
    killed.kill();
    let spid = stopped.pid().unwrap().to_string();
    Command::new("kill")
        .args(["-STOP", &spid])
        .status()
        .unwrap();
    std::fs::write(&gate_file, "").unwrap();

    let last = leader
        .wait_status_async("cutover ended", Duration::from_secs(180), |s| {
            s["last_cutover"]["outcome"]
                .as_str()
                .is_some_and(|o| o != "running")
        })
        .await;
    let last = &last["last_cutover"];
    Command::new("kill")
        .args(["-CONT", &spid])
        .status()
        .unwrap();
    assert_eq!(last["outcome"], "succeeded", "{last:#}\n{}", leader.log());
    let drain = detail(last, "drain");
    assert!(
        drain.contains("killed"),
        "the dead member is named: {drain}"
    );
    assert!(
        leader.log().contains("did not confirm the switch"),
        "{}",
        leader.log()
    );
    // The stopped member, resumed, reads the decision and ends on the target.
    assert!(
        wait_until(Duration::from_secs(60), || route(&stopped) == "target"),
        "{}",
        stopped.log()
    );
    wl.wait_more(5).await;
    // Its writer goes on on the target, or got a clear error; never the source.
    let r_stopped = ws.finish().await;
    let r_killed = wk.finish().await;
    drop(open_tx);
    let r_lead = wl.finish().await;
    assert!(r_lead.errors.is_empty(), "{:?}", r_lead.errors);
    for e in &r_stopped.errors {
        assert!(!e.is_empty());
    }
    check_writes(
        &pair,
        &[
            ("lead".into(), r_lead),
            ("killed".into(), r_killed),
            ("stopped".into(), r_stopped),
        ],
    );
    // The source is fenced; it has nothing the target lacks, and the
    // transaction left open through the dead member never committed.
    assert!(Pair::fenced(&pair.source));
    assert_eq!(
        pair.source.psql(
            DB,
            "SELECT count(*) FROM ledger WHERE client = 'never committed'"
        ),
        "0"
    );

    // A member joining after the switch routes straight to the target.
    let late = launch(&pair, "late", cutover, &[]);
    late.wait_up();
    assert_eq!(route(&late), "target");
    let (_, port) = write_one(&late.url(DB), "late").await.unwrap();
    assert_eq!(port, i32::from(pair.target.port));
}

/// The fleet's tables, notifications and liveness checks on the oldest and
/// newest supported servers (the control schema lives on the target, 15 at
/// the oldest; the source 11 at the oldest): a follower relays the cutover
/// and moves its writer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_cuts_over_on_the_oldest_and_newest_versions() {
    for (from, to) in [(11, 15), (18, 18)] {
        if !version_or_skip(from, "fleet cutover") || !version_or_skip(to, "fleet cutover") {
            continue;
        }
        let major = format!("{from}→{to}");
        let opts = |v| ClusterOptions {
            version: Some(v),
            ..ClusterOptions::default()
        };
        let pair = Pair::start_with(opts(from), opts(to));
        let cutover = "drain_timeout = \"60s\"\ncatchup_timeout = \"120s\"";
        let lead = launch(&pair, "lead", cutover, &[]);
        lead.wait_streaming_async(DB).await;
        let follow = launch(&pair, "follow", cutover, &[]);
        follow.wait_up();
        wait_members(&lead, 2);
        eprintln!("{major}");
        cut_over_through(&pair, &lead, &follow).await;
    }
}

/// A writer through `follower`, a cutover asked of it: the writer goes on
/// on the target without an error, every write exactly once.
async fn cut_over_through(pair: &Pair, leader: &Pgshift, follower: &Pgshift) {
    let w = Writer::start(&follower.url(DB), "follower").await;
    w.wait_more(5).await;
    let out = follower.cli_async(&["cutover", "--wait"]).await;
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}\n{}",
        out_text(&out),
        leader.log()
    );
    assert!(
        wait_until(Duration::from_secs(60), || route(follower) == "target"),
        "{}",
        follower.log()
    );
    w.wait_more(5).await;
    let r = w.finish().await;
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    check_writes(pair, &[("follower".into(), r)]);
}

/// A member alive but not drained in time (a transaction left open through
/// it) aborts the cutover for the whole fleet: every gate reopens on the
/// source, the fence is lifted, clients go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_not_drained_in_time_aborts_for_all() {
    let pair = Pair::start();
    let cutover = "drain_timeout = \"2s\"\ncatchup_timeout = \"120s\"";
    let lead = launch(&pair, "lead", cutover, &[]);
    lead.wait_streaming_async(DB).await;
    let busy = launch(&pair, "busy", cutover, &[]);
    busy.wait_up();
    wait_members(&lead, 2);
    // A second process with the same member_id is refused, naming the key.
    let mut twin = launch(&pair, "busy", cutover, &[]);
    assert_ne!(twin.wait_exit(Duration::from_secs(60)), Some(0));
    assert!(
        twin.log().contains("fleet.member_id `busy` is in use"),
        "{}",
        twin.log()
    );
    let w = Writer::start(&lead.url(DB), "lead").await;
    w.wait_more(5).await;
    let open_tx = connect(&busy.url(DB)).await;
    open_tx
        .batch_execute("BEGIN; INSERT INTO ledger (client) VALUES ('held open')")
        .await
        .unwrap();
    let out = busy.cli_async(&["cutover", "--wait"]).await;
    assert_eq!(out.status.code(), Some(1), "{}", out_text(&out));
    let last = lead.last_cutover_async().await;
    assert_eq!(last["outcome"], "aborted", "{last:#}");
    assert!(
        last["reason"]
            .as_str()
            .unwrap_or("")
            .contains("not drained: busy"),
        "{last:#}"
    );
    // Both gates open on the source; the held transaction commits there.
    assert!(
        wait_until(Duration::from_secs(30), || {
            [&lead, &busy].iter().all(|m| {
                m.status().is_some_and(|s| {
                    s["proxy"]["paused"] == Value::Bool(false) && s["proxy"]["route"] == "source"
                })
            })
        }),
        "{}",
        busy.log()
    );
    open_tx.batch_execute("COMMIT").await.unwrap();
    assert!(!Pair::fenced(&pair.source));
    w.wait_more(5).await;
    let (_, port) = write_one(&busy.url(DB), "after the abort").await.unwrap();
    assert_eq!(port, i32::from(pair.source.port));
    let r = w.finish().await;
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    assert!(
        r.committed
            .iter()
            .all(|c| c.1 == i32::from(pair.source.port))
    );
}

/// A TCP forwarder to a local port that a test can cut (every connection
/// closed, new ones refused) and restore: a member losing its target.
struct Forwarder {
    port: u16,
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
    kill: tokio::sync::watch::Sender<u64>,
}

impl Forwarder {
    async fn start(to: u16) -> Forwarder {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let cut = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let kill = tokio::sync::watch::Sender::new(0u64);
        let (c, k) = (cut.clone(), kill.clone());
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                if c.load(std::sync::atomic::Ordering::SeqCst) {
                    continue;
                }
                let mut rx = k.subscribe();
                tokio::spawn(async move {
                    let Ok(mut server) = tokio::net::TcpStream::connect(("127.0.0.1", to)).await
                    else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = rx.changed() => {}
                    }
                });
            }
        });
        Forwarder { port, cut, kill }
    }

    fn cut(&self) {
        self.cut.store(true, std::sync::atomic::Ordering::SeqCst);
        self.kill.send_modify(|v| *v += 1);
    }

    fn restore(&self) {
        self.cut.store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

/// A member that loses the target during the cutover keeps its gate
/// closed; after `decision_timeout` its clients get a clear error (never a
/// write on the source); once it reaches the target again it reads the
/// decision and serves on the target.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_that_loses_the_target_never_writes_on_the_source() {
    let pair = Pair::start();
    let hold = tempfile::tempdir().unwrap();
    let drained_file = hold.path().join("drained");
    let fp = format!("hold:drain:{}", drained_file.display());
    let cutover = "drain_timeout = \"30s\"\ncatchup_timeout = \"120s\"";
    let lead = launch(&pair, "lead", cutover, &[("PGSHIFT_FAILPOINT", &fp)]);
    lead.wait_streaming_async(DB).await;
    // The straggler reaches the target (control schema and, after the
    // switch, its clients' backends) through a forwarder the test cuts.
    let fwd = Forwarder::start(pair.target.port).await;
    let (proxy_port, admin_port) = (free_port(), free_port());
    let text = config_text(
        &pair.source,
        &pair.target,
        proxy_port,
        admin_port,
        &format!(
            "{}decision_timeout = \"2s\"\n",
            member_extra("straggler", cutover)
        ),
    )
    .replace(
        &format!("127.0.0.1:{}/", pair.target.port),
        &format!("127.0.0.1:{}/", fwd.port),
    );
    let straggler = Pgshift::launch_config(&text, proxy_port, admin_port, &[]);
    straggler.wait_up();
    wait_members(&lead, 2);
    let ws = Writer::start(&straggler.url(DB), "straggler").await;
    ws.wait_more(5).await;

    let started = lead.cli_async(&["cutover"]).await;
    assert_eq!(started.status.code(), Some(0), "{}", out_text(&started));
    // Drained everywhere, the leader holds (test hook); the straggler
    // loses the target, then the leader goes on and switches.
    assert!(
        wait_until(Duration::from_secs(60), || answered(
            &pair.target,
            "straggler",
            "drained"
        )),
        "{}",
        straggler.log()
    );
    fwd.cut();
    std::fs::write(&drained_file, "").unwrap();
    let last = lead
        .wait_status_async("cutover ended", Duration::from_secs(180), |s| {
            s["last_cutover"]["outcome"]
                .as_str()
                .is_some_and(|o| o != "running")
        })
        .await;
    assert_eq!(
        last["last_cutover"]["outcome"], "succeeded",
        "{:#}",
        last["last_cutover"]
    );
    // The straggler's client got the clear error, not a write on the source.
    let r = ws.finish().await;
    assert!(
        r.errors.iter().any(|e| e.contains("lost contact")),
        "{:?}\n{}",
        r.errors,
        straggler.log()
    );
    assert!(
        r.committed
            .iter()
            .all(|c| c.1 == i32::from(pair.source.port)),
        "{:?}",
        r.committed
    );
    check_writes(&pair, &[("straggler".into(), r)]);
    // Back in touch, it reads the decision and serves on the target.
    fwd.restore();
    assert!(
        wait_until(Duration::from_secs(60), || route(&straggler) == "target"
            && straggler
                .status()
                .is_some_and(|s| s["proxy"]["paused"] == Value::Bool(false))),
        "{}",
        straggler.log()
    );
    let (_, port) = write_one(&straggler.url(DB), "after").await.unwrap();
    assert_eq!(port, i32::from(pair.target.port));
}

/// Roles: a replication-only member leads and serves no clients; a
/// proxy-only member serves and never leads. With the replication member
/// gone, nothing leads and a command to the proxy member says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replication_member_leads_and_proxy_members_serve() {
    let pair = Pair::start();
    let cutover = "drain_timeout = \"60s\"\ncatchup_timeout = \"120s\"";
    let with_role = |id: &str, role: &str| {
        Pgshift::launch(
            &pair.source,
            &pair.target,
            &format!("{}role = \"{role}\"\n", member_extra(id, cutover)),
            &[],
        )
    };
    let mut repl = with_role("repl", "replication");
    repl.wait_streaming_async(DB).await;
    assert!(is_leader(&repl));
    // No proxy on the replication member.
    assert!(std::net::TcpStream::connect(("127.0.0.1", repl.proxy_port)).is_err());
    let proxy = with_role("proxy", "proxy");
    proxy.wait_up();
    wait_members(&repl, 2);
    cut_over_through(&pair, &repl, &proxy).await;
    // The replication member goes; the proxy member never leads.
    repl.kill();
    wait_members(&proxy, 1);
    assert!(!is_leader(&proxy));
    let out = proxy.cli_async(&["cancel"]).await;
    assert!(
        out_text(&out).contains("no member of the fleet leads"),
        "{}",
        out_text(&out)
    );
}
