//! What the end-to-end scenarios share beyond the harness's [`Pgshift`]
//! (tests/common/process.rs): the migration's slots and publications on
//! the source, and writers through the proxy. Shared by tests/e2e_*.rs and
//! tests/types_corpus.rs.
#![allow(dead_code)]

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::*;

pub mod corpus;

/// The migration's slots on the source (name, database).
pub fn slots(source: &Cluster) -> Vec<String> {
    source
        .psql(
            "postgres",
            "SELECT slot_name || '@' || database FROM pg_replication_slots ORDER BY 1",
        )
        .lines()
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect()
}

/// Publications in `db` on the source.
pub fn publications(source: &Cluster, db: &str) -> Vec<String> {
    source
        .psql(db, "SELECT pubname FROM pg_publication ORDER BY 1")
        .lines()
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect()
}

/// What a proxied writer saw.
#[derive(Default)]
pub struct Seen {
    pub errors: Vec<String>,
    pub slowest: Duration,
}

/// Inserts ids 1, 2, 3 … into `writes(id)` through the proxy as `app`, one
/// autocommit statement each, until stopped; the last acknowledged id is
/// published, an error is recorded and ends the writer (never retried).
pub fn proxied_writer(
    port: u16,
    db: &str,
    stop: Arc<AtomicBool>,
    last: Arc<AtomicI64>,
    seen: Arc<Mutex<Seen>>,
) {
    write_through_proxy(port, db, false, stop, last, seen)
}

/// [`proxied_writer`] with one named prepared statement, prepared once and
/// executed for every write: the statement must survive a session move.
pub fn proxied_prepared_writer(
    port: u16,
    db: &str,
    stop: Arc<AtomicBool>,
    last: Arc<AtomicI64>,
    seen: Arc<Mutex<Seen>>,
) {
    write_through_proxy(port, db, true, stop, last, seen)
}

fn write_through_proxy(
    port: u16,
    db: &str,
    prepared: bool,
    stop: Arc<AtomicBool>,
    last: Arc<AtomicI64>,
    seen: Arc<Mutex<Seen>>,
) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let url = format!("postgres://{APP_USER}:{APP_PW}@127.0.0.1:{port}/{db}");
    rt.block_on(async move {
        let c = connect(&url).await;
        const INSERT: &str = "INSERT INTO writes(id) VALUES ($1)";
        let statement = if prepared {
            Some(c.prepare(INSERT).await.expect("prepare the write"))
        } else {
            None
        };
        let mut id = 0i64;
        while !stop.load(Ordering::Relaxed) {
            id += 1;
            let t = Instant::now();
            let r = match &statement {
                Some(st) => c.execute(st, &[&id]).await,
                None => c.execute(INSERT, &[&id]).await,
            };
            {
                let mut s = seen.lock().unwrap();
                s.slowest = s.slowest.max(t.elapsed());
                if let Err(e) = r {
                    let detail = e
                        .as_db_error()
                        .map(|d| format!("{} {} ({:?})", d.code().code(), d.message(), d.detail()));
                    s.errors
                        .push(format!("id {id}: {e} {}", detail.unwrap_or_default()));
                    return;
                }
            }
            last.store(id, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
}
