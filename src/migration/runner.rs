//! The migration's task inside `pgshift run`: resumes from the persisted
//! state, drives the pipeline, keeps the streams running, and answers the
//! operator's commands and the automatic trigger.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde_json::json;
use tokio::sync::Mutex;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::pipeline::{Copied, Pipeline, PipelineError, cancel_message};
use super::{DatabasePhase, Migration, State, Substate};
use crate::commands::{AdminCommand, CommandError, CommandKind, CommandReceiver};
use crate::config::window::{self, Window};
use crate::config::{CutoverTrigger, CutoverVerify, MigrationMode};
use crate::context::Context;
use crate::cutover::fence::FenceRecord;
use crate::cutover::guard;
use crate::cutover::protocol::{
    self, CutoverHost, CutoverMetrics, Direction, HostError, LastCutover, Outcome,
};
use crate::fleet::Fleet;
use crate::proxy::ProxyHandle;
use crate::proxy::route::Route;
use crate::replication::Lsn;
use crate::replication::marker::MarkerConnection;
use crate::replication::names::ReplicationNames;
use crate::replication::stream::{DatabaseStream, StreamConfig, StreamMetrics};

/// How long the leader waits for its `gate` step to reach the members
/// before it closes its own gate all the same (a slow control database
/// then makes the members close after it, as they did before).
const GATE_STEP_WAIT: Duration = Duration::from_millis(50);

/// Connections the cutover uses inside the pause, opened (and their
/// statements prepared) before it.
pub(super) struct CutoverConns {
    pub(super) dbs: Vec<CutoverDb>,
}

/// One database's connections of an attempt. `source` and `target` are
/// the sides the clients leave and reach (a rollback's `source` is the
/// target server).
pub(super) struct CutoverDb {
    pub(super) database: String,
    pub(super) marker: MarkerConnection,
    /// Sequences: read on `source`, set on `target`.
    pub(super) source: tokio_postgres::Client,
    pub(super) target: tokio_postgres::Client,
    pub(super) sequences: crate::schema::SequenceSync,
}

/// Clears [`Runner::cutover_running`] when the attempt's task ends.
pub(super) struct RunningGuard(pub(super) Arc<AtomicBool>);

impl Drop for RunningGuard {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

pub struct Runner {
    pub(super) pipeline: Pipeline,
    /// Shared by the cutover's steps that run at the same time.
    cutover_conns: std::sync::Mutex<Option<Arc<CutoverConns>>>,
    streams: Mutex<Vec<DatabaseStream>>,
    /// Target → source, during the rollback window (`rollback.rs`).
    pub(super) reverse: Mutex<Vec<DatabaseStream>>,
    stream_metrics: StreamMetrics,
    pub(super) reverse_metrics: StreamMetrics,
    cutover_metrics: CutoverMetrics,
    pub(super) rollback_metrics: CutoverMetrics,
    last_cutover: LastCutover,
    pub(super) last_rollback: LastCutover,
    /// The attempt's snapshots for the verification after the switch.
    pub(super) snapshots: Mutex<super::verify_after::Snapshots>,
    pub(super) verify_status: super::verify_after::VerifyAfter,
    pub(super) window_metrics: super::rollback::WindowMetrics,
    /// The reverse slots being created for the running cutover.
    pub(super) reverse_setup: Mutex<Option<JoinHandle<Result<usize, HostError>>>>,
    /// Which way the running attempt moves the clients: the host's steps
    /// act on that direction's streams, fence and route.
    direction: std::sync::Mutex<Direction>,
    /// Set from the moment a cutover (or rollback) is accepted until it has
    /// finished: the state only says CompletingMigration once the attempt's
    /// task runs, and a second request in between must not start a second
    /// attempt.
    pub(super) cutover_running: Arc<AtomicBool>,
    /// DDL replication's shared state (status, operator decisions).
    ddl: Arc<crate::replication::ddl::DdlControl>,
    /// The fleet this member leads: the cutover takes every member along.
    pub(super) fleet: Arc<Fleet>,
    /// Ends this leader term (shutdown, or the lock lost).
    stop: CancellationToken,
}

/// What a leader's runner registers (metrics, status providers, DDL
/// control): made once per process, for every term this member leads.
pub(crate) struct LeaderParts {
    stream_metrics: StreamMetrics,
    reverse_metrics: StreamMetrics,
    cutover_metrics: CutoverMetrics,
    rollback_metrics: CutoverMetrics,
    copy_metrics: Option<crate::replication::copy::CopyMetrics>,
    last_cutover: LastCutover,
    last_rollback: LastCutover,
    verify_status: super::verify_after::VerifyAfter,
    window_metrics: super::rollback::WindowMetrics,
    ddl: Arc<crate::replication::ddl::DdlControl>,
    state_metric: prometheus::IntGaugeVec,
}

impl LeaderParts {
    pub(crate) fn new(ctx: &Arc<Context>, cfg: &crate::config::MigrationConfig) -> LeaderParts {
        let last_cutover = LastCutover::default();
        ctx.status
            .register("last_cutover", Arc::new(last_cutover.clone()));
        let last_rollback = LastCutover::default();
        ctx.status
            .register("last_rollback", Arc::new(last_rollback.clone()));
        let verify_status = super::verify_after::VerifyAfter::default();
        ctx.status
            .register("verify_after_switch", Arc::new(verify_status.clone()));
        let ddl = Arc::new(crate::replication::ddl::DdlControl::new(
            cfg.ddl,
            Some(&ctx.registry),
        ));
        ctx.status.register("ddl", ddl.clone());
        LeaderParts {
            stream_metrics: StreamMetrics::register(&ctx.registry),
            reverse_metrics: StreamMetrics::register_as(
                &ctx.registry,
                "pgshift_reverse",
                "Reverse replication (target to source, after the cutover): ",
            ),
            cutover_metrics: CutoverMetrics::new(&ctx.registry),
            rollback_metrics: CutoverMetrics::for_direction(&ctx.registry, Direction::Rollback),
            copy_metrics: crate::replication::copy::CopyMetrics::register(&ctx.registry).ok(),
            last_cutover,
            last_rollback,
            verify_status,
            window_metrics: super::rollback::WindowMetrics::register(&ctx.registry),
            ddl,
            state_metric: super::state_metric(&ctx.registry),
        }
    }

