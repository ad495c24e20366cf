//! The migration state machine (DESIGN.md, "The life of a migration") and
//! its persisted state. Every transition is logged once, persisted in the
//! control schema on the target, and exported as `pgshift_migration_state`.

pub(crate) mod control;
mod ledger;
pub(crate) mod pipeline;
mod rollback;
pub mod runner;
pub(crate) mod state;
mod verify_after;

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use prometheus::IntGaugeVec;
use serde_json::{Value, json};

use crate::config::MigrationConfig;
use crate::context::Context;
use crate::telemetry::status::Report;
pub use control::ControlError;
pub(crate) use control::{ControlStore, DatabaseRow, MigrationRow, WindowRow};
pub use state::{DatabasePhase, State, Substate};

struct DbEntry {
    row: DatabaseRow,
    /// Live detail providers (copy progress, streaming status), by key.
    providers: BTreeMap<String, Arc<dyn Report>>,
}

struct Inner {
    row: MigrationRow,
    databases: BTreeMap<String, DbEntry>,
    /// The rollback window, once a cutover prepared one.
    window: Option<WindowRow>,
}

pub struct Migration {
    pub cfg: MigrationConfig,
    control: ControlStore,
    inner: RwLock<Inner>,
    state_metric: IntGaugeVec,
}

impl Migration {
    /// Opens the control store (taking the migration's lock) and loads the
    /// persisted state; a new migration starts in InProgress /
    /// PerformingPrerequisiteSteps. Registers itself on the status board.
    pub async fn open(
        ctx: &Arc<Context>,
        cfg: &MigrationConfig,
    ) -> Result<Arc<Migration>, ControlError> {
        Migration::open_with(ctx, cfg, state_metric(&ctx.registry)).await
    }

    /// [`Migration::open`] with the state metric registered once by the
    /// caller (a fleet member may lead several times in its life).
    pub(crate) async fn open_with(
        ctx: &Arc<Context>,
        cfg: &MigrationConfig,
        state_metric: IntGaugeVec,
    ) -> Result<Arc<Migration>, ControlError> {
        let control = ControlStore::open(&ctx.config.target, &cfg.name).await?;
        let row = match control.load().await? {
            Some(mut row) => {
                tracing::info!(
                    migration = %cfg.name,
                    from = %format!("{}/{}", row.state, row.substate),
                    switched = row.switched,
                    "resuming migration {} from {}/{}",
                    cfg.name,
                    row.state,
                    row.substate
                );
                // Ready for cutover means streams that run and apply: after a
                // restart they have yet to start (see the runner's readiness).
                if !row.switched
                    && (row.state, row.substate)
                        == (
                            State::WaitingForUserAction,
                            Substate::WaitingForCutoverTrigger,
                        )
                {
                    row.state = State::InProgress;
                    row.substate = Substate::MigratingData;
                    row.reason = Some(
                        "pgshift restarted: streaming resumes; ready for cutover once every database streams and applies"
                            .into(),
                    );
                }
                row
            }
            None => {
                tracing::info!(migration = %cfg.name, "starting migration {}", cfg.name);
                MigrationRow {
                    state: State::InProgress,
                    substate: Substate::PerformingPrerequisiteSteps,
                    reason: None,
                    switched: false,
                }
            }
        };
        let window = control.window().await?;
        let persisted = control.databases().await?;
        let mut databases = BTreeMap::new();
        for db in &cfg.databases {
            let row = persisted
                .iter()
                .find(|r| &r.database == db)
                .cloned()
                .unwrap_or(DatabaseRow {
                    database: db.clone(),
                    phase: DatabasePhase::Pending,
                    consistent_point: None,
                    copy_restarts: 0,
                    last_error: None,
                });
            databases.insert(
                db.clone(),
                DbEntry {
                    row,
                    providers: BTreeMap::new(),
                },
            );
        }
        let m = Arc::new(Migration {
            cfg: cfg.clone(),
            control,
            inner: RwLock::new(Inner {
                row,
                databases,
                window,
            }),
            state_metric,
        });
        m.export_state();
        ctx.status.register_top("migration", m.clone());
        Ok(m)
    }

