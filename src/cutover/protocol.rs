//! The cutover protocol (DESIGN.md "Cutover", issue 5):
//! 0 prepare (connections) and prewarm (target backends opened while clients
//! run) → 1 gate → 2 drain → 3 fence → 4 marker → 5 sequences and fence
//! check (while the marker travels) → 6 verify →
//! 7 point of no return (lift the target's guard, persist "switched", swap
//! route, move sessions, open the gate) → finish (stop streaming, drop slot and publication).
//! Every phase is timed, logged and exported; any failure or timeout before 7
//! reopens the gate on the source and lifts the fence: clients saw a pause.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus::{Gauge, GaugeVec, IntCounter, IntCounterVec};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::fence::{self, FenceRecord};
use crate::config::{CutoverConfig, CutoverVerify, OnDrainTimeout};
use crate::context::Context;
use crate::telemetry::status::Report;

/// Why a [`CutoverHost`] step failed: typed, so the protocol (and whatever
/// drives a cutover) can tell a broken stream from a failed statement.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// `prepare` did not run (or failed): there are no cutover connections.
    #[error("the cutover was not prepared")]
    NotPrepared,
    /// No database has a stream.
    #[error("no database is streaming")]
    NoStreams,
    /// A stream is not connected and applying.
    #[error("{0}")]
    Unhealthy(#[from] crate::replication::stream::Unhealthy),
    /// A marker was not emitted, or not seen committed on the target.
    #[error("{0}")]
    Marker(#[from] crate::replication::stream::CatchUpError),
    /// The marker connection to a source database failed.
    #[error("database {database}: {source}")]
    MarkerConnection {
        database: String,
        source: crate::replication::client::ReplicationError,
    },
    /// A connection the cutover needs failed.
    #[error("{0}")]
    Connect(#[from] crate::db::DbError),
    /// The target cannot take every session that would move to it.
    #[error(
        "the target accepts {} but {sessions} client session(s) and {own} of pgshift's move to it at the switch; \
         make room: ALTER SYSTEM SET max_connections = {}; then restart the target server",
        .slots.describe(), .slots.max_connections_for(*.sessions + *.own)
    )]
    NoRoom {
        slots: crate::pg::activity::Slots,
        sessions: i32,
        own: i32,
    },
    /// A statement on a database failed.
    #[error("database {database}: {what}: {}", crate::db::describe(.source))]
    Sql {
        database: String,
        what: &'static str,
        source: tokio_postgres::Error,
    },
    /// Reading or writing sequences failed.
    #[error("database {database}: {source}")]
    Sequences {
        database: String,
        source: crate::schema::SchemaError,
    },
    /// Verification could not run.
    #[error("{0}")]
    Verify(#[from] crate::verify::VerifyError),
    /// Verification ran and these tables differ.
    #[error("{}", .tables.join(", "))]
    Mismatch { tables: Vec<String> },
    /// Arming or lifting the target's guard failed.
    #[error("database {database}: {source}")]
    Guard {
        database: String,
        source: super::guard::GuardError,
    },
    /// Cleanup after the switch left these things undone.
    #[error("{}", .0.join("; "))]
    Cleanup(Vec<String>),
    /// A step failed for a reason without a type of its own (e.g. a host
    /// other than the runner).
    #[error("{0}")]
    Failed(String),
    /// Several databases failed the step, each for its own reason.
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Several(Vec<HostError>),
}

impl HostError {
    /// Ok when every result is; the one error, or all of them.
    pub fn join<T>(
        results: impl IntoIterator<Item = Result<T, HostError>>,
    ) -> Result<(), HostError> {
        let mut errors: Vec<HostError> = results.into_iter().filter_map(Result::err).collect();
        match errors.len() {
            0 => Ok(()),
            1 => Err(errors.remove(0)),
            _ => Err(HostError::Several(errors)),
        }
    }
}

/// What the cutover needs from the rest of pgshift. Implemented by the
/// runner over the proxy handle and the per-database streams.
pub trait CutoverHost: Send + Sync {
    /// Before the gate closes (not part of the pause): opens every connection
    /// the cutover will need, so the pause pays no connection set-up.
    fn prepare(&self) -> impl Future<Output = Result<(), HostError>> + Send;
    /// Before the gate closes (not part of the pause): opens a backend on the
    /// target for every session, so moving it pays only for its state.
    /// Returns how many are ready.
    fn prewarm(&self) -> impl Future<Output = usize> + Send;
    /// The switch will not happen: closes the pre-warmed backends.
    fn discard_prewarm(&self);
    /// Holds every session's next transaction (idle ones at their next
    /// request); other proxies taking part are told first.
    fn close_gate(&self) -> impl Future<Output = ()> + Send;
    /// Releases held sessions on whatever the route points at.
    fn open_gate(&self);
    /// Sessions still inside a transaction.
    fn in_transaction(&self) -> usize;
    /// Resolves true when no session is inside a transaction, false on timeout.
    fn wait_idle(&self, timeout: Duration) -> impl Future<Output = bool> + Send;
    /// Resolves true when, moreover, no session is staging its move (reading
    /// its state from the source): the moment to close the gate. False on
    /// timeout.
    fn wait_quiet(&self, timeout: Duration) -> impl Future<Output = bool> + Send;
    /// What the drain phase reports besides its outcome (e.g. the fleet
    /// members drained, or those that were not).
    fn drain_note(&self) -> Option<String> {
        None
    }
    /// Cancels the running query of every session inside a transaction.
    fn cancel_in_transaction(&self) -> impl Future<Output = usize> + Send;
    /// Closes every session still inside a transaction (with an ErrorResponse).
    fn terminate_in_transaction(&self) -> impl Future<Output = usize> + Send;
    /// Source backend pids of the proxy's sessions: spared by the fence.
    fn source_backend_pids(&self) -> Vec<i32>;
    /// Emits the marker `id` on every source database (refused while a
    /// stream is not healthy).
    fn emit_markers(&self, id: &str) -> impl Future<Output = Result<(), HostError>> + Send;
    /// Waits until apply has committed the marker `id` on the target in
    /// every database, at most `timeout`; ends at once when a stream breaks.
    fn wait_markers(
        &self,
        id: &str,
        timeout: Duration,
    ) -> impl Future<Output = Result<(), HostError>> + Send;
    /// Ok when every database's stream is connected and applying;
    /// otherwise why not.
    fn stream_health(&self) -> impl Future<Output = Result<(), HostError>> + Send;
    /// Copies every sequence's last_value / is_called to the target; returns
    /// how many. Runs after the fence, while the marker is awaited. The
    /// target's writes need not be flushed here: the switch persists its
    /// state synchronously on the same target server afterwards, which
    /// flushes the WAL through them before any client runs there.
    fn sync_sequences(&self) -> impl Future<Output = Result<u64, HostError>> + Send;
    /// Compares source and target while both are still.
    fn verify(&self, mode: CutoverVerify)
    -> impl Future<Output = Result<String, HostError>> + Send;
    /// The attempt did not switch: lets go of what it prepared beside the
    /// runbook (e.g. reverse slots, snapshots). Runs before the migration's
    /// state says it is ready again.
    fn abandon(&self) -> impl Future<Output = ()> + Send {
        async {}
    }
    /// After the catch-up, before the gate closes (not part of the pause):
    /// whatever the switch needs that was prepared in the background is
    /// ready (e.g. reverse replication's slots, which wait for the
    /// transactions open on the target); an error ends the attempt before
    /// any client waits. Some(detail) to report, None: nothing to do.
    fn before_gate(&self) -> impl Future<Output = Result<Option<String>, HostError>> + Send {
        async { Ok(None) }
    }
    /// Inside the pause, once nothing more commits on the side left and the
    /// other holds everything: snapshots of both, for a verification after
    /// the gate opens. Some(detail) when taken, None when not configured.
    fn hold_snapshots(&self) -> impl Future<Output = Result<Option<String>, HostError>> + Send {
        async { Ok(None) }
    }
    /// Inside the pause, just before the switch: lets application roles
    /// write on the target's migrated databases ([`super::guard`]), so the
    /// sessions write as soon as they move.
    fn lift_target_guard(&self) -> impl Future<Output = Result<(), HostError>> + Send;
    /// The switch did not happen after all: guards the target again.
    fn rearm_target_guard(&self) -> impl Future<Output = ()> + Send;
    /// Swaps the route to the target, moves idle sessions, opens the gate.
    /// Returns (sessions moved, sessions dropped).
    fn switch_to_target(&self) -> impl Future<Output = (u64, u64)> + Send;
    /// After the gate opened: other proxies taking part (a fleet's
    /// members) confirm their own switch; returns their (moved, dropped)
    /// sessions and a note for the report, or None when there are none.
    fn confirm_switch(&self) -> impl Future<Output = Option<(u64, u64, String)>> + Send {
        async { None }
    }
    /// After the switch: stops streaming and releases the source's slot and
    /// publication (when configured).
    fn finish_replication(
        &self,
        drop_slot: bool,
    ) -> impl Future<Output = Result<(), HostError>> + Send;
}

/// A ledger step failed (the migration's control store, for the runner).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct LedgerError(pub Box<dyn std::error::Error + Send + Sync>);

/// Where the migration goes once an attempt has ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AfterAttempt {
    /// Clients run on the target: the migration has succeeded.
    Succeeded,
    /// The attempt ended and replication is not healthy: back to streaming
    /// until it is (the reason says why).
    WaitingForReplication(String),
    /// The attempt ended; another may be triggered (with why this one ended).
    WaitingForTrigger(Option<String>),
}