    pub(crate) fn state_metric(&self) -> prometheus::IntGaugeVec {
        self.state_metric.clone()
    }

    /// `/status` → `last_cutover` (a follower copies the leader's record).
    pub(crate) fn last_cutover(&self) -> &LastCutover {
        &self.last_cutover
    }
}

/// A member's time as the fleet's leader: its runner, stopped when the
/// member stops leading (its control connection, and with it the
/// migration's lock, is gone) or at shutdown.
pub(crate) struct LeaderTerm {
    migration: Arc<Migration>,
    stop: CancellationToken,
    task: JoinHandle<()>,
    commands: crate::commands::CommandSender,
}

impl LeaderTerm {
    /// Starts the runner on an opened migration (this member holds its lock).
    pub(crate) fn start(
        ctx: &Arc<Context>,
        proxy: &ProxyHandle,
        parts: &LeaderParts,
        fleet: &Arc<Fleet>,
        migration: Arc<Migration>,
    ) -> LeaderTerm {
        let stop = ctx.shutdown.child_token();
        let (tx, rx) = crate::commands::channel();
        ctx.status.register(
            "rollback",
            Arc::new(super::rollback::RollbackStatus {
                migration: migration.clone(),
            }),
        );
        let runner = Arc::new(Runner {
            pipeline: Pipeline {
                ctx: ctx.clone(),
                migration: migration.clone(),
                proxy: proxy.clone(),
                cancel: stop.child_token(),
                copy_metrics: parts.copy_metrics.clone(),
            },
            streams: Mutex::new(Vec::new()),
            reverse: Mutex::new(Vec::new()),
            cutover_conns: std::sync::Mutex::new(None),
            stream_metrics: parts.stream_metrics.clone(),
            reverse_metrics: parts.reverse_metrics.clone(),
            cutover_metrics: parts.cutover_metrics.clone(),
            rollback_metrics: parts.rollback_metrics.clone(),
            last_cutover: parts.last_cutover.clone(),
            last_rollback: parts.last_rollback.clone(),
            direction: std::sync::Mutex::new(Direction::Cutover),
            snapshots: Mutex::new(Default::default()),
            verify_status: parts.verify_status.clone(),
            window_metrics: parts.window_metrics.clone(),
            reverse_setup: Mutex::new(None),
            cutover_running: Arc::new(AtomicBool::new(false)),
            ddl: parts.ddl.clone(),
            fleet: fleet.clone(),
            stop: stop.clone(),
        });
        LeaderTerm {
            migration,
            stop,
            task: tokio::spawn(runner.drive(rx)),
            commands: tx,
        }
    }

    /// The control connection ended: the lock is gone.
    pub(crate) fn lost(&self) -> bool {
        self.migration.control_lost()
    }

    pub(crate) fn commands(&self) -> crate::commands::CommandSender {
        self.commands.clone()
    }

    /// Stops the runner and waits for its streams to stop.
    pub(crate) async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

impl Runner {
    pub(super) fn ctx(&self) -> &Arc<Context> {
        &self.pipeline.ctx
    }

    pub(super) fn migration(&self) -> &Arc<Migration> {
        &self.pipeline.migration
    }

    fn direction(&self) -> Direction {
        *self.direction.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn set_direction(&self, d: Direction) {
        *self.direction.lock().unwrap_or_else(|e| e.into_inner()) = d;
    }

    /// The streams the running attempt waits on: forward for a cutover,
    /// reverse for a rollback.
    async fn attempt_streams(&self) -> tokio::sync::MutexGuard<'_, Vec<DatabaseStream>> {
        match self.direction() {
            Direction::Cutover => self.streams.lock().await,
            Direction::Rollback => self.reverse.lock().await,
        }
    }

    /// Resumes from the persisted state, then serves commands until shutdown.
    async fn drive(self: Arc<Self>, mut commands: CommandReceiver) {
        if let Ok(Some(doc)) = self.migration().control().last_cutover_attempt().await
            && let Ok(r) = serde_json::from_value(doc)
        {
            self.last_cutover.set(r);
        }
        if let Ok(Some(doc)) = self.migration().control().last_rollback_attempt().await
            && let Ok(r) = serde_json::from_value(doc)
        {
            self.last_rollback.set(r);
        }
        let work = self.clone();
        let mut progress = tokio::spawn(async move { work.resume().await });
        let mut progress_done = false;
        let mut auto = tokio::time::interval(Duration::from_secs(1));
        let mut ready = tokio::time::interval(Duration::from_millis(200));
        let mut window_attempts = 0u32;
        let shutdown = self.stop.clone();
        loop {
            tokio::select! {
                r = &mut progress, if !progress_done => {
                    progress_done = true;
                    match r {
                        Ok(Ok(())) => {}
                        Ok(Err(PipelineError::Shutdown)) => {}
                        Ok(Err(e)) => self.fail(e.to_string()).await,
                        Err(e) => self.fail(format!("migration task failed: {e}")).await,
                    }
                }
                Some(cmd) = commands.recv() => self.command(cmd).await,
                _ = ready.tick() => self.update_readiness().await,
                _ = auto.tick() => {
                    self.auto_trigger(&mut window_attempts).await;
                    self.window_tick().await;
                }
                _ = shutdown.cancelled() => break,
            }
        }
        progress.abort();
        for s in self.streams.lock().await.drain(..) {
            s.stop().await;
        }
        self.stop_reverse_streams().await;
    }

    async fn fail(&self, reason: String) {
        tracing::error!("migration failed: {reason}");
        if let Err(e) = self
            .migration()
            .transition(State::Failed, Substate::None, Some(reason))
            .await
        {
            tracing::error!("cannot persist the failure: {e}");
        }
    }

