//! Server-wide checks: reachability, versions, replication settings, the
//! privileges of the configured users, preload libraries and pg_dump.

use tokio_postgres::Client;

use super::Check;
use crate::config::{Endpoint, MigrationConfig, MigrationMode};
use crate::db::{self, DbError, quote_ident, quote_literal};

/// Catalog queries are short; a hung one must not hang the validation.
const STATEMENT_TIMEOUT: &str = "30s";

/// Extensions whose library must be in `shared_preload_libraries` (name → library).
pub(crate) const PRELOAD_EXTENSIONS: &[(&str, &str)] = &[
    ("pg_stat_statements", "pg_stat_statements"),
    ("timescaledb", "timescaledb"),
    ("pg_cron", "pg_cron"),
    ("citus", "citus"),
    ("pglogical", "pglogical"),
    ("pgaudit", "pgaudit"),
    ("pg_stat_monitor", "pg_stat_monitor"),
    ("pg_wait_sampling", "pg_wait_sampling"),
    ("pg_qualstats", "pg_qualstats"),
    ("pg_stat_kcache", "pg_stat_kcache"),
    ("pg_squeeze", "pg_squeeze"),
    ("pgsentinel", "pgsentinel"),
    ("pg_show_plans", "pg_show_plans"),
    ("pg_tle", "pg_tle"),
    ("pg_partman_bgw", "pg_partman_bgw"),
    ("powa", "powa"),
];

/// An open connection to the source or target plus the facts every check needs.
pub struct Server {
    pub side: &'static str,
    pub client: Client,
    pub endpoint: Endpoint,
    pub version_num: i32,
    pub version: String,
    pub user: String,
    pub superuser: bool,
    pub replication: bool,
    pub createdb: bool,
    /// `shared_preload_libraries`, split and without paths; None when the
    /// user may not read it (it is visible to superusers and pg_read_all_settings).
    pub preload: Option<Vec<String>>,
    /// System identifier and postmaster start time: equal only for the same
    /// running server (a restored clone shares the identifier, not the start).
    pub instance: Option<String>,
}

impl Server {
    pub async fn connect(ep: &Endpoint, side: &'static str) -> Result<Server, DbError> {
        let client = open(ep, side).await?;
        let map = |e: tokio_postgres::Error| DbError::Connect {
            what: side.to_string(),
            addr: ep.display(),
            source: e,
        };
        let row = client
            .query_one(
                "SELECT current_setting('server_version_num')::int, current_setting('server_version'), \
                        current_user::text, r.rolsuper, r.rolreplication, r.rolcreatedb, \
                        (SELECT setting FROM pg_settings WHERE name = 'shared_preload_libraries') \
                 FROM pg_roles r WHERE r.rolname = current_user",
                &[],
            )
            .await
            .map_err(map)?;
        // pg_control_system() may have been revoked: then the identity is unknown.
        let instance = client
            .query_one(
                "SELECT (SELECT system_identifier::text FROM pg_control_system()) || '@' || pg_postmaster_start_time()::text",
                &[],
            )
            .await
            .ok()
            .and_then(|r| r.get::<_, Option<String>>(0));
        Ok(Server {
            instance,
            side,
            endpoint: ep.clone(),
            version_num: row.get(0),
            version: row.get(1),
            user: row.get(2),
            superuser: row.get(3),
            replication: row.get(4),
            createdb: row.get(5),
            preload: row
                .get::<_, Option<String>>(6)
                .as_deref()
                .map(parse_preload),
            client,
        })
    }

    /// The role description used in several messages.
    fn role_words(&self) -> String {
        if self.superuser {
            format!("user {} (superuser)", self.user)
        } else {
            format!("user {}", self.user)
        }
    }
}

/// A SQL connection for the checks, with a statement timeout.
pub async fn open(ep: &Endpoint, what: &str) -> Result<Client, DbError> {
    let client = db::connect(ep, what).await?;
    client
        .batch_execute(&format!(
            "SET statement_timeout = {}",
            quote_literal(STATEMENT_TIMEOUT)
        ))
        .await
        .map_err(|e| DbError::Connect {
            what: what.to_string(),
            addr: ep.display(),
            source: e,
        })?;
    Ok(client)
}

