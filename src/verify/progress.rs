//! A verification's live progress: for `/status`, for metrics, and as INFO
//! lines in the log.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus::{IntGauge, Registry};
use serde_json::{Value, json};

use super::TableVerify;
use crate::telemetry::status::Report;

/// A progress line at least every this many tables…
const LOG_EVERY_TABLES: u64 = 100;
/// …or this often, whichever comes first.
const LOG_EVERY: Duration = Duration::from_secs(10);

/// The live progress of one database's verification. Clones share it, so
/// the caller keeps one for `/status` while the verification updates it.
#[derive(Clone)]
pub struct VerifyProgress(Arc<Inner>);

struct Inner {
    database: String,
    running: AtomicBool,
    tables: AtomicU64,
    done: AtomicU64,
    mismatched: AtomicU64,
    rows: AtomicI64,
    comparing: Mutex<Vec<String>>,
    times: Mutex<Times>,
    metrics: Option<Metrics>,
}

#[derive(Default)]
struct Times {
    started: Option<Instant>,
    finished_seconds: Option<f64>,
    last_log: Option<Instant>,
    logged_done: u64,
}

struct Metrics {
    tables: IntGauge,
    compared: IntGauge,
    mismatched: IntGauge,
    rows: IntGauge,
    running: IntGauge,
}

impl Metrics {
    fn register(reg: &Registry, database: &str) -> Metrics {
        use crate::telemetry::metrics::int_gauge_latest as g;
        let labels = [("database", database)];
        Metrics {
            tables: g(
                reg,
                "pgshift_verify_tables",
                "Tables the latest verification of the database compares",
                &labels,
            ),
            compared: g(
                reg,
                "pgshift_verify_tables_compared",
                "Tables the latest verification of the database has compared so far",
                &labels,
            ),
            mismatched: g(
                reg,
                "pgshift_verify_tables_mismatched",
                "Tables that differ between source and target in the latest verification of the database",
                &labels,
            ),
            rows: g(
                reg,
                "pgshift_verify_rows_compared",
                "Rows compared so far by the latest verification of the database (the larger side of each range)",
                &labels,
            ),
            running: g(
                reg,
                "pgshift_verify_running",
                "1 while a verification of the database runs, else 0",
                &labels,
            ),
        }
    }
}

impl VerifyProgress {
    /// Progress without metrics.
    pub fn new(database: &str) -> VerifyProgress {
        VerifyProgress::build(database, None)
    }

    /// Progress that also sets the `pgshift_verify_*` gauges (labelled by
    /// database) in `reg`. A later progress for the same database takes the
    /// gauges over, so each database shows its latest verification.
    pub fn with_metrics(database: &str, reg: &Registry) -> VerifyProgress {
        VerifyProgress::build(database, Some(Metrics::register(reg, database)))
    }

    fn build(database: &str, metrics: Option<Metrics>) -> VerifyProgress {
        VerifyProgress(Arc::new(Inner {
            database: database.to_string(),
            running: AtomicBool::new(false),
            tables: AtomicU64::new(0),
            done: AtomicU64::new(0),
            mismatched: AtomicU64::new(0),
            rows: AtomicI64::new(0),
            comparing: Mutex::new(Vec::new()),
            times: Mutex::new(Times::default()),
            metrics,
        }))
    }

