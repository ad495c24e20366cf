//! Drives a migration through its life (DESIGN.md): prerequisites,
//! validation, the consistent copy, then streaming until cutover (online) or
//! the switch (offline). A restart continues from the persisted state.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use thiserror::Error;
use tokio_util::sync::CancellationToken;

use super::{DatabasePhase, Migration, State, Substate};
use crate::config::{MigrationMode, MigrationOption};
use crate::context::Context;
use crate::cutover::fence::{self, FenceRecord};
use crate::cutover::protocol::Outcome;
use crate::filter::TableFilter;
use crate::proxy::ProxyHandle;
use crate::replication::Lsn;
use crate::replication::client::{ReplicationConnection, SnapshotAction};
use crate::replication::copy::{self, CopyOptions, CopyProgress};
use crate::replication::names::ReplicationNames;
use crate::schema;

#[derive(Debug, Error)]
pub(crate) enum PipelineError {
    #[error("database {db}: {step}: {message}")]
    Step {
        db: String,
        step: &'static str,
        message: String,
    },
    #[error("{0}")]
    State(#[from] super::ControlError),
    #[error("stopped by shutdown")]
    Shutdown,
}

pub(crate) fn step<'a, E: std::fmt::Display>(
    db: &'a str,
    step: &'static str,
) -> impl Fn(E) -> PipelineError + 'a {
    move |e| PipelineError::Step {
        db: db.to_string(),
        step,
        message: e.to_string(),
    }
}

/// What the copy of one database leaves behind for streaming.
pub struct Copied {
    pub database: String,
    pub consistent_point: Option<Lsn>,
}

/// Everything the pipeline needs, passed in as one struct.
pub(crate) struct Pipeline {
    pub ctx: Arc<Context>,
    pub migration: Arc<Migration>,
    pub proxy: ProxyHandle,
    pub cancel: CancellationToken,
    /// Registered once; shared by every database's copy.
    pub copy_metrics: Option<copy::CopyMetrics>,
}

impl Pipeline {
    pub fn cfg(&self) -> &crate::config::MigrationConfig {
        &self.migration.cfg
    }

    /// Checks both servers answer, with the configured credentials.
    pub(crate) async fn prerequisites(&self) -> Result<(), PipelineError> {
        self.migration
            .transition(
                State::InProgress,
                Substate::PerformingPrerequisiteSteps,
                None,
            )
            .await?;
        let c = &self.ctx.config;
        crate::db::connect(&c.source, "source")
            .await
            .map_err(step("-", "connecting to the source"))?;
        crate::db::connect(&c.target, "target")
            .await
            .map_err(step("-", "connecting to the target"))?;
        Ok(())
    }

    /// Runs the premigration checks. Returns false when the migration must
    /// stop here (option = validate, or failures).
    pub(crate) async fn validation(&self) -> Result<bool, PipelineError> {
        if self.cfg().option == MigrationOption::Migrate {
            return Ok(true);
        }
        self.migration
            .transition(State::InProgress, Substate::ValidationInProgress, None)
            .await?;
        let report = crate::validate::validate_resuming(&self.ctx.config, &self.own_copies()).await;
        let summary = serde_json::to_value(&report).unwrap_or_default();
        self.ctx
            .status
            .register("validation", Arc::new(move || summary.clone()));
        if report.has_failures() {
            let failed: Vec<String> = report
                .failures()
                .map(|c| format!("{} ({}): {}", c.name, c.scope, c.found))
                .collect();
            self.migration
                .transition(
                    State::ValidationFailed,
                    Substate::None,
                    Some(format!("validation failed: {}", failed.join("; "))),
                )
                .await?;
            return Ok(false);
        }
        if self.cfg().option == MigrationOption::Validate {
            self.migration
                .transition(
                    State::Succeeded,
                    Substate::Completed,
                    Some("validation passed (option = validate)".into()),
                )
                .await?;
            return Ok(false);
        }
        Ok(true)
    }