    /// Continues from wherever the persisted state says the migration is.
    async fn resume(&self) -> Result<(), PipelineError> {
        let m = self.migration();
        let (state, substate) = m.state();
        let step = |e: HostError| PipelineError::Step {
            db: "-".into(),
            step: "resuming the rollback window",
            message: e.to_string(),
        };
        if m.switched() {
            if substate == Substate::RollingBack {
                // Stopped inside a rollback, before its switch.
                self.undo_interrupted_rollback().await.map_err(step)?;
            }
            match m.state() {
                (State::Succeeded, Substate::RollbackAvailable) => {
                    self.start_reverse_streams().await
                }
                (State::Succeeded, _) => {}
                // Stopped after the point of no return: finish the cleanup.
                _ => self.finish_after_switch().await?,
            }
            return Ok(());
        }
        if m.window().is_some_and(|w| w.target_fence.is_some()) {
            // Stopped after a rollback's switch, before its cleanup.
            return self.resume_after_rollback().await.map_err(step);
        }
        let streaming = m.cfg.databases.iter().all(|db| {
            m.database_row(db)
                .is_some_and(|r| r.phase == DatabasePhase::Streaming)
        });
        match (state, substate) {
            // A validation-only run (option = validate) that passed: run
            // again, it validates again (and goes on if the option changed).
            (State::Succeeded, _) if !m.switched() => {
                tracing::info!("the last run only validated; validating again");
                self.start_over().await
            }
            (State::ValidationFailed, _) => {
                // The operator may have fixed the cause: validate again (the
                // earlier failure stays in the event history).
                tracing::info!(
                    reason = m.row().reason.as_deref().unwrap_or(""),
                    "the last validation failed; validating again"
                );
                self.start_over().await
            }
            (State::Succeeded | State::Failed | State::Canceled, _) => {
                tracing::info!(state = %state, "migration is finished; the proxy keeps serving");
                Ok(())
            }
            (State::InProgress, Substate::CompletingMigration)
            | (State::WaitingForUserAction, Substate::WaitingForCutoverTrigger) => {
                self.resume_streaming().await
            }
            // Copied and streaming, but not ready when it stopped.
            (State::InProgress, Substate::MigratingData)
                if streaming && m.cfg.mode == MigrationMode::Online =>
            {
                self.resume_streaming().await
            }
            _ => self.start_over().await,
        }
    }

    /// Streaming again from where the target's origins are, after lifting
    /// whatever an interrupted cutover left.
    async fn resume_streaming(&self) -> Result<(), PipelineError> {
        self.undo_interrupted_cutover().await?;
        let copied = self.copied_databases();
        self.start_streaming(copied).await
    }

    async fn start_over(&self) -> Result<(), PipelineError> {
        let p = &self.pipeline;
        p.prerequisites().await?;
        if !p.validation().await? {
            return Ok(());
        }
        match p.cfg().mode {
            MigrationMode::Offline => p.offline().await,
            MigrationMode::Online => {
                let copied = p.copy_all().await?;
                self.start_streaming(copied).await
            }
        }
    }

    pub(super) fn copied_databases(&self) -> Vec<Copied> {
        let m = self.migration();
        m.cfg
            .databases
            .iter()
            .map(|db| Copied {
                database: db.clone(),
                consistent_point: m
                    .database_row(db)
                    .and_then(|r| r.consistent_point)
                    .and_then(|s| s.parse().ok()),
            })
            .collect()
    }

    /// A pgshift stopped inside a cutover before the point of no return:
    /// the source may still be fenced. Lift it; clients saw only a pause.
    async fn undo_interrupted_cutover(&self) -> Result<(), PipelineError> {
        let m = self.migration();
        let unfinished = m.control().unfinished_cutover().await?;
        if let Some((id, mut report)) = unfinished {
            if let Some(rec) = report
                .get("fence")
                .and_then(|f| serde_json::from_value::<FenceRecord>(f.clone()).ok())
            {
                self.pipeline.lift_fence_until_done(&rec).await?;
            }
            let reason = format!(
                "cutover {id} was interrupted by a pgshift restart before the switch; the gate is open and the fence (if any) lifted"
            );

            // Keep the phases it got through: they tell where it stopped.
            if !report.is_object() {
                report = json!({"id": id, "phases": []});
            }
            report["outcome"] = json!(Outcome::Interrupted);
            report["reason"] = json!(reason);
            m.control()
                .save_cutover_attempt(&id, Outcome::Interrupted.as_str(), Some(&reason), &report)
                .await?;
            // Members still holding their gates for it open them now.
            self.fleet.announce_interrupted(&id).await;
            if let Ok(r) = serde_json::from_value(report) {
                self.last_cutover.set(r);
            }
            // Not ready until the streams run again (see update_readiness).
            m.transition(State::InProgress, Substate::MigratingData, Some(reason))
                .await?;
        }
        Ok(())
    }

    pub(super) async fn start_streaming(&self, copied: Vec<Copied>) -> Result<(), PipelineError> {
        let m = self.migration();
        let c = &self.ctx().config;
        let reverse = self.reverse_name();
        for s in &copied {
            self.guard_target(&s.database).await;
        }
        let mut streams = self.streams.lock().await;
        for s in copied {
            let stream = DatabaseStream::start(
                StreamConfig {
                    migration: m.cfg.name.clone(),
                    database: s.database.clone(),
                    source: c.source.clone(),
                    target: c.target.clone(),
                    consistent_point: s.consistent_point.unwrap_or(Lsn::ZERO),
                    ddl: Some(crate::replication::stream::StreamDdl {
                        control: self.ddl.clone(),
                        filter: crate::filter::TableFilter::from_migration(&m.cfg),
                        // Tables DDL creates are guarded like the copied ones.
                        after_create: Some(crate::cutover::guard::guard_new_tables_sql()),
                    }),
                    // After a rollback: what reverse apply wrote on the source.
                    drop_origin: Some(crate::replication::apply::origin_of(&reverse, &s.database)),
                    decoding_work_mem: Some(m.cfg.logical_decoding_work_mem.0),
                },
                self.stream_metrics.clone(),
            );
            m.attach(&s.database, "stream", stream.status.clone());
            m.set_database(&s.database, |d| d.phase = DatabasePhase::Streaming)
                .await?;
            streams.push(stream);
        }
        drop(streams);
        // Ready for cutover only once every stream is connected and
        // applying: see update_readiness.
        m.transition(
            State::InProgress,
            Substate::MigratingData,
            Some(
                "streaming changes; ready for cutover once every database streams and applies"
                    .into(),
            ),
        )
        .await?;
        Ok(())
    }

