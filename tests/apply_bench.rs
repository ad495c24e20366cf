//! Apply throughput on a pgbench TPC-B backlog (not part of the normal run):
//! `cargo test --release --test apply_bench -- --ignored --nocapture`.
//! Set `PGSHIFT_BENCH_TX` for the backlog size (default 100000),
//! `PGSHIFT_BENCH_SCALE` for pgbench's scale (1) and `PGSHIFT_BENCH_GROUP`
//! for the source transactions per target transaction.

mod common;
use common::*;

use std::process::Command;
use std::time::Instant;

use bytes::Bytes;
use pgshift::config::Endpoint;
use pgshift::replication::apply::{Applier, ApplyOptions};
use pgshift::replication::pgoutput::Decoder;

const DB: &str = "postgres";

fn pgbench(c: &Cluster, args: &[&str]) {
    let out = Command::new(pg_program("pgbench"))
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &c.port.to_string(),
            "-U",
            SUPERUSER,
        ])
        .args(args)
        .arg(DB)
        .env("PGPASSWORD", SUPERUSER_PW)
        .output()
        .expect("run pgbench");
    assert!(
        out.status.success(),
        "pgbench: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
#[ignore]
async fn drain_tpcb_backlog() {
    let n: usize = std::env::var("PGSHIFT_BENCH_TX")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let src = Cluster::start_with(ClusterOptions {
        conf: vec!["synchronous_commit = on".into()],
        ..Default::default()
    });
    let dst = Cluster::start();
    let native = Cluster::start();
    let scale = std::env::var("PGSHIFT_BENCH_SCALE").unwrap_or_else(|_| "1".into());
    pgbench(&src, &["-i", "-q", "-s", &scale]);
    pgbench(&dst, &["-i", "-q", "-s", &scale]);
    pgbench(&native, &["-i", "-q", "-s", &scale]);
    native.psql(
        DB,
        "ALTER TABLE pgbench_history ADD COLUMN id bigserial PRIMARY KEY",
    );
    src.psql(
        DB,
        "ALTER TABLE pgbench_history ADD COLUMN id bigserial PRIMARY KEY",
    );
    dst.psql(
        DB,
        "ALTER TABLE pgbench_history ADD COLUMN id bigserial PRIMARY KEY",
    );
    src.psql(DB, "CREATE PUBLICATION pub FOR ALL TABLES");
    src.psql(
        DB,
        "SELECT pg_create_logical_replication_slot('slot', 'pgoutput')",
    );
    // Native logical replication, created disabled so the same backlog builds up.
    src.psql(
        DB,
        "SELECT pg_create_logical_replication_slot('native', 'pgoutput')",
    );
    native.psql(
        DB,
        &format!(
            "CREATE SUBSCRIPTION sub CONNECTION 'host=127.0.0.1 port={} user={SUPERUSER} password={SUPERUSER_PW} dbname={DB}' \
             PUBLICATION pub WITH (create_slot = false, slot_name = 'native', copy_data = false, enabled = false)",
            src.port
        ),
    );
    let clients = 8;
    pgbench(
        &src,
        &[
            "-n",
            "-c",
            &clients.to_string(),
            "-j",
            "2",
            "-t",
            &(n / clients).to_string(),
        ],
    );

    let c = src.client(DB).await;
    let t0 = Instant::now();
    let msgs: Vec<Bytes> = c
        .query(
            "SELECT data FROM pg_logical_slot_peek_binary_changes('slot', NULL, NULL, \
             'proto_version', '1', 'publication_names', 'pub')",
            &[],
        )
        .await
        .unwrap()
        .into_iter()
        .map(|r| Bytes::from(r.get::<_, Vec<u8>>(0)))
        .collect();
    println!(
        "decoded {} messages on the source in {:?}",
        msgs.len(),
        t0.elapsed()
    );

    let target = Endpoint::parse("target.url", &dst.url(DB)).unwrap();
    let mut opts = ApplyOptions::new("bench", DB);
    if let Some(g) = std::env::var("PGSHIFT_BENCH_GROUP")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        opts.max_batch_transactions = g;
        opts.max_net_batch_transactions = g;
    }
    let mut a = Applier::connect(&target, opts, None).await.unwrap();
    let cpu0 = cpu_seconds();
    let t0 = Instant::now();
    // Decoded here as the stream does, inside the measured time as before.
    let mut d = Decoder::new();
    for m in &msgs {
        a.handle(d.decode(m.clone()).unwrap()).await.unwrap();
    }
    a.flush().await.unwrap();
    let secs = t0.elapsed().as_secs_f64();
    println!(
        "pgshift process CPU during apply: {:.2}s",
        cpu_seconds() - cpu0
    );
    let s = a.stats();
    println!(
        "applied {} transactions ({} row changes) in {secs:.2}s: {:.0} tx/s, {:.0} rows/s",
        s.transactions,
        s.inserts + s.updates + s.deletes,
        s.transactions as f64 / secs,
        (s.inserts + s.updates + s.deletes) as f64 / secs
    );
    assert_eq!(table_fingerprints(&src, DB), table_fingerprints(&dst, DB));

    // Native: enable the subscription and time the drain (decoding included).
    let want = src.psql(DB, "SELECT count(*) FROM pgbench_history");
    let t0 = Instant::now();
    native.psql(DB, "ALTER SUBSCRIPTION sub ENABLE");
    assert!(wait_until(std::time::Duration::from_secs(600), || native
        .psql(DB, "SELECT count(*) FROM pgbench_history")
        == want));
    let native_secs = t0.elapsed().as_secs_f64();
    println!(
        "native logical replication drained {} transactions in {native_secs:.2}s: {:.0} tx/s (pgshift/native = {:.2}, decoding excluded for pgshift)",
        s.transactions,
        s.transactions as f64 / native_secs,
        native_secs / secs
    );
}

/// User + system CPU of this process so far (Linux).
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<f64> = after
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0.0))
        .collect();
    // Fields 14 and 15 (utime, stime) in clock ticks, counted after the comm field.
    (f.get(11).copied().unwrap_or(0.0) + f.get(12).copied().unwrap_or(0.0)) / 100.0
}
