//! What apply and the operator share about DDL: the mode, the commands
//! replicated so far (for status), the one that stopped apply, and the
//! operator's decisions (`pgshift ddl skip|retry|apply`).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::{Arc, Mutex};

use prometheus::{IntCounterVec, Registry};
use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::Notify;

use crate::config::DdlSetting;

/// A replicated (or refused) command, as status lists it.
#[derive(Clone, Debug, Serialize)]
pub struct DdlRecord {
    pub database: String,
    pub id: String,
    pub tag: String,
    /// What ran (or would have) on the target.
    pub statement: String,
    /// applied / ignored / skipped / failed / rejected.
    pub outcome: &'static str,
    pub at: String,
}

/// Why apply stopped on a schema change, with what the operator may do.
#[derive(Clone, Debug, Serialize)]
pub struct DdlStop {
    pub database: String,
    /// The DDL event's id (replicate mode), for `ddl skip`.
    pub id: Option<String>,
    /// The statement that failed on the target (replicate), or the ready
    /// command that makes the target match (stop mode), if there is one.
    pub statement: Option<String>,
    pub error: String,
}

const RECENT: usize = 50;

#[derive(Default)]
struct Inner {
    recent: VecDeque<DdlRecord>,
    counts: BTreeMap<(String, &'static str), u64>,
    stopped: BTreeMap<String, DdlStop>,
    skip: BTreeSet<String>,
    /// Per database: whether the source captures its DDL.
    capturing: BTreeMap<String, bool>,
}

/// Shared by every database's stream and the runner.
pub struct DdlControl {
    pub setting: DdlSetting,
    inner: Mutex<Inner>,
    metric: Option<IntCounterVec>,
    /// Per database, woken by `ddl retry|skip|apply`: a stopped stream
    /// tries again now.
    retry: Mutex<BTreeMap<String, Arc<Notify>>>,
}

pub(crate) const OUTCOMES: [&str; 5] = ["applied", "ignored", "skipped", "failed", "rejected"];

impl DdlControl {
    pub fn new(setting: DdlSetting, reg: Option<&Registry>) -> DdlControl {
        let metric = reg.map(|r| {
            crate::telemetry::metrics::int_counter_vec(
                r,
                "pgshift_ddl_commands_total",
                "DDL commands captured on the source, by database and outcome (applied, ignored, skipped, failed, rejected)",
                &["database", "outcome"],
            )
        });
        DdlControl {
            setting,
            inner: Mutex::new(Inner::default()),
            metric,
            retry: Mutex::new(BTreeMap::new()),
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut Inner) -> T) -> T {
        f(&mut self.inner.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Whether the source captures `database`'s DDL (seen by its stream).
    pub fn set_capturing(&self, database: &str, capturing: bool) {
        self.with(|i| i.capturing.insert(database.to_string(), capturing));
    }

    /// Exports the counters of a database at 0, so rates work at once.
    pub fn export(&self, database: &str) {
        if let Some(m) = &self.metric {
            for o in OUTCOMES {
                m.with_label_values(&[database, o]);
            }
        }
    }

    /// Records a command's outcome: counted, logged by the caller, listed.
    pub fn record(&self, rec: DdlRecord) {
        if let Some(m) = &self.metric {
            m.with_label_values(&[&rec.database, rec.outcome]).inc();
        }
        self.with(|i| {
            *i.counts
                .entry((rec.database.clone(), rec.outcome))
                .or_default() += 1;
            if rec.outcome != "failed" {
                i.stopped.remove(&rec.database);
            }
            // A command that keeps failing (apply retries it) is listed once.
            let again = i.recent.back().is_some_and(|r| {
                r.database == rec.database && r.id == rec.id && r.outcome == rec.outcome
            });
            if again {
                i.recent.pop_back();
            }
            i.recent.push_back(rec);
            while i.recent.len() > RECENT {
                i.recent.pop_front();
            }
        });
    }

    /// Apply stopped on a schema change in `stop.database`.
    pub fn stopped(&self, stop: DdlStop) {
        self.with(|i| i.stopped.insert(stop.database.clone(), stop));
    }

    /// The database's stream applies again: what stopped it is resolved.
    pub fn resumed(&self, database: &str) {
        self.with(|i| i.stopped.remove(database));
    }

    pub fn stop_of(&self, database: &str) -> Option<DdlStop> {
        self.with(|i| i.stopped.get(database).cloned())
    }

    /// The databases whose apply is stopped on a schema change.
    pub fn stopped_databases(&self) -> Vec<String> {
        self.with(|i| i.stopped.keys().cloned().collect())
    }

    /// What wakes `database`'s stream from its wait before a retry.
    pub fn retry_signal(&self, database: &str) -> Arc<Notify> {
        self.retry
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(database.to_string())
            .or_default()
            .clone()
    }

    /// `database`'s stream tries again now (a permit is kept if it is not
    /// waiting yet).
    pub fn retry_now(&self, database: &str) {
        self.retry_signal(database).notify_one();
    }

    /// The operator chose to skip event `id` of `database`.
    pub fn skip(&self, database: &str, id: &str) {
        self.with(|i| i.skip.insert(id.to_string()));
        self.retry_now(database);
    }

    /// Whether event `id` is to be skipped. Kept: a group applied again
    /// (after a batched statement failed) meets the event again.
    pub fn is_skipped(&self, id: &str) -> bool {
        self.with(|i| i.skip.contains(id))
    }

    /// For `/status`: mode, counts per database, the stops, recent commands.
    pub fn report(&self) -> Value {
        self.with(|i| {
            let mut counts: BTreeMap<&str, BTreeMap<&str, u64>> = BTreeMap::new();
            for ((db, outcome), n) in &i.counts {
                counts.entry(db).or_default().insert(outcome, *n);
            }
            json!({
                "setting": self.setting,
                "capturing": i.capturing,
                "commands": counts,
                "stopped": i.stopped.values().collect::<Vec<_>>(),
                "recent": i.recent.iter().collect::<Vec<_>>(),
            })
        })
    }
}

impl crate::telemetry::status::Report for DdlControl {
    fn report(&self) -> Value {
        DdlControl::report(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(id: &str, outcome: &'static str) -> DdlRecord {
        DdlRecord {
            database: "app".into(),
            id: id.into(),
            tag: "ALTER TABLE".into(),
            statement: "ALTER TABLE t ADD c int".into(),
            outcome,
            at: String::new(),
        }
    }

    #[test]
    fn a_command_that_keeps_failing_is_counted_each_time_and_listed_once() {
        let c = DdlControl::new(DdlSetting::Auto, None);
        c.stopped(DdlStop {
            database: "app".into(),
            id: Some("7.1".into()),
            statement: None,
            error: "refused".into(),
        });
        c.record(rec("7.1", "failed"));
        c.record(rec("7.1", "failed"));
        let r = c.report();
        assert_eq!(r["commands"]["app"]["failed"], 2);
        assert_eq!(r["recent"].as_array().unwrap().len(), 1);
        assert_eq!(c.stopped_databases(), vec!["app".to_string()]);
        c.skip("app", "7.1");
        assert!(c.is_skipped("7.1"));
        c.record(rec("7.1", "skipped"));
        assert!(c.stopped_databases().is_empty());
        assert_eq!(c.report()["recent"].as_array().unwrap().len(), 2);
    }
}
