//! Fencing the source: once the cutover has drained the proxy, no role but
//! pgshift's own and the superusers can commit a write on a migrated
//! database, whatever its sessions set.
//!
//! Why LOGIN, and not a setting or a privilege: `default_transaction_read_only`
//! is only a default (a session turns it off with `SET`, `BEGIN READ WRITE`,
//! or — as the database's owner — `ALTER DATABASE … SET`), and a revoked
//! privilege (`CONNECT`, `INSERT`) is given back by the object's owner, which
//! is usually the application role itself. A role that cannot log in has no
//! session to do any of that in. So the fence sets NOLOGIN on every role
//! that could reach a migrated database (`CONNECT` on one, directly, through
//! a group or PUBLIC) or give LOGIN back (`CREATEROLE`), and terminates their
//! sessions everywhere; pg_hba.conf is not reachable over SQL. It spares the
//! proxy's own backends (held by the gate: after the switch they are closed,
//! on abort the lifted fence lets their sessions go on) and pgshift's own
//! connections (its role, which it cannot fence without locking itself out).
//! Superusers are not fenced unless listed in `fence_roles`: they could undo
//! any fence (validation names them). The migrated databases are also set
//! `default_transaction_read_only`, so an unfenced login errs on the safe side.
//!
//! Everything is undone exactly on abort: the record says which roles had
//! LOGIN (roles that were NOLOGIN stay so) and each database's previous
//! setting, and it is persisted before the fence goes up.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio_postgres::{Client, SimpleQueryMessage};
use tokio_util::sync::CancellationToken;

use crate::config::{Endpoint, ProxyUser};

use crate::db::{quote_ident, quote_literal};

/// What the fence changed, so it can be lifted exactly.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FenceRecord {
    /// (database, previous database-level default_transaction_read_only, if any).
    pub databases: Vec<(String, Option<String>)>,
    /// Roles whose LOGIN was revoked (they had it before).
    pub roles: Vec<String>,
    /// Roles the fence should cover but pgshift's user cannot alter (its own
    /// role, or missing privileges): while one can log in the fence does not
    /// hold, and [`verify`] stops the cutover. Informational.
    #[serde(default)]
    pub unfenceable: Vec<String>,
    pub terminated_sessions: u64,
    /// The source can wait for a terminated session to exit (PostgreSQL 14+:
    /// `pg_terminate_backend(pid, timeout)`), so none commits after the
    /// fence's reply — and so after the marker. Read by [`plan`].
    #[serde(skip)]
    pub await_termination: bool,
}

/// How long the fence waits for each terminated session to exit.
const TERMINATE_WAIT_MS: u32 = 1000;

/// Why fencing (or lifting, or checking) the source failed: an SQL step,
/// or a fence that does not hold ([`FenceError::does_not_hold`]).
#[derive(Debug, thiserror::Error)]
pub enum FenceError {
    #[error("fencing the source: {what}: {}", crate::db::describe(.source))]
    Sql {
        what: String,
        source: tokio_postgres::Error,
    },
    #[error(
        "fencing the source: the fence does not hold: role(s) {} can still log in to the source (pgshift's user cannot fence them)",
        .roles.join(", ")
    )]
    RolesCanLogIn { roles: Vec<String> },
    #[error(
        "fencing the source: the fence does not hold: {count} session(s) of fenced role(s) {roles} are still open"
    )]
    SessionsOpen { count: i64, roles: String },
    #[error(
        "fencing the source: the fence does not hold: {user} logged in to the fenced source{}",
        if *.wrote { " and could write" } else { "" }
    )]
    LoggedIn { user: String, wrote: bool },
    #[error("fencing the source: cannot verify the fence by logging in as {user}: {source}")]
    CannotVerify {
        user: String,
        source: crate::db::DbError,
    },
}

impl FenceError {
    /// The source still lets a fenced client in (not an SQL failure).
    pub fn does_not_hold(&self) -> bool {
        matches!(
            self,
            FenceError::RolesCanLogIn { .. }
                | FenceError::SessionsOpen { .. }
                | FenceError::LoggedIn { .. }
        )
    }
}