    /// Databases whose target copy is this migration's own work (a restart
    /// after the copy began): validation must not take them for foreign data.
    fn own_copies(&self) -> Vec<String> {
        self.cfg()
            .databases
            .iter()
            .filter(|db| {
                self.migration.database_row(db).is_some_and(|r| {
                    matches!(
                        r.phase,
                        DatabasePhase::Copying
                            | DatabasePhase::Copied
                            | DatabasePhase::Streaming
                            | DatabasePhase::ApplyStopped
                    )
                })
            })
            .cloned()
            .collect()
    }

    /// Copies every database that is not already copied. A database whose
    /// copy was interrupted starts over cleanly, and the state says so.
    pub(crate) async fn copy_all(&self) -> Result<Vec<Copied>, PipelineError> {
        self.migration
            .transition(State::InProgress, Substate::MigratingData, None)
            .await?;
        if self.cfg().copy_roles {
            self.copy_roles().await?;
        }
        let mut out = Vec::new();
        for db in self.cfg().databases.clone() {
            if self.cancel.is_cancelled() {
                return Err(PipelineError::Shutdown);
            }
            let row = self
                .migration
                .database_row(&db)
                .expect("configured database has a row");
            if matches!(
                row.phase,
                DatabasePhase::Copied | DatabasePhase::Streaming | DatabasePhase::ApplyStopped
            ) {
                let cp = row.consistent_point.as_deref().and_then(|s| s.parse().ok());
                out.push(Copied {
                    database: db,
                    consistent_point: cp,
                });
                continue;
            }
            let restarted = row.phase == DatabasePhase::Copying;
            if restarted {
                tracing::warn!(database = %db, "the previous copy was interrupted: starting it over cleanly");
            }
            self.migration
                .set_database(&db, |d| {
                    d.phase = DatabasePhase::Copying;
                    if restarted {
                        d.copy_restarts += 1;
                        d.last_error = Some(
                            "previous copy was interrupted; copy restarted from scratch".into(),
                        );
                    }
                })
                .await?;
            match self.copy_one(&db, restarted).await {
                Ok(cp) => {
                    self.migration
                        .set_database(&db, |d| {
                            d.phase = DatabasePhase::Copied;
                            d.consistent_point = cp.map(|l| l.to_string());
                            d.last_error = None;
                        })
                        .await?;
                    out.push(Copied {
                        database: db,
                        consistent_point: cp,
                    });
                }
                Err(e) => {
                    let msg = e.to_string();
                    // Interrupted by shutdown: stay in Copying so a restart starts over.
                    if !matches!(e, PipelineError::Shutdown) {
                        self.migration
                            .set_database(&db, |d| {
                                d.phase = DatabasePhase::Failed;
                                d.last_error = Some(msg);
                            })
                            .await?;
                    }
                    return Err(e);
                }
            }
        }
        Ok(out)
    }

    /// `copy_roles`: the source's roles onto the target before any schema,
    /// so objects keep their owners and grants. Roles already there are
    /// left as they are, so a restarted copy runs it again harmlessly.
    async fn copy_roles(&self) -> Result<(), PipelineError> {
        let c = &self.ctx.config;
        let r = schema::copy_roles(&c.source, &c.target)
            .await
            .map_err(step("-", "copying roles"))?;
        tracing::info!(
            created = r.created.len(),
            existing = r.existing.len(),
            refused = r.errors.len(),
            "roles copied to the target: created {}",
            r.created.join(", ")
        );
        for e in &r.errors {
            tracing::warn!("copying roles: the target refused: {e}");
        }
        Ok(())
    }

