//! Client authentication by the proxy (SCRAM-SHA-256, md5, trust), the
//! server's own errors relayed, the connection limit, and TLS toward clients.

mod common;
mod proxy_common;
use common::*;
use proxy_common::*;

async fn try_connect(url: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (c, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(c)
}

async fn who(c: &tokio_postgres::Client) -> String {
    c.query_one("SELECT current_user::text", &[])
        .await
        .unwrap()
        .get(0)
}

fn message(e: &tokio_postgres::Error) -> String {
    e.as_db_error()
        .map(|d| d.message().to_string())
        .unwrap_or_else(|| e.to_string())
}

fn code(e: &tokio_postgres::Error) -> String {
    e.code()
        .map(|c| c.code().to_string())
        .unwrap_or_else(|| format!("no code: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scram_md5_and_trust_succeed_and_fail() {
    let pg = Cluster::start();
    // SCRAM toward the client; the server asks SCRAM, md5 or nothing per user.
    let scram = start_proxy_with(&pg, "scram-sha-256", "").await;
    for (user, pw) in [
        (APP_USER, APP_PW),
        (MD5_USER, MD5_PW),
        (TRUST_USER, TRUST_PW),
    ] {
        let c = try_connect(&scram.url_as(user, pw, "postgres"))
            .await
            .unwrap();
        assert_eq!(who(&c).await, user);
    }
    let e = try_connect(&scram.url_as(APP_USER, "wrong", "postgres"))
        .await
        .err()
        .unwrap();
    assert_eq!(code(&e), "28P01", "{e}");
    let e = try_connect(&scram.url_as("nobody", "x", "postgres"))
        .await
        .err()
        .unwrap();
    assert_eq!(code(&e), "28P01", "{e}");

    let md5 = start_proxy_with(&pg, "md5", "").await;
    for (user, pw) in [(APP_USER, APP_PW), (MD5_USER, MD5_PW)] {
        let c = try_connect(&md5.url_as(user, pw, "postgres"))
            .await
            .unwrap();
        assert_eq!(who(&c).await, user);
    }
    let e = try_connect(&md5.url_as(MD5_USER, "wrong", "postgres"))
        .await
        .err()
        .unwrap();
    assert_eq!(code(&e), "28P01", "{e}");
    // psql too (it answers md5 from PGPASSWORD).
    let (ok, out, err) = tokio::task::spawn_blocking({
        let port = md5.port;
        move || psql_via(port, MD5_USER, MD5_PW, "postgres", "SELECT 'md5 ok'")
    })
    .await
    .unwrap();
    assert!(ok && out.contains("md5 ok"), "{err}");

    let trust = start_proxy_with(&pg, "trust", "").await;
    // No password from the client; the proxy logs in with the stored one.
    let c = try_connect(&format!(
        "postgres://{APP_USER}@127.0.0.1:{}/postgres?sslmode=disable",
        trust.port
    ))
    .await
    .unwrap();
    assert_eq!(who(&c).await, APP_USER);
    // A user the proxy has no password for, whom the server asks for one: refused clearly.
    pg.psql("postgres", "CREATE ROLE stranger LOGIN PASSWORD 'pw'");
    let e = try_connect(&format!(
        "postgres://stranger@127.0.0.1:{}/postgres?sslmode=disable",
        trust.port
    ))
    .await
    .err()
    .unwrap();
    assert_eq!(code(&e), "28P01", "{e}");

    assert!(metric(&scram.ctx, "pgshift_proxy_errors_total", "kind=\"auth\"") >= 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_database_is_the_servers_error() {
    let pg = Cluster::start();
    let proxy = start_proxy(&pg).await;
    let e = try_connect(&proxy.url("no_such_db")).await.err().unwrap();
    assert_eq!(code(&e), "3D000", "{e}");
    assert!(message(&e).contains("no_such_db"), "{e:?}");
    // Any existing database works.
    pg.create_db("other");
    let c = try_connect(&proxy.url("other")).await.unwrap();
    let db: String = c
        .query_one("SELECT current_database()::text", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(db, "other");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_limit_is_enforced_with_53300() {
    let pg = Cluster::start();
    let proxy = start_proxy_with(&pg, "scram-sha-256", "max_client_connections = 2").await;
    let a = try_connect(&proxy.url("postgres")).await.unwrap();
    let _b = try_connect(&proxy.url("postgres")).await.unwrap();
    let e = try_connect(&proxy.url("postgres")).await.err().unwrap();
    assert_eq!(code(&e), "53300", "{e}");
    assert!(message(&e).contains("max_client_connections"), "{e:?}");
    assert_eq!(
        metric(&proxy.ctx, "pgshift_proxy_client_connections", ""),
        2.0
    );
    drop(a);
    assert!(wait_until(std::time::Duration::from_secs(5), || {
        metric(&proxy.ctx, "pgshift_proxy_client_connections", "") == 1.0
    }));
    let c = try_connect(&proxy.url("postgres")).await.unwrap();
    assert_eq!(who(&c).await, APP_USER);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_toward_clients_when_configured() {
    let pg = Cluster::start();
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
    let st = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("run openssl");
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    let extra = format!(
        "tls_cert = \"{}\"\ntls_key = \"{}\"",
        cert.display(),
        key.display()
    );
    let proxy = start_proxy_with(&pg, "scram-sha-256", &extra).await;
    let port = proxy.port;
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(pg_program("psql"))
            .args([
                "-X",
                "-A",
                "-t",
                "-h",
                "127.0.0.1",
                "-U",
                APP_USER,
                "-d",
                "postgres",
            ])
            .arg("-p")
            .arg(port.to_string())
            .args(["-c", "SELECT 'over tls'", "-c", "\\conninfo"])
            .env("PGPASSWORD", APP_PW)
            .env("PGSSLMODE", "require")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("over tls") && text.contains("SSL connection"),
        "{text}"
    );
    // Without TLS configured the proxy answers 'N' and plaintext still works.
    let plain = start_proxy(&pg).await;
    let port = plain.port;
    let (ok, out, err) = tokio::task::spawn_blocking(move || {
        psql_via(port, APP_USER, APP_PW, "postgres", "SELECT 'plain'")
    })
    .await
    .unwrap();
    assert!(ok && out.contains("plain"), "{err}");
}