fn sql_err(what: &str, source: tokio_postgres::Error) -> FenceError {
    FenceError::Sql {
        what: what.to_string(),
        source,
    }
}

/// Fences the source. `spare_pids` are backends that must survive (the
/// proxy's own backends, held by the gate); pgshift's own connections are
/// recognised by their role and application_name.
pub async fn fence(
    admin: &Client,
    databases: &[String],
    roles: &[String],
    spare_pids: &[i32],
) -> Result<FenceRecord, FenceError> {
    let mut rec = plan(admin, databases, roles).await?;
    apply(admin, &mut rec, spare_pids).await?;
    Ok(rec)
}

/// One login role within the fence's reach, as [`survey`] finds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoleInReach {
    pub name: String,
    /// pgshift's user may set it NOLOGIN.
    pub can_fence: bool,
    /// It owns, holds grants in, has CONNECT granted on, or is connected to a
    /// database outside the migration: the fence locks it out of those too.
    pub uses_other_databases: bool,
}

/// Who the fence reaches on the source, without changing anything (for
/// validation and [`plan`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Survey {
    /// pgshift's own user (never fenced).
    pub own_role: String,
    /// Login roles the fence must make NOLOGIN.
    pub roles: Vec<RoleInReach>,
    /// Superusers that can log in and are not listed in `fence_roles`: the
    /// fence does not cover them.
    pub superusers: Vec<String>,
}

/// The login roles within the fence's reach: the listed ones, and every
/// other role but pgshift's own and the superusers that can connect to a
/// migrated database or give LOGIN back (CREATEROLE). Columns: name,
/// can_fence, uses_other_databases (read only when `outside`: validation
/// wants it, the fence does not).
fn reach_sql(db_array: &str, listed: &str, outside: bool) -> String {
    let outside = if outside {
        format!(
            "EXISTS (SELECT 1 FROM pg_database d
                   WHERE NOT d.datname = ANY({db_array}) AND NOT d.datistemplate
                     AND (d.datdba = r.oid
                          OR EXISTS (SELECT 1 FROM pg_shdepend s WHERE s.dbid = d.oid
                                       AND s.refclassid = 'pg_authid'::regclass AND s.refobjid = r.oid)
                          OR EXISTS (SELECT 1 FROM aclexplode(d.datacl) a
                                       WHERE a.grantee = r.oid AND a.privilege_type = 'CONNECT')))
             OR EXISTS (SELECT 1 FROM pg_stat_activity a
                        WHERE a.usesysid = r.oid AND NOT a.datname = ANY({db_array}))"
        )
    } else {
        "false".to_string()
    };
    format!(
        "SELECT r.rolname::text,
           r.rolname <> session_user AND (me.rolsuper OR (NOT r.rolsuper AND me.rolcreaterole AND
             CASE WHEN current_setting('server_version_num')::int >= 160000
                  THEN pg_has_role(session_user, r.oid, 'MEMBER WITH ADMIN OPTION')
                  ELSE NOT r.rolreplication END)),
           {outside}
         FROM pg_roles r, (SELECT rolsuper, rolcreaterole FROM pg_roles WHERE rolname = session_user) me
         WHERE r.rolcanlogin
           AND (r.rolname = ANY({listed})
                OR (NOT r.rolsuper AND r.rolname <> session_user
                    AND (r.rolcreaterole OR EXISTS (SELECT 1 FROM pg_database d
                         WHERE d.datname = ANY({db_array}) AND has_database_privilege(r.oid, d.oid, 'CONNECT')))))
         ORDER BY 1"
    )
}

/// The login roles within the fence's reach (see [`reach_sql`]).
async fn reach(
    admin: &Client,
    databases: &[String],
    listed: &[String],
    outside: bool,
) -> Result<Vec<RoleInReach>, FenceError> {
    let sql = reach_sql(&text_array(databases), &text_array(listed), outside);
    let rows = admin
        .query(&sql, &[])
        .await
        .map_err(|e| sql_err("reading the roles to fence", e))?;
    Ok(rows
        .iter()
        .map(|r| RoleInReach {
            name: r.get(0),
            can_fence: r.get(1),
            uses_other_databases: r.get(2),
        })
        .collect())
}