    /// WaitingForCutoverTrigger means ready: every database's stream is
    /// connected and applying. Moves between that and MigratingData as the
    /// streams' health changes (not while a cutover runs or after the switch).
    async fn update_readiness(&self) {
        let m = self.migration();
        if m.switched() || self.cutover_running.load(Ordering::SeqCst) {
            return;
        }
        let health = {
            let streams = self.streams.lock().await;
            if streams.is_empty() {
                return;
            }
            streams_health(&streams)
        };
        let next = match (m.state(), health) {
            ((State::InProgress, Substate::MigratingData), Ok(_)) => (
                State::WaitingForUserAction,
                Substate::WaitingForCutoverTrigger,
                None,
            ),
            ((State::WaitingForUserAction, Substate::WaitingForCutoverTrigger), Err(e)) => (
                State::InProgress,
                Substate::MigratingData,
                Some(format!("not ready for cutover: {e}")),
            ),
            _ => return,
        };
        if let Err(e) = m.transition(next.0, next.1, next.2).await {
            tracing::warn!("cannot persist the migration state: {e}");
        }
    }

    async fn command(self: &Arc<Self>, cmd: AdminCommand) {
        let reply = match cmd.kind {
            CommandKind::Cutover => match self.stream_health().await {
                // Refused at once: a broken stream cannot deliver the marker,
                // and clients must not wait for that.
                Err(e) => Err(CommandError::Conflict(format!(
                    "cutover refused: replication is not healthy: {e}"
                ))),
                Ok(_) => self.clone().start_cutover("manual"),
            },
            CommandKind::Cancel => self.cancel().await,
            CommandKind::Rollback => self.clone().start_rollback().await,
            CommandKind::Complete => self.complete("completed by the operator").await,
            CommandKind::Ddl { action, database } => self.ddl_command(action, database).await,
        };
        let _ = cmd.reply.send(reply);
    }

    /// `pgshift ddl skip|retry|apply`: what to do about the schema change
    /// that stopped apply in a database.
    async fn ddl_command(
        &self,
        action: crate::commands::DdlAction,
        database: Option<String>,
    ) -> Result<serde_json::Value, CommandError> {
        use crate::commands::DdlAction;
        let stopped = self.ddl.stopped_databases();
        let db = match database {
            Some(db) => db,
            None if stopped.len() == 1 => stopped[0].clone(),
            None if stopped.is_empty() => {
                return Err(CommandError::Conflict(
                    "apply is not stopped on a schema change in any database".into(),
                ));
            }
            None => {
                return Err(CommandError::Conflict(format!(
                    "apply is stopped on a schema change in several databases ({}): name one with --database",
                    stopped.join(", ")
                )));
            }
        };
        let Some(stop) = self.ddl.stop_of(&db) else {
            return Err(CommandError::Conflict(format!(
                "apply is not stopped on a schema change in database {db}"
            )));
        };
        match action {
            DdlAction::Retry => {
                tracing::info!(database = %db, "DDL retry requested by the operator");
                self.ddl.retry_now(&db);
                Ok(json!({"database": db, "message": "apply tries again now"}))
            }
            DdlAction::Skip => {
                let Some(id) = stop.id else {
                    return Err(CommandError::Conflict(format!(
                        "apply in database {db} stopped on a table that no longer matches the target, not on a replicated DDL command: run `pgshift ddl apply` to run the ready command, or change the target by hand and run `pgshift ddl retry`"
                    )));
                };
                tracing::warn!(database = %db, id = %id, "DDL skipped by the operator");
                self.ddl.skip(&db, &id);
                Ok(
                    json!({"database": db, "skipped": id, "statement": stop.statement,
                          "message": "the command is skipped; apply goes on"}),
                )
            }
            DdlAction::Apply => {
                let (None, Some(sql)) = (&stop.id, &stop.statement) else {
                    return Err(CommandError::Conflict(match stop.id {
                        Some(_) => format!(
                            "apply in database {db} stopped on a replicated DDL command the target refused: change the target and run `pgshift ddl retry`, or `pgshift ddl skip`"
                        ),
                        None => format!(
                            "there is no ready command for database {db}: {}; change the target by hand, then run `pgshift ddl retry`",
                            stop.error
                        ),
                    }));
                };
                let target = self.ctx().config.target.with_dbname(&db);
                let client = crate::db::connect(&target, "target (ddl apply)")
                    .await
                    .map_err(|e| CommandError::Failed(e.to_string()))?;
                client.batch_execute(sql).await.map_err(|e| {
                    CommandError::Failed(format!(
                        "running on the target database {db}: {sql}: {}",
                        crate::db::describe(&e)
                    ))
                })?;
                tracing::info!(database = %db, "schema change applied on the target by the operator: {sql}");
                self.ddl.retry_now(&db);
                Ok(
                    json!({"database": db, "applied": sql, "message": "applied on the target; apply goes on"}),
                )
            }
        }
    }

