//! The way back after a cutover (the runner's side of it): reverse
//! replication from the switch, `rollback` (the cutover protocol in reverse),
//! and `complete`, which ends the window.
//!
//! - Before the switch (the cutover's prepare, outside the pause), each
//!   database gets a publication and a slot on the target, and their
//!   positions are persisted: every write clients make on the target after
//!   the switch comes after the slot, so none is missed. Until the switch
//!   the target takes writes from forward apply only, which the reverse
//!   stream drops by their origin ([`crate::replication::stream`]'s
//!   `drop_origin`), as the forward stream drops reverse apply's after a
//!   rollback.
//! - After the switch the reverse streams apply to the fenced source as
//!   pgshift's own role (the fence is NOLOGIN for the others), exactly once
//!   through a replication origin on the source. The forward slot, its
//!   publication and the DDL capture stay on the source for the window, so
//!   a rollback resumes forward streaming from where the cutover left it,
//!   without a new copy.
//! - A rollback's prepare guards the source (the trigger, armed) and then
//!   lifts its fence, so the sessions' source backends are pre-warmed as a
//!   cutover's are on the target; the pause fences the target, waits for a
//!   marker emitted there to be applied on the source, copies sequences
//!   back, disarms the source's guard and moves the sessions. Afterwards
//!   the source's guard is dropped, the target guarded again (the trigger,
//!   not the fence: the next cutover pre-warms there), the reverse slots
//!   dropped, and forward streaming resumes. An attempt that does not
//!   switch fences the source again.
//! - `complete` (or the window's automatic end) drops what the window kept:
//!   reverse slots and publications on the target, the reverse origin on
//!   the source, the forward slot, publication and DDL capture on the source.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde_json::json;

use super::runner::{Runner, RunningGuard};
use super::{State, Substate};
use crate::commands::CommandError;
use crate::cutover::fence::{self, FenceRecord};
use crate::cutover::guard;
use crate::cutover::protocol::{self, Direction, HostError, Outcome};
use crate::replication::Lsn;
use crate::replication::client::{ReplicationConnection, SnapshotAction};
use crate::replication::names::{ReplicationNames, reverse_migration};
use crate::replication::stream::{DatabaseStream, StreamConfig};

/// How long creating a reverse slot may wait for the target's running
/// transactions (it waits for every one open when it starts).
const SLOT_TIMEOUT: Duration = Duration::from_secs(60);

impl Runner {
    /// The name the reverse direction's slots, publications and origin derive from.
    pub(super) fn reverse_name(&self) -> String {
        reverse_migration(&self.migration().cfg.name)
    }

    /// At the cutover's prepare: the reverse publications and slots are
    /// created in the background, while pre-warm and catch-up run (a slot
    /// waits for every transaction open on the target when it starts, e.g.
    /// apply's); the gate waits for them ([`Runner::reverse_ready`]).
    pub(super) async fn prepare_reverse(&self) {
        let task = tokio::spawn(create_reverse(
            self.ctx().clone(),
            self.migration().clone(),
            self.reverse_name(),
        ));
        if let Some(old) = self.reverse_setup.lock().await.replace(task) {
            old.abort();
        }
    }

    /// Before the gate closes: the reverse slots exist. A slot waits for
    /// the transactions open on the target when it starts, and for the
    /// server to log their end (every 15 s on a busy server): bounded by
    /// `pregate_catchup_timeout`, clients still running.
    pub(super) async fn reverse_ready(&self) -> Result<Option<String>, HostError> {
        let Some(task) = self.reverse_setup.lock().await.take() else {
            return Ok(None);
        };
        let bound = self.ctx().config.cutover().pregate_catchup_timeout.0;
        let abort = task.abort_handle();
        match tokio::time::timeout(bound, task).await {
            Ok(Ok(r)) => r.map(|n| Some(format!("{n} reverse slot(s) ready on the target"))),
            Ok(Err(e)) => Err(HostError::Failed(format!(
                "creating the reverse slots failed: {e}"
            ))),
            Err(_) => {
                abort.abort();
                Err(HostError::Failed(format!(
                    "the reverse slots were not created within pregate_catchup_timeout {bound:?}: a transaction stayed open on the target; clients were not paused"
                )))
            }
        }
    }

