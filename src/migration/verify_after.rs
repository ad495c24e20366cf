//! Full verification outside the pause (`[cutover] verify_after`): inside
//! the pause, once the marker says the target holds every committed source
//! write and the fence says nothing more commits on the source, both sides
//! export a snapshot (one round trip each, their sessions opened at
//! prepare); after the gate opens, every migrated table is compared as of
//! those two snapshots, while clients write on the target and reverse
//! replication writes on the source. A mismatch is reported with its table
//! and key ranges, and — with the rollback window open — a rollback is
//! recommended (or started, with `rollback_on_mismatch`).

use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde_json::{Value, json};

use super::runner::Runner;
use crate::config::CutoverVerify;
use crate::cutover::protocol::HostError;
use crate::telemetry::status::Report;
use crate::verify::{self, HeldSnapshot, SnapshotConnection, VerifyMode, VerifyOptions};

/// The snapshots of one attempt, per database: sessions opened at
/// prepare, then held from the pause until the verification ends.
#[derive(Default)]
pub(super) enum Snapshots {
    #[default]
    None,
    Connected(Vec<(SnapshotConnection, SnapshotConnection)>),
    Held(Vec<(HeldSnapshot, HeldSnapshot)>),
}

/// `/status` → `verify_after_switch`: what the last verification found,
/// and its progress while it runs.
#[derive(Clone, Default)]
pub(crate) struct VerifyAfter(Arc<Mutex<Outcome>>);

#[derive(Default)]
struct Outcome {
    /// none, running, match, mismatch, failed, not_run
    state: &'static str,
    cutover: Option<String>,
    mode: Option<&'static str>,
    progress: Vec<verify::VerifyProgress>,
    mismatches: Vec<Value>,
    error: Option<String>,
    seconds: Option<f64>,
    recommendation: Option<String>,
}

