//! TLS toward the servers for pgshift's own connections (tokio-postgres via
//! `db::connect`, the wire client `ServerConnection`, replication), with
//! libpq's sslmode meanings, against real clusters with TLS on or off.

mod common;
use common::*;

use std::path::Path;

use pgshift::config::Endpoint;
use pgshift::db;
use pgshift::replication::client::ReplicationConnection;
use pgshift::wire::{ConnectOptions, ServerConnection, WireError};

/// The superuser on `host`, with URL parameters `params` (`sslmode=…`).
fn endpoint(c: &Cluster, host: &str, params: &str) -> Endpoint {
    let url = format!(
        "postgres://{SUPERUSER}:{SUPERUSER_PW}@{host}:{}/postgres?{params}",
        c.port
    );
    Endpoint::parse("source.url", &url).unwrap_or_else(|e| panic!("{url}: {e}"))
}

fn root_param(path: &Path) -> String {
    format!("sslrootcert={}", path.display())
}

/// Whether the tokio-postgres connection to `ep` is encrypted, per the server.
async fn db_ssl(ep: &Endpoint) -> Result<bool, String> {
    let client = db::connect(ep, "test server")
        .await
        .map_err(|e| e.to_string())?;
    let row = client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .map_err(|e| db::describe(&e))?;
    Ok(row.get(0))
}

async fn wire_connect(ep: &Endpoint) -> Result<ServerConnection, WireError> {
    let startup = [("user", ep.user.as_str()), ("database", ep.dbname.as_str())]
        .map(|(k, v)| (k.to_string(), v.to_string()));
    let password = ep.password.as_ref().map(|p| p.expose());
    ServerConnection::connect(&ConnectOptions::for_endpoint(ep), &startup, password).await
}