    pub fn database(&self) -> &str {
        &self.0.database
    }
    pub fn running(&self) -> bool {
        self.0.running.load(Ordering::Relaxed)
    }
    pub fn tables_total(&self) -> u64 {
        self.0.tables.load(Ordering::Relaxed)
    }
    pub fn tables_done(&self) -> u64 {
        self.0.done.load(Ordering::Relaxed)
    }
    pub fn tables_mismatched(&self) -> u64 {
        self.0.mismatched.load(Ordering::Relaxed)
    }
    pub fn rows_compared(&self) -> i64 {
        self.0.rows.load(Ordering::Relaxed)
    }
    /// The tables being compared right now (one per job).
    pub fn comparing(&self) -> Vec<String> {
        self.0
            .comparing
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn times(&self) -> std::sync::MutexGuard<'_, Times> {
        self.0.times.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn metric(&self, f: impl FnOnce(&Metrics)) {
        if let Some(m) = &self.0.metrics {
            f(m);
        }
    }

    /// A verification of `tables` tables starts (counters reset).
    pub(super) fn start(&self, tables: usize) {
        let i = &self.0;
        i.running.store(true, Ordering::Relaxed);
        i.tables.store(tables as u64, Ordering::Relaxed);
        i.done.store(0, Ordering::Relaxed);
        i.mismatched.store(0, Ordering::Relaxed);
        i.rows.store(0, Ordering::Relaxed);
        *self.times() = Times {
            started: Some(Instant::now()),
            last_log: Some(Instant::now()),
            ..Times::default()
        };
        self.metric(|m| {
            m.running.set(1);
            m.tables.set(tables as i64);
            m.compared.set(0);
            m.mismatched.set(0);
            m.rows.set(0);
        });
        tracing::info!(database = %i.database, tables, "verification started");
    }

    pub(super) fn begin_table(&self, table: &str) {
        self.0
            .comparing
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(table.to_string());
    }

    pub(super) fn add_rows(&self, rows: i64) {
        let rows = rows.max(0);
        self.0.rows.fetch_add(rows, Ordering::Relaxed);
        self.metric(|m| m.rows.add(rows));
    }

    /// A table's result is in (also for a table missing on one side, which
    /// was never begun).
    pub(super) fn end_table(&self, v: &TableVerify) {
        let i = &self.0;
        {
            let mut c = i.comparing.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(at) = c.iter().position(|t| t == &v.table) {
                c.remove(at);
            }
        }
        let done = i.done.fetch_add(1, Ordering::Relaxed) + 1;
        if !v.matches {
            i.mismatched.fetch_add(1, Ordering::Relaxed);
        }
        self.metric(|m| {
            m.compared.inc();
            if !v.matches {
                m.mismatched.inc();
            }
        });
        let due = {
            let mut t = self.times();
            let due = done - t.logged_done >= LOG_EVERY_TABLES
                || t.last_log.is_none_or(|at| at.elapsed() >= LOG_EVERY);
            if due {
                t.last_log = Some(Instant::now());
                t.logged_done = done;
            }
            due
        };
        if due && done < self.tables_total() {
            tracing::info!(
                database = %i.database,
                tables = self.tables_total(),
                compared = done,
                mismatched = self.tables_mismatched(),
                rows = self.rows_compared(),
                "verifying"
            );
        }
    }

    /// The verification ended (finished or failed).
    pub(super) fn finish(&self) {
        let seconds = {
            let mut t = self.times();
            let s = t.started.map(|s| s.elapsed().as_secs_f64()).unwrap_or(0.0);
            t.finished_seconds = Some(s);
            s
        };
        self.0.running.store(false, Ordering::Relaxed);
        self.0
            .comparing
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        self.metric(|m| m.running.set(0));
        tracing::info!(
            database = %self.0.database,
            tables = self.tables_total(),
            compared = self.tables_done(),
            mismatched = self.tables_mismatched(),
            rows = self.rows_compared(),
            seconds,
            "verification ended"
        );
    }
}

impl Report for VerifyProgress {
    fn report(&self) -> Value {
        let seconds = {
            let t = self.times();
            t.finished_seconds
                .or_else(|| t.started.map(|s| s.elapsed().as_secs_f64()))
        };
        json!({
            "database": self.database(),
            "running": self.running(),
            "tables": self.tables_total(),
            "tables_compared": self.tables_done(),
            "tables_mismatched": self.tables_mismatched(),
            "rows_compared": self.rows_compared(),
            "comparing": self.comparing(),
            "seconds": seconds,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(name: &str, matches: bool) -> TableVerify {
        TableVerify {
            table: name.into(),
            source_rows: Some(1),
            target_rows: Some(1),
            matches,
            detail: None,
            ranges: Vec::new(),
        }
    }

    #[test]
    fn counts_tables_rows_and_what_is_being_compared() {
        let reg = Registry::new();
        let p = VerifyProgress::with_metrics("app", &reg);
        p.start(2);
        p.begin_table("public.a");
        p.begin_table("public.b");
        p.add_rows(10);
        p.end_table(&table("public.a", false));
        let r = p.report();
        assert_eq!(r["running"], true);
        assert_eq!(r["tables"], 2);
        assert_eq!(r["tables_compared"], 1);
        assert_eq!(r["tables_mismatched"], 1);
        assert_eq!(r["rows_compared"], 10);
        assert_eq!(r["comparing"], json!(["public.b"]));
        p.end_table(&table("public.b", true));
        p.finish();
        assert_eq!(p.report()["running"], false);
        let text = crate::telemetry::metrics::render(&reg).unwrap();
        for line in [
            "pgshift_verify_tables{database=\"app\"} 2",
            "pgshift_verify_tables_compared{database=\"app\"} 2",
            "pgshift_verify_tables_mismatched{database=\"app\"} 1",
            "pgshift_verify_rows_compared{database=\"app\"} 10",
            "pgshift_verify_running{database=\"app\"} 0",
        ] {
            assert!(text.contains(line), "{line} in\n{text}");
        }
    }

    #[test]
    fn a_second_progress_in_one_registry_takes_the_gauges_over() {
        let reg = Registry::new();
        let first = VerifyProgress::with_metrics("app", &reg);
        first.start(5);
        let other = VerifyProgress::with_metrics("other", &reg);
        other.start(7);
        let second = VerifyProgress::with_metrics("app", &reg);
        second.start(3);
        let text = crate::telemetry::metrics::render(&reg).unwrap();
        assert!(
            text.contains("pgshift_verify_tables{database=\"app\"} 3"),
            "{text}"
        );
        assert!(
            text.contains("pgshift_verify_tables{database=\"other\"} 7"),
            "{text}"
        );
        assert!(!text.contains("} 5"), "{text}");
    }
}
