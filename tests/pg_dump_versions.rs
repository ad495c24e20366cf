//! pg_dump across versions: which pg_dump pgshift picks for a pair, a dump
//! from a newer pg_dump restored into an older target (the settings the
//! target lacks are left out), and validation naming what to install when
//! nothing fits.

mod common;
use common::*;

use pgshift::config::Endpoint;
use pgshift::pg::Version;
use pgshift::schema::{self, Section};
use pgshift::validate::Status;

fn endpoint(c: &Cluster, db: &str) -> Endpoint {
    Endpoint::parse("source.url", &c.url(db)).expect("endpoint")
}

fn all_there(test: &str, servers: &[i32], clients: &[i32]) -> bool {
    let mut ok = servers.iter().all(|&v| version_or_skip(v, test));
    for &v in clients {
        if client_bin_for(v).is_none() {
            let msg = format!(
                "PostgreSQL {v} client programs not found; fetch them with `scripts/fetch-pg.sh --clients {v}`"
            );
            assert!(!version_required(v), "{test}: {msg}");
            eprintln!("{test}: SKIPPED: {msg}");
            ok = false;
        }
    }
    ok
}

/// 13 → 16 with pg_dump 18, which writes `SET transaction_timeout = 0;`
/// (a parameter of 17+): the schema restores, without that line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn newer_pg_dump_restores_into_older_target() {
    if !all_there("newer_pg_dump_restores_into_older_target", &[13, 16], &[18]) {
        return;
    }
    let (src, tgt) = (Cluster::start_version(13), Cluster::start_version(16));
    src.create_db("shop");
    src.psql(
        "shop",
        "CREATE TABLE item (id serial PRIMARY KEY, name text NOT NULL UNIQUE);
         CREATE VIEW names AS SELECT name FROM item;",
    );
    let (s, t) = (endpoint(&src, "postgres"), endpoint(&tgt, "postgres"));
    let bin18 = client_bin_for(18).unwrap();
    schema::prepare_target_database(&t, &s, "shop", false)
        .await
        .unwrap();
    let plan = schema::plan_dump_with(&s, &t, "shop", Some(&bin18), &Default::default())
        .await
        .unwrap();
    assert_eq!(plan.tools.major(), 18);
    assert!(plan.target_settings.is_some(), "a newer pg_dump filters");
    let raw = std::process::Command::new(bin18.join("pg_dump"))
        .args(["--schema-only", "-h"])
        .arg(&src.socket_dir)
        .args(["-p", &src.port.to_string(), "-U", "postgres", "shop"])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&raw.stdout).contains("SET transaction_timeout"),
        "pg_dump 18 sets transaction_timeout (the reason for this test)"
    );
    for section in [Section::PreData, Section::PostData] {
        let dump = schema::dump_section(&s, "shop", None, &plan, section)
            .await
            .unwrap();
        assert!(!String::from_utf8_lossy(&dump.sql).contains("transaction_timeout"));
        schema::restore_section(&t, &dump)
            .await
            .unwrap_or_else(|e| panic!("restore {section:?}: {e}"));
    }
    assert_eq!(
        tgt.psql(
            "shop",
            "SELECT count(*) FROM pg_indexes WHERE tablename = 'item'"
        ),
        "2"
    );
}

/// Without configuration the target's own pg_dump is chosen when present;
/// else a newer one that fits the source.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_dump_choice_follows_the_pair() {
    let candidates = pgshift::pgbin::client_tool_dirs(None);
    let majors: Vec<i32> = candidates.iter().map(|c| c.major()).collect();
    for (s, t) in [(11, 15), (13, 16), (12, 17), (17, 17), (14, 18)] {
        let chosen =
            schema::client_tools(Version::major_release(s), Version::major_release(t), None);
        match chosen {
            Ok((tools, fit)) => {
                assert!(tools.major() >= s, "{s}->{t}: {tools:?}");
                let exact = majors.contains(&t);
                assert_eq!(
                    fit == pgshift::pgbin::ToolsFit::Exact,
                    exact,
                    "{s}->{t}: {tools:?} among {majors:?}"
                );
            }
            Err(e) => assert!(
                !majors.iter().any(|&m| m >= s),
                "{s}->{t}: {e} although {majors:?} were found"
            ),
        }
    }
}

/// A configured pg_dump older than the source fails validation, naming what
/// was found and what to install.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validation_refuses_a_pg_dump_older_than_the_source() {
    if !all_there(
        "validation_refuses_a_pg_dump_older_than_the_source",
        &[17, 18],
        &[16],
    ) {
        return;
    }
    let (src, tgt) = (Cluster::start_version(17), Cluster::start_version(18));
    src.create_db("app");
    let bin16 = client_bin_for(16).unwrap();
    let text = format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\n[source]\nurl = \"{}\"\n[target]\nurl = \"{}\"\n\
         [migration]\nname = \"dumpcheck\"\ndatabases = [\"app\"]\npg_bin = \"{}\"\n",
        src.url("postgres"),
        tgt.url("postgres"),
        bin16.display()
    );
    let config = pgshift::Config::from_toml(&text, &|_| None).unwrap();
    let report = pgshift::validate::validate(&config).await;
    let check = report.get("pg_dump", "pgshift").expect("pg_dump check");
    assert_eq!(check.status, Status::Failed, "{check:?}");
    assert!(check.found.contains("pg_dump 16"), "{check:?}");
    assert!(check.found.contains("17 or newer"), "{check:?}");
    let action = check.action.as_deref().unwrap();
    assert!(action.contains("postgresql-client-18"), "{action}");
    // The pair itself is fine.
    assert_eq!(
        report.get("server_version", "target").unwrap().status,
        Status::Succeeded
    );
}