/// Reads who the fence reaches (see [`Survey`]).
pub async fn survey(
    admin: &Client,
    databases: &[String],
    listed: &[String],
) -> Result<Survey, FenceError> {
    let roles = reach(admin, databases, listed, true).await?;
    let own_role: String = admin
        .query_one("SELECT session_user::text", &[])
        .await
        .map_err(|e| sql_err("reading pgshift's user", e))?
        .get(0);
    let superusers = admin
        .query(
            "SELECT rolname::text FROM pg_roles WHERE rolsuper AND rolcanlogin
               AND rolname <> session_user AND NOT rolname = ANY($1) ORDER BY 1",
            &[&listed],
        )
        .await
        .map_err(|e| sql_err("reading superusers", e))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    Ok(Survey {
        own_role,
        roles,
        superusers,
    })
}

/// Reads what the fence is about to change (each database's previous
/// setting, the roles that can log in) without changing anything, so the
/// record can be persisted *before* the fence goes up: a pgshift killed in
/// the middle of [`apply`] still knows what to lift. `roles` are the
/// configured `fence_roles`, fenced even when superusers.
pub async fn plan(
    admin: &Client,
    databases: &[String],
    roles: &[String],
) -> Result<FenceRecord, FenceError> {
    let mut rec = FenceRecord::default();
    let version: i32 = admin
        .query_one("SELECT current_setting('server_version_num')::int", &[])
        .await
        .map_err(|e| sql_err("reading the server version", e))?
        .get(0);
    rec.await_termination = crate::pg::Version(version).terminate_can_wait();
    for db in databases {
        let prev = previous_read_only(admin, db).await?;
        rec.databases.push((db.clone(), prev));
    }
    for r in reach(admin, databases, roles, false).await? {
        if r.can_fence {
            rec.roles.push(r.name);
        } else {
            rec.unfenceable.push(r.name);
        }
    }
    Ok(rec)
}

/// Puts up the fence planned by [`plan`], in one round trip: one
/// transaction sets every database read-only and revokes LOGIN, then the
/// sessions that bypassed the proxy and those of the fenced roles are
/// terminated — after the commit, so a terminated client cannot come back.
///
/// The transaction commits with `synchronous_commit = off`: its commit is
/// visible to new sessions at once, and the cutover's marker, committed
/// synchronously on the same server afterwards, flushes the WAL through it
/// (WAL is flushed in order) before the walsender may send the marker. No
/// cutover proceeds past a marker that was not flushed, so a switch never
/// rests on a fence a source crash could undo.
///
/// The previous settings are read again inside the same transaction; when
/// they differ from the plan (changed by someone since), `rec` is corrected
/// and `true` is returned so the caller persists it again.
pub async fn apply(
    admin: &Client,
    rec: &mut FenceRecord,
    spare_pids: &[i32],
) -> Result<bool, FenceError> {
    let reply = match admin.simple_query(&apply_sql(rec, spare_pids)).await {
        Ok(r) => r,
        Err(e) => {
            // A failed statement leaves the transaction block aborted: end it,
            // so the same connection can lift what went up.
            let _ = admin.batch_execute("ROLLBACK").await;
            return Err(sql_err("putting up the fence", e));
        }
    };
    let rows: Vec<_> = reply
        .iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(r),
            _ => None,
        })
        .collect();
    let mut changed = false;
    let mut terminated = 0;
    let mut could_login = Vec::new();
    for r in rows {
        match r.get(0) {
            Some("db") => {
                let (db, prev) = (r.get(1).unwrap_or_default(), r.get(2).map(str::to_string));
                if let Some(entry) = rec.databases.iter_mut().find(|(d, _)| d == db)
                    && entry.1 != prev
                {
                    entry.1 = prev;
                    changed = true;
                }
            }
            Some("login") => could_login.push(r.get(1).unwrap_or_default().to_string()),
            Some("terminated") => {
                terminated = r.get(1).and_then(|n| n.parse().ok()).unwrap_or(0);
            }
            _ => {}
        }
    }
    // A planned role that could no longer log in must not get LOGIN back
    // when the fence is lifted.
    let before = rec.roles.len();
    rec.roles.retain(|x| could_login.contains(x));
    changed |= rec.roles.len() != before;
    rec.terminated_sessions = terminated;
    Ok(changed)
}