/// Where attempts are recorded and how the migration's state follows them.
/// The protocol decides; the ledger persists (implemented by
/// `migration::Migration` over the control store on the target), so the
/// cutover never imports the migration that runs it.
pub trait CutoverLedger: Send + Sync {
    /// The migrated databases (the fence covers them).
    fn databases(&self) -> Vec<String>;
    /// The attempt begins: the migration is completing.
    fn begin(&self) -> impl Future<Output = Result<(), LedgerError>> + Send;
    /// Saves the attempt's report (`doc`: the report, with `fence` while a
    /// fence may be up), so a restarted pgshift knows what to undo.
    fn save_attempt(
        &self,
        id: &str,
        outcome: Outcome,
        reason: Option<&str>,
        doc: &Value,
    ) -> impl Future<Output = Result<(), LedgerError>> + Send;
    /// The point of no return, persisted (synchronously) before any session
    /// moves: a restart never comes back on the side left. `fence` is what
    /// the attempt put up on that side (a rollback lifts it).
    fn mark_switched(
        &self,
        fence: &FenceRecord,
    ) -> impl Future<Output = Result<(), LedgerError>> + Send;
    /// Moves the migration to where it goes after the attempt.
    fn end(&self, next: AfterAttempt) -> impl Future<Output = Result<(), LedgerError>> + Send;
}

