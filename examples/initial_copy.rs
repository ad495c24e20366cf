//! Runs only pgshift's initial copy of one database (target database,
//! pre-data schema, parallel data copy, post-data schema, sequences) from an
//! exported snapshot, as the migration does, and prints the time of each
//! step. Used by `bench/copy.sh`; not part of the pgshift command line.
//!
//! cargo run --release --example initial_copy -- SOURCE_URL TARGET_URL DB [JOBS] [SPLIT]

use std::time::Instant;

use pgshift::config::{Endpoint, parse_bytes};
use pgshift::filter::TableFilter;
use pgshift::replication::copy::{CopyOptions, CopyProgress, copy_database};
use pgshift::schema::{self, Section};
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 4 {
        return Err("usage: initial_copy SOURCE_URL TARGET_URL DB [JOBS] [SPLIT]".into());
    }
    let source = Endpoint::parse("source", &args[1])?;
    let target = Endpoint::parse("target", &args[2])?;
    let db = &args[3];
    let jobs: usize = args.get(4).map(|s| s.parse()).transpose()?.unwrap_or(4);
    let split = args
        .get(5)
        .map(|s| parse_bytes(s))
        .transpose()?
        .unwrap_or(1 << 30);

    let all = Instant::now();
    // Offline-mode snapshot: a REPEATABLE READ transaction held open.
    let holder = pgshift::db::connect(&source.with_dbname(db), "snapshot holder").await?;
    holder
        .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .await?;
    let snapshot: String = holder
        .query_one("SELECT pg_export_snapshot()", &[])
        .await?
        .get(0);

    let step = Instant::now();
    let (_, plan) = tokio::try_join!(
        schema::prepare_target_database(&target, &source, db, true),
        schema::plan_dump(&source, &target, db)
    )?;
    // Both sections are dumped while the snapshot is held; post-data waits in memory.
    let (pre_data, post_data) = tokio::try_join!(
        schema::dump_section(&source, db, Some(&snapshot), &plan, Section::PreData),
        schema::dump_section(&source, db, Some(&snapshot), &plan, Section::PostData)
    )?;
    schema::restore_section(&target, &pre_data).await?;
    let pre = step.elapsed().as_secs_f64();

    let step = Instant::now();
    let opts = CopyOptions {
        jobs,
        split_larger_than: split,
        filter: TableFilter::default(),
    };
    let progress = CopyProgress::new(db, None);
    let report = copy_database(
        &source,
        &target,
        db,
        &snapshot,
        &opts,
        progress,
        CancellationToken::new(),
    )
    .await?;
    let data = step.elapsed().as_secs_f64();

    let step = Instant::now();
    schema::restore_section(&target, &post_data).await?;
    let post = step.elapsed().as_secs_f64();
    let src = pgshift::db::connect(&source.with_dbname(db), "source").await?;
    let tgt = pgshift::db::connect(&target.with_dbname(db), "target").await?;
    let seqs = schema::copy_sequences(&src, &tgt).await?;
    drop(holder);
    println!(
        "pgshift initial copy: {:.2}s total (pre-data {pre:.2}s, data {data:.2}s for {} rows / {} MB in {} parts, post-data {post:.2}s, {} sequences)",
        all.elapsed().as_secs_f64(),
        report.rows,
        report.bytes >> 20,
        report.parts,
        seqs.copied
    );
    Ok(())
}