/// The fence as one multi-statement request (see [`apply`]).
fn apply_sql(rec: &FenceRecord, spare_pids: &[i32]) -> String {
    let names: Vec<&str> = rec.databases.iter().map(|(d, _)| d.as_str()).collect();
    let db_array = text_array(&names);
    let mut sql = vec![
        "BEGIN".to_string(),
        "SET LOCAL synchronous_commit = off".to_string(),
        // The previous settings, read in the transaction that changes them.
        format!(
            "SELECT 'db', d.datname, (SELECT substr(c, length('default_transaction_read_only=') + 1)
               FROM unnest(s.setconfig) c WHERE c LIKE 'default\\_transaction\\_read\\_only=%')
             FROM pg_database d LEFT JOIN pg_db_role_setting s ON s.setdatabase = d.oid AND s.setrole = 0
             WHERE d.datname = ANY({db_array})"
        ),
    ];
    if !rec.roles.is_empty() {
        sql.push(format!(
            "SELECT 'login', rolname FROM pg_roles WHERE rolcanlogin AND rolname = ANY({})",
            text_array(&rec.roles)
        ));
    }
    for (db, _) in &rec.databases {
        sql.push(format!(
            "ALTER DATABASE {} SET default_transaction_read_only = on",
            quote_ident(db)
        ));
    }
    for role in &rec.roles {
        sql.push(format!("ALTER ROLE {} NOLOGIN", quote_ident(role)));
    }
    sql.push("COMMIT".to_string());
    let sessions = to_terminate(&db_array, &rec.roles, spare_pids);
    sql.push(format!(
        "SELECT 'terminated', count(pg_terminate_backend(pid)) {sessions}"
    ));
    // Awaited where the server can: a session caught inside its COMMIT
    // finishes it before it exits, and that commit must precede the marker.
    // All were signalled first, so they exit together: the wait is the
    // slowest one's, not their sum.
    if rec.await_termination {
        sql.push(format!(
            "SELECT 'awaited', count(pg_terminate_backend(pid, {TERMINATE_WAIT_MS})) {sessions}"
        ));
    }
    sql.join(";\n")
}

/// `ARRAY['a', 'b']::text[]`, each item quoted.
fn text_array<S: AsRef<str>>(items: &[S]) -> String {
    let quoted: Vec<String> = items.iter().map(|i| quote_literal(i.as_ref())).collect();
    format!("ARRAY[{}]::text[]", quoted.join(", "))
}

/// `FROM … WHERE …` selecting the sessions the fence terminates: any client
/// backend on a migrated database that is neither one of the proxy's
/// (`spare_pids`) nor pgshift's own (its role and application_name: a name
/// alone is any client's to choose), and any session of a fenced role, on
/// any database (one with CREATEROLE could give LOGIN back).
fn to_terminate(db_array: &str, fenced: &[String], spare_pids: &[i32]) -> String {
    let pids: Vec<String> = spare_pids.iter().map(i32::to_string).collect();
    format!(
        "FROM pg_stat_activity
         WHERE pid <> pg_backend_pid() AND NOT (pid = ANY(ARRAY[{}]::int[]))
           AND ((datname = ANY({db_array}) AND backend_type = 'client backend'
                 AND NOT (usename = session_user AND coalesce(application_name, '') LIKE 'pgshift%'))
                OR usename = ANY({}))",
        pids.join(", "),
        text_array(fenced)
    )
}

/// How many sessions the fence will terminate if it went up now (bypassing
/// the proxy, or of a role it fences). Run before the pause, it also loads
/// the server's caches for the fence's own query on this connection: a cold
/// first read of `pg_stat_activity` costs milliseconds the pause should not pay.
pub async fn count_bypassing(
    admin: &Client,
    rec: &FenceRecord,
    spare_pids: &[i32],
) -> Result<u64, FenceError> {
    let names: Vec<&str> = rec.databases.iter().map(|(d, _)| d.as_str()).collect();
    let sql = format!(
        "SELECT count(*) {}",
        to_terminate(&text_array(&names), &rec.roles, spare_pids)
    );
    let reply = admin
        .simple_query(&sql)
        .await
        .map_err(|e| sql_err("counting sessions that bypass the proxy", e))?;
    Ok(reply
        .iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(r) => r.get(0).and_then(|n| n.parse().ok()),
            _ => None,
        })
        .unwrap_or(0))
}

