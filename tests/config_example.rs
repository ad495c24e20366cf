//! The documented example configuration parses, and documents every key.

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
    assert_eq!(c.cutover().max_attempts, 3);
}

#[test]
fn example_config_mentions_every_key() {
    // Keys of every section in src/config.rs; a new key must be documented.
    let keys = [
        "listen",
        "auth",
        "max_client_connections",
        "tls_cert",
        "tls_key",
        "max_message_size",
        "startup_timeout",
        "shutdown_timeout",
        "server_connect_timeout",
        "relay_threads",
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
        "max_attempts",
        "verify",
        "fence_roles",
        "drop_slot_after_cutover",
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
        .replace("# window =", "window =");
    let c = Config::from_toml(&enabled, &env).unwrap();
    assert!(c.file.admin.token.is_some() && c.cutover().window.is_some());
}