    /// Schema, data and post-data of one database, from one consistent
    /// snapshot. Online: the snapshot is the slot's, so streaming starts
    /// exactly where the copy ends. Returns the slot's consistent point.
    async fn copy_one(&self, db: &str, restarted: bool) -> Result<Option<Lsn>, PipelineError> {
        let c = &self.ctx.config;
        let (source, target) = (&c.source, &c.target);
        let names = ReplicationNames::new(&self.cfg().name, db);
        let online = self.cfg().mode == MigrationMode::Online;

        // A fresh slot and publication every time the copy (re)starts.
        crate::replication::slot::cleanup(source, &self.cfg().name, db)
            .await
            .map_err(step(db, "removing an old slot"))?;
        // Our own interrupted copy may be overwritten regardless of `overwrite`.
        schema::prepare_target_database(target, source, db, self.cfg().overwrite || restarted)
            .await
            .map_err(step(db, "preparing the target database"))?;

        let mut repl = None;
        let mut snapshot_holder = None;
        let (snapshot, consistent_point) = if online {
            let src_db = crate::db::connect(&source.with_dbname(db), "source")
                .await
                .map_err(step(db, "connecting"))?;
            // Sources before 14 carry the cutover marker as a row of a
            // table of pgshift's, published with the user's tables.
            let marker_table = crate::replication::marker::ensure_table(&src_db, &names)
                .await
                .map_err(step(db, "creating the cutover marker table"))?;
            let mut tables = self.publication_tables(&src_db, db).await?;
            // DDL is captured from before the slot exists: no schema change
            // can fall between the copy's snapshot and the capture.
            let ddl_table = self
                .install_ddl_capture(&src_db, db, &names, tables.is_some())
                .await?;
            if let Some(list) = tables.as_mut() {
                list.extend(marker_table);
                list.extend(ddl_table);
            }
            crate::replication::publication::create_publication(
                &src_db,
                &names.publication,
                tables.as_deref(),
            )
            .await
            .map_err(step(db, "creating the publication"))?;
            let mut conn = ReplicationConnection::connect(source, db, "pgshift-replication")
                .await
                .map_err(step(db, "opening the replication connection"))?;
            let slot = conn
                .create_slot(&names.slot, SnapshotAction::Export, false)
                .await
                .map_err(step(db, "creating the replication slot"))?;
            tracing::info!(database = db, slot = %slot.name, consistent_point = %slot.consistent_point, "slot created");
            let snap = slot
                .snapshot_name
                .clone()
                .ok_or_else(|| PipelineError::Step {
                    db: db.into(),
                    step: "creating the replication slot",
                    message: "the server exported no snapshot".into(),
                })?;
            // The exported snapshot lives while this connection stays open and idle.
            repl = Some(conn);
            (snap, Some(slot.consistent_point))
        } else {
            let (client, snap) = export_snapshot(source, db)
                .await
                .map_err(step(db, "exporting a snapshot"))?;
            snapshot_holder = Some(client);
            (snap, None)
        };

        let plan = schema::plan_dump_with(
            source,
            target,
            db,
            self.cfg().pg_bin.as_deref(),
            &TableFilter::from_migration(self.cfg()),
        )
        .await
        .map_err(step(db, "planning the schema dump"))?;
        // Post-data is dumped at the snapshot while pre-data is restored;
        // each table's indexes are then built as soon as its data is in.
        let per_table = schema::can_restore_per_table(&plan);
        let pre_data = schema::dump_restore_pre_data(source, target, db, Some(&snapshot), &plan);
        let post_data = async {
            if per_table {
                schema::PostDataArchive::dump(source, db, Some(&snapshot), &plan)
                    .await
                    .map(Some)
            } else {
                tracing::warn!(database = db, tools = %plan.tools.describe(),
                    "no pg_restore next to pg_dump: post-data is restored after the whole copy");
                Ok(None)
            }
        };
        let (pre, post) = tokio::join!(pre_data, post_data);
        pre.map_err(step(db, "copying the schema (pre-data)"))?;
        let archive = post.map_err(step(db, "dumping the schema (post-data)"))?;

        let progress = CopyProgress::new(db, self.copy_metrics.clone());
        let p = progress.clone();
        self.migration.attach(
            db,
            "copy",
            Arc::new(move || serde_json::to_value(p.snapshot()).unwrap_or_default()),
        );
        let opts = CopyOptions::from_config(self.cfg());
        let Some(archive) = archive else {
            // copy_database logs its own summary line.
            copy::copy_database(
                source,
                target,
                db,
                &snapshot,
                &opts,
                progress,
                self.cancel.clone(),
            )
            .await
            .map_err(|e| self.copy_error(db, e))?;
            schema::dump_restore_post_data(source, target, db, Some(&snapshot), &plan)
                .await
                .map_err(step(
                    db,
                    "copying the schema (post-data: indexes, constraints, triggers)",
                ))?;
            return self
                .after_copy(db, repl, snapshot_holder, consistent_point)
                .await;
        };

        let post_progress = schema::PostDataProgress::new();
        let pp = post_progress.clone();
        self.migration.attach(
            db,
            "post_data",
            Arc::new(move || serde_json::to_value(pp.snapshot()).unwrap_or_default()),
        );
        let events = progress.table_events();
        // Either side failing stops the other; the first real error is reported.
        let stop = self.cancel.child_token();
        let copy = async {
            let r =
                copy::copy_database(source, target, db, &snapshot, &opts, progress, stop.clone())
                    .await;
            if r.is_err() {
                stop.cancel();
            }
            r
        };
        let build = async {
            let r = schema::restore_during_copy(
                Arc::new(archive),
                &target.with_dbname(db),
                self.cfg().index_jobs(),
                events,
                post_progress,
                stop.clone(),
            )
            .await;
            if r.is_err() {
                stop.cancel();
            }
            r
        };
        let (copied, built) = tokio::join!(copy, build);
        if self.cancel.is_cancelled() {
            return Err(PipelineError::Shutdown);
        }
        let post_step = "copying the schema (post-data: indexes, constraints, triggers)";
        match (copied, built) {
            (_, Err(e)) if !matches!(e, schema::SchemaError::Canceled) => {
                return Err(step(db, post_step)(e));
            }
            (Err(e), _) => return Err(self.copy_error(db, e)),
            (Ok(_), Err(e)) => return Err(step(db, post_step)(e)),
            (Ok(_), Ok(report)) => tracing::info!(
                database = db,
                items = report.items,
                per_table_items = report.per_table_items,
                tables_during_copy = report.tables_during_copy,
                rest_items = report.rest_items,
                rest_seconds = format!("{:.2}", report.rest_seconds),
                "post-data restored"
            ),
        }
        self.after_copy(db, repl, snapshot_holder, consistent_point)
            .await
    }