    /// Starts a cutover in the background; the answer carries its id.
    fn start_cutover(self: Arc<Self>, trigger: &str) -> Result<serde_json::Value, CommandError> {
        let (state, substate) = self.migration().state();
        if (state, substate)
            != (
                State::WaitingForUserAction,
                Substate::WaitingForCutoverTrigger,
            )
        {
            return Err(CommandError::Conflict(format!(
                "cutover is allowed only in WaitingForUserAction/WaitingForCutoverTrigger; the migration is {state}/{substate}"
            )));
        }
        if self.cutover_running.swap(true, Ordering::SeqCst) {
            return Err(CommandError::Conflict(
                "a cutover is already running; wait for it to finish or abort".into(),
            ));
        }
        let id = format!(
            "{}-{}",
            chrono::Utc::now().format("%Y%m%dT%H%M%S"),
            rand::random::<u32>() % 100_000
        );
        let this = self.clone();
        let id2 = id.clone();
        tracing::info!(trigger, cutover = %id, "cutover requested");
        let running = RunningGuard(self.cutover_running.clone());
        tokio::spawn(async move {
            // Cleared however the attempt ends, also if its task panics.
            let _running = running;
            let ctx = this.ctx().clone();
            let round = this.fleet.begin_round(&id2).await;
            tracing::info!(cutover = %id2, members = round_members(&this.fleet), "fleet cutover: every live member takes part");
            this.set_direction(Direction::Cutover);
            let report = protocol::run(
                &ctx,
                this.migration().as_ref(),
                this.as_ref(),
                &this.cutover_metrics,
                &this.last_cutover,
                id2,
            )
            .await;
            drop(round);
            this.fleet.end_round();
            this.drop_cutover_conns();
            if report.outcome == Outcome::Succeeded {
                this.spawn_verify_after(report.id.clone());
            }
        });
        Ok(json!({"id": id, "message": "cutover started"}))
    }

    async fn cancel(&self) -> Result<serde_json::Value, CommandError> {
        let m = self.migration();
        if m.switched() {
            return Err(CommandError::Conflict(
                "the migration is past the point of no return (every session runs on the target); it cannot be canceled".into(),
            ));
        }
        let (state, substate) = m.state();
        if self.cutover_running.load(Ordering::SeqCst)
            || (state == State::InProgress && substate == Substate::CompletingMigration)
        {
            return Err(CommandError::Conflict(
                "a cutover is running; wait for it to finish or abort".into(),
            ));
        }
        if state.is_terminal() {
            return Err(CommandError::Conflict(format!(
                "the migration is already {state}"
            )));
        }
        self.pipeline.cancel.cancel();
        for s in self.streams.lock().await.drain(..) {
            s.stop().await;
        }
        let mut notes = self.pipeline.release_source().await;
        notes.extend(self.remove_target_guards().await);
        m.transition(
            State::Canceled,
            Substate::None,
            Some(
                "canceled by the operator; slots and publications released, target left as is"
                    .into(),
            ),
        )
        .await
        .map_err(|e| CommandError::Failed(e.to_string()))?;
        Ok(cancel_message(&notes))
    }

    /// Automatic cutover: inside a window, when lag is small, at most
    /// `max_attempts` times per window.
    async fn auto_trigger(self: &Arc<Self>, attempts: &mut u32) {
        let cfg = self.ctx().config.cutover();
        if cfg.trigger != CutoverTrigger::Auto {
            return;
        }
        let windows: Vec<Window> = cfg
            .window
            .as_ref()
            .map(|w| window::parse_all(&w.list()).unwrap_or_default())
            .unwrap_or_default();
        let now = chrono::Utc::now();
        if !windows.iter().any(|w| w.contains(now)) {
            *attempts = 0;
            return;
        }
        if self.migration().state()
            != (
                State::WaitingForUserAction,
                Substate::WaitingForCutoverTrigger,
            )
            || *attempts >= cfg.max_attempts
        {
            return;
        }
        let streams = self.streams.lock().await;
        if streams_health(&streams).is_err() {
            return;
        }
        let max_lag = streams
            .iter()
            .map(|s| s.status.lag_bytes())
            .max()
            .unwrap_or(0);
        drop(streams);
        if max_lag >= cfg.start_when_lag_below.0 {
            return;
        }
        // Only an attempt that really started counts toward max_attempts
        // (a manual one may have been accepted a moment ago).
        if self.clone().start_cutover("auto").is_ok() {
            *attempts += 1;
            tracing::info!(
                attempt = *attempts,
                max_lag,
                "inside the maintenance window with small lag: cutover started"
            );
        }
    }

    /// After the switch: streams stopped, slots released (if configured),
    /// databases marked switched, state Succeeded.
    async fn finish_after_switch(&self) -> Result<(), PipelineError> {
        let drop_slot = self.ctx().config.cutover().drop_slot_after_cutover;
        self.finish_replication(drop_slot)
            .await
            .map_err(|e| PipelineError::Step {
                db: "-".into(),
                step: "cleanup after the switch",
                message: e.to_string(),
            })?;
        self.close_switched_attempt().await?;
        let window = self.migration().window().is_some_and(|w| w.is_open());
        let substate = if window {
            Substate::RollbackAvailable
        } else {
            Substate::Completed
        };
        self.migration()
            .transition(State::Succeeded, substate, None)
            .await?;
        Ok(())
    }

    /// A rollback's attempt that reached its switch before pgshift
    /// stopped: recorded as succeeded.
    pub(super) async fn close_switched_attempt_of(&self, rollback: bool) {
        let m = self.migration();
        let Ok(Some((id, mut report))) = m.control().unfinished_cutover().await else {
            return;
        };
        if id.starts_with("rollback-") != rollback {
            return;
        }
        if !report.is_object() {
            report = json!({"id": id, "phases": []});
        }
        report["outcome"] = json!(Outcome::Succeeded);
        report["reason"] =
            json!("pgshift restarted after the switch; cleanup finished after the restart");
        let reason = report["reason"].as_str().map(str::to_string);
        let _ = m
            .control()
            .save_cutover_attempt(&id, Outcome::Succeeded.as_str(), reason.as_deref(), &report)
            .await;
        if let Ok(r) = serde_json::from_value(report) {
            self.last_rollback.set(r);
        }
    }