/// Library names from a `shared_preload_libraries` value (`'$libdir/x', y` → [x, y]).
fn parse_preload(value: &str) -> Vec<String> {
    value
        .split(',')
        .map(|s| s.trim().trim_matches('"').trim_matches('\''))
        .map(|s| s.rsplit('/').next().unwrap_or(s).trim_end_matches(".so"))
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

/// The statement that adds `missing` to a server's preload list.
pub(crate) fn preload_action(server_preload: &[String], missing: &[String], side: &str) -> String {
    let mut all: Vec<String> = server_preload.to_vec();
    for m in missing {
        if !all.contains(m) {
            all.push(m.clone());
        }
    }
    format!(
        "on the {side}: ALTER SYSTEM SET shared_preload_libraries = {}; then restart the {side} server",
        quote_literal(&all.join(","))
    )
}

/// Connection row for one side: version and user on success, the reason and fix otherwise.
pub(crate) fn connection_check(
    side: &str,
    ep: &Endpoint,
    result: &Result<Server, DbError>,
) -> Check {
    match result {
        Ok(s) => Check::succeeded(
            "connection",
            side,
            format!(
                "connected to {} as {}: PostgreSQL {}",
                ep.display(),
                s.role_words(),
                s.version
            ),
        ),
        Err(e) => Check::failed(
            "connection",
            side,
            format!(
                "{}; the checks that need the {side} server were skipped",
                connect_error_text(e)
            ),
            connection_action(side, ep, e),
        ),
    }
}

pub(crate) fn connect_error_text(e: &DbError) -> String {
    match e {
        DbError::Connect { what, addr, source } => {
            format!(
                "cannot connect to {what} ({addr}): {}",
                pg_error_text(source)
            )
        }
        other => other.to_string(),
    }
}

/// The server's own message for a database error (tokio-postgres shows only "db error").
fn pg_error_text(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(d) => format!("{}: {}", d.severity(), d.message()),
        None => e.to_string(),
    }
}

fn connection_action(side: &str, ep: &Endpoint, e: &DbError) -> String {
    let key = format!("[{side}].url");
    let code = match e {
        DbError::Connect { source, .. } => source.code().map(|c| c.code().to_string()),
        DbError::TlsConfig { message, .. } => {
            return format!("fix the TLS settings (sslmode, sslrootcert) in {key}: {message}");
        }
    };
    match code.as_deref() {
        Some("28P01") => format!("fix the password for user {} in {key}", ep.user),
        Some("28000") => format!(
            "allow this machine in the {side} server's pg_hba.conf, e.g. `host all {} <this host's address>/32 scram-sha-256`, then SELECT pg_reload_conf();",
            ep.user
        ),
        Some("3D000") => format!(
            "database {} named in {key} does not exist; point {key} at an existing database (e.g. postgres)",
            ep.dbname
        ),
        Some("53300") => format!(
            "the {side} server has no free connection slots; raise max_connections or close idle sessions"
        ),
        _ => format!(
            "check host, port, user and password in {key} and that the {side} server listens on {}:{} (listen_addresses, firewall)",
            ep.host, ep.port
        ),
    }
}

/// wal_level, slots, senders and replication privilege on the source.
pub(crate) async fn source_checks(source: Option<&Server>, m: &MigrationConfig) -> Vec<Check> {
    let Some(s) = source else {
        return vec![];
    };
    let online = m.mode == MigrationMode::Online;
    let mut out = vec![wal_level_check(s, SOURCE, online).await];
    out.extend(slot_and_sender_checks(s, SOURCE, m.databases.len(), online).await);
    out.push(replication_privilege_check(s, online));
    out
}

/// What a replication check is about: the source (forward streaming) or
/// the target (reverse replication during the rollback window).
struct Side {
    side: &'static str,
    prefix: &'static str,
    needs: &'static str,
    not_needed: &'static str,
    alternative: &'static str,
}

const SOURCE: Side = Side {
    side: "source",
    prefix: "",
    needs: "online migration needs logical decoding (wal_level = logical)",
    not_needed: "offline mode does not need",
    alternative: "",
};

const TARGET: Side = Side {
    side: "target",
    prefix: "reverse_",
    needs: "a rollback window ([cutover] rollback = true) needs logical decoding on the target (wal_level = logical)",
    not_needed: "no rollback window ([cutover] rollback = false) does not need",
    alternative: "; or set [cutover] rollback = false (no way back after the cutover)",
};

/// Reverse replication's needs on the target (a rollback window).
pub(crate) async fn rollback_checks(
    target: Option<&Server>,
    m: &MigrationConfig,
    rollback: bool,
) -> Vec<Check> {
    let Some(t) = target else {
        return vec![];
    };
    if m.mode != MigrationMode::Online || !rollback {
        return vec![];
    }
    let mut out = vec![wal_level_check(t, TARGET, rollback).await];
    out.extend(slot_and_sender_checks(t, TARGET, m.databases.len(), rollback).await);
    out
}

