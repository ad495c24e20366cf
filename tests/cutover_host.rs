//! The cutover protocol (`cutover::protocol::run`) against an in-memory
//! `CutoverHost`: no proxy and no streams, but the real source (fence) and
//! target (control store). The fake records every call and injects one
//! failure per case, so each abort path is checked beside the real-process
//! tests (tests/cutover_abort.rs): the gate reopens, a fence that went up
//! comes down, the route is not switched (or switched and finished), and
//! the outcome is reported and persisted.

mod common;

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::*;
use pgshift::config::CutoverVerify;
use pgshift::cutover::protocol::{self, CutoverHost, CutoverMetrics, HostError, LastCutover};
use pgshift::migration::{Migration, State, Substate};

/// The one failure a case injects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    None,
    StreamUnhealthyAtStart,
    PrepareFails,
    StreamBreaksDuringCatchup,
    DrainTimeout,
    DrainTimeoutAfterCancel,
    /// The cutover's connection to the source dies as the fence goes up.
    FenceFails,
    MarkerEmitFails,
    MarkerTimeout,
    StreamBreaksDuringMarker,
    SequencesFail,
    VerifyFails,
    GuardLiftFails,
    CleanupFails,
}

/// The error an injected failure returns (one place to change if the
/// trait's errors become typed).
fn injected(what: &str) -> HostError {
    HostError::Failed(format!("injected: {what}"))
}

struct FakeHost {
    fault: Fault,
    calls: Mutex<Vec<&'static str>>,
    healthy: AtomicBool,
    gate_closed: AtomicBool,
    on_target: AtomicBool,
    /// The fence was seen up (the app role could not log in) while the
    /// marker was awaited.
    fence_seen_up: AtomicBool,
    /// Superuser connection to the source's `postgres` database.
    probe: tokio_postgres::Client,
}

impl FakeHost {
    fn new(fault: Fault, probe: tokio_postgres::Client) -> FakeHost {
        FakeHost {
            fault,
            calls: Mutex::new(Vec::new()),
            healthy: AtomicBool::new(fault != Fault::StreamUnhealthyAtStart),
            gate_closed: AtomicBool::new(false),
            on_target: AtomicBool::new(false),
            fence_seen_up: AtomicBool::new(false),
            probe,
        }
    }

    fn call(&self, name: &'static str) {
        self.calls.lock().unwrap().push(name);
    }

    fn calls(&self) -> Vec<&'static str> {
        self.calls.lock().unwrap().clone()
    }

    fn called(&self, name: &str) -> bool {
        self.calls().contains(&name)
    }

    /// Position of the last call `name`.
    fn last(&self, name: &str) -> Option<usize> {
        self.calls().iter().rposition(|c| *c == name)
    }

    fn fails(&self, fault: Fault) -> bool {
        self.fault == fault
    }

    fn break_stream(&self) {
        self.healthy.store(false, Ordering::SeqCst);
    }

    /// Runs a query on the probe connection from a sync trait method.
    fn probe_blocking(&self, sql: &str) {
        tokio::task::block_in_place(|| {
            tokio::runtime::Handle::current().block_on(self.probe.batch_execute(sql))
        })
        .expect("probe query");
    }
}

impl CutoverHost for FakeHost {
    async fn prepare(&self) -> Result<(), HostError> {
        self.call("prepare");
        if self.fails(Fault::PrepareFails) {
            return Err(injected("cannot connect to the target"));
        }
        Ok(())
    }

    async fn prewarm(&self) -> usize {
        self.call("prewarm");
        3
    }

    fn discard_prewarm(&self) {
        self.call("discard_prewarm");
    }

    async fn close_gate(&self) {
        self.call("close_gate");
        self.gate_closed.store(true, Ordering::SeqCst);
    }

    fn open_gate(&self) {
        self.call("open_gate");
        self.gate_closed.store(false, Ordering::SeqCst);
    }

    fn in_transaction(&self) -> usize {
        self.call("in_transaction");
        match self.fault {
            Fault::DrainTimeout | Fault::DrainTimeoutAfterCancel => 2,
            _ => 0,
        }
    }

    async fn wait_idle(&self, _timeout: Duration) -> bool {
        self.call("wait_idle");
        !matches!(
            self.fault,
            Fault::DrainTimeout | Fault::DrainTimeoutAfterCancel
        )
    }

    async fn wait_quiet(&self, _timeout: Duration) -> bool {
        self.call("wait_quiet");
        true
    }

    async fn cancel_in_transaction(&self) -> usize {
        self.call("cancel_in_transaction");
        2
    }

    async fn terminate_in_transaction(&self) -> usize {
        self.call("terminate_in_transaction");
        2
    }