    fn copy_error(&self, db: &str, e: copy::CopyError) -> PipelineError {
        if self.cancel.is_cancelled() {
            PipelineError::Shutdown
        } else {
            step(db, "copying data")(e)
        }
    }

    /// Sequences and materialized views once the data and post-data are
    /// in; then the snapshot is released.
    async fn after_copy(
        &self,
        db: &str,
        repl: Option<ReplicationConnection>,
        snapshot_holder: Option<tokio_postgres::Client>,
        consistent_point: Option<Lsn>,
    ) -> Result<Option<Lsn>, PipelineError> {
        self.sync_sequences(db).await?;
        schema::refresh_materialized_views(&self.ctx.config.target, db, "after the copy")
            .await
            .map_err(step(db, "refreshing materialized views"))?;

        // Everything that needed the snapshot is done.
        if let Some(conn) = repl {
            conn.close().await;
        }
        drop(snapshot_holder);
        Ok(consistent_point)
    }

    /// Installs the DDL capture on a source database per `[migration] ddl`;
    /// returns the table its events travel in when the publication must
    /// list it (sources before 14).
    async fn install_ddl_capture(
        &self,
        src: &tokio_postgres::Client,
        db: &str,
        names: &ReplicationNames,
        listed: bool,
    ) -> Result<Option<String>, PipelineError> {
        use crate::config::DdlSetting;
        use crate::replication::ddl::capture;
        let setting = self.cfg().ddl;
        if setting == DdlSetting::Stop {
            return Ok(None);
        }
        if setting == DdlSetting::Auto
            && let Some(why) = crate::pg::event_trigger::refusal(src)
                .await
                .map_err(step(db, "checking whether DDL can be captured"))?
        {
            tracing::warn!(
                database = db,
                "schema changes on the source will stop apply (ddl = \"stop\"): the source refuses event triggers to this user: {why}"
            );
            return Ok(None);
        }
        let version = crate::pg::Version::of(src)
            .await
            .map_err(step(db, "reading the source version"))?;
        let cnames = capture::CaptureNames::new(names);
        let filter = TableFilter::from_migration(self.cfg());
        let spec = capture::CaptureSpec {
            names: &cnames,
            transport: version.marker_transport(),
            listed: listed.then_some(&filter),
        };
        capture::install(src, &spec)
            .await
            .map_err(step(db, "installing the DDL capture"))?;
        tracing::info!(
            database = db,
            "DDL capture installed on the source: schema changes are applied on the target in stream order"
        );
        Ok(
            (spec.transport == crate::pg::replication::MarkerTransport::Row)
                .then(|| cnames.row_table()),
        )
    }