async fn wal_level_check(s: &Server, side: Side, required: bool) -> Check {
    let name = format!("{}wal_level", side.prefix);
    let name = name.as_str();
    let level: String = match s
        .client
        .query_one("SELECT current_setting('wal_level')", &[])
        .await
    {
        Ok(r) => r.get(0),
        Err(e) => return query_failed(name, side.side, e),
    };
    if level == "logical" {
        Check::succeeded(name, side.side, "wal_level = logical")
    } else if required {
        Check::failed(
            name,
            side.side,
            format!("wal_level = {level}; {}", side.needs),
            format!(
                "on the {0}: ALTER SYSTEM SET wal_level = logical; then restart the {0} server{1}",
                side.side, side.alternative
            ),
        )
    } else {
        Check::succeeded(
            name,
            side.side,
            format!("wal_level = {level} ({} logical)", side.not_needed),
        )
    }
}

async fn slot_and_sender_checks(s: &Server, side: Side, needed: usize, online: bool) -> Vec<Check> {
    let row = match s
        .client
        .query_one(
            "SELECT current_setting('max_replication_slots')::int, \
                    (SELECT count(*) FROM pg_replication_slots)::int, \
                    current_setting('max_wal_senders')::int, \
                    (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'walsender')::int",
            &[],
        )
        .await
    {
        Ok(r) => r,
        Err(e) => {
            return vec![query_failed(
                &format!("{}replication_slots", side.prefix),
                side.side,
                e,
            )];
        }
    };
    let needed = needed as i32;
    let (max_slots, used_slots, max_senders, used_senders): (i32, i32, i32, i32) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    vec![
        capacity_check(
            &side,
            &format!("{}replication_slots", side.prefix),
            "max_replication_slots",
            "slots",
            (max_slots, used_slots, needed),
            online,
        ),
        capacity_check(
            &side,
            &format!("{}wal_senders", side.prefix),
            "max_wal_senders",
            "WAL senders",
            (max_senders, used_senders, needed),
            online,
        ),
    ]
}

/// `(max, used, needed)` of a capacity.
fn capacity_check(
    side: &Side,
    name: &str,
    setting: &str,
    what: &str,
    (max, used, needed): (i32, i32, i32),
    online: bool,
) -> Check {
    let free = (max - used).max(0);
    let found = format!(
        "{setting} = {max}, {used} in use, {free} free; the migration needs {needed} (one per database)"
    );
    if free >= needed {
        Check::succeeded(name, side.side, found)
    } else if online {
        Check::failed(
            name,
            side.side,
            found,
            format!(
                "on the {0}: ALTER SYSTEM SET {setting} = {1}; then restart the {0} server (or free unused {what}){2}",
                side.side,
                used + needed,
                side.alternative
            ),
        )
    } else {
        Check::succeeded(
            name,
            side.side,
            format!("{found} ({} them)", side.not_needed),
        )
    }
}

fn replication_privilege_check(s: &Server, online: bool) -> Check {
    const NAME: &str = "replication_privilege";
    if s.superuser || s.replication {
        let how = if s.superuser {
            "is a superuser"
        } else {
            "has REPLICATION"
        };
        Check::succeeded(NAME, "source", format!("user {} {how}", s.user))
    } else if online {
        Check::failed(
            NAME,
            "source",
            format!(
                "user {} has neither REPLICATION nor superuser; it cannot create a replication slot",
                s.user
            ),
            format!(
                "on the source: ALTER ROLE {} REPLICATION;",
                quote_ident(&s.user)
            ),
        )
    } else {
        Check::succeeded(
            NAME,
            "source",
            format!(
                "user {} has no REPLICATION (offline mode does not need it)",
                s.user
            ),
        )
    }
}

/// Version order and the target user's privileges.
pub(crate) async fn target_checks(
    target: Option<&Server>,
    source: Option<&Server>,
    m: &MigrationConfig,
    ep: &Endpoint,
) -> Vec<Check> {
    let Some(t) = target else {
        return vec![];
    };
    let mut out = Vec::new();
    if let Some(s) = source {
        out.extend(distinct_servers_check(s, t));
        out.push(version_check(s, t));
        out.push(preload_libraries_check(s, t));
    }
    out.push(createdb_check(t));
    out.push(connection_room_check(t, source, m).await);
    out.extend(target_privilege_checks(t, m, ep).await);
    out
}