async fn previous_read_only(admin: &Client, db: &str) -> Result<Option<String>, FenceError> {
    let rows = admin
        .query(
            "SELECT unnest(s.setconfig) FROM pg_db_role_setting s JOIN pg_database d ON d.oid = s.setdatabase
             WHERE d.datname = $1 AND s.setrole = 0",
            &[&db],
        )
        .await
        .map_err(|e| sql_err("reading database settings", e))?;
    Ok(rows.iter().find_map(|r| {
        let kv: String = r.get(0);
        kv.strip_prefix("default_transaction_read_only=")
            .map(str::to_string)
    }))
}

/// Proves the fence holds, after [`apply`] and before the switch: no role
/// within its reach can log in or still has a session (other than the
/// proxy's `spare_pids`), and logging in as a fenced proxy user — the way
/// an application would write to the old primary — actually fails. One
/// login is enough to prove the mechanism (the catalog proves it covers
/// every role) and costs a connection and an authentication: it runs beside
/// the catalog checks, while the marker travels. Returns what it checked.
pub async fn verify(
    admin: &Client,
    source: &Endpoint,
    rec: &FenceRecord,
    listed: &[String],
    spare_pids: &[i32],
    users: &[ProxyUser],
) -> Result<String, FenceError> {
    let names: Vec<String> = rec.databases.iter().map(|(d, _)| d.clone()).collect();
    let probe = users.iter().find(|u| rec.roles.contains(&u.name));
    let db = names.first().map(String::as_str).unwrap_or("postgres");
    let catalog = async {
        // Fenced roles are NOLOGIN now: whoever is still listed can log in.
        let open: Vec<String> = reach(admin, &names, listed, false)
            .await?
            .into_iter()
            .map(|r| r.name)
            .collect();
        if !open.is_empty() {
            return Err(FenceError::RolesCanLogIn { roles: open });
        }
        sessions_gone(admin, &rec.roles, spare_pids).await
    };
    let login = async {
        match probe {
            Some(u) => login_attempt(source, db, u).await,
            None => Ok(()),
        }
    };
    let (catalog, login) = tokio::join!(catalog, login);
    catalog?;
    login?;
    Ok(format!(
        "{} role(s) cannot log in{}",
        rec.roles.len(),
        probe
            .map(|u| format!("; login as proxy user {} refused", u.name))
            .unwrap_or_default()
    ))
}