    fn source_backend_pids(&self) -> Vec<i32> {
        self.call("source_backend_pids");
        // The call right before the fence goes up (the gate is closed, no
        // marker awaited yet): the cutover's own connection to the source
        // dies, so fencing fails and so does the first lift on it.
        let calls = self.calls();
        if self.fails(Fault::FenceFails)
            && self.gate_closed.load(Ordering::SeqCst)
            && !calls.contains(&"sync_sequences")
            && calls
                .iter()
                .filter(|c| **c == "source_backend_pids")
                .count()
                == 2
        {
            self.probe_blocking(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                  WHERE application_name LIKE 'pgshift%' AND pid <> pg_backend_pid()",
            );
        }
        vec![]
    }

    async fn emit_markers(&self, id: &str) -> Result<(), HostError> {
        self.call("emit_markers");
        if !self.healthy.load(Ordering::SeqCst) {
            return Err(injected("a stream is not healthy"));
        }
        if !id.contains("-catchup") && self.fails(Fault::MarkerEmitFails) {
            return Err(injected("cannot emit the marker"));
        }
        Ok(())
    }

    async fn wait_markers(&self, id: &str, _timeout: Duration) -> Result<(), HostError> {
        self.call("wait_markers");
        let catchup = id.contains("-catchup");
        if catchup && self.fails(Fault::StreamBreaksDuringCatchup) {
            self.break_stream();
            return Err(injected("the stream of app broke"));
        }
        if catchup {
            return Ok(());
        }
        let row = self
            .probe
            .query_one(
                "SELECT rolcanlogin FROM pg_roles WHERE rolname = $1",
                &[&APP_USER],
            )
            .await
            .expect("probe");
        self.fence_seen_up
            .store(!row.get::<_, bool>(0), Ordering::SeqCst);
        match self.fault {
            Fault::MarkerTimeout => Err(injected("marker not applied within catchup_timeout")),
            Fault::StreamBreaksDuringMarker => {
                self.break_stream();
                Err(injected("the stream of app broke"))
            }
            _ => Ok(()),
        }
    }

    async fn stream_health(&self) -> Result<(), HostError> {
        self.call("stream_health");
        if self.healthy.load(Ordering::SeqCst) {
            Ok(())
        } else {
            Err(injected("the stream of app is reconnecting"))
        }
    }

    async fn sync_sequences(&self) -> Result<u64, HostError> {
        self.call("sync_sequences");
        if self.fails(Fault::SequencesFail) {
            return Err(injected("cannot read the source's sequences"));
        }
        Ok(4)
    }

    async fn verify(&self, _mode: CutoverVerify) -> Result<String, HostError> {
        self.call("verify");
        if self.fails(Fault::VerifyFails) {
            return Err(injected("public.t: 10 rows on the source, 9 on the target"));
        }
        Ok("1 table(s) match".into())
    }

    async fn lift_target_guard(&self) -> Result<(), HostError> {
        self.call("lift_target_guard");
        if self.fails(Fault::GuardLiftFails) {
            return Err(injected("permission denied to alter role"));
        }
        Ok(())
    }

    async fn rearm_target_guard(&self) {
        self.call("rearm_target_guard");
    }

    async fn switch_to_target(&self) -> (u64, u64) {
        self.call("switch_to_target");
        self.on_target.store(true, Ordering::SeqCst);
        self.gate_closed.store(false, Ordering::SeqCst);
        (3, 0)
    }

    async fn finish_replication(&self, _drop_slot: bool) -> Result<(), HostError> {
        self.call("finish_replication");
        if self.fails(Fault::CleanupFails) {
            return Err(injected("cannot drop the slot"));
        }
        Ok(())
    }
}

/// What a case must end with.
struct Case {
    fault: Fault,
    /// Extra `[cutover]` settings.
    cutover: &'static str,
    outcome: &'static str,
    /// Part of the reported reason (aborts).
    reason: &'static str,
    /// The phase that failed and its outcome in the report.
    failed_phase: Option<(&'static str, &'static str)>,
    /// The gate was closed during the attempt.
    paused: bool,
    /// The fence went up (and was seen up while the marker was awaited).
    fenced: bool,
    state: (State, Substate),
}

const READY: (State, Substate) = (
    State::WaitingForUserAction,
    Substate::WaitingForCutoverTrigger,
);
const STREAMING: (State, Substate) = (State::InProgress, Substate::MigratingData);
const DONE: (State, Substate) = (State::Succeeded, Substate::Completed);