/// How an attempt ended (or that it is still running).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Running,
    /// Past the point of no return: clients run on the target.
    Succeeded,
    /// Stopped before the point of no return; everything was undone.
    Aborted,
    /// Could not start (the migration's state could not be persisted).
    Failed,
    /// pgshift stopped inside the attempt, before the switch; the next
    /// start undid it (recorded by the runner, not by [`run`]).
    Interrupted,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Running => "running",
            Outcome::Succeeded => "succeeded",
            Outcome::Aborted => "aborted",
            Outcome::Failed => "failed",
            Outcome::Interrupted => "interrupted",
        }
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which way an attempt moves the clients: the cutover (source → target)
/// or a rollback (target → source, after a cutover). The runbook is the
/// same; the side fenced is the one the clients leave.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    Cutover,
    Rollback,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Cutover => "cutover",
            Direction::Rollback => "rollback",
        }
    }
}

/// How one phase ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PhaseOutcome {
    Ok,
    Failed,
    /// The phase's bound ran out (drain, marker).
    Timeout,
}

impl PhaseOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            PhaseOutcome::Ok => "ok",
            PhaseOutcome::Failed => "failed",
            PhaseOutcome::Timeout => "timeout",
        }
    }
}

/// Why a step of the attempt (other than a host step) failed.
#[derive(Debug, thiserror::Error)]
enum StepError {
    #[error("{0}")]
    Host(#[from] HostError),
    #[error("{0}")]
    Fence(#[from] fence::FenceError),
    #[error("cannot persist the fence record: {0}")]
    PersistFence(LedgerError),
    #[error("cannot lift the target's guard: {0}")]
    Guard(HostError),
    #[error("cannot persist the switch: {0}")]
    PersistSwitch(LedgerError),
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PhaseReport {
    pub phase: String,
    /// When the phase began (RFC 3339, microseconds): lines the phases up
    /// with what clients saw, as some overlap (sequences during the marker).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<String>,
    pub seconds: f64,
    pub outcome: PhaseOutcome,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CutoverReport {
    pub id: String,
    pub started_at: String,
    pub outcome: Outcome,
    pub reason: Option<String>,
    pub phases: Vec<PhaseReport>,
    /// Gate closed → gate opened, as clients experienced it.
    pub pause_seconds: Option<f64>,
    pub sessions_moved: u64,
    pub sessions_dropped: u64,
}

/// The cutover's metrics.
#[derive(Clone)]
pub struct CutoverMetrics {
    pub phase_seconds: GaugeVec,
    pub pause_seconds: Gauge,
    pub attempts: IntCounterVec,
    pub moved: IntCounter,
    pub dropped: IntCounter,
}

impl CutoverMetrics {
    pub fn new(reg: &prometheus::Registry) -> CutoverMetrics {
        CutoverMetrics::for_direction(reg, Direction::Cutover)
    }

    /// `pgshift_cutover_…` or `pgshift_rollback_…`.
    pub fn for_direction(reg: &prometheus::Registry, d: Direction) -> CutoverMetrics {
        use crate::telemetry::metrics as m;
        let (kind, to) = match d {
            Direction::Cutover => ("cutover", "the target"),
            Direction::Rollback => ("rollback", "the source"),
        };
        let name = |suffix: &str| format!("pgshift_{kind}_{suffix}");
        CutoverMetrics {
            phase_seconds: m::gauge_vec(
                reg,
                &name("phase_seconds"),
                &format!("Duration of each phase of the last {kind} attempt, in seconds"),
                &["phase"],
            ),
            pause_seconds: m::gauge(
                reg,
                &name("pause_seconds"),
                &format!(
                    "Write pause of the last {kind} attempt (gate closed to gate opened), in seconds"
                ),
            ),
            attempts: m::int_counter_vec(
                reg,
                &name("attempts_total"),
                &format!("{kind} attempts by outcome (succeeded, aborted, failed)"),
                &["outcome"],
            ),
            moved: m::int_counter(
                reg,
                &name("sessions_moved_total"),
                &format!("Client sessions moved to {to} at {kind}"),
            ),
            dropped: m::int_counter(
                reg,
                &name("sessions_dropped_total"),
                "Client sessions that could not move (temporary tables or functions, WITH HOLD cursors, session advisory locks) and were closed",
            ),
        }
    }
}

/// The last attempt's live report, shown in /status as `last_cutover`.
#[derive(Clone, Default)]
pub struct LastCutover(pub Arc<Mutex<Option<CutoverReport>>>);

impl LastCutover {
    pub fn set(&self, r: CutoverReport) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(r);
    }
    pub fn get(&self) -> Option<CutoverReport> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl Report for LastCutover {
    fn report(&self) -> Value {
        serde_json::to_value(self.get()).unwrap_or(Value::Null)
    }
}

/// Test hooks (read once; unset in production, where they do nothing):
/// - `PGSHIFT_FAILPOINT=after:<phase>` makes every cutover attempt stop for
///   an hour right after that phase (prepare, prewarm, catchup, gate, drain,
///   fence, marker, sequences, verify, switch), so a crash test can kill
///   pgshift inside it;
/// - `PGSHIFT_FAILPOINT=hold:<phase>:<file>` holds the attempt after that
///   phase until `<file>` exists, so a test can change the world between two
///   phases (e.g. block apply once the pre-gate catch-up is done).
#[derive(Debug)]
enum Failpoint {
    Stop(String),
    Hold(String, std::path::PathBuf),
}

fn failpoint() -> Option<&'static Failpoint> {
    static FAILPOINT: std::sync::OnceLock<Option<Failpoint>> = std::sync::OnceLock::new();
    FAILPOINT
        .get_or_init(|| {
            let v = std::env::var("PGSHIFT_FAILPOINT").ok()?;
            if let Some(phase) = v.strip_prefix("after:") {
                return Some(Failpoint::Stop(phase.to_string()));
            }
            let (phase, file) = v.strip_prefix("hold:")?.split_once(':')?;
            Some(Failpoint::Hold(phase.to_string(), file.into()))
        })
        .as_ref()
}

/// How long the gate waits for a moment with no transaction in flight.
const QUIET_WAIT: Duration = Duration::from_millis(50);

/// A catch-up round this short leaves a backlog the pause absorbs in a few
/// milliseconds; a longer one is followed by another round for what was
/// written meanwhile.
const CATCHUP_ROUND_FITS: Duration = Duration::from_millis(250);

/// Why an attempt stopped before the point of no return.
#[derive(Debug)]
struct Abort {
    reason: String,
}

/// One cutover attempt in progress.
struct Attempt<'a, H: CutoverHost, L: CutoverLedger> {
    ctx: &'a Arc<Context>,
    direction: Direction,
    /// The server the clients leave: fenced by the attempt.
    from: crate::config::Endpoint,
    ledger: &'a L,
    host: &'a H,
    cfg: &'a CutoverConfig,
    metrics: &'a CutoverMetrics,
    last: &'a LastCutover,
    report: CutoverReport,
    gate_closed_at: Option<Instant>,
    /// Read and persisted before the gate closes; put up by [`Attempt::fence`].
    planned_fence: Option<FenceRecord>,
    fence: Option<FenceRecord>,
    /// An abort could not lift the fence before pgshift began to stop: the
    /// attempt stays recorded as running (with its fence), so the next
    /// start lifts it.
    fence_left_up: bool,
    /// The target's guard was lifted for the switch: an abort puts it back.
    guard_lifted: bool,
}

impl<H: CutoverHost, L: CutoverLedger> Attempt<'_, H, L> {
    fn publish(&self) {
        self.last.set(self.report.clone());
    }

    fn record(
        &mut self,
        phase: &'static str,
        started: Instant,
        outcome: PhaseOutcome,
        detail: Option<String>,
    ) {
        self.record_took(phase, started, started.elapsed(), outcome, detail);
    }

    /// Records a phase that began at `began` and took `took` (it may have
    /// ended before now: phases run side by side).
    fn record_took(
        &mut self,
        phase: &'static str,
        began: Instant,
        took: Duration,
        outcome: PhaseOutcome,
        detail: Option<String>,
    ) {
        let seconds = took.as_secs_f64();
        self.metrics
            .phase_seconds
            .with_label_values(&[phase])
            .set(seconds);
        tracing::info!(
            cutover = %self.report.id,
            kind = self.direction.as_str(),
            phase,
            seconds = format!("{seconds:.3}"),
            outcome = outcome.as_str(),
            detail = detail.as_deref().unwrap_or(""),
            "cutover phase"
        );
        let started_at = chrono::TimeDelta::from_std(began.elapsed())
            .ok()
            .and_then(|d| chrono::Utc::now().checked_sub_signed(d))
            .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true));
        self.report.phases.push(PhaseReport {
            phase: phase.to_string(),
            started_at,
            seconds,
            outcome,
            detail,
        });
        self.publish();
    }

    /// Records `phase` as ended (failed or timed out) for `reason`, the
    /// reason the attempt is abandoned.
    fn abort_at(
        &mut self,
        phase: &'static str,
        t: Instant,
        outcome: PhaseOutcome,
        reason: String,
    ) -> Abort {
        self.record(phase, t, outcome, Some(reason.clone()));
        Abort { reason }
    }

    async fn prewarm(&mut self) {
        let t = Instant::now();
        let n = self.host.prewarm().await;
        self.record(
            "prewarm",
            t,
            PhaseOutcome::Ok,
            Some(format!(
                "{n} backend(s) ready on the {}",
                match self.direction {
                    Direction::Cutover => "target",
                    Direction::Rollback => "source",
                }
            )),
        );
    }

    /// Not part of the pause: the marker's wait inside it is the time apply
    /// needs for what it has not applied when the gate closes (an automatic
    /// trigger fires at up to `start_when_lag_below`), so apply first
    /// catches up to markers of its own, clients still running: round after
    /// round, until a round is short enough for the pause. A broken stream,
    /// or apply that has not caught up by `pregate_catchup_timeout` (blocked,
    /// or slower than the writes), ends the attempt here, before any client
    /// waits.
    async fn catch_up_first(&mut self) -> Result<(), Abort> {
        let t = Instant::now();
        let bound = self.cfg.pregate_catchup_timeout.0;
        let mut rounds = 0u32;
        loop {
            rounds += 1;
            let round = Instant::now();
            let id = format!("{}-catchup{rounds}", self.report.id);
            let left = bound.saturating_sub(t.elapsed());
            let caught_up = match self.host.emit_markers(&id).await {
                Ok(()) => self.host.wait_markers(&id, left).await,
                Err(e) => Err(e),
            };
            if let Err(e) = caught_up {
                let reason = match self.host.stream_health().await {
                    Err(unhealthy) => format!("replication is not healthy: {unhealthy}"),
                    Ok(()) if t.elapsed() >= bound => format!(
                        "apply did not catch up within pregate_catchup_timeout {bound:?} ({e}); clients were not paused"
                    ),
                    Ok(()) => e.to_string(),
                };
                return Err(self.abort_at("catchup", t, PhaseOutcome::Failed, reason));
            }
            if round.elapsed() <= CATCHUP_ROUND_FITS || t.elapsed() >= bound {
                let detail = (rounds > 1).then(|| format!("{rounds} rounds"));
                self.record("catchup", t, PhaseOutcome::Ok, detail);
                return Ok(());
            }
        }
    }

    async fn gate(&mut self) {
        // Closed at a quiet moment when there is one: a transaction in flight
        // when the gate closes adds its remaining time to the pause (the
        // drain), a session staging its move competes with the fence for the
        // source. Not part of the pause, and bounded: a workload never idle
        // is paused after QUIET_WAIT all the same.
        let _ = self.host.wait_quiet(QUIET_WAIT).await;
        let t = Instant::now();
        self.host.close_gate().await;
        // The pause starts when this proxy's gate closes.
        self.gate_closed_at = Some(Instant::now());
        self.record("gate", t, PhaseOutcome::Ok, None);
    }

    async fn drain(&mut self) -> Result<(), Abort> {
        let t = Instant::now();
        if self.host.wait_idle(self.cfg.drain_timeout.0).await {
            let note = self.host.drain_note();
            self.record("drain", t, PhaseOutcome::Ok, note);
            return Ok(());
        }
        let open = self.host.in_transaction();
        match self.cfg.on_drain_timeout {
            OnDrainTimeout::Abort => {
                let mut reason = format!(
                    "{open} session(s) still inside a transaction after drain_timeout {:?}",
                    self.cfg.drain_timeout.0
                );
                if let Some(note) = self.host.drain_note() {
                    reason = format!("{reason}; {note}");
                }
                Err(self.abort_at("drain", t, PhaseOutcome::Timeout, reason))
            }
            OnDrainTimeout::Cancel => {
                let canceled = self.host.cancel_in_transaction().await;
                let grace = Duration::from_secs(2);
                let terminated = if self.host.wait_idle(grace).await {
                    0
                } else {
                    self.host.terminate_in_transaction().await
                };
                let detail =
                    format!("canceled {canceled} query(ies), terminated {terminated} session(s)");
                if !self.host.wait_idle(grace).await {
                    let reason =
                        format!("sessions still inside a transaction after cancel: {detail}");
                    return Err(self.abort_at("drain", t, PhaseOutcome::Timeout, reason));
                }
                self.record("drain", t, PhaseOutcome::Ok, Some(detail));
                Ok(())
            }
        }
    }

    /// Before the gate closes: reads what the fence will change and persists
    /// it, so the pause pays for neither. From here on a pgshift killed before
    /// the switch lifts this fence when it comes back — restoring the values
    /// read here, which is harmless when the fence never went up.
    /// Returns how many sessions bypass the proxy now (logged: the fence
    /// will terminate them).
    async fn plan_fence(&mut self, admin: &tokio_postgres::Client) -> Result<u64, StepError> {
        let dbs = self.ledger.databases();
        let rec = fence::plan(admin, &dbs, &self.cfg.fence_roles).await?;
        self.persist_running(Some(&rec))
            .await
            .map_err(StepError::PersistFence)?;
        let n = fence::count_bypassing(admin, &rec, &self.host.source_backend_pids()).await;
        self.planned_fence = Some(rec);
        Ok(n?)
    }

    async fn fence(&mut self, admin: &tokio_postgres::Client) -> Result<(), Abort> {
        let t = Instant::now();
        let Some(mut rec) = self.planned_fence.take() else {
            let reason = "the fence was not planned".to_string();
            return Err(self.abort_at("fence", t, PhaseOutcome::Failed, reason));
        };
        // From here on an abort lifts it, also when only part of it went up.
        self.fence = Some(rec.clone());
        let spare = self.host.source_backend_pids();
        match fence::apply(admin, &mut rec, &spare).await {
            Ok(changed) => {
                self.fence = Some(rec.clone());
                if changed {
                    // Someone changed a setting since the plan: the record
                    // persisted before the gate closed must say what to restore.
                    if let Err(e) = self.persist_running(Some(&rec)).await {
                        let reason = format!("cannot persist the corrected fence record: {e}");
                        return Err(self.abort_at("fence", t, PhaseOutcome::Failed, reason));
                    }
                }
                let detail = format!(
                    "terminated {} session(s) that bypassed the proxy",
                    rec.terminated_sessions
                );
                self.record("fence", t, PhaseOutcome::Ok, Some(detail));
                Ok(())
            }
            Err(e) => Err(self.abort_at("fence", t, PhaseOutcome::Failed, e.to_string())),
        }
    }

    /// Saves the attempt as running (with the fence record once there is one),
    /// so a restarted pgshift knows an attempt was interrupted and what to undo.
    async fn persist_running(&self, fence: Option<&FenceRecord>) -> Result<(), LedgerError> {
        let mut doc = serde_json::to_value(&self.report).unwrap_or_default();
        if let Some(rec) = fence {
            doc["fence"] = serde_json::to_value(rec).unwrap_or_default();
        }
        self.ledger
            .save_attempt(&self.report.id, Outcome::Running, None, &doc)
            .await
    }

    /// Test hook, see [`failpoint`] (a rollback's phases are named
    /// `rollback-<phase>` there).
    async fn failpoint(&self, phase: &str) {
        let phase = match self.direction {
            Direction::Cutover => phase.to_string(),
            Direction::Rollback => format!("rollback-{phase}"),
        };
        let phase = phase.as_str();
        match failpoint() {
            Some(Failpoint::Stop(p)) if p == phase => {
                tracing::warn!(
                    cutover = %self.report.id,
                    phase,
                    "PGSHIFT_FAILPOINT: the cutover stops here (test hook)"
                );
                tokio::time::sleep(Duration::from_secs(3600)).await;
            }
            Some(Failpoint::Hold(p, file)) if p == phase => {
                tracing::warn!(
                    cutover = %self.report.id,
                    phase,
                    "PGSHIFT_FAILPOINT: the cutover waits for {} (test hook)",
                    file.display()
                );
                while !file.exists() {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            _ => {}
        }
    }

    /// The marker, the sequences and the fence check, concurrently: after
    /// the fence nothing can call nextval on the source (new sessions are
    /// read-only, the others terminated, the proxy's held), so the values
    /// read while the marker is on its way are the final ones. The target
    /// never writes sequences itself (apply inserts explicit values), so
    /// setting them before the marker is applied changes nothing apply does;
    /// an abort leaves them ahead, which the next attempt overwrites. The
    /// fence check ([`fence::verify`]) tries to get past the fence as a
    /// fenced role, in the time the marker takes anyway. All must succeed.
    async fn catch_up_and_sequences(
        &mut self,
        admin: &tokio_postgres::Client,
    ) -> Result<(), Abort> {
        let (host, ctx, cfg, from) = (self.host, self.ctx, self.cfg, &self.from);
        let (id, timeout) = (self.report.id.clone(), self.cfg.catchup_timeout.0);
        let rec = self.fence.clone().unwrap_or_default();
        let spare = host.source_backend_pids();
        // All three start now; each took its own time.
        let began = Instant::now();
        let ((marker, marker_took), (seqs, seqs_took), (check, check_took)) = tokio::join!(
            async {
                let t = Instant::now();
                let r = match host.emit_markers(&id).await {
                    Ok(()) => host.wait_markers(&id, timeout).await,
                    Err(e) => Err(e),
                };
                (r, t.elapsed())
            },
            async {
                let t = Instant::now();
                (host.sync_sequences().await, t.elapsed())
            },
            async {
                let t = Instant::now();
                let users = &ctx.config.file.proxy.users;
                let r = fence::verify(admin, from, &rec, &cfg.fence_roles, &spare, users);
                (r.await, t.elapsed())
            },
        );
        let check = match check {
            Ok(detail) => {
                self.record_took(
                    "fence_check",
                    began,
                    check_took,
                    PhaseOutcome::Ok,
                    Some(detail),
                );
                Ok(())
            }
            Err(e) => {
                self.record_took(
                    "fence_check",
                    began,
                    check_took,
                    PhaseOutcome::Failed,
                    Some(e.to_string()),
                );
                Err(Abort {
                    reason: e.to_string(),
                })
            }
        };
        let marker = match marker {
            Ok(()) => {
                self.record_took("marker", began, marker_took, PhaseOutcome::Ok, None);
                Ok(())
            }
            Err(e) => {
                let reason = format!("target did not catch up: {e}");
                self.record_took(
                    "marker",
                    began,
                    marker_took,
                    PhaseOutcome::Timeout,
                    Some(reason.clone()),
                );
                Err(Abort { reason })
            }
        };
        // The marker's test hook, before the sequences are recorded: both
        // are done here, but the hook stops "right after the marker".
        if marker.is_ok() {
            self.failpoint("marker").await;
        }
        let seqs = match seqs {
            Ok(n) => {
                self.record_took(
                    "sequences",
                    began,
                    seqs_took,
                    PhaseOutcome::Ok,
                    Some(format!("{n} sequence(s), while the marker was awaited")),
                );
                Ok(())
            }
            Err(e) => {
                self.record_took(
                    "sequences",
                    began,
                    seqs_took,
                    PhaseOutcome::Failed,
                    Some(e.to_string()),
                );
                Err(Abort {
                    reason: format!("sequence sync failed: {e}"),
                })
            }
        };
        check.and(marker).and(seqs)
    }

    async fn ready_to_switch(&mut self) -> Result<(), Abort> {
        let t = Instant::now();
        match self.host.before_gate().await {
            Ok(None) => Ok(()),
            Ok(Some(detail)) => {
                self.record("reverse", t, PhaseOutcome::Ok, Some(detail));
                Ok(())
            }
            Err(e) => Err(self.abort_at("reverse", t, PhaseOutcome::Failed, e.to_string())),
        }
    }

    /// Not a reason to abort: the clients' move does not depend on it; the
    /// verification after the switch reports that it could not run.
    async fn snapshots(&mut self) {
        if self.direction == Direction::Rollback {
            return;
        }
        let t = Instant::now();
        match self.host.hold_snapshots().await {
            Ok(None) => {}
            Ok(Some(detail)) => self.record("snapshot", t, PhaseOutcome::Ok, Some(detail)),
            Err(e) => self.record("snapshot", t, PhaseOutcome::Failed, Some(e.to_string())),
        }
    }

    async fn verify(&mut self) -> Result<(), Abort> {
        // A rollback goes back to a source that reverse replication kept
        // current; it is verified outside any pause.
        if self.cfg.verify == CutoverVerify::Off || self.direction == Direction::Rollback {
            return Ok(());
        }
        let t = Instant::now();
        match self.host.verify(self.cfg.verify).await {
            Ok(summary) => {
                self.record("verify", t, PhaseOutcome::Ok, Some(summary));
                Ok(())
            }
            Err(e) => {
                self.record("verify", t, PhaseOutcome::Failed, Some(e.to_string()));
                Err(Abort {
                    reason: format!("verification found differences: {e}"),
                })
            }
        }
    }

    /// Point of no return: persisted first, so a restart never comes back on the source.
    async fn switch(&mut self) -> Result<(), StepError> {
        let t = Instant::now();
        // Before the switch is persisted, so a failure here is an abort; its
        // commit is flushed by the switch's own synchronous one.
        self.guard_lifted = true;
        self.host
            .lift_target_guard()
            .await
            .map_err(StepError::Guard)?;
        let lifted = t.elapsed();
        let fence = self.fence.clone().unwrap_or_default();
        self.ledger
            .mark_switched(&fence)
            .await
            .map_err(StepError::PersistSwitch)?;
        let persisted = t.elapsed() - lifted;
        let (mut moved, mut dropped) = self.host.switch_to_target().await;
        let switched = t.elapsed() - persisted - lifted;
        let pause = self.gate_closed_at.map(|g| g.elapsed().as_secs_f64());
        // Not part of this proxy's pause: its gate is open.
        let members = self.host.confirm_switch().await;
        if let Some((m, d, _)) = &members {
            moved += m;
            dropped += d;
        }
        self.report.pause_seconds = pause;
        self.report.sessions_moved = moved;
        self.report.sessions_dropped = dropped;
        self.metrics.moved.inc_by(moved);
        self.metrics.dropped.inc_by(dropped);
        if let Some(p) = pause {
            self.metrics.pause_seconds.set(p);
        }
        self.record(
            "switch",
            t,
            PhaseOutcome::Ok,
            Some(format!(
                "{moved} session(s) moved, {dropped} dropped (guard lifted in {:.1} ms, persisted in {:.1} ms, moved in {:.1} ms)",
                lifted.as_secs_f64() * 1000.0,
                persisted.as_secs_f64() * 1000.0,
                switched.as_secs_f64() * 1000.0
            ) + &members.map(|(_, _, note)| format!("; {note}")).unwrap_or_default()),
        );
        Ok(())
    }

    /// Undoes everything before the point of no return.
    async fn abort(&mut self, admin: Option<&tokio_postgres::Client>, reason: String) {
        let t = Instant::now();
        let mut detail = Vec::new();
        let mut still_up = None;
        if let Some(rec) = self.fence.take() {
            let lifted = match admin {
                Some(admin) => fence::lift(admin, &rec).await.map_err(|e| e.to_string()),
                None => Err("no connection to the source".to_string()),
            };
            if let Err(e) = lifted {
                still_up = Some((rec, e));
            }
        }
        if self.guard_lifted {
            self.host.rearm_target_guard().await;
        }
        self.host.discard_prewarm();
        // Clients get the source back at once, also while the fence is still
        // up (their writes fail until it is lifted below).
        self.host.open_gate();
        if let Some(g) = self.gate_closed_at {
            let p = g.elapsed().as_secs_f64();
            self.report.pause_seconds = Some(p);
            self.metrics.pause_seconds.set(p);
        }
        if let Some((rec, first)) = still_up {
            tracing::error!(
                "cannot lift the fence on the source ({first}); retrying on new connections"
            );
            match fence::lift_until_done(&self.from, &rec, &self.ctx.shutdown).await {
                Some(n) => detail.push(format!(
                    "fence lifted on a new connection (attempt {n}; the first failed: {first})"
                )),
                None => {
                    detail.push(format!(
                        "FENCE STILL UP: pgshift is stopping; it lifts it when it starts again ({first})"
                    ));
                    self.fence_left_up = true;
                }
            }
        }
        self.record(
            "abort",
            t,
            PhaseOutcome::Ok,
            (!detail.is_empty()).then(|| detail.join("; ")),
        );
        self.report.outcome = Outcome::Aborted;
        self.report.reason = Some(reason);
    }
}

/// Runs one cutover attempt to its end. The migration must be in
/// WaitingForCutoverTrigger; afterwards it is Succeeded/Completed, or back in
/// WaitingForCutoverTrigger with the reason recorded.
pub async fn run<H: CutoverHost, L: CutoverLedger>(
    ctx: &Arc<Context>,
    ledger: &L,
    host: &H,
    metrics: &CutoverMetrics,
    last: &LastCutover,
    id: String,
) -> CutoverReport {
    run_as(Direction::Cutover, ctx, ledger, host, metrics, last, id).await
}

/// Runs one attempt of either direction to its end (a rollback: the host
/// and ledger are the reverse direction's, the target is fenced).
pub async fn run_as<H: CutoverHost, L: CutoverLedger>(
    direction: Direction,
    ctx: &Arc<Context>,
    ledger: &L,
    host: &H,
    metrics: &CutoverMetrics,
    last: &LastCutover,
    id: String,
) -> CutoverReport {
    let cfg = ctx.config.cutover().clone();
    let from = match direction {
        Direction::Cutover => ctx.config.source.clone(),
        Direction::Rollback => ctx.config.target.clone(),
    };
    let mut a = Attempt {
        ctx,
        direction,
        from,
        ledger,
        host,
        cfg: &cfg,
        metrics,
        last,
        report: CutoverReport {
            id: id.clone(),
            started_at: chrono::Utc::now().to_rfc3339(),
            outcome: Outcome::Running,
            reason: None,
            phases: vec![],
            pause_seconds: None,
            sessions_moved: 0,
            sessions_dropped: 0,
        },
        gate_closed_at: None,
        planned_fence: None,
        fence: None,
        fence_left_up: false,
        guard_lifted: false,
    };
    a.publish();
    tracing::info!(cutover = %id, kind = direction.as_str(), "{} started", direction.as_str());
    if let Err(e) = ledger.begin().await {
        a.report.outcome = Outcome::Failed;
        a.report.reason = Some(format!("cannot persist state: {e}"));
        a.publish();
        return finish(a).await;
    }
    // Recorded at once: a restarted pgshift reports an interrupted attempt.
    if let Err(e) = a.persist_running(None).await {
        tracing::warn!("cannot record the cutover attempt as running: {e}");
    }

    // A stream known to be broken cannot deliver the marker: refuse before
    // anything, clients never paused.
    if let Err(e) = host.stream_health().await {
        a.report.outcome = Outcome::Aborted;
        a.report.reason = Some(format!("replication is not healthy: {e}"));
        return finish(a).await;
    }
    let admin_label = match direction {
        Direction::Cutover => "source (cutover)",
        Direction::Rollback => "target (rollback)",
    };
    let admin = match crate::db::connect(&a.from, admin_label).await {
        Ok(c) => c,
        Err(e) => {
            a.abort(None, e.to_string()).await;
            return finish(a).await;
        }
    };

    let t = Instant::now();
    let prepared = match host.prepare().await {
        Ok(()) => a.plan_fence(&admin).await,
        Err(e) => Err(StepError::Host(e)),
    };
    match prepared {
        Ok(bypassing) => a.record(
            "prepare",
            t,
            PhaseOutcome::Ok,
            (bypassing > 0).then(|| {
                format!("{bypassing} session(s) bypass the proxy; the fence will terminate them")
            }),
        ),
        Err(e) => {
            a.record("prepare", t, PhaseOutcome::Failed, Some(e.to_string()));
            a.report.outcome = Outcome::Aborted;
            a.report.reason = Some(format!("cannot prepare the cutover: {e}"));
            return finish(a).await;
        }
    }
    a.failpoint("prepare").await;
    a.prewarm().await;
    a.failpoint("prewarm").await;
    if let Err(Abort { reason }) = a.catch_up_first().await {
        a.abort(Some(&admin), reason).await;
        return finish(a).await;
    }
    // What was prepared beside (after the catch-up, whose failure says
    // more); a long wait let a backlog grow: caught up again.
    let t = Instant::now();
    let ready = match a.ready_to_switch().await {
        Ok(()) if t.elapsed() > CATCHUP_ROUND_FITS => a.catch_up_first().await,
        r => r,
    };
    if let Err(Abort { reason }) = ready {
        a.abort(Some(&admin), reason).await;
        return finish(a).await;
    }
    a.failpoint("catchup").await;
    a.gate().await;
    a.failpoint("gate").await;
    let before_switch: Result<(), Abort> = async {
        a.drain().await?;
        a.failpoint("drain").await;
        a.fence(&admin).await?;
        a.failpoint("fence").await;
        a.catch_up_and_sequences(&admin).await?;
        a.failpoint("sequences").await;
        a.snapshots().await;
        a.verify().await?;
        a.failpoint("verify").await;
        Ok(())
    }
    .await;
    if let Err(Abort { reason }) = before_switch {
        a.abort(Some(&admin), reason).await;
        return finish(a).await;
    }
    if let Err(e) = a.switch().await {
        a.abort(Some(&admin), e.to_string()).await;
        return finish(a).await;
    }
    a.failpoint("switch").await;

    // Past the point of no return: clients run on the target. What follows
    // is cleanup; a failure is reported but never undoes the switch.
    let t = Instant::now();
    match host.finish_replication(cfg.drop_slot_after_cutover).await {
        Ok(()) => a.record("cleanup", t, PhaseOutcome::Ok, None),
        Err(e) => a.record("cleanup", t, PhaseOutcome::Failed, Some(e.to_string())),
    }
    a.report.outcome = Outcome::Succeeded;
    finish(a).await
}

/// Persists the outcome and moves the migration to its next state.
async fn finish<H: CutoverHost, L: CutoverLedger>(a: Attempt<'_, H, L>) -> CutoverReport {
    let r = a.report.clone();
    // Before the outcome shows: whoever reads "aborted" finds the attempt
    // over (clients were released by the abort already).
    if r.outcome != Outcome::Succeeded && !a.fence_left_up {
        a.host.abandon().await;
    }
    a.metrics
        .attempts
        .with_label_values(&[r.outcome.as_str()])
        .inc();
    a.last.set(r.clone());
    if a.fence_left_up {
        // Recorded as running, with its fence: the next start lifts it.
        tracing::error!(cutover = %r.id, "cutover aborted with the source still fenced; it is lifted when pgshift starts again");
        return r;
    }
    let json = serde_json::to_value(&r).unwrap_or(Value::Null);
    if let Err(e) = a
        .ledger
        .save_attempt(&r.id, r.outcome, r.reason.as_deref(), &json)
        .await
    {
        tracing::error!("cannot record the cutover attempt: {e}");
    }
    let next = if r.outcome == Outcome::Succeeded {
        AfterAttempt::Succeeded
    } else if let Err(e) = a.host.stream_health().await {
        // Not ready for another attempt until replication is healthy again.
        AfterAttempt::WaitingForReplication(format!(
            "last cutover attempt {}: {}; waiting for replication: {e}",
            r.outcome,
            r.reason.clone().unwrap_or_default()
        ))
    } else {
        AfterAttempt::WaitingForTrigger(
            r.reason
                .clone()
                .map(|x| format!("last cutover attempt {}: {x}", r.outcome)),
        )
    };
    if let Err(e) = a.ledger.end(next).await {
        tracing::error!("cannot persist the state after cutover: {e}");
    }
    tracing::info!(
        cutover = %r.id,
        kind = a.direction.as_str(),
        outcome = %r.outcome,
        pause_seconds = r.pause_seconds.map(|p| format!("{p:.3}")).unwrap_or_default(),
        reason = r.reason.as_deref().unwrap_or(""),
        "{} finished",
        a.direction.as_str()
    );
    r
}