/// Whether the wire-client connection to `ep` is encrypted, per the server.
async fn wire_ssl(ep: &Endpoint) -> Result<bool, String> {
    let mut conn = wire_connect(ep).await.map_err(|e| e.to_string())?;
    let rows = conn
        .simple_query("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        .await
        .map_err(|e| e.to_string())?;
    let is_tls = conn.stream.is_tls();
    conn.terminate().await;
    let ssl = rows.first().and_then(|r| r.first().cloned().flatten());
    assert_eq!(
        ssl.as_deref() == Some("t"),
        is_tls,
        "server and client disagree"
    );
    Ok(is_tls)
}

#[tokio::test]
async fn tls_only_server_gets_tls_from_every_connection_kind() {
    let c = Cluster::start_with(ClusterOptions {
        tls: ClusterTls::Only,
        ..Default::default()
    });
    let host = "127.0.0.1";

    // tokio-postgres connections.
    assert_eq!(
        db_ssl(&endpoint(&c, host, "sslmode=require")).await,
        Ok(true)
    );
    assert_eq!(
        db_ssl(&endpoint(&c, host, "sslmode=prefer")).await,
        Ok(true)
    );
    let err = db_ssl(&endpoint(&c, host, "sslmode=disable"))
        .await
        .unwrap_err();
    assert!(
        err.contains("no pg_hba.conf entry") && err.contains("no encryption"),
        "plaintext must be refused by the server with its reason: {err}"
    );
    assert!(err.contains("SQLSTATE 28000"), "{err}");

    // The wire client (proxy backends).
    assert_eq!(
        wire_ssl(&endpoint(&c, host, "sslmode=require")).await,
        Ok(true)
    );
    assert_eq!(
        wire_ssl(&endpoint(&c, host, "sslmode=prefer")).await,
        Ok(true)
    );
    match wire_connect(&endpoint(&c, host, "sslmode=disable")).await {
        Err(WireError::Server(e)) => assert_eq!(e.code, "28000", "{e}"),
        Err(e) => panic!("expected the server's refusal, got {e}"),
        Ok(_) => panic!("plaintext connection accepted by a hostssl-only server"),
    }

    // A replication=database connection.
    let ep = endpoint(&c, host, "sslmode=require");
    let mut repl = ReplicationConnection::connect(&ep, "postgres", "pgshift-tls-test")
        .await
        .expect("replication connection over TLS");
    let system = repl.identify_system().await.expect("IDENTIFY_SYSTEM");
    assert!(system.timeline >= 1);
    assert_eq!(system.dbname.as_deref(), Some("postgres"));
    let ssl = c.psql(
        "postgres",
        "SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
         WHERE a.application_name = 'pgshift-tls-test'",
    );
    assert_eq!(ssl, "t", "the replication connection is not encrypted");
    repl.close().await;
}

#[tokio::test]
async fn tls_optional_server_serves_each_mode_as_asked() {
    let c = Cluster::start_with(ClusterOptions {
        tls: ClusterTls::On,
        ..Default::default()
    });
    let host = "127.0.0.1";
    for (mode, tls) in [("disable", false), ("prefer", true), ("require", true)] {
        let ep = endpoint(&c, host, &format!("sslmode={mode}"));
        assert_eq!(db_ssl(&ep).await, Ok(tls), "db::connect, sslmode={mode}");
        assert_eq!(
            wire_ssl(&ep).await,
            Ok(tls),
            "ServerConnection, sslmode={mode}"
        );
    }
}

#[tokio::test]
async fn plaintext_server_refuses_require_and_prefer_falls_back() {
    let c = Cluster::start();
    let host = "127.0.0.1";

    let err = db_ssl(&endpoint(&c, host, "sslmode=require"))
        .await
        .unwrap_err();
    assert!(err.contains("does not support TLS"), "{err}");
    assert!(
        err.contains("test server") && err.contains(&c.port.to_string()),
        "{err}"
    );
    assert_eq!(
        db_ssl(&endpoint(&c, host, "sslmode=prefer")).await,
        Ok(false)
    );
    assert_eq!(
        db_ssl(&endpoint(&c, host, "sslmode=disable")).await,
        Ok(false)
    );

    let err = wire_ssl(&endpoint(&c, host, "sslmode=require"))
        .await
        .unwrap_err();
    assert!(
        err.contains("does not support SSL") && err.contains("sslmode=require"),
        "{err}"
    );
    assert_eq!(
        wire_ssl(&endpoint(&c, host, "sslmode=prefer")).await,
        Ok(false)
    );
    // libpq's default is prefer.
    assert_eq!(wire_ssl(&endpoint(&c, host, "")).await, Ok(false));
}

#[tokio::test]
async fn verify_modes_check_the_certificate_chain_and_name() {
    let c = Cluster::start_with(ClusterOptions {
        tls: ClusterTls::Only,
        ..Default::default()
    });
    let root = c
        .tls_root_cert
        .clone()
        .expect("TLS cluster has a root cert");
    let scratch = tempfile::tempdir().unwrap();
    let wrong = TestCa::new("some other CA").write_cert(&scratch.path().join("other.crt"));
    let right = root_param(&root);
    let other = root_param(&wrong);

    // The certificate names localhost: verify-full holds there.
    let ep = endpoint(&c, "localhost", &format!("sslmode=verify-full&{right}"));
    assert_eq!(db_ssl(&ep).await, Ok(true));
    assert_eq!(wire_ssl(&ep).await, Ok(true));
    let mut repl = ReplicationConnection::connect(&ep, "postgres", "pgshift-tls-verify")
        .await
        .expect("replication connection with verify-full");
    repl.identify_system().await.expect("IDENTIFY_SYSTEM");
    repl.close().await;

    // A certificate from another CA is refused, whatever the mode, once a root is given.
    for mode in ["verify-full", "verify-ca", "require"] {
        let ep = endpoint(&c, "localhost", &format!("sslmode={mode}&{other}"));
        let err = db_ssl(&ep).await.unwrap_err();
        assert!(err.contains("certificate"), "{mode}: {err}");
        let err = wire_ssl(&ep).await.unwrap_err();
        assert!(err.contains("certificate"), "{mode}: {err}");
    }

    // 127.0.0.1 is not a name in the certificate: verify-full refuses, verify-ca does not.
    let ep = endpoint(&c, "127.0.0.1", &format!("sslmode=verify-full&{right}"));
    let err = db_ssl(&ep).await.unwrap_err();
    assert!(err.contains("not valid for name"), "{err}");
    let err = wire_ssl(&ep).await.unwrap_err();
    assert!(err.contains("not valid for name"), "{err}");
    let ep = endpoint(&c, "127.0.0.1", &format!("sslmode=verify-ca&{right}"));
    assert_eq!(db_ssl(&ep).await, Ok(true));
    assert_eq!(wire_ssl(&ep).await, Ok(true));
}

#[test]
fn verify_modes_need_a_readable_root_certificate() {
    let url = "postgres://u:p@localhost:5432/db?sslmode=verify-full";
    let err = Endpoint::parse("target.url", url).unwrap_err().to_string();
    assert!(
        err.contains("target.url") && err.contains("sslrootcert"),
        "{err}"
    );
    let scratch = tempfile::tempdir().unwrap();
    let not_pem = scratch.path().join("empty.pem");
    std::fs::write(&not_pem, "not a certificate\n").unwrap();
    let url = format!(
        "postgres://u:p@localhost:5432/db?sslmode=verify-ca&sslrootcert={}",
        not_pem.display()
    );
    let err = Endpoint::parse("target.url", &url).unwrap_err().to_string();
    assert!(err.contains("sslrootcert: no PEM certificate in"), "{err}");
    let good = TestCa::new("a CA").write_cert(&scratch.path().join("ca.pem"));
    let url = format!(
        "host=localhost user=u sslmode=verify-full sslrootcert='{}'",
        good.display()
    );
    let ep = Endpoint::parse("target.url", &url).unwrap();
    assert_eq!(ep.sslmode, pgshift::config::SslMode::VerifyFull);
    assert_eq!(ep.sslrootcert.as_deref(), Some(good.as_path()));
}