    /// An attempt that prepared reverse slots and did not switch: drops them.
    pub(super) async fn abandon_reverse(&self) {
        if let Some(task) = self.reverse_setup.lock().await.take() {
            task.abort();
            let _ = task.await;
        }
        self.drop_prepared_window().await;
    }
}

/// Creates a publication and a fresh slot on the target for every
/// database and persists their positions; returns how many.
async fn create_reverse(
    ctx: Arc<crate::context::Context>,
    m: Arc<super::Migration>,
    reverse: String,
) -> Result<usize, HostError> {
    {
        let c = &ctx.config;
        let filter = crate::filter::TableFilter::from_migration(&m.cfg);
        let mut points = BTreeMap::new();
        for db in &m.cfg.databases {
            let failed = |what: &str, e: String| {
                HostError::Failed(format!(
                    "database {db}: {what} for reverse replication on the target: {e}"
                ))
            };
            // A slot left by an attempt that did not switch is replaced.
            crate::replication::slot::cleanup(&c.target, &reverse, db)
                .await
                .map_err(|e| failed("removing an old slot", e.to_string()))?;
            let names = ReplicationNames::new(&reverse, db);
            let client =
                crate::db::connect(&c.target.with_dbname(db), "target (reverse publication)")
                    .await?;
            let tables = crate::pg::tables::list_tables(&client, &filter)
                .await
                .map_err(|e| failed("listing tables", e.to_string()))?;
            let list: Vec<String> = tables.iter().map(|t| t.quoted()).collect();
            crate::replication::publication::create_publication(
                &client,
                &names.publication,
                Some(&list),
            )
            .await
            .map_err(|e| failed("creating the publication", e.to_string()))?;
            let mut conn = ReplicationConnection::connect(&c.target, db, "pgshift-reverse")
                .await
                .map_err(|e| failed("opening a replication connection", e.to_string()))?;
            let slot = tokio::time::timeout(
                SLOT_TIMEOUT,
                conn.create_slot(&names.slot, SnapshotAction::NoExport, false),
            )
            .await
            .map_err(|_| {
                failed(
                    "creating the slot",
                    format!("a transaction on the target stayed open for {SLOT_TIMEOUT:?}"),
                )
            })?
            .map_err(|e| failed("creating the slot", e.to_string()))?;
            points.insert(db.clone(), slot.consistent_point.to_string());
        }
        let n = points.len();
        m.prepare_window(points)
            .await
            .map_err(|e| HostError::Failed(format!("cannot persist the rollback window: {e}")))?;
        Ok(n)
    }
}

impl Runner {
    /// The prepared (never opened) window's slots and record are dropped.
    async fn drop_prepared_window(&self) {
        // Slots may exist before the window's record does: dropped
        // unless a window is open (its slots are the live ones).
        if self.migration().window().is_some_and(|w| w.is_open()) {
            return;
        }
        for note in self.drop_reverse_slots().await {
            tracing::warn!("{note}");
        }
        if let Err(e) = self.migration().forget_window().await {
            tracing::warn!("cannot forget the prepared rollback window: {e}");
        }
    }

    /// Reverse slots and publications dropped on the target; what failed.
    async fn drop_reverse_slots(&self) -> Vec<String> {
        let target = &self.ctx().config.target;
        let reverse = self.reverse_name();
        let mut errors = Vec::new();
        for db in &self.migration().cfg.databases {
            if let Err(e) = crate::replication::slot::cleanup(target, &reverse, db).await {
                errors.push(format!(
                    "{db}: dropping the reverse slot and publication on the target failed: {e}"
                ));
            }
        }
        errors
    }

    /// Streams target → source from the window's slots (at their origin's
    /// position on the source after a restart).
    pub(super) async fn start_reverse_streams(&self) {
        let m = self.migration();
        let Some(window) = m.window() else { return };
        let c = &self.ctx().config;
        let mut reverse = self.reverse.lock().await;
        if !reverse.is_empty() {
            return;
        }
        for db in &m.cfg.databases {
            let point = window
                .reverse_points
                .get(db)
                .and_then(|p| p.parse::<Lsn>().ok())
                .unwrap_or(Lsn::ZERO);
            let stream = DatabaseStream::start(
                StreamConfig {
                    migration: self.reverse_name(),
                    database: db.clone(),
                    source: c.target.clone(),
                    target: c.source.clone(),
                    consistent_point: point,
                    ddl: None,
                    drop_origin: Some(crate::replication::apply::origin_of(&m.cfg.name, db)),
                    decoding_work_mem: Some(m.cfg.logical_decoding_work_mem.0),
                },
                self.reverse_metrics.clone(),
            );
            m.attach(db, "reverse_stream", stream.status.clone());
            reverse.push(stream);
        }
        tracing::info!(
            databases = m.cfg.databases.len(),
            "reverse replication (target → source) runs: `pgshift rollback` can bring the clients back"
        );
    }

