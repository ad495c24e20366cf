//! Premigration validation: every check reports Succeeded, Warning or Failed,
//! what it found, and the concrete corrective action (the SQL or setting to
//! change). `pgshift validate` prints the report; `run` uses it as its first step.
//!
//! Connections are few: one to each server's configured database, one per
//! migrated database on the source, and one per migrated database that already
//! exists on the target when its contents must be inspected.

mod database;
mod ddl;
mod fence;
mod objects;
mod render;
mod server;
mod types;

use std::path::Path;

use futures_util::StreamExt;
use serde::{Deserialize, Serialize};

use crate::config::{Config, MigrationMode};

use crate::filter::TableFilter;
pub(crate) use render::{render_json, render_table};

/// The outcome of one check.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Status {
    Succeeded,
    Warning,
    Failed,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Succeeded => "Succeeded",
            Status::Warning => "Warning",
            Status::Failed => "Failed",
        }
    }
}

/// One row of the report.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Check {
    /// Stable identifier (`wal_level`, `replica_identity`, …).
    pub name: String,
    /// `source`, `target`, `pgshift` (this machine), `config`, or a database name.
    pub scope: String,
    pub status: Status,
    /// What was found, in words an operator can act on.
    pub found: String,
    /// The corrective action for a Warning or Failed row.
    pub action: Option<String>,
}