fn cases() -> Vec<Case> {
    let abort = |fault, reason, failed_phase, paused, fenced, state| Case {
        fault,
        cutover: "",
        outcome: "aborted",
        reason,
        failed_phase,
        paused,
        fenced,
        state,
    };
    vec![
        abort(
            Fault::StreamUnhealthyAtStart,
            "replication is not healthy",
            None,
            false,
            false,
            STREAMING,
        ),
        abort(
            Fault::PrepareFails,
            "cannot prepare the cutover",
            Some(("prepare", "failed")),
            false,
            false,
            READY,
        ),
        abort(
            Fault::StreamBreaksDuringCatchup,
            "replication is not healthy",
            Some(("catchup", "failed")),
            false,
            false,
            STREAMING,
        ),
        abort(
            Fault::DrainTimeout,
            "still inside a transaction after drain_timeout",
            Some(("drain", "timeout")),
            true,
            false,
            READY,
        ),
        Case {
            cutover: "on_drain_timeout = \"cancel\"\n",
            ..abort(
                Fault::DrainTimeoutAfterCancel,
                "still inside a transaction after cancel",
                Some(("drain", "timeout")),
                true,
                false,
                READY,
            )
        },
        abort(
            Fault::FenceFails,
            "fencing the source",
            Some(("fence", "failed")),
            true,
            false,
            READY,
        ),
        abort(
            Fault::MarkerEmitFails,
            "cannot emit the marker",
            Some(("marker", "timeout")),
            true,
            false,
            READY,
        ),
        abort(
            Fault::MarkerTimeout,
            "target did not catch up",
            Some(("marker", "timeout")),
            true,
            true,
            READY,
        ),
        abort(
            Fault::StreamBreaksDuringMarker,
            "target did not catch up",
            Some(("marker", "timeout")),
            true,
            true,
            STREAMING,
        ),
        abort(
            Fault::SequencesFail,
            "sequence sync failed",
            Some(("sequences", "failed")),
            true,
            true,
            READY,
        ),
        Case {
            cutover: "verify = \"counts\"\n",
            ..abort(
                Fault::VerifyFails,
                "verification found differences",
                Some(("verify", "failed")),
                true,
                true,
                READY,
            )
        },
        abort(
            Fault::GuardLiftFails,
            "cannot lift the target's guard",
            None,
            true,
            true,
            READY,
        ),
        Case {
            fault: Fault::CleanupFails,
            cutover: "",
            outcome: "succeeded",
            reason: "",
            failed_phase: Some(("cleanup", "failed")),
            paused: true,
            fenced: true,
            state: DONE,
        },
        Case {
            fault: Fault::None,
            cutover: "",
            outcome: "succeeded",
            reason: "",
            failed_phase: None,
            paused: true,
            fenced: true,
            state: DONE,
        },
    ]
}

/// Who can log in on the source, and the per-database settings: what the
/// fence changes and a lift must restore.
async fn fence_state(c: &tokio_postgres::Client) -> Vec<String> {
    c.query(
        "SELECT rolname || ' ' || rolcanlogin FROM pg_roles
         UNION ALL
         SELECT coalesce(d.datname, '-') || ' ' || s.setconfig::text
           FROM pg_db_role_setting s LEFT JOIN pg_database d ON d.oid = s.setdatabase
         ORDER BY 1",
        &[],
    )
    .await
    .expect("read the fence's state")
    .iter()
    .map(|r| r.get(0))
    .collect()
}