    pub(super) async fn stop_reverse_streams(&self) {
        for s in self.reverse.lock().await.drain(..) {
            s.stop().await;
        }
    }

    /// `pgshift rollback`: starts the reverse cutover in the background.
    pub(super) async fn start_rollback(self: Arc<Self>) -> Result<serde_json::Value, CommandError> {
        let m = self.migration();
        if m.state() != (State::Succeeded, Substate::RollbackAvailable) {
            let (state, substate) = m.state();
            return Err(CommandError::Conflict(format!(
                "rollback is allowed only in Succeeded/RollbackAvailable (after a cutover with `rollback = true`, before `complete`); the migration is {state}/{substate}"
            )));
        }
        if self.fleet.other_proxies() > 0 {
            return Err(CommandError::Conflict(
                "rollback with several live fleet members is not supported yet: stop the other members (their clients reconnect through this one) and try again".into(),
            ));
        }
        if let Err(e) = self.reverse_health().await {
            return Err(CommandError::Conflict(format!(
                "rollback refused: reverse replication is not healthy: {e}"
            )));
        }
        if self.cutover_running.swap(true, Ordering::SeqCst) {
            return Err(CommandError::Conflict(
                "a cutover or rollback is already running; wait for it to finish or abort".into(),
            ));
        }
        let id = format!(
            "rollback-{}-{}",
            chrono::Utc::now().format("%Y%m%dT%H%M%S"),
            rand::random::<u32>() % 100_000
        );
        tracing::info!(rollback = %id, "rollback requested");
        let running = RunningGuard(self.cutover_running.clone());
        let this = self.clone();
        let id2 = id.clone();
        tokio::spawn(async move {
            let _running = running;
            this.set_direction(Direction::Rollback);
            let ctx = this.ctx().clone();
            let ledger = super::ledger::RollbackLedger(this.migration().as_ref());
            let report = protocol::run_as(
                Direction::Rollback,
                &ctx,
                &ledger,
                this.as_ref(),
                &this.rollback_metrics,
                &this.last_rollback,
                id2,
            )
            .await;
            this.set_direction(Direction::Cutover);
            this.drop_cutover_conns();
            if report.outcome != Outcome::Succeeded {
                // Still on the target: the reverse streams go on.
                tracing::warn!(rollback = %report.id, reason = report.reason.as_deref().unwrap_or(""), "rollback did not happen; clients stay on the target");
            }
        });
        Ok(json!({"id": id, "message": "rollback started"}))
    }

    /// The reverse streams' health (a rollback needs its marker applied).
    pub(super) async fn reverse_health(&self) -> Result<(), HostError> {
        let streams = self.reverse.lock().await;
        super::runner::streams_health(&streams)
    }

    /// The rollback's prepare: the cutover's connections, the other way
    /// round (marker on the target, sequences read there and set on the
    /// source, which the fence keeps read-only by default); then the source
    /// guarded as the target is before a cutover (the guard's trigger, armed)
    /// and its fence lifted, so the sessions' source backends can be
    /// pre-warmed: until the switch, writes there come from pgshift only.
    pub(super) async fn prepare_rollback(&self) -> Result<(), HostError> {
        let c = &self.ctx().config;
        let reverse = self.reverse_name();
        let mut dbs = Vec::new();
        for db in &self.migration().cfg.databases {
            let names = ReplicationNames::new(&reverse, db);
            let marker = crate::replication::marker::MarkerConnection::connect(
                &c.target.with_dbname(db),
                &names,
            )
            .await
            .map_err(|source| HostError::MarkerConnection {
                database: db.clone(),
                source,
            })?;
            let from = crate::db::connect(&c.target.with_dbname(db), "target (sequences)").await?;
            let to = crate::db::connect(&c.source.with_dbname(db), "source (sequences)").await?;
            to.batch_execute("SET default_transaction_read_only = off")
                .await
                .map_err(|source| HostError::Sql {
                    database: db.clone(),
                    what: "configuring the source connection",
                    source,
                })?;
            let sequences = crate::schema::SequenceSync::prepare(&from, &to)
                .await
                .map_err(|source| HostError::Sequences {
                    database: db.clone(),
                    source,
                })?;
            // Before the fence comes down: without the guard it stays up.
            guard::install(&to)
                .await
                .map_err(|source| HostError::Guard {
                    database: db.clone(),
                    source,
                })?;
            dbs.push(super::runner::CutoverDb {
                database: db.clone(),
                marker,
                source: from,
                target: to,
                sequences,
            });
        }
        let rec = self.source_fence()?;
        let lifted = match dbs.first() {
            Some(db) => fence::lift(&db.target, &rec)
                .await
                .map_err(|e| HostError::Failed(format!("lifting the source's fence: {e}"))),
            None => Err(HostError::NotPrepared),
        };
        self.set_cutover_conns(dbs);
        lifted
    }