    /// The control store's connection ended: this process no longer holds
    /// the migration's lock (another fleet member may take it).
    pub(crate) fn control_lost(&self) -> bool {
        self.control.client().is_closed()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Inner> {
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(|e| e.into_inner())
    }

    pub fn control(&self) -> &ControlStore {
        &self.control
    }

    pub fn state(&self) -> (State, Substate) {
        let i = self.read();
        (i.row.state, i.row.substate)
    }

    pub fn row(&self) -> MigrationRow {
        self.read().row.clone()
    }

    pub fn switched(&self) -> bool {
        self.read().row.switched
    }

    fn mode(&self) -> &'static str {
        match self.cfg.mode {
            crate::config::MigrationMode::Online => "online",
            crate::config::MigrationMode::Offline => "offline",
        }
    }

    fn export_state(&self) {
        let (state, substate) = self.state();
        for s in State::ALL {
            for ss in Substate::ALL {
                let v = i64::from(s == state && ss == substate);
                self.state_metric
                    .with_label_values(&[s.as_str(), ss.as_str()])
                    .set(v);
            }
        }
    }

    /// Moves to a new state: logged, persisted, exported.
    pub async fn transition(
        &self,
        state: State,
        substate: Substate,
        reason: Option<String>,
    ) -> Result<(), ControlError> {
        let row = {
            let mut i = self.write();
            let from = (i.row.state, i.row.substate);
            if from == (state, substate) && i.row.reason == reason {
                return Ok(());
            }
            i.row.state = state;
            i.row.substate = substate;
            i.row.reason = reason.clone();
            if from != (state, substate) {
                tracing::info!(
                    migration = %self.cfg.name,
                    from = %format!("{}/{}", from.0, from.1),
                    to = %format!("{state}/{substate}"),
                    reason = reason.as_deref().unwrap_or(""),
                    "migration state changed"
                );
            }
            i.row.clone()
        };
        self.export_state();
        self.control.save(&row, self.mode()).await
    }

    /// Records the point of no return: from now on a restart comes back switched.
    pub(crate) async fn mark_switched(&self) -> Result<(), ControlError> {
        let row = {
            let mut i = self.write();
            i.row.switched = true;
            i.row.clone()
        };
        self.control.save(&row, self.mode()).await
    }

    /// The rollback window as last persisted.
    pub(crate) fn window(&self) -> Option<WindowRow> {
        self.read().window.clone()
    }

    /// A cutover about to switch with a way back: each database's reverse
    /// slot position, persisted before the switch.
    pub(crate) async fn prepare_window(
        &self,
        points: BTreeMap<String, String>,
    ) -> Result<(), ControlError> {
        self.control.prepare_window(&points).await?;
        self.write().window = Some(WindowRow {
            reverse_points: points,
            ..WindowRow::default()
        });
        Ok(())
    }

    /// The prepared window of an attempt that did not switch is gone.
    pub(crate) async fn forget_window(&self) -> Result<(), ControlError> {
        self.control.forget_window().await?;
        let mut i = self.write();
        if i.window.as_ref().is_some_and(|w| w.opened_at.is_none()) {
            i.window = None;
        }
        Ok(())
    }

    /// The cutover's point of no return, with the window opened when one
    /// was prepared (the source's fence recorded for a rollback).
    pub(crate) async fn switch_forward(
        &self,
        source_fence: &crate::cutover::fence::FenceRecord,
    ) -> Result<(), ControlError> {
        let prepared = self.read().window.is_some();
        if !prepared {
            return self.mark_switched().await;
        }
        let row = {
            let mut i = self.write();
            i.row.switched = true;
            i.row.clone()
        };
        self.control
            .switch_with_window(&row, self.mode(), source_fence)
            .await?;
        if let Some(w) = self.write().window.as_mut() {
            w.opened_at = Some(chrono::Utc::now().timestamp_millis() as f64 / 1000.0);
            w.source_fence = Some(source_fence.clone());
            w.target_fence = None;
            w.closed_at = None;
            w.closed_reason = None;
        }
        Ok(())
    }