impl VerifyAfter {
    fn with<R>(&self, f: impl FnOnce(&mut Outcome) -> R) -> R {
        f(&mut self.0.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// The verification could not run (its snapshots were not taken).
    pub(super) fn not_run(&self, cutover: &str, why: String) {
        self.with(|o| {
            *o = Outcome {
                state: "not_run",
                cutover: Some(cutover.to_string()),
                error: Some(why),
                ..Outcome::default()
            }
        });
    }
}

impl Report for VerifyAfter {
    fn report(&self) -> Value {
        self.with(|o| {
            json!({
                "state": if o.state.is_empty() { "none" } else { o.state },
                "cutover": o.cutover,
                "mode": o.mode,
                "databases": o.progress.iter().map(Report::report).collect::<Vec<_>>(),
                "mismatches": o.mismatches,
                "error": o.error,
                "seconds": o.seconds,
                "recommendation": o.recommendation,
            })
        })
    }
}

fn mode_of(v: CutoverVerify) -> Option<VerifyMode> {
    match v {
        CutoverVerify::Off => None,
        CutoverVerify::Counts => Some(VerifyMode::Counts),
        CutoverVerify::Checksums => Some(VerifyMode::Checksums),
    }
}

impl Runner {
    /// At prepare: a session on each side per database, ready to export.
    pub(super) async fn connect_snapshots(&self) -> Result<(), HostError> {
        *self.snapshots.lock().await = Snapshots::None;
        if mode_of(self.ctx().config.cutover().verify_after).is_none() {
            return Ok(());
        }
        let c = &self.ctx().config;
        let mut conns = Vec::new();
        for db in &self.migration().cfg.databases {
            let pair = tokio::try_join!(
                HeldSnapshot::connect(&c.source, db),
                HeldSnapshot::connect(&c.target, db)
            )?;
            conns.push(pair);
        }
        *self.snapshots.lock().await = Snapshots::Connected(conns);
        Ok(())
    }

    /// Inside the pause: both sides' snapshots, every database at once.
    pub(super) async fn export_snapshots(&self) -> Result<Option<String>, HostError> {
        let mut guard = self.snapshots.lock().await;
        let Snapshots::Connected(conns) = std::mem::take(&mut *guard) else {
            return Ok(None);
        };
        let n = conns.len();
        let held = futures_util::future::join_all(
            conns.into_iter().map(|(s, t)| verify::export_pair(s, t)),
        )
        .await
        .into_iter()
        .collect::<Result<Vec<_>, _>>()?;
        *guard = Snapshots::Held(held);
        Ok(Some(format!(
            "{n} database(s): source and target held as of the switch for verify_after"
        )))
    }

    /// The attempt did not switch: its snapshots are let go.
    pub(super) async fn drop_snapshots(&self) {
        *self.snapshots.lock().await = Snapshots::None;
    }

    /// After a switch: compares every table as of the held snapshots, in
    /// the background; the snapshots end with it.
    pub(super) fn spawn_verify_after(self: &Arc<Self>, cutover: String) {
        let this = self.clone();
        tokio::spawn(async move { this.verify_after(cutover).await });
    }

    async fn verify_after(self: Arc<Self>, cutover: String) {
        let cfg = self.ctx().config.cutover().clone();
        let Some(mode) = mode_of(cfg.verify_after) else {
            return;
        };
        let held = match std::mem::take(&mut *self.snapshots.lock().await) {
            Snapshots::Held(h) => h,
            _ => {
                self.verify_status.not_run(
                    &cutover,
                    "the snapshots at the switch were not taken (see the cutover's snapshot phase)"
                        .into(),
                );
                return;
            }
        };
        let t = Instant::now();
        let progress: Vec<verify::VerifyProgress> = held
            .iter()
            .map(|(s, _)| verify::VerifyProgress::with_metrics(s.database(), &self.ctx().registry))
            .collect();
        self.verify_status.with(|o| {
            *o = Outcome {
                state: "running",
                cutover: Some(cutover.clone()),
                mode: Some(match mode {
                    VerifyMode::Counts => "counts",
                    VerifyMode::Checksums => "checksums",
                }),
                progress: progress.clone(),
                ..Outcome::default()
            }
        });
        tracing::info!(cutover = %cutover, databases = held.len(), "verifying every table as of the switch, clients running");
        let filter = crate::filter::TableFilter::from_migration(&self.migration().cfg);
        // Gently: the clients have just moved and run beside it. One table
        // at a time, one database after the other, resting after each
        // chunk as long as it took (with four tables and two databases at
        // once, a client's transaction in the second after the switch took
        // up to 146 ms on 2 cores; 33–61 ms without the verification).
        let opts = VerifyOptions {
            filter,
            jobs: 1,
            pace: 1.0,
            ..VerifyOptions::new(mode)
        };
        let mut results = Vec::new();
        for ((s, t), p) in held.iter().zip(&progress) {
            results.push(verify::verify_database_at(s, t, &opts, p).await);
        }
        drop(held);
        let mut mismatches = Vec::new();
        let mut error = None;
        for r in results {
            match r {
                Ok(report) => {
                    for m in report.mismatches() {
                        mismatches.push(json!({
                            "database": report.database,
                            "table": m.table,
                            "detail": m.detail,
                            "ranges": m.ranges,
                        }));
                    }
                }
                Err(e) => error = Some(e.to_string()),
            }
        }
        let window = self.migration().window().is_some_and(|w| w.is_open());
        let state = match (&error, mismatches.is_empty()) {
            (_, false) => "mismatch",
            (Some(_), true) => "failed",
            (None, true) => "match",
        };
        let recommendation = (state == "mismatch").then(|| {
            if window {
                "the target differs from the source as of the switch: `pgshift rollback` brings the clients back to the source".to_string()
            } else {
                "the target differs from the source as of the switch; no rollback window is open".to_string()
            }
        });
        let seconds = t.elapsed().as_secs_f64();
        match state {
            "match" => {
                tracing::info!(cutover = %cutover, seconds = format!("{seconds:.1}"), "verification after the switch: every table matches")
            }
            "mismatch" => {
                tracing::error!(cutover = %cutover, tables = %mismatches.iter().map(|m| format!("{}.{}: {}", m["database"].as_str().unwrap_or(""), m["table"].as_str().unwrap_or(""), m["detail"].as_str().unwrap_or(""))).collect::<Vec<_>>().join("; "), "verification after the switch found differences; {}", recommendation.as_deref().unwrap_or(""))
            }
            _ => {
                tracing::error!(cutover = %cutover, "verification after the switch could not finish: {}", error.as_deref().unwrap_or(""))
            }
        }
        self.verify_status.with(|o| {
            o.state = state;
            o.mismatches = mismatches;
            o.error = error;
            o.seconds = Some(seconds);
            o.recommendation = recommendation;
        });
        if state == "mismatch" && window && cfg.rollback_on_mismatch {
            tracing::warn!("rollback_on_mismatch: rolling back");
            if let Err(e) = self.clone().start_rollback().await {
                tracing::error!("rollback_on_mismatch: the rollback could not start: {e}");
            }
        }
    }
}