/// At the switch every client session of the migrated databases gets a
/// backend on the target, and pgshift holds its own there (apply and the
/// cutover's, per database, and the control store). A target with fewer
/// free slots would drop sessions at the cutover (which then refuses to
/// start): said now, with the setting that makes room. A warning: how many
/// sessions there are at cutover time is not known yet.
async fn connection_room_check(t: &Server, source: Option<&Server>, m: &MigrationConfig) -> Check {
    const NAME: &str = "connection_room";
    let slots =
        match crate::pg::activity::Slots::of(&t.client, crate::pg::Version(t.version_num)).await {
            Ok(s) => s,
            Err(e) => {
                return Check::warning(
                    NAME,
                    "target",
                    format!("cannot read the connection slots: {}", pg_error_text(&e)),
                    "make sure the target user may read pg_stat_activity",
                );
            }
        };
    // Without the validation's own connection.
    let slots = crate::pg::activity::Slots {
        used: (slots.used - 1).max(0),
        ..slots
    };
    let sessions: i64 = match source {
        Some(s) => s
            .client
            .query_one(crate::pg::activity::CLIENT_BACKENDS_SQL, &[&m.databases])
            .await
            .map(|r| r.get(0))
            .unwrap_or(0),
        None => 0,
    };
    let sessions = i32::try_from(sessions).unwrap_or(i32::MAX);
    let own = i32::try_from(2 * m.databases.len() + 1).unwrap_or(i32::MAX);
    let found = format!(
        "the target accepts {}; the source has {sessions} client session(s) on the migrated databases now, each moving to the target at the cutover, and pgshift needs {own}",
        slots.describe()
    );
    if sessions.saturating_add(own) > slots.free() {
        Check::warning(
            NAME,
            "target",
            found,
            format!(
                "make room on the target before the cutover: ALTER SYSTEM SET max_connections = {}; then restart the target server",
                slots.max_connections_for(sessions.saturating_add(own))
            ),
        )
    } else {
        Check::succeeded(NAME, "target", found)
    }
}

/// Migrating a server onto itself would drop the source databases (overwrite)
/// or refuse them; either way it is a configuration mistake.
fn distinct_servers_check(s: &Server, t: &Server) -> Option<Check> {
    const NAME: &str = "distinct_servers";
    let (si, ti) = (s.instance.as_ref()?, t.instance.as_ref()?);
    Some(if si == ti {
        Check::failed(
            NAME,
            "target",
            format!(
                "[source].url and [target].url reach the same running server ({} and {})",
                s.endpoint.display(),
                t.endpoint.display()
            ),
            "point [target].url at the new server",
        )
    } else {
        Check::succeeded(NAME, "target", "source and target are different servers")
    })
}

/// The pair of versions is supported (see [`crate::pg::support`]); a
/// same-major target on an older minor release only warns.
fn version_check(s: &Server, t: &Server) -> Check {
    const NAME: &str = "server_version";
    let found = format!(
        "source PostgreSQL {}, target PostgreSQL {}",
        s.version, t.version
    );
    let (sv, tv) = (
        crate::pg::Version(s.version_num),
        crate::pg::Version(t.version_num),
    );
    let issues = crate::pg::support::check_pair(sv, tv);
    if let Some(refused) = issues.iter().find(|i| i.refuses()) {
        return Check::failed(
            NAME,
            "target",
            format!("{found}: {}", refused.describe(sv, tv)),
            refused.action(sv),
        );
    }
    if let Some(untested) = issues.first() {
        return Check::warning(
            NAME,
            "target",
            format!("{found}: {}", untested.describe(sv, tv)),
            untested.action(sv),
        );
    }
    if t.version_num < s.version_num {
        Check::warning(
            NAME,
            "target",
            format!("{found}: same major version, older minor release"),
            format!(
                "update the target to PostgreSQL {} or newer (minor release)",
                s.version
            ),
        )
    } else {
        Check::succeeded(NAME, "target", found)
    }
}

