//! Fencing the source: no client may write to it once the cutover has drained
//! the proxy. `default_transaction_read_only` is set for every migrated
//! database, sessions that bypassed the proxy are terminated, and listed roles
//! lose LOGIN. Everything is undone exactly on abort (previous settings are
//! remembered, not assumed).

use serde::{Deserialize, Serialize};
use tokio_postgres::Client;

use crate::db::{quote_ident, quote_literal};

/// What the fence changed, so it can be lifted exactly.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FenceRecord {
    /// (database, previous database-level default_transaction_read_only, if any).
    pub databases: Vec<(String, Option<String>)>,
    /// Roles whose LOGIN was revoked (they had it before).
    pub roles: Vec<String>,
    pub terminated_sessions: u64,
}

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

/// Puts up the fence planned by [`plan`].
pub async fn apply(
    admin: &Client,
    rec: &mut FenceRecord,
    spare_pids: &[i32],
) -> Result<(), FenceError> {
    for (db, _) in &rec.databases {
        admin
            .batch_execute(&format!(
                "ALTER DATABASE {} SET default_transaction_read_only = on",
                quote_ident(db)
            ))
            .await
            .map_err(|e| sql_err(&format!("ALTER DATABASE {db}"), e))?;
    }
    for role in &rec.roles {
        admin
            .batch_execute(&format!("ALTER ROLE {} NOLOGIN", quote_ident(role)))
            .await
            .map_err(|e| sql_err(&format!("ALTER ROLE {role} NOLOGIN"), e))?;
    }
    let databases: Vec<String> = rec.databases.iter().map(|(d, _)| d.clone()).collect();
    // Sessions that bypassed the proxy: any client backend on a migrated
    // database that is neither one of the proxy's nor pgshift's own.
    let n: i64 = admin
        .query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
             WHERE datname = ANY($1) AND pid <> pg_backend_pid() AND backend_type = 'client backend'
               AND NOT (pid = ANY($2)) AND coalesce(application_name, '') NOT LIKE 'pgshift%'",
            &[&databases, &spare_pids],
        )
        .await
        .map_err(|e| sql_err("terminating sessions that bypass the proxy", e))?
        .get(0);
    rec.terminated_sessions = n as u64;
    Ok(())
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