/// Waits (up to the termination wait) until no session of a fenced role is
/// left but the spared ones: before PostgreSQL 14 a terminated backend
/// exits after the fence's reply.
async fn sessions_gone(
    admin: &Client,
    fenced: &[String],
    spare_pids: &[i32],
) -> Result<(), FenceError> {
    let pids: Vec<String> = spare_pids.iter().map(i32::to_string).collect();
    let sql = format!(
        "SELECT count(*), string_agg(DISTINCT usename::text, ', ') FROM pg_stat_activity
         WHERE pid <> pg_backend_pid() AND NOT (pid = ANY(ARRAY[{}]::int[])) AND usename = ANY({})",
        pids.join(", "),
        text_array(fenced)
    );
    let deadline = tokio::time::Instant::now() + Duration::from_millis(TERMINATE_WAIT_MS.into());
    loop {
        let row = admin
            .query_one(&sql, &[])
            .await
            .map_err(|e| sql_err("checking the fenced roles' sessions", e))?;
        let n: i64 = row.get(0);
        if n == 0 {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            let who: Option<String> = row.get(1);
            return Err(FenceError::SessionsOpen {
                count: n,
                roles: who.unwrap_or_default(),
            });
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Logs in to the fenced source as `user` with every override a client
/// could use (`default_transaction_read_only=off` in the startup packet);
/// the server must refuse (a NOLOGIN role gets SQLSTATE 28000).
async fn login_attempt(source: &Endpoint, db: &str, user: &ProxyUser) -> Result<(), FenceError> {
    let ep = Endpoint {
        user: user.name.clone(),
        password: Some(user.password.clone()),
        ..source.with_dbname(db)
    };
    match crate::db::connect(&ep, "source (fence check)").await {
        Err(crate::db::DbError::Connect { source: e, .. })
            if e.as_db_error().map(|d| d.code().code()) == Some("28000") =>
        {
            Ok(())
        }
        Err(source) => Err(FenceError::CannotVerify {
            user: user.name.clone(),
            source,
        }),
        Ok(c) => {
            let wrote = c
                .batch_execute(
                    "BEGIN READ WRITE; CREATE TEMP TABLE pgshift_fence_probe (); ROLLBACK",
                )
                .await
                .is_ok();
            Err(FenceError::LoggedIn {
                user: user.name.clone(),
                wrote,
            })
        }
    }
}

/// Undoes [`fence`]: restores each database's previous setting and LOGIN.
/// A database or role dropped meanwhile is skipped: a lift that cannot
/// finish would keep the source fenced.
pub async fn lift(admin: &Client, rec: &FenceRecord) -> Result<(), FenceError> {
    let names: Vec<&str> = rec.databases.iter().map(|(d, _)| d.as_str()).collect();
    let exist = existing(admin, "pg_database", "datname", &names).await?;
    for (db, prev) in rec.databases.iter().filter(|(d, _)| exist.contains(d)) {
        let sql = match prev {
            Some(v) => format!(
                "ALTER DATABASE {} SET default_transaction_read_only = {}",
                quote_ident(db),
                quote_literal(v)
            ),
            None => format!(
                "ALTER DATABASE {} RESET default_transaction_read_only",
                quote_ident(db)
            ),
        };
        admin
            .batch_execute(&sql)
            .await
            .map_err(|e| sql_err(&format!("lifting the fence on {db}"), e))?;
    }
    let exist = existing(admin, "pg_roles", "rolname", &rec.roles).await?;
    for role in rec.roles.iter().filter(|r| exist.contains(r)) {
        admin
            .batch_execute(&format!("ALTER ROLE {} LOGIN", quote_ident(role)))
            .await
            .map_err(|e| sql_err(&format!("ALTER ROLE {role} LOGIN"), e))?;
    }
    Ok(())
}

/// Which of `names` still exist in a catalog (`pg_database` / `pg_roles`).
async fn existing<S: AsRef<str>>(
    admin: &Client,
    catalog: &str,
    column: &str,
    names: &[S],
) -> Result<Vec<String>, FenceError> {
    let names: Vec<&str> = names.iter().map(AsRef::as_ref).collect();
    if names.is_empty() {
        return Ok(vec![]);
    }
    Ok(admin
        .query(
            &format!("SELECT {column}::text FROM {catalog} WHERE {column} = ANY($1)"),
            &[&names],
        )
        .await
        .map_err(|e| sql_err(&format!("reading {catalog}"), e))?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

/// Lifts `rec` on fresh connections until it goes, retrying (with backoff,
/// each failure logged) while the source cannot be reached: a source left
/// read-only is an outage. Returns how many attempts it took, or `None` when
/// `cancel` fires first (the fence is still up; whoever persisted `rec`
/// must lift it later).
pub(crate) async fn lift_until_done(
    source: &Endpoint,
    rec: &FenceRecord,
    cancel: &CancellationToken,
) -> Option<u32> {
    let mut delay = Duration::from_millis(200);
    for attempt in 1.. {
        let r = match crate::db::connect(source, "source (lift fence)").await {
            Ok(admin) => lift(&admin, rec).await.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        match r {
            Ok(()) => return Some(attempt),
            Err(e) => tracing::warn!("cannot lift the fence yet (retrying in {delay:?}): {e}"),
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = cancel.cancelled() => return None,
        }
        delay = (delay * 2).min(Duration::from_secs(10));
    }
    None
}
