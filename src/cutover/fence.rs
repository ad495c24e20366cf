//! Fencing the source: no client may write to it once the cutover has drained
//! the proxy. `default_transaction_read_only` is set for every migrated
//! database, sessions that bypassed the proxy are terminated, and listed roles
//! lose LOGIN. Everything is undone exactly on abort (previous settings are
//! remembered, not assumed).

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio_postgres::{Client, SimpleQueryMessage};
use tokio_util::sync::CancellationToken;

use crate::config::Endpoint;

use crate::db::{quote_ident, quote_literal};

/// What the fence changed, so it can be lifted exactly.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FenceRecord {
    /// (database, previous database-level default_transaction_read_only, if any).
    pub databases: Vec<(String, Option<String>)>,
    /// Roles whose LOGIN was revoked (they had it before).
    pub roles: Vec<String>,
    pub terminated_sessions: u64,
    /// The source can wait for a terminated session to exit (PostgreSQL 14+:
    /// `pg_terminate_backend(pid, timeout)`), so none commits after the
    /// fence's reply — and so after the marker. Read by [`plan`].
    #[serde(skip)]
    pub await_termination: bool,
}

/// How long the fence waits for each terminated session to exit.
const TERMINATE_WAIT_MS: u32 = 1000;

#[derive(Debug, thiserror::Error)]
#[error("fencing the source: {0}")]
pub struct FenceError(pub String);

fn sql_err(what: &str, e: tokio_postgres::Error) -> FenceError {
    FenceError(format!("{what}: {}", crate::db::describe(&e)))
}

/// Fences the source. `spare_pids` are backends that must survive (the
/// proxy's own backends, held by the gate); pgshift's own connections are
/// recognised by their application_name.
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

/// Reads what the fence is about to change (each database's previous
/// setting, the roles that can log in) without changing anything, so the
/// record can be persisted *before* the fence goes up: a pgshift killed in
/// the middle of [`apply`] still knows what to lift.
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
    for role in roles {
        let can_login: Option<bool> = admin
            .query_opt(
                "SELECT rolcanlogin FROM pg_roles WHERE rolname = $1",
                &[role],
            )
            .await
            .map_err(|e| sql_err("reading roles", e))?
            .map(|r| r.get(0));
        if can_login == Some(true) {
            rec.roles.push(role.clone());
        }
    }
    Ok(rec)
}

/// Puts up the fence planned by [`plan`], in one round trip: one
/// transaction sets every database read-only (and revokes LOGIN), then the
/// sessions that bypassed the proxy are terminated — after the commit, so a
/// terminated client that reconnects is already read-only.
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
            Some("nologin") => {
                // A planned role that could no longer log in must not get
                // LOGIN back when the fence is lifted.
                let role = r.get(1).unwrap_or_default();
                if r.get(2) != Some("t") {
                    rec.roles.retain(|x| x != role);
                    changed = true;
                }
            }
            Some("terminated") => {
                terminated = r.get(1).and_then(|n| n.parse().ok()).unwrap_or(0);
            }
            _ => {}
        }
    }
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
            "SELECT 'nologin', rolname, rolcanlogin FROM pg_roles WHERE rolname = ANY({})",
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
    // Awaited where the server can: a session caught inside its COMMIT
    // finishes it before it exits, and that commit must precede the marker.
    let wait = if rec.await_termination {
        format!(", {TERMINATE_WAIT_MS}")
    } else {
        String::new()
    };
    sql.push(format!(
        "SELECT 'terminated', count(pg_terminate_backend(pid{wait})) {}",
        bypassing(&db_array, spare_pids)
    ));
    sql.join(";\n")
}

/// `ARRAY['a', 'b']::text[]`, each item quoted.
fn text_array<S: AsRef<str>>(items: &[S]) -> String {
    let quoted: Vec<String> = items.iter().map(|i| quote_literal(i.as_ref())).collect();
    format!("ARRAY[{}]::text[]", quoted.join(", "))
}

/// `FROM … WHERE …` selecting the sessions that bypass the proxy: any client
/// backend on a migrated database that is neither one of the proxy's
/// (`spare_pids`) nor pgshift's own.
fn bypassing(db_array: &str, spare_pids: &[i32]) -> String {
    let pids: Vec<String> = spare_pids.iter().map(i32::to_string).collect();
    format!(
        "FROM pg_stat_activity
         WHERE datname = ANY({db_array}) AND pid <> pg_backend_pid() AND backend_type = 'client backend'
           AND NOT (pid = ANY(ARRAY[{}]::int[])) AND coalesce(application_name, '') NOT LIKE 'pgshift%'",
        pids.join(", ")
    )
}

/// How many sessions bypass the proxy now (the fence will terminate those
/// still there). Run before the pause, it also loads the server's caches
/// for the fence's own query on this connection: a cold first read of
/// `pg_stat_activity` costs milliseconds the pause should not pay.
pub async fn count_bypassing(
    admin: &Client,
    databases: &[String],
    spare_pids: &[i32],
) -> Result<u64, FenceError> {
    let sql = format!(
        "SELECT count(*) {}",
        bypassing(&text_array(databases), spare_pids)
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

/// Undoes [`fence`]: restores each database's previous setting and LOGIN.
pub async fn lift(admin: &Client, rec: &FenceRecord) -> Result<(), FenceError> {
    for (db, prev) in &rec.databases {
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
    for role in &rec.roles {
        admin
            .batch_execute(&format!("ALTER ROLE {} LOGIN", quote_ident(role)))
            .await
            .map_err(|e| sql_err(&format!("ALTER ROLE {role} LOGIN"), e))?;
    }
    Ok(())
}

/// Lifts `rec` on fresh connections until it goes, retrying (with backoff,
/// each failure logged) while the source cannot be reached: a source left
/// read-only is an outage. Returns how many attempts it took, or `None` when
/// `cancel` fires first (the fence is still up; whoever persisted `rec`
/// must lift it later).
pub async fn lift_until_done(
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