/// Libraries the source preloads but the target does not (auto_explain, …).
fn preload_libraries_check(s: &Server, t: &Server) -> Check {
    const NAME: &str = "shared_preload_libraries";
    let (Some(sp), Some(tp)) = (&s.preload, &t.preload) else {
        let blind = if s.preload.is_none() { s } else { t };
        return unreadable_preload(NAME, "target", blind);
    };
    let missing: Vec<String> = sp.iter().filter(|l| !tp.contains(l)).cloned().collect();
    let list = |v: &[String]| {
        if v.is_empty() {
            "(none)".to_string()
        } else {
            v.join(", ")
        }
    };
    if missing.is_empty() {
        Check::succeeded(
            NAME,
            "target",
            format!(
                "source preloads {}; the target preloads {}",
                list(sp),
                list(tp)
            ),
        )
    } else {
        Check::warning(
            NAME,
            "target",
            format!(
                "the source preloads {} that the target does not load",
                missing.join(", ")
            ),
            preload_action(tp, &missing, "target"),
        )
    }
}

/// A Warning for a server whose `shared_preload_libraries` the user cannot read.
pub(crate) fn unreadable_preload(name: &str, scope: &str, s: &Server) -> Check {
    Check::warning(
        name,
        scope,
        format!(
            "user {} may not read shared_preload_libraries on the {}; preloaded libraries were not compared",
            s.user, s.side
        ),
        format!(
            "on the {}: GRANT pg_read_all_settings TO {};",
            s.side,
            quote_ident(&s.user)
        ),
    )
}

fn createdb_check(t: &Server) -> Check {
    const NAME: &str = "create_database_privilege";
    if t.superuser || t.createdb {
        let how = if t.superuser {
            "is a superuser"
        } else {
            "has CREATEDB"
        };
        Check::succeeded(NAME, "target", format!("user {} {how}", t.user))
    } else {
        Check::failed(
            NAME,
            "target",
            format!("user {} cannot create databases", t.user),
            format!(
                "on the target: ALTER ROLE {} CREATEDB;",
                quote_ident(&t.user)
            ),
        )
    }
}

/// Replication origins, session_replication_role and the control schema.
async fn target_privilege_checks(t: &Server, m: &MigrationConfig, ep: &Endpoint) -> Vec<Check> {
    let version = crate::pg::Version(t.version_num);
    let srr = crate::pg::catalog::may_set_parameter(version, "session_replication_role");
    let sql = format!(
        "SELECT {}, {srr}, has_database_privilege(current_database(), 'CREATE'), \
                EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = 'pgshift' AND pg_has_role(nspowner, 'USAGE'))",
        ORIGIN_FUNCTIONS
            .iter()
            .map(|f| format!("has_function_privilege({}, 'EXECUTE')", quote_literal(f)))
            .collect::<Vec<_>>()
            .join(" AND ")
    );
    let row = match t.client.query_one(&sql, &[]).await {
        Ok(r) => r,
        Err(e) => return vec![query_failed("replication_origin_privilege", "target", e)],
    };
    let (origins, srr, create, owns_schema): (bool, bool, bool, bool) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    let user = quote_ident(&t.user);
    let online = m.mode == MigrationMode::Online;

    let origin = if t.superuser || origins {
        let how = if t.superuser {
            "is a superuser"
        } else {
            "may execute pg_replication_origin_*"
        };
        Check::succeeded(
            "replication_origin_privilege",
            "target",
            format!("user {} {how}", t.user),
        )
    } else if online {
        Check::failed(
            "replication_origin_privilege",
            "target",
            format!(
                "user {} may not manage replication origins (apply progress is kept in one)",
                t.user
            ),
            format!(
                "on the target: GRANT EXECUTE ON FUNCTION {} TO {user};",
                ORIGIN_FUNCTIONS.join(", ")
            ),
        )
    } else {
        Check::succeeded(
            "replication_origin_privilege",
            "target",
            format!(
                "user {} may not manage replication origins (offline mode does not need them)",
                t.user
            ),
        )
    };

    let role = if t.superuser || srr {
        Check::succeeded(
            "session_replication_role",
            "target",
            format!(
                "user {} may SET session_replication_role (triggers and FK checks off while copying)",
                t.user
            ),
        )
    } else {
        let action = format!(
            "on the target: {}",
            crate::pg::catalog::grant_set_parameter(version, "session_replication_role", &user)
        );
        Check::failed(
            "session_replication_role",
            "target",
            format!(
                "user {} may not SET session_replication_role, needed to copy and apply without firing triggers",
                t.user
            ),
            action,
        )
    };

    let control = if m.databases.contains(&ep.dbname) {
        Check::failed(
            "control_schema",
            "target",
            format!(
                "[target].url names database {}, which is being migrated; pgshift keeps its state there and it may be dropped",
                ep.dbname
            ),
            "point [target].url at a database that is not migrated (e.g. /postgres)",
        )
    } else if t.superuser || create || owns_schema {
        Check::succeeded(
            "control_schema",
            "target",
            format!(
                "pgshift can keep its state in schema pgshift of database {}",
                ep.dbname
            ),
        )
    } else {
        Check::failed(
            "control_schema",
            "target",
            format!(
                "user {} may not create schema pgshift (its state) in database {}",
                t.user, ep.dbname
            ),
            format!(
                "on the target: GRANT CREATE ON DATABASE {} TO {user};",
                quote_ident(&ep.dbname)
            ),
        )
    };
    vec![origin, role, control]
}