    /// Removes the DDL capture from every source database (at the end of a
    /// cutover, whether or not the slots are kept). Notes for the log.
    pub(crate) async fn remove_ddl_capture(&self) -> Vec<String> {
        let mut notes = Vec::new();
        for db in &self.cfg().databases {
            let names = ReplicationNames::new(&self.cfg().name, db);
            let r = async {
                let c = crate::db::connect(
                    &self.ctx.config.source.with_dbname(db),
                    "source (DDL capture)",
                )
                .await
                .map_err(crate::replication::client::ReplicationError::from)?;
                crate::replication::ddl::capture::remove(
                    &c,
                    &crate::replication::ddl::capture::CaptureNames::new(&names),
                )
                .await
            }
            .await;
            match r {
                Ok(true) => notes.push(format!("{db}: DDL capture removed")),
                Ok(false) => {}
                Err(e) => notes.push(format!("{db}: removing the DDL capture failed: {e}")),
            }
        }
        notes
    }

    /// The tables to publish: None for all tables (no filters).
    async fn publication_tables(
        &self,
        src: &tokio_postgres::Client,
        db: &str,
    ) -> Result<Option<Vec<String>>, PipelineError> {
        let cfg = self.cfg();
        if cfg.tables.is_empty() && cfg.exclude_tables.is_empty() {
            return Ok(None);
        }
        let filter = TableFilter::from_migration(cfg);
        let tables = crate::pg::tables::list_tables(src, &filter)
            .await
            .map_err(step(db, "listing tables"))?;
        Ok(Some(tables.iter().map(|t| t.quoted()).collect()))
    }

    /// Copies every sequence's value from source to target for one database.
    pub async fn sync_sequences(&self, db: &str) -> Result<u64, PipelineError> {
        let c = &self.ctx.config;
        let s = crate::db::connect(&c.source.with_dbname(db), "source")
            .await
            .map_err(step(db, "connecting"))?;
        let t = crate::db::connect(&c.target.with_dbname(db), "target")
            .await
            .map_err(step(db, "connecting"))?;
        let r = schema::copy_sequences(&s, &t)
            .await
            .map_err(step(db, "copying sequences"))?;
        Ok(r.copied as u64)
    }

