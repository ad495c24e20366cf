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
pub enum GuardError {
    #[error("guarding the target: {what}: {}", crate::db::describe(.source))]
    Sql {
        what: String,
        source: tokio_postgres::Error,
    },
    #[error(
        "guarding the target: the target user's name {role:?} cannot be written into the guard"
    )]
    UnwritableRole { role: String },
    /// Disarming could not drop the guard from these tables (each with why).
    #[error(
        "guarding the target: the disarmed guard stays on {}; drop it later with DROP SCHEMA pgshift_guard CASCADE",
        .tables.join(", ")
    )]
    LeftBehind { tables: Vec<String> },
}

fn sql_err(what: &str, source: tokio_postgres::Error) -> GuardError {
    GuardError::Sql {
        what: what.to_string(),
        source,
    }
}

/// The trigger function's body: refusing (armed) or a no-op.
fn function_sql(own_role: &str, armed: bool) -> Result<String, GuardError> {
    // The body is dollar-quoted: a role name must not end it.
    if own_role.contains("$pgshift_guard$") {
        return Err(GuardError::UnwritableRole {
            role: own_role.to_string(),
        });
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

/// A statement that guards the tables of the connected database that lack
/// the guard, where it is installed (nothing where it is not): apply runs
/// it after replicated DDL that created tables, in the same transaction.
pub fn guard_new_tables_sql() -> String {
    "DO $pgshift_guard$ DECLARE r record; BEGIN
       IF pg_catalog.to_regprocedure('pgshift_guard.refuse()') IS NULL THEN RETURN; END IF;
       FOR r IN SELECT n.nspname, c.relname FROM pg_catalog.pg_class c
                  JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
                 WHERE c.relkind IN ('r', 'p')
                   AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'pgshift', 'pgshift_guard')
                   AND n.nspname NOT LIKE 'pg\\_%'
                   AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_trigger t
                                    WHERE t.tgrelid = c.oid AND t.tgname = 'pgshift_guard')
       LOOP
         EXECUTE pg_catalog.format('CREATE TRIGGER pgshift_guard BEFORE INSERT OR UPDATE OR DELETE OR TRUNCATE ON %I.%I FOR EACH STATEMENT EXECUTE PROCEDURE pgshift_guard.refuse()', r.nspname, r.relname);
       END LOOP;
     END $pgshift_guard$"
        .to_string()
}

/// Arms (`true`) or disarms the guard where it is installed: one statement,
/// effective for every session's next write. `own_role` is the user
/// `target` is connected as.
pub(crate) async fn set_armed(
    target: &Client,
    own_role: &str,
    armed: bool,
) -> Result<(), GuardError> {
    match target.batch_execute(&function_sql(own_role, armed)?).await {
        Ok(()) => Ok(()),
        // Not installed (offline mode, or already removed): nothing to switch.
        Err(e) if e.as_db_error().map(|d| d.code().code()) == Some("3F000") => Ok(()),
        Err(e) => Err(sql_err("switching the guard", e)),
    }
}

/// How long dropping one table's trigger may wait for its lock, per try: a
/// waiting DROP holds up every later query on the table behind it, so a try
/// must cost clients no more than a few milliseconds (at 50 ms, with 500
/// sessions just moved onto cold backends, the tries queued clients into a
/// one-second convoy). Tries are spaced out, up to about half a minute in
/// all; the switch is done by then and the trigger is disarmed meanwhile.
const DROP_LOCK_TIMEOUT: &str = "5ms";
const DROP_TRIES: u32 = 40;
/// The wait before try `n` (from 0): 20 ms doubling, at most a second.
fn drop_backoff(n: u32) -> std::time::Duration {
    std::time::Duration::from_millis((20u64 << n.min(6)).min(1000))
}

/// Drops the guard, disarmed first: each table's trigger in a transaction
/// of its own with a short `lock_timeout` (retried: clients may be running
/// on the table), then the schema and its function. A trigger that cannot
/// be dropped is reported and stays, harmless while disarmed. `own_role` is
/// the user `target` is connected as.
pub async fn remove(target: &Client, own_role: &str) -> Result<(), GuardError> {
    set_armed(target, own_role, false).await?;
    let tables: Vec<String> = target
        .query(
            "SELECT format('%I.%I', n.nspname, c.relname) FROM pg_trigger t
             JOIN pg_class c ON c.oid = t.tgrelid JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE t.tgname = 'pgshift_guard'",
            &[],
        )
        .await
        .map_err(|e| sql_err("listing the guarded tables", e))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut stuck = Vec::new();
    for table in &tables {
        let sql = format!(
            "BEGIN; SET LOCAL lock_timeout = '{DROP_LOCK_TIMEOUT}'; DROP TRIGGER IF EXISTS pgshift_guard ON {table}; COMMIT"
        );
        let mut last = None;
        for attempt in 0..DROP_TRIES {
            match target.batch_execute(&sql).await {
                Ok(()) => {
                    last = None;
                    break;
                }
                Err(e) => {
                    // End the failed transaction so the connection stays usable.
                    let _ = target.batch_execute("ROLLBACK").await;
                    last = Some(crate::db::describe(&e));
                    tokio::time::sleep(drop_backoff(attempt)).await;
                }
            }
        }
        if let Some(e) = last {
            stuck.push(format!("{table} ({e})"));
        }
    }
    if !stuck.is_empty() {
        return Err(GuardError::LeftBehind { tables: stuck });
    }
    target
        .batch_execute("DROP SCHEMA IF EXISTS pgshift_guard CASCADE")
        .await
        .map_err(|e| sql_err("dropping the guard's schema", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_role_that_would_end_the_body_is_refused_by_name() {
        let e = function_sql("x$pgshift_guard$y", true).unwrap_err();
        assert!(
            matches!(&e, GuardError::UnwritableRole { role } if role == "x$pgshift_guard$y"),
            "{e:?}"
        );
        assert!(function_sql("app", true).is_ok());
    }
}
