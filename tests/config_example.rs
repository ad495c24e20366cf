//! The documented example configuration parses, and documents every key.

mod common;

use pgshift::Config;
use pgshift::config::{AuthMethod, MigrationMode};

const EXAMPLE: &str = include_str!("../config/pgshift.example.toml");

fn env(k: &str) -> Option<String> {
    match k {
        "APP_PASSWORD" | "SOURCE_PASSWORD" | "TARGET_PASSWORD" | "PGSHIFT_ADMIN_TOKEN" => {
            Some(format!("{k}-value"))
        }
        _ => None,
    }
}

#[test]
fn example_config_parses_with_its_defaults() {
    let c = Config::from_toml(EXAMPLE, &env).unwrap();
    let p = c.proxy();
    assert_eq!(p.auth, AuthMethod::ScramSha256);
    assert_eq!(c.proxy_listen.port(), 6432);
    assert_eq!(c.admin_listen.port(), 9432);
    assert_eq!(p.max_client_connections, 1000);
    assert_eq!(p.max_startup_connections, 256);
    assert_eq!(p.max_startup_connections_per_address, 64);
    assert_eq!(p.max_message_size.0, 1 << 30);
    assert_eq!(
        c.user_password("app").unwrap().expose(),
        "APP_PASSWORD-value"
    );
    assert_eq!(c.source.port, 5432);
    assert_eq!(c.target.port, 5433);
    let m = c.migration().unwrap();
    assert_eq!(m.mode, MigrationMode::Online);
    assert_eq!(m.copy_jobs, 4);
    assert_eq!(m.logical_decoding_work_mem.0, 8 << 20);
    assert_eq!(c.cutover().max_attempts, 3);
    // Below PostgreSQL's minimum: refused, naming the key.
    let small = EXAMPLE.replace(
        "logical_decoding_work_mem = \"8MB\"",
        "logical_decoding_work_mem = \"16kB\"",
    );
    assert_ne!(small, EXAMPLE);
    let e = Config::from_toml(&small, &env).unwrap_err().to_string();
    assert!(e.contains("migration.logical_decoding_work_mem"), "{e}");
}

#[test]
fn example_config_mentions_every_key() {
    // Keys of every section in src/config.rs; a new key must be documented.
    let keys = [
        "listen",
        "auth",
        "max_client_connections",
        "max_startup_connections",
        "max_startup_connections_per_address",
        "tls_cert",
        "tls_key",
        "max_message_size",
        "startup_timeout",
        "shutdown_timeout",
        "server_connect_timeout",
        "relay_threads",
        "unix_socket_dir",
        "name",
        "password",
        "url",
        "token",
        "databases",
        "mode",
        "option",
        "overwrite",
        "copy_jobs",
        "split_tables_larger_than",
        "logical_decoding_work_mem",
        "tables",
        "exclude_tables",
        "copy_roles",
        "pg_bin",
        "trigger",
        "window",
        "start_when_lag_below",
        "drain_timeout",
        "on_drain_timeout",
        "catchup_timeout",
        "pregate_catchup_timeout",
        "max_attempts",
        "verify",
        "fence_roles",
        "drop_slot_after_cutover",
        "role",
        "member_id",
        "heartbeat_interval",
        "member_timeout",
        "decision_timeout",
    ];
    for k in keys {
        assert!(
            EXAMPLE
                .lines()
                .any(|l| l.trim_start_matches("# ").starts_with(&format!("{k} ="))),
            "example config does not document `{k}`"
        );
    }
    // Commented-out optional keys still parse when enabled.
    let enabled = EXAMPLE
        .replace("# token =", "token =")
        .replace("# window =", "window =")
        .replace("# unix_socket_dir =", "unix_socket_dir =");
    let c = Config::from_toml(&enabled, &env).unwrap();
    assert!(c.file.admin.token.is_some() && c.cutover().window.is_some());
    assert_eq!(
        c.proxy().unix_socket_dir.as_deref(),
        Some(std::path::Path::new("/var/run/pgshift"))
    );
}

/// Runs the pgshift binary with the example's variables set (and `extra_env`).
fn pgshift(args: &[&str], config: &str, extra_env: &[(&str, &str)]) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pgshift.toml");
    std::fs::write(&path, config).unwrap();
    let mut cmd = std::process::Command::new(common::pgshift_bin());
    cmd.args(args).arg("--config").arg(&path);
    for k in [
        "APP_PASSWORD",
        "SOURCE_PASSWORD",
        "TARGET_PASSWORD",
        "PGSHIFT_ADMIN_TOKEN",
    ] {
        cmd.env(k, env(k).unwrap());
    }
    for (k, v) in extra_env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn config_errors_never_echo_secrets() {
    // A syntax error on a line holding a literal password: position and key only.
    let bad = EXAMPLE.replace(
        "url = \"postgres://postgres:${SOURCE_PASSWORD}@127.0.0.1:5432/postgres?sslmode=prefer\"",
        "url = \"postgres://postgres:Literal-Secret-9@127.0.0.1:5432/postgres\" oops",
    );
    assert_ne!(bad, EXAMPLE);
    let (ok, text) = pgshift(&["validate"], &bad, &[]);
    assert!(!ok, "{text}");
    assert!(
        text.contains("source.url") && text.contains("line "),
        "{text}"
    );
    assert!(!text.contains("Literal-Secret-9"), "{text}");

    // A token variable set but empty refuses the start, naming the key.
    let with_token = EXAMPLE.replace("# token =", "token =");
    let (ok, text) = pgshift(&["run"], &with_token, &[("PGSHIFT_ADMIN_TOKEN", "")]);
    assert!(!ok, "{text}");
    assert!(
        text.contains("admin.token") && text.contains("empty"),
        "{text}"
    );
    let (ok, text) = pgshift(
        &["run"],
        &with_token,
        &[("PGSHIFT_ADMIN_TOKEN", "abc123secret")],
    );
    assert!(!ok, "{text}");
    assert!(
        text.contains("admin.token") && !text.contains("abc123secret"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn url_passwords_with_delimiters_from_env_log_in() {
    let pg = common::Cluster::start();
    let password = "p@ss:w/rd?x#y%z 'q";
    pg.psql(
        "postgres",
        "CREATE ROLE odd_pw LOGIN PASSWORD 'p@ss:w/rd?x#y%z ''q'",
    );
    let text = common::config_text(&pg, &pg, common::free_port(), common::free_port(), "")
        .replacen(
            &pg.url("postgres"),
            &format!(
                "postgres://odd_pw:${{ODD_PW}}@127.0.0.1:{}/postgres?sslmode=disable",
                pg.port
            ),
            1,
        );
    let env = |k: &str| (k == "ODD_PW").then(|| password.to_string());
    let c = Config::from_toml(&text, &env).unwrap();
    assert_eq!(c.source.host, "127.0.0.1");
    assert_eq!(c.source.user, "odd_pw");
    assert!(!c.source.display().contains("ss"), "{}", c.source.display());
    let client = pgshift::db::connect(&c.source, "source").await.unwrap();
    let who: String = client
        .query_one("SELECT current_user::text", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(who, "odd_pw");
}
