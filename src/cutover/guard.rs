//! Guarding the target before the switch: until the cutover, a migrated
//! database on the target takes writes from apply only. A write from an
//! application role would be overwritten by apply, or make it fail, silently.
//!
//! Why a trigger, and not LOGIN or a privilege: the proxy pre-warms its
//! sessions' target backends (as the application roles) before the pause,
//! so those roles must be able to log in; and a privilege revoked from a
//! table is given back by its owner, usually the application role. A
//! statement trigger `pgshift_guard` on every table refuses INSERT, UPDATE,
//! DELETE and TRUNCATE with SQLSTATE 25006 — for every session but
//! pgshift's own user and the superusers — and does not fire in apply's
//! sessions (`session_replication_role = replica`). The trigger function
//! lives in the schema `pgshift_guard`; the switch replaces its body by a
//! no-op (one statement per database, inside the pause, before the gate
//! opens), so pre-warmed sessions write as soon as they move; after the gate
//! opens the schema and its triggers are dropped. A cancel drops them too:
//! the target is left exactly as the copy made it.
//!
//! It guards against mistakes, not against the owner of a table, who may
//! disable a trigger; the source's fence is the one that must hold.

use tokio_postgres::Client;

use crate::db::{quote_ident, quote_literal};

#[derive(Debug, thiserror::Error)]
#[error("guarding the target: {0}")]
pub struct GuardError(pub String);

fn sql_err(what: &str, e: tokio_postgres::Error) -> GuardError {
    GuardError(format!("{what}: {}", crate::db::describe(&e)))
}

/// The trigger function's body: refusing (armed) or a no-op.
fn function_sql(own_role: &str, armed: bool) -> Result<String, GuardError> {
    // The body is dollar-quoted: a role name must not end it.
    if own_role.contains("$pgshift_guard$") {
        return Err(GuardError(format!(
            "the target user's name {own_role:?} cannot be written into the guard"
        )));
    }
    let body = if armed {
        format!(
            "IF session_user = {} OR (SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = session_user) THEN
               RETURN NULL;
             END IF;
             RAISE EXCEPTION 'pgshift: table %.% is being migrated to this server; it takes writes after the cutover', TG_TABLE_SCHEMA, TG_TABLE_NAME
               USING ERRCODE = '25006', HINT = 'write through the pgshift proxy';",
            quote_literal(own_role)
        )
    } else {
        "RETURN NULL;".to_string()
    };
    Ok(format!(
        "CREATE OR REPLACE FUNCTION pgshift_guard.refuse() RETURNS trigger LANGUAGE plpgsql AS $pgshift_guard$
         BEGIN {body} END $pgshift_guard$"
    ))
}

/// Puts up the guard on the database `target` is connected to: the
/// function (armed) and a trigger on every table that lacks one. Idempotent:
/// run whenever streaming starts, so a restart re-arms it.
pub async fn install(target: &Client) -> Result<usize, GuardError> {
    let own: String = target
        .query_one("SELECT session_user::text", &[])
        .await
        .map_err(|e| sql_err("reading the target user", e))?
        .get(0);
    let tables: Vec<(String, String)> = target
        .query(
            "SELECT n.nspname::text, c.relname::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE c.relkind IN ('r', 'p') AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'pgshift', 'pgshift_guard')
               AND n.nspname NOT LIKE 'pg\\_%'
               AND NOT EXISTS (SELECT 1 FROM pg_trigger t WHERE t.tgrelid = c.oid AND t.tgname = 'pgshift_guard')",
            &[],
        )
        .await
        .map_err(|e| sql_err("listing the tables to guard", e))?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let mut sql = vec![
        "BEGIN".to_string(),
        "CREATE SCHEMA IF NOT EXISTS pgshift_guard".to_string(),
        function_sql(&own, true)?,
    ];
    for (schema, table) in &tables {
        sql.push(format!(
            "CREATE TRIGGER pgshift_guard BEFORE INSERT OR UPDATE OR DELETE OR TRUNCATE ON {}.{}
             FOR EACH STATEMENT EXECUTE PROCEDURE pgshift_guard.refuse()",
            quote_ident(schema),
            quote_ident(table)
        ));
    }
    sql.push("COMMIT".to_string());
    if let Err(e) = target.batch_execute(&sql.join(";\n")).await {
        let _ = target.batch_execute("ROLLBACK").await;
        return Err(sql_err("putting up the guard", e));
    }
    Ok(tables.len())
}

/// Arms (`true`) or disarms the guard where it is installed: one statement,
/// effective for every session's next write. `own_role` is the user
/// `target` is connected as.
pub async fn set_armed(target: &Client, own_role: &str, armed: bool) -> Result<(), GuardError> {
    match target.batch_execute(&function_sql(own_role, armed)?).await {
        Ok(()) => Ok(()),
        // Not installed (offline mode, or already removed): nothing to switch.
        Err(e) if e.as_db_error().map(|d| d.code().code()) == Some("3F000") => Ok(()),
        Err(e) => Err(sql_err("switching the guard", e)),
    }
}

/// Drops the guard (schema, function and triggers). Each trigger's drop
/// locks its table: `lock_timeout` bounds the wait behind a client, and a
/// guard left disarmed is harmless.
pub async fn remove(target: &Client) -> Result<(), GuardError> {
    let r = target
        .batch_execute(
            "BEGIN; SET LOCAL lock_timeout = '2s'; DROP SCHEMA IF EXISTS pgshift_guard CASCADE; COMMIT",
        )
        .await;
    if let Err(e) = r {
        // End the failed transaction so the connection stays usable.
        let _ = target.batch_execute("ROLLBACK").await;
        return Err(sql_err("dropping the guard", e));
    }
    Ok(())
}