    /// Offline mode: with writes held at the proxy and the source fenced,
    /// copy everything, point the route at the target and open the gate.
    /// The fence is persisted as a cutover attempt, so a pgshift killed
    /// mid-copy keeps the source fenced (the databases it already copied
    /// stay exact) and can still lift the fence to what it was before.
    pub async fn offline(&self) -> Result<(), PipelineError> {
        let earlier = self.interrupted_fence().await?;
        let gate = self.proxy.gate();
        gate.close();
        let drain = self.ctx.config.cutover().drain_timeout.0;
        if tokio::time::timeout(drain, gate.drained()).await.is_err() {
            gate.open();
            // A fence an interrupted run left must not outlive this failure.
            if let Some((id, rec)) = earlier {
                self.lift_interrupted_fence(&id, rec).await?;
            }
            let n = gate.sessions_in_transaction();
            self.migration
                .transition(
                    State::Failed,
                    Substate::None,
                    Some(format!(
                        "offline mode: {n} session(s) still inside a transaction after drain_timeout {drain:?}; nothing was changed"
                    )),
                )
                .await?;
            return Ok(());
        }
        let admin = crate::db::connect(&self.ctx.config.source, "source (fence)")
            .await
            .map_err(step("-", "connecting to fence the source"))?;
        let (id, fence) = match self.offline_fence(&admin, earlier).await {
            Ok(f) => f,
            Err(e) => {
                gate.open();
                return Err(e);
            }
        };
        match self.copy_all().await {
            Ok(_) => {
                self.save_offline_attempt(&id, Outcome::Succeeded, &fence)
                    .await?;
                self.migration.mark_switched().await?;
                self.proxy
                    .router()
                    .swap(crate::proxy::route::Route::from_endpoint(
                        "target",
                        &self.ctx.config.target,
                    ));
                gate.open();
                for db in self.cfg().databases.clone() {
                    self.migration
                        .set_database(&db, |d| d.phase = DatabasePhase::Switched)
                        .await?;
                }
                self.migration
                    .transition(
                        State::Succeeded,
                        Substate::Completed,
                        Some("offline migration complete".into()),
                    )
                    .await?;
                Ok(())
            }
            Err(e) => {
                // Nothing switched: clients get the source back, unfenced.
                if let Err(le) = fence::lift(&admin, &fence).await {
                    tracing::error!("lifting the fence after a failed offline copy: {le}");
                } else if let Err(se) = self
                    .save_offline_attempt(&id, Outcome::Aborted, &fence)
                    .await
                {
                    tracing::error!("recording the lifted fence: {se}");
                }
                gate.open();
                Err(e)
            }
        }
    }

    /// Fences the source for the offline copy and persists what the fence
    /// changed before any copying. A fence left by an interrupted run is
    /// kept as the record: it holds the settings from before any fence.
    async fn offline_fence(
        &self,
        admin: &tokio_postgres::Client,
        earlier: Option<(String, FenceRecord)>,
    ) -> Result<(String, FenceRecord), PipelineError> {
        let spare: Vec<i32> = self
            .proxy
            .sessions()
            .sessions()
            .iter()
            .map(|s| s.backend().pid)
            .collect();
        let fresh = fence::fence(
            admin,
            &self.cfg().databases,
            &self.ctx.config.cutover().fence_roles,
            &spare,
        )
        .await
        .map_err(step("-", "fencing the source"))?;
        let (id, rec) = match earlier {
            Some((id, mut old)) => {
                // Roles the new fence found still able to log in were not fenced before.
                for r in fresh.roles {
                    if !old.roles.contains(&r) {
                        old.roles.push(r);
                    }
                }
                (id, old)
            }
            None => (
                format!("offline-{}", chrono::Utc::now().format("%Y%m%dT%H%M%S")),
                fresh,
            ),
        };
        if let Err(e) = self.save_offline_attempt(&id, Outcome::Running, &rec).await {
            let _ = fence::lift(admin, &rec).await;
            return Err(e);
        }
        Ok((id, rec))
    }

    async fn save_offline_attempt(
        &self,
        id: &str,
        outcome: Outcome,
        rec: &FenceRecord,
    ) -> Result<(), PipelineError> {
        let doc =
            json!({"id": id, "kind": "offline", "outcome": outcome, "fence": rec, "phases": []});
        self.migration
            .control()
            .save_cutover_attempt(id, outcome.as_str(), None, &doc)
            .await?;
        Ok(())
    }