async fn run_case(source: &Cluster, target: &Cluster, i: usize, case: &Case) {
    let what = format!("case {:?}", case.fault);
    let extra = format!(
        "[migration]\nname = \"host-{i}\"\ndatabases = [\"app\"]\n\n[cutover]\n{}",
        case.cutover
    );
    let config = config_for(source, target, &extra);
    let cfg = config.migration().unwrap().clone();
    let ctx = pgshift::Context::new(config);
    let migration = Migration::open(&ctx, &cfg).await.unwrap();
    migration
        .transition(
            State::WaitingForUserAction,
            Substate::WaitingForCutoverTrigger,
            None,
        )
        .await
        .unwrap();
    let probe = source.client("postgres").await;
    let before = fence_state(&probe).await;
    let host = FakeHost::new(case.fault, probe);
    let metrics = CutoverMetrics::new(&ctx.registry);
    let last = LastCutover::default();

    let report = protocol::run(
        &ctx,
        migration.as_ref(),
        &host,
        &metrics,
        &last,
        format!("c{i}"),
    )
    .await;

    let calls = host.calls();
    let phase = |name: &str| report.phases.iter().find(|p| p.phase == name);
    assert_eq!(report.outcome.as_str(), case.outcome, "{what}: {report:?}");
    let reason = report.reason.clone().unwrap_or_default();
    assert!(reason.contains(case.reason), "{what}: reason {reason:?}");
    if let Some((name, outcome)) = case.failed_phase {
        let p = phase(name).unwrap_or_else(|| panic!("{what}: no phase {name}: {report:?}"));
        assert_eq!(p.outcome.as_str(), outcome, "{what}: {p:?}");
        assert!(
            p.detail.as_deref().unwrap_or("").contains("injected")
                || case.fault == Fault::FenceFails
                || case.fault == Fault::DrainTimeout
                || case.fault == Fault::DrainTimeoutAfterCancel,
            "{what}: {p:?}"
        );
    }
    assert_eq!(last.get().map(|r| r.outcome), Some(report.outcome));

    // The gate: closed only when the case reaches it, and open at the end,
    // reopened on the source (abort) or by the switch (success).
    assert_eq!(host.called("close_gate"), case.paused, "{what}: {calls:?}");
    assert!(
        !host.gate_closed.load(Ordering::SeqCst),
        "{what}: gate left closed: {calls:?}"
    );
    assert_eq!(
        report.pause_seconds.is_some(),
        case.paused,
        "{what}: {report:?}"
    );

    // The fence: seen up while the marker was awaited when it went up, and
    // on the source everything is as before once an abort is over.
    assert_eq!(
        host.fence_seen_up.load(Ordering::SeqCst),
        case.fenced,
        "{what}"
    );
    let check = source.client("postgres").await;
    if case.outcome == "aborted" {
        assert_eq!(
            fence_state(&check).await,
            before,
            "{what}: the fence was not lifted exactly"
        );
        if case.fault == Fault::FenceFails {
            let abort = phase("abort").unwrap_or_else(|| panic!("{what}: {report:?}"));
            let detail = abort.detail.as_deref().unwrap_or("");
            assert!(
                detail.contains("fence lifted on a new connection"),
                "{what}: {detail}"
            );
        }
    }

    // The route and the migration's state.
    let persisted = migration.control().load().await.unwrap().unwrap();
    assert_eq!(
        migration.state(),
        case.state,
        "{what}: {:?}",
        migration.row()
    );
    assert_eq!((persisted.state, persisted.substate), case.state, "{what}");
    let attempt = migration
        .control()
        .last_cutover_attempt()
        .await
        .unwrap()
        .unwrap_or_else(|| panic!("{what}: the attempt was not recorded"));
    assert_eq!(attempt["outcome"], case.outcome, "{what}: {attempt}");
    if case.outcome == "succeeded" {
        assert!(host.on_target.load(Ordering::SeqCst), "{what}");
        assert!(migration.switched() && persisted.switched, "{what}");
        assert!(
            host.last("switch_to_target") < host.last("finish_replication"),
            "{what}: {calls:?}"
        );
        assert!(
            !host.called("open_gate") && !host.called("discard_prewarm"),
            "{what}: {calls:?}"
        );
        assert_eq!((report.sessions_moved, report.sessions_dropped), (3, 0));
        // The source stays fenced after a switch: undo it for the next case.
        let roles: Vec<String> = before
            .iter()
            .filter_map(|l| l.strip_suffix(" true"))
            .map(String::from)
            .collect();
        for r in roles {
            check
                .batch_execute(&format!("ALTER ROLE \"{r}\" LOGIN"))
                .await
                .unwrap();
        }
        check
            .batch_execute("ALTER DATABASE app RESET default_transaction_read_only")
            .await
            .unwrap();
    } else {
        assert!(
            !host.on_target.load(Ordering::SeqCst),
            "{what}: switched on abort"
        );
        assert!(!host.called("switch_to_target"), "{what}: {calls:?}");
        assert!(!host.called("finish_replication"), "{what}: {calls:?}");
        assert!(!migration.switched() && !persisted.switched, "{what}");
        if case.paused {
            assert!(
                host.last("open_gate") > host.last("close_gate"),
                "{what}: {calls:?}"
            );
        }
        if host.called("prewarm") {
            assert!(host.called("discard_prewarm"), "{what}: {calls:?}");
        }
        if host.called("lift_target_guard") {
            assert!(
                host.last("rearm_target_guard") > host.last("lift_target_guard"),
                "{what}: the target's guard was not put back: {calls:?}"
            );
        }
    }
    match case.fault {
        Fault::StreamUnhealthyAtStart => {
            assert_eq!(calls, vec!["stream_health", "stream_health"], "{what}")
        }
        Fault::DrainTimeoutAfterCancel => {
            assert!(
                host.called("cancel_in_transaction") && host.called("terminate_in_transaction"),
                "{what}: {calls:?}"
            )
        }
        _ => {}
    }
    assert_eq!(fence_state(&check).await.len(), before.len());
}

/// Every abort path of the protocol, one injected failure at a time, then
/// a switch whose cleanup fails and a clean one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_abort_path_reopens_the_gate_lifts_the_fence_and_keeps_the_route() {
    let source = Cluster::start();
    let target = Cluster::start();
    source.create_db("app");
    for (i, case) in cases().iter().enumerate() {
        run_case(&source, &target, i, case).await;
    }
}
