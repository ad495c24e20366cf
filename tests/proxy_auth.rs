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
    assert!(wait_until(std::time::Duration::from_secs(120), || {
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
    let text = tokio::task::spawn_blocking(move || query_over_tls(port))
        .await
        .unwrap();
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

/// `SELECT 'over tls'` through the proxy on `port` with sslmode=require,
/// and whether the connection used TLS ("SSL connection"): by psql, or by
/// psycopg where psql's libpq has no TLS (the PyPI builds a machine without
/// PostgreSQL fetches).
fn query_over_tls(port: u16) -> String {
    let out = std::process::Command::new(pg_program("psql"))
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
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    if !err.contains("not compiled in") {
        assert!(out.status.success(), "{err}");
        return String::from_utf8_lossy(&out.stdout).into_owned();
    }
    ensure_psycopg();
    let script = format!(
        "import psycopg\n\
         c = psycopg.connect(host='127.0.0.1', port={port}, user='{APP_USER}', password='{APP_PW}', \
         dbname='postgres', sslmode='require')\n\
         print(c.execute(\"SELECT 'over tls'\").fetchone()[0])\n\
         print('SSL connection' if c.pgconn.ssl_in_use else 'no SSL')"
    );
    let out = std::process::Command::new("python3")
        .args(["-c", &script])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A TCP connection to the proxy from the loopback address `from`.
async fn connect_from(from: &str, port: u16) -> tokio::net::TcpStream {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind(format!("{from}:0").parse().unwrap()).unwrap();
    sock.connect(format!("127.0.0.1:{port}").parse().unwrap())
        .await
        .unwrap()
}

/// Sends a startup packet for `user` and reads up to the authentication request.
async fn start_auth(s: &mut tokio::net::TcpStream, user: &str) {
    use tokio::io::AsyncWriteExt;
    let params = vec![
        ("user".to_string(), user.to_string()),
        ("database".to_string(), "postgres".to_string()),
    ];
    s.write_all(&pgshift::wire::messages::startup_message(&params))
        .await
        .unwrap();
    let (tag, _) = read_msg(s).await.expect("an authentication request");
    assert_eq!(tag, b'R');
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_flood_does_not_lock_out_real_clients() {
    let pg = Cluster::start();
    let proxy = start_proxy_with(
        &pg,
        "scram-sha-256",
        "max_client_connections = 3\nmax_startup_connections = 40\n\
         max_startup_connections_per_address = 20\nstartup_timeout = \"1h\"",
    )
    .await;
    let before = try_connect(&proxy.url("postgres")).await.unwrap();

    // 1,000 connections from one address that never send a startup packet:
    // 20 hold startup slots, the rest are refused at once with 53300.
    let mut flood = Vec::new();
    for _ in 0..1000 {
        flood.push(connect_from("127.0.0.2", proxy.port).await);
    }
    let mut last = flood.pop().unwrap();
    assert_eq!(error_then_eof(&mut last).await.as_deref(), Some("53300"));
    // Connections from another address that stall in authentication hold
    // startup slots, not places under max_client_connections.
    let mut stalled = Vec::new();
    for _ in 0..10 {
        let mut s = connect_from("127.0.0.3", proxy.port).await;
        start_auth(&mut s, APP_USER).await;
        stalled.push(s);
    }

    // Real clients still connect and query, up to max_client_connections.
    let a = try_connect(&proxy.url("postgres")).await.unwrap();
    let b = try_connect(&proxy.url("postgres")).await.unwrap();
    assert_eq!(who(&a).await, APP_USER);
    assert_eq!(who(&b).await, APP_USER);
    assert_eq!(who(&before).await, APP_USER);
    let e = try_connect(&proxy.url("postgres")).await.err().unwrap();
    assert_eq!(code(&e), "53300", "{e}");
    assert!(message(&e).contains("max_client_connections"), "{e:?}");
    assert!(
        metric(
            &proxy.ctx,
            "pgshift_proxy_errors_total",
            "kind=\"startup_limit\""
        ) >= 979.0
    );
    drop((flood, stalled));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_sent_instead_of_sasl_is_not_echoed() {
    use tokio::io::AsyncWriteExt;
    let pg = Cluster::start();
    let proxy = start_proxy(&pg).await;
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", proxy.port))
        .await
        .unwrap();
    start_auth(&mut s, APP_USER).await;
    // A cleartext PasswordMessage where SASLInitialResponse is expected.
    let secret = b"Hunter2-cleartext\0";
    let mut msg = vec![b'p'];
    msg.extend_from_slice(&(secret.len() as i32 + 4).to_be_bytes());
    msg.extend_from_slice(secret);
    s.write_all(&msg).await.unwrap();
    let (tag, body) = read_msg(&mut s).await.expect("an error");
    assert_eq!(tag, b'E');
    assert_eq!(sqlstate(&body), "08P01");
    let text = String::from_utf8_lossy(&body);
    assert!(!text.contains("Hunter2"), "{text}");
    assert!(text.contains("SASL"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_users_fail_like_wrong_passwords() {
    // Authentication fails before any backend is opened: no cluster needed.
    let dead = free_port();
    for auth in ["scram-sha-256", "md5"] {
        let text = proxy_config_text(free_port(), free_port(), dead, dead, auth, "");
        let config = pgshift::Config::from_toml(&text, &|_| None).unwrap();
        let ctx = pgshift::Context::new(config);
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
            .await
            .unwrap();
        let port = listener.local_addr().unwrap().port();
        let (_h, task) = pgshift::proxy::Proxy::start(ctx, listener).unwrap();
        let url = |user: &str| {
            format!("postgres://{user}:wrong_pw@127.0.0.1:{port}/postgres?sslmode=disable")
        };
        let known = try_connect(&url(APP_USER)).await.err().unwrap();
        let unknown = try_connect(&url("ghost")).await.err().unwrap();
        assert_eq!(code(&known), "28P01", "{known}");
        assert_eq!(code(&unknown), "28P01", "{unknown}");
        assert_eq!(
            message(&known).replace(APP_USER, "U"),
            message(&unknown).replace("ghost", "U"),
            "{auth}"
        );
        task.abort();
    }
}