    /// A rollback's point of no return: clients go back to the source.
    pub(crate) async fn switch_back(
        &self,
        target_fence: &crate::cutover::fence::FenceRecord,
    ) -> Result<(), ControlError> {
        let row = {
            let mut i = self.write();
            i.row.switched = false;
            i.row.clone()
        };
        self.control
            .switch_back(&row, self.mode(), target_fence)
            .await?;
        if let Some(w) = self.write().window.as_mut() {
            w.target_fence = Some(target_fence.clone());
            w.closed_at = Some(chrono::Utc::now().timestamp_millis() as f64 / 1000.0);
            w.closed_reason = Some("rolled back".into());
        }
        Ok(())
    }

    /// The target's fence after a rollback is lifted (the target guarded).
    pub(crate) async fn clear_target_fence(&self) -> Result<(), ControlError> {
        self.control.clear_target_fence().await?;
        if let Some(w) = self.write().window.as_mut() {
            w.target_fence = None;
        }
        Ok(())
    }

    /// Ends the rollback window (complete, or its automatic end).
    pub(crate) async fn close_window(&self, reason: &str) -> Result<(), ControlError> {
        self.control.close_window(reason).await?;
        if let Some(w) = self.write().window.as_mut()
            && w.closed_at.is_none()
        {
            w.closed_at = Some(chrono::Utc::now().timestamp_millis() as f64 / 1000.0);
            w.closed_reason = Some(reason.to_string());
        }
        Ok(())
    }

    pub fn database_row(&self, db: &str) -> Option<DatabaseRow> {
        self.read().databases.get(db).map(|e| e.row.clone())
    }

    /// Updates one database's persisted phase (and error).
    pub async fn set_database(
        &self,
        db: &str,
        f: impl FnOnce(&mut DatabaseRow),
    ) -> Result<(), ControlError> {
        let row = {
            let mut i = self.write();
            let Some(e) = i.databases.get_mut(db) else {
                return Ok(());
            };
            f(&mut e.row);
            e.row.clone()
        };
        self.control.save_database(&row).await
    }

    /// Attaches a live provider (e.g. "copy", "stream") to a database's status.
    pub(crate) fn attach(&self, db: &str, key: &str, provider: Arc<dyn Report>) {
        if let Some(e) = self.write().databases.get_mut(db) {
            e.providers.insert(key.to_string(), provider);
        }
    }
}

/// `pgshift_migration_state`, registered once per process.
pub(crate) fn state_metric(reg: &prometheus::Registry) -> IntGaugeVec {
    crate::telemetry::metrics::int_gauge_vec(
        reg,
        "pgshift_migration_state",
        "1 for the migration's current state and substate, 0 otherwise",
        &["state", "substate"],
    )
}

impl Report for Migration {
    fn report(&self) -> Value {
        let i = self.read();
        let mut dbs = serde_json::Map::new();
        for (name, e) in &i.databases {
            let mut d = json!({
                "phase": e.row.phase.as_str(),
                "consistent_point": e.row.consistent_point,
                "copy_restarts": e.row.copy_restarts,
                "last_error": e.row.last_error,
            });
            if let Value::Object(m) = &mut d {
                for (k, p) in &e.providers {
                    m.insert(k.clone(), p.report());
                }
            }
            dbs.insert(name.clone(), d);
        }
        json!({
            "migration": self.cfg.name,
            "mode": self.cfg.mode,
            "option": self.cfg.option,
            "state": i.row.state.as_str(),
            "substate": i.row.substate.as_str(),
            "reason": i.row.reason,
            "switched": i.row.switched,
            "databases": dbs,
        })
    }
}