/// The functions apply needs for progress tracking in a replication origin.
const ORIGIN_FUNCTIONS: &[&str] = &[
    "pg_replication_origin_create(text)",
    "pg_replication_origin_drop(text)",
    "pg_replication_origin_session_setup(text)",
    "pg_replication_origin_session_reset()",
    "pg_replication_origin_xact_setup(pg_lsn, timestamp with time zone)",
    "pg_replication_origin_progress(text, boolean)",
    "pg_replication_origin_advance(text, pg_lsn)",
];

/// A pg_dump (with its psql) must fit: at least the source's major version,
/// preferably the target's (see [`crate::schema::client_tools`]).
pub(crate) async fn pg_dump_check(
    source: Option<&Server>,
    target: Option<&Server>,
    pg_bin: Option<&std::path::Path>,
) -> Check {
    const NAME: &str = "pg_dump";
    let (Some(s), Some(t)) = (source, target) else {
        return Check::warning(
            NAME,
            "pgshift",
            "the source or target version is unknown, so the pg_dump to use is too",
            "make both servers reachable, then validate again",
        );
    };
    let (sv, tv) = (
        crate::pg::Version(s.version_num),
        crate::pg::Version(t.version_num),
    );
    let pg_bin = pg_bin.map(std::path::Path::to_path_buf);
    // Each candidate runs `pg_dump --version`: off the async threads.
    let chosen =
        tokio::task::spawn_blocking(move || crate::schema::client_tools(sv, tv, pg_bin.as_deref()))
            .await;
    let (tools, fit) = match chosen {
        Ok(Ok(c)) => c,
        Ok(Err(crate::schema::SchemaError::NoClientTools {
            source_major,
            target,
            found,
            hint,
        })) => {
            return Check::failed(
                NAME,
                "pgshift",
                format!(
                    "no pg_dump fits: the source runs PostgreSQL {source_major}, so pg_dump must be {source_major} or newer ({target}, the target's, preferred); found: {found}"
                ),
                hint,
            );
        }
        Ok(Err(e)) => {
            return Check::failed(
                NAME,
                "pgshift",
                e.to_string(),
                crate::pgbin::client_tools_hint(tv.major()),
            );
        }
        Err(e) => {
            return Check::failed(
                NAME,
                "pgshift",
                format!("looking for pg_dump failed: {e}"),
                crate::pgbin::client_tools_hint(tv.major()),
            );
        }
    };
    let found = format!(
        "uses {} for a PostgreSQL {} source and {} target",
        tools.describe(),
        sv.major(),
        tv.major()
    );
    match fit {
        crate::pgbin::ToolsFit::Exact => Check::succeeded(NAME, "pgshift", found),
        crate::pgbin::ToolsFit::Older => Check::succeeded(
            NAME,
            "pgshift",
            format!("{found} (older than the target: its output restores on the newer server)"),
        ),
        crate::pgbin::ToolsFit::Newer => Check::warning(
            NAME,
            "pgshift",
            format!(
                "{found}: newer than the target; the parameters it sets that the target lacks are left out, other new syntax could still fail"
            ),
            crate::pgbin::client_tools_hint(tv.major()),
        ),
    }
}

/// A check whose query failed: reported, not fatal.
pub(crate) fn query_failed(name: &str, scope: &str, e: tokio_postgres::Error) -> Check {
    let msg = pg_error_text(&e);
    Check::failed(
        name,
        scope,
        format!("the check's query failed: {msg}"),
        "grant the configured user read access to the system catalogs, or connect as a more privileged user",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preload_parsing() {
        assert_eq!(
            parse_preload("pg_stat_statements, '$libdir/auto_explain', \"citus\""),
            vec!["pg_stat_statements", "auto_explain", "citus"]
        );
        assert!(parse_preload("").is_empty());
        assert_eq!(
            preload_action(&["a".into()], &["b".into()], "target"),
            "on the target: ALTER SYSTEM SET shared_preload_libraries = 'a,b'; then restart the target server"
        );
    }
}