    /// The attempt that reached the switch before pgshift stopped succeeded:
    /// record it so, with the cleanup that finished after the restart.
    async fn close_switched_attempt(&self) -> Result<(), PipelineError> {
        let m = self.migration();
        let Some((id, mut report)) = m.control().unfinished_cutover().await? else {
            return Ok(());
        };
        if !report.is_object() {
            report = json!({"id": id, "phases": []});
        }
        report["outcome"] = json!(Outcome::Succeeded);
        report["reason"] =
            json!("pgshift restarted after the switch; cleanup finished after the restart");
        if let Some(phases) = report["phases"].as_array_mut() {
            phases.push(json!({"phase": "cleanup", "seconds": 0.0, "outcome": "ok",
                               "detail": "after a restart"}));
        }
        let reason = report["reason"].as_str().map(str::to_string);
        m.control()
            .save_cutover_attempt(&id, Outcome::Succeeded.as_str(), reason.as_deref(), &report)
            .await?;
        if let Ok(r) = serde_json::from_value(report) {
            self.last_cutover.set(r);
        }
        Ok(())
    }
}

impl Runner {
    /// Guards `db` on the target against application writes until the
    /// switch ([`guard`]). A guard that cannot go up (e.g. the target user
    /// may not create triggers) is logged: it protects against mistakes, the
    /// migration does not depend on it.
    pub(super) async fn guard_target(&self, db: &str) {
        let target = &self.ctx().config.target;
        let r = match crate::db::connect(&target.with_dbname(db), "target (guard)").await {
            Ok(c) => guard::install(&c).await.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        match r {
            Ok(n) => tracing::info!(
                database = db,
                new_tables = n,
                "target guarded against application writes until the switch"
            ),
            Err(e) => tracing::warn!(
                database = db,
                "the target is not guarded against application writes: {e}"
            ),
        }
    }

    /// Drops the target's guard on every migrated database (after the
    /// switch, or on cancel); returns what failed.
    async fn remove_target_guards(&self) -> Vec<String> {
        self.remove_guards(&self.ctx().config.target, "target")
            .await
    }

    /// Drops the guard on every migrated database of `server` (the
    /// target's after a cutover, the source's after a rollback); returns
    /// what failed.
    pub(super) async fn remove_guards(
        &self,
        server: &crate::config::Endpoint,
        side: &str,
    ) -> Vec<String> {
        let mut errors = Vec::new();
        for db in &self.migration().cfg.databases {
            let what = format!("{side} (guard)");
            let r = match crate::db::connect(&server.with_dbname(db), &what).await {
                Ok(c) => guard::remove(&c, &server.user)
                    .await
                    .map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            if let Err(e) = r {
                errors.push(format!("{db}: removing the {side}'s guard failed: {e}"));
            }
        }
        errors
    }

    /// Arms or disarms the guard on every database, on the attempt's own
    /// connections to the side the clients reach, all at once.
    async fn set_guards(&self, armed: bool) -> Result<(), HostError> {
        let conns = self.cutover_conns()?;
        // The side the clients reach (the source for a rollback).
        let user = match self.direction() {
            Direction::Cutover => &self.ctx().config.target.user,
            Direction::Rollback => &self.ctx().config.source.user,
        };
        let sets = conns
            .dbs
            .iter()
            .map(|c| guard::set_armed(&c.target, user, armed));
        HostError::join(
            conns
                .dbs
                .iter()
                .zip(futures_util::future::join_all(sets).await)
                .map(|(c, r)| {
                    r.map_err(|source| HostError::Guard {
                        database: c.database.clone(),
                        source,
                    })
                }),
        )
    }

    /// Before anything of the cutover: every live session gets a backend
    /// on the target (pre-warmed now, used after the switch), and the
    /// cutover opens one connection per database there. A target that
    /// cannot take them all would drop sessions at the switch: refused
    /// here, before clients are paused, with the setting that makes room.
    async fn check_target_room(&self) -> Result<(), HostError> {
        let target = &self.ctx().config.target;
        let c = crate::db::connect(target, "target (connection slots)").await?;
        let sql_err = |source| HostError::Sql {
            database: target.dbname.clone(),
            what: "reading the connection slots",
            source,
        };
        let v = crate::pg::Version::of(&c).await.map_err(sql_err)?;
        let slots = crate::pg::activity::Slots::of(&c, v)
            .await
            .map_err(sql_err)?;
        drop(c);
        // Without the reading connection, closed again.
        let slots = crate::pg::activity::Slots {
            used: (slots.used - 1).max(0),
            ..slots
        };
        // Every member's sessions move to the target.
        let sessions = i32::try_from(self.pipeline.proxy.sessions().len())
            .unwrap_or(i32::MAX)
            .saturating_add(self.fleet.remote_sessions());
        // The cutover's own connection per database, and the snapshot's
        // for the verification after the switch.
        let per_db = if self.ctx().config.cutover().verify_after == CutoverVerify::Off {
            1
        } else {
            2
        };
        let own = i32::try_from(self.migration().cfg.databases.len() * per_db).unwrap_or(i32::MAX);
        if sessions.saturating_add(own) > slots.free() {
            return Err(HostError::NoRoom {
                slots,
                sessions,
                own,
            });
        }
        Ok(())
    }

    /// Each move is bounded by twice the connect timeout; waiting a little
    /// longer lets every session either move or be dropped before the gate
    /// opens, so the counts are final.
    fn move_timeout(&self) -> Duration {
        self.ctx().config.proxy().server_connect_timeout.0 * 2 + Duration::from_secs(1)
    }

    /// Members that did not confirm the switch keep their gates closed
    /// until they read it; their sessions' source backends, spared by the
    /// fence, are ended now, so none of them can write on the source
    /// whatever that member does later.
    async fn end_late_members(&self, late: &[String]) {
        let pids = self.fleet.source_pids_of(late);
        tracing::warn!(
            members = %late.join(", "),
            backends = pids.len(),
            "fleet: member(s) did not confirm the switch; ending their sessions' backends on the source"
        );
        let Ok(conns) = self.cutover_conns() else {
            return;
        };
        let Some(db) = conns.dbs.first() else { return };
        if let Err(e) = db
            .source
            .execute(
                "SELECT pg_terminate_backend(p) FROM unnest($1::int4[]) AS p",
                &[&pids],
            )
            .await
        {
            tracing::error!(
                "cannot end late members' backends on the source: {}",
                crate::db::describe(&e)
            );
        }
    }

    pub(super) fn set_cutover_conns(&self, dbs: Vec<CutoverDb>) {
        *self.cutover_conns.lock().unwrap_or_else(|e| e.into_inner()) =
            Some(Arc::new(CutoverConns { dbs }));
    }

    /// The attempt is over: its connections close.
    pub(super) fn drop_cutover_conns(&self) {
        self.cutover_conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
    }

    pub(super) fn cutover_conns(&self) -> Result<Arc<CutoverConns>, HostError> {
        self.cutover_conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or(HostError::NotPrepared)
    }
}

impl CutoverHost for Runner {
    async fn prepare(&self) -> Result<(), HostError> {
        if self.direction() == Direction::Rollback {
            return self.prepare_rollback().await;
        }
        let c = &self.ctx().config;
        self.check_target_room().await?;
        if c.cutover().rollback {
            // Before the switch: nothing clients write on the target
            // afterwards can be missed.
            self.prepare_reverse().await;
        }
        if let Err(e) = self.connect_snapshots().await {
            tracing::warn!("the verification after the switch will not run: {e}");
        }
        let mut dbs = Vec::new();
        for db in &self.migration().cfg.databases {
            let names = ReplicationNames::new(&self.migration().cfg.name, db);
            let marker = MarkerConnection::connect(&c.source.with_dbname(db), &names)
                .await
                .map_err(|source| HostError::MarkerConnection {
                    database: db.clone(),
                    source,
                })?;
            let source =
                crate::db::connect(&c.source.with_dbname(db), "source (sequences)").await?;
            let target =
                crate::db::connect(&c.target.with_dbname(db), "target (sequences)").await?;
            // The switch's synchronous commit on the same target server
            // flushes these writes before any client runs there.
            target
                .batch_execute("SET synchronous_commit = off")
                .await
                .map_err(|source| HostError::Sql {
                    database: db.clone(),
                    what: "configuring the target connection",
                    source,
                })?;
            // Tables created by replicated DDL since streaming began get
            // their guard too; this connection lifts it at the switch. Not
            // fatal, as when streaming starts (see `guard_target`).
            if let Err(e) = guard::install(&target).await {
                tracing::warn!(database = %db, "the target is not guarded against application writes: {e}");
            }
            let sequences = crate::schema::SequenceSync::prepare(&source, &target)
                .await
                .map_err(|source| HostError::Sequences {
                    database: db.clone(),
                    source,
                })?;
            dbs.push(CutoverDb {
                database: db.clone(),
                marker,
                source,
                target,
                sequences,
            });
        }
        self.set_cutover_conns(dbs);
        Ok(())
    }

    async fn prewarm(&self) -> usize {
        if self.direction() == Direction::Rollback {
            // The rollback's prepare lifted the source's fence (guarded).
            return self
                .pipeline
                .proxy
                .prewarm(Route::from_endpoint("source", &self.ctx().config.source))
                .await;
        }
        self.fleet.post("prewarm");
        let timeout = self.move_timeout();
        let (local, remote) = tokio::join!(
            self.pipeline
                .proxy
                .prewarm(Route::from_endpoint("target", &self.ctx().config.target)),
            self.fleet.wait_prewarmed(timeout)
        );
        local + remote
    }

    fn discard_prewarm(&self) {
        self.pipeline.proxy.discard_prewarm();
    }

    async fn close_gate(&self) {
        // The members are told first: each closes its gate as this one
        // does, so the drain waits for one hop less.
        self.fleet.post_and_wait("gate", GATE_STEP_WAIT).await;
        self.pipeline.proxy.gate().close();
    }

    fn open_gate(&self) {
        // Only an abort reopens on the source; members read the attempt's
        // outcome before they do.
        self.pipeline.proxy.gate().open();
        self.fleet.post("abort");
    }

    fn in_transaction(&self) -> usize {
        self.pipeline.proxy.gate().sessions_in_transaction() + self.fleet.remote_in_transaction()
    }

    async fn wait_idle(&self, timeout: Duration) -> bool {
        let (local, members) = tokio::join!(
            tokio::time::timeout(timeout, self.pipeline.proxy.gate().drained()),
            self.fleet.wait_drained(timeout)
        );
        local.is_ok() && members
    }

    fn drain_note(&self) -> Option<String> {
        let late = self.fleet.not_drained();
        if late.is_empty() {
            self.fleet.drain_note()
        } else {
            Some(format!("member(s) not drained: {}", late.join(", ")))
        }
    }

    async fn wait_quiet(&self, timeout: Duration) -> bool {
        self.pipeline.proxy.wait_quiet(timeout).await
    }

    async fn cancel_in_transaction(&self) -> usize {
        self.fleet.post("cancel");
        self.pipeline.proxy.cancel_busy_sessions().await
    }

    async fn terminate_in_transaction(&self) -> usize {
        self.fleet.post("terminate");
        self.pipeline.proxy.terminate_busy_sessions(
            "terminating connection: pgshift cutover could not wait for this transaction",
        )
    }

    fn source_backend_pids(&self) -> Vec<i32> {
        if self.direction() == Direction::Rollback {
            return self.pipeline.proxy.backend_pids("target");
        }
        let mut pids = self.pipeline.proxy.source_backend_pids();
        pids.extend(self.fleet.remote_source_pids());
        pids
    }

    async fn emit_markers(&self, id: &str) -> Result<(), HostError> {
        let streams = self.attempt_streams().await;
        let conns = self.cutover_conns()?;
        let emits = streams.iter().map(|s| async {
            match conns.dbs.iter().find(|c| c.database == s.database) {
                Some(c) => s
                    .emit_marker(&c.marker, id)
                    .await
                    .map(|_| ())
                    .map_err(HostError::from),
                None => Err(HostError::NotPrepared),
            }
        });
        HostError::join(futures_util::future::join_all(emits).await)
    }

    async fn wait_markers(&self, id: &str, timeout: Duration) -> Result<(), HostError> {
        let streams = self.attempt_streams().await;
        let waits = streams.iter().map(|s| s.wait_marker(id, timeout));
        let results = futures_util::future::join_all(waits).await;
        HostError::join(results.into_iter().map(|r| r.map_err(HostError::from)))
    }

    async fn stream_health(&self) -> Result<(), HostError> {
        let streams = self.attempt_streams().await;
        streams_health(&streams)
    }

    async fn sync_sequences(&self) -> Result<u64, HostError> {
        let conns = self.cutover_conns()?;
        // Every database at once: each has its own connections.
        let syncs = conns.dbs.iter().map(|c| async move {
            let values = c.sequences.read(&c.source).await?;
            c.sequences.write(&c.target, &values).await
        });
        let mut n = 0;
        for (c, r) in conns
            .dbs
            .iter()
            .zip(futures_util::future::join_all(syncs).await)
        {
            n += r
                .map_err(|source| HostError::Sequences {
                    database: c.database.clone(),
                    source,
                })?
                .copied as u64;
        }
        Ok(n)
    }

    async fn verify(&self, mode: CutoverVerify) -> Result<String, HostError> {
        let c = &self.ctx().config;
        let vm = match mode {
            CutoverVerify::Checksums => crate::verify::VerifyMode::Checksums,
            _ => crate::verify::VerifyMode::Counts,
        };
        let mut tables = 0;
        let mut bad = Vec::new();
        for db in &self.migration().cfg.databases {
            let r = crate::verify::verify_database(&c.source, &c.target, db, vm).await?;
            tables += r.tables.len();
            bad.extend(r.mismatches().map(|t| format!("{db}.{}", t.table)));
        }
        if bad.is_empty() {
            Ok(format!("{tables} table(s) match"))
        } else {
            Err(HostError::Mismatch { tables: bad })
        }
    }

    async fn abandon(&self) {
        match self.direction() {
            Direction::Cutover => {
                self.drop_snapshots().await;
                self.abandon_reverse().await;
            }
            // The source's fence was lifted at prepare: up again.
            Direction::Rollback => self.refence_source().await,
        }
    }

    async fn before_gate(&self) -> Result<Option<String>, HostError> {
        if self.direction() == Direction::Rollback {
            return Ok(None);
        }
        self.reverse_ready().await
    }

    async fn hold_snapshots(&self) -> Result<Option<String>, HostError> {
        self.export_snapshots().await
    }

    async fn lift_target_guard(&self) -> Result<(), HostError> {
        self.set_guards(false).await
    }

    async fn rearm_target_guard(&self) {
        if let Err(e) = self.set_guards(true).await {
            tracing::error!("cannot guard the target again after an aborted switch: {e}");
        }
    }

    async fn switch_to_target(&self) -> (u64, u64) {
        let proxy = &self.pipeline.proxy;
        let c = &self.ctx().config;
        let route = match self.direction() {
            // The switch is committed: the members move at the same time
            // (its commit notified them).
            Direction::Cutover => Route::from_endpoint("target", &c.target),
            Direction::Rollback => Route::from_endpoint("source", &c.source),
        };
        let timeout = self.move_timeout();
        let (moved, dropped) = proxy.switch_to(route, timeout).await;
        proxy.gate().open();
        (moved, dropped)
    }

    async fn confirm_switch(&self) -> Option<(u64, u64, String)> {
        if self.fleet.participants() == 0 {
            return None;
        }
        let members = self.fleet.wait_switched(self.move_timeout()).await;
        if !members.late.is_empty() {
            self.end_late_members(&members.late).await;
        }
        let mut note = format!("{} other member(s) switched", members.pauses.len());
        if let Some(max) = members.pauses.values().copied().reduce(f64::max) {
            note.push_str(&format!(", their longest pause {:.1} ms", max * 1000.0));
        }
        if !members.late.is_empty() {
            note.push_str(&format!(
                "; late, their source backends ended: {}",
                members.late.join(", ")
            ));
        }
        Some((members.moved, members.dropped, note))
    }

    async fn finish_replication(&self, drop_slot: bool) -> Result<(), HostError> {
        if self.direction() == Direction::Rollback {
            return self.finish_rollback().await;
        }
        for s in self.streams.lock().await.drain(..) {
            s.stop().await;
        }
        // Lifted at the switch; now its triggers go (each locks its table briefly).
        let mut errors = self.remove_target_guards().await;
        // With a rollback window the forward slot, publication and DDL
        // capture stay until it ends: a rollback resumes from them.
        let window = self.migration().window().is_some_and(|w| w.is_open());
        if window {
            self.start_reverse_streams().await;
        }
        // The source's DDL capture goes whether or not the slots stay.
        for note in self
            .pipeline
            .remove_ddl_capture()
            .await
            .into_iter()
            .filter(|_| !window)
        {
            if note.contains("failed") {
                errors.push(note);
            } else {
                tracing::info!("{note}");
            }
        }
        if drop_slot && !window {
            for note in self.pipeline.release_source().await {
                if note.contains("failed") {
                    errors.push(note);
                }
            }
        }
        for db in self.migration().cfg.databases.clone() {
            if let Err(e) = self
                .migration()
                .set_database(&db, |d| d.phase = DatabasePhase::Switched)
                .await
            {
                errors.push(e.to_string());
            }
        }
        self.refresh_views_in_background();
        if errors.is_empty() {
            Ok(())
        } else {
            Err(HostError::Cleanup(errors))
        }
    }
}

impl Runner {
    /// Materialized views on the target hold what they held after the copy:
    /// refresh them from the switched data. Clients already run on the
    /// target, so this runs in the background, outside any pause.
    fn refresh_views_in_background(&self) {
        let target = self.ctx().config.target.clone();
        for db in self.migration().cfg.databases.clone() {
            let target = target.clone();
            tokio::spawn(async move {
                if let Err(e) =
                    crate::schema::refresh_materialized_views(&target, &db, "after the switch")
                        .await
                {
                    tracing::warn!(database = %db, "materialized views not refreshed after the switch: {e}");
                }
            });
        }
    }
}

/// Ok when every stream is connected and applying; otherwise why not. No
/// stream at all is not healthy.
pub(super) fn streams_health(streams: &[DatabaseStream]) -> Result<(), HostError> {
    if streams.is_empty() {
        return Err(HostError::NoStreams);
    }
    HostError::join(
        streams
            .iter()
            .map(|s| s.status.health().map_err(HostError::from)),
    )
}

/// The members taking part, this one included.
fn round_members(fleet: &Fleet) -> usize {
    fleet.participants() + 1
}