    /// The cutover's fence on the source, as the window recorded it.
    fn source_fence(&self) -> Result<FenceRecord, HostError> {
        self.migration()
            .window()
            .and_then(|w| w.source_fence)
            .ok_or_else(|| {
                HostError::Failed("the rollback window does not record the source's fence".into())
            })
    }

    /// The rollback did not switch after all: the source is fenced again
    /// and its guard dropped.
    pub(super) async fn refence_source(&self) {
        let r = async {
            let mut rec = self.source_fence()?;
            let admin =
                crate::db::connect(&self.ctx().config.source, "source (fence again)").await?;
            fence::apply(&admin, &mut rec, &[])
                .await
                .map_err(|e| HostError::Failed(e.to_string()))
        }
        .await;
        match r {
            Ok(_) => {
                for e in self.remove_source_guards().await {
                    tracing::warn!("{e}");
                }
            }
            Err(e) => tracing::error!(
                "cannot fence the source again after an aborted rollback: {e}; clients stay on the target and the source's guard stays armed: fix the cause and restart pgshift, which fences it again"
            ),
        }
    }

    /// The guard a rollback put on the source, dropped; what failed.
    async fn remove_source_guards(&self) -> Vec<String> {
        self.remove_guards(&self.ctx().config.source, "source")
            .await
    }

    /// After the rollback's switch: the target guarded (not fenced), the
    /// reverse direction dropped, forward streaming resumed from the
    /// forward slots.
    pub(super) async fn finish_rollback(&self) -> Result<(), HostError> {
        self.stop_reverse_streams().await;
        let mut errors = self.drop_reverse_slots().await;
        // Disarmed at the switch; now its triggers go.
        errors.extend(self.remove_source_guards().await);
        errors.extend(self.unfence_target().await);
        let copied = self.copied_databases();
        if let Err(e) = self.start_streaming(copied).await {
            errors.push(format!("resuming forward streaming: {e}"));
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(HostError::Cleanup(errors))
        }
    }