    /// The fence of an attempt (cutover or offline switch) that a stopped
    /// pgshift left unfinished, with its id.
    async fn interrupted_fence(&self) -> Result<Option<(String, FenceRecord)>, PipelineError> {
        let Some((id, report)) = self.migration.control().unfinished_cutover().await? else {
            return Ok(None);
        };
        let rec = report
            .get("fence")
            .and_then(|f| serde_json::from_value::<FenceRecord>(f.clone()).ok())
            .unwrap_or_default();
        Ok(Some((id, rec)))
    }

    /// Lifts a fence left by an interrupted attempt, retrying while the
    /// source is unreachable: a restarted pgshift must not leave the source
    /// read-only because it came back before the source did.
    pub(crate) async fn lift_fence_until_done(
        &self,
        rec: &FenceRecord,
    ) -> Result<(), PipelineError> {
        // An attempt stopped before it fenced anything needs no source connection.
        if *rec == FenceRecord::default() {
            return Ok(());
        }
        match fence::lift_until_done(&self.ctx.config.source, rec, &self.cancel).await {
            Some(_) => {
                tracing::info!("fence of the interrupted attempt lifted");
                Ok(())
            }
            None => Err(PipelineError::Shutdown),
        }
    }

    /// Lifts an interrupted attempt's fence exactly and records the attempt
    /// as interrupted; returns the reason to report.
    async fn lift_interrupted_fence(
        &self,
        id: &str,
        rec: FenceRecord,
    ) -> Result<String, PipelineError> {
        self.lift_fence_until_done(&rec).await?;
        let reason = format!(
            "cutover {id} was interrupted by a pgshift restart before the switch; fence lifted"
        );
        self.migration
            .control()
            .save_cutover_attempt(
                id,
                Outcome::Interrupted.as_str(),
                Some(&reason),
                &json!({"id": id, "outcome": Outcome::Interrupted, "reason": reason, "phases": []}),
            )
            .await?;
        Ok(reason)
    }

    /// Releases the source's slots and publications (cancel, or after cutover).
    pub(crate) async fn release_source(&self) -> Vec<String> {
        let mut notes = Vec::new();
        for db in &self.cfg().databases {
            match crate::replication::slot::cleanup(&self.ctx.config.source, &self.cfg().name, db)
                .await
            {
                Ok(c) => notes.push(format!("{db}: {c:?}")),
                Err(e) => notes.push(format!("{db}: cleanup failed: {e}")),
            }
        }
        notes
    }
}

/// Why offline mode's snapshot could not be exported.
#[derive(Debug, Error)]
enum SnapshotError {
    #[error("{0}")]
    Connect(#[from] crate::db::DbError),
    #[error("{}", crate::db::describe(.0))]
    Query(#[from] tokio_postgres::Error),
}

/// Offline mode's snapshot: a REPEATABLE READ transaction that exports its
/// snapshot and stays open (returned) until the copy no longer needs it.
async fn export_snapshot(
    source: &crate::config::Endpoint,
    db: &str,
) -> Result<(tokio_postgres::Client, String), SnapshotError> {
    let c = crate::db::connect(&source.with_dbname(db), "source (snapshot)").await?;
    c.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .await?;
    let snap: String = c
        .query_one("SELECT pg_export_snapshot()", &[])
        .await?
        .get(0);
    Ok((c, snap))
}

/// The JSON a cancel answers with.
pub(crate) fn cancel_message(notes: &[String]) -> serde_json::Value {
    json!({
        "message": "migration canceled: replication slots and publications released on the source; the target was left as it is",
        "details": notes,
    })
}

/// How long start-up waits for the control schema before refusing to serve.
pub(crate) const CONTROL_WAIT: Duration = Duration::from_secs(30);