impl Check {
    pub fn succeeded(name: &str, scope: &str, found: impl Into<String>) -> Check {
        Check::new(name, scope, Status::Succeeded, found, None)
    }
    pub fn warning(
        name: &str,
        scope: &str,
        found: impl Into<String>,
        action: impl Into<String>,
    ) -> Check {
        Check::new(name, scope, Status::Warning, found, Some(action.into()))
    }
    pub fn failed(
        name: &str,
        scope: &str,
        found: impl Into<String>,
        action: impl Into<String>,
    ) -> Check {
        Check::new(name, scope, Status::Failed, found, Some(action.into()))
    }
    fn new(
        name: &str,
        scope: &str,
        status: Status,
        found: impl Into<String>,
        action: Option<String>,
    ) -> Check {
        Check {
            name: name.to_string(),
            scope: scope.to_string(),
            status,
            found: found.into(),
            action,
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summary {
    pub succeeded: usize,
    pub warning: usize,
    pub failed: usize,
    pub total: usize,
}

/// The whole validation result, serializable as the `--json` document.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ValidationReport {
    pub migration: String,
    pub mode: MigrationMode,
    pub source: String,
    pub target: String,
    pub summary: Summary,
    pub checks: Vec<Check>,
}

impl ValidationReport {
    fn new(config: &Config, checks: Vec<Check>) -> ValidationReport {
        let m = config.migration();
        let mut summary = Summary::default();
        for c in &checks {
            match c.status {
                Status::Succeeded => summary.succeeded += 1,
                Status::Warning => summary.warning += 1,
                Status::Failed => summary.failed += 1,
            }
        }
        summary.total = checks.len();
        ValidationReport {
            migration: m.map(|m| m.name.clone()).unwrap_or_default(),
            mode: m.map(|m| m.mode).unwrap_or_default(),
            source: config.source.display(),
            target: config.target.display(),
            summary,
            checks,
        }
    }

    pub fn has_failures(&self) -> bool {
        self.summary.failed > 0
    }

    /// The check `name` for `scope`, if it was reported.
    pub fn get(&self, name: &str, scope: &str) -> Option<&Check> {
        self.checks
            .iter()
            .find(|c| c.name == name && c.scope == scope)
    }

    pub fn failures(&self) -> impl Iterator<Item = &Check> {
        self.checks.iter().filter(|c| c.status == Status::Failed)
    }
}

/// Runs every check against the configured source and target.
/// Never fails: an unreachable server or a failing query becomes a Failed row.
pub async fn validate(config: &Config) -> ValidationReport {
    validate_resuming(config, &[]).await
}

/// [`validate`] for a migration that resumes after a restart: `own_copies`
/// are target databases that already hold this migration's copy.
pub(crate) async fn validate_resuming(config: &Config, own_copies: &[String]) -> ValidationReport {
    let Some(m) = config.migration() else {
        let c = Check::failed(
            "migration",
            "config",
            "the configuration has no [migration] section",
            "add a [migration] section with at least `name` and `databases`",
        );
        return ValidationReport::new(config, vec![c]);
    };
    tracing::info!(
        migration = %m.name,
        source = %config.source.display(),
        target = %config.target.display(),
        databases = m.databases.len(),
        "premigration validation started"
    );
    let (source, target) = tokio::join!(
        server::Server::connect(&config.source, "source"),
        server::Server::connect(&config.target, "target"),
    );
    let mut checks = vec![
        server::connection_check("source", &config.source, &source),
        server::connection_check("target", &config.target, &target),
    ];
    let source = source.ok();
    let target = target.ok();

    checks.extend(server::source_checks(source.as_ref(), m).await);
    checks.extend(server::target_checks(target.as_ref(), source.as_ref(), m, &config.target).await);
    checks.extend(server::rollback_checks(target.as_ref(), m, config.cutover().rollback).await);
    checks.push(server::pg_dump_check(source.as_ref(), target.as_ref(), m.pg_bin.as_deref()).await);
    checks.extend(fence::checks(source.as_ref(), config).await);
    checks.extend(ddl::checks(source.as_ref(), m).await);

    let mut env = database::Environment::load(m, source.as_ref(), target.as_ref()).await;
    env.own_copies = own_copies.iter().cloned().collect();
    checks.extend(env.checks.iter().cloned());
    // A few databases at a time: each one holds a source connection while checked.
    // Owned names: a closure over borrowed ones makes this future not Send
    // for a spawned task (a known rustc limitation with higher-ranked lifetimes).
    let env = &env;
    let per_db: Vec<Vec<Check>> = futures_util::stream::iter(m.databases.clone())
        .map(|db| async move { env.check_database(&db).await })
        .buffered(4)
        .collect()
        .await;
    checks.extend(per_db.into_iter().flatten());

    let report = ValidationReport::new(config, checks);
    for c in &report.checks {
        tracing::debug!(check = %c.name, scope = %c.scope, status = c.status.as_str(), found = %c.found, "validation check");
    }
    tracing::info!(
        succeeded = report.summary.succeeded,
        warnings = report.summary.warning,
        failed = report.summary.failed,
        "premigration validation finished"
    );
    report
}

/// The long help of `pgshift validate`.
pub const CLI_HELP: &str = "\
Runs the premigration checks of the config file's [migration] against the source and target
servers and prints a checklist. Each check is Succeeded, Warning or Failed, says what it found
and, when it is not Succeeded, the corrective action: the SQL or setting to change.
Nothing is changed on either server.

Checks:
  - both servers reachable with the configured credentials; a supported version pair
    (source 11-18, target 15-18, target major >= source major)
  - source: wal_level = logical, free replication slots and WAL senders (one per database),
    REPLICATION, the right to create publications
  - target: CREATEDB, replication origins, SET session_replication_role, the pgshift schema
  - every database exists on the source; on the target it is absent, empty, or overwrite = true
  - encoding and locale of each database available on the target
  - extensions available on the target, with their shared_preload_libraries loaded there
  - tables without a primary key or usable replica identity (a failure in online mode)
  - unlogged tables, large objects, materialized views: what is and is not carried
  - a pg_dump (with psql) at least the source's major version, preferably the target's
  - the cutover's fence: the roles it sets NOLOGIN on the source, those it cannot, roles that
    also use other databases, and logins it never covers (superusers, pgshift's own user)
  - DDL capture ([migration] ddl): whether the source user may create event triggers

Exit status:
  0  no check failed (warnings allowed)
  1  at least one check failed
  2  invalid command line or configuration file";

/// `pgshift validate`: loads the config, validates, prints, and returns the
/// exit code (0 nothing failed, 1 a check failed, 2 the config is unusable).
pub async fn cli(path: &Path, json: bool) -> u8 {
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("pgshift: {e}");
            return 2;
        }
    };
    if config.migration().is_none() {
        eprintln!(
            "pgshift: config key `migration`: {} has no [migration] section; validate needs `name` and `databases`",
            path.display()
        );
        return 2;
    }
    let report = validate(&config).await;
    if json {
        println!("{}", render_json(&report));
    } else {
        use std::io::IsTerminal;
        let color = std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none();
        print!("{}", render_table(&report, color));
    }
    if report.has_failures() { 1 } else { 0 }
}