    /// A rolled-back target: its application roles log in again (the next
    /// cutover pre-warms there), with the guard's trigger refusing their
    /// writes until that cutover's switch.
    async fn unfence_target(&self) -> Vec<String> {
        let m = self.migration();
        let Some(rec) = m.window().and_then(|w| w.target_fence) else {
            return Vec::new();
        };
        for db in &m.cfg.databases {
            self.guard_target(db).await;
        }
        let target = &self.ctx().config.target;
        let lifted = match crate::db::connect(target, "target (lift the rollback's fence)").await {
            Ok(admin) => fence::lift(&admin, &rec).await.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        if let Err(e) = lifted {
            return vec![format!(
                "lifting the target's fence after the rollback: {e}"
            )];
        }
        match m.clear_target_fence().await {
            Ok(()) => Vec::new(),
            Err(e) => vec![e.to_string()],
        }
    }

    /// A pgshift stopped after a rollback's point of no return: finish it.
    pub(super) async fn resume_after_rollback(&self) -> Result<(), HostError> {
        let r = self.finish_rollback().await;
        self.close_switched_attempt_of(true).await;
        r
    }

    /// A pgshift stopped inside a rollback, before its point of no return:
    /// the target's fence lifted, the source fenced again (its fence may have
    /// been lifted just before the switch), the attempt recorded interrupted.
    pub(super) async fn undo_interrupted_rollback(&self) -> Result<(), HostError> {
        let m = self.migration();
        let unfinished = m
            .control()
            .unfinished_cutover()
            .await
            .map_err(|e| HostError::Failed(format!("reading the interrupted rollback: {e}")))?;
        if let Some((id, mut report)) = unfinished.filter(|(id, _)| id.starts_with("rollback-")) {
            if let Some(rec) = report
                .get("fence")
                .and_then(|f| serde_json::from_value::<FenceRecord>(f.clone()).ok())
            {
                let target = &self.ctx().config.target;
                if let Some(n) = fence::lift_until_done(target, &rec, &self.ctx().shutdown).await {
                    tracing::info!(
                        attempt = n,
                        "the interrupted rollback's fence on the target is lifted"
                    );
                }
            }
            let reason = format!(
                "rollback {id} was interrupted by a pgshift restart before its switch; clients stay on the target"
            );
            if !report.is_object() {
                report = json!({"id": id, "phases": []});
            }
            report["outcome"] = json!(Outcome::Interrupted);
            report["reason"] = json!(reason);
            let _ = m
                .control()
                .save_cutover_attempt(&id, Outcome::Interrupted.as_str(), Some(&reason), &report)
                .await;
            if let Ok(r) = serde_json::from_value(report) {
                self.last_rollback.set(r);
            }
        }
        self.refence_source().await;
        m.transition(
            State::Succeeded,
            Substate::RollbackAvailable,
            Some("a rollback was interrupted by a restart; clients run on the target".into()),
        )
        .await
        .map_err(|e| HostError::Failed(e.to_string()))
    }

    /// `pgshift complete` (or the window's automatic end): drops what the
    /// rollback window kept and records the migration as completed.
    pub(super) async fn complete(&self, why: &str) -> Result<serde_json::Value, CommandError> {
        let m = self.migration();
        if m.state() != (State::Succeeded, Substate::RollbackAvailable) {
            let (state, substate) = m.state();
            return Err(CommandError::Conflict(format!(
                "complete ends the rollback window, open in Succeeded/RollbackAvailable; the migration is {state}/{substate}"
            )));
        }
        if self.cutover_running.swap(true, Ordering::SeqCst) {
            return Err(CommandError::Conflict(
                "a rollback is running; wait for it to finish or abort".into(),
            ));
        }
        let _running = RunningGuard(self.cutover_running.clone());
        tracing::info!(reason = why, "ending the rollback window");
        self.stop_reverse_streams().await;
        let mut notes = Vec::new();
        let mut errors = self.drop_reverse_slots().await;
        // Apply's progress in each direction: reverse on the source,
        // forward on the target; neither direction runs again.
        let c = &self.ctx().config;
        errors.extend(self.drop_origins(&c.source, &self.reverse_name()).await);
        errors.extend(
            self.drop_origins(&c.target, &self.migration().cfg.name)
                .await,
        );
        if self.ctx().config.cutover().drop_slot_after_cutover {
            for note in self.pipeline.release_source().await {
                if note.contains("failed") {
                    errors.push(note);
                } else {
                    notes.push(note);
                }
            }
        } else {
            for note in self.pipeline.remove_ddl_capture().await {
                if note.contains("failed") {
                    errors.push(note);
                }
            }
        }
        m.close_window(why)
            .await
            .map_err(|e| CommandError::Failed(e.to_string()))?;
        let reason = if errors.is_empty() {
            format!("rollback window ended ({why})")
        } else {
            format!(
                "rollback window ended ({why}); left behind: {}",
                errors.join("; ")
            )
        };
        m.transition(State::Succeeded, Substate::Completed, Some(reason.clone()))
            .await
            .map_err(|e| CommandError::Failed(e.to_string()))?;
        Ok(json!({"message": reason, "released": notes, "left_behind": errors}))
    }

    /// The replication origins apply of `migration` (a direction's name)
    /// committed under on `server`.
    async fn drop_origins(&self, server: &crate::config::Endpoint, migration: &str) -> Vec<String> {
        let client = match crate::db::connect(server, "replication origins").await {
            Ok(c) => c,
            Err(e) => {
                return vec![format!(
                    "dropping replication origins on {}: {e}",
                    server.display()
                )];
            }
        };
        let mut errors = Vec::new();
        for db in &self.migration().cfg.databases {
            let origin = crate::replication::apply::origin_of(migration, db);
            if let Err(e) = client
                .execute(
                    "SELECT pg_replication_origin_drop(roname) FROM pg_replication_origin WHERE roname = $1",
                    &[&origin],
                )
                .await
            {
                errors.push(format!(
                    "{db}: dropping the replication origin {origin} on {}: {}",
                    server.display(),
                    crate::db::describe(&e)
                ));
            }
        }
        errors
    }

    /// Every second: the window's metrics, and its automatic end.
    pub(super) async fn window_tick(&self) {
        let open = self
            .migration()
            .window()
            .filter(|w| w.is_open())
            .and_then(|w| w.opened_at);
        let now = chrono::Utc::now().timestamp_millis() as f64 / 1000.0;
        self.window_metrics.open.set(i64::from(open.is_some()));
        self.window_metrics
            .open_seconds
            .set(open.map_or(0.0, |t| (now - t).max(0.0)));
        self.auto_complete().await;
    }

    /// The window ends by itself after `rollback_window`, or when a reverse
    /// slot holds back more than `rollback_max_retained_wal` on the target.
    async fn auto_complete(&self) {
        let m = self.migration();
        if m.state() != (State::Succeeded, Substate::RollbackAvailable)
            || self.cutover_running.load(Ordering::SeqCst)
        {
            return;
        }
        let Some(window) = m.window().filter(|w| w.is_open()) else {
            return;
        };
        let cfg = self.ctx().config.cutover();
        let open_for = window
            .opened_at
            .map(|t| chrono::Utc::now().timestamp_millis() as f64 / 1000.0 - t)
            .unwrap_or(0.0);
        let retained = self.reverse_retained_bytes().await;
        let why = match cfg.rollback_window {
            Some(limit) if open_for >= limit.0.as_secs_f64() => Some(format!(
                "open for {:?}, rollback_window {:?}",
                Duration::from_secs(open_for as u64),
                limit.0
            )),
            _ if retained > cfg.rollback_max_retained_wal.0 => Some(format!(
                "the reverse slots hold {retained} bytes of WAL on the target, over rollback_max_retained_wal {}",
                cfg.rollback_max_retained_wal.0
            )),
            _ => None,
        };
        if let Some(why) = why {
            tracing::warn!("the rollback window ends by itself: {why}");
            if let Err(e) = self.complete(&why).await {
                tracing::error!("cannot end the rollback window: {e}");
            }
        }
    }

    /// WAL the reverse slots hold back on the target, in bytes.
    pub(super) async fn reverse_retained_bytes(&self) -> u64 {
        let reverse = self.reverse.lock().await;
        reverse.iter().map(|s| s.status.retained_bytes()).sum()
    }
}

/// The rollback window's metrics.
#[derive(Clone)]
pub(crate) struct WindowMetrics {
    open: prometheus::IntGauge,
    open_seconds: prometheus::Gauge,
}

impl WindowMetrics {
    pub(crate) fn register(reg: &prometheus::Registry) -> WindowMetrics {
        use crate::telemetry::metrics as m;
        WindowMetrics {
            open: m::int_gauge(
                reg,
                "pgshift_rollback_window_open",
                "1 while the rollback window is open (clients on the target, reverse replication keeping the source current)",
            ),
            open_seconds: m::gauge(
                reg,
                "pgshift_rollback_window_open_seconds",
                "How long the open rollback window has been open, in seconds (0 when none is open)",
            ),
        }
    }
}

/// The `rollback` section of `/status`: the window and the last rollback.
pub(crate) struct RollbackStatus {
    pub(crate) migration: Arc<super::Migration>,
}

impl crate::telemetry::status::Report for RollbackStatus {
    fn report(&self) -> serde_json::Value {
        let Some(w) = self.migration.window() else {
            return json!({"window": "none"});
        };
        let now = chrono::Utc::now().timestamp_millis() as f64 / 1000.0;
        json!({
            "window": if w.is_open() { "open" } else if w.opened_at.is_some() { "closed" } else { "prepared" },
            "open_seconds": w.opened_at.filter(|_| w.is_open()).map(|t| (now - t).max(0.0)),
            "closed_reason": w.closed_reason,
            "reverse_slot_positions": w.reverse_points,
        })
    }
}
