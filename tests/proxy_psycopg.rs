//! Python psycopg 3 through the proxy (installed from PyPI when missing).

mod common;
mod proxy_common;
use common::*;
use proxy_common::*;

use std::process::Command;

/// Makes sure `import psycopg` works, installing `psycopg[binary]` if needed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psycopg_through_the_proxy() {
    ensure_psycopg();
    let pg = Cluster::start();
    pg.create_db("py");
    pg.psql("py", "GRANT ALL ON SCHEMA public TO app");
    let proxy = start_proxy(&pg).await;
    let dsn = format!(
        "host=127.0.0.1 port={} user={APP_USER} password={APP_PW} dbname=py sslmode=disable",
        proxy.port
    );
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/proxy_psycopg.py");
    let out = tokio::task::spawn_blocking(move || {
        Command::new("python3")
            .arg(script)
            .arg(dsn)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("ALL OK"),
        "psycopg script failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(metric(&proxy.ctx, "pgshift_proxy_queries_total", "") > 20.0);
}
